"""The write side: users, requests, variants, ranking rules, undo, registry, deletion."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import feedback as fb
from db.engine import session_scope
from db.feedback import FeedbackError, RankingError
from db.images import get_or_create_image
from db.models import Ranking, RankingItem, TrainingRun, User
from db.queries import promoted_model
from tests.db_fixtures import (  # noqa: F401
    HiveEnv,
    Scenario,
    add_request,
    build_scenario,
    hive,
    hive_factory,
    png_bytes,
)


@pytest.fixture
def sc(hive: HiveEnv) -> Scenario:
    return build_scenario(hive)


def refused(env: HiveEnv, call: Callable[[Session], object], match: str, err: type = FeedbackError) -> None:
    """``call`` raises ``err`` matching ``match``, and no row or file appeared."""
    before = env.snapshot()
    with pytest.raises(err, match=match):
        with session_scope(env.url) as s:
            call(s)
    assert env.snapshot() == before


# -- users -----------------------------------------------------------------------------------
def test_password_is_hashed_and_verified(hive: HiveEnv) -> None:
    with session_scope(hive.url) as s:
        u = fb.create_user(s, "alice", "annotator", password="correct horse")
    with session_scope(hive.url, write=False) as s:
        stored = s.get(User, u.id).password_hash
        assert stored.startswith("scrypt$") and "correct horse" not in stored
        assert fb.verify_password(stored, "correct horse")
        assert not fb.verify_password(stored, "wrong horse")
        assert fb.authenticate(s, "alice", "correct horse").id == u.id
        assert fb.authenticate(s, "alice", "nope") is None
    with session_scope(hive.url) as s:
        v = fb.create_user(s, "bob", "annotator", password="correct horse")
    assert v.password_hash != stored  # salted
    assert not fb.verify_password(None, "x") and not fb.verify_password("garbage", "x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "x", "role": "superuser"}, "unknown role 'superuser'"),
        ({"name": "  ", "role": "visitor"}, "user name must not be empty"),
        ({"name": "x" * 65, "role": "visitor"}, "user name is too long"),
        ({"name": "x", "role": "visitor", "password": "short"}, "at least 8 characters"),
        ({"name": "taken", "role": "visitor"}, "user name 'taken' is taken"),
    ],
)
def test_bad_users_refused(hive: HiveEnv, kwargs: dict, match: str) -> None:
    with session_scope(hive.url) as s:
        fb.create_user(s, "taken", "visitor")
    refused(hive, lambda s: fb.create_user(s, **kwargs), match)


# -- requests and variants ----------------------------------------------------------------
def test_request_and_variants_recorded(hive: HiveEnv, sc: Scenario) -> None:
    from db.models import EditRequest

    with session_scope(hive.url, write=False) as s:
        req = s.get(EditRequest, sc.request_id)
        assert req.consent_training is True
        assert req.params == {"guidance": 7.5, "image_guidance": 1.5, "steps": 20}
        assert [v.position for v in req.variants] == [0, 1, 2, 3]
        assert [v.seed for v in req.variants] == [1000, 1001, 1002, 1003]
        assert req.variants[0].params == {"guidance": 7.5, "steps": 20}
        assert req.model_version_id == sc.editor_id


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda sc: dict(user_id=999), "unknown user 999"),
        (lambda sc: dict(source_image_id=999), "unknown image 999"),
        (lambda sc: dict(instruction="   "), "instruction must not be empty"),
        (lambda sc: dict(instruction="x" * 2001), "instruction is too long"),
        (lambda sc: dict(params={"g": float("nan")}), "JSON-serialisable"),
        (lambda sc: dict(params=[1, 2]), "params must be a dict"),
        (lambda sc: dict(consent="yes"), "consent must be True or False"),
        (lambda sc: dict(model_version_id=999), "unknown model version 999"),
    ],
)
def test_bad_requests_refused(hive: HiveEnv, sc: Scenario, make: Callable, match: str) -> None:
    args = dict(user_id=sc.visitor_id, source_image_id=1, instruction="add a dog",
                model_version_id=None, params={}, consent=True)
    args.update(make(sc))
    refused(hive, lambda s: fb.create_edit_request(s, **args), match)


def test_request_refuses_reward_model_as_editor(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        rm = fb.register_model_version(s, "reward", "rm-1", "models/rm")
    refused(hive, lambda s: fb.create_edit_request(s, sc.visitor_id, 1, "x", rm.id, {}, True),
            "is a reward, not an editor")


@pytest.mark.parametrize(
    ("variants", "match"),
    [
        ([], "non-empty list"),
        ([(1, 1)], r"must be \(image_id, seed, params\)"),
        ([(999, 1, {})], r"unknown image\(s\) \[999\]"),
        ([(1, -1, {})], "seed must be an integer"),
        ([(1, 2**63, {})], "seed must be an integer"),
        ([(1, 1.5, {})], "seed must be an integer"),
        ([(1, 1, {"x": object()})], "JSON-serialisable"),
    ],
)
def test_bad_variants_refused(hive: HiveEnv, sc: Scenario, variants: list, match: str) -> None:
    refused(hive, lambda s: fb.add_variants(s, sc.other_request_id, variants), match)


def test_variants_refused_once_ranked(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        fb.submit_ranking(s, sc.other_request_id, sc.annotator_ids[0],
                          dict(zip(sc.other_variant_ids, [1, 2])))
    refused(hive, lambda s: fb.add_variants(s, sc.other_request_id, [(1, 5, {})]), "already ranked")


# -- rankings: accepted ---------------------------------------------------------------------
def items_of(env: HiveEnv, ranking_id: int) -> dict[int, tuple]:
    with session_scope(env.url, write=False) as s:
        rows = s.scalars(select(RankingItem).where(RankingItem.ranking_id == ranking_id)).all()
        return {r.variant_id: (r.rank, r.instruction_following, r.preservation, r.quality) for r in rows}


def test_full_ranking_with_ties_and_ratings(hive: HiveEnv, sc: Scenario) -> None:
    v = sc.variant_ids
    with session_scope(hive.url) as s:
        r = fb.submit_ranking(
            s, sc.request_id, sc.annotator_ids[0], {v[0]: 2, v[1]: 1, v[2]: 1, v[3]: 3},
            ratings={v[1]: {"instruction_following": 5, "preservation": 4, "quality": 5}},
            seconds=12.5, submission_key="abc",
        )
    assert r.top_k is None and not r.all_bad and not r.skip and r.seconds == 12.5
    assert items_of(hive, r.id) == {
        v[0]: (2, None, None, None), v[1]: (1, 5, 4, 5), v[2]: (1, None, None, None), v[3]: (3, None, None, None),
    }


def test_ranks_as_pairs_list(hive: HiveEnv, sc: Scenario) -> None:
    v = sc.variant_ids
    with session_scope(hive.url) as s:
        r = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], [(v[0], 1), (v[1], 1), (v[2], 1), (v[3], 1)])
    assert {k: x[0] for k, x in items_of(hive, r.id).items()} == dict.fromkeys(v, 1)


def test_top_k_ranking(hive: HiveEnv, sc: Scenario) -> None:
    v = sc.variant_ids
    with session_scope(hive.url) as s:
        r = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], {v[2]: 1, v[0]: 2}, top_k=2,
                              ratings={v[3]: {"quality": 1}})
    assert r.top_k == 2
    assert items_of(hive, r.id) == {v[0]: (2, None, None, None), v[2]: (1, None, None, None),
                                    v[3]: (None, None, None, 1)}


def test_top_n_of_n_is_a_full_ranking(hive: HiveEnv, sc: Scenario) -> None:
    v = sc.other_variant_ids
    with session_scope(hive.url) as s:
        r = fb.submit_ranking(s, sc.other_request_id, sc.annotator_ids[0], {v[0]: 1, v[1]: 2}, top_k=2)
    assert r.top_k is None


def test_all_bad_and_skip(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        bad = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], None, all_bad=True)
        skip = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[1], {}, skip=True)
        bad_ranked = fb.submit_ranking(s, sc.other_request_id, sc.annotator_ids[0],
                                       dict(zip(sc.other_variant_ids, [1, 2])), all_bad=True)
    assert bad.all_bad and not bad.skip and items_of(hive, bad.id) == {}
    assert skip.skip and items_of(hive, skip.id) == {}
    assert bad_ranked.all_bad and len(items_of(hive, bad_ranked.id)) == 2


def test_admin_may_rank(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        admin = fb.create_user(s, "root", "admin")
        fb.submit_ranking(s, sc.other_request_id, admin.id, dict(zip(sc.other_variant_ids, [1, 2])))
    assert hive.counts()["rankings"] == 1


# -- rankings: refused (each leaves nothing behind) -------------------------------------------
def _full(sc: Scenario) -> dict[int, int]:
    return {v: i + 1 for i, v in enumerate(sc.variant_ids)}


RANKING_REFUSALS: list[tuple[str, Callable[[Scenario], dict], str]] = [
    ("unknown request", lambda sc: dict(request_id=999), "unknown edit request 999"),
    ("request id not int", lambda sc: dict(request_id="1"), "edit request id must be an integer"),
    ("unknown annotator", lambda sc: dict(annotator_id=999), "unknown annotator 999"),
    ("visitor", lambda sc: dict(annotator_id=sc.visitor_id), "is a visitor; only annotators rank"),
    ("unknown variant", lambda sc: dict(ranks={**_full(sc), 999: 5}), "unknown variant 999"),
    ("variant of another request",
     lambda sc: dict(ranks={**_full(sc), sc.other_variant_ids[0]: 5}),
     r"belongs to request \d+, not to request"),
    ("missing variant", lambda sc: dict(ranks={sc.variant_ids[0]: 1, sc.variant_ids[1]: 2}),
     r"are not ranked: rank every variant .* or give top_k"),
    ("repeated variant", lambda sc: dict(ranks=[(v, 1) for v in sc.variant_ids] + [(sc.variant_ids[0], 2)]),
     r"variant \d+ is ranked more than once"),
    ("float rank", lambda sc: dict(ranks={**_full(sc), sc.variant_ids[0]: 1.5}), "must be an integer, got 1.5"),
    ("string rank", lambda sc: dict(ranks={**_full(sc), sc.variant_ids[0]: "1"}), "must be an integer, got '1'"),
    ("bool rank", lambda sc: dict(ranks={**_full(sc), sc.variant_ids[0]: True}), "must be an integer, got True"),
    ("zero rank", lambda sc: dict(ranks={**_full(sc), sc.variant_ids[0]: 0}), "must be >= 1, got 0"),
    ("negative rank", lambda sc: dict(ranks={**_full(sc), sc.variant_ids[0]: -2}), "must be >= 1, got -2"),
    ("gap in ranks", lambda sc: dict(ranks=dict(zip(sc.variant_ids, [1, 1, 3, 4]))),
     r"without gaps .* rank\(s\) \[2\] are missing"),
    ("ranks not from 1", lambda sc: dict(ranks=dict(zip(sc.variant_ids, [2, 3, 4, 5]))),
     r"rank\(s\) \[1\] are missing"),
    ("string variant id", lambda sc: dict(ranks={str(v): i + 1 for i, v in enumerate(sc.variant_ids)}),
     "variant ids must be integers"),
    ("ranks not a mapping", lambda sc: dict(ranks=5), "ranks must be a dict"),
    ("empty ranking", lambda sc: dict(ranks={}), "empty ranking"),
    ("skip with ranks", lambda sc: dict(skip=True), "a skipped request carries no ranks"),
    ("skip with all_bad", lambda sc: dict(ranks=None, skip=True, all_bad=True), "a skipped request carries no"),
    ("top_k too large", lambda sc: dict(ranks={sc.variant_ids[0]: 1}, top_k=9), "has only 4 variants"),
    ("top_k mismatch", lambda sc: dict(ranks={sc.variant_ids[0]: 1}, top_k=2), r"top_k=2 but 1 variant\(s\) are ranked"),
    ("top_k zero", lambda sc: dict(top_k=0), "top_k must be an integer >= 1"),
    ("top_k without ranks", lambda sc: dict(ranks=None, all_bad=True, top_k=2), "top_k given without ranks"),
    ("rating out of range", lambda sc: dict(ratings={sc.variant_ids[0]: {"quality": 6}}), r"must be an integer 1\.\.5, got 6"),
    ("unknown rating dimension", lambda sc: dict(ratings={sc.variant_ids[0]: {"beauty": 3}}), "unknown rating dimension 'beauty'"),
    ("rating of foreign variant", lambda sc: dict(ratings={sc.other_variant_ids[0]: {"quality": 3}}), "belongs to request"),
    ("negative seconds", lambda sc: dict(seconds=-1), "seconds must be a finite number >= 0"),
    ("nan seconds", lambda sc: dict(seconds=float("nan")), "seconds must be a finite number"),
    ("all_bad not bool", lambda sc: dict(all_bad="yes"), "all_bad must be True or False"),
    ("empty key", lambda sc: dict(submission_key="  "), "submission_key must not be empty"),
    ("long key", lambda sc: dict(submission_key="k" * 65), "submission_key is too long"),
]


@pytest.mark.parametrize(("make", "match"), [(m, x) for _, m, x in RANKING_REFUSALS],
                         ids=[n for n, _, _ in RANKING_REFUSALS])
def test_bad_rankings_refused(hive: HiveEnv, sc: Scenario, make: Callable, match: str) -> None:
    args = dict(request_id=sc.request_id, annotator_id=sc.annotator_ids[0], ranks=_full(sc))
    args.update(make(sc))
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("request_id", "annotator_id", "ranks")}
    refused(hive, lambda s: fb.submit_ranking(s, args["request_id"], args["annotator_id"], args["ranks"], **kwargs),
            match, RankingError)


def test_request_without_variants_refused(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        img = get_or_create_image(s, hive.store, png_bytes((9, 9, 9)))
        req = fb.create_edit_request(s, sc.visitor_id, img.id, "add a hat", None, {}, True)
    refused(hive, lambda s: fb.submit_ranking(s, req.id, sc.annotator_ids[0], {1: 1}),
            "has no variants to rank", RankingError)


def test_second_ranking_of_same_request_refused(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        first = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], _full(sc), submission_key="a")
    refused(hive, lambda s: fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], _full(sc), submission_key="b"),
            rf"already ranked request {sc.request_id} \(ranking {first.id}\); undo it", RankingError)


# -- idempotency and undo ---------------------------------------------------------------------
def test_same_submission_key_does_not_duplicate(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        first = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], _full(sc), submission_key="k-1")
    for _ in range(3):
        with session_scope(hive.url) as s:
            again = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], _full(sc), submission_key="k-1")
        assert again.id == first.id
    assert hive.counts()["rankings"] == 1 and hive.counts()["ranking_items"] == 4
    # the same key is free for another annotator
    with session_scope(hive.url) as s:
        other = fb.submit_ranking(s, sc.request_id, sc.annotator_ids[1], _full(sc), submission_key="k-1")
    assert other.id != first.id


def test_submission_key_reused_for_other_content_refused(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], _full(sc), submission_key="k-1")
    refused(hive, lambda s: fb.submit_ranking(s, sc.other_request_id, sc.annotator_ids[0],
                                              dict(zip(sc.other_variant_ids, [1, 2])), submission_key="k-1"),
            "submission key 'k-1' was already used for a different ranking", RankingError)
    reversed_ranks = {v: 5 - r for v, r in _full(sc).items()}
    refused(hive, lambda s: fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], reversed_ranks,
                                              submission_key="k-1"),
            "already used for a different ranking", RankingError)


def test_undo_last_ranking(hive: HiveEnv, sc: Scenario) -> None:
    ann = sc.annotator_ids[0]
    with session_scope(hive.url) as s:
        first = fb.submit_ranking(s, sc.request_id, ann, _full(sc))
        second = fb.submit_ranking(s, sc.other_request_id, ann, dict(zip(sc.other_variant_ids, [1, 2])))
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[1], _full(sc))  # someone else's
    with session_scope(hive.url) as s:
        undone = fb.undo_last_ranking(s, ann)
    assert undone == fb.UndoneRanking(second.id, sc.other_request_id)
    counts = hive.counts()
    assert counts["rankings"] == 2 and counts["ranking_items"] == 8
    with session_scope(hive.url) as s:  # the request can be ranked again
        fb.submit_ranking(s, sc.other_request_id, ann, dict(zip(sc.other_variant_ids, [2, 1])))
        assert fb.undo_last_ranking(s, ann).ranking_id != first.id
        assert fb.undo_last_ranking(s, ann).ranking_id == first.id
        assert fb.undo_last_ranking(s, ann) is None
    with session_scope(hive.url, write=False) as s:
        assert s.scalars(select(Ranking.annotator_id)).all() == [sc.annotator_ids[1]]


# -- model registry, training runs, comparisons ---------------------------------------------
def test_promote_retires_previous_and_rollback(hive: HiveEnv) -> None:
    with session_scope(hive.url) as s:
        v1 = fb.register_model_version(s, "editor", "v1", "models/v1")
        v2 = fb.register_model_version(s, "editor", "v2", "models/v2", parent_id=v1.id, metrics={"clip": 0.2})
        rm = fb.register_model_version(s, "reward", "rm", "models/rm")
        fb.set_model_status(s, v1.id, "promoted")
        fb.set_model_status(s, rm.id, "promoted")
        fb.set_model_status(s, v2.id, "promoted")
    with session_scope(hive.url) as s:
        assert promoted_model(s, "editor").id == v2.id
        assert promoted_model(s, "reward").id == rm.id  # other kinds untouched
        from db.models import ModelVersion

        assert s.get(ModelVersion, v1.id).status == "retired"
        assert s.get(ModelVersion, v2.id).parent_id == v1.id
        back = fb.rollback_model(s, "editor")
        assert back.id == v1.id and s.get(ModelVersion, v2.id).status == "retired"
        fb.update_model_metrics(s, v2.id, {"win_rate": 0.49})
        assert s.get(ModelVersion, v2.id).metrics == {"clip": 0.2, "win_rate": 0.49}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: fb.register_model_version(s, "vae", "x", "p"), "unknown model kind 'vae'"),
        (lambda s: fb.register_model_version(s, "editor", "v1", "p"), "already registered"),
        (lambda s: fb.register_model_version(s, "editor", "v9", "p", parent_id=99), "unknown parent model version 99"),
        (lambda s: fb.set_model_status(s, 1, "gold"), "unknown status 'gold'"),
        (lambda s: fb.rollback_model(s, "editor"), "no promoted editor model to roll back"),
        (lambda s: fb.rollback_model(s, "reward"), "no earlier promoted reward model"),
    ],
)
def test_bad_registry_calls_refused(hive: HiveEnv, call: Callable, match: str) -> None:
    with session_scope(hive.url) as s:
        fb.register_model_version(s, "editor", "v1", "models/v1")
        rm = fb.register_model_version(s, "reward", "rm", "models/rm")
        fb.set_model_status(s, rm.id, "promoted")
    refused(hive, call, match)


def test_training_run_lifecycle(hive: HiveEnv) -> None:
    with session_scope(hive.url) as s:
        base = fb.register_model_version(s, "editor", "sft", "models/sft")
        run = fb.start_training_run(s, "reward", {"lr": 1e-4}, log_path="runs/1/log.txt",
                                    base_version_id=base.id, status="queued")
        assert run.started_at is None
        fb.mark_training_run_running(s, run.id)
        out = fb.register_model_version(s, "reward", "rm-1", "runs/1/model")
        fb.finish_training_run(s, run.id, "succeeded", produced_version_id=out.id)
    with session_scope(hive.url, write=False) as s:
        run = s.get(TrainingRun, run.id)
        assert run.status == "succeeded" and run.produced_version_id == out.id
        assert run.created_at <= run.started_at <= run.finished_at
        assert run.config == {"lr": 1e-4}
    refused(hive, lambda s: fb.finish_training_run(s, run.id, "failed"), "already finished")
    refused(hive, lambda s: fb.finish_training_run(s, run.id, "running"), "a run finishes as")
    refused(hive, lambda s: fb.start_training_run(s, "x", {}, status="succeeded"), "queued or running")


def test_comparisons(hive: HiveEnv, sc: Scenario) -> None:
    with session_scope(hive.url) as s:
        v2 = fb.register_model_version(s, "editor", "hive-v2", "models/v2")
        c = fb.record_comparison(s, sc.annotator_ids[0], sc.editor_id, v2.id, "b", instruction="add a dog",
                                 a_shown_left=False, source_image_id=1, image_a_id=2, image_b_id=3,
                                 seconds=4.0, submission_key="c1")
        again = fb.record_comparison(s, sc.annotator_ids[0], sc.editor_id, v2.id, "b", instruction="add a dog",
                                     a_shown_left=False, submission_key="c1")
        assert again.id == c.id
    assert hive.counts()["comparisons"] == 1
    refused(hive, lambda s: fb.record_comparison(s, sc.annotator_ids[0], v2.id, v2.id, "a",
                                                 instruction="x", a_shown_left=True), "two different model versions")
    refused(hive, lambda s: fb.record_comparison(s, sc.annotator_ids[0], sc.editor_id, v2.id, "left",
                                                 instruction="x", a_shown_left=True), "choice must be one of")
    refused(hive, lambda s: fb.record_comparison(s, sc.visitor_id, sc.editor_id, v2.id, "a",
                                                 instruction="x", a_shown_left=True), "only annotators vote")


# -- deleting one user's data -------------------------------------------------------------------
def test_delete_user_data(hive: HiveEnv, sc: Scenario) -> None:
    store = hive.store
    with session_scope(hive.url) as s:
        keeper = fb.create_user(s, "keeper", "visitor")
        # keeper uploads the same source image as the leaving visitor: it must stay
        kept_req, kept_variants = add_request(s, store, keeper.id, 2, shade=50)
        fb.submit_ranking(s, sc.request_id, sc.annotator_ids[0], _full(sc))
        fb.submit_ranking(s, kept_req, sc.annotator_ids[0], dict(zip(kept_variants, [1, 2])))
        v2 = fb.register_model_version(s, "editor", "v2", "models/v2")
        fb.record_comparison(s, sc.annotator_ids[1], sc.editor_id, v2.id, "a", instruction="x",
                             a_shown_left=True, source_image_id=1)
    before = hive.counts()
    files_before = set(hive.files())
    with session_scope(hive.url, write=False) as s:
        from db.models import EditRequest, Image, Variant

        leaving_images = set(s.scalars(select(Variant.image_id).where(Variant.request_id.in_(
            [sc.request_id, sc.other_request_id])))) | {
            s.get(EditRequest, sc.request_id).source_image_id}
        kept_images = set(s.scalars(select(Variant.image_id).where(Variant.request_id == kept_req))) | {
            s.get(EditRequest, kept_req).source_image_id}
        shas = {i: s.get(Image, i).sha256 for i in leaving_images | kept_images}

    with session_scope(hive.url) as s:
        report = fb.delete_user_data(s, sc.visitor_id, store)
    after = hive.counts()
    assert report["users"] == 1 and report["edit_requests"] == 2 and report["variants"] == 6
    assert report["rankings"] == 1 and report["comparisons"] == 1  # comparison used their upload
    assert after["users"] == before["users"] - 1
    assert after["edit_requests"] == 1 and after["variants"] == 2 and after["rankings"] == 1
    with session_scope(hive.url, write=False) as s:
        from db.models import Image

        remaining = set(s.scalars(select(Image.id)))
    gone = leaving_images - kept_images
    assert gone and not (gone & remaining) and kept_images <= remaining
    files_after = set(hive.files())
    for i in gone:
        assert f"{shas[i][:2]}/{shas[i]}.png" not in files_after
    for i in kept_images:
        assert f"{shas[i][:2]}/{shas[i]}.png" in files_after
    assert len(files_before - files_after) == report["files"] == report["images"] == len(gone)


def test_delete_rolled_back_keeps_files(hive: HiveEnv, sc: Scenario) -> None:
    before = hive.snapshot()
    with pytest.raises(RuntimeError):
        with session_scope(hive.url) as s:
            fb.delete_user_data(s, sc.visitor_id, hive.store)
            raise RuntimeError("crash before commit")
    assert hive.snapshot() == before


def test_delete_unknown_user_refused(hive: HiveEnv, sc: Scenario) -> None:
    refused(hive, lambda s: fb.delete_user_data(s, 999, hive.store), "unknown user 999")
