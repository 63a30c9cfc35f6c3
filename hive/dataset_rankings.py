"""Rankings that the editor's training data implies, added to the reward model's training rankings.

A few hundred rankings are too few to teach a reward head what a wrong edit looks like, but
the edit dataset the editor learned from already shows it: its target for (source,
instruction) beats that edit done wrongly. One dataset ranking holds the dataset's target
(rank 1) and three corruptions of it from the toy noise model (`toy.corrupt`: the wrong object,
part of the change, an extra change, or no change; rank 2, tied). All four variants go through
the editor's VAE (encode, decode) so that they look like decoded edits rather than crisp
renders.

Dataset rankings join every ensemble member's fitted rankings, never its validation fold or
the held-out test, so accuracy is still measured on annotators' rankings only. They use
neither the judge nor any noise-free quality: only the toy training distribution's targets,
the same data the editor trains on. Measured on the toy simulations in docs/reward.md.

Toy world only: for real photos the same idea would rank an edit dataset's targets above
corruptions of them, and that is not built, so `resolve_count` turns this off for any other
backbone.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from hive import toy
from hive.data import TOY_TRAIN_SEED_BASE

# Inside the toy training distribution, past the seeds the shipped editor's training drew
# (under 101M), and far from the simulation's (hive.simulate.SIM_SEED_BASE, 500M).
DATASET_RANKING_SEED_BASE = TOY_TRAIN_SEED_BASE + 50_000_000
CORRUPTIONS_PER_RANKING = 3
KEY_PREFIX = "dataset-ranking:"  # the image keys of `ImageCache`: these images live in memory, not on disk


def resolve_count(requested: int | None, toy_backbone: bool) -> int:
    """How many dataset rankings to use: `requested`, or by default 1000 with a toy backbone and
    0 otherwise (toy scenes would only mislead a real-photo reward model)."""
    if requested is not None:
        if requested < 0:
            raise ValueError("dataset_rankings must be >= 0")
        return requested
    return 1000 if toy_backbone else 0


@functools.lru_cache(maxsize=2)
def dataset_examples(n: int, vae_dir: str, seed_base: int = DATASET_RANKING_SEED_BASE, noise: float = 0.0,
                     mistakes: bool = False) -> tuple[tuple[int, str, Image.Image, tuple[Image.Image, ...]], ...]:
    """(seed, instruction, source, (target, corruption, corruption, corruption)) for `n` toy
    training seeds; kept in memory for the process (an experiment trains several models on them).
    `noise` > 0: the target is the one a dataset with that much training noise holds (`toy.sample_example`),
    itself a corruption in about that share of the rankings. `mistakes`: the last corruption is an
    editor's mistake (`toy.editor_mistake`: the named change on another object, a move drawn as a
    copy, an add in another cell) where the edit allows one; the first two are the same either way."""
    from diffusers import AutoencoderKL

    from hive.train_vae import vae_roundtrip

    examples, renders = [], []
    for k in range(n):
        ex = toy.sample_example(seed_base + k, noise=noise)
        rng = np.random.default_rng([seed_base + k, 11])
        examples.append(ex)
        wrong = [toy.corrupt(ex.edit, rng)[0] for _ in range(CORRUPTIONS_PER_RANKING)]
        mistake = toy.editor_mistake(ex.edit, np.random.default_rng([seed_base + k, 12])) if mistakes else None
        if mistake is not None:
            wrong[-1] = mistake[0]
        renders += [ex.edited_image] + wrong
    decoded = vae_roundtrip(AutoencoderKL.from_pretrained(vae_dir).eval(), np.stack([np.asarray(im) for im in renders]))
    per = 1 + CORRUPTIONS_PER_RANKING
    return tuple((seed_base + k, ex.edit.instruction, ex.input_image,
                  tuple(Image.fromarray(a) for a in decoded[k * per:(k + 1) * per])) for k, ex in enumerate(examples))


def dataset_rankings(n: int, cache, vae_dir: str | Path, noise: float = 0.0, mistakes: bool = False) -> list:
    """`n` dataset rankings, their images put into `cache` (a `train_reward.ImageCache`) under
    `KEY_PREFIX` keys. Request ids are negative, apart from every stored request's. `noise`: that of
    the edit dataset the rankings come from, `mistakes` (see `dataset_examples`)."""
    from hive.train_reward import Ranking

    rankings = []
    for seed, instruction, source, variants in dataset_examples(n, str(vae_dir), noise=noise, mistakes=mistakes):
        src_key = f"{KEY_PREFIX}{seed}:source"
        cache.images[src_key] = source
        keys = []
        for v, image in enumerate(variants):
            keys.append(f"{KEY_PREFIX}{seed}:{v}")
            cache.images[keys[-1]] = image
        rankings.append(Ranking(ranking_id=-1 - len(rankings), request_id=-1 - len(rankings), annotator_id=-1,
                                is_simulated=True, instruction=instruction, source_path=src_key,
                                variant_ids=list(range(len(keys))), variant_paths=keys,
                                ranks=[1] + [2] * CORRUPTIONS_PER_RANKING, from_dataset=True))
    return rankings
