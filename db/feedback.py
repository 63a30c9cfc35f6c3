"""The write side of the feedback store: users, requests, variants, rankings, models.

Every function validates all of its input before it adds anything to the session, and
raises :class:`FeedbackError` (a ``ValueError``) with a message meant for the person who
sent the input. Callers own the transaction (``db.engine.session_scope``): a refused
call leaves the session as it found it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, event, func, or_, select, union
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.images import ImageStore
from db.models import (
    CHOICES,
    MODEL_KINDS,
    MODEL_STATUSES,
    RATING_DIMENSIONS,
    RATING_MAX,
    RATING_MIN,
    ROLES,
    Comparison,
    EditRequest,
    Image,
    ModelVersion,
    Ranking,
    RankingItem,
    TrainingRun,
    User,
    Variant,
    utcnow,
)

MAX_NAME = 64
MAX_INSTRUCTION = 2000
MAX_KEY = 64
MIN_PASSWORD = 8
MAX_SEED = 2**63 - 1
#: Roles allowed to submit rankings and A/B votes.
RANKER_ROLES = ("annotator", "admin")
FINISHED_RUN_STATUSES = ("succeeded", "failed", "cancelled")


class FeedbackError(ValueError):
    """Refused input; nothing was written."""


class RankingError(FeedbackError):
    """A ranking that breaks the ranking rules; nothing was written."""


# -- small validators -----------------------------------------------------------------
def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _text(value: object, what: str, max_len: int, err: type[FeedbackError] = FeedbackError) -> str:
    if not isinstance(value, str):
        raise err(f"{what} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise err(f"{what} must not be empty")
    if len(value) > max_len:
        raise err(f"{what} is too long ({len(value)} characters, at most {max_len})")
    if any(ord(c) < 32 and c not in "\t\n" for c in value):
        raise err(f"{what} contains control characters")
    return value


def _json_dict(value: object, what: str, err: type[FeedbackError] = FeedbackError) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise err(f"{what} must be a dict, got {type(value).__name__}")
    try:  # strict JSON: no NaN/Infinity (PostgreSQL refuses them), string keys only
        return json.loads(json.dumps(dict(value), allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise err(f"{what} must be JSON-serialisable (no NaN, string keys): {exc}") from None


def _seconds(value: object, err: type[FeedbackError] = FeedbackError) -> float | None:
    if value is None:
        return None
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise err(f"seconds must be a finite number >= 0, got {value!r}")
    return float(value)


def _key(value: object, err: type[FeedbackError] = FeedbackError) -> str | None:
    if value is None:
        return None
    return _text(value, "submission_key", MAX_KEY, err)


def _get(session: Session, model: type, ident: object, what: str, err: type = FeedbackError):
    if not _is_int(ident):
        raise err(f"{what} id must be an integer, got {ident!r}")
    row = session.get(model, int(ident))
    if row is None:
        raise err(f"unknown {what} {ident}")
    return row


# -- users and passwords ------------------------------------------------------------
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    """A salted scrypt hash, ``scrypt$n$r$p$salt$hash`` (hex); the password is not kept."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password_hash: str | None, password: str) -> bool:
    """True if ``password`` matches ``password_hash`` (constant-time comparison)."""
    if not password_hash or not isinstance(password, str):
        return False
    try:
        scheme, n, r, p, salt, digest = password_hash.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
            dklen=len(digest) // 2,
        )
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


def create_user(
    session: Session,
    name: str,
    role: str = "visitor",
    password: str | None = None,
    simulated: bool = False,
) -> User:
    """Add a user (a person, or a simulated annotator with ``simulated=True``)."""
    name = _text(name, "user name", MAX_NAME)
    if role not in ROLES:
        raise FeedbackError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if password is not None and (not isinstance(password, str) or len(password) < MIN_PASSWORD):
        raise FeedbackError(f"password must be a string of at least {MIN_PASSWORD} characters")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise FeedbackError(f"user name {name!r} is taken")
    user = User(
        name=name,
        role=role,
        password_hash=hash_password(password) if password is not None else None,
        is_simulated=bool(simulated),
    )
    try:
        with session.begin_nested():
            session.add(user)
    except IntegrityError:
        raise FeedbackError(f"user name {name!r} is taken") from None
    return user


def authenticate(session: Session, name: str, password: str) -> User | None:
    """The user with this name and password, or None."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None or not verify_password(user.password_hash, password):
        return None
    return user


def get_user_by_name(session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


# -- requests and variants ------------------------------------------------------------
def create_edit_request(
    session: Session,
    user_id: int,
    source_image_id: int,
    instruction: str,
    model_version_id: int | None = None,
    params: Mapping[str, Any] | None = None,
    consent: bool = False,
) -> EditRequest:
    """Record that a user asked for ``instruction`` on an image (consent: may we train on it?)."""
    _get(session, User, user_id, "user")
    _get(session, Image, source_image_id, "image")
    instruction = _text(instruction, "instruction", MAX_INSTRUCTION)
    if model_version_id is not None:
        mv = _get(session, ModelVersion, model_version_id, "model version")
        if mv.kind != "editor":
            raise FeedbackError(f"model version {model_version_id} is a {mv.kind}, not an editor")
    clean = _json_dict(params, "params")
    if not isinstance(consent, bool):
        raise FeedbackError(f"consent must be True or False, got {consent!r}")
    req = EditRequest(
        user_id=user_id,
        source_image_id=source_image_id,
        instruction=instruction,
        model_version_id=model_version_id,
        params=clean,
        consent_training=consent,
    )
    session.add(req)
    session.flush()
    return req


def add_variants(
    session: Session,
    request_id: int,
    variants: Sequence[tuple[int, int, Mapping[str, Any] | None]],
) -> list[Variant]:
    """Attach sampled outputs ``(image_id, seed, params)`` to a request, in order.

    Refused once the request has rankings: a ranking must cover the variants it saw.
    """
    _get(session, EditRequest, request_id, "edit request")
    if not isinstance(variants, Sequence) or isinstance(variants, (str, bytes)) or not variants:
        raise FeedbackError("variants must be a non-empty list of (image_id, seed, params)")
    rows = []
    for i, v in enumerate(variants):
        if not isinstance(v, Sequence) or len(v) != 3:
            raise FeedbackError(f"variant #{i} must be (image_id, seed, params), got {v!r}")
        image_id, seed, params = v
        if not _is_int(image_id):
            raise FeedbackError(f"variant #{i}: image id must be an integer, got {image_id!r}")
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise FeedbackError(f"variant #{i}: seed must be an integer in [0, 2**63-1], got {seed!r}")
        rows.append((int(image_id), int(seed), _json_dict(params, f"variant #{i} params")))
    wanted = {r[0] for r in rows}
    found = set(session.scalars(select(Image.id).where(Image.id.in_(wanted))))
    if wanted - found:
        raise FeedbackError(f"unknown image(s) {sorted(wanted - found)}")
    if session.scalar(select(Ranking.id).where(Ranking.request_id == request_id).limit(1)):
        raise FeedbackError(f"edit request {request_id} is already ranked; its variants are final")
    start = session.scalar(
        select(func.coalesce(func.max(Variant.position) + 1, 0)).where(
            Variant.request_id == request_id
        )
    )
    out = [
        Variant(request_id=request_id, image_id=img, seed=seed, params=p, position=start + i)
        for i, (img, seed, p) in enumerate(rows)
    ]
    session.add_all(out)
    session.flush()
    return out


# -- rankings -------------------------------------------------------------------------
def _rank_pairs(ranks: object) -> list[tuple[int, int]]:
    """Normalise ``{variant_id: rank}`` or ``[(variant_id, rank), ...]`` to checked pairs."""
    if ranks is None:
        return []
    if isinstance(ranks, Mapping):
        pairs = list(ranks.items())
    elif isinstance(ranks, Iterable) and not isinstance(ranks, (str, bytes)):
        pairs = []
        for p in ranks:
            if not isinstance(p, Sequence) or isinstance(p, (str, bytes)) or len(p) != 2:
                raise RankingError(f"each rank must be a (variant_id, rank) pair, got {p!r}")
            pairs.append((p[0], p[1]))
    else:
        raise RankingError(f"ranks must be a dict variant_id -> rank, got {type(ranks).__name__}")
    seen: set[int] = set()
    out = []
    for vid, rank in pairs:
        if not _is_int(vid):
            raise RankingError(f"variant ids must be integers, got {vid!r}")
        if not _is_int(rank):
            raise RankingError(f"rank of variant {vid} must be an integer, got {rank!r}")
        if rank < 1:
            raise RankingError(f"rank of variant {vid} must be >= 1, got {rank}")
        if int(vid) in seen:
            raise RankingError(f"variant {vid} is ranked more than once")
        seen.add(int(vid))
        out.append((int(vid), int(rank)))
    return out


def _check_rank_values(pairs: list[tuple[int, int]]) -> None:
    """Ranks are dense: the distinct ranks are exactly 1..m (ties share a rank: 1, 1, 2)."""
    distinct = sorted({r for _, r in pairs})
    missing = sorted(set(range(1, distinct[-1] + 1)) - set(distinct))
    if missing:
        raise RankingError(
            f"ranks must run 1, 2, 3, ... without gaps (tied variants share a rank, "
            f"e.g. 1, 1, 2); rank(s) {missing} are missing from {distinct}"
        )


def _ratings(ratings: object) -> dict[int, dict[str, int]]:
    if ratings is None:
        return {}
    if not isinstance(ratings, Mapping):
        raise RankingError("ratings must be a dict variant_id -> {dimension: 1..5}")
    out: dict[int, dict[str, int]] = {}
    for vid, dims in ratings.items():
        if not _is_int(vid):
            raise RankingError(f"variant ids in ratings must be integers, got {vid!r}")
        if not isinstance(dims, Mapping):
            raise RankingError(f"ratings of variant {vid} must be a dict dimension -> 1..5")
        clean = {}
        for dim, value in dims.items():
            if dim not in RATING_DIMENSIONS:
                raise RankingError(
                    f"unknown rating dimension {dim!r}; use {', '.join(RATING_DIMENSIONS)}"
                )
            if value is None:
                continue
            if not _is_int(value) or not RATING_MIN <= value <= RATING_MAX:
                raise RankingError(
                    f"rating {dim} of variant {vid} must be an integer "
                    f"{RATING_MIN}..{RATING_MAX}, got {value!r}"
                )
            clean[dim] = int(value)
        if clean:
            out[int(vid)] = clean
    return out


def _not_of_request(session: Session, request_id: int, vids: Iterable[int]) -> RankingError:
    vid = min(vids)
    other = session.scalar(select(Variant.request_id).where(Variant.id == vid))
    if other is None:
        return RankingError(f"unknown variant {vid}")
    return RankingError(f"variant {vid} belongs to request {other}, not to request {request_id}")


def submit_ranking(
    session: Session,
    request_id: int,
    annotator_id: int,
    ranks: Mapping[int, int] | Sequence[tuple[int, int]] | None,
    *,
    top_k: int | None = None,
    all_bad: bool = False,
    skip: bool = False,
    ratings: Mapping[int, Mapping[str, int | None]] | None = None,
    seconds: float | None = None,
    submission_key: str | None = None,
) -> Ranking:
    """Store one annotator's ranking of a request's variants.

    Rules (anything else raises :class:`RankingError` and writes nothing):

    - ``ranks`` maps variant id -> rank: integers from 1, ties share a rank, no gaps
      (1, 1, 2 is fine; 1, 1, 3 is not).
    - Without ``top_k`` every variant of the request is ranked; with ``top_k=k`` exactly
      k are, and the others count as tied below them.
    - ``all_bad`` may come with or without ranks; ``skip`` comes with nothing else.
    - ``ratings``: optional ``{variant_id: {dimension: 1..5}}`` with dimensions
      instruction_following, preservation, quality.
    - One ranking per annotator and request (undo it to rank again). Resubmitting the
      same ``submission_key`` returns the stored ranking instead of a duplicate.
    """
    if not _is_int(request_id):
        raise RankingError(f"edit request id must be an integer, got {request_id!r}")
    # The variants' query doubles as the existence check of the request (one query less).
    variant_ids = set(session.scalars(select(Variant.id).where(Variant.request_id == request_id)))
    if not variant_ids:
        _get(session, EditRequest, request_id, "edit request", RankingError)
    annotator = _get(session, User, annotator_id, "annotator", RankingError)
    if annotator.role not in RANKER_ROLES:
        raise RankingError(f"user {annotator.name!r} is a {annotator.role}; only annotators rank")
    for flag, value in (("all_bad", all_bad), ("skip", skip)):
        if not isinstance(value, bool):
            raise RankingError(f"{flag} must be True or False, got {value!r}")
    pairs = _rank_pairs(ranks)
    rated = _ratings(ratings)
    secs = _seconds(seconds, RankingError)
    key = _key(submission_key, RankingError)
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise RankingError(f"top_k must be an integer >= 1, got {top_k!r}")

    if skip:
        if pairs or rated or all_bad or top_k is not None:
            raise RankingError("a skipped request carries no ranks, ratings, top_k or all_bad")
    else:
        if not variant_ids:
            raise RankingError(f"edit request {request_id} has no variants to rank")
        if not pairs and not all_bad:
            raise RankingError("empty ranking: rank the variants, or mark all_bad or skip")
        stray = {v for v, _ in pairs} - variant_ids
        if stray:
            raise _not_of_request(session, request_id, stray)
        if set(rated) - variant_ids:
            raise _not_of_request(session, request_id, set(rated) - variant_ids)
        if pairs:
            _check_rank_values(pairs)
            if top_k is None:
                missing = variant_ids - {v for v, _ in pairs}
                if missing:
                    raise RankingError(
                        f"variant(s) {sorted(missing)} are not ranked: rank every variant "
                        f"of request {request_id}, or give top_k for a partial ranking"
                    )
            elif top_k > len(variant_ids):
                raise RankingError(
                    f"top_k={top_k} but request {request_id} has only {len(variant_ids)} variants"
                )
            elif len(pairs) != top_k:
                raise RankingError(f"top_k={top_k} but {len(pairs)} variant(s) are ranked")
            if top_k == len(variant_ids):
                top_k = None  # a top-n of n variants is a full ranking
        elif top_k is not None:
            raise RankingError("top_k given without ranks")

    # One query for both: this submission key already stored? this request already ranked?
    earlier = session.scalars(
        select(Ranking).where(
            Ranking.annotator_id == annotator_id,
            or_(Ranking.request_id == request_id, Ranking.submission_key == key)
            if key is not None
            else Ranking.request_id == request_id,
        )
    ).all()
    for existing in earlier:
        if key is not None and existing.submission_key == key:
            return _same_submission(existing, request_id, pairs, all_bad, skip, key)
    if earlier:
        raise RankingError(
            f"{annotator.name!r} already ranked request {request_id} (ranking {earlier[0].id}); "
            "undo it to rank again"
        )

    ranked = dict(pairs)
    items = [
        RankingItem(variant_id=vid, rank=ranked.get(vid), **rated.get(vid, {}))
        for vid in sorted(set(ranked) | set(rated))
    ]
    ranking = Ranking(
        request_id=request_id,
        annotator_id=annotator_id,
        top_k=top_k,
        all_bad=all_bad,
        skip=skip,
        seconds=secs,
        submission_key=key,
        items=items,
    )
    try:
        with session.begin_nested():
            session.add(ranking)
    except IntegrityError:  # a concurrent submission won the race (PostgreSQL)
        if key is not None:
            existing = session.scalar(
                select(Ranking).where(
                    Ranking.annotator_id == annotator_id, Ranking.submission_key == key
                )
            )
            if existing is not None:
                return _same_submission(existing, request_id, pairs, all_bad, skip, key)
        raise RankingError(
            f"{annotator.name!r} already ranked request {request_id}; undo it to rank again"
        ) from None
    return ranking


def _same_submission(
    existing: Ranking, request_id: int, pairs: list[tuple[int, int]], all_bad: bool, skip: bool, key: str
) -> Ranking:
    stored = {i.variant_id: i.rank for i in existing.items if i.rank is not None}
    if (
        existing.request_id != request_id
        or stored != dict(pairs)
        or existing.all_bad != all_bad
        or existing.skip != skip
    ):
        raise RankingError(
            f"submission key {key!r} was already used for a different ranking "
            f"(ranking {existing.id} of request {existing.request_id})"
        )
    return existing


@dataclass(frozen=True)
class UndoneRanking:
    """What :func:`undo_last_ranking` removed."""

    ranking_id: int
    request_id: int


def undo_last_ranking(session: Session, annotator_id: int) -> UndoneRanking | None:
    """Delete the annotator's most recent ranking (with its items); None if there is none."""
    last = session.scalar(
        select(Ranking)
        .where(Ranking.annotator_id == annotator_id)
        .order_by(Ranking.created_at.desc(), Ranking.id.desc())
        .limit(1)
    )
    if last is None:
        return None
    done = UndoneRanking(last.id, last.request_id)
    session.delete(last)  # items go with it (ORM cascade, and ON DELETE CASCADE)
    session.flush()
    return done


# -- model registry and training runs ------------------------------------------------
def register_model_version(
    session: Session,
    kind: str,
    name: str,
    path: str,
    *,
    parent_id: int | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Add an editor or reward model to the registry as a candidate."""
    if kind not in MODEL_KINDS:
        raise FeedbackError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    name = _text(name, "model name", 128)
    path = _text(str(path) if path is not None else path, "model path", 1024)
    if parent_id is not None:
        _get(session, ModelVersion, parent_id, "parent model version")
    clean = _json_dict(metrics, "metrics")
    if session.scalar(select(ModelVersion.id).where(ModelVersion.kind == kind, ModelVersion.name == name)):
        raise FeedbackError(f"a {kind} model named {name!r} is already registered")
    mv = ModelVersion(kind=kind, name=name, path=path, parent_id=parent_id, metrics=clean)
    session.add(mv)
    session.flush()
    return mv


def promoted_version(session: Session, kind: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.status == "promoted")
    )


def set_model_status(session: Session, version_id: int, status: str) -> ModelVersion:
    """Change a version's status; promoting one retires the version of its kind promoted before."""
    mv = _get(session, ModelVersion, version_id, "model version")
    if status not in MODEL_STATUSES:
        raise FeedbackError(f"unknown status {status!r}; choose one of {', '.join(MODEL_STATUSES)}")
    if status == "promoted" and mv.status != "promoted":
        current = promoted_version(session, mv.kind)
        if current is not None:
            current.status = "retired"
            session.flush()  # free the one-promoted-per-kind slot first
        mv.promoted_at = utcnow()
    mv.status = status
    session.flush()
    return mv


def rollback_model(session: Session, kind: str) -> ModelVersion:
    """Retire the promoted ``kind`` model and promote the one promoted most recently before it."""
    current = promoted_version(session, kind)
    if current is None:
        raise FeedbackError(f"no promoted {kind} model to roll back")
    previous = session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.kind == kind,
            ModelVersion.id != current.id,
            ModelVersion.promoted_at.is_not(None),
        )
        .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    if previous is None:
        raise FeedbackError(f"no earlier promoted {kind} model to roll back to")
    return set_model_status(session, previous.id, "promoted")


def update_model_metrics(session: Session, version_id: int, metrics: Mapping[str, Any]) -> ModelVersion:
    """Merge new metrics (e.g. evaluation results) into a version's metrics."""
    mv = _get(session, ModelVersion, version_id, "model version")
    mv.metrics = {**mv.metrics, **_json_dict(metrics, "metrics")}
    session.flush()
    return mv


def start_training_run(
    session: Session,
    kind: str,
    config: Mapping[str, Any] | None = None,
    *,
    log_path: str | None = None,
    base_version_id: int | None = None,
    status: str = "running",
) -> TrainingRun:
    """Record a training job as ``running`` (or ``queued`` for a job runner to pick up)."""
    kind = _text(kind, "training run kind", 32)
    if status not in ("queued", "running"):
        raise FeedbackError(f"a new training run is queued or running, not {status!r}")
    if base_version_id is not None:
        _get(session, ModelVersion, base_version_id, "base model version")
    run = TrainingRun(
        kind=kind,
        config=_json_dict(config, "config"),
        status=status,
        started_at=utcnow() if status == "running" else None,
        log_path=None if log_path is None else _text(str(log_path), "log path", 1024),
        base_version_id=base_version_id,
    )
    session.add(run)
    session.flush()
    return run


def mark_training_run_running(session: Session, run_id: int) -> TrainingRun:
    """Move a queued run to running (the job runner picked it up)."""
    run = _get(session, TrainingRun, run_id, "training run")
    if run.status != "queued":
        raise FeedbackError(f"training run {run_id} is {run.status}, not queued")
    run.status, run.started_at = "running", utcnow()
    session.flush()
    return run


def finish_training_run(
    session: Session,
    run_id: int,
    status: str = "succeeded",
    *,
    produced_version_id: int | None = None,
    error: str | None = None,
) -> TrainingRun:
    """Close a training run as succeeded, failed or cancelled, with what it produced."""
    run = _get(session, TrainingRun, run_id, "training run")
    if status not in FINISHED_RUN_STATUSES:
        raise FeedbackError(f"a run finishes as {', '.join(FINISHED_RUN_STATUSES)}, not {status!r}")
    if run.status in FINISHED_RUN_STATUSES:
        raise FeedbackError(f"training run {run_id} already finished ({run.status})")
    if produced_version_id is not None:
        _get(session, ModelVersion, produced_version_id, "produced model version")
    run.status = status
    run.finished_at = utcnow()
    run.produced_version_id = produced_version_id
    run.error = error
    session.flush()
    return run


# -- blind A/B comparisons -------------------------------------------------------------
def record_comparison(
    session: Session,
    voter_id: int,
    version_a_id: int,
    version_b_id: int,
    choice: str,
    *,
    instruction: str,
    a_shown_left: bool,
    source_image_id: int | None = None,
    image_a_id: int | None = None,
    image_b_id: int | None = None,
    seconds: float | None = None,
    submission_key: str | None = None,
) -> Comparison:
    """Store one blind A/B vote ("a", "b", "tie" or "both_bad"); a repeated submission key is not duplicated."""
    voter = _get(session, User, voter_id, "voter")
    if voter.role not in RANKER_ROLES:
        raise FeedbackError(f"user {voter.name!r} is a {voter.role}; only annotators vote")
    _get(session, ModelVersion, version_a_id, "model version")
    _get(session, ModelVersion, version_b_id, "model version")
    if version_a_id == version_b_id:
        raise FeedbackError("a comparison needs two different model versions")
    if choice not in CHOICES:
        raise FeedbackError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    instruction = _text(instruction, "instruction", MAX_INSTRUCTION)
    if not isinstance(a_shown_left, bool):
        raise FeedbackError("a_shown_left must be True or False")
    for what, ident in (("source", source_image_id), ("a", image_a_id), ("b", image_b_id)):
        if ident is not None:
            _get(session, Image, ident, f"image ({what})")
    secs = _seconds(seconds)
    key = _key(submission_key)
    if key is not None:
        existing = session.scalar(
            select(Comparison).where(Comparison.voter_id == voter_id, Comparison.submission_key == key)
        )
        if existing is not None:
            if (existing.version_a_id, existing.version_b_id, existing.choice) != (
                version_a_id, version_b_id, choice,
            ):
                raise FeedbackError(f"submission key {key!r} was already used for another vote")
            return existing
    comp = Comparison(
        voter_id=voter_id, version_a_id=version_a_id, version_b_id=version_b_id, choice=choice,
        instruction=instruction, a_shown_left=a_shown_left, source_image_id=source_image_id,
        image_a_id=image_a_id, image_b_id=image_b_id, seconds=secs, submission_key=key,
    )
    try:
        with session.begin_nested():
            session.add(comp)
    except IntegrityError:
        existing = session.scalar(
            select(Comparison).where(Comparison.voter_id == voter_id, Comparison.submission_key == key)
        )
        if existing is None:
            raise
        return existing
    return comp


# -- deleting one user's data -----------------------------------------------------------
_PENDING_FILES = "hive_files_to_remove"


@event.listens_for(Session, "after_commit")
def _remove_files_after_commit(session: Session) -> None:
    for store, sha in session.info.pop(_PENDING_FILES, []):
        store.delete(sha)


@event.listens_for(Session, "after_rollback")
def _forget_files_after_rollback(session: Session) -> None:
    session.info.pop(_PENDING_FILES, None)


def _image_references() -> Any:
    """Every image id some row still points at."""
    return union(
        select(EditRequest.source_image_id),
        select(Variant.image_id),
        select(Comparison.source_image_id).where(Comparison.source_image_id.is_not(None)),
        select(Comparison.image_a_id).where(Comparison.image_a_id.is_not(None)),
        select(Comparison.image_b_id).where(Comparison.image_b_id.is_not(None)),
    )


def delete_user_data(session: Session, user_id: int, store: ImageStore) -> dict[str, int]:
    """Erase one user (consent withdrawn): their account, uploads, requests, variants, rankings.

    Also removed: other people's rankings of this user's requests (they rank this user's
    uploads), A/B votes by the user or on their uploads, and every image file that no
    remaining row uses. An image someone else also uploaded stays. Files are deleted only
    after the transaction commits, so a rollback loses nothing.
    """
    user = _get(session, User, user_id, "user")
    req_ids = select(EditRequest.id).where(EditRequest.user_id == user.id)
    own_sources = set(session.scalars(select(EditRequest.source_image_id).where(EditRequest.user_id == user.id)))
    shared = set(
        session.scalars(
            select(EditRequest.source_image_id).where(
                EditRequest.user_id != user.id, EditRequest.source_image_id.in_(own_sources)
            )
        )
    )
    uploads = own_sources - shared
    candidates = own_sources | set(session.scalars(select(Variant.image_id).where(Variant.request_id.in_(req_ids))))

    comps = session.scalars(
        select(Comparison).where(
            or_(
                Comparison.voter_id == user.id,
                Comparison.source_image_id.in_(uploads),
                Comparison.image_a_id.in_(uploads),
                Comparison.image_b_id.in_(uploads),
            )
        )
    ).all()
    for c in comps:
        candidates |= {i for i in (c.source_image_id, c.image_a_id, c.image_b_id) if i is not None}
    ranking_ids = select(Ranking.id).where(
        or_(Ranking.annotator_id == user.id, Ranking.request_id.in_(req_ids))
    )
    counts = {
        "comparisons": session.execute(
            delete(Comparison).where(Comparison.id.in_([c.id for c in comps]))
        ).rowcount,
        "ranking_items": session.execute(
            delete(RankingItem).where(RankingItem.ranking_id.in_(ranking_ids))
        ).rowcount,
    }
    counts["rankings"] = session.execute(delete(Ranking).where(Ranking.id.in_(ranking_ids))).rowcount
    counts["variants"] = session.execute(delete(Variant).where(Variant.request_id.in_(req_ids))).rowcount
    counts["edit_requests"] = session.execute(
        delete(EditRequest).where(EditRequest.user_id == user.id)
    ).rowcount
    counts["users"] = session.execute(delete(User).where(User.id == user.id)).rowcount

    still_used = set(session.scalars(_image_references()))
    gone = sorted(candidates - still_used)
    shas = list(session.scalars(select(Image.sha256).where(Image.id.in_(gone))))
    counts["images"] = session.execute(delete(Image).where(Image.id.in_(gone))).rowcount
    session.info.setdefault(_PENDING_FILES, []).extend((store, sha) for sha in shas)
    counts["files"] = len(shas)
    return counts
