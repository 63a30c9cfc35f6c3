"""The app in real headless Chromium: a visitor edits and ranks, an annotator works through the
queue and votes in the blind A/B, an admin runs a loop round on tiny models and sees it finish,
promotes its candidate and rolls back, a non-admin cannot reach admin actions; bad input through
the UI gets a clear message and writes nothing. Also takes the README's screenshots of each tab."""

from __future__ import annotations

import re

import pytest
from gradio_client import Client
from playwright.sync_api import Page, expect
from sqlalchemy import select

from db import feedback as fb
from db.engine import session_scope
from db.models import Comparison, EditRequest, Ranking, TrainingRun, User
from hive import toy
from hive_app.queue import fill_queue
from tests.app_fixtures import bad_files  # noqa: F401
from tests.app_server import USERS


def tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def sign_in(page: Page, name: str) -> None:
    page.locator("#login-name input, #login-name textarea").first.fill(name)
    page.locator("#login-password input").fill(USERS[name][1])
    page.locator("#login-btn").click()
    expect(page.locator("#who")).to_contain_text(f"Signed in as {name}")


def upload(page: Page, path) -> None:
    """Upload through the file chooser, as a person does (clearing an earlier upload first)."""
    clear = page.locator("#upload button[aria-label=Clear]")
    if clear.count():
        clear.click()
    with page.expect_file_chooser() as chooser:
        page.locator("#upload button.upload-container").click()
    chooser.value.set_files(str(path))


def status(page: Page, elem: str):
    return expect(page.locator(f"#{elem}"))


def shown_variants(page: Page) -> int:
    return sum(page.locator(f"#place-{i}").is_visible() for i in range(1, 9))


def place_all_with_keys(page: Page, n: int | None = None) -> None:
    """Keys 1..n give variants places 1..n (waiting for each, so the picks do not race)."""
    page.locator("#rank-item").click()  # focus out of any input
    n = n or shown_variants(page)
    for i in range(1, n + 1):
        page.keyboard.press(str(i))
        expect(page.locator(f"#place-{i} input")).to_have_value(str(i))


def test_visitor_uploads_edits_ranks_and_submits(page: Page, app, bad_files, tmp_path, shots):
    before = app.counts()
    # bad input first: each gets a clear message, and nothing is written
    upload(page, bad_files["not_image"])
    status(page, "edit-status").to_contain_text("not an image")
    upload(page, bad_files["huge"])
    status(page, "edit-status").to_contain_text("too large: 10000x10000")
    page.locator("#edit-btn").click()
    status(page, "edit-status").to_contain_text("no image")
    source = tmp_path / "scene.png"
    toy.sample_example(7).input_image.save(source)
    upload(page, source)
    status(page, "edit-status").to_contain_text("Loaded a 64×64 image")
    instruction = page.locator("#instruction textarea")
    instruction.fill("")
    page.locator("#edit-btn").click()
    status(page, "edit-status").to_contain_text("instruction is empty")
    instruction.fill("x" * 60_000)
    page.locator("#edit-btn").click()
    status(page, "edit-status").to_contain_text("instruction is too long: 60000 characters")
    assert app.counts() == before

    # the real edit: 4 variants, then rank them with the keyboard and submit
    instruction.fill("make the circle blue")
    page.locator("#consent input").check()
    page.locator("#edit-btn").click()
    status(page, "edit-status").to_contain_text(re.compile(r"Request \d+: 4 variants"))
    expect(page.locator("#gallery img")).to_have_count(4)
    page.screenshot(path=str(shots / "edit.png"), full_page=True)
    page.locator("#rank-these").click()
    expect(page.locator("#rank-item")).to_contain_text("(yours)")
    place_all_with_keys(page, 3)  # a ranking with a variant missing is refused, and nothing is written
    page.keyboard.press("Enter")
    status(page, "rank-status").to_contain_text("variant(s) [4] have no place")
    with session_scope(write=False) as s:
        assert s.scalars(select(Ranking)).all() == []
    page.locator("#rank-item").click()
    page.keyboard.press("4")
    expect(page.locator("#place-4 input")).to_have_value("4")
    page.get_by_text("Optional ratings (1–5)").click()  # an optional rating: quality 4 for variant 1
    page.locator("#rate-1-quality input").click()
    page.get_by_role("option", name="4", exact=True).click()
    expect(page.locator("#rate-1-quality input")).to_have_value("4")
    page.screenshot(path=str(shots / "rank.png"), full_page=True)
    page.locator("#rank-item").click()
    page.keyboard.press("Enter")
    status(page, "rank-status").to_contain_text("Ranking of request")
    with session_scope(write=False) as s:
        req = s.scalars(select(EditRequest).order_by(EditRequest.id.desc())).first()
        ranking = s.scalar(select(Ranking).where(Ranking.request_id == req.id))
        owner = s.get(User, req.user_id)
        items = sorted((i.rank, i.quality) for i in ranking.items)
    assert req.consent_training and owner.name.startswith("guest-")
    assert ranking.annotator_id == owner.id and items == [(1, 4), (2, None), (3, None), (4, None)]


def test_annotator_works_through_the_queue(page: Page, app, tmp_path, shots):
    toy.write_dataset(tmp_path / "ds", n=3, seed=11)
    fill_queue(app.running.service, tmp_path / "ds", variants=3, gold_rate=0.5, log=lambda m: None)
    sign_in(page, "bea")
    tab(page, "Rank")
    page.locator("#rank-next").click()
    done = 0
    while True:
        item = page.locator("#rank-item")
        expect(item).not_to_have_text("")
        if "queue is empty" in item.inner_text():
            break
        expect(item).to_contain_text("Request")
        rid = re.search(r"Request (\d+)", item.inner_text()).group(1)
        place_all_with_keys(page)
        page.keyboard.press("Enter")
        status(page, "rank-status").to_contain_text(f"request {rid} saved")
        done += 1
        if done == 1:  # undo the first submission and rank it again
            page.keyboard.press("u")
            status(page, "rank-status").to_contain_text(f"Undid your ranking of request {rid}")
            place_all_with_keys(page)
            page.locator("#rank-submit").click()
            status(page, "rank-status").to_contain_text(f"request {rid} saved")
        assert done < 10
    status(page, "rank-counter").to_contain_text(f"You ranked {done} requests")
    with session_scope(write=False) as s:
        bea = s.scalar(select(User).where(User.name == "bea"))
        mine = s.scalars(select(Ranking).where(Ranking.annotator_id == bea.id)).all()
    assert len(mine) == done >= 3

    # a blind A/B vote, then the dashboard
    tab(page, "Compare")
    page.locator("#pair-btn").click()
    status(page, "pair-instruction").to_contain_text("Instruction")
    page.screenshot(path=str(shots / "compare.png"), full_page=True)
    page.locator("#vote-left").click()
    status(page, "compare-status").to_contain_text("Vote saved")
    page.locator("#vote-both_bad").click()
    status(page, "compare-status").to_contain_text("Vote saved (both bad")
    with session_scope(write=False) as s:
        choices = [c.choice for c in s.scalars(select(Comparison).order_by(Comparison.id))]
    assert choices[-1] == "both_bad" and choices[-2] in ("a", "b")


def test_admin_runs_a_loop_round_and_promotes_its_candidate(page: Page, app, shots, tmp_path_factory):
    import json

    from hive import registry
    from hive.simulate import simulate
    from tests.test_reward_model import build_tiny_clip

    clip = build_tiny_clip(tmp_path_factory.mktemp("browser_clip") / "clip")
    simulate(None, 4, variants=3, annotators=1, progress=False)  # rankings to learn from (editor-free stand-ins)
    served = registry.promoted("editor")
    # a loop round on tiny models: every stage runs (export, reward, data, fine-tune, evaluate, register)
    config = {"name": "browser-candidate", "toy_n": 4, "steps": 2, "batch_size": 2, "warmup_steps": 1,
              "ema_decay": None, "checkpoint_every": 1, "reward_backbone": str(clip), "reward_steps": 2,
              "reward_batch_size": 2, "reward_hidden": 16, "reward_freeze_layers": 1, "eval_n": 2, "eval_steps": 1,
              "eval_batch": 2, "score_batch": 16}
    sign_in(page, "boss")
    tab(page, "Admin")
    expect(page.locator("#job-kind input")).to_have_value("loop_round")  # the loop round is offered first
    expect(page.locator("#job-help")).to_contain_text("fine-tune")
    page.locator("#job-config textarea, #job-config input").first.fill(json.dumps(config))
    page.locator("#job-start").click()
    status(page, "admin-status").to_contain_text("(loop_round) queued")
    # live progress and log, refreshed by the timer while the round runs
    expect(page.locator("#job-log textarea")).to_have_value(re.compile(r"\[export\] start"), timeout=120_000)
    expect(page.locator("#job-progress")).to_contain_text("loop_round", timeout=10_000)
    expect(page.locator("#job-progress")).to_contain_text("succeeded", timeout=600_000)
    expect(page.locator("#job-progress-text")).to_have_text("6 of 6 stages")
    expect(page.locator("#job-log textarea")).to_have_value(re.compile(r"candidate browser-candidate"))
    expect(page.locator("#versions-table")).to_contain_text("browser-candidate")
    page.screenshot(path=str(shots / "admin.png"), full_page=True)
    with session_scope(write=False) as s:
        runs = {r.kind: r for r in s.scalars(select(TrainingRun))}
        job, loop_row = runs["loop_round"], runs["loop"]
        assert (job.status, loop_row.status) == ("succeeded", "succeeded")
        assert job.produced_version_id == loop_row.produced_version_id is not None
        cand = s.get(fb.ModelVersion, job.produced_version_id)
        assert (cand.name, cand.status, cand.parent_id) == ("browser-candidate", "candidate", served["id"])
        assert "toy_success" in cand.metrics and cand.metrics["pairwise_vs_serving"]["n"] == 2
    assert registry.promoted("editor")["id"] == served["id"]  # a loop round never promotes by itself

    # promote the candidate, then roll back to the editor promoted before it
    page.locator("#version-dd input").click()
    page.get_by_role("option", name="browser-candidate (candidate)").click()
    page.locator("#promote-btn").click()
    status(page, "admin-status").to_contain_text("Now serving browser-candidate")
    assert registry.promoted("editor")["name"] == "browser-candidate"
    page.locator("#rollback-btn").click()
    status(page, "admin-status").to_contain_text(f"Now serving {served['name']}")
    assert registry.promoted("editor")["id"] == served["id"] == app.running.service.served

    # a trade-off sweep of the promoted editor, for the dashboard's trade-off plot
    page.locator("#job-kind input").click()
    page.get_by_role("option", name="tradeoff").click()
    expect(page.locator("#job-help")).to_contain_text("trade-off")
    page.locator("#job-config textarea, #job-config input").first.fill(
        json.dumps({"n": 2, "steps": 1, "clip": str(clip)}))
    page.locator("#job-start").click()
    status(page, "admin-status").to_contain_text("(tradeoff) queued")
    expect(page.locator("#job-progress")).to_contain_text("succeeded", timeout=300_000)
    expect(page.locator("#job-progress-text")).to_have_text("7 of 7 steps")
    tab(page, "Dashboard")
    status(page, "dash-summary").to_contain_text("rankings by")
    page.wait_for_timeout(1500)  # let the plots draw
    page.screenshot(path=str(shots / "dashboard.png"), full_page=True)


def test_non_admin_cannot_reach_admin_actions(page: Page, app):
    page.locator("#toy-btn").click()  # (the toy-scene button fills the source and an instruction)
    status(page, "edit-status").to_contain_text(re.compile(r"Toy scene \d+: a (small|large) "))
    expect(page.locator("#instruction textarea")).not_to_have_value("")
    page.locator("#example input").click()  # (and so does an example)
    page.get_by_role("option").first.click()
    status(page, "edit-status").to_contain_text("Toy scene 11:")
    expect(page.locator("#instruction textarea")).to_have_value(toy.sample_example(11).edit.instruction)
    expect(page.get_by_role("tab", name="Admin")).to_have_count(0)
    tab(page, "Dashboard")  # the dashboard names annotators: not for guests
    status(page, "dash-summary").to_contain_text("Sign in with an annotator or admin account")
    tab(page, "Edit")
    sign_in(page, "vic")  # a visitor account edits but does not rank, and stays signed in when told so
    tab(page, "Rank")
    page.locator("#rank-next").click()
    status(page, "rank-status").to_contain_text("ranking and A/B votes need an annotator account")
    expect(page.locator("#who")).to_contain_text("Signed in as vic")
    tab(page, "Edit")
    sign_in(page, "ann")
    expect(page.get_by_role("tab", name="Admin")).to_have_count(0)
    # ... nor through the API, with the same account
    client = Client(app.url, verbose=False)
    token = client.predict("ann", USERS["ann"][1], api_name="/login")
    with pytest.raises(Exception, match="admins only"):
        client.predict(token, "evaluate", {"n": 1}, api_name="/start_job")
