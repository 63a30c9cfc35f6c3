"""The app's service layer: edits are recorded, bad input writes nothing, ranking rules, the queue,
gold items, blind A/B votes, sessions and roles, the job runner and the `queue` command."""

from __future__ import annotations

import argparse
import json
import time

import pytest
from sqlalchemy import select

from db import feedback as fb
from db.engine import session_scope
from db.models import Comparison, EditRequest, ModelVersion, Ranking, TrainingRun, Variant
from hive import toy
from hive_app import dashboard, jobs
from hive_app.auth import AuthError, Signer
from hive_app.queue import fill_queue, gold_accuracy
from hive_app.service import USER_ERRORS, AppInputError
from tests.app_fixtures import (accounts, bad_files, editor_pool, hive, hive_factory,  # noqa: F401
                                make_service, svc)

FAST = dict(steps=2)


def toy_source(seed: int = 1):
    return toy.sample_example(seed).input_image


def test_edit_records_request_variants_and_parameters(svc, hive):
    guest = svc.auth.guest()
    out = svc.edit(guest, toy_source(), "make the circle blue", variants=3, seed=7, consent=True, **FAST)
    assert len(out.images) == 3 and len(out.variant_ids) == 3
    with session_scope(write=False) as s:
        req = s.get(EditRequest, out.request_id)
        variants = s.scalars(select(Variant).where(Variant.request_id == req.id).order_by(Variant.position)).all()
        version = s.get(ModelVersion, req.model_version_id)
    assert req.consent_training is True and req.instruction == "make the circle blue"
    assert req.params["steps"] == 2 and req.params["variants"] == 3
    assert version.status == "promoted" and version.kind == "editor"
    assert [v.seed for v in variants] == [7, 8, 9]
    assert all(v.params["steps"] == 2 and v.params["model"] == svc.config.model for v in variants)
    # the same seed reproduces the same variants
    again = svc.edit(guest, toy_source(), "make the circle blue", variants=3, seed=7, **FAST)
    assert [im.tobytes() for im in again.images] == [im.tobytes() for im in out.images]


def test_edit_without_settings_uses_the_promoted_models_defaults(hive, editor_pool, tiny_pipeline, tmp_path):
    import shutil

    from hive_app.config import AppConfig
    from hive_app.service import HiveService

    folder = tmp_path / "tuned"
    shutil.copytree(tiny_pipeline, folder)
    (folder / "hive.json").write_text(json.dumps({"sampling": {"steps": 2, "guidance": 3.0, "image_guidance": 1.2}}))
    svc = HiveService(AppConfig(model=str(folder), explicit_model=True), store=hive.store, editors=editor_pool)
    assert svc.sampling_defaults() == {"steps": 2, "guidance": 3.0, "image_guidance": 1.2,
                                       "mask_threshold": 0.0}  # the UI's sliders, and no local blend
    out = svc.edit(svc.auth.guest(), toy_source(), "make the circle blue", variants=2, seed=1)
    assert {(r["steps"], r["guidance"], r["image_guidance"]) for r in out.records} == {(2, 3.0, 1.2)}
    with session_scope(write=False) as s:
        req = s.get(EditRequest, out.request_id)
    assert (req.params["steps"], req.params["guidance"], req.params["image_guidance"]) == (2, 3.0, 1.2)


@pytest.mark.parametrize("case, expected", [
    ("not_image", "not an image"),
    ("huge", "too large: 10000x10000"),
    ("empty_instruction", "instruction is empty"),
    ("long_instruction", "instruction is too long: 60000 characters"),
    ("one_variant", "variants must be between 2 and 8"),
    ("nine_variants", "variants must be between 2 and 8"),
    ("no_image", "no image"),
    ("bad_steps", "steps must be between 1 and 100"),
])
def test_bad_edit_input_gets_a_clear_message_and_writes_nothing(svc, hive, bad_files, case, expected):
    guest = svc.auth.guest()
    before = hive.snapshot()
    args = dict(image=str(bad_files["ok"]), instruction="make it red", variants=4, steps=2)
    args.update({"not_image": dict(image=str(bad_files["not_image"])), "huge": dict(image=str(bad_files["huge"])),
                 "empty_instruction": dict(instruction="   "), "long_instruction": dict(instruction="a" * 60_000),
                 "one_variant": dict(variants=1), "nine_variants": dict(variants=9), "no_image": dict(image=None),
                 "bad_steps": dict(steps=0)}[case])
    with pytest.raises(USER_ERRORS) as info:
        svc.edit(guest, **args)
    assert expected in str(info.value)
    assert hive.snapshot() == before


def _request(svc, token, k=4):
    out = svc.edit(token, toy_source(), "remove the square", variants=k, seed=1, **FAST)
    return out.request_id, out.variant_ids


@pytest.mark.parametrize("order, expected", [
    (lambda v: [v[0], v[1], v[2]], "have no rank"),  # a variant is missing
    (lambda v: [v[0], v[0], v[1], v[2], v[3]], "appears more than once"),  # a variant is repeated
    (lambda v: [v[0], [v[1], v[1]], v[2], v[3]], "appears more than once"),
    (lambda v: [v[0], v[1], v[2], v[3], 999_999], "do not belong to request"),
    (lambda v: [], "empty ranking"),
    (lambda v: [v[0], [], v[1]], "empty list"),
    (lambda v: [v[0], "x", v[1]], "whole numbers"),
])
def test_bad_rankings_are_refused_and_write_nothing(svc, hive, accounts, order, expected):
    rid, vids = _request(svc, accounts["ann"])
    before = hive.snapshot()
    with pytest.raises(USER_ERRORS) as info:
        svc.submit_ranking(accounts["ann"], rid, order(vids))
    assert expected in str(info.value)
    assert hive.snapshot() == before


def test_ranking_with_ties_is_stored_once_and_undo_removes_it(svc, hive, accounts):
    rid, v = _request(svc, accounts["ann"])
    first = svc.submit_ranking(accounts["ann"], rid, [v[2], [v[0], v[3]], v[1]], submission_key="k-1",
                               ratings={v[2]: {"quality": 5}})
    assert svc.submit_ranking(accounts["ann"], rid, [v[2], [v[0], v[3]], v[1]], submission_key="k-1") == first
    with session_scope(write=False) as s:
        ranking = s.get(Ranking, first)
        ranks = {i.variant_id: i.rank for i in ranking.items}
        assert s.scalar(select(Ranking.id).where(Ranking.id != first)) is None
    assert ranks == {v[2]: 1, v[0]: 2, v[3]: 2, v[1]: 3}
    with pytest.raises(USER_ERRORS, match="already ranked"):
        svc.submit_ranking(accounts["ann"], rid, [v[0], v[1], v[2], v[3]])
    assert svc.undo_last(accounts["ann"]) == rid
    assert svc.undo_last(accounts["ann"]) is None
    assert svc.counters(accounts["ann"])["ranked"] == 0


def test_all_bad_and_skip(svc, accounts):
    rid, _ = _request(svc, accounts["ann"])
    svc.submit_ranking(accounts["ann"], rid, None, all_bad=True)
    rid2, _ = _request(svc, accounts["ann"])
    svc.submit_ranking(accounts["ann"], rid2, None, skip=True)
    with session_scope(write=False) as s:
        flags = {(r.all_bad, r.skip) for r in s.scalars(select(Ranking))}
    assert flags == {(True, False), (False, True)}


def test_queue_serves_own_requests_first_then_others_up_to_the_cap(make_service, accounts):
    svc = make_service(rankings_per_request=1, gold_every=0)
    ann, bea, boss = accounts["ann"], accounts["bea"], accounts["boss"]
    older, _ = _request(svc, boss)
    mine, _ = _request(svc, bea)
    assert svc.next_item(bea).request_id == mine and svc.next_item(bea).own
    assert svc.next_item(ann).request_id == older  # others' requests, oldest first
    item = svc.next_item(ann)
    svc.submit_ranking(ann, item.request_id, [item.variant_ids])  # all tied
    # `older` now has its one ranking: ann gets `mine`; bea (after her own) gets nothing more
    assert svc.next_item(ann).request_id == mine
    own = svc.next_item(bea)
    svc.submit_ranking(bea, own.request_id, [own.variant_ids])
    assert svc.next_item(bea) is None
    counts = svc.counters(bea)
    assert counts["ranked"] == 1 and counts["today"] == 1


def test_each_request_is_ranked_by_the_configured_number_of_annotators(make_service, accounts):
    svc = make_service(rankings_per_request=2, gold_every=0)
    rid, _ = _request(svc, svc.auth.guest())
    for name in ("ann", "bea"):
        item = svc.next_item(accounts[name])
        assert item.request_id == rid
        svc.submit_ranking(accounts[name], rid, [item.variant_ids])
    assert svc.next_item(accounts["boss"]) is None


def _toy_dataset(tmp_path, n=3):
    toy.write_dataset(tmp_path / "ds", n=n, seed=5)
    return tmp_path / "ds"


def test_fill_queue_with_gold_items_and_gold_accuracy(make_service, accounts, tmp_path):
    svc = make_service(rankings_per_request=1, gold_every=1)
    data = _toy_dataset(tmp_path, 3)
    result = fill_queue(svc, data, variants=3, gold_rate=1.0, log=lambda m: None)
    assert result == {"queued": 3, "gold": 3, "rows": 3}
    assert fill_queue(svc, data, variants=3, gold_rate=1.0, log=lambda m: None)["queued"] == 0  # resumes
    with session_scope(write=False) as s:
        reqs = s.scalars(select(EditRequest)).all()
        assert all(r.params["gold"] and r.params["gold_best"] and not r.consent_training for r in reqs)
    # ann ranks a judged-good variant first; bea ranks a judged-bad one first (if any) or says all bad
    for name, good in (("ann", True), ("bea", False)):
        item = svc.next_item(accounts[name])
        with session_scope(write=False) as s:
            best = s.get(EditRequest, item.request_id).params["gold_best"]
        ids = item.variant_ids
        if good:
            order = [ids[best[0]], [v for v in ids if v != ids[best[0]]]]
            svc.submit_ranking(accounts[name], item.request_id, order)
        else:
            svc.submit_ranking(accounts[name], item.request_id, None, all_bad=True)
    with session_scope(write=False) as s:
        acc = {row["annotator"]: row["accuracy"] for row in gold_accuracy(s).values()}
    assert acc == {"ann": 1.0, "bea": 0.0}


def test_sessions_and_roles(make_service, accounts, hive):
    svc = make_service()
    with pytest.raises(AuthError, match="wrong user name or password"):
        svc.auth.login("ann", "not-the-password")
    with pytest.raises(AuthError, match="invalid session token"):
        svc.auth.principal(accounts["ann"][:-2] + "xx")
    with pytest.raises(AuthError, match="annotator account"):
        svc.next_item(accounts["vic"])  # a visitor account edits but does not rank
    with pytest.raises(AuthError, match="admins only"):
        svc.auth.for_admin(accounts["ann"])
    assert svc.auth.for_admin(accounts["boss"]).name == "boss"
    # a token signed with another secret is refused
    other = Signer(b"another secret").sign({"u": 1, "exp": time.time() + 60})
    with pytest.raises(AuthError):
        svc.auth.principal(other)
    closed = make_service(anonymous_edit=False, anonymous_rank=False)
    with pytest.raises(AuthError, match="anonymous use is switched off"):
        closed.auth.guest()
    edit_only = make_service(anonymous_rank=False)
    guest = edit_only.auth.guest()
    rid, _ = _request(edit_only, guest)
    with pytest.raises(AuthError, match="anonymous ranking is switched off"):
        edit_only.submit_ranking(guest, rid, None, skip=True)
    # everything an account does is attributed to it
    rid2, _ = _request(svc, accounts["ann"])
    with session_scope(write=False) as s:
        assert s.get(EditRequest, rid2).user_id == svc.auth.principal(accounts["ann"]).user_id


def test_blind_comparison_maps_sides_to_versions(make_service, accounts, tiny_pipeline):
    svc = make_service()
    with pytest.raises(USER_ERRORS, match="needs two editor versions"):
        svc.compare_pair(accounts["ann"])
    with session_scope() as s:
        fb.register_model_version(s, "editor", "tiny-candidate", str(tiny_pipeline))
    seen_left = set()
    for _ in range(6):
        pair = svc.compare_pair(accounts["ann"], seed=3)
        payload = svc.signer.verify(pair.token)
        cid = svc.compare_vote(accounts["ann"], pair.token, "left")
        with session_scope(write=False) as s:
            c = s.get(Comparison, cid)
        assert c.choice == ("a" if payload["left_a"] else "b") and c.a_shown_left == payload["left_a"]
        seen_left.add(payload["left_a"])
        assert svc.compare_vote(accounts["ann"], pair.token, "left") == cid  # a resent vote is not doubled
    for _ in range(40):  # sides are shuffled: draw (without voting) until both were seen; p(fail) = 2**-45
        if len(seen_left) == 2:
            break
        seen_left.add(svc.signer.verify(svc.compare_pair(accounts["ann"], seed=3).token)["left_a"])
    assert len(seen_left) == 2
    pair = svc.compare_pair(accounts["ann"])
    with pytest.raises(USER_ERRORS, match="drawn for another account"):
        svc.compare_vote(accounts["bea"], pair.token, "tie")
    with pytest.raises(USER_ERRORS, match="choice must be"):
        svc.compare_vote(accounts["ann"], pair.token, "middle")
    with pytest.raises(USER_ERRORS, match="damaged"):
        svc.compare_vote(accounts["ann"], pair.token + "0", "tie")
    assert svc.compare_vote(accounts["ann"], pair.token, "both_bad")
    with session_scope(write=False) as s:  # "both bad" is stored as such, not as a tie
        assert s.scalars(select(Comparison.choice).order_by(Comparison.id.desc())).first() == "both_bad"
    pair = svc.compare_pair(accounts["ann"])
    svc.compare_vote(accounts["ann"], pair.token, "tie")
    with session_scope(write=False) as s:
        assert s.scalars(select(Comparison.choice).order_by(Comparison.id.desc())).first() == "tie"
        table = dashboard.win_rate_table(s)
    row = table.iloc[0]
    assert (row["ties"], row["both bad"], row["votes"]) == (1, 1, 8)
    assert row["wins 1"] + row["wins 2"] == 6


def test_jobs_one_per_kind_run_in_worker_and_survive_restart(svc, hive):
    with pytest.raises(AppInputError, match="unknown job kind"):
        jobs.submit_job("no_such_kind")
    first = jobs.submit_job("evaluate", {"n": 1, "steps": 1})
    with pytest.raises(AppInputError, match="already queued"):
        jobs.submit_job("evaluate", {"n": 1})
    # the app "restarts": a new worker finds the queued job in the database and runs it
    worker = jobs.JobWorker(svc, poll_s=0.1)
    assert worker.run_one() is True and worker.run_one() is False
    with session_scope(write=False) as s:
        run = s.get(TrainingRun, first)
        version = fb.promoted_version(s, "editor")
    assert run.status == "succeeded", run.error
    assert "toy success" in jobs.read_log(run) and "toy_success" in version.metrics
    # a job left running by a stopped app is marked failed on start; then the kind is free again
    second = jobs.submit_job("evaluate", {"n": 1, "steps": 1})
    with session_scope() as s:
        fb.mark_training_run_running(s, second)
    with session_scope() as s:  # a row of another process (not one of the worker's job kinds)
        other = fb.start_training_run(s, "reward", {}).id  # started running, e.g. from the CLI
    assert worker.recover() == [second]
    with session_scope(write=False) as s:
        assert s.get(TrainingRun, second).status == "failed"
        assert s.get(TrainingRun, other).status == "running"
    # a failing job is recorded as failed with its error, and the worker goes on
    jobs.register_job_kind("boom", lambda ctx: 1 / 0, "always fails")
    try:
        third = jobs.submit_job("boom")
        worker.start()
        deadline = time.time() + 20
        while time.time() < deadline:
            with session_scope(write=False) as s:
                status = s.get(TrainingRun, third).status
            if status in ("succeeded", "failed"):
                break
            time.sleep(0.1)
        worker.stop()
        with session_scope(write=False) as s:
            run = s.get(TrainingRun, third)
        assert run.status == "failed" and "ZeroDivisionError" in run.error
    finally:
        jobs.JOB_KINDS.pop("boom")


def test_loop_round_is_offered_only_when_the_loop_exists():
    assert ("loop_round" in jobs.job_kinds()) == jobs.loop_available()


def test_a_loop_module_plugs_in_as_the_loop_round_job(svc, hive, monkeypatch, tiny_pipeline):
    """The contract with `hive.loop`: `run_round(config, log, progress) -> dict`; a
    `produced_version_id` in the result is recorded on the job, progress lines feed the Admin tab's
    bar. A stand-in module checks the wiring fast (the browser test runs a real round)."""
    import sys
    import types

    from hive_app.ui import progress_html

    jobs.JOB_KINDS.pop("loop_round", None)  # registered again below, on the stand-in
    calls = []

    def run_round(config, log, progress):
        calls.append(config)
        log("stand-in round")
        progress(1, 1)
        with session_scope() as s:
            return {"produced_version_id": fb.register_model_version(s, "editor", "round-1", str(tiny_pipeline)).id}

    monkeypatch.setitem(sys.modules, "hive.loop", types.SimpleNamespace(run_round=run_round))
    try:
        run_id = jobs.submit_job("loop_round", {"rounds": 1})
        assert jobs.JobWorker(svc).run_one()
        with session_scope(write=False) as s:
            run = s.get(TrainingRun, run_id)
            produced = s.get(ModelVersion, run.produced_version_id)
        assert run.status == "succeeded" and produced.name == "round-1" and calls == [{"rounds": 1}]
        assert "stand-in round" in jobs.read_log(run)
        assert jobs.job_progress(run) == (1, 1)
        assert "1 of 1 stages" in progress_html(run) and "succeeded" in progress_html(run)
    finally:
        jobs.JOB_KINDS.pop("loop_round", None)


def test_loop_round_job_offers_the_loop_settings():
    if not jobs.loop_available():
        pytest.skip("hive.loop is not there")
    from hive.loop import DEFAULTS

    defaults = jobs.job_kinds()["loop_round"].defaults
    assert defaults and all(defaults[k] == DEFAULTS[k] for k in defaults)
    assert {"method", "cycle", "steps"} <= set(defaults)


def test_tradeoff_job_stores_a_curve_that_the_dashboard_draws(svc, hive, accounts, tmp_path, tiny_pipeline):
    from hive_app import dashboard
    from tests.test_reward_model import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    run_id = jobs.submit_job("tradeoff", {"n": 1, "steps": 1, "clip": str(clip)})
    assert jobs.JobWorker(svc).run_one()
    with session_scope(write=False) as s:
        run = s.get(TrainingRun, run_id)
        version = fb.promoted_version(s, "editor")
    assert run.status == "succeeded", run.error
    curve = version.metrics["tradeoff"]
    assert [p["image_guidance"] for p in curve["points"]] == [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2]
    assert curve["clip"] == str(clip) and jobs.job_progress(run) == (7, 7)
    with pytest.raises(AppInputError, match="no editor version"):
        jobs._editor_version(jobs.JobContext(0, {"version": "nope"}, svc, tmp_path / "log"))
    # a candidate with a simulated blind comparison against its parent (what a loop round records)
    with session_scope() as s:
        fb.register_model_version(s, "editor", "cand", str(tiny_pipeline), parent_id=version.id, metrics={
            "pairwise_vs_serving": {"wins": 6, "ties": 3, "losses": 1, "annotators": 3, "n": 10}})
    d = dashboard.build()
    lines = d["tradeoff"].axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == [version.name] and len(lines[0].get_xdata()) == 7
    sim = d["wins"][d["wins"]["source"].str.startswith("simulated")].iloc[0]
    assert (sim["version 1"], sim["version 2"], sim["wins 1"], sim["wins 2"], sim["ties"]) == (
        "cand", version.name, 6, 1, 3)
    assert sim["win rate 1"] == 0.6 and sim["95% CI 1"] == "0.31–0.83"


def test_queue_command(svc, hive, tmp_path, capsys, monkeypatch):
    from hive_app.cli import register

    parser = argparse.ArgumentParser(prog="python -m hive")
    register(parser.add_subparsers(dest="command", required=True))
    data = _toy_dataset(tmp_path, 2)

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    assert run("queue", "--data", str(data), "--variants", "9") == 2
    assert "between 2 and 8" in capsys.readouterr().err
    assert run("queue", "--data", str(tmp_path / "missing")) == 2
    assert "metadata.jsonl not found" in capsys.readouterr().err
    assert run("queue", "--data", str(data), "--variants", "2", "--json") == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "queued" and out["rows"] == 2
    assert run("queue", "--data", str(data)) == 2  # one fill_queue job at a time
    assert "already queued" in capsys.readouterr().err
    assert jobs.JobWorker(svc).run_one()
    with session_scope(write=False) as s:
        assert len(s.scalars(select(EditRequest)).all()) == 2
    assert run("queue", "--data", str(data), "--now", "--model", str(tmp_path / "no-editor")) == 2
    assert "no editor at" in capsys.readouterr().err
    monkeypatch.setenv("HIVE_MODEL", svc.config.model)
    assert run("queue", "--data", str(data), "--now", "--json") == 0  # already queued rows are skipped
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["queued"] == 0


def test_dashboard_builds_with_and_without_data(svc, accounts):
    from hive_app import dashboard

    empty = dashboard.build()
    assert "0 rankings" in empty["summary"]
    rid = _request(svc, accounts["boss"])[0]
    for name in ("ann", "bea"):  # two annotators rank the same request
        item = svc.request_item(accounts[name], rid)
        svc.submit_ranking(accounts[name], rid, [item.variant_ids[0], item.variant_ids[1:]])
    full = dashboard.build()
    assert "2 rankings" in full["summary"] and "pairwise 1.00" in full["summary"]
    assert set(full["annotators"]["annotator"]) == {"ann", "bea"}
    assert dashboard.wilson(5, 10)[0] < 0.5 < dashboard.wilson(5, 10)[1]


def test_app_refuses_a_missing_model_folder_with_a_clear_message(tmp_path, capsys):
    import app

    assert app.main(["--model", str(tmp_path / "no-such-editor")]) == 2
    assert "no editor at" in capsys.readouterr().err


def test_gold_items_are_mixed_in_every_nth_item(make_service, accounts, tmp_path):
    svc = make_service(rankings_per_request=1, gold_every=2)
    fill_queue(svc, _toy_dataset(tmp_path, 1), variants=2, gold_rate=1.0, log=lambda m: None)
    plain = [_request(svc, accounts["boss"], k=2)[0] for _ in range(2)]
    seen = []
    for _ in range(3):
        item = svc.next_item(accounts["ann"])
        seen.append("plain" if item.request_id in plain else "gold")
        svc.submit_ranking(accounts["ann"], item.request_id, [item.variant_ids])
    assert seen == ["plain", "gold", "plain"]
    assert svc.next_item(accounts["ann"]) is None
    # the plain requests are full (one ranking each); gold items have no cap, so bea gets the gold one
    assert svc.next_item(accounts["bea"]).request_id not in plain
