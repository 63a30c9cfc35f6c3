"""The dashboard's numbers and pictures, read from the feedback store (`db.queries`)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sqlalchemy import select  # noqa: E402

from db import queries  # noqa: E402
from db.engine import session_scope  # noqa: E402
from db.models import ModelVersion  # noqa: E402
from hive_app.queue import gold_accuracy  # noqa: E402


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="#555")
    ax.set_axis_off()


def _fig(w: float = 6, h: float = 3.2) -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(w, h), dpi=90)
    return fig, ax


def win_rate_table(session) -> pd.DataFrame:
    names = dict(session.execute(select(ModelVersion.id, ModelVersion.name)).all())
    df = queries.comparison_summary(session)
    rows = []
    for r in df.itertuples():
        decided = r.wins_1 + r.wins_2
        lo, hi = wilson(r.wins_1, decided)
        rows.append({"version 1": names.get(r.version_1), "version 2": names.get(r.version_2), "wins 1": r.wins_1,
                     "wins 2": r.wins_2, "ties / both bad": r.ties, "votes": r.n,
                     "win rate 1 (decided)": round(r.wins_1 / decided, 3) if decided else None,
                     "95% CI": f"{lo:.2f}–{hi:.2f}" if decided else "–"})
    return pd.DataFrame(rows, columns=["version 1", "version 2", "wins 1", "wins 2", "ties / both bad", "votes",
                                       "win rate 1 (decided)", "95% CI"])


def build() -> dict:
    """Everything the Dashboard tab shows: figures, tables and a summary line."""
    plt.close("all")
    with session_scope(write=False) as s:
        rankings = queries.rankings_frame(s).drop_duplicates("ranking_id")
        stats = queries.annotator_stats(s)
        agree = queries.agreement(s)
        gold = gold_accuracy(s)
        wins = win_rate_table(s)
        versions = list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))

    # rankings over time
    fig1, ax = _fig()
    if rankings.empty:
        _empty(ax, "no rankings yet")
    else:
        times = rankings["created_at"].sort_values()
        ax.plot(times, range(1, len(times) + 1), drawstyle="steps-post", marker=".")
        ax.set_ylim(0, len(times) + 1)
        ax.set_title("rankings over time (cumulative)")
        ax.set_ylabel("rankings")
        fig1.autofmt_xdate()

    # per annotator: counts and gold accuracy
    fig2, ax = _fig()
    if stats.empty:
        _empty(ax, "no annotators yet")
    else:
        top = stats.sort_values("n_rankings", ascending=False).head(15)
        ax.barh(top["annotator"], top["n_rankings"], color="#4c78a8")
        ax.invert_yaxis()
        ax.set_title("rankings per annotator")
    fig2.tight_layout()

    fig3, ax = _fig()
    if not gold:
        _empty(ax, "no gold items ranked yet (queue a toy dataset: python -m hive queue)")
    else:
        rows = sorted(gold.values(), key=lambda r: r["annotator"] or "")
        accs = [r["accuracy"] for r in rows]
        errs = [[a - wilson(r["correct"], r["gold"])[0] for a, r in zip(accs, rows)],
                [wilson(r["correct"], r["gold"])[1] - a for a, r in zip(accs, rows)]]
        ax.barh([f"{r['annotator']} (n={r['gold']})" for r in rows], accs, xerr=errs, color="#f58518")
        ax.set_xlim(0, 1)
        ax.set_title("accuracy on gold items (95% CI)")
    fig3.tight_layout()

    # win rates between versions
    fig4, ax = _fig()
    if wins.empty:
        _empty(ax, "no blind A/B votes yet (Compare tab)")
    else:
        labels, rates, lows, highs = [], [], [], []
        for r in wins.itertuples(index=False):
            decided = r[2] + r[3]
            if not decided:
                continue
            lo, hi = wilson(r[2], decided)
            labels.append(f"{r[0]} vs {r[1]}")
            rates.append(r[2] / decided)
            lows.append(rates[-1] - lo)
            highs.append(hi - rates[-1])
        if labels:
            ax.barh(labels, rates, xerr=[lows, highs], color="#54a24b")
            ax.axvline(0.5, color="#888", lw=1, ls="--")
            ax.set_xlim(0, 1)
            ax.set_title("win rate of version 1 (decided votes, 95% CI)")
        else:
            _empty(ax, "only ties so far")
    fig4.tight_layout()

    # reward-model accuracy per version, and editor success per version
    fig5, ax = _fig()
    reward = [(v.name, v.metrics.get("heldout_pair_accuracy")) for v in versions if v.kind == "reward"]
    reward = [(n, a) for n, a in reward if isinstance(a, (int, float))]
    editors = [(v.name, v.metrics.get("toy_success")) for v in versions if v.kind == "editor"]
    editors = [(n, a) for n, a in editors if isinstance(a, (int, float))]
    if not reward and not editors:
        _empty(ax, "no model metrics yet (run an evaluate job in Admin; reward models record "
                   "heldout_pair_accuracy)")
    else:
        bars = [(f"reward {n}", a) for n, a in reward] + [(f"editor {n} (toy success)", a) for n, a in editors]
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color=["#b279a2"] * len(reward) + ["#4c78a8"] * len(editors))
        ax.set_xlim(0, 1)
        ax.set_title("reward-model pair accuracy / editor toy success per version")
    fig5.tight_layout()

    # trade-off: CLIP image similarity vs directional similarity per version
    fig6, ax = _fig()
    curves = [(v.name, v.metrics.get("tradeoff")) for v in versions if v.kind == "editor"]
    curves = [(n, c) for n, c in curves if isinstance(c, list) and c]
    if not curves:
        _empty(ax, "no trade-off sweeps recorded yet (an editor version's metrics['tradeoff']: "
                   "[{image_guidance, clip_image, clip_direction}, ...])")
    else:
        for name, c in curves:
            ax.plot([p["clip_direction"] for p in c], [p["clip_image"] for p in c], marker="o", label=name)
        ax.set_xlabel("CLIP directional similarity")
        ax.set_ylabel("CLIP image similarity")
        ax.legend(fontsize=8)
        ax.set_title("trade-off over image guidance")
    fig6.tight_layout()

    table = stats.copy()
    if not table.empty:
        table["gold accuracy"] = [round(gold[a]["accuracy"], 3) if a in gold else None for a in table["annotator_id"]]
        table = table.drop(columns=["annotator_id"]).round(3)
    pw = "–" if agree["pairwise_agreement"] is None else f"{agree['pairwise_agreement']:.2f}"
    alpha = "–" if agree["krippendorff_alpha"] is None else f"{agree['krippendorff_alpha']:.2f}"
    summary = (f"**{len(rankings)} rankings** by **{len(stats)} annotators**. Agreement on "
               f"{agree['n_items']} requests ranked by two or more: pairwise {pw}, Krippendorff's α {alpha}.")
    return {"summary": summary, "over_time": fig1, "per_annotator": fig2, "gold": fig3, "win_rates": fig4,
            "models": fig5, "tradeoff": fig6, "annotators": table, "wins": wins}
