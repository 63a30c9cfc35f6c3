"""The db commands: upgrade, stats, user add, export/import, delete-user; --json and --help."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from db.cli import build_parser, main
from db.engine import session_scope
from db.feedback import verify_password
from db.migrate import head_revision
from db.models import TABLE_ORDER, User
from tests.db_fixtures import HiveEnv, build_scenario, hive, hive_factory  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_upgrade_and_stats_json(hive: HiveEnv, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade", "--json"]) == 0
    got = last_json(capsys)
    assert got["ok"] is True and got["revision"] == head_revision()
    assert main(["db", "stats", "--json"]) == 0
    assert last_json(capsys) == dict.fromkeys(TABLE_ORDER, 0)
    assert main(["db", "stats"]) == 0
    assert "rankings" in capsys.readouterr().out


def test_stats_as_a_subprocess(hive: HiveEnv) -> None:
    """``python -m db db stats --json`` on a brand-new home creates and migrates the database."""
    build_scenario(hive)
    env = {**os.environ, "HIVE_HOME": str(hive.home), "HIVE_DB_URL": hive.url}
    proc = subprocess.run([sys.executable, "-m", "db", "db", "stats", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["users"] == 3 and counts["variants"] == 6


def test_user_add_with_password_from_stdin(hive: HiveEnv, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret-pass\n"))
    assert main(["user", "add", "--name", "ann", "--role", "annotator", "--password-stdin", "--json"]) == 0
    got = last_json(capsys)
    assert got["name"] == "ann" and got["has_password"] is True
    with session_scope(hive.url, write=False) as s:
        user = s.get(User, got["id"])
        assert verify_password(user.password_hash, "s3cret-pass")
    before = hive.snapshot()
    assert main(["user", "add", "--name", "ann", "--json"]) == 2
    captured = capsys.readouterr()
    assert "user name 'ann' is taken" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1]) == {"ok": False, "error": "user name 'ann' is taken"}
    assert hive.snapshot() == before


def test_export_import_via_cli(hive_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = hive_factory("a"), hive_factory("b")
    build_scenario(a)
    monkeypatch.setenv("HIVE_HOME", str(a.home))
    monkeypatch.setenv("HIVE_DB_URL", a.url)
    assert main(["export", "--format", "jsonl", "--out", str(tmp_path / "exp"), "--json"]) == 0
    assert last_json(capsys)["tables"]["variants"] == 6
    monkeypatch.setenv("HIVE_HOME", str(b.home))
    monkeypatch.setenv("HIVE_DB_URL", b.url)
    assert main(["import", "--path", str(tmp_path / "exp"), "--json"]) == 0
    assert last_json(capsys)["format"] == "jsonl"
    assert b.counts() == a.counts() and b.files() == a.files()
    assert main(["import", "--path", str(tmp_path / "exp")]) == 2  # b is no longer empty
    assert "import needs an empty database" in capsys.readouterr().err


def test_delete_user_needs_yes(hive: HiveEnv, capsys: pytest.CaptureFixture[str]) -> None:
    build_scenario(hive)
    before = hive.snapshot()
    assert main(["delete-user", "--name", "visitor"]) == 2
    assert "add --yes" in capsys.readouterr().err
    assert main(["delete-user", "--name", "nobody", "--yes"]) == 2
    assert "no user named 'nobody'" in capsys.readouterr().err
    assert hive.snapshot() == before
    assert main(["delete-user", "--name", "visitor", "--yes", "--json"]) == 0
    got = last_json(capsys)
    assert got["deleted"]["users"] == 1 and got["deleted"]["edit_requests"] == 2
    after = hive.counts()
    assert after["edit_requests"] == after["variants"] == after["images"] == 0
    assert hive.files() == []


@pytest.mark.parametrize(
    "argv",
    [[], ["db"], ["db", "upgrade"], ["db", "stats"], ["export"], ["import"], ["user"], ["user", "add"],
     ["delete-user"]],
)
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and len(text) > 150


def test_register_into_another_cli() -> None:
    """The way hive/cli.py wires the commands in."""
    import argparse

    from db.cli import register

    parser = argparse.ArgumentParser(prog="python -m hive")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("toy")
    register(sub)
    args = parser.parse_args(["db", "stats", "--json"])
    assert callable(args.func) and args.json
    args = parser.parse_args(["export", "--format", "hf", "--out", "x"])
    assert args.format == "hf" and args.out == Path("x")
