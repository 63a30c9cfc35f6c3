"""How much a change locator could add to a reward model on a simulated store (docs/reward.md, session 29).

    python scripts/locator_headroom.py SIM_HOME REWARD_MODEL [--test-requests 300] [--locator-examples 20000]
        [--locator-pixels]

A change locator says where the instruction should change the source (`hive.change_locator`); the
reward model's worst pairs are binding mistakes (the named change on the wrong object), which a
locator that knew the place would catch. This compares, on the experiment's held-out requests
(`split_experiment`) and on the vision tower's patch grid, two maps of the expected change:

- "oracle": the patches that any admissible clean toy target changes (`toy.admissible_targets`),
  a map no reward model has (it reads the toy seed): the headroom;
- "locator": the learned `ChangeLocator`, fitted on `--locator-examples` toy training edits.

For each map: cover (the share of the expected place that changed) minus spill (the share of the
rest that changed), alone and added to the reward model's score (both standardised over the
pairs, weight 1: one fixed rule, not tuned), as pairwise accuracy against the noise-free order by
quality gap and by kind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hive import toy  # noqa: E402
from hive.change_locator import DEFAULT_STEPS, changed_share, cover_and_spill, toy_change_locator  # noqa: E402
from hive.files import save_figure_atomic, write_json_atomic  # noqa: E402
from hive.reward import RewardModel  # noqa: E402
from hive.simulate import truly_ordered_pairs  # noqa: E402
from hive.train_reward import ImageCache, rankings_from_db, score_rankings, split_experiment  # noqa: E402
from reward_errors import GAPS  # noqa: E402  (scripts/, the script's own folder, is on sys.path)


def cover_minus_spill(changed: torch.Tensor, expected: torch.Tensor) -> np.ndarray:
    """(variants, patches) changed shares against an expected map in [0, 1], (patches,) or one per row."""
    cover, spill = cover_and_spill(changed, expected)
    return (cover - spill).numpy()


def accuracy(diff: np.ndarray, truth: np.ndarray) -> float:
    """`hive.simulate.score_agreement`'s rule (1 right, 0.5 tied, 0 wrong) over arrays of pair
    differences, so that any subset of the pairs can be scored."""
    return float(np.mean(np.where(diff == 0, 0.5, (np.sign(diff) == np.sign(truth)).astype(float))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("home", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--test-requests", type=int, default=300)
    ap.add_argument("--locator-examples", type=int, default=20_000)
    ap.add_argument("--locator-steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--locator-pixels", action="store_true", help="the locator with the pixel stem (session 36)")
    ap.add_argument("--json", type=Path, help="write the table here")
    ap.add_argument("--plot", type=Path, help="draw accuracy by quality gap as a PNG")
    args = ap.parse_args()
    rankings = rankings_from_db(f"sqlite:///{args.home / 'hive.db'}", home=args.home)
    _, test = split_experiment(rankings, args.test_requests)
    cache = ImageCache()
    reward_model = RewardModel.from_pretrained(args.model)
    rewards = score_rankings(reward_model, test, cache)
    backbone = reward_model.config.backbone
    probe = RewardModel.from_backbone(backbone, change_locator=True, locator_pixels=args.locator_pixels)
    state, fit = toy_change_locator(backbone, args.locator_examples, args.locator_steps, pixels=args.locator_pixels)
    probe.change_locator.load_state_dict(state)
    print(f"locator fitted on {fit['examples']} toy edits, {fit['steps']} steps: {fit['val_mass_on_changed']:.3f} of its mass on the "
          f"{fit['val_changed_share']:.3f} of patches that change (held out)")
    # per pair: true gap, kind, reward diff, oracle diff, locator diff
    gaps, kinds, diffs = [], [], []
    with torch.no_grad():
        for r, s in zip(test, rewards):
            source = cache(r.source_path)
            variants = [cache(p) for p in r.variant_paths]
            edit = toy.sample_example(r.toy_seed).edit
            targets = toy.admissible_targets(edit)
            oracle = (changed_share(probe, [source] * len(targets), targets).amax(0) > 0).float()
            src = probe.encode_images(probe.pixel_values([source]))
            text = probe.tokenize([r.instruction])
            text = probe.encode_text(text["input_ids"], text["attention_mask"])
            learned = probe.with_expected_change(src, text)["expected_change"][0]
            changed = changed_share(probe, [source] * len(variants), variants)
            o, lo = cover_minus_spill(changed, oracle), cover_minus_spill(changed, learned)
            q = list(r.true_quality)
            for a, b, _ in truly_ordered_pairs(q):
                gaps.append(q[a] - q[b])
                kinds.append(edit.kind)
                diffs.append((s[a] - s[b], o[a] - o[b], lo[a] - lo[b]))
    gap, kind, d = np.array(gaps), np.array(kinds), np.array(diffs)
    z = d / d.std(0).clip(min=1e-12)
    scorers = {"reward model": d[:, 0], "oracle map": d[:, 1], "reward + oracle": z[:, 0] + z[:, 1],
               "locator": d[:, 2], "reward + locator": z[:, 0] + z[:, 2]}
    groups = [("all", np.ones(len(gap), bool))]
    groups += [(f"gap {lo:g}-{hi:g}", (abs(gap) >= lo) & (abs(gap) < hi)) for lo, hi in GAPS]
    groups += [(k, kind == k) for k in sorted(set(kinds))]
    table = {name: {"pairs": int(sel.sum()), **{k: accuracy(x[sel], gap[sel]) for k, x in scorers.items()}}
             for name, sel in groups if sel.any()}
    print(f"{'pairs':<16}{'n':>5}" + "".join(f"{name:>18}" for name in scorers))
    for name, row in table.items():
        print(f"{name:<16}{row['pairs']:>5}" + "".join(f"{row[k]:>18.3f}" for k in scorers))
    if args.json:
        write_json_atomic(args.json, {"home": str(args.home), "model": str(args.model), "locator": fit,
                                      "table": table})
    if args.plot:
        plot(table, list(scorers), args.plot, f"{args.home}: held-out pairs by quality gap")


def plot(table: dict, scorers: list[str], out: Path, title: str) -> None:
    """Grouped bars: each scorer's accuracy on all pairs and on each quality-gap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in table if g == "all" or g.startswith("gap")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(scorers)
    for i, name in enumerate(scorers):
        ax.bar([g + i * width for g in range(len(groups))], [table[g][name] for g in groups], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))],
                  [f"{g} ({table[g]['pairs']} pairs)" for g in groups])
    ax.set_ylim(0.4, 1.02)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("accuracy against the noise-free order")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure_atomic(fig, out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
