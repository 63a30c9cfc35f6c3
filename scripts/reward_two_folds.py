"""A simulation's two halves together: each held-out request scored by a model that did not train on it.

    python scripts/reward_two_folds.py SIM_HOME --forward M1,M2 --reverse R1,R2 [--test-requests 300] [--json F]

`hive reward-experiment` trains on the first requests and holds out the last `--test-requests`
(`--forward`: its models, e.g. OUT/n300 and OUT/n300-seed1); `scripts/reward_reverse_split.py`
trains on those and tests on the first (`--reverse`: its models, e.g. OUT/defaults-seed0 and
OUT/defaults-seed1). Pair k of the two lists scores every request of the simulation once, by the
model that held it out (2-fold cross-fitting), so the accuracy and the leads over one annotator
and CLIP direction (with the target caption, and with the instruction) are measured on all the
simulation's pairs, with 95% intervals from a bootstrap over all its requests (session 34,
docs/reward.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hive.files import write_json_atomic  # noqa: E402
from hive.reward import RewardModel  # noqa: E402
from hive.simulate import score_agreement  # noqa: E402
from hive.train_reward import (ImageCache, Ranking, clip_direction_scores, lead_over_annotator,  # noqa: E402
                               lead_over_scorer, rankings_from_db, score_rankings, split_experiment)


def pair_accuracy(rankings: list[Ranking], scores: list[np.ndarray]) -> tuple[float, int]:
    """Accuracy against the noise-free order over the pairs it does not tie (each request once)."""
    seen, right, pairs = set(), 0.0, 0
    for r, s in zip(rankings, scores):
        if r.true_quality is not None and r.request_id not in seen:
            seen.add(r.request_id)
            a, n = score_agreement(r.true_quality, s)
            right, pairs = right + a, pairs + n
    return right / max(pairs, 1), pairs


def cross_fitted_scores(forward: Path, reverse: Path, first: list[Ranking], last: list[Ranking],
                        cache: ImageCache) -> tuple[list[Ranking], list[np.ndarray], RewardModel]:
    """Every ranking of the simulation with the score of the model that held its request out."""
    fwd, rev = RewardModel.from_pretrained(forward), RewardModel.from_pretrained(reverse)
    return last + first, score_rankings(fwd, last, cache) + score_rankings(rev, first, cache), fwd


def label(model: Path) -> str:
    """A model folder's run name (reward-experiment and train-reward write OUT/<run>/model)."""
    return model.parent.name if model.name == "model" else model.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("home", type=Path)
    ap.add_argument("--forward", required=True, help="comma-separated reward-experiment models")
    ap.add_argument("--reverse", required=True, help="comma-separated reward_reverse_split.py models, as many")
    ap.add_argument("--test-requests", type=int, default=300)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    forward, reverse = [Path(p) for p in args.forward.split(",")], [Path(p) for p in args.reverse.split(",")]
    if len(forward) != len(reverse):
        raise SystemExit("--forward and --reverse need as many models each")
    rankings = rankings_from_db(f"sqlite:///{args.home / 'hive.db'}", home=args.home)
    first, last = split_experiment(rankings, args.test_requests)
    cache = ImageCache()
    results = []
    baselines = None
    for f, r in zip(forward, reverse):
        both, scores, model = cross_fitted_scores(f, r, first, last, cache)
        if baselines is None:  # the backbone as loaded: the same for every model of one backbone
            captions = clip_direction_scores(model.clip, model.tokenizer, both, cache)
            instruction = clip_direction_scores(model.clip, model.tokenizer, both, cache, use_captions=False)
            baselines = {"clip_direction_accuracy": pair_accuracy(both, captions)[0],
                         "clip_instruction_direction_accuracy": pair_accuracy(both, instruction)[0]}
        accuracy, pairs = pair_accuracy(both, scores)
        row = {"forward": str(f), "reverse": str(r), "true_pair_accuracy": accuracy, "true_pairs": pairs,
               "lead_over_annotator": lead_over_annotator(both, scores),
               "lead_over_clip_direction": lead_over_scorer(both, scores, captions),
               "lead_over_clip_instruction_direction": lead_over_scorer(both, scores, instruction)}
        results.append(row)
        la, lc = row["lead_over_annotator"], row["lead_over_clip_direction"]
        print(f"{label(f)} + {label(r)}: {accuracy:.3f} on {pairs} pairs; annotator lead {la['lead']:+.3f} "
              f"({la['low']:+.3f} to {la['high']:+.3f}); CLIP captions {baselines['clip_direction_accuracy']:.3f}, "
              f"lead {lc['lead']:+.3f} ({lc['low']:+.3f} to {lc['high']:+.3f}); CLIP instruction "
              f"{baselines['clip_instruction_direction_accuracy']:.3f}", flush=True)
    if args.json:
        write_json_atomic(args.json, {"home": str(args.home), "baselines": baselines, "results": results})


if __name__ == "__main__":
    main()
