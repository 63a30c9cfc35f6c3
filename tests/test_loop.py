"""The loop: a round on tiny models end to end (candidate registered, promoted editor untouched),
crash and resume, promote and rollback, and the rule that no registered folder is overwritten."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from db.engine import session_scope
from db.models import ModelVersion, TrainingRun
from hive import registry
from hive.loop import STAGE_FNS, LoopError, run_round
from tests.db_fixtures import HiveEnv, hive, hive_factory  # noqa: F401  (fixtures)
from tests.test_reward_model import build_tiny_clip

TOP = ", image quality is five out of five"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture
def served(tiny_pipeline, hive: HiveEnv) -> tuple[Path, int]:
    """A copy of the tiny editor inside HIVE_HOME, registered and promoted (what the app serves)."""
    folder = hive.home / "served-editor"
    shutil.copytree(tiny_pipeline, folder)
    return folder, registry.ensure_registered(folder, "editor", promote_if_none=True)["id"]


def tiny_config(clip: Path, **overrides) -> dict:
    return {"toy_n": 4, "steps": 2, "batch_size": 2, "warmup_steps": 1, "ema_decay": None, "checkpoint_every": 1,
            "reward_backbone": str(clip), "reward_steps": 2, "reward_batch_size": 2, "reward_hidden": 16,
            "reward_freeze_layers": 1, "eval_n": 2, "eval_steps": 1, "eval_batch": 2, "score_batch": 16, **overrides}


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def simulate_rankings(hive: HiveEnv, n: int = 4) -> None:
    from hive.simulate import simulate

    simulate(None, n, variants=3, annotators=1, url=hive.url, progress=False)  # editor-free stand-ins


def test_loop_round_registers_a_candidate_and_leaves_the_promoted_editor_untouched(served, tiny_clip, hive):
    from hive.editor import Editor

    folder, served_id = served
    simulate_rankings(hive)
    before = digest(folder)
    logs, progress = [], []
    result = run_round(tiny_config(tiny_clip), log=logs.append, progress=lambda d, t: progress.append((d, t)))

    assert digest(folder) == before  # byte-identical
    assert progress[-1] == (6, 6) and all(isinstance(d, int) and isinstance(t, int) for d, t in progress)
    cand = result["candidate"]
    assert result["produced_version_id"] == cand["id"] and cand["status"] == "candidate"
    assert cand["parent_id"] == served_id and cand["kind"] == "editor"
    assert Path(cand["path"]).is_relative_to(hive.home / "models" / "editor")
    m = cand["metrics"]
    for key in ("toy_success", "serving_toy_success", "toy_success_delta", "toy_per_kind", "reward_version_id"):
        assert key in m, key
    assert m["method"] == "condition" and m["cycle"] is True
    assert m["examples_by_origin"] == {"data": 4, "data-inverse": 4, "db": 12, "db-inverse": 12}
    assert registry.promoted("editor")["id"] == served_id  # promotion is a separate step
    with session_scope(hive.url, write=False) as s:
        reward = s.get(ModelVersion, m["reward_version_id"])
        assert reward.kind == "reward" and reward.status == "candidate"
        run = s.get(TrainingRun, result["run_id"])
        assert run.kind == "loop" and run.status == "succeeded" and run.produced_version_id == cand["id"]
        assert run.base_version_id == served_id and run.config["round"]["steps"] == 2
    assert Path(run.log_path).exists() and "[register] done" in Path(run.log_path).read_text()
    assert any("candidate" in line for line in logs)
    editor = Editor(cand["path"], device="cpu")  # condition reward: the editor adds the top level itself
    assert editor.prompt_for("make the circle red") == "make the circle red" + TOP
    from hive.loop import _find_resumable

    assert _find_resumable(run.config["key"]) is None  # the same config again starts a new round
    # promotion and rollback are explicit steps
    assert registry.promote(cand["id"])["previous_id"] == served_id
    assert registry.rollback()["id"] == served_id


def test_crashed_round_resumes_and_skips_finished_stages(served, tiny_clip, hive, monkeypatch, capsys):
    simulate_rankings(hive)
    config = tiny_config(tiny_clip, method="weighted", cycle=False, evaluate="none")
    real = dict(STAGE_FNS)

    def boom(rnd):
        raise RuntimeError("simulated crash")

    def must_not_run(rnd):
        raise AssertionError("a finished stage ran again")

    # a crash right after the reward model was registered, before state.json recorded the stage
    real_register = registry.register

    def register_then_crash(kind, *args, **kwargs):
        real_register(kind, *args, **kwargs)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(registry, "register", register_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_round(config)
    monkeypatch.setattr(registry, "register", real_register)
    with session_scope(hive.url, write=False) as s:
        first = s.query(TrainingRun).filter_by(kind="loop").one()
        assert first.status == "failed" and "simulated crash" in first.error
        reward_id = s.query(ModelVersion).filter_by(kind="reward").one().id
    work = Path(first.config["work_dir"])
    assert set(json.loads((work / "state.json").read_text())["stages"]) == {"export"}

    # the same config again resumes the round: the registered reward model is kept, not published again
    monkeypatch.setitem(STAGE_FNS, "finetune", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_round(config)
    state = json.loads((work / "state.json").read_text())
    assert set(state["stages"]) == {"export", "reward", "data"} and state["stages"]["reward"]["version_id"] == reward_id
    with session_scope(hive.url, write=False) as s:
        assert s.query(ModelVersion).filter_by(kind="reward").count() == 1
        retry = s.query(TrainingRun).filter_by(kind="loop").order_by(TrainingRun.id.desc()).first()
    assert retry.config["resume_of"] == first.id and retry.config["work_dir"] == str(work)

    # again: export, reward and data do not run again
    for name in ("export", "reward", "data"):
        monkeypatch.setitem(STAGE_FNS, name, must_not_run)
    monkeypatch.setitem(STAGE_FNS, "finetune", real["finetune"])
    monkeypatch.setitem(STAGE_FNS, "register", boom)
    with pytest.raises(RuntimeError):
        run_round(config)
    with session_scope(hive.url, write=False) as s:
        second = s.query(TrainingRun).filter_by(kind="loop").order_by(TrainingRun.id.desc()).first()
    assert second.config["work_dir"] == str(work) and second.config["resume_of"] == retry.id

    # --resume RUN_ID from the command line: only the registration is left
    monkeypatch.setitem(STAGE_FNS, "finetune", must_not_run)
    monkeypatch.setitem(STAGE_FNS, "register", real["register"])
    from hive.cli import main

    assert main(["loop", "--resume", str(second.id), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["round_id"] == first.id and result["resume_of"] == second.id
    assert result["candidate"]["name"] == f"hive-weighted-round{first.id}"
    assert result["candidate"]["metrics"]["method"] == "weighted"
    with session_scope(hive.url, write=False) as s:
        statuses = [r.status for r in s.query(TrainingRun).filter_by(kind="loop").order_by(TrainingRun.id)]
    assert statuses == ["failed", "failed", "failed", "succeeded"]
    info = json.loads((Path(result["candidate"]["path"]) / "hive.json").read_text())
    assert info["finetune"]["method"] == "weighted" and "reward_suffix" not in info


def test_a_round_without_rankings_or_reward_model_fails_clearly(served, hive):
    with pytest.raises(LoopError, match="unknown loop config keys"):
        run_round({"stepz": 3})
    # bad fine-tuning values are refused up front, not after the reward model has trained
    for bad, message in (({"eta": 0}, "eta"), ({"clip": 0.5}, "clip"), ({"sft": {"stepz": 1}}, "unknown SFT options"),
                         ({"pairwise_n": 0}, "pairwise_n"), ({"toy_noise": 2}, "toy_noise"),
                         ({"name": "../../images"}, "model name"), ({"name": "served-editor"}, "registered already")):
        with pytest.raises(LoopError, match=message):
            run_round(bad)
    assert hive.counts()["training_runs"] == 0  # refused before anything was written
    assert not (hive.home / "loop").exists()
    with pytest.raises(LoopError, match="Rank more edits"):
        run_round({"toy_n": 2, "steps": 1})
    with session_scope(hive.url, write=False) as s:
        run = s.query(TrainingRun).filter_by(kind="loop").one()
        assert run.status == "failed" and s.query(ModelVersion).filter_by(kind="editor").count() == 1


def test_promote_and_rollback_from_the_command_line(served, hive, tiny_pipeline, capsys):
    from hive.cli import main

    _, served_id = served
    other = hive.home / "models" / "editor" / "v2"
    shutil.copytree(tiny_pipeline, other)
    v2 = registry.register("editor", "v2", other, parent_id=served_id, metrics={"toy_success": 0.5})

    def run(argv: list[str]) -> tuple[int, dict | str]:
        rc = main(argv)
        out = capsys.readouterr()
        return rc, (json.loads(out.out.strip().splitlines()[-1]) if rc == 0 and "--json" in argv else out.err)

    assert run(["rollback", "--json"])[0] == 2  # nothing promoted before the served editor
    rc, v = run(["promote", "v2", "--json"])
    assert rc == 0 and v["id"] == v2 and v["status"] == "promoted" and v["previous_id"] == served_id
    assert registry.get_version(served_id)["status"] == "retired"
    rc, v = run(["rollback", "--json"])
    assert rc == 0 and v["id"] == served_id and registry.get_version(v2)["status"] == "retired"
    rc, err = run(["promote", "no-such-version"])
    assert rc == 2 and "no editor model version" in err
    gone = registry.register("editor", "gone", hive.home / "deleted-folder")
    rc, err = run(["promote", str(gone)])
    assert rc == 2 and "does not exist" in err
    assert registry.promoted("editor")["id"] == served_id  # refusals changed nothing
    rc, listing = run(["models", "--kind", "editor", "--json"])
    assert [v["name"] for v in listing["versions"]] == ["served-editor", "v2", "gone"]


def test_new_models_never_go_into_a_registered_folder(served, hive, tiny_pipeline):
    folder, _ = served
    for dest in (folder, folder / "unet", folder.parent):
        with pytest.raises(registry.RegistryError, match="fresh folders"):
            registry.assert_fresh(dest)
    path = registry.publish(tiny_pipeline, "editor", "cand")
    registry.register("editor", "cand", path)
    with pytest.raises(registry.RegistryError, match="would overwrite"):
        registry.publish(tiny_pipeline, "editor", "cand")
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register("editor", "cand", folder)
    (hive.home / "keep").mkdir()
    for name in ("../../keep", "a/b", ".hidden", ""):  # a name is one plain folder under models/<kind>/
        with pytest.raises(registry.RegistryError, match="model name"):
            registry.publish(tiny_pipeline, "editor", name)
    assert (hive.home / "keep").exists()


def test_the_app_runs_a_loop_round_as_a_background_job(tiny_clip, hive, tiny_pipeline):
    """hive_app.jobs offers `loop_round` once hive.loop exists and records what the round produced."""
    jobs = pytest.importorskip("hive_app.jobs")
    from hive_app.config import AppConfig
    from hive_app.service import HiveService

    served = hive.home / "served-editor"
    shutil.copytree(tiny_pipeline, served)
    svc = HiveService(AppConfig(model=str(served), explicit_model=True), store=hive.store)
    simulate_rankings(hive, 3)
    before = digest(served)
    assert "loop_round" in jobs.job_kinds()
    run_id = jobs.submit_job("loop_round", tiny_config(tiny_clip, evaluate="none", method="weighted"))
    assert jobs.JobWorker(svc).run_one()
    with session_scope(hive.url, write=False) as s:
        job = s.get(TrainingRun, run_id)
        assert job.status == "succeeded", job.error
        cand = s.get(ModelVersion, job.produced_version_id)
        loop_run = s.query(TrainingRun).filter_by(kind="loop").one()
    assert cand.kind == "editor" and cand.status == "candidate" and cand.parent_id == svc.served
    assert loop_run.status == "succeeded" and loop_run.produced_version_id == cand.id
    text = jobs.read_log(job)
    assert "PROGRESS 6/6" in text and "registered" in text
    assert digest(served) == before and svc.editor_version().id == svc.served  # still serving the same editor


def test_only_rounds_whose_process_is_gone_are_marked_interrupted(hive):
    """What the app's start-up needs: a round running elsewhere (it holds its lock) stays running."""
    from hive.loop import _locked, _start_row, fail_interrupted_runs

    live_dir, dead_dir = hive.home / "loop" / "live", hive.home / "loop" / "dead"
    live, dead = (_start_row({}, "k", d, None, None) for d in (live_dir, dead_dir))
    with _locked(dead_dir):
        pass  # a round that took its lock and was killed: the lock went with its process
    with _locked(live_dir):  # a round still running
        assert fail_interrupted_runs() == [dead]
        with session_scope(hive.url, write=False) as s:
            assert s.get(TrainingRun, live).status == "running"
            assert s.get(TrainingRun, dead).status == "failed" and "interrupted" in s.get(TrainingRun, dead).error
    assert fail_interrupted_runs() == [live]  # its process stopped too
