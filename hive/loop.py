"""The closed loop, one round: rankings -> reward model -> scores -> fine-tuned editor -> evaluation
-> a candidate version in the registry. Promotion is a separate, explicit step (`hive.registry`).

A round lives in HIVE_HOME/loop/round-<id>/ and runs six stages:

1. `export`   snapshot the store's rankings (images, rankings.jsonl, one triplet per ranked variant);
2. `reward`   train the reward model on them and register it (or use a given/promoted one);
3. `data`     score the training triplets and the ranked variants (+ their inverses with `cycle`),
              quantise (condition) or weight (weighted) them;
4. `finetune` fine-tune the serving editor on the SFT trainer; copy the pipeline to a fresh
              folder HIVE_HOME/models/editor/<name>;
5. `evaluate` judge candidate and serving editor on fresh toy edits, and compare them blind
              (simulated annotators; `hive.evaluate`);
6. `register` register the candidate (parent: the serving editor) with its metrics.

Every stage writes its result to state.json when it ends; the trainers checkpoint inside their
stage. Each attempt is a `training_runs` row (kind "loop": status, config, log path). A crashed
round resumes: `python -m hive loop --resume RUN_ID`, or the same config again, skips the finished
stages (and the trainers resume from their checkpoints). Nothing writes into a registered
model's folder: new models go to fresh folders, checked against the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hive.files import write_json_atomic

STAGES = ("export", "reward", "data", "finetune", "evaluate", "register")
RUN_KIND = "loop"

DEFAULTS: dict[str, Any] = {
    # what to train
    "method": "condition",  # "condition" or "weighted"
    "cycle": True,  # add the inverse of every invertible edit
    "base": None,  # editor to fine-tune (default: the promoted editor, else $HIVE_MODEL / the toy editor)
    "name": None,  # candidate name (default: hive-<method>[-cycle]-round<id>)
    # data
    "data": None,  # triplet dataset folder (metadata.jsonl); default: a fresh noisy toy dataset
    "toy_n": 200, "toy_noise": 0.3, "toy_seed": 0,  # that toy dataset
    "from_db": True,  # also the ranked variants of the feedback store
    "include_simulated": True,  # rankings by simulated annotators count
    # reward model
    "reward": None,  # an existing reward model folder instead of training one
    "train_reward": True,
    "min_requests": 2,  # ranked requests needed to train one (else the promoted reward model is used)
    "reward_backbone": None, "reward_steps": 300, "reward_batch_size": 16, "reward_lr": 1e-4,
    "reward_head_lr": 1e-3, "reward_freeze_layers": 2, "reward_hidden": 256, "score_batch": 64,
    # fine-tuning (hive.finetune.FinetuneConfig)
    "steps": 500, "batch_size": 16, "lr": 1e-4, "warmup_steps": 50, "eta": 1.0, "clip": 4.0,
    "ema_decay": 0.999, "min_snr_gamma": 5.0, "checkpoint_every": 100, "mixed_precision": "no", "seed": 0,
    "sft": {},  # further SFTConfig fields
    # evaluation
    "evaluate": "toy",  # "toy" (judge + blind pairwise on fresh toy edits) or "none"
    "eval_n": 100, "eval_steps": 20, "eval_batch": 16, "pairwise_n": None,  # None: eval_n
    "tradeoff_n": 0,  # > 0: also the CLIP trade-off curves of both editors on this many edits (slow)
}


class LoopError(RuntimeError):
    """A loop round cannot run; the message says why and what to do."""


Log = Callable[[str], None]
Progress = Callable[[int, int], None]


def normalise(config: dict | None) -> dict:
    """Defaults filled in, unknown keys and bad values refused (before anything is written)."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise LoopError(f"unknown loop config keys {unknown}; known: {', '.join(sorted(DEFAULTS))}")
    cfg = {**DEFAULTS, **config}
    if cfg["method"] not in ("condition", "weighted"):
        raise LoopError(f"method must be 'condition' or 'weighted', not {cfg['method']!r}")
    if cfg["evaluate"] not in ("toy", "none"):
        raise LoopError(f"evaluate must be 'toy' or 'none', not {cfg['evaluate']!r}")
    for key in ("steps", "batch_size", "toy_n", "reward_steps", "reward_batch_size", "eval_n", "eval_steps",
                "eval_batch", "min_requests", "checkpoint_every", "score_batch"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise LoopError(f"{key} must be a whole number >= 1, not {cfg[key]!r}")
    for key in ("data", "base", "reward"):
        if cfg[key] is not None:
            p = Path(cfg[key]).expanduser()
            if p.exists():
                cfg[key] = str(p.resolve())
            elif key == "data" or key == "reward":
                raise LoopError(f"{key}: {cfg[key]} does not exist")
    if cfg["data"] is not None and not (Path(cfg["data"]) / "metadata.jsonl").exists():
        raise LoopError(f"data: {cfg['data']} has no metadata.jsonl")
    if cfg["name"] is not None:
        from hive.registry import RegistryError, check_name

        try:
            check_name(cfg["name"])
        except RegistryError as e:
            raise LoopError(str(e)) from None
    if not isinstance(cfg["tradeoff_n"], int) or cfg["tradeoff_n"] < 0:
        raise LoopError(f"tradeoff_n must be a whole number >= 0, not {cfg['tradeoff_n']!r}")
    if cfg["pairwise_n"] is not None and (not isinstance(cfg["pairwise_n"], int) or cfg["pairwise_n"] < 1):
        raise LoopError(f"pairwise_n must be null or a whole number >= 1, not {cfg['pairwise_n']!r}")
    if not isinstance(cfg["toy_noise"], (int, float)) or not 0 <= cfg["toy_noise"] <= 1:
        raise LoopError(f"toy_noise must be a number from 0 to 1, not {cfg['toy_noise']!r}")
    try:  # the fine-tuning settings (eta, clip, sft, ...) are checked now, not after the reward model trained
        fc = finetune_config(cfg)
        fc.check()
        fc.sft_config()
    except (TypeError, ValueError) as e:
        raise LoopError(f"fine-tuning settings: {e}") from None
    return cfg


def config_key(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finetune_config(cfg: dict):
    from hive.finetune import FinetuneConfig

    return FinetuneConfig(method=cfg["method"], cycle=bool(cfg["cycle"]), steps=cfg["steps"],
                          batch_size=cfg["batch_size"], lr=float(cfg["lr"]), warmup_steps=int(cfg["warmup_steps"]),
                          eta=float(cfg["eta"]), clip=float(cfg["clip"]), ema_decay=cfg["ema_decay"],
                          min_snr_gamma=cfg["min_snr_gamma"], checkpoint_every=cfg["checkpoint_every"],
                          mixed_precision=cfg["mixed_precision"], seed=int(cfg["seed"]), sft=dict(cfg["sft"] or {}))


# ---------------------------------------------------------------- runs, locks, state
@contextlib.contextmanager
def _locked(work: Path):
    """One process per round: a second one gets a clear error instead of a corrupted round."""
    import fcntl

    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoopError(f"the round in {work} is running in another process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _round_held(work: Path) -> bool:
    """Whether a live process holds the round's lock now (the lock goes with its process, so a
    killed round holds nothing, while its row still says `running`)."""
    import fcntl

    lock = work / ".lock"
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def fail_interrupted_runs() -> list[int]:
    """Mark failed the `running` loop rows whose process is gone; a round still running (from
    the command line, say) is left alone. For the app's start-up, which cannot tell otherwise:
    failing every `running` row would also fail a live round. Returns the ids marked."""
    from sqlalchemy import select

    from db import feedback as fb
    from db.engine import session_scope
    from db.models import TrainingRun

    with session_scope() as s:
        rows = s.scalars(select(TrainingRun).where(TrainingRun.kind == RUN_KIND, TrainingRun.status == "running"))
        stale = [r for r in rows if not (r.config.get("work_dir") and _round_held(Path(r.config["work_dir"])))]
        for r in stale:
            fb.finish_training_run(s, r.id, "failed", error="interrupted: its process stopped")
        return [r.id for r in stale]


def _loop_runs():
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import TrainingRun

    with session_scope(write=False) as s:
        return list(s.scalars(select(TrainingRun).where(TrainingRun.kind == RUN_KIND).order_by(TrainingRun.id.desc())))


def _find_resumable(key: str):
    """The newest loop run with this config, if it did not succeed (a later success starts anew)."""
    for run in _loop_runs():
        if run.config.get("key") == key:
            return None if run.status == "succeeded" else run
    return None


def _get_run(run_id: int):
    from db.engine import session_scope
    from db.models import TrainingRun

    with session_scope(write=False) as s:
        run = s.get(TrainingRun, int(run_id))
    if run is None or run.kind != RUN_KIND:
        raise LoopError(f"no loop run with id {run_id}")
    return run


class Round:
    """One attempt at a round: its row in training_runs, its folder, its state and log."""

    def __init__(self, work: Path, cfg: dict, key: str, log: Log | None, progress: Progress | None):
        self.work, self.cfg, self.key = work, cfg, key
        self.state_path = work / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {
            "key": key, "config": cfg, "stages": {}}
        self._log, self._progress = log, progress
        self.run_id: int | None = None

    @property
    def round_id(self) -> int:
        return int(self.state["round_id"])

    def log(self, message: str) -> None:
        with open(self.work / "loop.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if self._log is not None:
            self._log(message)

    def progress(self, done: int) -> None:
        if self._progress is not None:
            self._progress(done, len(STAGES))

    def save(self) -> None:
        write_json_atomic(self.state_path, self.state)


def _start_row(cfg: dict, key: str, work: Path | None, resume_of: int | None, base_version_id: int | None) -> int:
    from db import feedback as fb
    from db.engine import session_scope

    with session_scope() as s:
        run = fb.start_training_run(s, RUN_KIND, {"round": cfg, "key": key, "resume_of": resume_of},
                                    base_version_id=base_version_id)
        work = work or _round_dir(run.id)
        run.config = {**run.config, "work_dir": str(work)}
        run.log_path = str(work / "loop.log")
        return run.id


def _round_dir(round_id: int) -> Path:
    from db.config import hive_home

    return hive_home() / "loop" / f"round-{round_id}"


def _finish_row(run_id: int, status: str, produced: int | None = None, error: str | None = None,
                result: dict | None = None) -> None:
    from db import feedback as fb
    from db.engine import session_scope
    from db.models import TrainingRun

    with session_scope() as s:
        run = s.get(TrainingRun, run_id)
        if result is not None:
            run.config = {**run.config, "result": result}
        if run.status in ("queued", "running"):
            fb.finish_training_run(s, run_id, status, produced_version_id=produced, error=error)


# ---------------------------------------------------------------- the round
def run_round(config: dict | None = None, log: Log | None = None, progress: Progress | None = None, *,
              resume: int | None = None, new: bool = False) -> dict:
    """Run (or resume) one loop round; return its result, with `produced_version_id` (the
    registered candidate). `progress(done, total)` is called with finished stages out of six,
    `log(message)` with each step (also appended to the round's loop.log).

    `resume`: the id of a loop run to resume (its own config is used). Without it, an unfinished
    round with the same config is resumed, unless `new`. The app's job runner calls
    `run_round(config, log=..., progress=...)`; `config` may also carry "resume" and "new"."""
    config = dict(config or {})
    resume = config.pop("resume", resume)
    new = bool(config.pop("new", new))
    previous = None
    if resume is not None:
        previous = _get_run(int(resume))
        cfg = previous.config["round"]
        if config and normalise(config) != cfg:
            raise LoopError(f"run {resume} used another config; resume it without one, or start a new round")
    else:
        cfg = normalise(config)
        if not new:
            previous = _find_resumable(config_key(cfg))
    key = config_key(cfg)
    if previous is not None:
        if previous.status == "succeeded":
            raise LoopError(f"loop run {previous.id} already succeeded; start a new round instead")
        work = Path(previous.config["work_dir"])
        with _locked(work):
            if previous.status == "running":  # its process is gone (we hold the lock): it crashed
                _finish_row(previous.id, "failed", error="interrupted; resumed by a later run")
            return _run_locked(work, cfg, key, log, progress, resume_of=previous.id)
    if cfg["name"] is not None and _registered("editor", cfg["name"]):
        raise LoopError(f"an editor named {cfg['name']!r} is registered already: choose another name")
    run_id = _start_row(cfg, key, None, None, None)
    work = _round_dir(run_id)
    with _locked(work):
        return _run_locked(work, cfg, key, log, progress, resume_of=None, run_id=run_id)


def _run_locked(work: Path, cfg: dict, key: str, log: Log | None, progress: Progress | None,
                resume_of: int | None, run_id: int | None = None) -> dict:
    rnd = Round(work, cfg, key, log, progress)
    if run_id is None:
        run_id = _start_row(cfg, key, work, resume_of, rnd.state.get("base", {}).get("id"))
    rnd.run_id = run_id
    rnd.state.setdefault("round_id", run_id)
    rnd.state.setdefault("runs", []).append(run_id)
    rnd.save()
    try:
        rnd.log(f"loop run {run_id}: round {rnd.round_id} in {work}"
                + (f", resuming run {resume_of}" if resume_of is not None else ""))
        if "base" not in rnd.state:
            rnd.state["base"] = _serving_editor(cfg, rnd)
            rnd.save()
            _set_base(run_id, rnd.state["base"]["id"])
        rnd.log(f"serving editor: {rnd.state['base']['name']} (version {rnd.state['base']['id']}, "
                f"{rnd.state['base']['path']})")
        rnd.progress(sum(s in rnd.state["stages"] for s in STAGES))
        for name in STAGES:
            if name in rnd.state["stages"]:
                rnd.log(f"[{name}] done before; skipped")
                continue
            rnd.log(f"[{name}] start")
            started = time.time()
            result = STAGE_FNS[name](rnd)
            result["seconds"] = round(time.time() - started, 1)
            rnd.state["stages"][name] = result
            rnd.save()
            rnd.log(f"[{name}] done in {result['seconds']} s")
            rnd.progress(sum(s in rnd.state["stages"] for s in STAGES))
    except BaseException as exc:
        rnd.log("FAILED\n" + traceback.format_exc())
        _finish_row(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    reg = rnd.state["stages"]["register"]
    result = {
        "run_id": run_id, "round_id": rnd.round_id, "work_dir": str(work), "resume_of": resume_of,
        "produced_version_id": reg["version_id"], "candidate": reg["candidate"], "serving": rnd.state["base"],
        "reward": {k: rnd.state["stages"]["reward"].get(k) for k in ("path", "version_id", "trained")},
        "metrics": reg["candidate"]["metrics"], "log": str(work / "loop.log"),
    }
    _finish_row(run_id, "succeeded", produced=reg["version_id"], result={
        k: result[k] for k in ("round_id", "produced_version_id", "work_dir")})
    rnd.log(f"candidate {reg['candidate']['name']} (version {reg['version_id']}) registered; "
            f"promote it with: python -m hive promote {reg['version_id']}")
    return result


def _set_base(run_id: int, version_id: int) -> None:
    from db.engine import session_scope
    from db.models import TrainingRun

    with session_scope() as s:
        s.get(TrainingRun, run_id).base_version_id = version_id


def _serving_editor(cfg: dict, rnd: Round) -> dict:
    """The editor this round improves on: `base`, else the promoted editor, else the configured
    default editor (registered and promoted, as the app does when it starts serving it)."""
    from hive import registry

    if cfg["base"] is not None:
        registry.check_loadable(cfg["base"], "editor")
        v = registry.ensure_registered(cfg["base"], "editor")
    else:
        v = registry.promoted("editor")
        if v is None:
            from hive.editor import default_model

            path = default_model()
            registry.check_loadable(path, "editor")
            v = registry.ensure_registered(path, "editor", promote_if_none=True)
            rnd.log(f"no editor was promoted: registered and promoted the default editor {path}")
    registry.check_loadable(v["path"], "editor")
    return {"id": v["id"], "name": v["name"], "path": v["path"]}


# ---------------------------------------------------------------- stages
def stage_export(rnd: Round) -> dict:
    from hive.finetune import export_rankings

    dest = rnd.work / "rankings"
    if (dest / "summary.json").exists():  # written, but the stage did not get to record it
        return {**json.loads((dest / "summary.json").read_text()), "path": str(dest)}
    summary = export_rankings(dest, include_simulated=bool(rnd.cfg["include_simulated"]))
    rnd.log(f"exported {summary['rankings']} rankings of {summary['requests']} requests "
            f"({summary['variants']} ranked variants)")
    return {**summary, "path": str(dest)}


def stage_reward(rnd: Round) -> dict:
    from hive import registry
    from hive.finetune import load_rankings

    cfg = rnd.cfg
    if cfg["reward"] is not None:
        registry.check_loadable(cfg["reward"], "reward")
        v = registry.ensure_registered(cfg["reward"], "reward")
        rnd.log(f"using the given reward model {cfg['reward']}")
        return {"path": v["path"], "version_id": v["id"], "trained": False}
    rankings = load_rankings(rnd.work / "rankings")
    requests = len({r.request_id for r in rankings if r.pairs()})
    if cfg["train_reward"] and requests >= cfg["min_requests"]:
        from hive.train_reward import RewardTrainConfig, train_reward

        tc = RewardTrainConfig(backbone=cfg["reward_backbone"], steps=cfg["reward_steps"],
                               batch_size=cfg["reward_batch_size"], lr=float(cfg["reward_lr"]),
                               head_lr=float(cfg["reward_head_lr"]), freeze_layers=int(cfg["reward_freeze_layers"]),
                               hidden=int(cfg["reward_hidden"]), seed=int(cfg["seed"]),
                               checkpoint_every=max(1, min(200, cfg["reward_steps"] // 2)),
                               include_simulated=bool(cfg["include_simulated"]))
        rnd.log(f"training the reward model on {len(rankings)} rankings of {requests} requests, "
                f"{tc.steps} steps")
        report = train_reward(rankings, rnd.work / "reward", tc)
        name = f"reward-round{rnd.round_id}"
        path = registry.models_root() / "reward" / name
        done = _registered("reward", name)  # registered before a crash, state.json not written: kept as it is
        if done is None or Path(done["path"]) != path.resolve():  # (publishing again would be refused)
            path = registry.publish(rnd.work / "reward" / "model", "reward", name)
        keep = ("heldout_pair_accuracy", "heldout_pair_accuracy_with_ties", "true_pair_accuracy",
                "single_annotator_accuracy", "clip_direction_accuracy", "random_accuracy", "train_requests",
                "test_requests", "train_rankings", "test_rankings", "steps", "backbone")
        metrics = {k: report.get(k) for k in keep} | {"loop_round": rnd.round_id}
        vid = registry.register("reward", name, path, metrics=metrics)
        rnd.log(f"reward model {name} (version {vid}): held-out pair accuracy "
                f"{report.get('heldout_pair_accuracy')}")
        return {"path": str(path), "version_id": vid, "trained": True, "metrics": metrics}
    v = registry.promoted("reward")
    if v is None:
        raise LoopError(f"cannot get a reward model: {requests} ranked requests (need {cfg['min_requests']} to train "
                        "one), none given (config 'reward') and none promoted. Rank more edits, or pass a reward "
                        "model folder")
    registry.check_loadable(v["path"], "reward")
    rnd.log(f"using the promoted reward model {v['name']} (only {requests} ranked requests; "
            f"{cfg['min_requests']} needed to train)" if cfg["train_reward"] else
            f"using the promoted reward model {v['name']}")
    return {"path": v["path"], "version_id": v["id"], "trained": False}


def _registered(kind: str, name: str) -> dict | None:
    """The version of `kind` named `name`, if there is one."""
    from hive import registry

    return next((v for v in registry.list_versions(kind) if v["name"] == name), None)


def stage_data(rnd: Round) -> dict:
    from hive import toy
    from hive.finetune import (
        build_examples,
        examples_to_jsonl,
        prepare,
        read_model_info,
        rewards_for,
    )

    cfg = rnd.cfg
    if cfg["data"] is not None:
        folders = [Path(cfg["data"])]
    else:
        folder = rnd.work / "toy-data"
        if not (folder / "metadata.jsonl").exists():
            rnd.log(f"writing {cfg['toy_n']} toy edits (noise {cfg['toy_noise']}) to {folder}")
            toy.write_dataset(folder, n=cfg["toy_n"], seed=int(cfg["toy_seed"]), noise=float(cfg["toy_noise"]))
        folders = [folder]
    rankings = rnd.work / "rankings" if cfg["from_db"] else None
    examples, stats = build_examples(folders, rankings, bool(cfg["cycle"]))
    reward_path = rnd.state["stages"]["reward"]["path"]
    rnd.log(f"scoring {len(examples)} examples with {reward_path}")
    rewards, how = rewards_for(examples, folders, reward_path, rnd.work / "scores", batch_size=cfg["score_batch"])
    base_suffix = read_model_info(rnd.state["base"]["path"]).get("reward_suffix", "")
    examples, info = prepare(examples, rewards, finetune_config(cfg), base_suffix)
    out = rnd.work / "data"
    out.mkdir(parents=True, exist_ok=True)
    examples_to_jsonl(examples, out / "examples.jsonl")
    info = {**info, **stats, "rewards": how, "folders": [str(f) for f in folders]}
    write_json_atomic(out / "summary.json", info)
    rnd.log(f"{len(examples)} examples: {info['by_origin']}")
    return {"examples_path": str(out / "examples.jsonl"), **info}


def candidate_name(rnd: Round) -> str:
    cfg = rnd.cfg
    return cfg["name"] or f"hive-{cfg['method']}{'-cycle' if cfg['cycle'] else ''}-round{rnd.round_id}"


def stage_finetune(rnd: Round) -> dict:
    from hive import registry
    from hive.finetune import examples_from_jsonl, finetune

    data = rnd.state["stages"]["data"]
    examples = examples_from_jsonl(Path(data["examples_path"]))
    fc = finetune_config(rnd.cfg)
    base = rnd.state["base"]["path"]
    name = candidate_name(rnd)
    registry.assert_fresh(registry.models_root() / "editor" / name)  # fail before training, not after
    rnd.log(f"fine-tuning {rnd.state['base']['name']} ({fc.method}{', cycle' if fc.cycle else ''}) on "
            f"{len(examples)} examples, {fc.steps} steps of {fc.batch_size}")
    extra = {"reward_model": rnd.state["stages"]["reward"]["path"], "loop_round": rnd.round_id,
             "examples": data.get("examples"), "by_origin": data.get("by_origin")}
    for k in ("condition", "weights"):
        if k in data:
            extra[k] = data[k]
    pipeline = finetune(base, examples, rnd.work / "finetune", fc, extra_info=extra)
    path = registry.publish(pipeline, "editor", name)
    rnd.log(f"candidate editor written to {path}")
    return {"path": str(path), "name": name}


def stage_evaluate(rnd: Round) -> dict:
    cfg = rnd.cfg
    if cfg["evaluate"] == "none":
        return {"skipped": True}
    from hive import evaluate as ev
    from hive.editor import Editor

    cand_path = rnd.state["stages"]["finetune"]["path"]
    cand, base = Editor(cand_path), Editor(rnd.state["base"]["path"])  # each loaded once
    n, steps, batch = cfg["eval_n"], cfg["eval_steps"], cfg["eval_batch"]
    rnd.log(f"judging candidate and serving editor on {n} fresh toy edits ({steps} steps)")
    c = ev.evaluate_toy(n=n, steps=steps, batch=batch, out=rnd.work / "eval" / "candidate", editor=cand)
    b = ev.evaluate_toy(n=n, steps=steps, batch=batch, out=rnd.work / "eval" / "serving", editor=base)
    metrics: dict[str, Any] = {
        "toy_success": c["success"], "serving_toy_success": b["success"],
        "toy_success_delta": c["success"] - b["success"], "toy_eval_n": n, "toy_eval_steps": steps,
        "toy_per_kind": {k: v["success"] for k, v in c["per_kind"].items()},
        "serving_toy_per_kind": {k: v["success"] for k, v in b["per_kind"].items()},
    }
    rnd.log(f"toy success: candidate {c['success']:.3f}, serving {b['success']:.3f}")
    pn = cfg["pairwise_n"] or n
    res = _jsonable(ev.blind_pairwise(cand, base, pn, steps=steps, batch=batch, out=rnd.work / "eval" / "pairwise",
                                      progress=False))
    metrics["pairwise_vs_serving"] = res
    rnd.log(f"blind pairwise vs serving on {pn} edits: {res['wins']} wins, {res['ties']} ties, {res['losses']} losses")
    if cfg["tradeoff_n"]:
        curves = {name: ev.tradeoff_curve(editor, n=cfg["tradeoff_n"], steps=steps, batch=batch, progress=False)
                  for name, editor in (("candidate", cand), ("serving", base))}
        png = ev.plot_tradeoff(curves, rnd.work / "eval" / "tradeoff.png")
        write_json_atomic(rnd.work / "eval" / "tradeoff.json", _jsonable(curves))
        metrics["tradeoff"] = {"plot": str(png), **{k: v["points"] for k, v in curves.items()}}
    return metrics


def _jsonable(x: Any) -> Any:
    from dataclasses import is_dataclass

    if is_dataclass(x) and not isinstance(x, type):
        x = asdict(x)
    return json.loads(json.dumps(x, default=str))


def stage_register(rnd: Round) -> dict:
    from hive import registry

    ft = rnd.state["stages"]["finetune"]
    data = rnd.state["stages"]["data"]
    reward = rnd.state["stages"]["reward"]
    metrics = {
        "method": rnd.cfg["method"], "cycle": bool(rnd.cfg["cycle"]), "loop_round": rnd.round_id,
        "loop_run_id": rnd.run_id, "reward_version_id": reward.get("version_id"), "examples": data.get("examples"),
        "examples_by_origin": data.get("by_origin"), "steps": rnd.cfg["steps"],
        **{k: v for k, v in rnd.state["stages"]["evaluate"].items() if k not in ("seconds", "skipped")},
    }
    vid = registry.register("editor", ft["name"], ft["path"], parent_id=rnd.state["base"]["id"], metrics=metrics)
    return {"version_id": vid, "candidate": registry.get_version(vid, "editor")}


STAGE_FNS: dict[str, Callable[[Round], dict]] = {
    "export": stage_export, "reward": stage_reward, "data": stage_data, "finetune": stage_finetune,
    "evaluate": stage_evaluate, "register": stage_register,
}


# ---------------------------------------------------------------- command line
def _print_json(obj: dict) -> None:
    import sys

    sys.stdout.flush()
    print(json.dumps(obj, default=str), flush=True)


def _err(message: str) -> int:
    import sys

    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_finetune(args) -> int:
    from hive.finetune import FinetuneConfig, run_finetune

    config = FinetuneConfig(method=args.method, cycle=args.cycle, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, warmup_steps=args.warmup_steps, eta=args.eta, clip=args.clip,
                            ema_decay=None if args.no_ema else args.ema_decay, checkpoint_every=args.checkpoint_every,
                            mixed_precision=args.mixed_precision, seed=args.seed,
                            min_snr_gamma=args.min_snr_gamma if args.min_snr_gamma > 0 else None,
                            sft={"change_weight": args.change_weight, "high_noise_bias": args.high_noise_bias,
                                 "cross_attention_lr_scale": args.cross_attention_lr_scale,
                                 "text_layers": args.text_layers})
    started = time.time()
    try:
        result = run_finetune(args.base, [Path(d) for d in args.data or []], Path(args.out), config,
                              reward=args.reward, from_db=args.from_db, include_simulated=not args.humans_only,
                              score_batch=args.score_batch)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _err(str(e))
    result["seconds"] = round(time.time() - started, 1)
    if args.json:
        _print_json(result)
    else:
        print(f"saved {result['model']} ({result['examples']} examples {result['by_origin']}, "
              f"{result['seconds']} s)")
    return 0


def _loop_config(args) -> dict:
    config: dict = {}
    if args.config:
        text = args.config
        if Path(text).exists():
            text = Path(text).read_text()
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoopError(f"--config is neither a JSON object nor a JSON file: {e}") from None
        if not isinstance(config, dict):
            raise LoopError("--config must be a JSON object")
    for key in ("method", "data", "base", "reward", "steps", "name", "eval_n", "toy_n", "cycle"):
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    return config


def cmd_loop(args) -> int:
    import sys

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def progress(done: int, total: int) -> None:
        print(f"[loop] {done}/{total} stages", file=sys.stderr, flush=True)

    try:
        config = _loop_config(args)
        result = run_round(config if (config or args.resume is None) else None, log=log, progress=progress,
                           resume=args.resume, new=args.new)
    except (LoopError, ValueError, FileNotFoundError) as e:
        return _err(str(e))
    if args.json:
        _print_json(result)
    else:
        m = result["metrics"]
        print(f"round {result['round_id']}: candidate {result['candidate']['name']} "
              f"(version {result['produced_version_id']}) at {result['candidate']['path']}")
        if m.get("toy_success") is not None:
            print(f"toy judge success: candidate {m['toy_success']:.1%}, serving {m['serving_toy_success']:.1%}")
        print(f"promote it with: python -m hive promote {result['produced_version_id']}")
    return 0


def cmd_promote(args) -> int:
    from hive import registry

    try:
        v = registry.promote(args.version, args.kind)
    except (registry.RegistryError, ValueError) as e:
        return _err(str(e))
    if args.json:
        _print_json(v)
    else:
        print(f"promoted {v['kind']} {v['name']} (version {v['id']})"
              + (f"; version {v['previous_id']} retired" if v["previous_id"] else ""))
    return 0


def cmd_rollback(args) -> int:
    from hive import registry

    try:
        v = registry.rollback(args.kind)
    except (registry.RegistryError, ValueError) as e:
        return _err(str(e))
    if args.json:
        _print_json(v)
    else:
        print(f"rolled back: {v['kind']} {v['name']} (version {v['id']}) is promoted again"
              + (f"; version {v['previous_id']} retired" if v["previous_id"] else ""))
    return 0


def cmd_models(args) -> int:
    from hive import registry

    versions = registry.list_versions(args.kind)
    if args.json:
        _print_json({"versions": versions})
        return 0
    if not versions:
        print("no model versions registered")
    for v in versions:
        succ = v["metrics"].get("toy_success")
        print(f"{v['id']:>4}  {v['kind']:<6} {v['status']:<9} {v['name']:<32} "
              f"{'' if succ is None else f'toy {succ:.1%}  '}{v['path']}")
    return 0


def cmd_experiment(args) -> int:
    from hive.experiment import run_paper

    try:
        report = run_paper(Path(args.out), args.scale, base=args.base, clip=args.clip,
                           docs=Path(args.docs) if args.docs else None)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _err(str(e))
    summary = {"out": str(Path(args.out).resolve()), "success": report["success"], "gap_closed": report["gap_closed"],
               "pairwise_vs_baseline": {k: {x: v[x] for x in ("win_rate", "tie_rate", "loss_rate", "win_ci", "loss_ci")}
                                        for k, v in report["pairwise_vs_baseline"].items()}}
    if args.json:
        _print_json(summary)
    else:
        print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_experiment_ship(args) -> int:
    from hive.experiment import ship_paper_editors

    try:
        written = ship_paper_editors(Path(args.out), args.dest)
    except (ValueError, FileNotFoundError) as e:
        return _err(str(e))
    if args.json:
        _print_json({name: str(path) for name, path in written.items()})
    else:
        for name, path in written.items():
            print(f"{name}: {path}")
    return 0


def add_commands(sub) -> None:
    """`finetune`, `loop`, `promote`, `rollback`, `models` and `experiment` for `python -m hive`."""
    import argparse

    p = sub.add_parser("finetune", help="fine-tune an editor with the reward (condition | weighted, + cycle)",
                       description="Fine-tune an InstructPix2Pix editor with a reward model: condition reward "
                       "(quality level appended to the instruction) or weighted reward (loss weights exp(R/eta)). "
                       "Writes OUT/pipeline (with hive.json); resumes from OUT/checkpoints.")
    p.add_argument("--method", choices=["condition", "weighted", "plain"], required=True,
                   help="plain: the same data and steps without the reward (a control)")
    p.add_argument("--cycle", action="store_true", help="add the inverse example of every invertible edit")
    p.add_argument("--base", required=True, help="editor pipeline folder (or hub id) to fine-tune")
    p.add_argument("--data", action="append", help="triplet dataset folder (metadata.jsonl); repeatable")
    p.add_argument("--from-db", action="store_true", help="also the ranked variants of the feedback store "
                   "($HIVE_DB_URL), snapshot into OUT/rankings")
    p.add_argument("--humans-only", action="store_true", help="with --from-db: leave simulated rankings out")
    p.add_argument("--reward", help="reward model folder to score every example (default: DATA/rewards.jsonl "
                   "from `python -m hive score`)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, examples.jsonl, pipeline/)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=1.0, help="weighted: temperature of exp(R/eta) (default %(default)s)")
    p.add_argument("--clip", type=float, default=4.0, help="weighted: largest weight, >= 1 (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR loss weighting; 0 turns it off "
                   "(the toy recipe)")
    p.add_argument("--high-noise-bias", type=float, default=0.0,
                   help="draw more high-noise timesteps (0: uniform; the toy recipe uses 1)")
    p.add_argument("--change-weight", type=float, default=0.0,
                   help="extra loss weight on latent pixels the edit changes (the toy recipe uses 4)")
    p.add_argument("--cross-attention-lr-scale", type=float, default=1.0,
                   help="the UNet's cross-attention layers learn this many times faster (at 10 the toy editor "
                   "learns a condition-reward quality word; docs/paper.md)")
    p.add_argument("--text-layers", type=int, default=0,
                   help="add this many transformer layers on top of the frozen text encoder, starting as the "
                   "identity, and train them with the UNet (a text encoder without layers cannot carry a "
                   "condition-reward quality word into the other token states; docs/paper.md)")
    p.add_argument("--score-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("loop", help="one round of the loop: rankings -> reward -> fine-tune -> evaluate -> candidate",
                       description="Export rankings, train the reward model, score, fine-tune the serving editor, "
                       "evaluate it against the serving editor and register it as a candidate. Promotion is a "
                       "separate step (python -m hive promote). A crashed round resumes (--resume RUN_ID, or the "
                       "same config again).")
    p.add_argument("--config", help="loop config: a JSON object or a JSON file (keys: see docs/loop.md)")
    p.add_argument("--method", choices=["condition", "weighted"], default=None)
    p.add_argument("--cycle", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--data", default=None, help="triplet dataset folder (default: fresh noisy toy edits)")
    p.add_argument("--base", default=None, help="editor to fine-tune (default: the promoted editor)")
    p.add_argument("--reward", default=None, help="use this reward model instead of training one")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    p.add_argument("--toy-n", type=int, default=None, help="toy training edits when --data is not given")
    p.add_argument("--eval-n", type=int, default=None, help="fresh toy edits to evaluate on")
    p.add_argument("--name", default=None, help="candidate version name")
    p.add_argument("--resume", type=int, default=None, metavar="RUN_ID", help="resume this loop run")
    p.add_argument("--new", action="store_true", help="start a new round even if one with this config is unfinished")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_loop)

    for name, fn, helptext in (("promote", cmd_promote, "serve a model version (the promoted one is retired)"),
                               ("rollback", cmd_rollback, "serve the version promoted before the current one again")):
        p = sub.add_parser(name, help=helptext)
        if name == "promote":
            p.add_argument("version", help="version id or name (see python -m hive models)")
        p.add_argument("--kind", choices=["editor", "reward"], default="editor")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)

    p = sub.add_parser("experiment", help="the paper's experiment on the toy world (report + pictures)")
    ex = p.add_subparsers(dest="experiment_command", required=True, metavar="WHICH")
    q = ex.add_parser("paper", help="noisy SFT baseline, simulated rankings, reward, HIVE condition/weighted, "
                      "ablations (cycle, data %), evaluation, report", description="See hive/experiment.py. Steps "
                      "that finished are skipped when rerun with the same --out.")
    q.add_argument("--scale", choices=["tiny", "full"], default="tiny", help="tiny: seconds (a test); full: hours")
    q.add_argument("--out", required=True, help="experiment folder (own feedback store under OUT/home)")
    q.add_argument("--base", default=None, help="pipeline the baseline starts from (default: the toy editor; "
                   "its UNet is re-initialised at full scale)")
    q.add_argument("--clip", default=None, help="CLIP folder: reward backbone and trade-off metric (default: toy CLIP)")
    q.add_argument("--docs", default=None, help="also copy report.md and the pictures to this folder (e.g. docs/paper)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_experiment)
    q = ex.add_parser("ship", help="install the experiment's noisy baseline and HIVE editors under models/",
                      description="Copies OUT's noisy SFT baseline, HIVE condition and HIVE weighted editors "
                      "(fp16, one shared copy of the VAE, text encoder, tokenizer and scheduler) into DEST, so "
                      "anyone can rerun the comparison with `python -m hive evaluate`.")
    q.add_argument("--out", required=True, help="the experiment folder of `experiment paper`")
    q.add_argument("--dest", default=None, help="where the editors go (default: models/toy-paper)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_experiment_ship)

    p = sub.add_parser("models", help="list the registered model versions")
    p.add_argument("--kind", choices=["editor", "reward"], default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
