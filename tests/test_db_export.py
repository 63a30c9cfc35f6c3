"""Export -> import -> export gives identical files; bad imports change nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from db import feedback as fb
from db.engine import session_scope
from db.export import ExportError, export_data, import_data
from db.models import User
from db.queries import pairwise_preferences
from tests.db_fixtures import HiveEnv, Scenario, build_scenario, hive, hive_factory  # noqa: F401


def fill(env: HiveEnv) -> Scenario:
    """A store using every table and every column type, with awkward values."""
    sc = build_scenario(env, n_variants=4, n_annotators=3)
    v = sc.variant_ids
    with session_scope(env.url) as s:
        fb.create_user(s, "Zoë 🐝", "admin", password="hunter2hunter2")
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], {v[0]: 1, v[1]: 1, v[2]: 2, v[3]: 3},
                          ratings={v[0]: {"quality": 5, "preservation": 2}}, seconds=3.14159, submission_key="κ-1")
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[1], {v[3]: 1}, top_k=1, all_bad=True)
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[2], None, skip=True)
        v2 = fb.register_model_version(s, "editor", "hive-v2", "models/hive-v2", parent_id=sc.editor_id,
                                       metrics={"clip_dir": 0.1234567890123, "nested": {"a": [1, 2.5, None]}})
        fb.set_model_status(s, v2.id, "promoted")
        run = fb.start_training_run(s, "finetune-weighted", {"lr": 1e-5, "η": 0.5, "steps": [1, 2]},
                                    log_path="runs/1/log.txt", base_version_id=sc.editor_id)
        fb.finish_training_run(s, run.id, "failed", error="CUDA out of memory\nline 2")
        fb.record_comparison(s, sc.annotator_ids[0], sc.editor_id, v2.id, "tie", instruction="add a \"dog\"",
                             a_shown_left=False, source_image_id=1, image_a_id=2, seconds=0.0)
    return sc


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "hf"])
def test_export_import_export_identical(hive_factory: Callable[[str], HiveEnv], tmp_path: Path, fmt: str) -> None:
    a, b = hive_factory("a"), hive_factory("b")
    fill(a)
    with session_scope(a.url, write=False) as s:
        first = export_data(s, a.store, tmp_path / "one", fmt)
        pairs_a = pairwise_preferences(s, store=a.store)
    with session_scope(b.url) as s:
        imported = import_data(s, b.store, tmp_path / "one")
    assert imported["tables"] == first["tables"]
    assert b.counts() == a.counts()
    assert b.files() == a.files()
    with session_scope(b.url, write=False) as s:
        second = export_data(s, b.store, tmp_path / "two", fmt)
        pairs_b = pairwise_preferences(s, store=b.store)
    assert second["tables"] == first["tables"]
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert [k for k in one if one[k] != two[k]] == []
    assert len([k for k in one if k.endswith(".png")]) == (0 if fmt == "hf" else a.counts()["images"])
    cols = ["ranking_id", "winner_variant_id", "loser_variant_id", "tie"]
    assert pairs_a[cols].equals(pairs_b[cols])
    with session_scope(b.url) as s:  # ids continue after the imported ones (PostgreSQL sequences)
        zoe = s.query(User).filter_by(name="Zoë 🐝").one()
        assert fb.verify_password(zoe.password_hash, "hunter2hunter2")
        new = fb.create_user(s, "newcomer", "visitor")
        assert new.id == max(a.counts()["users"], zoe.id) + 1


def test_export_content(hive: HiveEnv, tmp_path: Path) -> None:
    fill(hive)
    with session_scope(hive.url, write=False) as s:
        export_data(s, hive.store, tmp_path / "pq", "parquet", redact_passwords=True)
        export_data(s, hive.store, tmp_path / "js", "jsonl")
    manifest = json.loads((tmp_path / "pq" / "manifest.json").read_text())
    assert manifest["format"] == "parquet" and manifest["passwords_redacted"] is True
    assert manifest["tables"]["rankings"] == 3
    users = pq.read_table(tmp_path / "pq" / "users.parquet").to_pylist()
    assert all(u["password_hash"] is None for u in users)
    created = pq.read_table(tmp_path / "pq" / "rankings.parquet").schema.field("created_at").type
    assert str(created) == "timestamp[us, tz=UTC]"
    lines = (tmp_path / "js" / "model_versions.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert rows[1]["metrics"] == {"clip_dir": 0.1234567890123, "nested": {"a": [1, 2.5, None]}}
    assert rows[1]["created_at"].endswith("+00:00")
    assert any(json.loads(x)["password_hash"] for x in (tmp_path / "js" / "users.jsonl").read_text().splitlines())


def test_export_refuses_non_empty_target(hive: HiveEnv, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not an empty folder"):
        with session_scope(hive.url, write=False) as s:
            export_data(s, hive.store, out, "jsonl")
    assert tree(out) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "out"]  # no temp folder left
    with pytest.raises(ExportError, match="unknown format 'csv'"):
        with session_scope(hive.url, write=False) as s:
            export_data(s, hive.store, tmp_path / "new", "csv")
    assert not (tmp_path / "new").exists()


def test_import_refuses_non_empty_database(hive_factory: Callable[[str], HiveEnv], tmp_path: Path) -> None:
    a, b = hive_factory("a"), hive_factory("b")
    fill(a)
    with session_scope(a.url, write=False) as s:
        export_data(s, a.store, tmp_path / "exp", "jsonl")
    with session_scope(b.url) as s:
        fb.create_user(s, "already-here", "visitor")
    before = b.snapshot()
    with pytest.raises(ExportError, match=r"import needs an empty database; .*'users': 1"):
        with session_scope(b.url) as s:
            import_data(s, b.store, tmp_path / "exp")
    assert b.snapshot() == before


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_import_refuses_tampered_image(hive_factory: Callable[[str], HiveEnv], tmp_path: Path, fmt: str) -> None:
    a, b = hive_factory("a"), hive_factory("b")
    fill(a)
    with session_scope(a.url, write=False) as s:
        export_data(s, a.store, tmp_path / "exp", fmt)
    victim = sorted((tmp_path / "exp" / "images").rglob("*.png"))[-1]
    victim.write_bytes(victim.read_bytes() + b"tampered")
    before = b.snapshot()
    with pytest.raises(ExportError, match="bytes missing or not matching their hash"):
        with session_scope(b.url) as s:
            import_data(s, b.store, tmp_path / "exp")
    assert b.snapshot() == before


def test_import_failure_midway_removes_new_files(hive_factory: Callable[[str], HiveEnv], tmp_path: Path) -> None:
    a, b = hive_factory("a"), hive_factory("b")
    fill(a)
    with session_scope(a.url, write=False) as s:
        export_data(s, a.store, tmp_path / "exp", "jsonl")
    ranks = tmp_path / "exp" / "ranking_items.jsonl"
    rows = [json.loads(x) for x in ranks.read_text().splitlines()]
    rows[0]["rank"] = 0  # breaks a CHECK constraint, after images and earlier tables went in
    ranks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = b.snapshot()
    with pytest.raises(ExportError, match="(?i)break the schema's rules: .*check constraint"):
        with session_scope(b.url) as s:
            import_data(s, b.store, tmp_path / "exp")
    assert b.snapshot() == before


def test_import_refuses_bad_folders(hive_factory: Callable[[str], HiveEnv], tmp_path: Path) -> None:
    a, b = hive_factory("a"), hive_factory("b")
    fill(a)
    with session_scope(a.url, write=False) as s:
        export_data(s, a.store, tmp_path / "exp", "parquet")
    before = b.snapshot()
    cases = []
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", None, "has no manifest.json"))
    cases.append((tmp_path / "exp", "jsonl", "holds a parquet export, not jsonl"))
    shutil.copytree(tmp_path / "exp", tmp_path / "noimg")
    shutil.rmtree(tmp_path / "noimg" / "images")
    cases.append((tmp_path / "noimg", None, "missing the image file"))
    shutil.copytree(tmp_path / "exp", tmp_path / "oldrev")
    m = json.loads((tmp_path / "oldrev" / "manifest.json").read_text())
    m["schema_revision"] = "0000"
    (tmp_path / "oldrev" / "manifest.json").write_text(json.dumps(m))
    cases.append((tmp_path / "oldrev", None, "schema revision 0000"))
    for path, fmt, match in cases:
        with pytest.raises(ExportError, match=match):
            with session_scope(b.url) as s:
                import_data(s, b.store, path, fmt)
        assert b.snapshot() == before
