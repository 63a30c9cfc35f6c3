"""Fixtures and helpers for the db tests (import the fixtures into a test module to use them).

Each test gets its own HIVE_HOME under tmp_path. Where ``HIVE_DB_URL`` points at
PostgreSQL, each test also gets its own schema there (dropped afterwards), so the same
tests run against PostgreSQL; otherwise they use SQLite in the test's HIVE_HOME.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from db import feedback as fb
from db.engine import dispose_engine, session_scope
from db.images import ImageStore, get_or_create_image
from db.queries import table_counts

#: The database the suite was started against (read once, before fixtures change it).
BASE_URL = os.environ.get("HIVE_DB_URL") or ""


def is_postgres() -> bool:
    return BASE_URL.startswith("postgresql")


@dataclass
class HiveEnv:
    """One isolated store: a HIVE_HOME folder, a database URL and the image store."""

    home: Path
    url: str
    store: ImageStore

    def counts(self) -> dict[str, int]:
        with session_scope(self.url, write=False) as s:
            return table_counts(s)

    def files(self) -> list[str]:
        """Every file under HIVE_HOME/images (temporary files included), relative."""
        root = self.home / "images"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def snapshot(self) -> tuple[dict[str, int], list[str]]:
        return self.counts(), self.files()


@pytest.fixture
def hive_factory(tmp_path: Path) -> Iterator[Callable[[str], HiveEnv]]:
    """Make isolated stores (SQLite in tmp_path, or a fresh PostgreSQL schema each)."""
    made: list[tuple[str, str | None]] = []
    admin = create_engine(BASE_URL) if is_postgres() else None

    def make(name: str = "home") -> HiveEnv:
        home = tmp_path / name
        home.mkdir(parents=True, exist_ok=True)
        schema = None
        if admin is not None:
            schema = f"t_{uuid.uuid4().hex[:12]}"
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = (
                make_url(BASE_URL)
                .update_query_dict({"options": f"-csearch_path={schema}"})
                .render_as_string(hide_password=False)
            )
        else:
            url = f"sqlite:///{home / 'hive.db'}"
        made.append((url, schema))
        return HiveEnv(home=home, url=url, store=ImageStore(home))

    yield make
    for url, schema in made:
        dispose_engine(url)
        if admin is not None and schema:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    if admin is not None:
        admin.dispose()


@pytest.fixture
def hive(hive_factory: Callable[[str], HiveEnv], monkeypatch: pytest.MonkeyPatch) -> HiveEnv:
    """One isolated store, also set as HIVE_HOME / HIVE_DB_URL for code that reads them."""
    env = hive_factory("home")
    monkeypatch.setenv("HIVE_HOME", str(env.home))
    monkeypatch.setenv("HIVE_DB_URL", env.url)
    return env


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Scenario:
    """A small store: a visitor's request with variants, two annotators, an editor version."""

    visitor_id: int
    annotator_ids: list[int]
    editor_id: int
    request_id: int
    variant_ids: list[int]
    other_request_id: int
    other_variant_ids: list[int]


def add_request(session, store: ImageStore, user_id: int, n_variants: int, *, shade: int = 0,
                model_version_id: int | None = None, consent: bool = True) -> tuple[int, list[int]]:
    src = get_or_create_image(session, store, png_bytes((shade, 100, 100)))
    req = fb.create_edit_request(
        session, user_id, src.id, "make the circle red", model_version_id,
        {"steps": 20, "guidance": 7.5, "image_guidance": 1.5}, consent=consent,
    )
    images = [get_or_create_image(session, store, png_bytes((shade, 10 * i, 50))) for i in range(n_variants)]
    variants = fb.add_variants(
        session, req.id, [(img.id, 1000 + i, {"steps": 20, "guidance": 7.5}) for i, img in enumerate(images)]
    )
    return req.id, [v.id for v in variants]


def build_scenario(env: HiveEnv, n_variants: int = 4, n_annotators: int = 2) -> Scenario:
    with session_scope(env.url) as s:
        visitor = fb.create_user(s, "visitor", "visitor")
        anns = [fb.create_user(s, f"ann{i}", "annotator") for i in range(n_annotators)]
        editor = fb.register_model_version(s, "editor", "toy-v1", "models/toy-editor")
        req, variants = add_request(s, env.store, visitor.id, n_variants, model_version_id=editor.id)
        other, other_variants = add_request(s, env.store, visitor.id, 2, shade=50)
        return Scenario(visitor.id, [a.id for a in anns], editor.id, req, variants, other, other_variants)
