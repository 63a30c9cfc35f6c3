"""Blind A/B votes: "both bad" is stored apart from ties (migration 0002, up and down) and has its
own column in the win-rate summary."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from db import feedback as fb
from db.engine import _create, session_scope
from db.migrate import alembic_config, current_revision, upgrade
from db.queries import comparison_summary
from tests.db_fixtures import HiveEnv, Scenario, build_scenario, hive, hive_factory  # noqa: F401


@pytest.fixture
def sc(hive: HiveEnv) -> Scenario:  # noqa: F811
    return build_scenario(hive, n_annotators=3)


def test_both_bad_is_its_own_column(hive: HiveEnv, sc: Scenario) -> None:  # noqa: F811
    with session_scope(hive.url) as s:
        v2 = fb.register_model_version(s, "editor", "v2", "models/v2")
        for who, choice in [(0, "a"), (1, "both_bad"), (2, "tie"), (0, "both_bad")]:
            fb.record_comparison(s, sc.annotator_ids[who], sc.editor_id, v2.id, choice, instruction="x",
                                 a_shown_left=who == 0)
    with session_scope(hive.url, write=False) as s:
        row = comparison_summary(s).iloc[0]
        stored = sorted(c for (c,) in s.execute(text("SELECT choice FROM comparisons")))
    assert (row.wins_1, row.wins_2, row.ties, row.both_bad, row.n) == (1, 0, 1, 2, 4)
    assert row.win_rate_1 == pytest.approx(0.25)
    assert stored == ["a", "both_bad", "both_bad", "tie"]


def test_unknown_choice_is_refused(hive: HiveEnv, sc: Scenario) -> None:  # noqa: F811
    with session_scope(hive.url) as s:
        v2 = fb.register_model_version(s, "editor", "v2", "models/v2")
    with pytest.raises(fb.FeedbackError, match="both_bad"):
        with session_scope(hive.url) as s:
            fb.record_comparison(s, sc.annotator_ids[0], sc.editor_id, v2.id, "neither", instruction="x",
                                 a_shown_left=True)


def _insert_vote(conn, choice: str) -> None:
    conn.execute(text("INSERT INTO comparisons (voter_id, version_a_id, version_b_id, instruction, a_shown_left, "
                      "choice, created_at) VALUES (1, 1, 2, 'x', true, :c, CURRENT_TIMESTAMP)"), {"c": choice})


def test_migration_0002_up_and_down(tmp_path) -> None:
    engine = _create(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        assert upgrade(engine, "0001") == "0001"
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO users (id, name, role, is_simulated, created_at) "
                              "VALUES (1, 'ann', 'annotator', false, CURRENT_TIMESTAMP)"))
            for i in (1, 2):
                conn.execute(text("INSERT INTO model_versions (id, kind, name, path, metrics, status, created_at) "
                                  "VALUES (:i, 'editor', :n, 'p', '{}', 'candidate', CURRENT_TIMESTAMP)"),
                             {"i": i, "n": f"v{i}"})
            _insert_vote(conn, "tie")
        with pytest.raises(IntegrityError), engine.begin() as conn:  # the old schema refuses it
            _insert_vote(conn, "both_bad")

        assert upgrade(engine) == "0002"
        with engine.begin() as conn:
            _insert_vote(conn, "both_bad")
        with pytest.raises(IntegrityError), engine.begin() as conn:  # the check is still there
            _insert_vote(conn, "neither")
        with engine.connect() as conn:
            assert sorted(c for (c,) in conn.execute(text("SELECT choice FROM comparisons"))) == ["both_bad", "tie"]

        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        assert current_revision(engine) == "0001"
        with engine.connect() as conn:  # "both bad" becomes a tie, as the old schema stored it
            assert sorted(c for (c,) in conn.execute(text("SELECT choice FROM comparisons"))) == ["tie", "tie"]
    finally:
        engine.dispose()
