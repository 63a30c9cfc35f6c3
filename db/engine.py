"""Engines and sessions: one engine per URL, migrated to the newest schema on first use.

SQLite gets WAL (readers never block the writer), foreign keys (off by default in
SQLite), a busy timeout (writers queue instead of failing) and ``BEGIN IMMEDIATE`` for
write sessions: a deferred transaction that reads and then writes can fail at once with
"database is locked" when another writer committed in between, whatever the timeout.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from db.config import db_url
from db.migrate import upgrade

#: How long a SQLite writer waits for the lock before giving up.
BUSY_TIMEOUT_MS = 30_000
#: FULL (default): a commit is on disk before it returns, so a power cut loses no
#: ranking. NORMAL (env HIVE_SQLITE_SYNCHRONOUS=NORMAL): about 3x faster writes; still
#: safe from corruption and from application crashes, but a power cut may drop the
#: last commits. See bench/bench_db.py for the numbers.
SYNCHRONOUS_MODES = ("FULL", "NORMAL")


def sqlite_synchronous() -> str:
    mode = (os.environ.get("HIVE_SQLITE_SYNCHRONOUS") or "FULL").upper()
    if mode not in SYNCHRONOUS_MODES:
        raise ValueError(f"HIVE_SQLITE_SYNCHRONOUS must be FULL or NORMAL, not {mode!r}")
    return mode

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any, synchronous: str) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_on_begin)
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.execute("PRAGMA journal_mode = WAL")  # persistent in the file; a no-op once set
    cur.execute(f"PRAGMA synchronous = {synchronous}")
    cur.close()


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("hive_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _create(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        # Up to 32 connections per process: the app's worker threads must not starve
        # waiting for a pooled connection (the default 5 + 10 is too few for 16 writers).
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=24)
    memory = u.database in (None, "", ":memory:")
    if memory:
        engine = create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        if not u.query.get("uri"):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        # Connections are cheap in SQLite; a pool as large as our busiest writer count.
        engine = create_engine(url, pool_size=16, max_overflow=32)
    synchronous = sqlite_synchronous()
    event.listen(engine, "connect", lambda c, r: _sqlite_on_connect(c, r, synchronous))
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: ``db_url()``), created and migrated to head once."""
    url = url or db_url()
    engine = _engines.get(url)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create(url)
            try:
                upgrade(engine)
            except BaseException:
                engine.dispose()
                raise
            _engines[url] = engine
    return engine


def dispose_engine(url: str | None = None) -> None:
    """Close and forget the cached engine for ``url`` (tests and tools that switch homes)."""
    with _lock:
        engine = _engines.pop(url or db_url(), None)
    if engine is not None:
        engine.dispose()


@contextmanager
def session_scope(url: str | None = None, *, write: bool = True) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error.

    ``write=True`` (the default) takes SQLite's write lock at the start, which is what
    makes concurrent writers safe; pass ``write=False`` for long reads (exports,
    analysis) so that they do not hold writers up. Objects stay usable after the block.
    """
    engine = get_engine(url)
    bind = engine.execution_options(hive_write=True) if write else engine
    session = Session(bind, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
