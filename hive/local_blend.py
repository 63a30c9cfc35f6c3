"""Local blend: keep the source's own pixels wherever the instruction does not reach.

A small editor redraws the whole picture, so objects the instruction never named come back with
soft, slightly wrong outlines, and the edit fails on pixels it should not have touched (the
toy editor's adds and moves failed almost only on that). The UNet already knows where the edit
is: the instruction changes its prediction (noise or v) there and hardly anywhere else. As in DiffEdit
(Couairon et al. 2022), the source is noised at a few mid-schedule timesteps with a few fixed
noises, the text-conditioned and the text-free predictions (both with the source as the image
condition) are compared, and their difference, summed and normalised by its maximum, is
thresholded into a mask at latent resolution. Each variant is then the edited image inside the
mask and the original source outside it, at the source's full size.

The mask depends on the source and the instruction only (fixed noises), so every variant of one
edit shares it and a variant still reproduces from its seed. The threshold is a per-model
sampling setting (`hive.json` `sampling.mask_threshold`, 0 = off), chosen on validation edits;
docs/toy-zoo-training.md has the measurements.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from hive.fastpath import encode_images, encode_prompts

# Where the mask is read, as fractions of the training schedule (t = 849, 699, 549 of 1000):
# at high noise the instruction's effect is spread over the whole picture, at low noise it
# follows the noise more than the edit.
MASK_TIMESTEP_FRACTIONS = (0.85, 0.70, 0.55)
MASK_NOISES = 6
MASK_NOISE_SEED = 0
MASK_SOURCES_PER_CALL = 8  # a UNet call sees 12 rows per source: bounds memory at SD-1.5 size


@torch.inference_mode()
def instruction_effect(pipe, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
    """(B, h, w) map, per source, of how much prompts[i] moves the UNet's prediction on images[i]
    (mean absolute difference over channels, summed over timesteps and noises), normalised so
    that each map's maximum is 1. Images must be at the model's resolution."""
    if len(images) > MASK_SOURCES_PER_CALL:
        step = MASK_SOURCES_PER_CALL
        return torch.cat([instruction_effect(pipe, images[i:i + step], prompts[i:i + step])
                          for i in range(0, len(images), step)])
    device = pipe._execution_device
    dtype = pipe.unet.dtype
    text, null = encode_prompts(pipe, prompts, device)
    image_latents = encode_images(pipe, images, device)  # the image condition, unscaled
    clean = image_latents * pipe.vae.config.scaling_factor  # the same image in the denoising space
    batch, channels, height, width = clean.shape
    n = MASK_NOISES
    noise = torch.randn((n, channels, height, width), generator=torch.Generator("cpu").manual_seed(MASK_NOISE_SEED))
    noise = noise.to(device=device, dtype=dtype)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    last = len(alphas_cumprod) - 1
    condition = image_latents.repeat_interleave(n, 0)
    text_rows = torch.cat([text.repeat_interleave(n, 0), null.expand(batch * n, -1, -1)])
    effect = torch.zeros(batch, height, width, device=device)
    for fraction in MASK_TIMESTEP_FRACTIONS:
        t = round(last * fraction)
        a = alphas_cumprod[t]
        # x_t = sqrt(a) x_0 + sqrt(1 - a) eps: the UNet's input at t for every scheduler family
        # (Euler's x_0 + sigma eps, scaled by 1 / sqrt(sigma^2 + 1), is the same tensor)
        noisy = (a.sqrt() * clean[:, None] + (1 - a).sqrt() * noise[None]).to(dtype).flatten(0, 1)
        model_input = torch.cat([noisy, condition], dim=1)
        pred = pipe.unet(torch.cat([model_input, model_input]), t, encoder_hidden_states=text_rows,
                         return_dict=False)[0]
        with_text, without_text = pred.float().chunk(2)
        effect += (with_text - without_text).abs().mean(1).view(batch, n, height, width).sum(1)
    return effect / effect.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def instruction_masks(pipe, images: Sequence[Image.Image], prompts: Sequence[str], threshold: float) -> np.ndarray:
    """(B, h, w) boolean masks at latent resolution: where the instruction's effect is above
    `threshold` times its maximum."""
    return (instruction_effect(pipe, images, prompts) > threshold).cpu().numpy()


def composite(source: Image.Image, edited: Image.Image, mask: np.ndarray) -> Image.Image:
    """The edited image inside `mask` (upsampled to the source's size, nearest), the source
    outside it. `source` and `edited` must have the same size."""
    if source.size != edited.size:
        raise ValueError(f"source {source.size} and edited {edited.size} differ in size")
    alpha = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(source.size, Image.Resampling.NEAREST)
    return Image.composite(edited.convert("RGB"), source.convert("RGB"), alpha)
