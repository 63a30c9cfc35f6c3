"""The read side: rankings to pairs, per-annotator statistics, agreement."""

from __future__ import annotations

from pathlib import Path

import krippendorff
import numpy as np
import pytest

from db import feedback as fb
from db.engine import session_scope
from db.models import TABLE_ORDER
from db.queries import (
    agreement,
    annotator_stats,
    comparison_summary,
    pairwise_preferences,
    rankings_frame,
    requests_to_rank,
    table_counts,
)
from tests.db_fixtures import HiveEnv, Scenario, add_request, build_scenario, hive, hive_factory  # noqa: F401


@pytest.fixture
def sc(hive: HiveEnv) -> Scenario:
    return build_scenario(hive, n_variants=4, n_annotators=3)


def pairs_of(df, ranking_id: int) -> set[tuple[int, int, bool]]:
    sub = df[df.ranking_id == ranking_id]
    return set(zip(sub.winner_variant_id, sub.loser_variant_id, sub.tie))


def test_pairwise_preferences_with_ties_and_top_k(hive: HiveEnv, sc: Scenario) -> None:
    a, b, c, d = sc.variant_ids
    with session_scope(hive.url) as s:
        full = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], {a: 1, b: 2, c: 2, d: 3})
        topk = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[1], {c: 1, a: 2}, top_k=2)
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[2], None, skip=True)
        fb.submit_ranking(s, sc.other_request_id, sc.annotator_ids[0], None, all_bad=True)
    with session_scope(hive.url, write=False) as s:
        df = pairwise_preferences(s, store=hive.store)
    assert pairs_of(df, full.id) == {
        (a, b, False), (a, c, False), (a, d, False), (b, c, True), (b, d, False), (c, d, False),
    }
    # top-k: ranked beat unranked; the unranked pair (b, d) is not judged
    assert pairs_of(df, topk.id) == {(c, a, False), (c, b, False), (c, d, False), (a, b, False), (a, d, False)}
    assert set(df.ranking_id) == {full.id, topk.id}  # skip and rank-less all_bad give no pairs
    row = df[(df.ranking_id == full.id) & (df.winner_variant_id == a) & (df.loser_variant_id == d)].iloc[0]
    assert (row.winner_rank, row.loser_rank, row.instruction) == (1, 3, "make the circle red")
    for col in ("source_image_path", "winner_image_path", "loser_image_path"):
        assert Path(row[col]).is_file() and Path(row[col]).is_absolute()
    assert df.tie.dtype == bool


def test_consent_and_simulated_filters(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        sim = fb.create_user(s, "sim", "annotator", simulated=True)
        req, variants = add_request(s, hive.store, sc.visitor_id, 2, shade=90, consent=False)
        fb.submit_ranking(s, req, sc.annotator_ids[0], dict(zip(variants, [1, 2])))
        fb.submit_ranking(s, sc.other_request_id, sim.id, dict(zip(sc.other_variant_ids, [2, 1])))
    with session_scope(hive.url, write=False) as s:
        assert set(pairwise_preferences(s, store=hive.store).request_id) == {sc.other_request_id}
        assert set(pairwise_preferences(s, store=hive.store, consented_only=False).request_id) == {
            req, sc.other_request_id}
        assert pairwise_preferences(s, store=hive.store, include_simulated=False).empty


def test_empty_store_frames(hive: HiveEnv) -> None:
    with session_scope(hive.url, write=False) as s:
        assert pairwise_preferences(s, store=hive.store).empty
        assert rankings_frame(s).empty
        assert annotator_stats(s).empty
        assert agreement(s) == {"pairwise_agreement": None, "krippendorff_alpha": None, "n_items": 0,
                                "n_annotators": 0, "n_pair_judgements": 0}
        assert table_counts(s) == dict.fromkeys(TABLE_ORDER, 0)


def test_agreement_identical_and_opposite(hive: HiveEnv, sc: Scenario) -> None:
    v = sc.variant_ids
    ranks = dict(zip(v, [1, 2, 3, 4]))
    with session_scope(hive.url) as s:
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], ranks)
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[1], ranks)
        fb.submit_ranking(s, sc.other_request_id, sc.annotator_ids[0], dict(zip(sc.other_variant_ids, [1, 2])))
    with session_scope(hive.url, write=False) as s:
        got = agreement(s)
    assert got["n_items"] == 1 and got["n_annotators"] == 2  # other request has one annotator
    assert got["pairwise_agreement"] == 1.0 and got["n_pair_judgements"] == 6
    assert got["krippendorff_alpha"] == pytest.approx(1.0)

    with session_scope(hive.url) as s:
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[2], {x: 5 - r for x, r in ranks.items()})
    with session_scope(hive.url, write=False) as s:
        got = agreement(s)
    # pairs of annotators: (0,1) agree on 6, (0,2) and (1,2) disagree on 6 each
    assert got["pairwise_agreement"] == pytest.approx(6 / 18)
    expected = krippendorff.alpha(
        reliability_data=np.array([[1, 2, 3, 4], [1, 2, 3, 4], [4, 3, 2, 1]], dtype=float),
        level_of_measurement="ordinal",
    )
    assert got["krippendorff_alpha"] == pytest.approx(expected)
    assert got["krippendorff_alpha"] < 0


def test_annotator_stats(hive: HiveEnv, sc: Scenario) -> None:
    a, b, c, d = sc.variant_ids
    with session_scope(hive.url) as s:
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], {a: 1, b: 1, c: 2, d: 2}, seconds=10)
        fb.submit_ranking(s, sc.other_request_id, sc.annotator_ids[0], None, skip=True, seconds=2)
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[1], {a: 1, b: 2, c: 3, d: 4}, seconds=4)
    with session_scope(hive.url, write=False) as s:
        st = annotator_stats(s).set_index("annotator")
        frame = rankings_frame(s)
    assert st.loc["ann0", "n_rankings"] == 2 and st.loc["ann0", "n_skipped"] == 1
    assert st.loc["ann0", "tie_rate"] == pytest.approx(2 / 6)
    assert st.loc["ann0", "mean_seconds"] == pytest.approx(6.0)
    assert st.loc["ann1", "tie_rate"] == 0.0
    # shared pairs: (a,b) tie vs win, (c,d) tie vs win, other 4 agree
    assert st.loc["ann0", "agreement_with_others"] == pytest.approx(4 / 6)
    assert st.loc["ann0", "n_shared_pairs"] == 6
    assert len(frame) == 4 + 1 + 4  # items, plus one row for the skip


def test_comparison_summary_and_queue(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        v2 = fb.register_model_version(s, "editor", "v2", "models/v2")
        for who, a, b, choice in [(0, sc.editor_id, v2.id, "b"), (1, v2.id, sc.editor_id, "a"),
                                  (2, sc.editor_id, v2.id, "tie")]:
            fb.record_comparison(s, sc.annotator_ids[who], a, b, choice, instruction="x", a_shown_left=True)
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], dict(zip(sc.variant_ids, [1, 2, 3, 4])))
    with session_scope(hive.url, write=False) as s:
        summary = comparison_summary(s)
        queue0 = [r.id for r in requests_to_rank(s, sc.annotator_ids[0])]
        queue1 = [r.id for r in requests_to_rank(s, sc.annotator_ids[1])]
    row = summary.iloc[0]
    assert (row.version_1, row.version_2, row.wins_1, row.wins_2, row.ties) == (sc.editor_id, v2.id, 0, 2, 1)
    assert queue0 == [sc.other_request_id]
    assert set(queue1) == {sc.request_id, sc.other_request_id}
