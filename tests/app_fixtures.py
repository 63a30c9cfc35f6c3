"""Fixtures for the app tests: an isolated store with a HiveService on the tiny random editor."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from db import feedback as fb
from db.engine import session_scope
from hive_app.config import AppConfig
from hive_app.service import EditorPool, HiveService
from tests.db_fixtures import HiveEnv, hive, hive_factory  # noqa: F401  (fixtures)

PASSWORDS = {"ann": "annotator-pw", "bea": "annotator-pw2", "boss": "admin-pw-123", "vic": "visitor-pw"}


@pytest.fixture(scope="session")
def editor_pool() -> EditorPool:
    """Loaded editors shared by all app tests (loading is the slow part, not editing)."""
    return EditorPool()


@pytest.fixture
def make_service(hive: HiveEnv, tiny_pipeline: Path, editor_pool: EditorPool):  # noqa: F811
    def make(**overrides) -> HiveService:
        config = AppConfig(model=str(tiny_pipeline), explicit_model=True, **overrides)
        return HiveService(config, store=hive.store, editors=editor_pool)
    return make


@pytest.fixture
def svc(make_service) -> HiveService:
    return make_service()


@pytest.fixture
def accounts(svc: HiveService) -> dict[str, str]:
    """Signed-in tokens for two annotators, an admin and a visitor account."""
    roles = {"ann": "annotator", "bea": "annotator", "boss": "admin", "vic": "visitor"}
    with session_scope() as s:
        for name, role in roles.items():
            fb.create_user(s, name, role, PASSWORDS[name])
    return {name: svc.auth.login(name, PASSWORDS[name]) for name in roles}


def png(size=(64, 64), colour=(30, 120, 200), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """A text file named .png and a 10,000 x 10,000 PNG (1-bit, so it is small on disk)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "notes.png").write_text("this is not an image\n")
    (d / "huge.png").write_bytes(png((10_000, 10_000), mode="1"))
    (d / "ok.png").write_bytes(png())
    return {"not_image": d / "notes.png", "huge": d / "huge.png", "ok": d / "ok.png"}
