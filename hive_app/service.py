"""What the app does, without any Gradio: edit, the ranking queue, rankings, blind A/B pairs.

The UI (`hive_app.ui`) and the API endpoints both call these methods, so one edit goes
UI click -> `HiveService.edit` -> `hive.editor.Editor.edit` -> `db.feedback` rows.
Every method validates all input before it writes anything, and writes in one transaction.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image as PILImage
from sqlalchemy import func, select

from db import feedback as fb
from db.engine import session_scope
from db.images import ImageError, ImageStore, get_or_create_image
from db.models import EditRequest, Image, ModelVersion, Ranking, Variant, utcnow
from hive import toy
from hive.editor import Editor, EditorInputError, load_image, read_model_info, sampling_defaults
from hive.registry import RegistryError
from hive_app.auth import Auth, AuthError, Signer
from hive_app.config import AppConfig

MIN_VARIANTS, MAX_VARIANTS, DEFAULT_VARIANTS = 2, 8, 4
MAX_STEPS = 100
MAX_SEED = 2**31 - 16
QUEUE_OWNER = "hive-queue"  # the account that owns requests filled from a dataset
CHOICES = {"left", "right", "tie", "both_bad"}


class AppInputError(ValueError):
    """Bad input from a person or an API client; nothing was written."""


# ---------------------------------------------------------------- results
@dataclass
class EditOutcome:
    request_id: int
    variant_ids: list[int]
    images: list[PILImage.Image]
    records: list[dict]
    model_version: str

    def to_json(self) -> dict:
        return {"request_id": self.request_id, "variant_ids": self.variant_ids,
                "model_version": self.model_version, "variants": self.records}


@dataclass
class CheckedEdit:
    """An edit's input after every check: what `Editor.edit` gets."""

    source: PILImage.Image
    version: ModelVersion
    variants: int
    seed: int | None
    steps: int
    guidance: float
    image_guidance: float


@dataclass
class RankItem:
    """One request waiting for this annotator's ranking (gold status is not shown to them)."""

    request_id: int
    instruction: str
    source_path: str
    variant_ids: list[int]
    variant_paths: list[str]
    own: bool

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ComparePair:
    """A blind A/B pair: `token` carries (signed) which version is on which side."""

    token: str
    instruction: str
    source_path: str
    left_path: str
    right_path: str


# ---------------------------------------------------------------- helpers
def _number(value: Any, what: str, lo: float, hi: float, integer: bool = False) -> float | int:
    """A finite number in [lo, hi] from a form field or JSON, else AppInputError."""
    if isinstance(value, bool) or value is None or value == "":
        raise AppInputError(f"{what} must be a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise AppInputError(f"{what} must be a number, not {value!r}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise AppInputError(f"{what} must be between {lo:g} and {hi:g}, not {value!r}")
    if integer:
        if x != int(x):
            raise AppInputError(f"{what} must be a whole number, not {value!r}")
        return int(x)
    return x


def order_to_ranks(order: Any) -> dict[int, int]:
    """`[best, [tied, tied], worst]` (variant ids, best first) -> {variant_id: rank}.

    Refuses repeated variants and anything that is not ids or lists of ids."""
    if not isinstance(order, (list, tuple)) or not order:
        raise AppInputError("the ranking must be a non-empty list of variant ids, best first; "
                            "tied variants go together in a list, e.g. [12, [14, 13], 15]")
    ranks: dict[int, int] = {}
    for rank, tier in enumerate(order, start=1):
        ids = tier if isinstance(tier, (list, tuple)) else [tier]
        if not ids:
            raise AppInputError(f"place {rank} of the ranking is an empty list")
        for vid in ids:
            if isinstance(vid, bool) or not isinstance(vid, (int, float)) or int(vid) != vid:
                raise AppInputError(f"variant ids must be whole numbers, not {vid!r}")
            vid = int(vid)
            if vid in ranks:
                raise AppInputError(f"variant {vid} appears more than once in the ranking")
            ranks[vid] = rank
    return ranks


class EditorPool:
    """Loaded editors by path, each with a lock: a diffusers pipeline is not thread-safe."""

    def __init__(self, loader: Callable[[str], Editor] | None = None):
        self._loader = loader or (lambda path: Editor(path))
        self._editors: dict[str, tuple[Editor, threading.Lock]] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> tuple[Editor, threading.Lock]:
        with self._lock:
            if path not in self._editors:
                editor = self._loader(path)
                # denoising steps drive the UI's progress bar (gr.Progress(track_tqdm=True))
                editor.pipe.set_progress_bar_config(disable=False, desc="denoising", leave=False)
                self._editors[path] = (editor, threading.Lock())
            return self._editors[path]


# ---------------------------------------------------------------- the service
class HiveService:
    def __init__(self, config: AppConfig, store: ImageStore | None = None, editors: EditorPool | None = None):
        self.config = config
        self.store = store or ImageStore()
        self.editors = editors or EditorPool()
        self.signer = Signer.from_home(self.store.home)
        self.auth = Auth(self.signer, config.anonymous_edit, config.anonymous_rank)
        self.served = self._ensure_served_editor()

    # -- the registry: which editor is served ------------------------------------------------
    def _ensure_served_editor(self) -> int:
        """Register the configured editor; promote it if asked to (or if none is promoted)."""
        path = self.config.model
        if Path(path).exists():  # a local folder: one registry entry whatever the working directory
            path = str(Path(path).resolve())
        with session_scope() as s:
            mv = s.scalar(select(ModelVersion).where(ModelVersion.kind == "editor", ModelVersion.path == path)
                          .order_by(ModelVersion.id))
            if mv is None:
                name, n = Path(path).name or path, 1
                while s.scalar(select(ModelVersion.id).where(ModelVersion.kind == "editor", ModelVersion.name == name)):
                    n += 1
                    name = f"{Path(path).name}-{n}"
                mv = fb.register_model_version(s, "editor", name, path)
            current = fb.promoted_version(s, "editor")
            if current is None or (self.config.explicit_model and current.id != mv.id):
                fb.set_model_status(s, mv.id, "promoted")
            return fb.promoted_version(s, "editor").id

    def editor_version(self) -> ModelVersion:
        """The promoted editor (admins change it with promote / roll back)."""
        with session_scope(write=False) as s:
            mv = fb.promoted_version(s, "editor")
        if mv is None:
            raise AppInputError("no editor is promoted: an admin must promote one")
        return mv

    def editor_versions(self) -> list[ModelVersion]:
        with session_scope(write=False) as s:
            return list(s.scalars(select(ModelVersion).where(ModelVersion.kind == "editor").order_by(ModelVersion.id)))

    # -- edit ----------------------------------------------------------------------------------
    def edit(self, token: str | None, image: Any, instruction: str, variants: Any = DEFAULT_VARIANTS,
             seed: Any = None, steps: Any = None, guidance: Any = None,
             image_guidance: Any = None, consent: bool = False) -> EditOutcome:
        """K variants of one edit by the promoted editor, recorded with their parameters
        (steps and guidance left None: the promoted model's defaults).

        Order: check who, check every input (image, instruction, numbers), sample, then write the
        request, its source and its variants in one transaction; bad input writes nothing."""
        who = self.auth.for_edit(token)
        c = self.check_edit(image, instruction, variants, seed, steps, guidance, image_guidance)
        editor, lock = self.editors.get(c.version.path)
        with lock:
            result = editor.edit(c.source, instruction, variants=c.variants, seed=c.seed, steps=c.steps,
                                 guidance=c.guidance, image_guidance=c.image_guidance)
        records = result.records_json()
        version = c.version
        with session_scope() as s:
            src = get_or_create_image(s, self.store, c.source)
            req = fb.create_edit_request(
                s, who.user_id, src.id, " ".join(instruction.split()), version.id,
                params={"variants": c.variants, "seed": records[0]["seed"], "steps": c.steps,
                        "guidance": c.guidance, "image_guidance": c.image_guidance,
                        "mask_threshold": records[0]["mask_threshold"], "model": version.path,
                        "model_version": version.name},
                consent=bool(consent))
            rows = [(get_or_create_image(s, self.store, img).id, rec["seed"], rec)
                    for img, rec in zip(result.images, records)]
            made = fb.add_variants(s, req.id, rows)
            return EditOutcome(req.id, [v.id for v in made], result.images, records, version.name)

    def check_edit(self, image: Any, instruction: str, variants: Any = DEFAULT_VARIANTS, seed: Any = None,
                   steps: Any = None, guidance: Any = None, image_guidance: Any = None) -> CheckedEdit:
        """Every check of an edit's input, without writing anything (the UI calls it before it
        opens a guest session, so that bad input leaves no trace at all). Steps and guidance
        left None take the promoted model's defaults."""
        k = _number(variants, "variants", MIN_VARIANTS, MAX_VARIANTS, integer=True)
        n_steps = None if steps is None else _number(steps, "steps", 1, MAX_STEPS, integer=True)
        g_text = None if guidance is None else _number(guidance, "text guidance", 0, 30)
        g_image = None if image_guidance is None else _number(image_guidance, "image guidance", 0, 10)
        base_seed = None if seed in (None, "", -1) else _number(seed, "seed", 0, MAX_SEED, integer=True)
        if image is None or (isinstance(image, str) and not image):
            raise AppInputError("no image: upload a photo, or draw a toy scene")
        source = load_image(image)  # EditorInputError for non-images and huge images
        version = self.editor_version()
        editor, lock = self.editors.get(version.path)
        with lock:  # the tokenizer is shared with running edits; fast tokenizers are not thread-safe
            editor.prompt_for(instruction)  # EditorInputError for empty or too long instructions
        n_steps, g_text, g_image = editor.settings(n_steps, g_text, g_image)
        return CheckedEdit(source, version, k, base_seed, n_steps, g_text, g_image)

    def sampling_defaults(self) -> dict[str, float]:
        """The promoted editor's default steps and guidance (the UI's sliders start there)."""
        return sampling_defaults(read_model_info(self.editor_version().path))  # hive.json only: no model load

    # -- the ranking queue ---------------------------------------------------------------------
    def next_item(self, token: str | None) -> RankItem | None:
        """The next request for this annotator: their own unranked requests first, then every
        `gold_every`-th item a gold item, then others' requests that still have fewer than
        `rankings_per_request` rankings (partly ranked ones first: agreement needs several
        rankings of one request), oldest first. Gold items have no cap: everyone ranks them."""
        who = self.auth.for_rank(token)
        with session_scope(write=False) as s:
            done = select(Ranking.request_id).where(Ranking.annotator_id == who.user_id)
            ready = select(EditRequest).where(EditRequest.id.in_(select(Variant.request_id)),
                                              EditRequest.id.not_in(done))
            own = s.scalar(ready.where(EditRequest.user_id == who.user_id)
                           .order_by(EditRequest.created_at.desc(), EditRequest.id.desc()).limit(1))
            if own is not None:
                return self._item(s, own, True)
            others = ready.where(EditRequest.user_id != who.user_id)
            gold = others.where(EditRequest.params["gold"].as_boolean().is_(True)) \
                .order_by(EditRequest.created_at, EditRequest.id).limit(1)
            n_done = s.scalar(select(func.count()).select_from(done.subquery())) or 0
            if self.config.gold_every > 0 and (n_done + 1) % self.config.gold_every == 0:
                item = s.scalar(gold)
                if item is not None:
                    return self._item(s, item, False)
            counts = (select(Ranking.request_id, func.count().label("n")).where(Ranking.skip.is_(False))
                      .group_by(Ranking.request_id).subquery())
            n = func.coalesce(counts.c.n, 0)
            plain = s.scalar(others.outerjoin(counts, counts.c.request_id == EditRequest.id)
                             .where(n < self.config.rankings_per_request,
                                    func.coalesce(EditRequest.params["gold"].as_boolean(), False).is_(False))
                             .order_by(n.desc(), EditRequest.created_at, EditRequest.id).limit(1))
            if plain is not None:
                return self._item(s, plain, False)
            item = s.scalar(gold)
            return self._item(s, item, False) if item is not None else None

    def request_item(self, token: str | None, request_id: int) -> RankItem:
        """A given request, for ranking right after editing it."""
        who = self.auth.for_rank(token)
        with session_scope(write=False) as s:
            req = s.get(EditRequest, int(request_id))
            if req is None or not req.variants:
                raise AppInputError(f"unknown edit request {request_id}")
            return self._item(s, req, req.user_id == who.user_id)

    def _item(self, s, req: EditRequest, own: bool) -> RankItem:
        source = s.get(Image, req.source_image_id)
        variants = sorted(req.variants, key=lambda v: v.position)
        paths = dict(s.execute(select(Image.id, Image.path).where(Image.id.in_([v.image_id for v in variants]))).all())
        home = self.store.home
        return RankItem(req.id, req.instruction, str(home / source.path), [v.id for v in variants],
                        [str(home / paths[v.image_id]) for v in variants], own)

    def submit_ranking(self, token: str | None, request_id: Any, order: Any = None, *, all_bad: bool = False,
                       skip: bool = False, ratings: dict | None = None, seconds: float | None = None,
                       submission_key: str | None = None) -> int:
        """Store one ranking; returns its id. `order` lists variant ids best first, ties in lists."""
        who = self.auth.for_rank(token)
        rid = _number(request_id, "request id", 1, 2**62, integer=True)
        ranks = order_to_ranks(order) if order else {}
        with session_scope() as s:
            variant_ids = list(s.scalars(select(Variant.id).where(Variant.request_id == rid).order_by(Variant.position)))
            if not variant_ids:
                raise AppInputError(f"unknown edit request {rid}")
            if ranks and not skip:
                stray = sorted(set(ranks) - set(variant_ids))
                if stray:
                    raise AppInputError(f"variant(s) {stray} do not belong to request {rid}")
                missing = [v for v in variant_ids if v not in ranks]
                if missing:
                    positions = [variant_ids.index(v) + 1 for v in missing]
                    raise AppInputError(f"variant(s) {missing} (number {', '.join(map(str, positions))} of "
                                        f"{len(variant_ids)}) of request {rid} have no rank: rank every variant "
                                        "(tied variants share a rank), or mark all bad or skip")
            clean_ratings = {int(k): v for k, v in (ratings or {}).items()} if isinstance(ratings, dict) else ratings
            ranking = fb.submit_ranking(s, rid, who.user_id, None if skip else ranks, all_bad=bool(all_bad),
                                        skip=bool(skip), ratings=None if skip else (clean_ratings or None),
                                        seconds=seconds, submission_key=submission_key)
            return ranking.id

    def undo_last(self, token: str | None) -> int | None:
        """Delete this annotator's latest ranking; returns the request id to rank again, or None."""
        who = self.auth.for_rank(token)
        with session_scope() as s:
            undone = fb.undo_last_ranking(s, who.user_id)
        return None if undone is None else undone.request_id

    def counters(self, token: str | None) -> dict[str, int]:
        """What this annotator has done (all time and today) and how many requests still wait."""
        who = self.auth.for_rank(token)
        midnight = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
        with session_scope(write=False) as s:
            mine = select(func.count()).select_from(Ranking).where(Ranking.annotator_id == who.user_id)
            total = s.scalar(mine) or 0
            today = s.scalar(mine.where(Ranking.created_at >= midnight)) or 0
            done = select(Ranking.request_id).where(Ranking.annotator_id == who.user_id)
            waiting = s.scalar(select(func.count()).select_from(EditRequest).where(
                EditRequest.id.in_(select(Variant.request_id)), EditRequest.id.not_in(done))) or 0
        return {"ranked": int(total), "today": int(today), "waiting": int(waiting)}

    # -- blind A/B -----------------------------------------------------------------------------
    def compare_pair(self, token: str | None, image: Any = None, instruction: str | None = None,
                     seed: int | None = None) -> ComparePair:
        """Two editor versions edit the same input with the same seed; sides are shuffled."""
        who = self.auth.for_rank(token)
        versions = self.editor_versions()
        if len(versions) < 2:
            raise AppInputError(f"a comparison needs two editor versions; the registry has {len(versions)}")
        rng = random.SystemRandom()
        promoted = [v for v in versions if v.status == "promoted"]
        first = promoted[0] if promoted else versions[-1]
        others = [v for v in versions if v.id != first.id]
        second = rng.choice([v for v in others if v.status == "candidate"] or others)
        if image is None:
            example = toy.sample_example(rng.randrange(10**9))
            source, instruction = example.input_image, example.edit.instruction
        else:
            source = load_image(image)
        seed = rng.randrange(MAX_SEED) if seed is None else int(seed)
        outputs = []
        for mv in (first, second):
            editor, lock = self.editors.get(mv.path)
            with lock:
                prompt = editor.prompt_for(instruction or "")
                outputs.append(editor.sample([source], [prompt], [[seed]])[0][0])  # each model's defaults
        with session_scope() as s:
            src, ia, ib = (get_or_create_image(s, self.store, im) for im in (source, *outputs))
            paths = {row.id: str(self.store.home / row.path) for row in (src, ia, ib)}
            ids = (src.id, ia.id, ib.id)
        a_left = rng.random() < 0.5
        token_ = self.signer.sign({"va": first.id, "vb": second.id, "src": ids[0], "ia": ids[1], "ib": ids[2],
                                   "ins": " ".join(instruction.split()), "left_a": a_left, "t": time.time(),
                                   "by": who.user_id})
        left, right = (ids[1], ids[2]) if a_left else (ids[2], ids[1])
        return ComparePair(token_, " ".join(instruction.split()), paths[ids[0]], paths[left], paths[right])

    def compare_vote(self, token: str | None, pair_token: str, choice: str, seconds: float | None = None) -> int:
        """Record a vote: left, right, tie or both_bad. Sides are mapped back to versions (a, b);
        "both bad" is stored as such (neither version wins; the win-rate tables count it apart
        from ties of two good outputs)."""
        who = self.auth.for_rank(token)
        if choice not in CHOICES:
            raise AppInputError(f"choice must be one of left, right, tie, both_bad; not {choice!r}")
        pair = self.signer.verify(pair_token or "")
        if pair is None or "va" not in pair:
            raise AppInputError("unknown or damaged A/B pair: ask for a new pair")
        if pair.get("by") != who.user_id:
            raise AppInputError("this A/B pair was drawn for another account: ask for a new pair")
        stored = {"left": "a" if pair["left_a"] else "b", "right": "b" if pair["left_a"] else "a"}.get(choice, choice)
        key = hashlib.sha256(pair_token.encode()).hexdigest()[:40]
        with session_scope() as s:
            comp = fb.record_comparison(s, who.user_id, pair["va"], pair["vb"], stored, instruction=pair["ins"],
                                        a_shown_left=bool(pair["left_a"]), source_image_id=pair["src"],
                                        image_a_id=pair["ia"], image_b_id=pair["ib"], seconds=seconds,
                                        submission_key=key)
            return comp.id


USER_ERRORS = (AppInputError, EditorInputError, AuthError, fb.FeedbackError, ImageError, RegistryError)
"""Errors whose message is meant for the person who sent the input (shown as is)."""
