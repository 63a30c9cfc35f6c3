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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as scripts/reward_errors.py
from hive.train_reward import finish_curve_chart, plot_reward_series  # noqa: E402


def main(out: str, specs: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    reports = []
    for k, spec in enumerate(specs):
        label, path = spec.split("=", 1)
        reports.append(json.loads(Path(path).read_text()))
        plot_reward_series(ax, reports[-1]["curve"], f"reward model, {label}", f"C{k}")
    xs = [p["requests"] for p in reports[0]["curve"]]
    base = reports[0]["curve"][0]
    for key, label, style in (("single_annotator_accuracy", "one simulated annotator", "--"),
                              ("clip_direction_accuracy", "CLIP direction (captions)", ":"),
                              ("random_accuracy", "random scorer", "-.")):
        ax.plot([min(xs), max(xs)], [base[key]] * 2, linestyle=style, color="0.4", label=label)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    finish_curve_chart(fig, ax, out)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
