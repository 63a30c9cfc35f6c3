"""The Gradio app: Edit, Rank, Compare, Dashboard and Admin tabs, plus the named API endpoints.

Every handler here is glue: it turns form values into a call on `HiveService` (or the job
runner) and the result back into component values. Messages for people come from the
service's errors (`USER_ERRORS`) and are shown in the tab's status line (UI) or raised as
`gr.Error` (API, so that `gradio_client` raises them).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

import gradio as gr

from db import feedback as fb
from db.engine import session_scope
from hive import toy
from hive.editor import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS
from hive_app import dashboard, jobs
from hive_app.auth import Principal
from hive_app.service import (DEFAULT_VARIANTS, MAX_STEPS, MAX_VARIANTS, MIN_VARIANTS, USER_ERRORS, AppInputError,
                              HiveService, RankItem)

K = MAX_VARIANTS
DIMENSIONS = ("instruction_following", "preservation", "quality")
EXAMPLE_SEEDS = (11, 22, 33, 44)

KEYBOARD_JS = """
<script>
// Rank tab shortcuts: 1-8 pick the next place for a variant, Enter submits, s skips,
// b marks all bad, u undoes the last submission, n loads the next request.
document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const rank = document.getElementById('rank-panel');
  if (!rank || rank.offsetParent === null) return;
  const click = (id) => { const b = document.getElementById(id); if (b) { b.click(); e.preventDefault(); } };
  if (/^[1-8]$/.test(e.key)) click('pick-' + e.key);
  else if (e.key === 'Enter') click('rank-submit');
  else if (e.key === 's') click('rank-skip');
  else if (e.key === 'b') click('rank-allbad');
  else if (e.key === 'u') click('rank-undo');
  else if (e.key === 'n') click('rank-next');
});
</script>
"""

CSS = """
#edit-status, #rank-status, #compare-status, #admin-status {min-height: 1.5em}
.variant-col {min-width: 140px}
"""


def api_errors(fn: Callable) -> Callable:
    """For API endpoints: a user error becomes gr.Error, whose message gradio_client raises."""

    @wraps(fn)
    def inner(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return inner


def build_app(svc: HiveService) -> gr.Blocks:
    """The whole app. `svc` does the work; this function only lays out and wires components."""
    auth = svc.auth

    def ensure_token(token: str) -> str:
        """The session's token, or a new guest session where anonymous use is on."""
        if token:
            auth.principal(token)  # AuthError when stale
            return token
        return auth.guest()

    def who_line(token: str) -> str:
        try:
            who: Principal | None = auth.principal(token)
        except USER_ERRORS:
            who = None
        if who is None:
            anon = [w for w, on in (("edit", auth.anonymous_edit), ("rank", auth.anonymous_rank)) if on]
            return ("Not signed in: you may " + " and ".join(anon) + " as a guest."
                    if anon else "Not signed in: sign in to edit and rank.")
        return f"Signed in as **{who.name}** ({'guest ' if who.guest else ''}{who.role})."

    with gr.Blocks(title="HIVE: edit, rank, compare") as demo:
        token = gr.State("")
        build_api(svc)  # first, so that the endpoints get their plain names (edit, submit_ranking, ...)
        gr.Markdown("# HIVE — instruction-guided image editing that learns from your rankings")
        with gr.Row():
            who_md = gr.Markdown(who_line(""), elem_id="who")
            name_in = gr.Textbox(label="User name", scale=1, elem_id="login-name")
            pw_in = gr.Textbox(label="Password", type="password", scale=1, elem_id="login-password")
            login_btn = gr.Button("Sign in", scale=0, elem_id="login-btn")
            logout_btn = gr.Button("Sign out", scale=0, elem_id="logout-btn")
        login_status = gr.Markdown("", elem_id="login-status")

        with gr.Tabs(elem_id="tabs") as tabs:
            # ---------------------------------------------------------------- Edit
            with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
                source_path = gr.State(None)
                last_request = gr.State(None)
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.File(label="Upload a photo (PNG, JPEG, WebP, ...)", type="filepath",
                                         elem_id="upload")
                        with gr.Row():
                            toy_btn = gr.Button("Random toy scene", elem_id="toy-btn")
                            example_dd = gr.Dropdown(label="or an example", elem_id="example",
                                                     choices=[(toy.sample_example(s).edit.instruction, s)
                                                              for s in EXAMPLE_SEEDS], value=None)
                        source_img = gr.Image(label="Source", interactive=False, height=256, elem_id="source")
                        instruction = gr.Textbox(label="Instruction", placeholder="e.g. make the circle blue",
                                                 elem_id="instruction")
                        n_variants = gr.Slider(MIN_VARIANTS, MAX_VARIANTS, value=DEFAULT_VARIANTS, step=1,
                                               label="Variants", elem_id="variants")
                        with gr.Accordion("Advanced settings", open=False):
                            seed_in = gr.Number(label="Seed (-1: random)", value=-1, precision=0)
                            steps_in = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps")
                            guidance_in = gr.Slider(0, 20, value=DEFAULT_GUIDANCE, step=0.5, label="Text guidance")
                            image_guidance_in = gr.Slider(0, 5, value=DEFAULT_IMAGE_GUIDANCE, step=0.1,
                                                          label="Image guidance")
                        consent = gr.Checkbox(label="You may use this photo and its edits to train the editor",
                                              value=False, elem_id="consent")
                        edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-btn")
                    with gr.Column(scale=1):
                        gallery = gr.Gallery(label="Variants", columns=4, height=320, elem_id="gallery")
                        edit_status = gr.Markdown("", elem_id="edit-status")
                        rank_these = gr.Button("Rank these variants", visible=False, elem_id="rank-these")

            # ---------------------------------------------------------------- Rank
            with gr.Tab("Rank", id="rank", elem_id="tab-rank"):
                item_state = gr.State(None)
                with gr.Column(elem_id="rank-panel"):
                    counter_md = gr.Markdown("", elem_id="rank-counter")
                    item_md = gr.Markdown("Press **Next** (n) to load a request to rank.", elem_id="rank-item")
                    gr.Markdown("Give each variant a place (1 = best; tied variants share a place). Keys: "
                                "**1–8** pick the next place for that variant, **Enter** submits, **b** all bad, "
                                "**s** skip, **u** undo, **n** next.")
                    with gr.Row():
                        rank_source = gr.Image(label="Source", interactive=False, height=160, scale=0,
                                               min_width=160, elem_id="rank-source")
                        cols, imgs, rank_dds, picks = [], [], [], []
                        for i in range(K):
                            with gr.Column(visible=False, min_width=140, elem_classes="variant-col") as col:
                                imgs.append(gr.Image(label=f"Variant {i + 1}", interactive=False, height=160,
                                                     elem_id=f"variant-{i + 1}"))
                                rank_dds.append(gr.Dropdown(label="Place", choices=[], value=None,
                                                            elem_id=f"place-{i + 1}"))
                                picks.append(gr.Button(f"Pick ({i + 1})", size="sm", elem_id=f"pick-{i + 1}"))
                            cols.append(col)
                    with gr.Accordion("Optional ratings (1–5)", open=False):
                        rating_dds, rating_rows = [], []
                        for i in range(K):
                            with gr.Row(visible=False) as rating_row:
                                rating_rows.append(rating_row)
                                for dim in DIMENSIONS:
                                    rating_dds.append(gr.Dropdown(label=f"Variant {i + 1}: {dim.replace('_', ' ')}",
                                                                  choices=["", "1", "2", "3", "4", "5"], value="",
                                                                  elem_id=f"rate-{i + 1}-{dim}"))
                    with gr.Row():
                        submit_btn = gr.Button("Submit ranking", variant="primary", elem_id="rank-submit")
                        allbad_btn = gr.Button("All bad", elem_id="rank-allbad")
                        skip_btn = gr.Button("Skip", elem_id="rank-skip")
                        undo_btn = gr.Button("Undo last submission", elem_id="rank-undo")
                        next_btn = gr.Button("Next", elem_id="rank-next")
                    rank_status = gr.Markdown("", elem_id="rank-status")

            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                pair_state = gr.State(None)
                gr.Markdown("A blind test: two editor versions edited the same input; which output is better? "
                            "Sides are shuffled.")
                pair_btn = gr.Button("New pair", elem_id="pair-btn")
                pair_md = gr.Markdown("", elem_id="pair-instruction")
                with gr.Row():
                    pair_src = gr.Image(label="Source", interactive=False, height=200)
                    left_img = gr.Image(label="Left", interactive=False, height=200, elem_id="pair-left")
                    right_img = gr.Image(label="Right", interactive=False, height=200, elem_id="pair-right")
                with gr.Row():
                    vote_btns = {c: gr.Button(label, elem_id=f"vote-{c}") for c, label in
                                 (("left", "Left is better"), ("right", "Right is better"), ("tie", "Tie"),
                                  ("both_bad", "Both bad"))}
                compare_status = gr.Markdown("", elem_id="compare-status")

            # ---------------------------------------------------------------- Dashboard
            with gr.Tab("Dashboard", id="dashboard", elem_id="tab-dashboard") as dash_tab:
                dash_refresh = gr.Button("Refresh", elem_id="dash-refresh")
                dash_summary = gr.Markdown("", elem_id="dash-summary")
                with gr.Row():
                    plot_time = gr.Plot(label="Rankings over time")
                    plot_ann = gr.Plot(label="Per annotator")
                with gr.Row():
                    plot_gold = gr.Plot(label="Gold accuracy")
                    plot_wins = gr.Plot(label="Win rates")
                with gr.Row():
                    plot_models = gr.Plot(label="Models")
                    plot_trade = gr.Plot(label="Trade-off")
                ann_table = gr.Dataframe(label="Annotators", interactive=False)
                wins_table = gr.Dataframe(label="Blind A/B win rates", interactive=False)

            # ---------------------------------------------------------------- Admin
            with gr.Tab("Admin", id="admin", elem_id="tab-admin", visible=False) as admin_tab:
                kinds = jobs.job_kinds()
                first_kind = "loop_round" if "loop_round" in kinds else "evaluate"
                loop_note = (" A **loop round** exports the rankings, trains the reward model, fine-tunes the "
                             "promoted editor, evaluates it against the promoted one and registers it as a "
                             "candidate; promote it below when its numbers are better."
                             if "loop_round" in kinds else
                             " The loop round (`loop_round`) appears here once `hive.loop` provides `run_round`.")
                gr.Markdown("Jobs run in a background worker, one of a kind at a time; their state is in the "
                            "database." + loop_note)
                with gr.Row():
                    job_kind = gr.Dropdown(label="Job", choices=sorted(kinds), value=first_kind, elem_id="job-kind")
                    job_config = gr.Textbox(label="Config (JSON)", value=json.dumps(kinds[first_kind].defaults),
                                            elem_id="job-config")
                    start_btn = gr.Button("Start job", variant="primary", elem_id="job-start")
                job_help = gr.Markdown(kinds[first_kind].description, elem_id="job-help")
                job_bar = gr.HTML("", elem_id="job-progress")
                jobs_table = gr.Dataframe(label="Jobs", interactive=False, elem_id="jobs-table")
                job_log = gr.Textbox(label="Log of the latest job (live)", lines=12, max_lines=12,
                                     interactive=False, elem_id="job-log")
                versions_table = gr.Dataframe(label="Editor versions", interactive=False, elem_id="versions-table")
                with gr.Row():
                    version_dd = gr.Dropdown(label="Editor version", choices=[], elem_id="version-dd")
                    promote_btn = gr.Button("Promote", elem_id="promote-btn")
                    rollback_btn = gr.Button("Roll back", elem_id="rollback-btn")
                admin_status = gr.Markdown("", elem_id="admin-status")
                timer = gr.Timer(2.0, active=False)

        # ================================================================ handlers: sign-in
        def do_login(name: str, password: str):
            try:
                tok = auth.login(name, password)
            except USER_ERRORS as exc:
                return "", who_line(""), f"⚠ {exc}", gr.update(visible=False), gr.Timer(active=False), ""
            admin = auth.principal(tok).is_admin
            return tok, who_line(tok), "", gr.update(visible=admin), gr.Timer(active=admin), ""

        def do_logout():
            return "", who_line(""), "Signed out.", gr.update(visible=False), gr.Timer(active=False), ""

        login_outputs = [token, who_md, login_status, admin_tab, timer, pw_in]
        login_btn.click(do_login, [name_in, pw_in], login_outputs, api_visibility="private")
        pw_in.submit(do_login, [name_in, pw_in], login_outputs, api_visibility="private")
        logout_btn.click(do_logout, None, login_outputs, api_visibility="private")

        # ================================================================ handlers: edit
        def on_upload(path: str | None):
            """Check the upload at once, so a bad file gets its message before anything else."""
            from hive.editor import load_image

            if not path:
                return None, None, ""
            try:
                img = load_image(path)
            except USER_ERRORS as exc:
                return None, None, f"⚠ {exc}"
            return path, img, f"Loaded a {img.width}×{img.height} image."

        def use_toy(seed: int | None):
            seed = random.randrange(10**9) if seed is None else int(seed)
            ex = toy.sample_example(seed)
            path = svc.store.home / "tmp" / f"toy-{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            ex.input_image.save(path)
            return str(path), ex.input_image, ex.edit.instruction, f"Toy scene {seed}: {ex.edit.source.caption()}"

        upload.upload(on_upload, upload, [source_path, source_img, edit_status], api_visibility="private")
        upload.clear(lambda: (None, None, ""), None, [source_path, source_img, edit_status], api_visibility="private")
        toy_btn.click(lambda: use_toy(None), None, [source_path, source_img, instruction, edit_status],
                      api_visibility="private")
        example_dd.input(lambda s: use_toy(s) if s is not None else (None, None, "", ""), example_dd,
                         [source_path, source_img, instruction, edit_status], api_visibility="private")

        def do_edit(tok, src, text, k, seed, steps, g, ig, agree, progress=gr.Progress(track_tqdm=True)):
            """Edit button -> HiveService.edit -> Editor.edit; the variants are recorded in the db."""
            try:
                if not src:
                    raise AppInputError("no image: upload a photo, or draw a toy scene")
                svc.check_edit(src, text, k, None if seed in (None, -1) else seed, steps, g, ig)
                tok = ensure_token(tok)
                progress(0, desc="sampling variants")
                out = svc.edit(tok, src, text, variants=k, seed=None if seed in (None, -1) else seed,
                               steps=steps, guidance=g, image_guidance=ig, consent=bool(agree))
            except USER_ERRORS as exc:
                return tok, None, f"⚠ {exc}", None, gr.update(visible=False), who_line(tok)
            msg = (f"Request {out.request_id}: {len(out.images)} variants by **{out.model_version}** "
                   f"(seeds {out.records[0]['seed']}–{out.records[-1]['seed']}). Rank them to teach the editor.")
            return tok, out.images, msg, out.request_id, gr.update(visible=True), who_line(tok)

        edit_btn.click(do_edit, [token, source_path, instruction, n_variants, seed_in, steps_in, guidance_in,
                                 image_guidance_in, consent],
                       [token, gallery, edit_status, last_request, rank_these, who_md],
                       api_visibility="private", concurrency_limit=2, concurrency_id="editor")

        # ================================================================ handlers: rank
        rank_outputs = [item_state, item_md, rank_source, *cols, *imgs, *rank_dds, *rating_rows, *rating_dds,
                        counter_md, rank_status, token, who_md]

        def render(tok: str, item: RankItem | None, status: str) -> list:
            """Component values for one request (or for an empty queue)."""
            try:
                counts = svc.counters(tok) if tok else None
            except USER_ERRORS:  # e.g. a visitor account, which does not rank
                counts = None
            counter = (f"You ranked **{counts['ranked']}** requests (**{counts['today']}** today); "
                       f"**{counts['waiting']}** waiting." if counts else "")
            if item is None:
                empty = "" if status.startswith("⚠") else "The queue is empty: nothing waits for your ranking."
                return [None, empty, None,
                        *[gr.update(visible=False)] * K, *[None] * K, *[gr.update(value=None)] * K,
                        *[gr.update(visible=False)] * K, *[""] * (K * 3), counter, status, tok, who_line(tok)]
            k = len(item.variant_ids)
            places = [str(p) for p in range(1, k + 1)]
            state = {"request_id": item.request_id, "variant_ids": item.variant_ids, "shown_at": time.time()}
            head = (f"**Request {item.request_id}**{' (yours)' if item.own else ''}: “{item.instruction}”")
            return [state, head, item.source_path,
                    *[gr.update(visible=i < k) for i in range(K)],
                    *[item.variant_paths[i] if i < k else None for i in range(K)],
                    *[gr.update(choices=[""] + places, value="") for _ in range(K)],
                    *[gr.update(visible=i < k) for i in range(K)],
                    *[""] * (K * 3), counter, status, tok, who_line(tok)]

        def next_item(tok: str, status: str = ""):
            try:
                tok = ensure_token(tok)
                return render(tok, svc.next_item(tok), status)
            except USER_ERRORS as exc:  # the session stays as it was (a visitor stays signed in)
                return render(tok, None, f"⚠ {exc}")

        def rank_request(tok: str, request_id: int | None):
            try:
                tok = ensure_token(tok)
                item = svc.request_item(tok, request_id) if request_id else svc.next_item(tok)
                return [*render(tok, item, ""), gr.Tabs(selected="rank")]
            except USER_ERRORS as exc:
                return [*render(tok, None, f"⚠ {exc}"), gr.Tabs(selected="rank")]

        next_btn.click(next_item, token, rank_outputs, api_visibility="private")
        rank_these.click(rank_request, [token, last_request], [*rank_outputs, tabs], api_visibility="private")

        def pick(i: int) -> Callable:
            def fn(item, *places):
                """Key/Pick i: give variant i the next free place (ties: set the same place by hand)."""
                if item is None or i >= len(item["variant_ids"]):
                    return [gr.update()] * K
                values = list(places)
                if not values[i]:
                    used = [int(p) for p in values[:len(item["variant_ids"])] if p]
                    values[i] = str(max(used, default=0) + 1)
                return [gr.update(value=v) for v in values]
            return fn

        for i, btn in enumerate(picks):
            btn.click(pick(i), [item_state, *rank_dds], rank_dds, api_visibility="private")

        def collect(item: dict, places: list, ratings: list) -> tuple[list, dict]:
            """Form values -> (order best first with ties grouped, ratings by variant id)."""
            vids = item["variant_ids"]
            missing = [i + 1 for i in range(len(vids)) if not places[i]]
            if missing and len(missing) < len(vids):
                raise AppInputError(f"variant(s) {missing} have no place: give every variant a place "
                                    "(tied variants share one), or press All bad or Skip")
            tiers: dict[int, list[int]] = {}
            for i, vid in enumerate(vids):
                if places[i]:
                    tiers.setdefault(int(places[i]), []).append(vid)
            if tiers and sorted(tiers) != list(range(1, len(tiers) + 1)):
                raise AppInputError(f"places must run 1, 2, 3, ... without gaps (ties share a place); "
                                    f"got {sorted(tiers)}")
            order = [tiers[p] for p in sorted(tiers)]
            rated: dict[int, dict] = {}
            for i, vid in enumerate(vids):
                for j, dim in enumerate(DIMENSIONS):
                    value = ratings[i * 3 + j]
                    if value:
                        rated.setdefault(vid, {})[dim] = int(value)
            return order, rated

        def submit(kind: str) -> Callable:
            def fn(tok, item, *values):
                places, ratings = list(values[:K]), list(values[K:])
                if item is None:
                    return next_item(tok, "⚠ nothing to submit: press Next to load a request")
                try:
                    order, rated = collect(item, places, ratings) if kind != "skip" else ([], {})
                    if kind == "rank" and not order:
                        raise AppInputError("give every variant a place (1 = best), or press All bad or Skip")
                    rid = svc.submit_ranking(tok, item["request_id"], order or None, all_bad=kind == "all_bad",
                                             skip=kind == "skip", ratings=rated or None,
                                             seconds=round(time.time() - item["shown_at"], 1))
                except USER_ERRORS as exc:
                    return [gr.update()] * (len(rank_outputs) - 4) + [gr.update(), f"⚠ {exc}", tok, who_line(tok)]
                done = {"rank": "Ranking", "all_bad": "“All bad”", "skip": "Skip"}[kind]
                return next_item(tok, f"✓ {done} of request {item['request_id']} saved (ranking {rid}).")
            return fn

        rank_inputs = [token, item_state, *rank_dds, *rating_dds]
        submit_btn.click(submit("rank"), rank_inputs, rank_outputs, api_visibility="private")
        allbad_btn.click(submit("all_bad"), rank_inputs, rank_outputs, api_visibility="private")
        skip_btn.click(submit("skip"), rank_inputs, rank_outputs, api_visibility="private")

        def undo(tok):
            try:
                request_id = svc.undo_last(tok)
                if request_id is None:
                    return next_item(tok, "Nothing to undo.")
                return render(tok, svc.request_item(tok, request_id),
                              f"↶ Undid your ranking of request {request_id}: rank it again.")
            except USER_ERRORS as exc:
                return [gr.update()] * (len(rank_outputs) - 4) + [gr.update(), f"⚠ {exc}", tok, who_line(tok)]

        undo_btn.click(undo, token, rank_outputs, api_visibility="private")

        # ================================================================ handlers: compare
        def new_pair(tok, status: str = ""):
            try:
                tok = ensure_token(tok)
                pair = svc.compare_pair(tok)
            except USER_ERRORS as exc:
                return tok, None, "", None, None, None, f"⚠ {exc}"
            return (tok, {"token": pair.token, "shown_at": time.time()}, f"Instruction: “{pair.instruction}”",
                    pair.source_path, pair.left_path, pair.right_path, status)

        pair_outputs = [token, pair_state, pair_md, pair_src, left_img, right_img, compare_status]
        pair_btn.click(new_pair, token, pair_outputs, api_visibility="private", concurrency_id="editor")

        def vote(choice: str) -> Callable:
            def fn(tok, pair):
                if pair is None:
                    return new_pair(tok, "⚠ no pair yet: here is one")
                try:
                    cid = svc.compare_vote(tok, pair["token"], choice, seconds=round(time.time() - pair["shown_at"], 1))
                except USER_ERRORS as exc:
                    return tok, pair, gr.update(), gr.update(), gr.update(), gr.update(), f"⚠ {exc}"
                return new_pair(tok, f"✓ Vote saved ({choice.replace('_', ' ')}, comparison {cid}). Next pair:")
            return fn

        for choice, btn in vote_btns.items():
            btn.click(vote(choice), [token, pair_state], pair_outputs, api_visibility="private",
                      concurrency_id="editor")

        # ================================================================ handlers: dashboard
        def refresh_dashboard(tok):
            """Annotators and admins only: the dashboard names annotators and their accuracy."""
            try:
                who = auth.principal(tok)
            except USER_ERRORS:
                who = None
            if who is None or who.guest or not who.can_rank:
                return ("Sign in with an annotator or admin account to see the dashboard.",
                        *[None] * 6, None, None)
            d = dashboard.build()
            return (d["summary"], d["over_time"], d["per_annotator"], d["gold"], d["win_rates"], d["models"],
                    d["tradeoff"], d["annotators"], d["wins"])

        dash_outputs = [dash_summary, plot_time, plot_ann, plot_gold, plot_wins, plot_models, plot_trade, ann_table,
                        wins_table]
        dash_refresh.click(refresh_dashboard, token, dash_outputs, api_visibility="private")
        dash_tab.select(refresh_dashboard, token, dash_outputs, api_visibility="private")

        # ================================================================ handlers: admin
        def admin_view(tok):
            """Jobs, the latest job's log and the editor versions (also refreshed by the timer)."""
            try:
                auth.for_admin(tok)
            except USER_ERRORS:
                return gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
            runs = jobs.list_jobs()
            rows = [[r.id, r.kind, r.status, str(r.created_at)[:19], str(r.finished_at or "")[:19],
                     (r.error or "")[:80]] for r in runs]
            # the newest job the worker runs (a `loop` row is the loop's own record of a loop_round job)
            latest = next((r for r in runs if r.kind in jobs.JOB_KINDS), runs[0] if runs else None)
            log = jobs.read_log(latest) if latest else "(no jobs yet)"
            versions = svc.editor_versions()
            names = {v.id: v.name for v in versions}
            vrows = []
            for v in versions:
                m = v.metrics or {}
                pw = m.get("pairwise_vs_serving") if isinstance(m.get("pairwise_vs_serving"), dict) else {}
                wtl = f"{pw['wins']}/{pw['ties']}/{pw['losses']}" if {"wins", "ties", "losses"} <= set(pw) else ""
                vrows.append([v.id, v.name, v.status, names.get(v.parent_id, ""), m.get("toy_success"),
                              m.get("serving_toy_success"), wtl, v.path])
            return (gr.update(value=rows, headers=["id", "kind", "status", "created", "finished", "error"]),
                    log, progress_html(latest),
                    gr.update(value=vrows, headers=["id", "name", "status", "parent", "toy success",
                                                    "parent's toy success", "vs parent W/T/L (simulated)", "path"]),
                    gr.update(choices=[(f"{v.name} ({v.status})", v.id) for v in versions]))

        admin_outputs = [jobs_table, job_log, job_bar, versions_table, version_dd]
        timer.tick(admin_view, token, admin_outputs, api_visibility="private")
        admin_tab.select(admin_view, token, admin_outputs, api_visibility="private")
        job_kind.input(lambda k: (json.dumps(jobs.JOB_KINDS[k].defaults), jobs.JOB_KINDS[k].description)
                       if k in jobs.JOB_KINDS else ("{}", ""), job_kind, [job_config, job_help],
                       api_visibility="private")

        def start_job(tok, kind, config):
            try:
                auth.for_admin(tok)
                try:
                    cfg = json.loads(config or "{}")
                except ValueError as exc:
                    raise AppInputError(f"the config is not valid JSON: {exc}") from None
                if not isinstance(cfg, dict):
                    raise AppInputError("the config must be a JSON object, e.g. {\"n\": 8}")
                run_id = jobs.submit_job(kind, cfg)
            except USER_ERRORS as exc:
                return f"⚠ {exc}", *admin_view(tok)
            return f"✓ Job {run_id} ({kind}) queued.", *admin_view(tok)

        start_btn.click(start_job, [token, job_kind, job_config], [admin_status, *admin_outputs],
                        api_visibility="private")

        def change_version(action: str) -> Callable:
            def fn(tok, version_id):
                try:
                    auth.for_admin(tok)
                    mv = promote(version_id) if action == "promote" else rollback()
                except USER_ERRORS as exc:
                    return f"⚠ {exc}", *admin_view(tok)
                return f"✓ Now serving **{mv['name']}**.", *admin_view(tok)
            return fn

        promote_btn.click(change_version("promote"), [token, version_dd], [admin_status, *admin_outputs],
                          api_visibility="private")
        rollback_btn.click(change_version("rollback"), [token, version_dd], [admin_status, *admin_outputs],
                           api_visibility="private")

        def model_defaults():
            """The sliders start at the promoted editor's own defaults (its hive.json `sampling`)."""
            try:
                d = svc.sampling_defaults()
            except USER_ERRORS:  # no editor promoted yet: keep the global defaults
                return gr.update(), gr.update(), gr.update()
            return d["steps"], d["guidance"], d["image_guidance"]

        demo.load(model_defaults, None, [steps_in, guidance_in, image_guidance_in], api_visibility="private")
    return demo


def progress_html(run) -> str:
    """A progress bar for a job: its last `PROGRESS done/total` log line (loop rounds: stages)."""
    if run is None:
        return ""
    done_total = jobs.job_progress(run)
    what = {"loop_round": "stages"}.get(run.kind, "steps")
    if done_total is None:
        text, bar = "no progress reported yet", ""
    else:
        done, total = done_total
        text = f"{done} of {total} {what}"
        bar = f'<progress value="{done}" max="{max(total, 1)}" style="width: 240px"></progress> '
    return (f'<div id="job-progress-line">Job {run.id} ({run.kind}) <b>{run.status}</b>: {bar}'
            f'<span id="job-progress-text">{text}</span></div>')


def promote(version_id: Any) -> dict:
    """Serve an editor version from now on (hive.registry: its folder must be complete)."""
    from hive import registry

    if version_id in (None, ""):
        raise AppInputError("choose an editor version to promote")
    try:
        ident = int(version_id)
    except (TypeError, ValueError):
        raise AppInputError(f"unknown editor version {version_id!r}") from None
    return registry.promote(ident, "editor")


def rollback() -> dict:
    """Go back to the editor promoted before the current one (hive.registry)."""
    from hive import registry

    return registry.rollback("editor")


def build_api(svc: HiveService) -> None:
    """Named endpoints for scripts; each takes the session token from `login` or `guest`."""
    auth = svc.auth
    with gr.Column(visible=False):
        # edit has a file input, so it uses components (gradio_client uploads `handle_file(...)`)
        f_image = gr.File(type="filepath")
        f_instruction = gr.Textbox()
        f_variants = gr.Number(value=DEFAULT_VARIANTS, precision=0)
        f_seed = gr.Number(value=-1, precision=0)
        f_steps = gr.Number(value=None, precision=0)  # None: the promoted model's defaults
        f_guidance = gr.Number(value=None)
        f_image_guidance = gr.Number(value=None)
        f_consent = gr.Checkbox(value=False)
        f_token = gr.Textbox()
        o_json = gr.JSON()
        o_gallery = gr.Gallery(format="png")
        f_button = gr.Button()

    @api_errors
    def api_edit(image, instruction, variants, seed, steps, guidance, image_guidance, consent, token):
        """Edit an image: K variants (2-8) by the promoted editor, recorded with their parameters.
        Returns {request_id, variant_ids, model_version, variants: [params]} and the images."""
        out = svc.edit(token, image, instruction, variants=variants, seed=None if seed in (None, -1) else seed,
                       steps=steps, guidance=guidance, image_guidance=image_guidance, consent=bool(consent))
        return out.to_json(), out.images

    f_button.click(api_edit, [f_image, f_instruction, f_variants, f_seed, f_steps, f_guidance, f_image_guidance,
                              f_consent, f_token], [o_json, o_gallery], api_name="edit",
                   concurrency_limit=2, concurrency_id="editor")

    @api_errors
    def login(name: str, password: str) -> str:
        """A session token for an account (accounts: `python -m hive user add`)."""
        return auth.login(name, password)

    @api_errors
    def guest() -> str:
        """A session token for a new guest account, where anonymous use is switched on."""
        return auth.guest()

    @api_errors
    def next_item(token: str) -> dict:
        """The next request waiting for this account's ranking (own requests first), or {} when none."""
        item = svc.next_item(token)
        return item.to_json() if item else {}

    @api_errors
    def submit_ranking(token: str, request_id: int, order: list, all_bad: bool = False, skip: bool = False,
                       ratings: dict | None = None, submission_key: str | None = None) -> dict:
        """Rank a request's variants: `order` lists variant ids best first, tied ids in a list,
        e.g. [12, [14, 13], 15]. Resending the same submission_key stores nothing twice."""
        rid = svc.submit_ranking(token, request_id, order, all_bad=all_bad, skip=skip, ratings=ratings,
                                 submission_key=submission_key or None)
        return {"ranking_id": rid}

    @api_errors
    def undo_ranking(token: str) -> dict:
        """Delete this account's latest ranking; returns the request to rank again."""
        return {"request_id": svc.undo_last(token)}

    @api_errors
    def compare_pair(token: str) -> dict:
        """A blind A/B pair on a random toy scene: {pair, instruction, source, left, right} (paths on the server)."""
        p = svc.compare_pair(token)
        return {"pair": p.token, "instruction": p.instruction, "source": p.source_path, "left": p.left_path,
                "right": p.right_path}

    @api_errors
    def compare_vote(token: str, pair: str, choice: str) -> dict:
        """Vote on a pair from compare_pair: left, right, tie or both_bad."""
        return {"comparison_id": svc.compare_vote(token, pair, choice)}

    @api_errors
    def start_job(token: str, kind: str, config: dict | None = None) -> dict:
        """Admins: queue a background job (loop_round, evaluate, tradeoff, fill_queue); returns its run id."""
        auth.for_admin(token)
        return {"run_id": jobs.submit_job(kind, config or {})}

    @api_errors
    def job_status(token: str, run_id: int) -> dict:
        """Admins: a job's status, error and log tail."""
        auth.for_admin(token)
        with session_scope(write=False) as s:
            run = s.get(fb.TrainingRun, int(run_id))
        if run is None:
            raise AppInputError(f"unknown job {run_id}")
        return {"id": run.id, "kind": run.kind, "status": run.status, "error": run.error, "log": jobs.read_log(run)}

    @api_errors
    def promote_version(token: str, version_id: int) -> dict:
        """Admins: serve this editor version from now on."""
        auth.for_admin(token)
        return {"promoted": promote(version_id)["name"]}

    @api_errors
    def rollback_version(token: str) -> dict:
        """Admins: go back to the editor promoted before the current one."""
        auth.for_admin(token)
        return {"promoted": rollback()["name"]}

    for fn in (login, guest, next_item, submit_ranking, undo_ranking, compare_pair, compare_vote, start_job,
               job_status, promote_version, rollback_version):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None if fn is not compare_pair else 2,
               concurrency_id="editor" if fn is compare_pair else None)


def launch_kwargs(svc: HiveService) -> dict:
    """What `demo.launch` needs besides host and port (Gradio 6 takes theme, css and head here)."""
    home = svc.store.home
    # Only stored images and drawn toy scenes may be served: never the database, the session
    # secret or job logs, which also live in HIVE_HOME.
    return {"allowed_paths": [str(home / "images"), str(home / "tmp")],
            "blocked_paths": [str(home / "app_secret"), str(home / "jobs"), str(home / "hive.db")],
            "head": KEYBOARD_JS, "css": CSS, "show_error": True, "max_file_size": "64mb"}
