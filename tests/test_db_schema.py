"""The schema: migrations agree with the models; engine settings; timestamps."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError, StatementError

from db import feedback as fb
from db.config import db_url, hive_home
from db.engine import get_engine, session_scope
from db.migrate import current_revision, head_revision
from db.models import Base, User
from tests.db_fixtures import HiveEnv, hive, hive_factory, is_postgres  # noqa: F401


def test_migration_matches_models(hive: HiveEnv) -> None:
    engine = get_engine(hive.url)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_expected_indexes_exist(hive: HiveEnv) -> None:
    insp = inspect(get_engine(hive.url))
    names = {t: {i["name"] for i in insp.get_indexes(t)} for t in Base.metadata.tables}
    assert "ix_rankings_annotator_id_created_at" in names["rankings"]
    assert "uq_model_versions_one_promoted" in names["model_versions"]
    assert "ix_edit_requests_user_id" in names["edit_requests"]
    uniques = {u["name"] for u in insp.get_unique_constraints("rankings")}
    assert {"uq_rankings_request_id_annotator_id", "uq_rankings_annotator_id_submission_key"} <= uniques


def test_config_reads_environment(hive: HiveEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hive_home() == hive.home.resolve()
    assert db_url() == hive.url
    monkeypatch.delenv("HIVE_DB_URL")
    assert db_url() == f"sqlite:///{hive.home.resolve() / 'hive.db'}"


@pytest.mark.skipif(is_postgres(), reason="SQLite pragmas")
def test_sqlite_pragmas(hive: HiveEnv) -> None:
    with get_engine(hive.url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_foreign_keys_enforced(hive: HiveEnv) -> None:
    from db.models import EditRequest

    with pytest.raises(IntegrityError):
        with session_scope(hive.url) as s:
            s.add(EditRequest(user_id=999, source_image_id=999, instruction="x", params={}))
            s.flush()
    assert hive.counts()["edit_requests"] == 0


def test_timestamps_are_aware_utc_and_naive_refused(hive: HiveEnv) -> None:
    with session_scope(hive.url) as s:
        u = fb.create_user(s, "ann", "annotator")
    with session_scope(hive.url, write=False) as s:
        created = s.scalar(select(User.created_at).where(User.id == u.id))
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60
    with pytest.raises(StatementError, match="naive datetime"):
        with session_scope(hive.url) as s:
            s.add(User(name="naive", role="visitor", created_at=datetime(2024, 1, 1)))
            s.flush()
    assert hive.counts()["users"] == 1


def test_one_promoted_version_per_kind_enforced_by_database(hive: HiveEnv) -> None:
    from db.models import ModelVersion

    with session_scope(hive.url) as s:
        a = fb.register_model_version(s, "editor", "a", "models/a")
        b = fb.register_model_version(s, "editor", "b", "models/b")
        fb.set_model_status(s, a.id, "promoted")
    with pytest.raises(IntegrityError):
        with session_scope(hive.url) as s:  # bypassing set_model_status
            s.get(ModelVersion, b.id).status = "promoted"
            s.flush()
    with session_scope(hive.url, write=False) as s:
        assert s.get(ModelVersion, b.id).status == "candidate"
