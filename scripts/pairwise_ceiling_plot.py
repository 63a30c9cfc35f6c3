"""How many wins per loss a blind comparison against the baseline can give, by judge success
(docs/paper.md, session 21): the expected blind comparison (hive.evaluate.expected_blind_pairwise,
3 simulated annotators at the calibrated noise) of judged editors against the baseline's judged
edits, the clean target (the ceiling), and editors between the first one named and the clean
target (its failures replaced, in a random order, by the clean target).

    python scripts/pairwise_ceiling_plot.py OUT.png BASELINE/judgements.jsonl \
        "HIVE condition=runs/paper3/eval/shipped-cond-L5/judgements.jsonl" "clean SFT=..."

Every file must judge the same edits (`python -m hive evaluate --n 300 --out DIR`, same --seed).
Writes OUT.png and OUT.json (the figures)."""
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as scripts/reward_curves.py
from hive.evaluate import annotator_quality, expected_blind_pairwise, read_judgements  # noqa: E402
from hive.files import save_figure_atomic, write_json_atomic  # noqa: E402

REPEATS = 100


def judged(path: str, ids: list[str] | None = None) -> tuple[list[str], list[float], list[bool]]:
    """Edit ids, the qualities the simulated annotators see (`annotator_quality`) and judge
    successes of one judgements.jsonl, read once, in `ids` order."""
    rows = read_judgements(Path(path))
    if ids is not None and sorted(rows) != ids:
        raise SystemExit(f"{path} judges other edits than the baseline")
    ids = ids or sorted(rows)
    return ids, [annotator_quality(rows[i]) for i in ids], [bool(rows[i]["success"]) for i in ids]


def main(out: str, baseline: str, specs: list[str]) -> None:
    ids, q_b, base_ok = judged(baseline)
    editors = [(label, *judged(path, ids)[1:]) for label, path in (spec.split("=", 1) for spec in specs)]
    points = []
    for label, q, ok in editors:
        r = expected_blind_pairwise(q, q_b, repeats=REPEATS)
        points.append({"label": label, "success": float(np.mean(ok)), **r})
        print(f"{label}: success {points[-1]['success']:.1%}, wins {r['win_rate']:.1%}, losses {r['loss_rate']:.1%}, "
              f"{r['wins_per_loss']:.2f} wins per loss")
    clean = expected_blind_pairwise([1.0] * len(ids), q_b, repeats=REPEATS)
    print(f"clean target: wins {clean['win_rate']:.1%}, losses {clean['loss_rate']:.1%}, "
          f"{clean['wins_per_loss']:.2f} wins per loss")
    # editors between the first named one and the clean target
    first_label, q, ok = editors[0]
    failed = [k for k, success in enumerate(ok) if not success]
    np.random.default_rng(0).shuffle(failed)
    between = []
    for share in np.linspace(0, 1, 6)[1:-1]:
        fixed = failed[:round(share * len(failed))]
        qa = list(q)
        for k in fixed:
            qa[k] = 1.0
        r = expected_blind_pairwise(qa, q_b, repeats=REPEATS)
        between.append({"success": (len(ids) - len(failed) + len(fixed)) / len(ids), **r})
    base_success = float(np.mean(base_ok))

    fig, ax = plt.subplots(figsize=(7, 5.4))
    xs = [points[0]["success"]] + [b["success"] for b in between] + [1.0]
    ys = [points[0]["wins_per_loss"]] + [b["wins_per_loss"] for b in between] + [clean["wins_per_loss"]]
    ax.plot([100 * x for x in xs], ys, ":", color="grey",
            label=f"{first_label} with failures replaced by the clean target")
    for k, p in enumerate(points):
        ax.plot(100 * p["success"], p["wins_per_loss"], "o", color=f"C{k}", label=p["label"])
    ax.plot(100, clean["wins_per_loss"], "*", color="black", markersize=12, label="the clean target (ceiling)")
    ax.axhline(2.0, color="red", linestyle="--", linewidth=1, label="the issue's target, 2 wins per loss")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xlabel(f"judge success on the same {len(ids)} edits (%; the baseline: {100 * base_success:.1f}%)")
    ax.set_ylabel("wins per loss against the baseline")
    ax.set_title("Blind comparison against the noisy baseline, 3 simulated annotators\n"
                 "(expected over the annotators' noise, from the judged edits)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, Path(out), dpi=120)
    write_json_atomic(Path(out).with_suffix(".json"), {"baseline": baseline, "baseline_success": base_success,
                                                       "editors": points, "clean_target": clean, "between": between})
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
