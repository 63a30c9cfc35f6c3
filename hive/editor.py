"""The editor: load an InstructPix2Pix pipeline and sample K variants of one edit.

One code path for the embedded toy editor and for `timbrooks/instruct-pix2pix`: both are
`StableDiffusionInstructPix2PixPipeline` folders (or hub ids). A folder may carry `hive.json`,
which says e.g. that the editor was trained with a reward suffix that it appends by itself.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hive.defaults import (DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_MASK_THRESHOLD,  # noqa: F401
                           DEFAULT_STEPS, MAX_VARIANTS)
from hive.fastpath import FastOptions, FastSampler, fast_default
from hive.local_blend import composite, instruction_masks

MAX_PIXELS = 40_000_000  # refuse larger uploads (a 10,000 x 10,000 image is 100 MP)
MAX_INSTRUCTION_CHARS = 1000


class EditorInputError(ValueError):
    """Bad input from a user: the message says what is wrong, in words a user understands."""


def default_model() -> str:
    from hive.zoo import DEFAULT_EDITOR

    return os.environ.get("HIVE_MODEL") or str(DEFAULT_EDITOR)


# ---------------------------------------------------------------- input images
def load_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Any image a user may bring -> an upright 8-bit RGB image, or EditorInputError.

    Handles RGBA/LA/palette transparency (composited on white), grayscale, 16-bit and float
    images, CMYK, and EXIF orientation."""
    if isinstance(source, np.ndarray):
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
        except OSError as e:
            raise EditorInputError(f"cannot read the image file: {e}") from e
        try:
            with warnings.catch_warnings():  # we check the size ourselves, with a clearer message
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise EditorInputError(f"the image is too large; at most {MAX_PIXELS // 1_000_000} megapixels") from e
        except (UnidentifiedImageError, OSError) as e:
            raise EditorInputError("the file is not an image that we can read (PNG, JPEG, WebP, GIF, ...)") from e
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise EditorInputError(f"the image is too large: {w}x{h} pixels; at most {MAX_PIXELS // 1_000_000} megapixels")
    if w < 1 or h < 1:
        raise EditorInputError("the image is empty")
    try:
        img.load()
    except (OSError, SyntaxError) as e:
        raise EditorInputError(f"the image file is damaged: {e}") from e
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F":
            hi = max(float(a.max()), 1.0)
        img = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------- the editor
@dataclass
class VariantRecord:
    """Everything needed to reproduce one variant."""

    index: int
    seed: int
    steps: int
    guidance: float
    image_guidance: float
    instruction: str  # as the user typed it
    prompt: str  # as the model saw it (with a reward suffix, if the model has one)
    model: str
    resolution: int
    scheduler: str
    mask_threshold: float = 0.0  # local blend (hive.local_blend); 0: the raw model output
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EditResult:
    images: list[Image.Image]
    records: list[VariantRecord]

    def records_json(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Editor:
    """A loaded InstructPix2Pix pipeline plus what its folder says about it."""

    def __init__(self, model: str | Path | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, fast: bool | None = None, fast_options: FastOptions | None = None,
                 pipe: Any = None, mask_threshold: float | None = None):
        """`fast`: sample with hive.fastpath.FastSampler (the pipeline's math without its repeated
        work, plus the speed tricks that pay on this device: `fast_options`, default
        `FastOptions.for_device`); False: the plain pipeline call; None: on unless HIVE_FAST=0.
        `pipe`: an already built pipeline to use instead of loading `model` (benchmarks).
        `mask_threshold`: the local blend's threshold (hive.local_blend; 0 turns it off); None:
        the model's default."""
        from diffusers import StableDiffusionInstructPix2PixPipeline

        self.model = str(model or default_model())
        self.device = torch.device(device) if device is not None else pick_device()
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.pipe = pipe if pipe is not None else StableDiffusionInstructPix2PixPipeline.from_pretrained(
            self.model, dtype=dtype, safety_checker=None, requires_safety_checker=False)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.info = read_model_info(self.model)
        self.defaults = sampling_defaults(self.info)
        self.mask_threshold = checked_mask_threshold(
            self.defaults["mask_threshold"] if mask_threshold is None else mask_threshold, "the editor")
        self.resolution = int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)
        use_fast = fast_default() if fast is None else bool(fast)
        self.fast: FastSampler | None = None
        if use_fast:
            self.fast = FastSampler(self.pipe, fast_options or FastOptions.for_device(self.device))

    # -- validation --------------------------------------------------------------------------
    def prompt_for(self, instruction: str) -> str:
        """The text the model sees: the user's instruction plus the model's reward suffix, if any."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise EditorInputError("the instruction is empty: say what to change, e.g. 'make the sky a sunset'")
        instruction = " ".join(instruction.split())
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise EditorInputError(
                f"the instruction is too long: {len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}")
        prompt = instruction + self.info.get("reward_suffix", "")
        n_tokens = len(self.pipe.tokenizer(prompt, truncation=False).input_ids)
        limit = self.pipe.tokenizer.model_max_length
        if n_tokens > limit:
            raise EditorInputError(
                f"the instruction is too long for this model: {n_tokens} tokens, at most {limit} "
                f"(including the start and end tokens{' and the reward suffix' if 'reward_suffix' in self.info else ''})")
        return prompt

    # -- sampling ----------------------------------------------------------------------------
    def settings(self, steps: int | None = None, guidance: float | None = None,
                 image_guidance: float | None = None) -> tuple[int, float, float]:
        """The sampling settings of a call: what the caller gave, else this model's defaults."""
        d = self.defaults
        return (int(d["steps"] if steps is None else steps), float(d["guidance"] if guidance is None else guidance),
                float(d["image_guidance"] if image_guidance is None else image_guidance))

    def resolved_mask_threshold(self, mask_threshold: float | None, where: str) -> float:
        """The local blend's threshold of a call: what the caller gave (checked), else this model's."""
        return self.mask_threshold if mask_threshold is None else checked_mask_threshold(mask_threshold, where)

    def edit(self, image: Any, instruction: str, variants: int = 4, seed: int | None = None,
             steps: int | None = None, guidance: float | None = None,
             image_guidance: float | None = None, mask_threshold: float | None = None) -> EditResult:
        """K variants of one edit in one batched call; variant i uses seed `seed + i`, so each
        variant reproduces on its own (also with another K). Settings left None take the
        model's defaults (`self.defaults`, `self.mask_threshold`)."""
        steps, guidance, image_guidance = self.settings(steps, guidance, image_guidance)
        threshold = self.resolved_mask_threshold(mask_threshold, "edit")
        if not 1 <= int(variants) <= MAX_VARIANTS:
            raise EditorInputError(f"variants must be between 1 and {MAX_VARIANTS}, not {variants}")
        if not 1 <= int(steps) <= 500:
            raise EditorInputError(f"steps must be between 1 and 500, not {steps}")
        source = load_image(image)
        prompt = self.prompt_for(instruction)
        base_seed = int(seed) if seed is not None else secrets.randbelow(2**31 - MAX_VARIANTS)
        seeds = [base_seed + i for i in range(int(variants))]
        outputs = self.sample([source], [prompt], [seeds], int(steps), float(guidance), float(image_guidance),
                              threshold)[0]
        records = [VariantRecord(i, s, int(steps), float(guidance), float(image_guidance), instruction, prompt,
                                 self.model, self.resolution, type(self.pipe.scheduler).__name__, threshold)
                   for i, s in enumerate(seeds)]
        return EditResult(outputs, records)

    @torch.inference_mode()
    def sample(self, sources: list[Image.Image], prompts: list[str], seeds: list[list[int]], steps: int | None = None,
               guidance: float | None = None, image_guidance: float | None = None,
               mask_threshold: float | None = None) -> list[list[Image.Image]]:
        """Edit several sources at once (one pipeline call); sources[j] gets len(seeds[j]) variants.

        Each source is resized to the model's square resolution and each output back to the
        source's size; with a local blend (`mask_threshold` > 0, None: `self.mask_threshold`) each
        output then keeps the source's own pixels outside the instruction's mask. Settings left
        None take the model's defaults."""
        steps, guidance, image_guidance = self.settings(steps, guidance, image_guidance)
        threshold = self.resolved_mask_threshold(mask_threshold, "sample")
        res = self.resolution
        images, texts, generators, owners, smalls = [], [], [], [], []
        for j, (src, prompt, ss) in enumerate(zip(sources, prompts, seeds)):
            small = src.resize((res, res), Image.Resampling.BICUBIC) if src.size != (res, res) else src
            smalls.append(small)
            for s in ss:
                images.append(small)
                texts.append(prompt)
                generators.append(torch.Generator(device="cpu").manual_seed(int(s)))
                owners.append(j)
        if self.fast is not None:  # same math as the pipeline call below, see hive.fastpath
            edited = self.fast(images, texts, generators, steps, guidance, image_guidance)
        else:
            edited = self.pipe(prompt=texts, image=images, num_inference_steps=steps, guidance_scale=guidance,
                               image_guidance_scale=image_guidance, generator=generators, output_type="pil").images
        masks = instruction_masks(self.pipe, smalls, prompts, threshold) if threshold > 0 else None
        outputs: list[list[Image.Image]] = [[] for _ in sources]
        for owner, out in zip(owners, edited):
            src = sources[owner]
            out = out.resize(src.size, Image.Resampling.BICUBIC) if out.size != src.size else out
            outputs[owner].append(composite(src, out, masks[owner]) if masks is not None else out)
        return outputs


def sampling_defaults(info: dict) -> dict[str, float]:
    """A model's default steps and guidance: its hive.json `sampling` (a small toy editor follows
    instructions best at a text guidance far below SD's 7.5, measured by `evaluate --guidance`),
    else the global defaults of hive.defaults."""
    out = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "image_guidance": DEFAULT_IMAGE_GUIDANCE,
           "mask_threshold": DEFAULT_MASK_THRESHOLD}
    given = info.get("sampling") or {}
    unknown = set(given) - set(out)
    if unknown:
        raise ValueError(f"hive.json sampling: unknown keys {sorted(unknown)}; known: {sorted(out)}")
    out.update({k: float(v) for k, v in given.items()})
    out["steps"] = int(out["steps"])
    checked_mask_threshold(out["mask_threshold"], "hive.json sampling")
    return out


def checked_mask_threshold(value: float, where: str) -> float:
    """The local blend's threshold, or EditorInputError (a ValueError) naming `where` it came from."""
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise EditorInputError(f"{where}: mask_threshold must be in [0, 1) (0: no local blend), not {value}")
    return value


def read_model_info(model: str) -> dict:
    """hive.json of a model folder (reward suffix etc.); {} for hub ids and plain folders."""
    path = Path(model) / "hive.json"
    return json.loads(path.read_text()) if path.exists() else {}


def copy_model_info(model: str | Path, dest: Path) -> None:
    """A pipeline saved from `model` keeps its hive.json (sampling settings, reward suffix):
    `save_pretrained` writes only the diffusers components. A hub id has none."""
    if (Path(model) / "hive.json").exists():
        shutil.copyfile(Path(model) / "hive.json", Path(dest) / "hive.json")
