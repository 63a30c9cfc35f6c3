"""Supervised InstructPix2Pix training (the "SFT trainer").

Follows diffusers' train_instruct_pix2pix.py: frozen VAE and text encoder; the UNet sees the
noisy target latent concatenated with the (unscaled) source latent; conditioning dropout drops
the text alone, the image alone, or both, 5% each, so sampling can use two guidance scales.
Extras: min-SNR loss weighting (faster convergence), optional per-example loss weights (used by
the weighted-reward fine-tuning), EMA, checkpoints with exact resume.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionInstructPix2PixPipeline,
                       UNet2DConditionModel)
from diffusers.training_utils import EMAModel, compute_snr
from transformers import CLIPTextModel, CLIPTokenizer

from hive.data import TripletBatch, TripletSource
from hive.fastpath import prepare_unet_for_training, step_loader
from hive.training import cooldown, make_accelerator, resume_with_progress, save_checkpoint

DROP_PROB = 0.05


@dataclass
class SFTConfig:
    steps: int = 4000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 200
    # > 0: the learning rate falls linearly to 0 over the last decay_steps of `steps` (a
    # warmup-stable-decay schedule): a long run at a constant rate can be continued, then cooled down.
    decay_steps: int = 0
    min_snr_gamma: float | None = 5.0
    ema_decay: float | None = 0.999
    checkpoint_every: int = 250
    mixed_precision: str = "no"
    seed: int = 0
    gradient_checkpointing: bool = False
    # > 0: latent pixels where source and target differ count 1 + change_weight times in the loss.
    # On the toy world an edit changes a few percent of the image; unweighted, the UNet spends most
    # of its early training learning to copy the source. 0 (off) is diffusers' loss.
    change_weight: float = 0.0
    # > 0: draw more high-noise timesteps (t = T * u ** (1 / (1 + bias))); there the edit must be
    # read from the source and the instruction, as the noisy latent holds (almost) nothing.
    high_noise_bias: float = 0.0
    # > 0: add this weight times a loss in pixels: the VAE decoder (frozen) draws the UNet's estimate
    # of the clean latent, compared with the target image where the edit changed it (squared error,
    # weighted by the signal share alpha_bar_t, so the noisiest steps, whose estimates must be
    # blurry, count little). Why: the latent MSE charges a shrunk toy object drawn one pixel too
    # large all around almost nothing, the judge a third of the edit. Off by default: on the toy
    # editor it fixed shrinks but drew every outline smaller, adds and grows too, with squared and
    # absolute errors alike and at low noise only (docs/toy-zoo-training.md, session 23).
    pixel_loss_weight: float = 0.0
    # the pixel loss counts only at timesteps whose signal share alpha_bar_t is at least this (0: all),
    # where the estimate of the clean image is nearly decided
    pixel_loss_min_signal: float = 0.0
    # the cross-attention layers (attn2: where the UNet reads the text) learn this many times faster
    # than the rest. The toy text encoder has no layers, so the one quality word of a condition-reward
    # suffix reaches the UNet only at its own position, with ~1% of the attention: at scale 1 a
    # 2,000-step condition fine-tune does not learn it, at 10 it does (in the loss; docs/paper.md).
    cross_attention_lr_scale: float = 1.0
    # > 0: this many transformer layers are added on top of the frozen text encoder and trained with
    # the UNet. They start as the identity (attention and MLP output projections zeroed), so the
    # model's outputs are the base's until they learn. Why: the toy text encoder has no layers, so a
    # word reaches the UNet only at its own position; a causal layer can carry the quality word of a
    # condition-reward suffix into the padding positions after it, as SD's CLIP layers do.
    text_layers: int = 0
    # fast path (hive.fastpath; `python -m hive bench train` measures it): with mixed_precision
    # "bf16" on a GPU, fused AdamW, channels-last weights and torch.compile of the UNet pay;
    # DataLoader workers build the next batches while the current one trains.
    channels_last: bool = False
    compile: bool = False
    fused_optimizer: bool | None = None  # None: fused on CUDA
    dataloader_workers: int = 0
    pin_memory: bool | None = None  # None: when training on CUDA
    # stop after this many minutes of training (checkpoint, then the pipeline as usual); run the
    # same command again to continue. For leases of fixed length (a GPU lent for minutes).
    max_minutes: float | None = None


def lr_factor(step: int, config: SFTConfig) -> float:
    """Linear warmup, constant, then (with decay_steps) linear cooldown to 0 at `steps`."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    return min(warm, cooldown(step, config.steps, config.decay_steps))


def expand_conv_in(unet: UNet2DConditionModel, in_channels: int | None = None) -> UNet2DConditionModel:
    """Give a text-to-image UNet the extra source-latent input channels (default: as many as it has
    latent channels), zero-initialised, as InstructPix2Pix does: at step 0 the model is exactly the
    text-to-image model. An editing UNet is returned as it is."""
    old = unet.conv_in
    in_channels = in_channels if in_channels is not None else 2 * unet.config.out_channels
    if old.in_channels == in_channels:
        return unet
    if old.in_channels > in_channels:
        raise ValueError(f"the UNet already takes {old.in_channels} input channels, more than {in_channels}")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def add_text_layers(text_encoder: CLIPTextModel, n: int) -> CLIPTextModel:
    """`text_encoder` with `n` more transformer layers on top that start as the identity: CLIP's
    layers are pre-norm residual blocks, so zeroed output projections add nothing until trained."""
    config = copy.deepcopy(text_encoder.config)
    config.num_hidden_layers += n
    grown = CLIPTextModel(config)
    missing, unexpected = grown.load_state_dict(text_encoder.state_dict(), strict=False)
    first_new = config.num_hidden_layers - n
    new_keys = tuple(f"encoder.layers.{i}." for i in range(first_new, config.num_hidden_layers))
    if unexpected or any(not any(key in k for key in new_keys) for k in missing):
        raise ValueError(f"cannot grow this text encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for layer in grown.encoder.layers[first_new:]:
        for proj in (layer.self_attn.out_proj, layer.mlp.fc2):
            torch.nn.init.zeros_(proj.weight)
            torch.nn.init.zeros_(proj.bias)
    return grown.to(text_encoder.dtype)


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str],
                   device: torch.device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def sft_loss(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
             tokenizer: CLIPTokenizer, noise_scheduler: DDPMScheduler, batch: TripletBatch,
             generator: torch.Generator, min_snr_gamma: float | None,
             weights: torch.Tensor | None = None, null_text: torch.Tensor | None = None,
             change_weight: float = 0.0, high_noise_bias: float = 0.0,
             pixel_loss_weight: float = 0.0, pixel_loss_min_signal: float = 0.0) -> torch.Tensor:
    """The InstructPix2Pix denoising loss of one batch (mean over examples). `null_text`, the
    embedding of the empty prompt, can be passed in so a training loop computes it once (not when
    the text encoder trains). The text is encoded with gradients: a frozen encoder builds no graph."""
    device = batch.source.device
    bsz = batch.source.shape[0]
    with torch.no_grad():
        # mode(), not sample(): our VAE is a deterministic autoencoder (see hive.train_vae); for SD's
        # VAE the two differ by noise of std ~1e-3.
        target_latents = vae.encode(batch.edited).latent_dist.mode() * vae.config.scaling_factor
        source_latents = vae.encode(batch.source).latent_dist.mode()
    if null_text is None:  # the batch's prompts and the empty one in one pass through the encoder
        both = encode_prompts(tokenizer, text_encoder, [*batch.prompts, ""], device)
        text, null_text = both[:-1], both[-1:]
    else:
        text = encode_prompts(tokenizer, text_encoder, batch.prompts, device)
    noise = torch.randn(target_latents.shape, generator=generator, device=device)
    num_t = noise_scheduler.config.num_train_timesteps
    if high_noise_bias > 0:
        u = torch.rand(bsz, generator=generator, device=device)
        timesteps = (num_t * u ** (1.0 / (1.0 + high_noise_bias))).long().clamp(max=num_t - 1)
    else:
        timesteps = torch.randint(0, num_t, (bsz,), generator=generator, device=device)
    noisy = noise_scheduler.add_noise(target_latents, noise, timesteps)
    # conditioning dropout: p<.05 text only, .05-.10 both, .10-.15 image only
    p = torch.rand(bsz, generator=generator, device=device)
    drop_text = (p < 2 * DROP_PROB).view(bsz, 1, 1)
    keep_image = ~((p >= DROP_PROB) & (p < 3 * DROP_PROB))
    text = torch.where(drop_text, null_text.expand_as(text), text)
    source_latents = source_latents * keep_image.view(bsz, 1, 1, 1).to(source_latents.dtype)
    pred = unet(torch.cat([noisy, source_latents], dim=1), timesteps, text).sample
    target = training_target(noise_scheduler, target_latents, noise, timesteps)
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if change_weight > 0:
        per_example = (err * change_map(batch, err.shape[-2:], change_weight)).mean(dim=(1, 2, 3))
    else:
        per_example = err.mean(dim=(1, 2, 3))
    if pixel_loss_weight > 0:
        per_example = per_example + pixel_loss_weight * pixel_loss(vae, noise_scheduler, batch, noisy, pred, timesteps,
                                                                 pixel_loss_min_signal)
    if min_snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            w = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)  # the same weighting, in v-space
        else:  # min(snr, gamma) / snr, written so a zero-terminal-SNR step (snr = 0) gets weight 1
            w = torch.where(snr > min_snr_gamma, min_snr_gamma / snr.clamp(min=1e-12), torch.ones_like(snr))
        per_example = per_example * w
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean()


def pixel_loss(vae: AutoencoderKL, noise_scheduler: DDPMScheduler, batch: TripletBatch, noisy: torch.Tensor,
               pred: torch.Tensor, timesteps: torch.Tensor, min_signal: float = 0.0) -> torch.Tensor:
    """(B,) the mean squared distance, over the pixels the edit changes (and their neighbours),
    between the target image and the decoded clean-latent estimate of the UNet's prediction, times
    alpha_bar_t (0 where alpha_bar_t < `min_signal`).
    The decoder's weights are not trained (the optimizer does not hold them); gradients flow
    through it to the UNet."""
    alphas = noise_scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps].view(-1, 1, 1, 1)
    if noise_scheduler.config.prediction_type == "v_prediction":
        x0 = alphas.sqrt() * noisy.float() - (1 - alphas).sqrt() * pred.float()
    else:
        x0 = (noisy.float() - (1 - alphas).sqrt() * pred.float()) / alphas.sqrt().clamp_min(1e-3)
    decoded = vae.decode(x0 / vae.config.scaling_factor).sample.float()  # the batch's size: its latents' decode
    region = F.max_pool2d(changed_pixels(batch), kernel_size=5, stride=1, padding=2)  # the change and 2 px around it
    err = ((decoded - batch.edited.float()).pow(2).mean(dim=1, keepdim=True) * region).sum(dim=(1, 2, 3))
    alphas = alphas.view(-1)
    return alphas * (alphas >= min_signal) * err / region.sum(dim=(1, 2, 3)).clamp_min(1.0)


def training_target(noise_scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: v for a v-prediction schedule, else the noise."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def changed_pixels(batch: TripletBatch) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where the edit changed a pixel of the source (any channel by more than
    0.05 of the [-1, 1] range), else 0.0."""
    return ((batch.source - batch.edited).abs().amax(dim=1, keepdim=True) > 0.05).float()


def change_map(batch: TripletBatch, latent_hw: torch.Size, change_weight: float) -> torch.Tensor:
    """(B, 1, h, w) loss weights at latent resolution: 1 + change_weight where the edit changed a
    pixel of the latent cell, normalised to mean 1 per example so the loss scale stays put."""
    changed = F.adaptive_max_pool2d(changed_pixels(batch), tuple(latent_hw))
    w = 1.0 + change_weight * changed
    return w / w.mean(dim=(2, 3), keepdim=True)


def load_components(base: Path | str, unet_init: UNet2DConditionModel | None = None):
    """VAE, text encoder, tokenizer and scheduler config of a pipeline folder (or hub id), and its UNet
    unless `unet_init` is given."""
    f32 = torch.float32
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=f32)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=f32)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    unet = unet_init if unet_init is not None else UNet2DConditionModel.from_pretrained(
        base, subfolder="unet", dtype=f32)
    return vae, text_encoder, tokenizer, noise_scheduler, expand_conv_in(unet)


def train_sft(base: Path | str, data: TripletSource, out: Path, config: SFTConfig,
              unet_init: UNet2DConditionModel | None = None,
              weight_fn: Callable[[TripletBatch], torch.Tensor] | None = None,
              on_checkpoint: Callable[[int, Path], None] | None = None) -> Path:
    """Train the UNet of pipeline `base` on `data`; write the pipeline to OUT/pipeline.

    Resumes from the newest checkpoint in OUT/checkpoints. `weight_fn` gives per-example loss
    weights (weighted-reward fine-tuning)."""
    if config.cross_attention_lr_scale < 0:  # refused before anything is loaded or written
        raise ValueError(f"cross_attention_lr_scale must be >= 0, not {config.cross_attention_lr_scale}")
    if config.text_layers < 0:
        raise ValueError(f"text_layers must be >= 0, not {config.text_layers}")
    accelerator = make_accelerator(config.mixed_precision, config.seed)
    vae, text_encoder, tokenizer, noise_scheduler, unet = load_components(base, unet_init)
    if config.text_layers > 0:
        text_encoder = add_text_layers(text_encoder, config.text_layers)
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    # the added text layers' weights, trained beside the UNet's (none without text_layers)
    text_params = list(text_encoder.encoder.layers[-config.text_layers:].parameters()) if config.text_layers else []
    for param in text_params:
        param.requires_grad_(True)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    groups = [{"params": list(unet.parameters()), "lr": config.lr}]
    if config.cross_attention_lr_scale != 1.0:  # one group otherwise: checkpoints of older runs still resume
        cross = {id(p) for name, p in unet.named_parameters() if ".attn2." in name}
        if not cross:
            raise ValueError("cross_attention_lr_scale is set but this UNet has no cross-attention (attn2) layers")
        groups = [{"params": [p for p in unet.parameters() if id(p) not in cross], "lr": config.lr},
                  {"params": [p for p in unet.parameters() if id(p) in cross],
                   "lr": config.lr * config.cross_attention_lr_scale}]
    if text_params:
        groups.append({"params": text_params, "lr": config.lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.01,
                                  fused=torch.cuda.is_available() if config.fused_optimizer is None
                                  else config.fused_optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    # every trained weight: the UNet's, then the added text layers' (export_checkpoint relies on the order).
    # The same tensors after accelerator.prepare, so the list serves clipping and the EMA at every step
    trained = [*unet.parameters(), *text_params]
    ema = None
    if config.ema_decay is not None:
        ema = EMAModel(trained, decay=config.ema_decay, use_ema_warmup=True,
                       model_cls=UNet2DConditionModel, model_config=unet.config)
        accelerator.register_for_checkpointing(ema)
    unet, optimizer, schedule = accelerator.prepare(unet, optimizer, schedule)
    if text_params:  # a trained module: wrapped for several processes, saved in the checkpoints
        text_encoder = accelerator.prepare(text_encoder)
    device = accelerator.device
    vae.to(device)
    text_encoder.to(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"base": str(base), **asdict(config)}, indent=2))
    bar, log = resume_with_progress(accelerator, out, config.steps, "train editor")
    if ema is not None:  # after resuming: a loaded EMA state comes back on the CPU
        ema.to(device)
    running = None
    null_text = None  # the empty prompt through a training text encoder changes every step
    if not text_params:
        with torch.no_grad():
            null_text = encode_prompts(tokenizer, text_encoder, [""], device)
    # the compiled UNet shares the parameters of `unet`: optimizer, EMA and checkpoints see no difference
    forward_unet = prepare_unet_for_training(unet, compile=config.compile) if config.compile else unet
    pin = config.pin_memory if config.pin_memory is not None else device.type == "cuda"
    batches = step_loader(data, bar.n, config.steps, config.batch_size, config.dataloader_workers, pin)
    started = time.monotonic()
    for step, batch in zip(bar, batches):
        batch = TripletBatch(batch.source.to(device, non_blocking=pin), batch.edited.to(device, non_blocking=pin),
                             batch.prompts, batch.weights)
        generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + step)
        weights = weight_fn(batch) if weight_fn is not None else batch.weights  # a source may carry weights
        weights = weights.to(device) if weights is not None else None
        with accelerator.autocast():
            loss = sft_loss(forward_unet, vae, text_encoder, tokenizer, noise_scheduler, batch, generator,
                            config.min_snr_gamma, weights, null_text, config.change_weight, config.high_noise_bias,
                            config.pixel_loss_weight, config.pixel_loss_min_signal)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trained)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % 25 == 0:
            log.log(step + 1, loss=value, loss_avg=running, lr=schedule.get_last_lr()[0])
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            ckpt = save_checkpoint(accelerator, out, step + 1)
            if on_checkpoint is not None and accelerator.is_main_process:
                on_checkpoint(step + 1, ckpt)
        elif config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes:
            save_checkpoint(accelerator, out, step + 1)
            bar.write(f"time budget of {config.max_minutes} min reached at step {step + 1}; run again to continue")
            break
    accelerator.wait_for_everyone()
    final_unet = accelerator.unwrap_model(unet)
    final_text = accelerator.unwrap_model(text_encoder) if text_params else None
    if ema is not None:
        ema.copy_to(trained)
    if accelerator.is_main_process:
        save_pipeline(base, final_unet, out / "pipeline", final_text)
    return out / "pipeline"


def save_pipeline(base: Path | str, unet: UNet2DConditionModel, dest: Path,
                  text_encoder: CLIPTextModel | None = None) -> Path:
    """Assemble base's VAE, text encoder (or the trained `text_encoder`), tokenizer and scheduler
    with `unet` into a pipeline folder, written beside `dest` and renamed into place."""
    from diffusers import EulerAncestralDiscreteScheduler

    from hive.editor import copy_model_info

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=torch.float32)
    if text_encoder is None:
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    scheduler = EulerAncestralDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder.to(torch.float32), tokenizer=tokenizer, unet=unet.to(torch.float32),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    copy_model_info(base, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest



def export_checkpoint(run: Path, dest: Path, use_ema: bool = True) -> Path:
    """Write the newest checkpoint of a (possibly still running) SFT run as a pipeline folder,
    with the EMA weights when the run keeps them."""
    from safetensors.torch import load_file

    from hive.training import checkpoint_dirs

    config = json.loads((run / "config.json").read_text())
    base, text_layers = config["base"], config.get("text_layers", 0)
    ckpts = checkpoint_dirs(run)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint under {run / 'checkpoints'}")
    unet = expand_conv_in(UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=torch.float32))
    unet.load_state_dict(load_file(ckpts[-1] / "model.safetensors"))
    text_encoder, text_params = None, []
    if text_layers > 0:  # the trained text encoder is the checkpoint's second model
        text_encoder = add_text_layers(CLIPTextModel.from_pretrained(base, subfolder="text_encoder",
                                                                     dtype=torch.float32), text_layers)
        text_encoder.load_state_dict(load_file(ckpts[-1] / "model_1.safetensors"))
        text_params = list(text_encoder.encoder.layers[-text_layers:].parameters())
    ema_file = ckpts[-1] / "custom_checkpoint_0.pkl"
    if use_ema and ema_file.exists():
        shadow = torch.load(ema_file, map_location="cpu", weights_only=False)["shadow_params"]
        with torch.no_grad():
            for param, value in zip([*unet.parameters(), *text_params], shadow, strict=True):
                param.copy_(value)
    return save_pipeline(base, unet, dest, text_encoder)
