"""The feedback store's tables, as typed SQLAlchemy 2 models.

Portable on purpose: plain types, CHECK constraints instead of native enums, JSON
for free-form parameters, so the same schema runs on SQLite and PostgreSQL.
Every index is declared here with the reason it exists; keep the migration in
``db/migrations/versions`` in step (``tests/test_db_schema.py`` checks that).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("visitor", "annotator", "admin")
MODEL_KINDS = ("editor", "reward")
MODEL_STATUSES = ("candidate", "promoted", "retired")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
CHOICES = ("a", "b", "tie", "both_bad")  # both_bad: neither output is acceptable (not a tie of two good ones)
RATING_DIMENSIONS = ("instruction_following", "preservation", "quality")
RATING_MIN, RATING_MAX = 1, 5


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    SQLite has no time zones: it stores naive UTC and we attach UTC on the way out.
    PostgreSQL stores ``timestamptz`` and we convert to UTC on the way out.
    Naive datetimes are refused: they are the usual source of off-by-hours bugs.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use a timezone-aware UTC datetime")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so constraint names agree on every backend."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class User(Base):
    """A person or a simulated annotator. Passwords are stored only as salted scrypt hashes."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # unique (so indexed): login and the CLI look users up by name.
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="visitor")
    password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    is_simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Image(Base):
    """A stored PNG, content-addressed by the sha256 of its bytes (shared by every row using it)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # unique (so indexed): every upload looks its hash up to deduplicate.
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    # Relative to HIVE_HOME and derived from sha256 only, never from user input.
    path: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """An editor or reward model in the registry: candidate, promoted (one per kind) or retired."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(_in("kind", MODEL_KINDS), name="kind"),
        CheckConstraint(_in("status", MODEL_STATUSES), name="status"),
        # unique: a name identifies a version within its kind.
        UniqueConstraint("kind", "name"),
        # the app asks "which editor is promoted?" on every request.
        Index("ix_model_versions_kind_status", "kind", "status"),
        # at most one promoted version per kind, enforced by the database even under races
        # (a partial unique index: SQLite and PostgreSQL both have them).
        Index(
            "uq_model_versions_one_promoted",
            "kind",
            unique=True,
            sqlite_where=text("status = 'promoted'"),
            postgresql_where=text("status = 'promoted'"),
        ).ddl_if(dialect=("sqlite", "postgresql")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(1024))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), default=None
    )
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(default=None)


class TrainingRun(Base):
    """One training job (reward, editor fine-tune, ...) with its config, log and result."""

    __tablename__ = "training_runs"
    __table_args__ = (CheckConstraint(_in("status", RUN_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # indexed: the job runner polls for queued and running jobs.
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    log_path: Mapped[str | None] = mapped_column(String(1024), default=None)
    base_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), default=None
    )
    produced_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), default=None
    )
    error: Mapped[str | None] = mapped_column(Text, default=None)


class EditRequest(Base):
    """Someone asked the editor to apply an instruction to a source image."""

    __tablename__ = "edit_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # indexed: a user's history, and deleting one user's data.
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    # indexed: "is this image still referenced?" when deleting images.
    source_image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    instruction: Mapped[str] = mapped_column(Text)
    # indexed: rankings per editor version (how did version X do?).
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), default=None, index=True
    )
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    consent_training: Mapped[bool] = mapped_column(Boolean, default=False)
    # indexed: the ranking queue lists recent requests first.
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    variants: Mapped[list[Variant]] = relationship(
        back_populates="request", order_by="Variant.position", passive_deletes=True
    )


class Variant(Base):
    """One sampled output of a request, with the seed and every sampling parameter used."""

    __tablename__ = "variants"
    __table_args__ = (
        # unique: one variant per position; also serves "variants of request R in order".
        UniqueConstraint("request_id", "position"),
        CheckConstraint("position >= 0", name="position"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("edit_requests.id", ondelete="CASCADE"))
    # indexed: "is this image still referenced?" when deleting images.
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    position: Mapped[int] = mapped_column(Integer)

    request: Mapped[EditRequest] = relationship(back_populates="variants")


class Ranking(Base):
    """One annotator's judgement of one request's variants (ranks live in ``ranking_items``)."""

    __tablename__ = "rankings"
    __table_args__ = (
        # unique: one ranking per annotator per request (undo it to rank again); also
        # serves "rankings of request R".
        UniqueConstraint("request_id", "annotator_id"),
        # unique: resubmitting a submission key returns the stored ranking (idempotency).
        UniqueConstraint("annotator_id", "submission_key"),
        # "undo my last ranking" and per-annotator statistics read by annotator and time.
        Index("ix_rankings_annotator_id_created_at", "annotator_id", "created_at"),
        CheckConstraint("top_k IS NULL OR top_k >= 1", name="top_k"),
        CheckConstraint("seconds IS NULL OR seconds >= 0", name="seconds"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("edit_requests.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    # None: every variant is ranked; k: only the best k are, the rest count as tied below them.
    top_k: Mapped[int | None] = mapped_column(Integer, default=None)
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    skip: Mapped[bool] = mapped_column(Boolean, default=False)
    seconds: Mapped[float | None] = mapped_column(Float, default=None)
    submission_key: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    items: Mapped[list[RankingItem]] = relationship(
        back_populates="ranking",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="RankingItem.variant_id",
    )


class RankingItem(Base):
    """The rank (and optional 1–5 ratings) one ranking gives one variant.

    ``rank`` is NULL only for a variant that was rated but left outside a top-k.
    """

    __tablename__ = "ranking_items"
    __table_args__ = (
        CheckConstraint("rank IS NULL OR rank >= 1", name="rank"),
        *(
            CheckConstraint(
                f"{d} IS NULL OR ({d} >= {RATING_MIN} AND {d} <= {RATING_MAX})", name=d
            )
            for d in RATING_DIMENSIONS
        ),
    )

    ranking_id: Mapped[int] = mapped_column(
        ForeignKey("rankings.id", ondelete="CASCADE"), primary_key=True
    )
    # indexed: deleting a variant (or checking whether it was ranked) looks rows up by variant.
    variant_id: Mapped[int] = mapped_column(
        ForeignKey("variants.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    rank: Mapped[int | None] = mapped_column(Integer, default=None)
    instruction_following: Mapped[int | None] = mapped_column(Integer, default=None)
    preservation: Mapped[int | None] = mapped_column(Integer, default=None)
    quality: Mapped[int | None] = mapped_column(Integer, default=None)

    ranking: Mapped[Ranking] = relationship(back_populates="items")


class Comparison(Base):
    """A blind A/B vote between the outputs of two model versions on the same input."""

    __tablename__ = "comparisons"
    __table_args__ = (
        CheckConstraint(_in("choice", CHOICES), name="choice"),
        CheckConstraint("version_a_id <> version_b_id", name="distinct_versions"),
        CheckConstraint("seconds IS NULL OR seconds >= 0", name="seconds"),
        # win rates are computed per pair of versions.
        Index("ix_comparisons_versions", "version_a_id", "version_b_id"),
        # unique: resubmitting a submission key returns the stored vote.
        UniqueConstraint("voter_id", "submission_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # indexed through uq_comparisons_voter_id_submission_key: per-voter lookups and deletion.
    voter_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    version_a_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    version_b_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    instruction: Mapped[str] = mapped_column(Text)
    source_image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), default=None)
    image_a_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), default=None)
    image_b_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), default=None)
    # Which output was on the left: lets analysis check for position bias.
    a_shown_left: Mapped[bool] = mapped_column(Boolean)
    choice: Mapped[str] = mapped_column(String(8))
    seconds: Mapped[float | None] = mapped_column(Float, default=None)
    submission_key: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


#: Tables in an order where every foreign key points backwards (for import and export).
TABLE_ORDER: tuple[str, ...] = (
    "users",
    "images",
    "model_versions",
    "training_runs",
    "edit_requests",
    "variants",
    "rankings",
    "ranking_items",
    "comparisons",
)
