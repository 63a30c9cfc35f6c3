"""Pilot (docs/reward.md, session 26): can a network learn, pixel by pixel, where an edit is wrong?

    python scripts/flaw_map_pilot.py runs/pixel-pilot --steps 6000 \
        --eval runs/rw74/home:300 --eval runs/rw71/home:500 --eval runs/rw70/home:300

The simulations' small quality gaps are a few pixels of the changed object that do not match the
clean target (a blunted corner, a bulge, a ghost of a moved object); counting the pixels farther
than the judge's colour tolerance from the target orders 0.93-0.94 of rw74's and rw71's held-out
pairs. This fits a flaw map: a text-conditioned U-Net (source, edit and their difference at 64x64;
the instruction as a bag of toy words, FiLM in every block) that predicts, per pixel, whether the
edit's colour is farther than `toy.COLOUR_TOL` from the clean target. Dense labels: 4,096 a
variant, where the ranker of `pixel_ranker_pilot.py` had six pair labels a request.

Each batch of 16: a quarter the editor's own variants of the toy training requests that
`pixel_ranker_pilot.py sample` wrote to DATA (its last chunk held out, the "self" figure: predicted
against true flaw counts on its pairs more than 3 pixels apart), the rest synthetic attempts at fresh
toy training edits (`attempt`: the clean target's change, blurred, jittered by smooth noise and
thresholded near its outline, so corners round, outlines bulge or recede and a moved object leaves
a ghost; specks; soft edges). The score of an edit is minus its predicted flaw count; every
`--eval-every` steps the script prints its accuracy against the noise-free order on the
simulations' held-out requests. No judge is involved in training. A scratch pilot, not part of
the reward model: it measured whether such a term is worth building.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hive import toy  # noqa: E402
from hive.data import TOY_TRAIN_SEED_BASE  # noqa: E402
from hive.simulate import score_agreement  # noqa: E402
from hive.train_vae import to_pixels  # noqa: E402
from pixel_ranker_pilot import example_arrays, held_out, load_chunks  # noqa: E402

SYNTHETIC_SEED_BASE = TOY_TRAIN_SEED_BASE + 80_000_000  # away from the pilot's own, the locator's, the dataset rankings'
MAX_WORDS = 12
BATCH = 16


def attempt(source: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An editor-like attempt at the edit source -> target: the change region's outline moved by
    smooth noise within a few pixels of it (outside the change, a pixel takes the nearest changed
    pixel's target colour: a bulge), then specks and soft edges."""
    src, tgt = source.astype(np.float32), target.astype(np.float32)
    change = np.any(src != tgt, axis=-1)
    out = src  # a float copy already: the specks below write into it
    if change.any():
        distance, (iy, ix) = ndimage.distance_transform_edt(~change, return_indices=True)
        grown = tgt[iy, ix]
        field = ndimage.gaussian_filter(change.astype(np.float32), rng.uniform(0.3, 1.8))
        noise = ndimage.gaussian_filter(rng.normal(size=change.shape).astype(np.float32), rng.uniform(1.0, 3.0))
        noise *= rng.uniform(0.0, 0.3) / (noise.std() + 1e-6)
        changed = (field + noise > rng.uniform(0.3, 0.7)) & (distance <= rng.uniform(1.5, 3.5))
        out = np.where(changed[..., None], grown, src)
    if rng.random() < 0.5:
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 63, 2)
            out[y:y + rng.integers(1, 3), x:x + rng.integers(1, 3)] = rng.uniform(0, 255, 3)
    if rng.random() < 0.5:
        out = 0.6 * out + 0.4 * ndimage.gaussian_filter(out, (0.7, 0.7, 0))
    out += rng.normal(0, 4, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def flaws(edits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per pixel: is the edit's colour farther than the judge's tolerance from the clean target."""
    return np.linalg.norm(edits.astype(np.float32) - targets.astype(np.float32), axis=-1) > toy.COLOUR_TOL


class FilmBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, text_dim: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(8, c_out), nn.GroupNorm(8, c_out)
        self.film = nn.Linear(text_dim, 2 * c_out)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        gain, shift = self.film(text)[:, :, None, None].chunk(2, 1)
        return F.silu(self.norm2(self.conv2(h)) * (1 + gain) + shift)


class FlawMap(nn.Module):
    """(source, edit, words) -> per-pixel logits that the edit is wrong there (B, H, W)."""

    def __init__(self, vocab_size: int, width: int = 32, text_dim: int = 64):
        super().__init__()
        w = width
        self.words = nn.EmbeddingBag(vocab_size, text_dim, mode="mean")
        self.down1, self.down2, self.down3 = FilmBlock(9, w, text_dim), FilmBlock(w, 2 * w, text_dim), FilmBlock(2 * w, 4 * w, text_dim)
        self.up2, self.up1 = FilmBlock(6 * w, 2 * w, text_dim), FilmBlock(3 * w, w, text_dim)
        self.out = nn.Conv2d(w, 1, 1)
        nn.init.constant_(self.out.bias, -4.0)  # about 2% of pixels are flawed

    def forward(self, source: torch.Tensor, edit: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        t = self.words(words)
        h1 = self.down1(torch.cat([source, edit, edit - source], 1), t)
        h2 = self.down2(F.avg_pool2d(h1, 2), t)
        h3 = self.down3(F.avg_pool2d(h2, 2), t)
        u2 = self.up2(torch.cat([F.interpolate(h3, scale_factor=2), h2], 1), t)
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2), h1], 1), t)
        return self.out(u1)[:, 0]


@functools.cache
def vocabulary() -> dict[str, int]:
    return {w: i for i, w in enumerate(toy.vocabulary())}  # toy.vocabulary() takes a quarter second


def word_ids(instructions: list[str]) -> torch.Tensor:
    """The instruction's toy words, repeated to MAX_WORDS (a mean over the bag keeps their weights)."""
    vocab = vocabulary()
    return torch.tensor([([vocab[w] for w in s.lower().split()] * MAX_WORDS)[:MAX_WORDS] for s in instructions])


def train(data: Path, steps: int, evals: list[str], eval_every: int, real_share: float, width: int,
          save: Path | None) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    var, src, tgt, instructions = load_chunks(data)
    wrong = flaws(var, tgt[:, None])
    tests = [held_out(spec) for spec in evals]
    held = np.arange(len(src)) >= len(src) - 256  # the last chunk
    train_idx = np.flatnonzero(~held)
    net = FlawMap(len(vocabulary()), width)
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    print(f"{len(src)} requests of the editor's variants, {sum(p.numel() for p in net.parameters())} parameters", flush=True)

    def predicted_flaws(source: np.ndarray, edits: np.ndarray, instructions: list[str]) -> np.ndarray:
        return torch.sigmoid(net(to_pixels(source), to_pixels(edits), word_ids(instructions))).sum((1, 2)).numpy()

    def evaluate() -> dict[str, float]:
        net.eval()
        result = {}
        with torch.no_grad():
            ii = np.flatnonzero(held)[:96]
            pred = predicted_flaws(np.repeat(src[ii], 4, 0), var[ii].reshape(-1, 64, 64, 3),
                                   [instructions[i] for i in ii for _ in range(4)]).reshape(-1, 4)
            true = wrong[ii].sum((2, 3))
            right = [float((p[a] - p[b]) * (t[a] - t[b]) > 0) for p, t in zip(pred, true)
                     for a in range(4) for b in range(a + 1, 4) if abs(int(t[a]) - int(t[b])) > 3]
            result["self"] = round(float(np.mean(right)), 3)
            for name, test in tests:
                agree, pairs = 0.0, 0
                for source, variants, instruction, q in test:
                    s = -predicted_flaws(np.repeat(source[None], len(variants), 0), variants, [instruction] * len(variants))
                    a, n = score_agreement(q, s.tolist())
                    agree, pairs = agree + a, pairs + n
                result[name] = round(agree / max(pairs, 1), 3)
        net.train()
        return result

    started, losses = time.time(), []
    n_real = int(round(BATCH * real_share))
    for step in range(steps + 1):
        if step % eval_every == 0:
            loss = float(np.mean(losses[-eval_every:])) if losses else float("nan")
            print(f"step {step} ({time.time() - started:.0f} s) loss {loss:.4f} held-out accuracy {evaluate()}", flush=True)
        if step == steps:
            break
        f_src, f_tgt, f_instructions = example_arrays(
            [toy.sample_example(SYNTHETIC_SEED_BASE + step * (BATCH - n_real) + k) for k in range(BATCH - n_real)])
        f_att = np.stack([attempt(s, t, rng) for s, t in zip(f_src, f_tgt)])
        idx = rng.choice(train_idx, n_real)
        v = rng.integers(0, 4, n_real)
        logits = net(to_pixels(np.concatenate([src[idx], f_src])), to_pixels(np.concatenate([var[idx, v], f_att])),
                     word_ids([instructions[i] for i in idx] + f_instructions))
        labels = torch.from_numpy(np.concatenate([wrong[idx, v], flaws(f_att, f_tgt)])).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    if save:
        torch.save(net.state_dict(), save)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="pixel_ranker_pilot.py sample's folder of the editor's variants")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--eval", action="append", default=[], help="SIM_HOME:TEST_REQUESTS (repeatable)")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--real-share", type=float, default=0.25, help="of each batch, the editor's variants")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()
    train(args.data, args.steps, args.eval, args.eval_every, args.real_share, args.width, args.save)


if __name__ == "__main__":
    main()
