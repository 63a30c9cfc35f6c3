"""A live app on a free loopback port for the API and browser tests (tiny random editor)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from db import feedback as fb
from db.engine import dispose_engine, session_scope
from db.queries import table_counts

USERS = {"ann": ("annotator", "annotator-pw"), "bea": ("annotator", "annotator-pw2"),
         "boss": ("admin", "admin-pw-123"), "vic": ("visitor", "visitor-pw")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveApp:
    url: str
    home: Path
    running: object

    def counts(self) -> dict[str, int]:
        with session_scope(write=False) as s:
            return table_counts(s)


@contextmanager
def live_app(home: Path, model: Path, second_version: bool = True, **overrides) -> Iterator[LiveApp]:
    """Serve the app with HIVE_HOME=home, users from USERS and (optionally) a second editor version."""
    from hive_app.config import AppConfig
    from hive_app.server import start

    old = {k: os.environ.get(k) for k in ("HIVE_HOME", "HIVE_DB_URL")}
    os.environ["HIVE_HOME"] = str(home)
    os.environ.pop("HIVE_DB_URL", None)
    try:
        with session_scope() as s:
            for name, (role, password) in USERS.items():
                fb.create_user(s, name, role, password)
        running = start(AppConfig(model=str(model), explicit_model=True, **overrides), port=free_port())
        if second_version:  # after start, which registers (and promotes) the served editor
            with session_scope() as s:
                fb.register_model_version(s, "editor", "tiny-candidate", str(model))
        try:
            yield LiveApp(running.url, home, running)
        finally:
            running.close()
    finally:
        dispose_engine()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
