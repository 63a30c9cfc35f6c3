"""Speed benchmarks: a reference and ours in the same process, on the same weights, inputs, seeds
and settings, timed interleaved (reference, ours, reference, ours, ...) so that a machine whose
load changes during the run slows both alike; the outputs are checked against each other.

`bench_edit`: K variants of one edit. Reference: the plain diffusers
StableDiffusionInstructPix2PixPipeline call (one prompt, num_images_per_prompt=K). Ours: the
editor (`Editor.edit`, which samples through hive.fastpath.FastSampler).
`bench_train`: one SFT training step of the UNet. Reference: the step of diffusers'
train_instruct_pix2pix example (AdamW, bf16 autocast on GPUs). Ours: the trainer's fast path
(fused AdamW, channels-last, torch.compile where it pays).

Configurations: "toy" (the toy zoo, or --model), "sd15" (SD-1.5-shaped random weights: 860M-param
UNet with 8 input channels, SD's VAE, a CLIP ViT-L text tower; speed does not depend on weight
values), "sd15-tiny" (the same layout, tiny widths: for tests).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hive import toy
from hive.editor import Editor
from hive.fastpath import FastOptions, matmul_peak_tflops, unet_flops
from hive.files import write_json_atomic

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
CONFIGS = ("toy", "sd15", "sd15-tiny")


# ---------------------------------------------------------------- where and when
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


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                          check=True).stdout.strip()


def git_commit() -> str:
    try:
        return _git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the figures may then not be the commit's)."""
    try:
        return bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    return {"device": device_name(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "dirty": git_dirty(), "threads": torch.get_num_threads(), "load_avg_start": load_average()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Time each function `repeats` times, round-robin; median wall and process-CPU seconds each.
    CPU seconds tell what a call costs on a busy machine (they do not count waiting for a core)."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            c, t = time.process_time(), time.perf_counter()
            fn()
            _sync()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: {"wall": float(np.median(wall[k])), "cpu": float(np.median(cpu[k])),
                "wall_min": float(min(wall[k])), "wall_all": [round(x, 4) for x in wall[k]]} for k in fns}


def timed_once(fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t


def peak_memory_gib(reset: bool = False) -> float | None:
    """Peak CUDA memory since the last reset; None on the CPU (see peak_rss_gib)."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def record(kind: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    dev = "gpu" if torch.cuda.is_available() else "cpu"
    label = f"-{result['config']}" if result.get("config", "toy") != "toy" else ""
    path = RESULTS_DIR / f"{kind}{label}-{dev}-{stamp}-{result['commit']}.json"
    n = 2
    while path.exists():  # keep every recorded run
        path = path.with_name(f"{kind}{label}-{dev}-{stamp}-{result['commit']}-{n}.json")
        n += 1
    write_json_atomic(path, result)
    return path


def _cpu_time_rates(device: torch.device, tflop: float, times: dict) -> dict:
    """On the CPU, rates per second of process CPU time as well: on a machine shared with other
    jobs, wall time counts the waiting for a core, CPU time does not."""
    if device.type != "cpu":
        return {}
    peak = matmul_peak_tflops(device, clock="cpu")
    out = {"matmul_peak_tflops_per_cpu_s": round(peak, 4)}
    for who in ("reference", "ours"):
        rate = tflop / max(times[who]["cpu"], 1e-9)
        out[f"{who}_tflops_per_cpu_s"] = round(rate, 4)
        out[f"{who}_share_of_peak_cpu_time"] = round(rate / peak, 4)
    return out


# ---------------------------------------------------------------- models of each configuration
def sd15_pipeline(device: torch.device, dtype: torch.dtype, tiny: bool = False, seed: int = 0):
    """A StableDiffusionInstructPix2PixPipeline with SD-1.5's shapes and random weights (built on
    `device` directly, no download): the 8-channel UNet, SD's VAE, a CLIP ViT-L/14 text tower
    with 77 positions, and the toy tokenizer (speed does not depend on the words)."""
    from diffusers import AutoencoderKL, StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from hive.tokenizer import write_tokenizer
    from hive.zoo import sd15_unet, toy_scheduler

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(Path(tmp) / "tokenizer"), model_max_length=77)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = sd15_unet(in_channels=8, tiny=tiny)
        if tiny:
            vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                                norm_num_groups=4, sample_size=64)
            text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=77)
        else:
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                                sample_size=512)
            text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77)
        text.bos_token_id, text.eos_token_id, text.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                   tokenizer.eos_token_id)
        text_encoder = CLIPTextModel(text)
    pipe = StableDiffusionInstructPix2PixPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                  scheduler=toy_scheduler(), safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device, dtype)


def load_pipeline(config: str, model: str | None, device: torch.device, dtype: torch.dtype):
    """(pipeline, its name) of a benchmark configuration; each call builds a fresh, identical copy."""
    if config not in CONFIGS:
        raise ValueError(f"unknown benchmark config {config!r}; one of {', '.join(CONFIGS)}")
    if config == "toy":
        from diffusers import StableDiffusionInstructPix2PixPipeline

        from hive.editor import default_model

        name = str(model or default_model())
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            name, dtype=dtype, safety_checker=None, requires_safety_checker=False).to(device)
        return pipe, name
    return sd15_pipeline(device, dtype, tiny=config == "sd15-tiny"), f"random {config}"


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------- edit
def bench_edit(model: str | None = None, variants: int = 4, steps: int | None = None, repeats: int = 5,
               record_result: bool = True, config: str = "toy", fast_options: FastOptions | None = None,
               threads: int | None = None, check_fp32: bool | None = None) -> dict:
    """K variants of one edit: the plain diffusers pipeline call vs our editor, interleaved.

    Agreement: fp32 outputs must agree within 2/255 per pixel; half-precision ones within twice
    what half precision itself moves the reference (an fp32 reference run, `check_fp32`)."""
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device)
    env = environment()
    peak_memory_gib(reset=True)
    reference, name = load_pipeline(config, model, device, dtype)
    reference.set_progress_bar_config(disable=True)
    options = fast_options or FastOptions.for_device(device)
    ours_pipe, _ = load_pipeline(config, model, device, dtype)
    load_mem = peak_memory_gib()
    # setting up the fast path: loading (or, if asked and missing, building) the compiled UNet package
    setup_cpu = time.process_time()
    editor, setup_s = timed_once(lambda: Editor(name, device=device, dtype=dtype, fast=True, fast_options=options,
                                                pipe=ours_pipe))
    setup_cpu = time.process_time() - setup_cpu
    # the model's default settings (hive.json `sampling`), for both calls: what a visitor gets
    steps, guidance, image_guidance = editor.settings(steps or None)
    # the pixel comparison is like for like (the pipeline has no local blend); the model's local
    # blend, if it has one, is timed as a third call in the same interleaved run
    blend_threshold = editor.mask_threshold
    res = editor.resolution
    ex = toy.sample_example(123)
    image = ex.input_image.resize((res, res))
    prompt = editor.prompt_for(ex.edit.instruction)
    seeds = list(range(variants))

    def run_reference(output_type: str = "pil", pipe=reference):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return pipe(prompt, image=image, num_inference_steps=steps, num_images_per_prompt=variants,
                    guidance_scale=guidance, image_guidance_scale=image_guidance, generator=gens,
                    output_type=output_type).images

    def run_ours(mask_threshold: float = 0.0):
        return editor.edit(image, ex.edit.instruction, variants=variants, seed=0, steps=steps, guidance=guidance,
                           image_guidance=image_guidance, mask_threshold=mask_threshold)

    peak_memory_gib(reset=True)
    ours_first, first_call_s = timed_once(run_ours)  # includes compiling (or loading it from the cache)
    ours_mem = peak_memory_gib(reset=True)
    ref_np, ref_first_s = timed_once(lambda: run_reference("np"))
    ref_mem = peak_memory_gib(reset=True)

    calls = {"reference": run_reference, "ours": run_ours}
    if blend_threshold > 0:
        run_ours(blend_threshold)  # untimed first call, as for the other two
        calls["ours_blend"] = lambda: run_ours(blend_threshold)
    times = interleaved(calls, repeats)
    ours_np = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in ours_first.images])
    diff = np.abs(ref_np - ours_np)
    result = {"benchmark": "edit", "config": config, **env, "model": name, "dtype": str(dtype).replace("torch.", ""),
              "resolution": res, "variants": variants, "steps": steps, "guidance": guidance,
              "image_guidance": image_guidance, "repeats": repeats,
              "fast_options": asdict(options),
              "reference_s": round(times["reference"]["wall"], 4), "ours_s": round(times["ours"]["wall"], 4),
              "speedup": round(times["reference"]["wall"] / times["ours"]["wall"], 3),
              "reference_cpu_s": round(times["reference"]["cpu"], 4), "ours_cpu_s": round(times["ours"]["cpu"], 4),
              "cpu_speedup": round(times["reference"]["cpu"] / max(times["ours"]["cpu"], 1e-9), 3),
              "reference_all_s": times["reference"]["wall_all"], "ours_all_s": times["ours"]["wall_all"],
              "reference_first_call_s": round(ref_first_s, 3), "ours_first_call_s": round(first_call_s, 3),
              "ours_setup_s": round(setup_s, 3), "ours_setup_cpu_s": round(setup_cpu, 3),
              "ours_uses_package": editor.fast.packaged is not None,
              "max_abs_pixel_diff": round(float(diff.max()), 5), "mean_abs_pixel_diff": round(float(diff.mean()), 6),
              "mask_threshold": blend_threshold}
    if "ours_blend" in times:
        result["ours_blend_s"] = round(times["ours_blend"]["wall"], 4)
        result["ours_blend_cpu_s"] = round(times["ours_blend"]["cpu"], 4)
        result["ours_blend_all_s"] = times["ours_blend"]["wall_all"]
    tolerance = 2 / 255 + 1e-6
    if dtype != torch.float32 and (check_fp32 or check_fp32 is None):
        fp32, _ = load_pipeline(config, model, device, torch.float32)
        fp32.set_progress_bar_config(disable=True)
        ref32 = run_reference("np", pipe=fp32)
        floor = float(np.abs(ref_np - ref32).max())
        result["reference_vs_fp32_max_abs_pixel_diff"] = round(floor, 5)
        result["ours_vs_fp32_max_abs_pixel_diff"] = round(float(np.abs(ours_np - ref32).max()), 5)
        tolerance = max(tolerance, 2 * floor)
        del fp32
    result["agreement_tolerance"] = round(tolerance, 5)
    result["outputs_agree"] = bool(diff.max() <= tolerance)
    # arithmetic: the UNet's FLOPs per call against the chip's measured matrix rate
    latent_hw = tuple(int(s) // editor.pipe.vae_scale_factor for s in (res, res))
    cfg = guidance > 1.0 and image_guidance >= 1.0
    per_eval = unet_flops(reference.unet, (3 if cfg else 1) * variants, latent_hw, reference.tokenizer.model_max_length,
                          reference.text_encoder.config.hidden_size)
    peak = matmul_peak_tflops(device)
    call_tflop = per_eval * steps / 1e12
    result.update({
        "unet_gflop_per_eval": round(per_eval / 1e9, 2), "unet_tflop_per_call": round(call_tflop, 4),
        "reference_unet_tflops": round(call_tflop / times["reference"]["wall"], 4),
        "ours_unet_tflops": round(call_tflop / times["ours"]["wall"], 4),
        "matmul_peak_tflops": round(peak, 3),
        "ours_share_of_peak": round(call_tflop / times["ours"]["wall"] / peak, 4),
        "reference_share_of_peak": round(call_tflop / times["reference"]["wall"] / peak, 4),
        "peak_mem_GiB": {"loading_both": load_mem, "ours_first_call": ours_mem, "reference_call": ref_mem},
        **_cpu_time_rates(device, call_tflop, times),
        "peak_rss_GiB": peak_rss_gib(), "load_avg_end": load_average(),
    })
    if record_result:
        result["recorded"] = str(record("edit", result))
    return result


# ---------------------------------------------------------------- train
def train_shapes(config: str, model: str | None, batch: int, resolution: int | None) -> dict:
    """The UNet and the input shapes of one SFT step of a configuration."""
    from diffusers import UNet2DConditionModel

    if config == "toy":
        from hive.editor import default_model

        path = Path(model or default_model())
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=torch.float32)
        import json

        vae_cfg = json.loads((path / "vae" / "config.json").read_text())
        te_cfg = json.loads((path / "text_encoder" / "config.json").read_text())
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        res = resolution or int(unet.config.sample_size * factor)
        return {"unet": unet, "latent": res // factor, "latent_channels": vae_cfg["latent_channels"],
                "text_len": te_cfg["max_position_embeddings"], "text_dim": te_cfg["hidden_size"], "resolution": res,
                "name": str(path)}
    if config not in CONFIGS:
        raise ValueError(f"unknown benchmark config {config!r}; one of {', '.join(CONFIGS)}")
    from hive.zoo import sd15_unet

    tiny = config == "sd15-tiny"
    res = resolution or (64 if tiny else 256)  # diffusers' InstructPix2Pix example trains at 256 px
    return {"unet": sd15_unet(in_channels=8, tiny=tiny), "latent": res // 8, "latent_channels": 4, "text_len": 77,
            "text_dim": 32 if tiny else 768, "resolution": res, "name": f"random {config}"}


def bench_train(model: str | None = None, config: str = "toy", batch: int = 32, resolution: int | None = None,
                repeats: int = 5, record_result: bool = True, compile: bool | None = None,
                channels_last: bool | None = None, compile_mode: str | None = None, threads: int | None = None) -> dict:
    """One SFT step of the UNet (forward, loss, backward, optimizer step): the step of diffusers'
    train_instruct_pix2pix (AdamW, bf16 autocast on GPUs) vs ours (fused AdamW, channels-last,
    torch.compile; defaults: all on a GPU, fused AdamW alone on the CPU), same weights and inputs."""
    import copy

    import torch.nn.functional as F

    from hive.fastpath import adamw, prepare_unet_for_training

    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    compile = on_gpu if compile is None else compile
    channels_last = on_gpu if channels_last is None else channels_last
    env = environment()
    torch.manual_seed(0)
    shapes = train_shapes(config, model, batch, resolution)
    ref_unet = shapes["unet"].to(device).train()
    ours_unet = copy.deepcopy(ref_unet)
    g = torch.Generator(device).manual_seed(0)
    lat, ch = shapes["latent"], shapes["latent_channels"]
    x = torch.randn(batch, ref_unet.config.in_channels, lat, lat, device=device, generator=g)
    e = torch.randn(batch, shapes["text_len"], shapes["text_dim"], device=device, generator=g)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    target = torch.randn(batch, ch, lat, lat, device=device, generator=g)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu)

    ref_opt = torch.optim.AdamW(ref_unet.parameters(), lr=1e-5)
    ours_fn = prepare_unet_for_training(ours_unet, channels_last=channels_last, compile=compile,
                                        compile_mode=compile_mode)
    ours_opt = adamw(ours_unet.parameters(), lr=1e-5, weight_decay=1e-2, fused=True)
    ours_x = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def step(fn, opt, inp) -> torch.Tensor:
        with torch.autocast(**autocast):
            loss = F.mse_loss(fn(inp, t, e, return_dict=False)[0].float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    # agreement: the first step's loss from the same weights and inputs
    peak_memory_gib(reset=True)
    ours_loss, ours_first_s = timed_once(lambda: step(ours_fn, ours_opt, ours_x))
    ours_mem = peak_memory_gib(reset=True)
    ref_loss, ref_first_s = timed_once(lambda: step(ref_unet, ref_opt, x))
    ref_mem = peak_memory_gib(reset=True)
    rel = abs(float(ours_loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-12)
    times = interleaved({"reference": lambda: step(ref_unet, ref_opt, x),
                         "ours": lambda: step(ours_fn, ours_opt, ours_x)}, repeats)
    # arithmetic of one step (forward + backward), counted on a copy
    from torch.utils.flop_counter import FlopCounterMode

    counter_unet = copy.deepcopy(ref_unet)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(**autocast):
            F.mse_loss(counter_unet(x, t, e, return_dict=False)[0].float(), target).backward()
    del counter_unet
    step_tflop = counter.get_total_flops() / 1e12
    peak = matmul_peak_tflops(device)
    ref_s, ours_s = times["reference"]["wall"], times["ours"]["wall"]
    result = {
        "benchmark": "train", "config": config, **env, "model": shapes["name"], "batch": batch,
        "resolution": shapes["resolution"], "latent": [ch, lat, lat], "repeats": repeats,
        "autocast": "bf16" if on_gpu else "none",
        "ours_options": {"fused_adamw": True, "channels_last": channels_last, "compile": compile,
                         "compile_mode": compile_mode},
        "reference_s": round(ref_s, 4), "ours_s": round(ours_s, 4), "speedup": round(ref_s / ours_s, 3),
        "reference_samples_per_s": round(batch / ref_s, 2), "ours_samples_per_s": round(batch / ours_s, 2),
        "reference_cpu_s": round(times["reference"]["cpu"], 4), "ours_cpu_s": round(times["ours"]["cpu"], 4),
        "reference_all_s": times["reference"]["wall_all"], "ours_all_s": times["ours"]["wall_all"],
        "reference_first_step_s": round(ref_first_s, 3), "ours_first_step_s": round(ours_first_s, 3),
        "first_loss_reference": float(ref_loss), "first_loss_ours": float(ours_loss),
        "first_loss_rel_diff": round(rel, 6), "losses_agree": bool(rel <= (2e-2 if on_gpu else 1e-4)),
        "tflop_per_step": round(step_tflop, 4), "reference_tflops": round(step_tflop / ref_s, 4),
        "ours_tflops": round(step_tflop / ours_s, 4), "matmul_peak_tflops": round(peak, 3),
        "ours_share_of_peak": round(step_tflop / ours_s / peak, 4),
        "reference_share_of_peak": round(step_tflop / ref_s / peak, 4),
        "peak_mem_GiB": {"ours_first_step": ours_mem, "reference_first_step": ref_mem},
        **_cpu_time_rates(device, step_tflop, times),
        "peak_rss_GiB": peak_rss_gib(), "load_avg_end": load_average(),
    }
    if record_result:
        result["recorded"] = str(record("train", result))
    return result
