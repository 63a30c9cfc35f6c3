"""The reward experiment's split turned round: train on its held-out requests, test on its training ones.

    python scripts/reward_reverse_split.py SIM_HOME OUT [--test-requests 300] [--repeats 2]
        [--setting "no residual=--no-residual" ...] [--json OUT/reverse.json]

`hive reward-experiment` holds out the last `--test-requests` requests by toy seed and trains on
the others. A setting chosen by looking at those held-out pairs is measured on the requests it
was chosen on; this trains the same reward models on the held-out requests instead and scores
them on the first ones (only simulations of 2 x `--test-requests` requests, as the experiment's
600), a second held-out set that no choice looked at (session 34, docs/reward.md). Each
`--setting "LABEL=FLAGS"` is `train-reward` flags on top of the defaults; "defaults" always runs.
Prints and writes, per setting and repeat (seed 0, 1, ...), the held-out accuracy against the
noise-free order, one annotator's and CLIP direction's on the same pairs, and the leads with
their 95% intervals over requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hive.cli import _reward_config, build_parser  # noqa: E402
from hive.files import write_json_atomic  # noqa: E402
from hive.train_reward import (RewardTrainConfig, format_lead, rankings_from_db, split_experiment,  # noqa: E402
                               train_reward)

KEYS = ("true_pair_accuracy", "single_annotator_accuracy", "clip_direction_accuracy",
        "clip_instruction_direction_accuracy", "lead_over_annotator", "lead_over_clip_direction", "test_true_pairs")


def setting_config(flags: str) -> RewardTrainConfig:
    """`train-reward` flags -> the config the CLI would train with."""
    return _reward_config(build_parser().parse_args(["train-reward", *shlex.split(flags)]))


def reverse_split(rankings: list, test_requests: int) -> tuple[list, list]:
    """(train, test): the experiment's held-out requests to train on, its training requests to test on."""
    first, last = split_experiment(rankings, test_requests)
    if len({r.request_id for r in first}) != len({r.request_id for r in last}):
        raise ValueError("the reverse split needs as many training requests as held-out ones")
    return last, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("home", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--test-requests", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--setting", action="append", default=[], help='"LABEL=train-reward flags"')
    ap.add_argument("--json", type=Path, help="default: OUT/reverse.json")
    args = ap.parse_args()
    settings = {"defaults": ""} | dict(s.split("=", 1) for s in args.setting)
    rankings = rankings_from_db(f"sqlite:///{args.home / 'hive.db'}", home=args.home)
    train, test = reverse_split(rankings, args.test_requests)
    results: dict[str, list[dict]] = {}
    for label, flags in settings.items():
        base = setting_config(flags)
        for k in range(args.repeats):
            config = dataclasses.replace(base, seed=base.seed + k)
            run = args.out / f"{label.replace(' ', '-')}-seed{config.seed}"
            report = train_reward(rankings, run, config, split=(train, test), progress=False)
            r = {"seed": config.seed, **{key: report[key] for key in KEYS}}
            results.setdefault(label, []).append(r)
            print(f"{label} seed {config.seed}: {r['true_pair_accuracy']:.3f} on {r['test_true_pairs']} pairs; "
                  f"one annotator {r['single_annotator_accuracy']:.3f}, CLIP captions "
                  f"{r['clip_direction_accuracy']:.3f}, instruction {r['clip_instruction_direction_accuracy']:.3f}; "
                  f"lead over the annotator {format_lead(r['lead_over_annotator'])}, "
                  f"over CLIP captions {format_lead(r['lead_over_clip_direction'])}", flush=True)
    write_json_atomic(args.json or args.out / "reverse.json",
                      {"home": str(args.home), "settings": settings, "results": results})


if __name__ == "__main__":
    main()
