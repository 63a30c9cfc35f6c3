"""Configurations of the toy zoo (and SD-1.5-shaped ones for tests), and the pipeline assembly.

The toy zoo is the embedded default: a generated tokenizer, a tiny CLIP, a tiny AutoencoderKL
(64 px -> 16x16x16 latents) and an 8-channel InstructPix2Pix UNet. Each piece is a standard
diffusers/transformers model, so the same code runs on timbrooks/instruct-pix2pix.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from hive.tokenizer import MODEL_MAX_LENGTH

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_EDITOR = MODELS_DIR / "toy-editor"
TOY_CLIP = MODELS_DIR / "toy-clip"
# the toy CLIP trained further on groups of edits (`train clip --edits`): the reward model's backbone
TOY_EDIT_CLIP = MODELS_DIR / "toy-clip-edits"
# the change locator fitted on it with the default settings (hive.change_locator), named by the
# hash of the backbone's weights and the fit's settings; the backbone folder still loads as a CLIPModel
TOY_CHANGE_LOCATOR = TOY_EDIT_CLIP / "change-locator"
TOY_VAE = MODELS_DIR / "toy-vae"
TOY_TOKENIZER = MODELS_DIR / "toy-tokenizer"
TOY_RESOLUTION = 64
# 16 latent channels, not SD's 4: at factor 4 a latent pixel then holds a 4x4x3 patch at 3x
# compression, and a tiny decoder learns flat colours and sharp edges in a few hundred steps on a
# CPU; with 4 channels (12x) its colours stayed off by more than the judge allows (see
# docs/toy-zoo-training.md). Only the UNet's first and last convolutions see the difference.
TOY_LATENT_CHANNELS = 16


def toy_clip_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPConfig:
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=128,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    vision = CLIPVisionConfig(
        image_size=TOY_RESOLUTION, patch_size=8, hidden_size=128, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, projection_dim=128,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=128)


def toy_clip(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPModel:
    return CLIPModel(toy_clip_config(vocab_size, bos_token_id, eos_token_id))


def toy_vae(latent_channels: int = TOY_LATENT_CHANNELS, widths: tuple[int, ...] = (16, 32, 64)) -> AutoencoderKL:
    """Factor-4 autoencoder: three blocks, two downsamplings."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=TOY_RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False,
    )


def toy_unet(cross_attention_dim: int = 128, latent_channels: int = 4) -> UNet2DConditionModel:
    """The toy editor's UNet: 16x16 latents; input = noisy latent + source latent (2x channels)."""
    return UNet2DConditionModel(
        sample_size=TOY_RESOLUTION // 4, in_channels=2 * latent_channels, out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 96, 128), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        # 8 groups (8-16 channels each), not SD's 32: with 2 channels a group, GroupNorm wipes out
        # most of the per-channel mean, and flat colours (a background change) are all mean.
        attention_head_dim=8, norm_num_groups=8,
    )


FINEST_ATTENTION_PLACES = ("down", "up", "both")


def add_finest_attention(unet: UNet2DConditionModel, place: str, cross_only: bool = False) -> UNet2DConditionModel:
    """`unet` with transformer blocks added at its finest level (the first down block, the last up
    block, or both), where the toy UNet has none, keeping every trained weight.

    Why: a shrunk toy object is 2-3 latent cells across, and the toy UNet draws its outline at the
    16x16 level from features that read the instruction only at 8x8 and coarser (resizes were the
    one kind its training could not lift, docs/toy-zoo-training.md). Each new block's output
    projection starts at zero, so the new UNet computes exactly what the old one did until
    training moves it. `cross_only`: the new blocks attend to the instruction only (no 16x16
    self-attention; cheaper on a CPU)."""
    if place not in FINEST_ATTENTION_PLACES:
        raise ValueError(f"place must be one of {FINEST_ATTENTION_PLACES}, not {place!r}")
    at_down, at_up = place in ("down", "both"), place in ("up", "both")
    config = dict(unet.config)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if (at_down and down[0].startswith("CrossAttn")) or (at_up and up[-1].startswith("CrossAttn")):
        raise ValueError(f"the UNet already has attention at its finest level ({place})")
    if at_down:
        down[0] = "CrossAttnDownBlock2D"
    if at_up:
        up[-1] = "CrossAttnUpBlock2D"
    only_cross = config["only_cross_attention"]
    if isinstance(only_cross, bool):
        only_cross = [only_cross] * len(down)
    only_cross = list(only_cross)
    only_cross[0] = cross_only  # diffusers reverses this list for the up blocks: [0] is the last up block too
    config.update(down_block_types=down, up_block_types=up, only_cross_attention=only_cross)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    wider = UNet2DConditionModel.from_config(config)
    if wider.dtype != unet.dtype:
        wider = wider.to(dtype=unet.dtype)
    missing, unexpected = wider.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(".attentions." not in name for name in missing):
        raise RuntimeError(f"weights that do not carry over: missing {missing[:4]}, unexpected {unexpected[:4]}")
    new_blocks = ([wider.down_blocks[0]] if at_down else []) + ([wider.up_blocks[-1]] if at_up else [])
    for block in new_blocks:
        for transformer in block.attentions:
            torch.nn.init.zeros_(transformer.proj_out.weight)
            torch.nn.init.zeros_(transformer.proj_out.bias)
    return wider


def with_finest_attention(pipeline_dir: str | Path, dest: Path, place: str, cross_only: bool = False) -> Path:
    """The pipeline folder with `add_finest_attention` applied to its UNet (everything else as it
    is): the starting point of `train editor --base` for a UNet that attends at 16x16."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    pipe.register_modules(unet=add_finest_attention(pipe.unet, place, cross_only))
    pipe.save_pretrained(dest)
    return dest


def sd15_unet(in_channels: int = 4, tiny: bool = True) -> UNet2DConditionModel:
    """SD-1.5's UNet layout; `tiny` shrinks the widths (same blocks and shapes) for tests."""
    widths = (32, 64, 64, 64) if tiny else (320, 640, 1280, 1280)
    return UNet2DConditionModel(
        sample_size=64 if not tiny else 8, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=widths, layers_per_block=2 if not tiny else 1,
        cross_attention_dim=768 if not tiny else 32, attention_head_dim=8,
        norm_num_groups=32 if not tiny else 16,
    )


def toy_scheduler(prediction_type: str = "v_prediction") -> EulerAncestralDiscreteScheduler:
    """SD-1.5's noise schedule with the Euler-ancestral sampler that InstructPix2Pix uses.

    The toy editor predicts v, not SD-1.5's epsilon: an edit is almost fully determined by the
    source and the instruction, so the first, noisiest sampling steps should already see the
    edited image; an epsilon model's estimate of the image there is the noisy latent minus a
    predicted noise, its error amplified ~1/alpha_bar (~200x at t=950), and a 1,000-step CPU run
    painted random scenes although its estimates at t <= 700 were right (docs/toy-zoo-training.md).
    With SD's schedule the noisiest training step still holds 7% of the target, so a small model
    learns to read the edit from the noisy latent instead of the source, and fails when sampling
    starts from pure noise; a zero-terminal-SNR schedule ("Common diffusion noise schedules are
    flawed", Lin et al. 2023) with trailing timesteps leaves it nothing to read there."""
    return EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, timestep_spacing="trailing", rescale_betas_zero_snr=True,
    )


def assemble_base(vae_dir: Path, clip_dir: Path, dest: Path, unet: UNet2DConditionModel | None = None) -> Path:
    """A pipeline folder from a trained VAE and CLIP (its text tower and tokenizer) and a fresh
    (or given) UNet: the starting point of SFT training."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(clip_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(clip_dir),
        unet=unet if unet is not None else toy_unet(text_encoder.config.hidden_size, vae.config.latent_channels),
        scheduler=toy_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(dest)
    return dest


def swap_text_encoder(pipeline_dir: str | Path, clip_dir: Path, dest: Path) -> Path:
    """The pipeline folder with its text encoder and tokenizer taken from another CLIP (same
    width): to continue training an editor on a better text tower without losing its UNet."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(clip_dir, dtype=torch.float32)
    if text_encoder.config.hidden_size != pipe.unet.config.cross_attention_dim:
        raise ValueError(f"{clip_dir}'s text tower is {text_encoder.config.hidden_size} wide; the UNet of "
                         f"{pipeline_dir} reads {pipe.unet.config.cross_attention_dim}")
    pipe.text_encoder, pipe.tokenizer = text_encoder, CLIPTokenizer.from_pretrained(clip_dir)
    pipe.save_pretrained(dest)
    return dest


def ship(editor_dir: Path, clip_dir: Path, models_dir: Path = MODELS_DIR, vae_dir: Path | None = None,
         sampling: dict[str, float] | None = None) -> dict[str, Path]:
    """Copy a trained editor pipeline and CLIP into `models/` with fp16 weights (half the bytes;
    loaders upcast on the CPU), optionally with a better decoder (`vae_dir`) and the editor's
    default sampling settings (`sampling`, into its hive.json: measured with `evaluate`). Each
    folder is written beside its place and renamed into it."""
    import shutil

    from hive.editor import read_model_info, sampling_defaults
    from hive.files import write_json_atomic

    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPImageProcessor, CLIPTokenizer

    if sampling:
        sampling_defaults({"sampling": sampling})  # unknown keys fail here, before anything is written
    written = {}
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(editor_dir, dtype=torch.float16)
    if vae_dir is not None:  # a decoder fine-tuned on the same, frozen encoder (see hive.train_vae)
        vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float16)
        if vae.config.scaling_factor != pipe.vae.config.scaling_factor:
            raise ValueError("the new VAE has another latent scale: the editor was not trained on its latents")
        pipe.vae = vae
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float16)
    for name, save in (("toy-editor", pipe.save_pretrained), ("toy-clip", clip.save_pretrained)):
        dest = models_dir / name
        tmp = models_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        if name == "toy-clip":
            CLIPTokenizer.from_pretrained(clip_dir).save_pretrained(tmp)
            CLIPImageProcessor.from_pretrained(clip_dir).save_pretrained(tmp)
        info = read_model_info(str(editor_dir)) if name == "toy-editor" else {}
        if sampling and name == "toy-editor":
            info["sampling"] = {**info.get("sampling", {}), **sampling}
        if info:
            write_json_atomic(tmp / "hive.json", info)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        written[name] = dest
    return written


SHARED_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "vae")


def ship_editors(editors: dict[str, Path], dest: Path) -> dict[str, Path]:
    """Install editors fine-tuned from one base (the paper experiment's) under `dest` with fp16
    weights: one copy of the scheduler, text encoder, tokenizer and VAE in dest/shared, and in each
    editor's folder relative symlinks to them. `from_pretrained` loads every folder as usual, at a
    third of the bytes of full copies (models/ must stay under 60 MB). A component that differs from
    the first editor's (a text encoder with trained layers) stays in that editor's own folder. The
    whole folder is written beside `dest` and renamed into it."""
    import filecmp
    import json
    import shutil

    from diffusers import StableDiffusionInstructPix2PixPipeline

    from hive.editor import copy_model_info

    if not editors:
        raise ValueError("no editors to ship")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, src in editors.items():
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(src, dtype=torch.float16)
            pipe.save_pretrained(tmp / name)
            copy_model_info(src, tmp / name)
            for config in (tmp / name).rglob("*.json"):  # where this machine loaded it from: noise to others
                data = json.loads(config.read_text())
                if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
                    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        first = next(iter(editors))
        (tmp / "shared").mkdir()
        for component in SHARED_COMPONENTS:
            shutil.move(tmp / first / component, tmp / "shared" / component)
            for name in editors:
                folder = tmp / name / component
                if name != first:
                    diff = filecmp.dircmp(folder, tmp / "shared" / component)
                    _, mismatch, errors = filecmp.cmpfiles(folder, tmp / "shared" / component, diff.common_files,
                                                          shallow=False)  # bytes, not sizes and times
                    if diff.left_only or diff.right_only or mismatch or errors:
                        continue  # its own: stays a real folder
                    shutil.rmtree(folder)
                folder.symlink_to(Path("..") / "shared" / component, target_is_directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return {name: dest / name for name in editors}
