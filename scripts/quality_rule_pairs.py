"""How many held-out pairs each quality rule leaves untied, by edit kind (docs/reward.md, session 27).

    python scripts/quality_rule_pairs.py SIM_HOME [--test-requests 300]

Before session 27 a variant's noise-free quality was judged against the dataset's one clean
target; since, against the best of `toy.admissible_targets` (an added or moved object anywhere
within its cell's random offset). The store keeps the new quality; this judges the same variant
images the old way and counts, per kind, the pairs of the experiment's held-out requests that
each rule does not tie (the pairs every accuracy against the noise-free order is measured on).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hive import toy  # noqa: E402
from hive.simulate import quality, truly_ordered_pairs  # noqa: E402
from hive.train_reward import ImageCache, Ranking, rankings_from_db, split_experiment  # noqa: E402


def untied_pairs_by_kind(rankings: list[Ranking], cache: ImageCache) -> dict[str, tuple[int, int, int]]:
    """Per kind: pairs the old rule orders, pairs the stored (new) quality orders, pairs both order."""
    old_n: collections.Counter = collections.Counter()
    new_n: collections.Counter = collections.Counter()
    both: collections.Counter = collections.Counter()
    seen: set[int] = set()
    for r in rankings:
        if r.request_id in seen or r.true_quality is None or r.toy_seed is None:
            continue
        seen.add(r.request_id)
        ex = toy.sample_example(r.toy_seed)
        old = [quality(toy.judge(ex.input_image, ex.clean_image, cache(p))) for p in r.variant_paths]
        by_old = {(a, b) for a, b, _ in truly_ordered_pairs(old)}
        by_new = {(a, b) for a, b, _ in truly_ordered_pairs(r.true_quality)}
        kind = ex.edit.kind
        old_n[kind], new_n[kind], both[kind] = old_n[kind] + len(by_old), new_n[kind] + len(by_new), both[kind] + len(by_old & by_new)
    return {k: (old_n[k], new_n[k], both[k]) for k in toy.EDIT_KINDS if old_n[k] or new_n[k]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path, help="a simulated store (reward-experiment's OUT/home)")
    parser.add_argument("--test-requests", type=int, default=300)
    args = parser.parse_args()
    rankings = rankings_from_db(url=f"sqlite:///{args.home / 'hive.db'}", home=args.home)
    _, test = split_experiment(rankings, args.test_requests)
    counts = untied_pairs_by_kind(test, ImageCache())
    print(f"{'kind':<12}{'old rule':>10}{'new rule':>10}{'both':>8}")
    for kind, (o, n, b) in counts.items():
        print(f"{kind:<12}{o:>10}{n:>10}{b:>8}")
    old_all, new_all, both_all = (sum(column) for column in zip(*counts.values()))
    print(f"{'all':<12}{old_all:>10}{new_all:>10}{both_all:>8}")


if __name__ == "__main__":
    main()
