"""Command-line commands of the feedback store, for ``python -m hive`` (and ``python -m db``).

``register(subparsers)`` adds: ``db upgrade``, ``db stats``, ``export``, ``import``,
``user add`` and ``delete-user``. Each handler returns an exit code; with ``--json``
the last line printed is one JSON object. Refused input exits with 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from db.config import db_url, hive_home, redact_url

Handler = Callable[[argparse.Namespace], int]


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    print(json.dumps(payload, sort_keys=True) if args.json else human)


def _guarded(fn: Handler) -> Handler:
    """Turn refused input (ValueError and friends) into exit code 2 and a clear message."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ValueError as exc:  # FeedbackError, ExportError, ImageError are ValueErrors
            print(f"error: {exc}", file=sys.stderr)
            if getattr(args, "json", False):
                print(json.dumps({"ok": False, "error": str(exc)}))
            return 2

    run.__doc__ = fn.__doc__
    return run


@_guarded
def _cmd_upgrade(args: argparse.Namespace) -> int:
    from db.engine import get_engine
    from db.migrate import current_revision, head_revision, upgrade

    engine = get_engine()  # creates and migrates a new database
    upgrade(engine)
    rev = current_revision(engine)
    payload = {"ok": rev == head_revision(), "revision": rev, "url": redact_url(db_url())}
    _emit(args, payload, f"database {payload['url']} is at revision {rev}")
    return 0 if payload["ok"] else 1


@_guarded
def _cmd_stats(args: argparse.Namespace) -> int:
    from db.engine import session_scope
    from db.queries import table_counts

    with session_scope(write=False) as s:
        counts = table_counts(s)
    width = max(map(len, counts))
    human = "\n".join([f"database {redact_url(db_url())}"] + [f"{k:<{width}}  {v}" for k, v in counts.items()])
    _emit(args, counts, human)
    return 0


@_guarded
def _cmd_export(args: argparse.Namespace) -> int:
    from db.engine import session_scope
    from db.export import export_data
    from db.images import ImageStore

    with session_scope(write=False) as s:
        result = export_data(s, ImageStore(), args.out, args.format, redact_passwords=args.redact_passwords)
    rows = sum(result["tables"].values())
    _emit(args, {"ok": True, **result}, f"exported {rows} rows ({args.format}) to {result['out']}")
    return 0


@_guarded
def _cmd_import(args: argparse.Namespace) -> int:
    from db.engine import session_scope
    from db.export import import_data
    from db.images import ImageStore

    with session_scope() as s:
        result = import_data(s, ImageStore(), args.path, args.format)
    rows = sum(result["tables"].values())
    _emit(args, {"ok": True, **result}, f"imported {rows} rows ({result['format']}) from {result['path']}")
    return 0


@_guarded
def _cmd_user_add(args: argparse.Namespace) -> int:
    from db.engine import session_scope
    from db.feedback import create_user

    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    with session_scope() as s:
        user = create_user(s, args.name, args.role, password=password, simulated=args.simulated)
        payload = {"ok": True, "id": user.id, "name": user.name, "role": user.role,
                   "is_simulated": user.is_simulated, "has_password": password is not None}
    _emit(args, payload, f"added {user.role} {user.name!r} (id {user.id})")
    return 0


@_guarded
def _cmd_delete_user(args: argparse.Namespace) -> int:
    from db.engine import session_scope
    from db.feedback import FeedbackError, delete_user_data, get_user_by_name
    from db.images import ImageStore

    if not args.yes:
        raise FeedbackError(f"deleting {args.name!r} and all their data cannot be undone; add --yes")
    with session_scope() as s:
        user = get_user_by_name(s, args.name)
        if user is None:
            raise FeedbackError(f"no user named {args.name!r}")
        counts = delete_user_data(s, user.id, ImageStore())
    _emit(args, {"ok": True, "name": args.name, "deleted": counts},
          f"deleted {args.name!r}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def _desc(*paragraphs: str) -> str:
    return "\n\n".join(textwrap.fill(p, 78) for p in paragraphs)


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the feedback-store commands to a ``python -m hive`` style CLI."""
    env = (
        "Environment: HIVE_HOME (data folder, default ./data), HIVE_DB_URL (any SQLAlchemy "
        "URL; default sqlite:///$HIVE_HOME/hive.db)."
    )
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser("db", help="feedback database: migrate, count rows",
                              description=_desc("Manage the feedback database.", env), formatter_class=fmt)
    sub = p.add_subparsers(dest="db_command", metavar="{upgrade,stats}", required=True)
    q = sub.add_parser("upgrade", help="create the database or migrate it to the newest schema",
                       description=_desc(
            "Create the database if needed and apply every Alembic migration "
                       "(safe to run while the app runs; concurrent upgrades wait for each other).",
            env,
        ),
                       formatter_class=fmt)
    _json_flag(q)
    q.set_defaults(func=_cmd_upgrade)
    q = sub.add_parser("stats", help="row count of every table",
                       description=_desc("Print the number of rows in every table (--json: {table: count}).", env),
                       formatter_class=fmt)
    _json_flag(q)
    q.set_defaults(func=_cmd_stats)

    q = subparsers.add_parser(
        "export", help="export all feedback data and images (parquet, jsonl or hf)",
        description=_desc(
            "Export every table and stored image to a new folder. Deterministic: "
        "exporting, importing into an empty database and exporting again gives identical files. "
        "parquet/jsonl: one file per table plus images/; hf: a datasets.DatasetDict saved with "
        "save_to_disk (one split per table, PNG bytes in the images split).",
            env,
        ),
        formatter_class=fmt)
    q.add_argument("--format", choices=["parquet", "jsonl", "hf"], default="parquet",
                   help="output format (default parquet)")
    q.add_argument("--out", type=Path, required=True, help="new folder to write (must not exist or be empty)")
    q.add_argument("--redact-passwords", action="store_true",
                   help="leave password hashes out (for sharing; imported users then cannot log in)")
    _json_flag(q)
    q.set_defaults(func=_cmd_export)

    q = subparsers.add_parser(
        "import", help="import an export into an empty database",
        description=_desc(
            "Load a folder written by `export` into the (empty) database and image "
        "store, keeping every id. All or nothing.",
            env,
        ), formatter_class=fmt)
    q.add_argument("--path", type=Path, required=True, help="the export folder")
    q.add_argument("--format", choices=["parquet", "jsonl", "hf"], default=None,
                   help="expected format (default: read from the export's manifest.json)")
    _json_flag(q)
    q.set_defaults(func=_cmd_import)

    p = subparsers.add_parser("user", help="manage users", description=_desc("Manage users.", env),
                              formatter_class=fmt)
    sub = p.add_subparsers(dest="user_command", metavar="{add}", required=True)
    q = sub.add_parser("add", help="add a user",
                       description=_desc(
            "Add a user. The password, if any, is read from the first line of "
                       "standard input and only its salted scrypt hash is stored.",
            env,
        ),
                       formatter_class=fmt)
    q.add_argument("--name", required=True, help="unique user name")
    q.add_argument("--role", choices=["visitor", "annotator", "admin"], default="annotator",
                   help="visitor (edits), annotator (also ranks), admin (everything); default annotator")
    q.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    q.add_argument("--simulated", action="store_true", help="mark as a simulated annotator")
    _json_flag(q)
    q.set_defaults(func=_cmd_user_add)

    q = subparsers.add_parser(
        "delete-user", help="erase one user and all their data (consent withdrawn)",
        description=_desc(
            "Delete a user with their uploads, edit requests, variants, rankings and A/B "
        "votes, other people's rankings of their requests, and every image file left unused. "
        "Cannot be undone.",
            env,
        ), formatter_class=fmt)
    q.add_argument("--name", required=True, help="the user's name")
    q.add_argument("--yes", action="store_true", help="confirm: without it nothing is deleted")
    _json_flag(q)
    q.set_defaults(func=_cmd_delete_user)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m db", description=f"HIVE feedback store (data in {hive_home()})."
    )
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command, e.g. ``main(["db", "stats", "--json"])``; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)
