"""Edit triplets (source, instruction, edited) from a dataset folder or from the toy world.

A dataset folder holds `metadata.jsonl` with the InstructPix2Pix columns `input_image`,
`edit_prompt`, `edited_image` (paths relative to the folder), so toy data written by
`python -m hive toy sample` and a real dataset exported to that layout read alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hive import toy

REQUIRED_COLUMNS = ("input_image", "edit_prompt", "edited_image")


def read_metadata(folder: Path) -> list[dict]:
    path = folder / "metadata.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a dataset folder needs metadata.jsonl")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [c for c in REQUIRED_COLUMNS if c not in row]
            if missing:
                raise ValueError(f"{path}:{n}: missing columns {missing}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def image_to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """RGB image -> (3, H, W) in [-1, 1] at `resolution` (square)."""
    img = img.convert("RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


@dataclass
class TripletBatch:
    source: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    edited: torch.Tensor
    prompts: list[str]
    weights: torch.Tensor | None = None  # (B,) per-example loss weights (weighted-reward fine-tuning)


class TripletSource:
    """Where training batches come from. Batch `step` is a pure function of (seed, step), so a
    resumed run sees exactly the batches it would have seen."""

    def batch(self, step: int, batch_size: int) -> TripletBatch:
        raise NotImplementedError


class FolderTriplets(TripletSource):
    def __init__(self, folder: Path, resolution: int, seed: int = 0, use_clean: bool = False):
        self.folder = folder
        self.rows = read_metadata(folder)
        self.resolution = resolution
        self.seed = seed
        self.target_column = "clean_image" if use_clean else "edited_image"

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int, batch_size: int) -> TripletBatch:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.choice(len(self.rows), size=batch_size, replace=len(self.rows) < batch_size)
        rows = [self.rows[i] for i in idx]
        load = lambda rel: image_to_tensor(Image.open(self.folder / rel), self.resolution)  # noqa: E731
        return TripletBatch(
            torch.stack([load(r["input_image"]) for r in rows]),
            torch.stack([load(r[self.target_column]) for r in rows]),
            [r["edit_prompt"] for r in rows],
        )


# Toy training seeds live far from the seeds used for evaluation (see hive.evaluate).
TOY_TRAIN_SEED_BASE = 100_000_000


def parse_kind_weights(text: str) -> dict[str, float]:
    """"resize=3,add=2" -> {"resize": 3.0, "add": 2.0}; kinds not named keep weight 1."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        if not sep or kind not in toy.EDIT_KINDS:
            raise ValueError(f"kind weights: {part!r} is not KIND=WEIGHT with KIND one of {', '.join(toy.EDIT_KINDS)}")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise ValueError(f"kind weights: {value!r} is not a number") from None
        if not np.isfinite(weights[kind]) or weights[kind] < 0:
            raise ValueError(f"kind weights: {kind} needs a finite weight of 0 or more, not {value}")
    if weights and sum(weights.get(k, 1.0) for k in toy.EDIT_KINDS) <= 0:
        raise ValueError("kind weights: at least one kind needs a positive weight")
    return weights


class ToyTriplets(TripletSource):
    """An endless stream of fresh toy edits, generated in memory (no disk round trip).

    `kind_weights` draws some edit kinds more often than others (kinds not named: weight 1), to
    spend training on the kinds an editor fails; without it every kind is equally likely."""

    def __init__(self, resolution: int = toy.DEFAULT_SIZE, noise: float = 0.0, seed: int = 0,
                 kind_weights: dict[str, float] | None = None):
        self.resolution = resolution
        self.noise = noise
        self.seed = seed
        self.kind_probs: np.ndarray | None = None
        if kind_weights:
            w = np.array([float(kind_weights.get(k, 1.0)) for k in toy.EDIT_KINDS])
            self.kind_probs = w / w.sum()

    def kind_for(self, example_seed: int) -> str | None:
        if self.kind_probs is None:
            return None
        rng = np.random.default_rng([example_seed, 104_729])
        return toy.EDIT_KINDS[int(rng.choice(len(toy.EDIT_KINDS), p=self.kind_probs))]

    def batch(self, step: int, batch_size: int) -> TripletBatch:
        seeds = [TOY_TRAIN_SEED_BASE + (self.seed * 10_000_019 + step * batch_size + k) for k in range(batch_size)]
        examples = [toy.sample_example(s, size=self.resolution, noise=self.noise, kind=self.kind_for(s))
                    for s in seeds]
        return TripletBatch(
            torch.stack([image_to_tensor(e.input_image, self.resolution) for e in examples]),
            torch.stack([image_to_tensor(e.edited_image, self.resolution) for e in examples]),
            [e.edit.instruction for e in examples],
        )
