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


WIN_COLUMNS = ["source", "version 1", "version 2", "wins 1", "wins 2", "ties", "both bad", "votes",
               "win rate 1", "95% CI 1", "win rate 2", "95% CI 2"]


def _win_row(source: str, v1, v2, w1: int, w2: int, ties: int, both_bad: int | None) -> dict:
    """One table row; rates over all votes (ties and "both bad" included), as the paper reports
    them, each with its 95% Wilson interval."""
    n = w1 + w2 + ties + (both_bad or 0)
    row = {"source": source, "version 1": v1, "version 2": v2, "wins 1": w1, "wins 2": w2, "ties": ties,
           "both bad": both_bad, "votes": n}
    for k, w in ((1, w1), (2, w2)):
        lo, hi = wilson(w, n)
        row[f"win rate {k}"] = round(w / n, 3) if n else None
        row[f"95% CI {k}"] = f"{lo:.2f}–{hi:.2f}" if n else "–"
    return row


def win_rate_table(session) -> pd.DataFrame:
    """Blind A/B results per pair of editor versions: people's votes from the Compare tab, and the
    simulated-annotator comparisons that loop rounds record (a candidate's metrics
    `pairwise_vs_serving`: wins/ties/losses of the candidate against the editor it improves on)."""
    versions = list(session.scalars(select(ModelVersion)))
    names = {v.id: v.name for v in versions}
    df = queries.comparison_summary(session)
    rows = [_win_row("people", names.get(r.version_1), names.get(r.version_2), int(r.wins_1), int(r.wins_2),
                     int(r.ties), int(r.both_bad)) for r in df.itertuples()]
    for v in versions:
        pw = v.metrics.get("pairwise_vs_serving") if isinstance(v.metrics, dict) else None
        if isinstance(pw, dict) and all(isinstance(pw.get(k), int) for k in ("wins", "ties", "losses")):
            rows.append(_win_row(f"simulated ({pw.get('annotators', '?')} per input)", v.name,
                                 names.get(v.parent_id, "serving"), pw["wins"], pw["losses"], pw["ties"], None))
    return pd.DataFrame(rows, columns=WIN_COLUMNS)


def tradeoff_curves(versions: list[ModelVersion]) -> dict[str, dict]:
    """Trade-off curves stored in editor versions' metrics (`tradeoff`: a hive.evaluate.tradeoff_curve
    result, recorded by the Admin tab's `tradeoff` job)."""
    curves = {}
    for v in versions:
        c = v.metrics.get("tradeoff") if v.kind == "editor" and isinstance(v.metrics, dict) else None
        if isinstance(c, dict) and isinstance(c.get("points"), list) and c["points"]:
            curves[v.name] = c
    return curves


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

    # per annotator: counts, and agreement with the other annotators on shared requests
    fig2, (ax, ax_agree) = plt.subplots(1, 2, figsize=(6, 3.2), dpi=90, sharey=True)
    if stats.empty:
        _empty(ax, "no annotators yet")
        ax_agree.set_axis_off()
    else:
        top = stats.sort_values("n_rankings", ascending=False).head(15)
        ax.barh(top["annotator"], top["n_rankings"], color="#4c78a8")
        ax.invert_yaxis()
        ax.set_title("rankings per annotator", fontsize=10)
        agree_with = top["agreement_with_others"].astype(float)
        ax_agree.barh(top["annotator"], agree_with.fillna(0.0), color="#72b7b2")
        for y, (a, n) in enumerate(zip(agree_with, top["n_shared_pairs"])):
            ax_agree.text(0.02, y, "no shared requests" if a != a else f"{a:.2f} (n={int(n)})", va="center",
                          fontsize=7)
        ax_agree.set_xlim(0, 1)
        ax_agree.set_title("agreement with others (pairs)", fontsize=10)
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

    # win rates between versions: shares of all votes, with 95% CIs
    fig4, ax = _fig()
    shown = wins[wins["votes"] > 0] if not wins.empty else wins
    if shown.empty:
        _empty(ax, "no blind A/B votes yet (Compare tab)")
    else:
        labels = [f"{r['version 1']} vs {r['version 2']}" + (" (sim.)" if r["source"] != "people" else "")
                  for _, r in shown.iterrows()]
        parts = [("wins 1", "#54a24b"), ("ties", "#bab0ac"), ("both bad", "#e45756"), ("wins 2", "#4c78a8")]
        h = 0.8 / len(parts)
        for j, (col, colour) in enumerate(parts):
            ys, rates, errs = [], [], [[], []]
            for i, (_, r) in enumerate(shown.iterrows()):
                k = r[col] if r[col] == r[col] and r[col] is not None else 0  # NaN/None: not recorded
                lo, hi = wilson(k, int(r["votes"]))
                ys.append(i + (j - 1.5) * h)
                rates.append(k / r["votes"])
                errs[0].append(rates[-1] - lo)
                errs[1].append(hi - rates[-1])
            ax.barh(ys, rates, height=h, xerr=errs, color=colour, label=col.replace(" 1", " (version 1)")
                    .replace(" 2", " (version 2)"), error_kw={"lw": 0.8})
        ax.set_yticks(range(len(labels)), [lb.replace(" vs ", "\nvs ") for lb in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, frameon=False)
        ax.set_title("blind A/B: share of votes (95% CI)", fontsize=10)
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
        ax.set_title("reward pair accuracy / editor toy success", fontsize=10)
    fig5.tight_layout()

    # trade-off: CLIP image similarity vs directional similarity per version (hive.evaluate's plot)
    fig6, ax = _fig(6, 4)
    curves = tradeoff_curves(versions)
    if not curves:
        _empty(ax, "no trade-off sweeps recorded yet (Admin: run a `tradeoff` job)")
    else:
        from hive.evaluate import draw_tradeoff

        draw_tradeoff(ax, curves)
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
