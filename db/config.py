"""Where HIVE keeps its data: the HIVE_HOME folder and the database URL.

Read from the environment on every call (not cached) so that tests and tools can
point a process at another home without re-importing anything.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "./data"


def hive_home() -> Path:
    """The data folder: env ``HIVE_HOME``, default ``./data``, as an absolute path."""
    return Path(os.environ.get("HIVE_HOME") or DEFAULT_HOME).expanduser().resolve()


def db_url() -> str:
    """The database URL: env ``HIVE_DB_URL``, default SQLite at ``HIVE_HOME/hive.db``."""
    url = os.environ.get("HIVE_DB_URL")
    if url:
        return url
    return f"sqlite:///{hive_home() / 'hive.db'}"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe to print or log."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
