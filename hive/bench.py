"""Speed benchmarks that time a reference and ours in the same process, on the same weights,
inputs, seeds and settings, and check that the outputs agree."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from hive import toy
from hive.editor import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, Editor
from hive.files import write_json_atomic

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def record(kind: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    dev = "gpu" if torch.cuda.is_available() else "cpu"
    path = RESULTS_DIR / f"{kind}-{dev}-{stamp}-{result['commit']}.json"
    write_json_atomic(path, result)
    return path


def bench_edit(model: str | None = None, variants: int = 4, steps: int | None = None, repeats: int = 5,
               record_result: bool = True) -> dict:
    """K variants of one toy edit: a plain diffusers pipeline call vs our editor."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from hive.editor import DEFAULT_STEPS

    steps = steps or DEFAULT_STEPS
    editor = Editor(model)
    device = editor.device
    ex = toy.sample_example(123)
    image = ex.input_image.resize((editor.resolution, editor.resolution))
    instruction = ex.edit.instruction
    seeds = list(range(variants))

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    reference = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        editor.model, dtype=dtype, safety_checker=None, requires_safety_checker=False).to(device)
    reference.set_progress_bar_config(disable=True)

    def run_reference():
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return reference(editor.prompt_for(instruction), image=image, num_inference_steps=steps,
                         num_images_per_prompt=variants, guidance_scale=DEFAULT_GUIDANCE,
                         image_guidance_scale=DEFAULT_IMAGE_GUIDANCE, generator=gens, output_type="np").images

    def run_ours():
        return editor.edit(image, instruction, variants=variants, seed=0, steps=steps)

    t_compile = time.perf_counter()
    ours_first = run_ours()
    first_call_s = time.perf_counter() - t_compile
    reference_s = median_time(run_reference, repeats)
    ours_s = median_time(run_ours, repeats)
    ref_images = run_reference()
    ours_images = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in ours_first.images])
    max_diff = float(np.abs(ref_images - ours_images).max())
    result = {
        "benchmark": "edit", "device": device_name(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "model": editor.model, "resolution": editor.resolution, "variants": variants, "steps": steps,
        "threads": torch.get_num_threads(), "reference_s": round(reference_s, 4), "ours_s": round(ours_s, 4),
        "speedup": round(reference_s / ours_s, 3), "ours_first_call_s": round(first_call_s, 3),
        "max_abs_pixel_diff": round(max_diff, 5), "outputs_agree": bool(max_diff <= 2 / 255 + 1e-6),
    }
    if record_result:
        result["recorded"] = str(record("edit", result))
    return result
