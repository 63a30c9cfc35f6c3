"""Pilot (docs/reward.md, session 25): can a small pixel-resolution network learn what the
annotators' quality sees, from the editor's own variants ranked by distance to the dataset target?

    python scripts/pixel_ranker_pilot.py sample OUT --start 0 --requests 1024     # ~6 min / 256 requests, 1 thread
    python scripts/pixel_ranker_pilot.py train OUT --steps 3000 --eval SIM_HOME:TEST_REQUESTS ...

`sample` edits toy *training* requests (seeds from 170,000,000: inside the training distribution,
away from the dataset rankings', the locator's and the simulations') with the shipped editor, 4
variants each: every other batch at image guidance 1.2/1.6/2/2.4 (the second simulation's spread),
the rest at local-blend thresholds 0/0.2/0.35/0.5 (the first's). Chunks of 256 requests go to
OUT/chunkNNNNNNN.npz (atomic; a rerun skips the chunks it has), each holding only the variants:
request k of chunk N is toy seed SEED_BASE + N + k, whose source, clean target and instruction
`train` renders again. No judge is involved.

`train` fits a text-conditioned CNN (source, edit and their difference at 64x64; the instruction's
words through an embedding and a GRU, FiLM on the conv features) with Bradley-Terry on the pairs
whose distances to the target differ by more than `--margin`, plus "the target beats each
variant", and prints its held-out accuracy against the noise-free order on the simulations given
with `--eval` every `--eval-every` steps. A scratch pilot, not part of the reward model: it measured
whether such a term is worth building (it was not, docs/reward.md).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hive import toy  # noqa: E402
from hive.data import TOY_TRAIN_SEED_BASE  # noqa: E402
from hive.train_vae import to_pixels  # noqa: E402

SEED_BASE = TOY_TRAIN_SEED_BASE + 70_000_000
CHUNK = 256
IMAGE_GUIDANCES = (1.2, 1.6, 2.0, 2.4)
MASK_THRESHOLDS = (0.0, 0.2, 0.35, 0.5)
MAX_WORDS = 12


def sample(out: Path, start: int, requests: int, batch: int = 8) -> None:
    from hive.editor import Editor

    out.mkdir(parents=True, exist_ok=True)
    editor = Editor()
    steps, guidance, image_guidance = editor.settings(None, None, None)
    for c0 in range(start - start % CHUNK, start + requests, CHUNK):
        path = out / f"chunk{c0:07d}.npz"
        if path.exists():
            continue
        rows = []
        for b0 in range(c0, c0 + CHUNK, batch):
            examples = [toy.sample_example(SEED_BASE + k) for k in range(b0, b0 + batch)]
            sources = [e.input_image for e in examples]
            prompts = [editor.prompt_for(e.edit.instruction) for e in examples]
            spread_guidance = (b0 // batch) % 2 == 0
            variants: list[list] = [[None] * 4 for _ in examples]
            for v in range(4):
                g, threshold = ((IMAGE_GUIDANCES[v], editor.mask_threshold) if spread_guidance
                                else (image_guidance, MASK_THRESHOLDS[v]))
                seeds = [[(SEED_BASE + b0 + j) * 16 + v] for j in range(batch)]
                for row, images in zip(variants, editor.sample(sources, prompts, seeds, steps, guidance, g, threshold)):
                    row[v] = np.asarray(images[0])
            rows += [np.stack(row) for row in variants]
        tmp = out / f"chunk{c0:07d}.tmp.npz"
        np.savez(tmp, var=np.stack(rows))
        os.replace(tmp, path)
        print(f"chunk {c0} written", flush=True)


class PixelRanker(nn.Module):
    """Text-conditioned CNN: (source, edit, edit - source) at 64x64 -> a score."""

    def __init__(self, vocab_size: int, width: int = 32, embed: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(MAX_WORDS, embed))
        self.gru = nn.GRU(embed, embed, batch_first=True, bidirectional=True)
        c = width
        self.convs = nn.ModuleList([nn.Conv2d(9, c, 4, stride=2, padding=1), nn.Conv2d(c, c, 3, stride=2, padding=1),
                                    nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
                                    nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)])
        self.films = nn.ModuleList([nn.Linear(2 * embed, 2 * c), nn.Linear(2 * embed, 4 * c),
                                    nn.Linear(2 * embed, 4 * c)])
        self.out = nn.Sequential(nn.Linear(4 * c + 2 * embed, 128), nn.GELU(), nn.Linear(128, 1))

    def forward(self, source: torch.Tensor, edit: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embed(words) + self.position)
        mask = (words > 0).float()[..., None]
        text = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        x = F.gelu(self.convs[0](torch.cat([source, edit, edit - source], 1)))
        for conv, film in zip(self.convs[1:], self.films):
            gain, shift = film(text).chunk(2, -1)
            x = F.gelu(conv(x) * (1 + gain[..., None, None]) + shift[..., None, None])
        return self.out(torch.cat([x.mean((2, 3)), x.amax((2, 3)), text], 1)).squeeze(-1)


def example_arrays(examples: list[toy.ToyExample]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The examples' sources and clean targets as uint8 arrays (N, 64, 64, 3), and their instructions."""
    return (np.stack([np.asarray(e.input_image) for e in examples]), np.stack([np.asarray(e.clean_image) for e in examples]),
            [e.edit.instruction for e in examples])


def load_chunks(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The variants of every chunk in `data` (requests, 4, 64, 64, 3), then each request's source,
    clean target and instruction (`example_arrays`)."""
    var, seeds = [], []
    for path in sorted(glob.glob(str(data / "chunk???????.npz"))):
        var.append(np.load(path)["var"])
        first = SEED_BASE + int(Path(path).stem[len("chunk"):])
        seeds += range(first, first + len(var[-1]))
    return np.concatenate(var), *example_arrays([toy.sample_example(seed) for seed in seeds])


def held_out(spec: str) -> tuple[str, list]:
    """(name, [(source, variants, instruction, true quality)]) of a simulation's held-out requests."""
    from hive.train_reward import ImageCache, rankings_from_db, split_experiment

    home, n = spec.rsplit(":", 1)
    _, test = split_experiment(rankings_from_db(f"sqlite:///{home}/hive.db", home=home), int(n))
    cache = ImageCache()
    return Path(home).parent.name, [(np.asarray(cache(r.source_path)), np.stack([np.asarray(cache(p)) for p in r.variant_paths]),
                                     r.instruction, list(r.true_quality)) for r in test]


def train(data: Path, steps: int, margin: float, evals: list[str], eval_every: int, batch: int = 32) -> None:
    from hive.simulate import score_agreement

    torch.manual_seed(0)
    rng = np.random.default_rng(0)  # the batches: a rerun gives the same figures
    var, src, tgt, instructions = load_chunks(data)
    tests = [held_out(spec) for spec in evals]
    words = {w for s in instructions for w in s.lower().split()}
    words |= {w for _, t in tests for _, _, s, _ in t for w in s.lower().split()}
    vocab = {w: i + 1 for i, w in enumerate(sorted(words))}

    def tokens(s: str) -> list[int]:
        ids = [vocab[w] for w in s.lower().split()][:MAX_WORDS]
        return ids + [0] * (MAX_WORDS - len(ids))

    distance = ((var.astype(np.float32) - tgt[:, None].astype(np.float32)) ** 2).mean((2, 3, 4)) / 255 ** 2
    word_ids = torch.tensor([tokens(s) for s in instructions])
    net = PixelRanker(len(vocab) + 1)
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
    i, j = torch.triu_indices(4, 4, 1)
    print(f"{len(src)} training requests", flush=True)

    def evaluate() -> dict[str, float]:
        net.eval()
        result = {}
        with torch.no_grad():
            for name, test in tests:
                right, pairs = 0.0, 0
                for source, variants, instruction, q in test:
                    s = net(to_pixels(np.repeat(source[None], len(variants), 0)), to_pixels(variants),
                            torch.tensor([tokens(instruction)] * len(variants))).numpy()
                    t, k = score_agreement(q, s)
                    right, pairs = right + t, pairs + k
                result[name] = round(right / pairs, 3)
        net.train()
        return result

    started = time.time()
    for step in range(steps + 1):
        if step % eval_every == 0:
            print(f"step {step} ({time.time() - started:.0f} s): held-out accuracy {evaluate()}", flush=True)
        if step == steps:
            break
        idx = rng.integers(0, len(src), batch)
        scores = net(to_pixels(np.repeat(src[idx], 4, 0)), to_pixels(var[idx].reshape(-1, 64, 64, 3)),
                     word_ids[idx].repeat_interleave(4, 0)).view(batch, 4)
        d = torch.from_numpy(distance[idx])
        gap = d[:, j] - d[:, i]  # > 0: variant i is nearer the target
        keep = gap.abs() > margin
        target_scores = net(to_pixels(src[idx]), to_pixels(tgt[idx]), word_ids[idx])
        loss = F.binary_cross_entropy_with_logits((target_scores[:, None] - scores)[d > margin],
                                                  torch.ones_like(scores)[d > margin])
        if keep.any():
            loss = loss + F.binary_cross_entropy_with_logits((scores[:, i] - scores[:, j])[keep], (gap > 0).float()[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("out", type=Path)
    s.add_argument("--start", type=int, default=0)
    s.add_argument("--requests", type=int, default=1024)
    t = sub.add_parser("train")
    t.add_argument("data", type=Path)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--margin", type=float, default=5e-4)
    t.add_argument("--eval", action="append", default=[], help="SIM_HOME:TEST_REQUESTS (repeatable)")
    t.add_argument("--eval-every", type=int, default=500)
    args = ap.parse_args()
    if args.command == "sample":
        sample(args.out, args.start, args.requests)
    else:
        train(args.data, args.steps, args.margin, args.eval, args.eval_every)


if __name__ == "__main__":
    main()
