"""Where an instruction should change its source image: a map over the vision tower's patch grid.

The judge of an edit (and a person) asks two things first: did the place the instruction names
change, and did everything else stay? The reward model's change features say how much each
patch changed, but a few hundred rankings do not teach a head which patch "the square" or "the
circle on the left" is: on the toy simulations it preferred removing the wrong object to removing
the named one (docs/reward.md). An edit dataset shows it directly: where its target differs from
its source. So a small transformer, over the frozen backbone's source patch tokens and the
instruction's word embeddings, learns that map from (source, instruction, target) triplets, and
the change head compares it with the edit's observed change (`ChangeHead`, `RewardConfig.
change_locator`): the share of the expected place that changed (cover), and of the rest (spill).

On by default with the toy backbone since session 33 (20,000 examples, 4,000 steps; `--locator-
examples 0` turns it off). At 1,500 steps it did not pay: the locator itself worked (on held-out
toy edits 80% of its expected change fell on the 26% of patches that change), but trained into
the heads it lowered both simulations' held-out accuracy (sessions 10 and 28, docs/reward.md).
With the true map in its place, cover minus spill alone orders 0.928 and 0.840 of two
simulations' held-out pairs, against 0.869 and 0.648 with that locator's (`scripts/
locator_headroom.py`, session 29): it found an object to change, not reliably the named one.
Fitted for 4,000 steps it puts 0.902 of its mass on the changed patches, and the reward model
with it gained on both simulations (0.842 -> 0.866 and 0.639 -> 0.680, session 33,
docs/reward.md). It needs a frozen backbone (it reads the features it was fitted on) and the
change head. Toy edits only: for real photos the same fit would run on an edit dataset's
triplets (`fit_change_locator` takes any), which is not built.

It found the named object by its colour or place, rarely by its shape or size: against an
editor's mistake (the named change on another object) its map preferred the right object in 0.69
of shape-only references ("the square") and 0.79 of size references ("the small circle"), 0.94-0.99
otherwise. `pixel_stem` (`--locator-pixels`, session 36) adds a small conv stem over the source's
pixels that sees each object's outline: 0.77-0.79 and 0.94 (0.891 -> 0.932-0.945 in all, two fits;
held-out mass on changed patches 0.902 -> 0.931-0.943). It is an option, not the default: the
reward model trained with it moved -0.008 to +0.006 on one simulation and lost 0.016 on the other;
with `--no-residual` +0.015 and +0.021 (docs/reward.md, session 36).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from hive import toy
from hive.data import TOY_TRAIN_SEED_BASE
from hive.zoo import TOY_CHANGE_LOCATOR

# toy training seeds apart from the editor's (under 101M) and the dataset rankings' (150M+)
LOCATOR_SEED_BASE = TOY_TRAIN_SEED_BASE + 60_000_000
DEFAULT_STEPS = 4_000
DEFAULT_EXAMPLES = 20_000


def resolve_examples(requested: int | None, toy_backbone: bool, head_type: str, frozen: bool) -> int:
    """How many toy edits to fit the locator on: `requested`, or by default DEFAULT_EXAMPLES
    where it can work (a toy backbone, the change head, a frozen backbone) and 0 elsewhere."""
    if requested is not None:
        if requested < 0:
            raise ValueError("locator_examples must be >= 0")
        return requested
    return DEFAULT_EXAMPLES if toy_backbone and head_type == "change" and frozen else 0


class PixelStem(nn.Module):
    """Three stride-2 3×3 convolutions and one more from the source's pixels to the patch grid.

    Each grid cell's feature sees 31 pixels around it, a whole toy object with its outline: its
    shape and size. The toy backbone's patch tokens carry those too faintly to bind "the square"
    or "the small circle" (a locator without the stem picked the named object over an editor's
    wrong one in 0.69 of shape-only references against 0.94-0.98 with a colour or a place,
    docs/reward.md, session 36)."""

    def __init__(self, width: int, grid: int):
        super().__init__()
        self.grid = grid
        self.convs = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.GELU(), nn.Conv2d(16, 32, 3, 2, 1), nn.GELU(),
                                   nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(), nn.Conv2d(64, width, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, grid², width) from (B, 3, H, W) pixel values (the vision tower's normalised input)."""
        x = self.convs(pixels)
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:  # another backbone's image and patch size
            x = nn.functional.adaptive_avg_pool2d(x, self.grid)
        return x.flatten(2).transpose(1, 2)


class ChangeLocator(nn.Module):
    """Source patch tokens + instruction word embeddings (+ with `pixel_stem`, the source's pixels)
    -> one logit per patch: should it change?"""

    def __init__(self, patch_dim: int, word_dim: int, n_patches: int, width: int = 128, layers: int = 2,
                 heads: int = 4, pixel_stem: bool = False):
        super().__init__()
        self.patch_in = nn.Linear(patch_dim, width)
        self.word_in = nn.Linear(word_dim, width)
        self.pos = nn.Parameter(torch.randn(1, n_patches, width) * 0.02)
        self.kind = nn.Parameter(torch.randn(2, width) * 0.02)  # patch token / word token
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, 1)
        # made last, so that the other layers start as they do without it
        self.stem = PixelStem(width, round(n_patches ** 0.5)) if pixel_stem else None

    def forward(self, patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                pixels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, patches) logits; `patches` (B, P, patch_dim), `words` (B, T, word_dim), `word_mask` (B, T),
        `pixels` (B, 3, H, W), read only with the pixel stem."""
        n = patches.shape[1]
        x = self.patch_in(patches) + self.pos + self.kind[0]
        if self.stem is not None:
            if pixels is None:
                raise ValueError("this change locator reads the source's pixels: pass `pixels`")
            x = x + self.stem(pixels)
        x = torch.cat([x, self.word_in(words) + self.kind[1]], dim=1)
        pad = torch.cat([torch.zeros(patches.shape[:2], dtype=torch.bool, device=patches.device), word_mask == 0], 1)
        return self.out(self.encoder(x, src_key_padding_mask=pad)[:, :n]).squeeze(-1)


@torch.no_grad()
def locator_inputs(model, sources: list[Image.Image], instructions: list[str], batch_size: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(source patch tokens, instruction word embeddings, word mask, source pixel values or None),
    as `RewardModel` encodes them (`model` must carry a change locator, so that it returns them;
    the pixels only when its locator has the pixel stem)."""
    device = next(model.parameters()).device
    model.eval()
    patches, words, masks, pixels = [], [], [], []
    for i in range(0, len(sources), batch_size):
        feats = model.encode_images(model.pixel_values(sources[i:i + batch_size]).to(device))
        patches.append(feats["last_patches"])
        if "source_pixels" in feats:
            pixels.append(feats["source_pixels"])
        t = {k: v.to(device) for k, v in model.tokenize(instructions[i:i + batch_size]).items()}
        text = model.encode_text(t["input_ids"], t["attention_mask"])
        words.append(text["words"])
        masks.append(text["mask"])
    return torch.cat(patches), torch.cat(words), torch.cat(masks), torch.cat(pixels) if pixels else None


@torch.no_grad()
def changed_share(model, sources: list[Image.Image], edited: list[Image.Image], batch_size: int = 256
                  ) -> torch.Tensor:
    """(N, patches): the share of each patch's pixels that moved more than `KEEP_TOLERANCE`."""
    from hive.reward import KEEP_COLUMN

    out = []
    for i in range(0, len(sources), batch_size):
        pix = model.pixel_change(model.pixel_values(sources[i:i + batch_size]),
                                 model.pixel_values(edited[i:i + batch_size]))
        out.append(1 - pix[..., KEEP_COLUMN])
    return torch.cat(out)


def cover_and_spill(changed: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `changed` (rows, patches: each patch's changed share): the share of the expected
    place that changed (cover) and the share of the rest that changed (spill); `expected` is a map
    in [0, 1] per row (rows, patches) or one for all rows (patches,)."""
    cover = (changed * expected).sum(-1) / expected.sum(-1).clamp(min=1e-6)
    spill = (changed * (1 - expected)).sum(-1) / (1 - expected).sum(-1).clamp(min=1e-6)
    return cover, spill


def fit_change_locator(model, sources: list[Image.Image], instructions: list[str], targets: list[Image.Image],
                       steps: int = DEFAULT_STEPS, seed: int = 0, val_fraction: float = 0.1,
                       progress: bool = True) -> tuple[ChangeLocator, dict]:
    """Fit a locator on an edit dataset's (source, instruction, target) triplets, against the share
    of each patch the target changed; returns it (frozen) with held-out figures: the share of the
    predicted change mass on truly changed patches, and that share for a map that knows nothing
    (the changed patches' share of the grid). It has the pixel stem when `model`'s locator has one."""
    from tqdm.auto import tqdm

    n = len(sources)
    if not n == len(instructions) == len(targets):
        raise ValueError("sources, instructions and targets must have the same length")
    if n < 10:
        raise ValueError(f"{n} examples: the change locator needs at least 10")
    patches, words, mask, pixels = locator_inputs(model, sources, instructions)
    target = changed_share(model, sources, targets).to(patches.device)
    n_val = max(1, int(n * val_fraction))
    n_fit = n - n_val
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        locator = ChangeLocator(patches.shape[-1], words.shape[-1], patches.shape[1],
                                pixel_stem=pixels is not None).to(patches.device)
    opt = torch.optim.AdamW(locator.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=max(steps, 1), pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    locator.train()
    for _ in tqdm(range(steps), desc="fit change locator", disable=not progress):
        idx = torch.randint(0, n_fit, (min(128, n_fit),), generator=gen).to(patches.device)
        logits = locator(patches[idx], words[idx], mask[idx], None if pixels is None else pixels[idx])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    locator.eval().requires_grad_(False)
    with torch.no_grad():
        p = torch.sigmoid(locator(patches[n_fit:], words[n_fit:], mask[n_fit:],
                                  None if pixels is None else pixels[n_fit:]))
    changed = (target[n_fit:] > 0).float()
    return locator, {"examples": n, "steps": steps, "pixel_stem": pixels is not None,
                     "val_mass_on_changed": float(((p * changed).sum(1) / p.sum(1).clamp(min=1e-6)).mean()),
                     "val_changed_share": float(changed.mean())}


def toy_triplets(n: int, seed_base: int = LOCATOR_SEED_BASE) -> tuple[list, list, list]:
    """(sources, instructions, clean targets) of `n` toy training edits."""
    sources, instructions, targets = [], [], []
    for k in range(n):
        ex = toy.sample_example(seed_base + k)
        sources.append(ex.input_image)
        instructions.append(ex.edit.instruction)
        targets.append(ex.clean_image)
    return sources, instructions, targets


# bump when the fit or the toy world changes, so that cached fits are not reused
FIT_VERSION = 1


def fit_cache_path(backbone: Path, n: int, steps: int, seed: int, pixels: bool = False) -> Path:
    """Where a toy fit for this backbone's weights is kept: $HIVE_HOME/cache/change-locator/."""
    key = f"v{FIT_VERSION}/{n}/{steps}/{seed}" + ("/pixels" if pixels else "")  # fits without the stem keep their names
    digest = hashlib.blake2b(key.encode(), digest_size=12)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if (backbone / name).exists():
            digest.update((backbone / name).read_bytes())
    home = Path(os.environ.get("HIVE_HOME") or "./data").expanduser()
    return home / "cache" / "change-locator" / f"{digest.hexdigest()}.safetensors"


@functools.lru_cache(maxsize=2)
def _toy_fit(backbone: str, n: int, steps: int, seed: int, pixels: bool) -> tuple[dict, dict]:
    from safetensors.torch import load_file, safe_open, save_file

    from hive.reward import RewardModel

    cached = fit_cache_path(Path(backbone), n, steps, seed, pixels)
    # the default fit ships beside the backbone, so that a fresh checkout does not spend ~20 min on it
    for found in (TOY_CHANGE_LOCATOR / cached.name, cached):
        if found.exists():
            with safe_open(str(found), "pt") as f:
                metrics = json.loads(f.metadata()["metrics"])
            return load_file(str(found)), metrics
    model = RewardModel.from_backbone(backbone, change_locator=True, locator_pixels=pixels)
    locator, metrics = fit_change_locator(model, *toy_triplets(n), steps=steps, seed=seed)
    state = {k: v.detach().cpu().contiguous() for k, v in locator.state_dict().items()}
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"metrics": json.dumps(metrics), "backbone": Path(backbone).name})
    os.replace(tmp, cached)  # atomic: a crashed fit leaves no half-written cache entry
    return state, metrics


def toy_change_locator(backbone: str | Path, n: int, steps: int = DEFAULT_STEPS, seed: int = 0,
                       pixels: bool = False) -> tuple[dict, dict]:
    """(state dict, metrics) of a locator fitted on `n` toy edits for `backbone`. The fit takes
    ~20 minutes on two CPU threads at 20,000 examples and 4,000 steps, so it is kept for the
    process (an experiment trains several reward models on one backbone) and on disk
    (`fit_cache_path`, keyed by the backbone's weights and the fit's settings); the default fit
    for the embedded backbone ships in `zoo.TOY_CHANGE_LOCATOR`. `pixels`: the locator with the
    pixel stem, whose fit does not ship (the models folder's size cap): it is fitted on first use."""
    state, metrics = _toy_fit(str(Path(backbone).resolve()), n, steps, seed, pixels)
    return state, dict(metrics)
