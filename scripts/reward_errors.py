"""Where a reward model goes wrong on a simulated store's held-out requests (docs/reward.md).

    python scripts/reward_errors.py SIM_HOME REWARD_MODEL [--test-requests 300] [--sheet errors.png]

Prints pairwise accuracy against the noise-free order for the reward model, one simulated
annotator, CLIP direction with the captions and two scorers no reward model can be (they say what
the pairs ask for): "target", the pixel distance of each variant to the request's nearest clean
toy target (a scorer that knew the answer image), and "consensus", its mean pixel distance to the
request's other variants (how typical of the editor it is), by quality gap (under 0.05, 0.05-0.14, 0.14
and over) and by edit kind, on the experiment's split (`split_experiment`: the last
`--test-requests` requests by toy seed), and 95% intervals of the reward model's lead over the
annotator and over CLIP, from a bootstrap over requests (pairs of one request are not
independent: four variants that all failed alike give six pairs that stand or fall together). `--sheet` draws the requests with a big-gap pair the
model orders wrongly: source, then each variant with its true quality (q) and raw reward (s).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hive import toy  # noqa: E402
from hive.reward import RewardModel  # noqa: E402
from hive.simulate import score_agreement, truly_ordered_pairs  # noqa: E402
from hive.train_reward import (ImageCache, bootstrap_lead, clip_direction_scores, rankings_from_db,  # noqa: E402
                               score_rankings, split_experiment)

GAPS = ((0.0, 0.05), (0.05, 0.14), (0.14, math.inf))


def stored_kinds(home: Path, request_ids: set[int]) -> dict[int, str]:
    """The toy edit kind `simulate` recorded in each request's params."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import EditRequest

    with session_scope(f"sqlite:///{home / 'hive.db'}", write=False) as s:
        rows = s.execute(select(EditRequest.id, EditRequest.params).where(EditRequest.id.in_(request_ids))).all()
    return {int(i): (p or {}).get("kind", "unknown") for i, p in rows}


def reference_scores(r, cache: ImageCache) -> tuple[list[float], list[float]]:
    """Minus each variant's mean squared pixel distance (0-1 channels) to the nearest clean toy
    target of the request's seed (`toy.admissible_targets`: an added or moved object at any offset
    in its cell), and minus its mean distance to the request's other variants."""
    variants = np.stack([np.asarray(cache(p), dtype=np.float32) / 255 for p in r.variant_paths])
    targets = np.stack([np.asarray(t, dtype=np.float32) / 255
                        for t in toy.admissible_targets(toy.sample_example(r.toy_seed).edit)])
    between = ((variants[:, None] - variants[None]) ** 2).mean(axis=(2, 3, 4))  # (n, n), 0 on the diagonal
    to_target = -((variants[:, None] - targets[None]) ** 2).mean(axis=(2, 3, 4)).min(axis=1)
    return to_target.tolist(), (-between.sum(1) / (len(variants) - 1)).tolist()


def agreement(q: list[float], scores: list[float], a: int, b: int) -> float:
    """`hive.simulate.score_agreement` on the one pair (a, b): 1 right, 0 wrong, 0.5 tied scores."""
    return score_agreement([q[a], q[b]], [scores[a], scores[b]])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("home", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--test-requests", type=int, default=300)
    ap.add_argument("--sheet", type=Path)
    args = ap.parse_args()
    rankings = rankings_from_db(f"sqlite:///{args.home / 'hive.db'}", home=args.home)
    _, test = split_experiment(rankings, args.test_requests)
    model = RewardModel.from_pretrained(args.model)
    cache = ImageCache()
    rewards = score_rankings(model, test, cache)
    captions = clip_direction_scores(model.clip, model.tokenizer, test, cache)
    kinds = stored_kinds(args.home, {r.request_id for r in test})
    # gap, kind, right by: reward model, annotator, CLIP captions, target, consensus; request
    rows = []
    for r, s, c in zip(test, rewards, captions):
        q = list(r.true_quality)
        unranked = len(q) + 1  # a variant the annotator left unranked comes after every ranked one
        by_rank = [-(unranked if k is None else k) for k in r.ranks]  # higher is better, as the scores
        to_target, to_others = reference_scores(r, cache)
        for a, b, _ in truly_ordered_pairs(q):
            rows.append((abs(q[a] - q[b]), kinds[r.request_id],
                         *(agreement(q, x, a, b) for x in (s, by_rank, c, to_target, to_others)), r.request_id))
    print(f"{'pairs':<22}{'n':>5}  reward  annotator  CLIP(captions)  target  consensus")

    def line(name: str, sel: list) -> None:
        if sel:
            m = np.array([x[2:7] for x in sel]).mean(0)
            print(f"{name:<22}{len(sel):>5}  {m[0]:.3f}   {m[1]:.3f}      {m[2]:.3f}           {m[3]:.3f}   {m[4]:.3f}")
    line("all", rows)
    for lo, hi in GAPS:
        line(f"gap {lo:g}-{hi:g}", [x for x in rows if lo <= x[0] < hi])
    for kind in sorted({x[1] for x in rows}):
        line(kind, [x for x in rows if x[1] == kind])
    for name, column in (("annotator", 3), ("CLIP(captions)", 4)):
        per_request: dict[int, list[float]] = {}
        for x in rows:
            acc = per_request.setdefault(x[-1], [0.0, 0.0, 0])
            acc[0], acc[1], acc[2] = acc[0] + x[2], acc[1] + x[column], acc[2] + 1
        lead = bootstrap_lead(np.array(list(per_request.values())))
        print(f"reward model minus {name}: {lead['lead']:+.3f} "
              f"(95% bootstrap interval over requests {lead['low']:+.3f} to {lead['high']:+.3f})")
    if args.sheet:
        wrong = [(r, s) for r, s in zip(test, rewards)
                 if any(abs(r.true_quality[a] - r.true_quality[b]) >= GAPS[-1][0] and (s[a] > s[b]) != (t > 0)
                        for a, b, t in truly_ordered_pairs(r.true_quality))][:16]
        size = 96
        columns = 1 + max((len(r.variant_paths) for r, _ in wrong), default=4)
        sheet = Image.new("RGB", (size * columns, (size + 28) * max(len(wrong), 1)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (r, s) in enumerate(wrong):
            y = i * (size + 28)
            draw.text((2, y), r.instruction[:80], fill="black")
            sheet.paste(cache(r.source_path).resize((size, size)), (0, y + 12))
            for v, path in enumerate(r.variant_paths):
                sheet.paste(cache(path).resize((size, size)), (size * (v + 1), y + 12))
                draw.text((size * (v + 1) + 2, y + size + 13), f"q{r.true_quality[v]:.2f} s{s[v]:+.2f}", fill="black")
        sheet.save(args.sheet)
        print(f"{len(wrong)} requests with a misordered big-gap pair drawn in {args.sheet}")


if __name__ == "__main__":
    main()
