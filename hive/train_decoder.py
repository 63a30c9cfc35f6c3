"""Fine-tune the VAE decoder on the editor's own final latents.

Why: the toy editor's final latents of a shrink lie within ~5% (squared error) of the clean
target's latents where the edit changes the picture, yet most shrinks fail. The toy decoder was
trained to paint objects ten times as carefully as background (`hive.train_vae.object_weight`),
so wherever a latent is a little off it paints object colour, and a shrunk object comes out one
or two pixels too large. Training the decoder to turn the latents the editor really samples into
the clean targets, with objects weighted about as much as background, removes that pull. The
encoder is frozen and untouched: the latent space, and with it the UNet, stay valid.

Two steps, each resumable: `sample_editor_latents` (the editor's final latents of fresh toy
training edits, in chunks on disk) and `finetune_decoder` (accelerate, checkpoints, loss log).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hive import toy
from hive.files import write_json_atomic
from hive.train_vae import decode_to_uint8, object_weight, to_pixels
from hive.training import cooldown, make_accelerator, resume_with_progress, save_checkpoint

# Toy edits whose sampled latents train the decoder: far from the UNet's training seeds (1e8+),
# validation (8e8+) and evaluation (9e8+).
DECODER_SEED_BASE = 700_000_000
CHUNK = 512  # edits per chunk file: a crash loses at most one chunk of sampling


def _chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:05d}.pt"


def editor_final_latents(editor, examples: list[toy.ToyExample], seeds: list[int]) -> torch.Tensor:
    """The final latents of one variant of each example (variant seed `seeds[i]`), at the editor's
    default settings, divided by the VAE's scaling factor (what the decoder reads), on the CPU. One
    pipeline call; `editor` is a `hive.editor.Editor`."""
    steps, guidance, image_guidance = editor.settings()
    with torch.inference_mode():
        z = editor.pipe(prompt=[editor.prompt_for(e.edit.instruction) for e in examples],
                        image=[e.input_image for e in examples], num_inference_steps=steps,
                        guidance_scale=guidance, image_guidance_scale=image_guidance,
                        generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds],
                        output_type="latent").images
    return z.float().cpu() / editor.pipe.vae.config.scaling_factor


def sample_editor_latents(editor_dir: str | Path, folder: Path, n: int, seed: int = DECODER_SEED_BASE,
                          batch: int = 32, device: str | None = None, max_minutes: float | None = None) -> list[Path]:
    """The final latents (divided by the VAE's scaling factor: what the decoder reads) of `n` toy
    edits, one variant each, sampled at the editor's default settings, beside the edits' seeds,
    kinds and clean targets. Written in chunks of `CHUNK` edits; chunks already on disk are kept,
    so a stopped run resumes. `max_minutes`: stop after the chunk that passes this time (a GPU
    lent for minutes)."""
    from hive.editor import Editor

    folder.mkdir(parents=True, exist_ok=True)
    # fp32 also on a GPU: the decoder learns the latents the editor samples where it is used (CPU, fp32)
    editor = Editor(editor_dir, device=device, dtype=torch.float32, fast=False, mask_threshold=0)
    paths = []
    started = time.time()
    chunks = range(0, n, CHUNK)
    for index in tqdm(chunks, desc="sample latents", unit="chunk"):
        if max_minutes is not None and time.time() - started > 60 * max_minutes:
            break
        path = _chunk_path(folder, index // CHUNK)
        paths.append(path)
        if path.exists():
            continue
        seeds = list(range(seed + index, seed + min(n, index + CHUNK)))
        latents, targets, kinds = [], [], []
        for start in range(0, len(seeds), batch):
            batch_seeds = seeds[start:start + batch]
            examples = [toy.sample_example(s) for s in batch_seeds]
            latents.append(editor_final_latents(editor, examples, batch_seeds).half())
            targets.append(torch.from_numpy(np.stack([np.asarray(e.clean_image) for e in examples])))
            kinds += [e.edit.kind for e in examples]
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"seeds": seeds, "kinds": kinds, "latents": torch.cat(latents), "targets": torch.cat(targets)},
                   tmp)
        tmp.replace(path)
    return paths


def load_latents(folder: Path) -> dict:
    """All chunks of `folder`, concatenated, in seed order."""
    paths = sorted(folder.glob("chunk-*.pt"))
    if not paths:
        raise FileNotFoundError(f"no latent chunks in {folder}: run sample_editor_latents first")
    parts = [torch.load(p) for p in paths]
    return {"seeds": [s for p in parts for s in p["seeds"]], "kinds": [k for p in parts for k in p["kinds"]],
            "latents": torch.cat([p["latents"] for p in parts]), "targets": torch.cat([p["targets"] for p in parts])}


def judge_decoded(vae, data: dict, index: list[int], batch: int = 128) -> dict:
    """Judge success of the decoded latents `index` of `data` (raw outputs: no local blend), per
    kind, and of resizes split into shrinks and grows."""
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(index), batch):
        idx = index[start:start + batch]
        for i, image in zip(idx, decode_to_uint8(vae, data["latents"][idx].float())):
            example = toy.sample_example(data["seeds"][i])
            ok = toy.judge(example.input_image, example.clean_image, image).success
            kind = data["kinds"][i]
            per_kind[kind].append(ok)
            if kind == "resize":
                per_kind["resize: grow" if toy.resize_grows(example.edit) else "resize: shrink"].append(ok)
    every = [ok for kind, oks in per_kind.items() if not kind.startswith("resize:") for ok in oks]
    return {"success": float(np.mean(every)), "n": len(every),
            "per_kind": {k: {"success": float(np.mean(v)), "n": len(v)} for k, v in sorted(per_kind.items())}}


def finetune_decoder(editor_dir: str | Path, latents_dir: Path, out: Path, steps: int = 600, batch_size: int = 64,
                     lr: float = 3e-4, object_boost: float = 1.0, recon_share: float = 0.5, crop: int | None = 8,
                     held_out: int = 500, checkpoint_every: int = 200, seed: int = 0,
                     max_minutes: float | None = None) -> Path:
    """Train the decoder (and post-quant conv) of `editor_dir`'s VAE to decode the sampled latents
    of `latents_dir` into their clean targets; a `recon_share` of each batch are the clean targets'
    own latents (encoder mode), so exact latents still decode exactly. `object_boost`: extra
    weight of object pixels (the toy VAE's own training used 9; 1 keeps the decoder from
    widening objects). `crop`: train on random crops of this many latent cells (None: whole
    images). The last `held_out` edits are not trained on; the decoder's judge success on them,
    before and after, goes into OUT/metrics.json. The model is OUT/model, and OUT/pipeline is the
    editor with it. `max_minutes`: stop early (at that step's weights) when the time is up."""
    from diffusers import AutoencoderKL, StableDiffusionInstructPix2PixPipeline

    from hive.editor import copy_model_info

    data = load_latents(latents_dir)
    n = len(data["seeds"])
    held_out = min(held_out, n // 5)
    n_train = n - held_out
    test_index = list(range(n_train, n))
    accelerator = make_accelerator(seed=seed)
    vae = AutoencoderKL.from_pretrained(Path(editor_dir) / "vae", dtype=torch.float32)
    vae.requires_grad_(False)
    trained = [vae.decoder] + ([vae.post_quant_conv] if vae.post_quant_conv is not None else [])
    for module in trained:
        module.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    before = judge_decoded(vae, data, test_index) if held_out and accelerator.is_main_process else None
    vae.to(accelerator.device)
    with torch.no_grad():  # the frozen encoder's latents of the clean targets, once for every step
        target_latents = torch.cat([vae.encode(to_pixels(data["targets"][i:i + 256]).to(accelerator.device))
                                    .latent_dist.mode().cpu() for i in range(0, n_train, 256)])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    model = accelerator.unwrap_model(vae)
    bar, log = resume_with_progress(accelerator, out, steps, "train decoder")
    n_recon = int(round(batch_size * recon_share))
    started, stopped_at = time.time(), None
    side = data["latents"].shape[-1]
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * cooldown(step, steps, steps)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # batch `step` is the same after a resume
        sampled = torch.randint(0, n_train, (batch_size - n_recon,), generator=g)
        recon = torch.randint(0, n_train, (n_recon,), generator=g)
        x = to_pixels(torch.cat([data["targets"][sampled], data["targets"][recon]])).to(accelerator.device)
        z = torch.cat([data["latents"][sampled].float(), target_latents[recon]]).to(accelerator.device)
        if crop is not None and crop < side:
            oy, ox = (int(v) for v in torch.randint(0, side - crop + 1, (2,), generator=g))
            f = x.shape[-1] // side
            z = z[:, :, oy:oy + crop, ox:ox + crop]
            x = x[:, :, f * oy:f * (oy + crop), f * ox:f * (ox + crop)]
        decoded = model.decode(z).sample
        weight = object_weight(x, object_boost)
        diff = decoded - x
        loss = (weight * (diff.abs() + diff.pow(2))).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 50 == 0:
            log.log(step + 1, loss=loss.item())
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(accelerator, out, step + 1)
        if max_minutes is not None and time.time() - started > 60 * max_minutes:
            stopped_at = step + 1
            break
    model.eval()
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(editor_dir, dtype=torch.float32)
        pipe.vae = model
        pipe.save_pretrained(out / "pipeline")
        copy_model_info(editor_dir, out / "pipeline")
        metrics = {"steps": steps, "stopped_at": stopped_at, "train_edits": n_train, "held_out_edits": held_out,
                   "object_boost": object_boost, "recon_share": recon_share, "crop": crop, "lr": lr,
                   "held_out_judge_before": before,
                   "held_out_judge_after": judge_decoded(model, data, test_index) if held_out else None}
        write_json_atomic(out / "metrics.json", metrics)
    return out / "model"


def summary(metrics_path: Path) -> str:
    """One line per judged decoder: success overall, per kind, shrinks and grows."""
    metrics = json.loads(Path(metrics_path).read_text())
    lines = []
    for key in ("held_out_judge_before", "held_out_judge_after"):
        m = metrics.get(key)
        if m:
            kinds = " ".join(f"{k} {v['success']:.0%}" for k, v in m["per_kind"].items())
            lines.append(f"{key.removeprefix('held_out_judge_')}: {m['success']:.1%} of {m['n']} ({kinds})")
    return "\n".join(lines)
