"""The moderation tables: clients, checks, verdicts, evidence, reviews.

A *check* is one submission (keyed by ``(client, external_id)``); a *verdict* is the detector's answer
for one image content under one model version (keyed by ``(sha256, model_id)``), so the same bytes
submitted twice share one verdict and are analysed once. Evidence rows hang off the verdict, one JSON
document per evidence group.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import Base, JSONDocument, utcnow

CHECK_STATUSES: Final = ("queued", "processing", "done", "failed")
VERDICTS: Final = ("generated", "real", "uncertain")
DECIDED_BY: Final = ("pixels", "provenance", "unanalysable")

# Bounds on free-text fields that arrive in task payloads; the task validates against the same numbers.
CLIENT_MAX_LEN: Final = 100
EXTERNAL_ID_MAX_LEN: Final = 255
URL_MAX_LEN: Final = 2048


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Client(Base):
    """A platform that submits images; holds its per-client flagging policy (used by the webhook sender)."""

    __tablename__ = "clients"

    name: Mapped[str] = mapped_column(sa.String(CLIENT_MAX_LEN), primary_key=True)
    # Score at or above which a check is flagged whatever the verdict; NULL: only the verdict decides.
    flag_threshold: Mapped[float | None] = mapped_column(sa.Float)
    # Whether "uncertain" verdicts are flagged too (default: only "generated").
    flag_uncertain: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Verdict(Base):
    """What one model version decided about one image content (sha256)."""

    __tablename__ = "verdicts"
    __table_args__ = (
        sa.UniqueConstraint("sha256", "model_id"),
        sa.CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
        sa.CheckConstraint(_in("decided_by", DECIDED_BY), name="decided_by"),
        sa.CheckConstraint("score >= 0 AND score <= 1", name="score_range"),
        sa.Index("ix_verdicts_verdict_created_at", "verdict", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    model_name: Mapped[str] = mapped_column(sa.String(100))
    model_version: Mapped[str] = mapped_column(sa.String(100))
    weights_sha: Mapped[str] = mapped_column(sa.String(64))
    # "<name>@<version>+<weights sha256[:12]>": the identity a verdict is reused under.
    model_id: Mapped[str] = mapped_column(sa.String(255))
    score: Mapped[float] = mapped_column(sa.Float)
    verdict: Mapped[str] = mapped_column(sa.String(16))
    family_scores: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    threshold: Mapped[float] = mapped_column(sa.Float)
    decided_by: Mapped[str] = mapped_column(sa.String(16))
    reasons: Mapped[list[str]] = mapped_column(JSONDocument, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    evidence: Mapped[list[Evidence]] = relationship(
        back_populates="verdict", order_by="Evidence.group_name", lazy="selectin"
    )


class Evidence(Base):
    """One evidence group ("spectral", "color", "grid", "provenance", "learned") of one verdict.

    Stored as a JSON document (JSONB on PostgreSQL) so reviewers can query single numbers, e.g.
    ``SELECT data->'grid' FROM evidence WHERE group_name = 'grid'``.
    """

    __tablename__ = "evidence"

    verdict_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("verdicts.id", ondelete="CASCADE"), primary_key=True
    )
    # Called group_name, not "group": GROUP is an SQL keyword and reviewers write SQL against this table.
    group_name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSONDocument)

    verdict: Mapped[Verdict] = relationship(back_populates="evidence")


class Check(Base):
    """One submission of one image by one client; the unit the queue and the reviewers work on."""

    __tablename__ = "checks"
    __table_args__ = (
        sa.UniqueConstraint("client", "external_id"),
        sa.CheckConstraint(_in("status", CHECK_STATUSES), name="status"),
        sa.CheckConstraint(_in("reviewed_verdict", VERDICTS), name="reviewed_verdict"),
        sa.Index("ix_checks_status_updated_at", "status", "updated_at"),
        sa.Index("ix_checks_client_created_at", "client", "created_at"),
        sa.Index("ix_checks_created_at", "created_at"),
        sa.Index("ix_checks_sha256", "sha256"),
        sa.Index("ix_checks_phash", "phash"),
        sa.Index("ix_checks_verdict_id", "verdict_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    client: Mapped[str] = mapped_column(sa.String(CLIENT_MAX_LEN))
    external_id: Mapped[str] = mapped_column(sa.String(EXTERNAL_ID_MAX_LEN))
    source_url: Mapped[str | None] = mapped_column(sa.Text)
    has_inline_image: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    # Inline image bytes: held only until the check is processed, so a redelivered or reconciled check
    # can still be analysed; cleared afterwards unless SYNTHGUARD_STORE_RAW_IMAGES keeps them.
    image_data: Mapped[bytes | None] = mapped_column(sa.LargeBinary, deferred=True)
    sha256: Mapped[str | None] = mapped_column(sa.String(64))
    # PDQ perceptual hash (64 hex digits) and its quality (0..100), for near-duplicate lookup.
    phash: Mapped[str | None] = mapped_column(sa.String(64))
    phash_quality: Mapped[int | None] = mapped_column(sa.Integer)
    status: Mapped[str] = mapped_column(sa.String(16), default="queued", server_default="queued")
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(sa.Text)
    callback_url: Mapped[str | None] = mapped_column(sa.Text)
    # "metadata" is reserved on declarative classes, hence the attribute name.
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONDocument)
    verdict_id: Mapped[uuid.UUID | None] = mapped_column(sa.ForeignKey("verdicts.id", ondelete="RESTRICT"))
    # A reviewer's decision overrides the model's for this check (history in the reviews table).
    reviewed_verdict: Mapped[str | None] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    # selectin, not joined: a joined eager load cannot be combined with SELECT ... FOR UPDATE on PostgreSQL.
    verdict: Mapped[Verdict | None] = relationship(lazy="selectin")
    reviews: Mapped[list[Review]] = relationship(back_populates="check", order_by="Review.created_at")

    @property
    def effective_verdict(self) -> str | None:
        """The reviewer's verdict where there is one, else the model's."""
        if self.reviewed_verdict is not None:
            return self.reviewed_verdict
        return self.verdict.verdict if self.verdict is not None else None


class Review(Base):
    """A reviewer changing (or confirming) the verdict of one check."""

    __tablename__ = "reviews"
    __table_args__ = (
        sa.CheckConstraint(_in("new_verdict", VERDICTS), name="new_verdict"),
        sa.Index("ix_reviews_check_id_created_at", "check_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    check_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("checks.id", ondelete="CASCADE"))
    reviewer: Mapped[str] = mapped_column(sa.String(100))
    previous_verdict: Mapped[str | None] = mapped_column(sa.String(16))
    new_verdict: Mapped[str] = mapped_column(sa.String(16))
    note: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    check: Mapped[Check] = relationship(back_populates="reviews")


__all__ = [
    "CHECK_STATUSES",
    "CLIENT_MAX_LEN",
    "DECIDED_BY",
    "EXTERNAL_ID_MAX_LEN",
    "URL_MAX_LEN",
    "VERDICTS",
    "Check",
    "Client",
    "Evidence",
    "Review",
    "Verdict",
]
