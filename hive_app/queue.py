"""Filling the ranking queue from a dataset folder, with gold items mixed in.

As the paper's annotators ranked a fixed set, maintainers queue a dataset
(`metadata.jsonl` with `input_image`, `edit_prompt`; toy datasets also have `clean_image`).
The editor samples K variants per row; each row is committed on its own, so annotators can
start while the rest is still sampling.

A *gold item* is a toy row whose best variant the judge knows: one of its K variants is the
row's clean (correct) target, at a random position, and the judge marks which variants succeed.
Each annotator's accuracy on gold items (their first place is a judged success) is on the
dashboard. Gold requests are not consented for training: the clean target is no editor output.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from db import feedback as fb
from db.engine import session_scope
from db.images import get_or_create_image
from db.models import EditRequest, User
from hive import toy
from hive.editor import load_image
from hive_app.service import MAX_VARIANTS, MIN_VARIANTS, QUEUE_OWNER, AppInputError, HiveService


def read_rows(data: Path) -> list[dict]:
    """The rows of DIR/metadata.jsonl that have an input image and an instruction."""
    path = Path(data) / "metadata.jsonl"
    if not path.is_file():
        raise AppInputError(f"{path} not found: a dataset folder needs metadata.jsonl")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "input_image" not in row or "edit_prompt" not in row:
            raise AppInputError(f"{path}:{n}: a row needs input_image and edit_prompt")
        row.setdefault("id", str(n))
        rows.append(row)
    if not rows:
        raise AppInputError(f"{path} has no rows")
    return rows


def queue_owner(session) -> int:
    user = fb.get_user_by_name(session, QUEUE_OWNER)
    if user is None:
        user = fb.create_user(session, QUEUE_OWNER, "visitor")
    return user.id


def fill_queue(service: HiveService, data: Path, variants: int = 4, gold_rate: float = 0.2, limit: int | None = None,
               seed: int = 0, log: Callable[[str], None] = print,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Queue every row of `data` (K variants each, sampled by the promoted editor); rows already
    queued from the same folder are skipped, so a rerun resumes."""
    if not MIN_VARIANTS <= int(variants) <= MAX_VARIANTS:
        raise AppInputError(f"variants must be between {MIN_VARIANTS} and {MAX_VARIANTS}")
    data = Path(data).resolve()
    rows = read_rows(data)[:limit]
    version = service.editor_version()
    editor, lock = service.editors.get(version.path)
    with session_scope() as s:
        owner = queue_owner(s)
        done = {(r.params or {}).get("row_id") for r in s.scalars(select(EditRequest).where(EditRequest.user_id == owner))
                if (r.params or {}).get("dataset") == str(data)}
    rng = random.Random(seed)
    made = gold = 0
    for i, row in enumerate(rows):
        if str(row["id"]) in done:
            continue
        source = load_image(data / row["input_image"])
        instruction = str(row["edit_prompt"])
        seeds = [seed + i * MAX_VARIANTS + k for k in range(int(variants))]
        with lock:
            images = editor.sample([source], [editor.prompt_for(instruction)], [seeds])[0]  # the model's defaults
        steps, guidance, image_guidance = editor.settings()
        params = [{"seed": s_, "steps": steps, "guidance": guidance, "image_guidance": image_guidance,
                   "model": version.path} for s_ in seeds]
        gold_best: list[int] = []
        if row.get("clean_image") and rng.random() < gold_rate:
            clean = load_image(data / row["clean_image"])
            if toy.judge(source, clean, clean).success:
                at = rng.randrange(int(variants))
                images[at] = clean
                params[at] = {"gold_target": True}
                seeds[at] = 0
                gold_best = [k for k, im in enumerate(images) if toy.judge(source, clean, im).success]
        with session_scope() as s:
            src = get_or_create_image(s, service.store, source)
            req = fb.create_edit_request(
                s, owner, src.id, instruction, version.id,
                params={"dataset": str(data), "row_id": str(row["id"]), "variants": int(variants),
                        "gold": bool(gold_best), "gold_best": gold_best},
                consent=not gold_best)
            fb.add_variants(s, req.id, [(get_or_create_image(s, service.store, im).id, sd, p)
                                        for im, sd, p in zip(images, seeds, params)])
        made += 1
        gold += bool(gold_best)
        log(f"queued row {row['id']} as request {req.id}{' (gold)' if gold_best else ''}")
        if progress:
            progress(i + 1, len(rows))
    log(f"done: {made} requests queued ({gold} gold), {len(rows) - made} already queued before")
    return {"queued": made, "gold": gold, "rows": len(rows)}


def gold_accuracy(session) -> dict[int, dict]:
    """Per annotator: gold items ranked (not skipped) and how often their first place is a
    judged success. All-bad counts as wrong: a gold item always has a good variant."""
    from db.models import Ranking, Variant

    out: dict[int, dict] = {}
    golds = {r.id: r for r in session.scalars(select(EditRequest)) if (r.params or {}).get("gold")}
    if not golds:
        return out
    positions = {v.id: (v.request_id, v.position) for v in session.scalars(
        select(Variant).where(Variant.request_id.in_(list(golds))))}
    names = dict(session.execute(select(User.id, User.name)).all())
    for ranking in session.scalars(select(Ranking).where(Ranking.request_id.in_(list(golds)), Ranking.skip.is_(False))):
        best = set(golds[ranking.request_id].params.get("gold_best", []))
        firsts = [positions[i.variant_id][1] for i in ranking.items if i.rank == 1]
        correct = bool(firsts) and not ranking.all_bad and all(p in best for p in firsts)
        row = out.setdefault(ranking.annotator_id, {"annotator": names.get(ranking.annotator_id), "gold": 0, "correct": 0})
        row["gold"] += 1
        row["correct"] += int(correct)
    for row in out.values():
        row["accuracy"] = row["correct"] / row["gold"]
    return out
