"""Alembic, driven from code: no alembic.ini, migrations live in ``db/migrations``.

Upgrades run under a lock so that many threads or processes opening a new database at
once migrate it exactly once: SQLite's write lock (``BEGIN IMMEDIATE``) or a PostgreSQL
transaction-level advisory lock. Both backends have transactional DDL, so a failed
upgrade leaves the database as it was.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: Arbitrary constant naming HIVE's migration lock in PostgreSQL (ASCII "HIVE").
PG_ADVISORY_LOCK_KEY = 0x48495645


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at our migrations (and at ``url`` for offline use)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision in ``db/migrations/versions``."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Upgrade the database to ``revision`` under a cross-process lock; returns the new revision."""
    cfg = alembic_config()
    with engine.connect() as conn:
        conn.execution_options(hive_write=True)  # SQLite: BEGIN IMMEDIATE takes the write lock
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_ADVISORY_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            return MigrationContext.configure(conn).get_current_revision()
