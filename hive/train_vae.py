"""Train the toy AutoencoderKL on toy scenes (reconstruction + a small KL term).

Trained as a deterministic autoencoder on the posterior mean; the KL term only keeps the latents
bounded. All our code encodes with `latent_dist.mode()`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hive import toy
from hive.training import make_accelerator, resume_with_progress, save_checkpoint
from hive.zoo import TOY_LATENT_CHANNELS, toy_vae


def scene_batch(step: int, batch_size: int, size: int) -> torch.Tensor:
    """Batch `step` of the training stream: sources and clean targets of toy edits, in [-1, 1]."""
    images = []
    for k in range(batch_size // 2):
        ex = toy.sample_example(10_000_000 + step * batch_size + k, size=size)
        images += [np.asarray(ex.input_image), np.asarray(ex.clean_image)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x


def object_weight(x: torch.Tensor, object_boost: float = 9.0) -> torch.Tensor:
    """Per-pixel loss weight: objects (pixels far from the image's median colour, its background)
    count 1 + `object_boost` times. Objects are a few percent of the pixels; unweighted, the
    autoencoder learns backgrounds first and paints objects as blobs for a long time."""
    median = x.flatten(2).median(dim=2).values[:, :, None, None]
    is_object = ((x - median).abs().amax(dim=1, keepdim=True) > 0.1).float()
    return 1.0 + object_boost * is_object


def random_crops(x: torch.Tensor, crop: int, step: int) -> torch.Tensor:
    """One random `crop`-pixel window per image: the autoencoder is fully convolutional, and a
    quarter-size window costs a quarter of the compute while keeping the variety of scenes."""
    g = torch.Generator().manual_seed(step)
    n, _, h, w = x.shape
    ys = torch.randint(0, h - crop + 1, (n,), generator=g)
    xs = torch.randint(0, w - crop + 1, (n,), generator=g)
    return torch.stack([x[i, :, ys[i]:ys[i] + crop, xs[i]:xs[i] + crop] for i in range(n)])


def to_pixels(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3) as the VAE reads them: float (N, 3, H, W) in [-1, 1]."""
    images = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def decode_to_uint8(vae, latents: torch.Tensor) -> np.ndarray:
    """Decode unscaled latents (N, C, h, w) into uint8 RGB images (N, H, W, 3), as the editor's are."""
    with torch.no_grad():
        x = vae.decode(latents.to(vae.device)).sample.clamp(-1, 1)
    return ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def vae_roundtrip(vae, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode (mode) and decode uint8 RGB images (N, H, W, 3), as every edit the editor makes is decoded."""
    out = []
    for start in range(0, len(images), batch_size):
        with torch.no_grad():
            latents = vae.encode(to_pixels(images[start:start + batch_size]).to(vae.device)).latent_dist.mode()
        out.append(decode_to_uint8(vae, latents))
    return np.concatenate(out)


def recon_judge_pass(vae, n: int = 200, seed: int = 950_000_000, size: int = toy.DEFAULT_SIZE) -> float:
    """Share of fresh clean edit targets whose reconstruction the judge accepts as that edit: an
    upper bound on the success of any editor that decodes through this autoencoder."""
    examples = [toy.sample_example(seed + k, size=size) for k in range(n)]
    images = vae_roundtrip(vae, np.stack([np.asarray(e.clean_image) for e in examples]), batch_size=50)
    return sum(toy.judge(e.input_image, e.clean_image, im).success for e, im in zip(examples, images)) / n


def train_vae(out: Path, steps: int = 1200, batch_size: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-6, size: int = toy.DEFAULT_SIZE, crop: int | None = 32,
              checkpoint_every: int = 250, init: Path | None = None, decoder_only: bool = False,
              latent_channels: int = TOY_LATENT_CHANNELS) -> Path:
    """Train (or, with `init`, continue) the toy autoencoder.

    `decoder_only` freezes the encoder: the latent space stays exactly as it is, so an editor
    UNet trained on it stays valid while its outputs get decoded better."""
    from diffusers import AutoencoderKL

    accelerator = make_accelerator()
    vae = AutoencoderKL.from_pretrained(init, dtype=torch.float32) if init is not None else toy_vae(latent_channels)
    if decoder_only:
        if init is None:
            raise ValueError("decoder_only needs an existing autoencoder (init)")
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    bar, log = resume_with_progress(accelerator, out, steps, "train vae")
    model = accelerator.unwrap_model(vae)
    for step in bar:
        x = scene_batch(step, batch_size, size)
        weight = object_weight(x)
        if crop is not None and crop < size:
            x = random_crops(torch.cat([x, weight], 1), crop, step)
            x, weight = x[:, :3], x[:, 3:]
        x, weight = x.to(accelerator.device), weight.to(accelerator.device)
        with torch.set_grad_enabled(not decoder_only):
            posterior = model.encode(x).latent_dist
        # Deterministic autoencoding (the posterior mean): the editor only ever uses `mode()`, and
        # sampling std-1 noise early on teaches the decoder to paint blobs.
        recon = model.decode(posterior.mode()).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean()
        err = weight * ((recon - x).abs() + 0.5 * (recon - x).pow(2))
        loss = err.mean() / weight.mean() + kl_weight * kl
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(l1=f"{l1.item():.4f}")
        if (step + 1) % 50 == 0:
            log.log(step + 1, loss=loss.item(), l1=l1.item(), kl=kl.item())
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(accelerator, out, step + 1)
    model.eval()
    # SD's convention: scale latents to unit variance for the diffusion model.
    with torch.no_grad():
        x = scene_batch(999_999, 64, size)
        latents = model.encode(x).latent_dist.mode()
        if not decoder_only:  # the latents did not change: keep the factor the editor was trained with
            model.register_to_config(scaling_factor=float(1.0 / latents.std()))
        l1 = (model.decode(model.encode(x).latent_dist.mode()).sample.clamp(-1, 1) - x).abs().mean().item() / 2
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
        metrics = {"recon_l1_01": l1, "recon_judge_pass": recon_judge_pass(model), "steps": steps}
        (out / "model" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out / "model"
