"""Background jobs (evaluate, trade-off, fill the queue, loop rounds): rows in `training_runs`, one worker thread.

The request thread only inserts a `queued` row; the worker picks it up, writes its log to
HIVE_HOME/jobs/run-<id>.log and closes the row as succeeded or failed. Because the state is
in the database, a restarted app shows every past job and runs jobs queued before the restart
(or by `python -m hive queue`); a job that was running when the app stopped is marked failed.
At most one job of a kind is queued or running at a time.

Job kinds are registered by name (`register_job_kind`). The loop round (`loop_round`) is
registered automatically once `hive.loop` provides `run_round(config, log, progress) -> dict`.
"""

from __future__ import annotations

import importlib
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from db import feedback as fb
from db.engine import session_scope
from db.models import TrainingRun
from hive_app.service import AppInputError, HiveService


@dataclass
class JobContext:
    """What a running job gets: its run id, its config, the service, and log/progress writers."""

    run_id: int
    config: dict
    service: HiveService
    log_path: Path

    def log(self, message: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    def progress(self, done: int, total: int) -> None:
        self.log(f"PROGRESS {done}/{total}")


JobFn = Callable[[JobContext], dict | None]


@dataclass(frozen=True)
class JobKind:
    name: str
    description: str
    run: JobFn
    defaults: dict


JOB_KINDS: dict[str, JobKind] = {}


def register_job_kind(name: str, run: JobFn, description: str, defaults: dict | None = None) -> None:
    """Offer a job kind in the Admin tab and the `start_job` API."""
    JOB_KINDS[name] = JobKind(name, description, run, dict(defaults or {}))


# ---------------------------------------------------------------- built-in kinds
def run_evaluate(ctx: JobContext) -> dict:
    """Judge the promoted editor on fresh toy edits; the result goes into its version's metrics."""
    from hive.evaluate import evaluate_toy

    n = int(ctx.config.get("n", 8))
    steps = int(ctx.config.get("steps", 20))
    version = ctx.service.editor_version()
    editor, lock = ctx.service.editors.get(version.path)
    ctx.log(f"evaluating {version.name} on {n} toy edits, {steps} steps")
    with lock:
        report = evaluate_toy(n=n, steps=steps, batch=max(1, min(8, n)), editor=editor)
    ctx.progress(n, n)
    with session_scope() as s:
        fb.update_model_metrics(s, version.id, {"toy_success": report["success"], "toy_eval_n": n,
                                                "toy_per_kind": report["per_kind"]})
    ctx.log(f"toy success {report['success']:.3f}")
    return {"version_id": version.id}


def _editor_version(ctx: JobContext):
    """The version named by the job's config (`version`: id or name), else the promoted editor."""
    ident = ctx.config.get("version")
    if ident in (None, ""):
        return ctx.service.editor_version()
    for v in ctx.service.editor_versions():
        if str(v.id) == str(ident) or v.name == str(ident):
            return v
    raise AppInputError(f"no editor version with id or name {ident!r}")


def run_tradeoff(ctx: JobContext) -> dict:
    """The CLIP trade-off curve (image guidance 1.0-2.2, the model's text guidance) of an editor version,
    stored in its metrics (`tradeoff`) for the Dashboard's trade-off plot."""
    from hive.evaluate import TRADEOFF_IMAGE_GUIDANCES, ClipEmbedder, tradeoff_curve

    n = int(ctx.config.get("n", 8))
    steps = int(ctx.config.get("steps", 20))
    version = _editor_version(ctx)
    editor, lock = ctx.service.editors.get(version.path)
    clip = ClipEmbedder(ctx.config.get("clip") or None)
    ctx.log(f"trade-off of {version.name}: {n} toy edits x {len(TRADEOFF_IMAGE_GUIDANCES)} image guidances, "
            f"{steps} steps, CLIP {clip.path}")
    curve = None
    for i, ig in enumerate(TRADEOFF_IMAGE_GUIDANCES):
        with lock:  # one point at a time, so that people's edits are not held up for the whole sweep
            point = tradeoff_curve(editor, n=n, image_guidances=(ig,), steps=steps, clip=clip,
                                   batch=max(1, min(8, n)), progress=False)
        if curve is None:
            curve = point
        else:
            curve["points"] += point["points"]
            curve["seconds"] = round(curve["seconds"] + point["seconds"], 1)
        p = point["points"][0]
        ctx.log(f"image guidance {ig:g}: CLIP image similarity {p['image_similarity']:.3f}, "
                f"directional {p['directional_similarity']:.3f}, judge success {p['success']:.1%}")
        ctx.progress(i + 1, len(TRADEOFF_IMAGE_GUIDANCES))
    with session_scope() as s:
        fb.update_model_metrics(s, version.id, {"tradeoff": curve})
    return {"version_id": version.id}


def run_fill_queue(ctx: JobContext) -> dict:
    from hive_app.queue import fill_queue

    return fill_queue(ctx.service, Path(ctx.config["data"]), variants=int(ctx.config.get("variants", 4)),
                      gold_rate=float(ctx.config.get("gold_rate", 0.2)), limit=ctx.config.get("limit"),
                      log=ctx.log, progress=ctx.progress)


def run_loop_round(ctx: JobContext) -> dict:
    """One round of the loop (reward training, fine-tuning, evaluation) from `hive.loop`."""
    loop = importlib.import_module("hive.loop")
    result = loop.run_round(ctx.config, log=ctx.log, progress=ctx.progress)
    return result or {}


register_job_kind("evaluate", run_evaluate, "judge the promoted editor on n fresh toy edits", {"n": 8, "steps": 20})
register_job_kind("tradeoff", run_tradeoff, "CLIP trade-off curve of an editor version (default: the promoted "
                  "one) over image guidance 1.0-2.2, for the Dashboard", {"n": 8, "steps": 20, "version": None})
register_job_kind("fill_queue", run_fill_queue, "queue a dataset folder for ranking (K variants per row)",
                  {"data": "", "variants": 4, "gold_rate": 0.2})


def loop_available() -> bool:
    try:
        return hasattr(importlib.import_module("hive.loop"), "run_round")
    except ImportError:
        return False


def job_kinds() -> dict[str, JobKind]:
    """The job kinds on offer; `loop_round` joins them as soon as `hive.loop` provides `run_round`."""
    if "loop_round" not in JOB_KINDS and loop_available():
        register_job_kind("loop_round", run_loop_round, "one loop round: export rankings, train the reward model, "
                          "fine-tune the promoted editor, evaluate it, register a candidate", loop_defaults())
    return JOB_KINDS


LOOP_SHOWN = ("method", "cycle", "steps", "batch_size", "toy_n", "toy_noise", "reward_steps", "eval_n", "pairwise_n")


def loop_defaults() -> dict:
    """The loop settings shown in the Admin tab's config box (every other key of
    hive.loop.DEFAULTS may be added there too)."""
    try:
        defaults = importlib.import_module("hive.loop").DEFAULTS
    except (ImportError, AttributeError):
        return {}
    return {k: defaults[k] for k in LOOP_SHOWN if k in defaults}


def job_progress(run: TrainingRun) -> tuple[int, int] | None:
    """The last `PROGRESS done/total` line of a job's log, or None."""
    if not run.log_path or not Path(run.log_path).exists():
        return None
    last = None
    for line in Path(run.log_path).read_text(errors="replace").splitlines():
        parts = line.split(" PROGRESS ", 1)
        if len(parts) == 2 and "/" in parts[1]:
            done, _, total = parts[1].strip().partition("/")
            if done.isdigit() and total.isdigit():
                last = (int(done), int(total))
    return last


# ---------------------------------------------------------------- submitting and the worker
def submit_job(kind: str, config: dict | None = None) -> int:
    """Queue a job (any caller: the Admin tab, the API, the CLI); refuses a second one of a kind."""
    if kind not in job_kinds():
        raise AppInputError(f"unknown job kind {kind!r}; available: {', '.join(sorted(JOB_KINDS))}"
                            + ("" if loop_available() else " (loop_round needs hive.loop, not built yet)"))
    merged = {**JOB_KINDS[kind].defaults, **(config or {})}
    with session_scope() as s:  # a write transaction: the check and the insert cannot interleave
        busy = s.scalar(select(TrainingRun).where(TrainingRun.kind == kind,
                                                  TrainingRun.status.in_(("queued", "running"))))
        if busy is not None:
            raise AppInputError(f"a {kind} job is already {busy.status} (run {busy.id}); wait for it to finish")
        run = fb.start_training_run(s, kind, merged, status="queued")
        return run.id


def job_log_path(service: HiveService, run_id: int) -> Path:
    return service.store.home / "jobs" / f"run-{run_id}.log"


class JobWorker:
    """One background thread that runs queued jobs, oldest first."""

    def __init__(self, service: HiveService, poll_s: float = 1.0):
        self.service = service
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recover(self) -> list[int]:
        """This worker's jobs left `running` by a stopped app cannot be resumed mid-way: mark them
        failed. Rows of other kinds (a loop round started from the command line) belong to other
        processes: hive.loop fails only those whose process is gone."""
        with session_scope() as s:
            stale = s.scalars(select(TrainingRun).where(TrainingRun.status == "running",
                                                        TrainingRun.kind.in_(list(job_kinds())))).all()
            for run in stale:
                fb.finish_training_run(s, run.id, "failed", error="interrupted: the app stopped while it ran")
            ids = [r.id for r in stale]
        if loop_available():
            ids += importlib.import_module("hive.loop").fail_interrupted_runs()
        return ids

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="hive-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.run_one():
                    self._stop.wait(self.poll_s)
            except Exception:  # never let the worker die; the job row carries the error
                traceback.print_exc()
                self._stop.wait(self.poll_s)

    def run_one(self) -> bool:
        """Run the oldest queued job of a known kind; False when there is none."""
        with session_scope() as s:
            run = s.scalar(select(TrainingRun).where(TrainingRun.status == "queued",
                                                     TrainingRun.kind.in_(list(job_kinds())))
                           .order_by(TrainingRun.id).limit(1))
            if run is None:
                return False
            log_path = job_log_path(self.service, run.id)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            fb.mark_training_run_running(s, run.id)
            run.log_path = str(log_path)
            run_id, kind, config = run.id, run.kind, dict(run.config)
        ctx = JobContext(run_id, config, self.service, log_path)
        ctx.log(f"started {kind} job {run_id} with {config}")
        try:
            result: dict[str, Any] = JOB_KINDS[kind].run(ctx) or {}
        except Exception as exc:
            ctx.log("FAILED\n" + traceback.format_exc())
            with session_scope() as s:
                fb.finish_training_run(s, run_id, "failed", error=f"{type(exc).__name__}: {exc}")
            return True
        ctx.log(f"finished: {result}")
        with session_scope() as s:
            run = s.get(TrainingRun, run_id)
            run.config = {**run.config, "result": result}
            fb.finish_training_run(s, run_id, "succeeded", produced_version_id=result.get("produced_version_id"))
        return True


def list_jobs(limit: int = 20) -> list[TrainingRun]:
    with session_scope(write=False) as s:
        return list(s.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)))


def read_log(run: TrainingRun, tail_chars: int = 6000) -> str:
    if not run.log_path or not Path(run.log_path).exists():
        return "(no log yet)"
    text = Path(run.log_path).read_text(errors="replace")
    return text[-tail_chars:]
