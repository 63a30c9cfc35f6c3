"""Several reward experiments' learning curves on one chart (docs/reward.md figures).

    python scripts/reward_curves.py OUT.png "with the prior=runs/rw38/report.json" \
        "without the prior=runs/rw39/report.json"

The baselines (one annotator, CLIP direction, random) come from the first report: they depend on
the held-out requests only, so reports of one simulation share them."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, specs: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    first = None
    for k, spec in enumerate(specs):
        label, path = spec.split("=", 1)
        report = json.loads(Path(path).read_text())
        first = first or report
        xs = [p["requests"] for p in report["curve"]]
        ax.plot(xs, [p["true_pair_accuracy"] for p in report["curve"]], "-o", color=f"C{k}", label=f"reward model, {label}")
        if all(p.get("true_pair_accuracy_min") is not None and p.get("repeats", 1) > 1 for p in report["curve"]):
            ax.fill_between(xs, [p["true_pair_accuracy_min"] for p in report["curve"]],
                            [p["true_pair_accuracy_max"] for p in report["curve"]], color=f"C{k}", alpha=0.15)
    xs = [p["requests"] for p in first["curve"]]
    base = first["curve"][0]
    for key, label, style in (("single_annotator_accuracy", "one simulated annotator", "--"),
                              ("clip_direction_accuracy", "CLIP direction (captions)", ":"),
                              ("random_accuracy", "random scorer", "-.")):
        ax.plot([min(xs), max(xs)], [base[key]] * 2, linestyle=style, color="0.4", label=label)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("training requests (one ranking each)")
    ax.set_ylabel("held-out pair accuracy vs noise-free order")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
