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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hive.files import write_json_atomic  # noqa: E402
from hive.reward import RewardModel  # noqa: E402
from hive.train_reward import (ImageCache, clip_direction_scores, format_lead, lead_over_annotator,  # noqa: E402
                               lead_over_scorer, rankings_from_db, score_rankings, split_experiment,
                               true_order_accuracy)


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
    both = last + first  # each half scored by the model that held it out
    results = []
    for k, (f, r) in enumerate(zip(forward, reverse)):
        fwd = RewardModel.from_pretrained(f)
        scores = score_rankings(fwd, last, cache) + score_rankings(RewardModel.from_pretrained(r), first, cache)
        if k == 0:  # the backbone as loaded: the same for every model of one backbone
            captions = clip_direction_scores(fwd.clip, fwd.tokenizer, both, cache)
            instruction = clip_direction_scores(fwd.clip, fwd.tokenizer, both, cache, use_captions=False)
            baselines = {"clip_direction_accuracy": true_order_accuracy(both, captions)["accuracy"],
                         "clip_instruction_direction_accuracy": true_order_accuracy(both, instruction)["accuracy"]}
        accuracy = true_order_accuracy(both, scores)
        row = {"forward": str(f), "reverse": str(r), "true_pair_accuracy": accuracy["accuracy"],
               "true_pairs": accuracy["pairs"], "lead_over_annotator": lead_over_annotator(both, scores),
               "lead_over_clip_direction": lead_over_scorer(both, scores, captions),
               "lead_over_clip_instruction_direction": lead_over_scorer(both, scores, instruction)}
        results.append(row)
        print(f"{label(f)} + {label(r)}: {row['true_pair_accuracy']:.3f} on {row['true_pairs']} pairs; annotator lead "
              f"{format_lead(row['lead_over_annotator'])}; CLIP captions {baselines['clip_direction_accuracy']:.3f}, "
              f"lead {format_lead(row['lead_over_clip_direction'])}; CLIP instruction "
              f"{baselines['clip_instruction_direction_accuracy']:.3f}", flush=True)
    if args.json:
        write_json_atomic(args.json, {"home": str(args.home), "baselines": baselines, "results": results})


if __name__ == "__main__":
    main()
