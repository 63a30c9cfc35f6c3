"""What every trainer shares: accelerate setup, checkpoints that resume, a loss log.

A checkpoint is `accelerator.save_state` into `OUT/checkpoints/step-N`, written to a temporary
folder first and renamed, so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm


def make_accelerator(mixed_precision: str = "no", seed: int = 0) -> Accelerator:
    from accelerate.utils import set_seed

    set_seed(seed)
    return Accelerator(mixed_precision=mixed_precision)


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.exists():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def cooldown(step: int, steps: int, decay_steps: int) -> float:
    """Learning-rate factor: 1, then falling linearly to 0 over the last `decay_steps` of `steps`
    (0: always 1). A function of the step alone, so a resumed or re-planned run follows it."""
    if decay_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, (steps - step) / decay_steps))


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int = 2) -> Path:
    """Save the full training state (models, optimizer, RNG) at `step`; keep the last `keep`."""
    root = out / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_latest(accelerator: Accelerator, out: Path) -> int:
    """Load the newest checkpoint under `out` if there is one; return the step to start from."""
    dirs = checkpoint_dirs(out)
    if not dirs:
        return 0
    accelerator.load_state(str(dirs[-1]))
    return int(json.loads((dirs[-1] / "step.json").read_text())["step"])


def resume_with_progress(accelerator: Accelerator, out: Path, steps: int, desc: str) -> tuple[tqdm, "LossLog"]:
    """Resume from the newest checkpoint and return the progress bar over the remaining steps
    (iterate it for the step numbers) and the run's loss log."""
    start = resume_latest(accelerator, out)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc,
               disable=not accelerator.is_local_main_process)
    return bar, LossLog(out, accelerator.is_main_process)


class LossLog:
    """Appends one JSON line per logged step to OUT/loss.jsonl (survives resume)."""

    def __init__(self, out: Path, enabled: bool = True):
        self.path = out / "loss.jsonl"
        self.enabled = enabled
        self.start = time.time()
        out.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time_s": round(time.time() - self.start, 2), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
