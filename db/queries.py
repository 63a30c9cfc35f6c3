"""The read side: rankings as pandas frames, preference pairs, agreement, counts.

Training reads :func:`pairwise_preferences`; analysis reads :func:`annotator_stats`
and :func:`agreement`. A top-k ranking counts its unranked variants as tied below the
ranked ones: ranked beats unranked, and unranked variants are not compared with each
other. Rankings without ranks (skips, "all bad" without ranks) give no pairs.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import krippendorff
import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.feedback import promoted_version
from db.images import ImageStore
from db.models import (
    TABLE_ORDER,
    Base,
    Comparison,
    EditRequest,
    Image,
    ModelVersion,
    Ranking,
    RankingItem,
    User,
    Variant,
)


def table_counts(session: Session) -> dict[str, int]:
    """Row count of every table, in dependency order."""
    tables = Base.metadata.tables
    return {
        name: int(session.scalar(select(func.count()).select_from(tables[name])) or 0)
        for name in TABLE_ORDER
    }


def promoted_model(session: Session, kind: str) -> ModelVersion | None:
    """The promoted editor or reward model, or None."""
    return promoted_version(session, kind)


def rankings_frame(session: Session) -> pd.DataFrame:
    """One row per (ranking, ranked or rated variant); rankings with no items get one row."""
    stmt = (
        select(
            Ranking.id.label("ranking_id"),
            Ranking.request_id,
            Ranking.annotator_id,
            User.name.label("annotator"),
            User.is_simulated,
            Ranking.top_k,
            Ranking.all_bad,
            Ranking.skip,
            Ranking.seconds,
            Ranking.created_at,
            RankingItem.variant_id,
            RankingItem.rank,
            RankingItem.instruction_following,
            RankingItem.preservation,
            RankingItem.quality,
        )
        .join(User, User.id == Ranking.annotator_id)
        .outerjoin(RankingItem, RankingItem.ranking_id == Ranking.id)
        .order_by(Ranking.id, RankingItem.variant_id)
    )
    result = session.execute(stmt)
    df = pd.DataFrame(result.all(), columns=list(result.keys()))
    for col in ("top_k", "variant_id", "rank", "instruction_following", "preservation", "quality"):
        df[col] = df[col].astype("Int64")
    df["seconds"] = df["seconds"].astype("float64")
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
    return df


@dataclass
class _RankVector:
    """One ranking as ranks over all its request's variants (top-k fills the rest below)."""

    ranking_id: int
    request_id: int
    annotator_id: int
    is_simulated: bool
    all_bad: bool
    ranks: dict[int, int] = field(default_factory=dict)  # variant -> effective rank
    explicit: set[int] = field(default_factory=set)  # variants the annotator ranked

    def outcome(self, u: int, v: int) -> int | None:
        """+1 if u is preferred, -1 if v is, 0 for a tie, None when not judged."""
        if u not in self.explicit and v not in self.explicit:
            return None
        ru, rv = self.ranks[u], self.ranks[v]
        return (ru < rv) - (ru > rv)


def _rank_vectors(session: Session, *, consented_only: bool = False) -> list[_RankVector]:
    stmt = (
        select(Ranking.id, Ranking.request_id, Ranking.annotator_id, User.is_simulated,
               Ranking.all_bad, RankingItem.variant_id, RankingItem.rank)
        .join(User, User.id == Ranking.annotator_id)
        .join(RankingItem, RankingItem.ranking_id == Ranking.id)
        .where(Ranking.skip.is_(False), RankingItem.rank.is_not(None))
        .order_by(Ranking.id, RankingItem.variant_id)
    )
    if consented_only:
        stmt = stmt.join(EditRequest, EditRequest.id == Ranking.request_id).where(
            EditRequest.consent_training.is_(True)
        )
    vectors: dict[int, _RankVector] = {}
    for rid, req, ann, sim, bad, vid, rank in session.execute(stmt):
        vec = vectors.setdefault(rid, _RankVector(rid, req, ann, bool(sim), bool(bad)))
        vec.ranks[vid] = rank
        vec.explicit.add(vid)
    if not vectors:
        return []
    variants_of: dict[int, list[int]] = defaultdict(list)
    requests = {v.request_id for v in vectors.values()}
    for vid, req in session.execute(
        select(Variant.id, Variant.request_id).where(Variant.request_id.in_(requests)).order_by(Variant.id)
    ):
        variants_of[req].append(vid)
    for vec in vectors.values():
        below = max(vec.ranks.values()) + 1
        for vid in variants_of[vec.request_id]:
            vec.ranks.setdefault(vid, below)
    return list(vectors.values())


PAIR_COLUMNS = [
    "ranking_id", "request_id", "annotator_id", "is_simulated", "all_bad",
    "winner_variant_id", "loser_variant_id", "winner_rank", "loser_rank", "tie",
    "instruction", "source_image_path", "winner_image_path", "loser_image_path",
]


def pairwise_preferences(
    session: Session,
    *,
    store: ImageStore | None = None,
    consented_only: bool = True,
    include_simulated: bool = True,
) -> pd.DataFrame:
    """Every judged pair of every ranking, for reward-model training.

    ``tie`` pairs list the lower variant id as "winner". Paths are absolute paths of
    stored PNGs. By default only requests whose owner consented to training are used.
    """
    store = store or ImageStore()
    vectors = [
        v for v in _rank_vectors(session, consented_only=consented_only)
        if include_simulated or not v.is_simulated
    ]
    if not vectors:
        return pd.DataFrame(columns=PAIR_COLUMNS).astype(
            {"tie": bool, "all_bad": bool, "is_simulated": bool}
        )
    requests = {v.request_id for v in vectors}
    req_info = {
        rid: (instr, str(store.home / path))
        for rid, instr, path in session.execute(
            select(EditRequest.id, EditRequest.instruction, Image.path)
            .join(Image, Image.id == EditRequest.source_image_id)
            .where(EditRequest.id.in_(requests))
        )
    }
    variant_path = {
        vid: str(store.home / path)
        for vid, path in session.execute(
            select(Variant.id, Image.path)
            .join(Image, Image.id == Variant.image_id)
            .where(Variant.request_id.in_(requests))
        )
    }
    rows = []
    for vec in vectors:
        instruction, source = req_info[vec.request_id]
        for u, v in itertools.combinations(sorted(vec.ranks), 2):
            out = vec.outcome(u, v)
            if out is None:
                continue
            w, l = (v, u) if out < 0 else (u, v)
            rows.append((
                vec.ranking_id, vec.request_id, vec.annotator_id, vec.is_simulated, vec.all_bad,
                w, l, vec.ranks[w], vec.ranks[l], out == 0,
                instruction, source, variant_path[w], variant_path[l],
            ))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def _pair_agreements(vectors: list[_RankVector]) -> tuple[int, int, dict[int, list[int]]]:
    """(agreeing, compared, per-annotator [agreeing, compared]) over shared requests."""
    by_request: dict[int, list[_RankVector]] = defaultdict(list)
    for v in vectors:
        by_request[v.request_id].append(v)
    agree = total = 0
    per: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for vecs in by_request.values():
        for a, b in itertools.combinations(vecs, 2):
            for u, v in itertools.combinations(sorted(a.ranks), 2):
                oa, ob = a.outcome(u, v), b.outcome(u, v)
                if oa is None or ob is None:
                    continue
                same = int(oa == ob)
                agree += same
                total += 1
                for ann in (a.annotator_id, b.annotator_id):
                    per[ann][0] += same
                    per[ann][1] += 1
    return agree, total, per


def agreement(session: Session) -> dict[str, Any]:
    """Inter-annotator agreement on requests ranked by two or more annotators.

    ``pairwise_agreement``: of all (variant pair, annotator pair) judgements on shared
    requests, the fraction with the same outcome (win, loss or tie).
    ``krippendorff_alpha``: ordinal alpha over (request, variant) units with the
    effective rank as value (``krippendorff`` package). None when undefined.
    """
    vectors = _rank_vectors(session)
    counts: dict[int, int] = defaultdict(int)
    for v in vectors:
        counts[v.request_id] += 1
    shared = [v for v in vectors if counts[v.request_id] >= 2]
    n_items = len({v.request_id for v in shared})
    agree, total, _ = _pair_agreements(shared)
    alpha = None
    if shared:
        annotators = sorted({v.annotator_id for v in shared})
        units = sorted({(v.request_id, vid) for v in shared for vid in v.ranks})
        col = {u: i for i, u in enumerate(units)}
        row = {a: i for i, a in enumerate(annotators)}
        data = np.full((len(annotators), len(units)), np.nan)
        for v in shared:
            for vid, rank in v.ranks.items():
                data[row[v.annotator_id], col[(v.request_id, vid)]] = rank
        try:
            value = float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))
            alpha = value if math.isfinite(value) else None
        except (ValueError, ZeroDivisionError):  # e.g. a single distinct rank value
            alpha = None
    return {
        "pairwise_agreement": agree / total if total else None,
        "krippendorff_alpha": alpha,
        "n_items": n_items,
        "n_annotators": len({v.annotator_id for v in shared}),
        "n_pair_judgements": total,
    }


def annotator_stats(session: Session) -> pd.DataFrame:
    """Per annotator: volume, skips, "all bad", tie rate, speed, agreement with others."""
    df = rankings_frame(session)
    columns = [
        "annotator_id", "annotator", "is_simulated", "n_rankings", "n_skipped", "n_all_bad",
        "tie_rate", "mean_seconds", "median_seconds", "agreement_with_others", "n_shared_pairs",
    ]
    if df.empty:
        return pd.DataFrame(columns=columns)
    per_ranking = df.drop_duplicates("ranking_id")
    g = per_ranking.groupby("annotator_id")
    out = pd.DataFrame({
        "annotator": g["annotator"].first(),
        "is_simulated": g["is_simulated"].first().astype(bool),
        "n_rankings": g.size(),
        "n_skipped": g["skip"].sum().astype(int),
        "n_all_bad": g["all_bad"].sum().astype(int),
        "mean_seconds": g["seconds"].mean(),
        "median_seconds": g["seconds"].median(),
    })
    vectors = _rank_vectors(session)
    ties: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for vec in vectors:
        for u, v in itertools.combinations(sorted(vec.ranks), 2):
            o = vec.outcome(u, v)
            if o is not None:
                ties[vec.annotator_id][0] += int(o == 0)
                ties[vec.annotator_id][1] += 1
    _, _, per = _pair_agreements(vectors)
    ids = out.index
    out["tie_rate"] = [ties[a][0] / ties[a][1] if ties[a][1] else np.nan for a in ids]
    out["agreement_with_others"] = [per[a][0] / per[a][1] if per[a][1] else np.nan for a in ids]
    out["n_shared_pairs"] = [per[a][1] for a in ids]
    return out.reset_index()[columns].sort_values("annotator_id", ignore_index=True)


def comparison_summary(session: Session) -> pd.DataFrame:
    """Blind A/B results per pair of model versions (lower id first): wins, ties, "both bad"
    votes (neither wins; kept apart from ties), the number of votes and version 1's win rate."""
    rows: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for a, b, choice in session.execute(
        select(Comparison.version_a_id, Comparison.version_b_id, Comparison.choice)
    ):
        lo, hi = sorted((a, b))
        winner = {"a": a, "b": b}.get(choice)
        slot = 0 if winner == lo else 1 if winner == hi else 3 if choice == "both_bad" else 2
        rows[(lo, hi)][slot] += 1
    data = [
        (lo, hi, wl, wh, t, bad, wl + wh + t + bad, wl / (wl + wh + t + bad))
        for (lo, hi), (wl, wh, t, bad) in sorted(rows.items())
    ]
    return pd.DataFrame(
        data, columns=["version_1", "version_2", "wins_1", "wins_2", "ties", "both_bad", "n", "win_rate_1"]
    )


def requests_to_rank(session: Session, annotator_id: int, limit: int = 20) -> list[EditRequest]:
    """Requests with variants that this annotator has not ranked or skipped, newest first."""
    done = select(Ranking.request_id).where(Ranking.annotator_id == annotator_id)
    has_variants = select(Variant.request_id)
    return list(
        session.scalars(
            select(EditRequest)
            .where(EditRequest.id.in_(has_variants), EditRequest.id.not_in(done))
            .order_by(EditRequest.created_at.desc(), EditRequest.id.desc())
            .limit(limit)
        )
    )
