"""Whole-store export and import: parquet, jsonl or a Hugging Face ``datasets`` folder.

An export holds every table (rows sorted by primary key, ids kept) and every stored
image, plus ``manifest.json`` (format, schema revision, row counts; no export time).
Output is deterministic, so export -> import into an empty database -> export gives
byte-identical files. Layouts under OUT:

- parquet: ``<table>.parquet`` per table, ``images/ab/<sha256>.png``
- jsonl:   ``<table>.jsonl`` per table (one JSON object per line), ``images/...``
- hf:      ``DatasetDict.save_to_disk`` with one split per table; the ``images`` split
           has an ``image`` column (``datasets.Image``) holding the PNG bytes.

Exports are written to a temporary folder beside OUT and renamed into place, so OUT
is either absent or complete. Imports run in one transaction and refuse a non-empty
database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import JSON, BigInteger, Boolean, Column, Float, Integer, String, Table, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.images import ImageStore, check_sha256
from db.migrate import head_revision
from db.models import TABLE_ORDER, Base, UTCDateTime
from db.queries import table_counts

FORMATS = ("parquet", "jsonl", "hf")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ExportError(ValueError):
    """An export or import that cannot be done; nothing was written."""


def _kind(column: Column) -> str:
    t = column.type
    if isinstance(t, UTCDateTime):
        return "timestamp"
    if isinstance(t, JSON):
        return "json"
    if isinstance(t, Boolean):
        return "bool"
    if isinstance(t, (Integer, BigInteger)):
        return "int"
    if isinstance(t, Float):
        return "float"
    if isinstance(t, String):  # Text is a String
        return "str"
    raise TypeError(f"no export mapping for {column.table.name}.{column.name}: {t!r}")


_ARROW = {
    "timestamp": pa.timestamp("us", tz="UTC"),
    "json": pa.string(),
    "bool": pa.bool_(),
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
}


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _tables() -> list[Table]:
    return [Base.metadata.tables[name] for name in TABLE_ORDER]


def _read_rows(session: Session, table: Table) -> list[dict[str, Any]]:
    pk = list(table.primary_key.columns)
    return [dict(r._mapping) for r in session.execute(select(table).order_by(*pk))]


def _arrow_schema(table: Table) -> pa.Schema:
    return pa.schema([pa.field(c.name, _ARROW[_kind(c)]) for c in table.columns])


def _to_arrow(table: Table, rows: list[dict[str, Any]]) -> pa.Table:
    cols = {}
    for c in table.columns:
        kind = _kind(c)
        values = [r[c.name] for r in rows]
        if kind == "json":
            values = [None if v is None else _canonical_json(v) for v in values]
        cols[c.name] = pa.array(values, type=_ARROW[kind])
    return pa.table(cols, schema=_arrow_schema(table))


def _to_jsonable(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for c in table.columns:
        v = row[c.name]
        if v is not None and _kind(c) == "timestamp":
            v = v.astimezone(dt.timezone.utc).isoformat()
        out[c.name] = v
    return out


def export_data(
    session: Session,
    store: ImageStore,
    out: Path | str,
    fmt: str = "parquet",
    *,
    redact_passwords: bool = False,
) -> dict[str, Any]:
    """Export every table and image to ``out`` (which must not exist or be empty)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        data = {t.name: _read_rows(session, t) for t in _tables()}
        if redact_passwords:
            for row in data["users"]:
                row["password_hash"] = None
        for row in data["images"]:
            if not store.exists(row["sha256"]):
                raise ExportError(f"image file for {row['sha256']} is missing from {store.root}")
        if fmt == "parquet":
            for t in _tables():
                pq.write_table(_to_arrow(t, data[t.name]), tmp / f"{t.name}.parquet")
            _copy_images(store, (r["sha256"] for r in data["images"]), tmp)
        elif fmt == "jsonl":
            for t in _tables():
                with open(tmp / f"{t.name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                    for row in data[t.name]:
                        f.write(_canonical_json(_to_jsonable(t, row)) + "\n")
            _copy_images(store, (r["sha256"] for r in data["images"]), tmp)
        else:
            _write_hf(store, data, tmp / "dataset")
        manifest = {
            "format": fmt,
            "format_version": FORMAT_VERSION,
            "schema_revision": head_revision(),
            "passwords_redacted": redact_passwords,
            "tables": {name: len(rows) for name, rows in data.items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), **manifest}


def _copy_images(store: ImageStore, shas: Iterable[str], dest: Path) -> None:
    for sha in shas:
        target = dest / store.relpath_for(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store.path_for(sha), target)


def _write_hf(store: ImageStore, data: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import datasets
    from datasets.utils.logging import (
        disable_progress_bar,
        enable_progress_bar,
        is_progress_bar_enabled,
    )

    splits = {}
    for t in _tables():
        arrow = _to_arrow(t, data[t.name])
        features = datasets.Features.from_arrow_schema(arrow.schema)
        columns = arrow.to_pydict()
        if t.name == "images":
            features["image"] = datasets.Image(decode=False)
            columns["image"] = [
                {"bytes": store.read_bytes(sha), "path": f"{sha}.png"} for sha in columns["sha256"]
            ]
        splits[t.name] = datasets.Dataset.from_dict(columns, features=features)
    was_enabled = is_progress_bar_enabled()
    disable_progress_bar()  # no progress bars in exports run from scripts and tests
    try:
        datasets.DatasetDict(splits).save_to_disk(str(path))
    finally:
        if was_enabled:
            enable_progress_bar()


# -- import ---------------------------------------------------------------------------------
def _from_jsonable(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    names = {c.name for c in table.columns}
    if set(row) != names:
        raise ExportError(
            f"{table.name}: columns {sorted(row)} do not match the schema {sorted(names)}"
        )
    out = {}
    for c in table.columns:
        v = row[c.name]
        if v is not None and _kind(c) == "timestamp":
            v = dt.datetime.fromisoformat(v)
        out[c.name] = v
    return out


def _from_arrow(table: Table, arrow: pa.Table) -> list[dict[str, Any]]:
    names = [c.name for c in table.columns]
    missing = set(names) - set(arrow.column_names)
    if missing:
        raise ExportError(f"{table.name}: missing columns {sorted(missing)}")
    rows = arrow.select(names).to_pylist()
    for c in table.columns:
        if _kind(c) == "json":
            for r in rows:
                if r[c.name] is not None:
                    r[c.name] = json.loads(r[c.name])
    return rows


def read_manifest(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} has no {MANIFEST}: not a HIVE export") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path / MANIFEST} is not valid JSON: {exc}") from None
    if manifest.get("format") not in FORMATS or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path / MANIFEST}: unsupported export format {manifest.get('format')!r}")
    return manifest


def _read_export(path: Path, fmt: str) -> tuple[dict[str, list[dict[str, Any]]], dict[str, bytes]]:
    """(rows per table, PNG bytes per sha256) from an export folder."""
    data: dict[str, list[dict[str, Any]]] = {}
    images: dict[str, bytes] = {}
    if fmt == "hf":
        import datasets

        dd = datasets.load_from_disk(str(path / "dataset"))
        for t in _tables():
            if t.name not in dd:
                raise ExportError(f"export has no {t.name} split")
            ds = dd[t.name]
            if t.name == "images":
                ds = ds.cast_column("image", datasets.Image(decode=False))
                images = {r["sha256"]: r["image"]["bytes"] for r in ds}
                ds = ds.remove_columns("image")
            data[t.name] = _from_arrow(t, ds.data.table)
        return data, images
    for t in _tables():
        file = path / f"{t.name}.{fmt}"
        if not file.is_file():
            raise ExportError(f"export is missing {file.name}")
        if fmt == "parquet":
            data[t.name] = _from_arrow(t, pq.read_table(file))
        else:
            with open(file, encoding="utf-8") as f:
                data[t.name] = [_from_jsonable(t, json.loads(line)) for line in f if line.strip()]
    for row in data["images"]:
        sha = check_sha256(row["sha256"])
        file = path / ImageStore.relpath_for(sha)
        if not file.is_file():
            raise ExportError(f"export is missing the image file {file.relative_to(path)}")
        images[sha] = file.read_bytes()
    return data, images


def import_data(session: Session, store: ImageStore, path: Path | str, fmt: str | None = None) -> dict[str, Any]:
    """Load an export into an empty database and image store, keeping every id.

    Image files are checked against their hashes before anything is written; on any
    error the transaction is rolled back (by the caller's session scope) and the files
    this import created are removed.
    """
    path = Path(path).resolve()
    manifest = read_manifest(path)
    if fmt is not None and fmt != manifest["format"]:
        raise ExportError(f"{path} holds a {manifest['format']} export, not {fmt}")
    fmt = manifest["format"]
    if manifest.get("schema_revision") != head_revision():
        raise ExportError(
            f"export is at schema revision {manifest.get('schema_revision')}, "
            f"this code at {head_revision()}"
        )
    nonempty = {k: v for k, v in table_counts(session).items() if v}
    if nonempty:
        raise ExportError(f"import needs an empty database; this one has rows in {nonempty}")
    data, images = _read_export(path, fmt)
    for row in data["images"]:
        sha = check_sha256(row["sha256"])
        if row["path"] != ImageStore.relpath_for(sha):
            raise ExportError(f"image {sha}: unexpected path {row['path']!r}")
        png = images.get(sha)
        if png is None or hashlib.sha256(png).hexdigest() != sha:
            raise ExportError(f"image {sha}: bytes missing or not matching their hash")
    created: list[str] = []
    try:
        for sha, png in images.items():
            if store.put_stored(png, sha).created:
                created.append(sha)
        tables = Base.metadata.tables
        for name in TABLE_ORDER:
            rows = data[name]
            if not rows:
                continue
            if name == "model_versions":  # self-reference: parents are linked after insert
                parents = [(r["id"], r["parent_id"]) for r in rows if r["parent_id"] is not None]
                session.execute(insert(tables[name]), [{**r, "parent_id": None} for r in rows])
                for ident, parent in parents:
                    session.execute(
                        update(tables[name]).where(tables[name].c.id == ident).values(parent_id=parent)
                    )
            else:
                session.execute(insert(tables[name]), rows)
        session.flush()
        _reset_sequences(session)
    except IntegrityError as exc:
        for sha in created:
            store.delete(sha)
        raise ExportError(f"export rows break the schema's rules: {exc.orig}") from None
    except BaseException:
        for sha in created:
            store.delete(sha)
        raise
    return {"path": str(path), "format": fmt, "tables": {n: len(data[n]) for n in TABLE_ORDER}}


def _reset_sequences(session: Session) -> None:
    """PostgreSQL: move each id sequence past the imported ids (SQLite needs nothing)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for t in _tables():
        if "id" in t.c and t.c.id.primary_key:
            session.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{t.name}', 'id'), "
                    f"COALESCE((SELECT MAX(id) FROM {t.name}), 0) + 1, false)"
                )
            )
