"""Webhook tables: endpoints, the delivery outbox, and one row per delivery attempt.

A *delivery* is one event for one target (a registered endpoint or a check's callback URL). It is inserted in
the same transaction as the verdict it reports (the outbox), so a verdict is never stored without its
notification, and a worker that dies before sending leaves a pending row that the sweep picks up.
Secrets are stored encrypted (worker/webhooks.py: SecretCipher); these tables never hold a plaintext secret.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import Base, JSONDocument, utcnow
from db.tables import CLIENT_MAX_LEN, URL_MAX_LEN

DELIVERY_STATUSES: Final = ("pending", "succeeded", "failed")
ATTEMPT_OUTCOMES: Final = ("succeeded", "retry", "failed", "gone")
EVENT_TYPE_MAX_LEN: Final = 64


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class WebhookEndpoint(Base):
    """A URL a client registered to receive events, with its signing secret(s)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (sa.Index("ix_webhook_endpoints_client_enabled", "client", "enabled"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    client: Mapped[str] = mapped_column(sa.ForeignKey("clients.name", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(sa.String(URL_MAX_LEN))
    # Event types this endpoint receives, e.g. ["check.flagged", "check.reviewed"].
    events: Mapped[list[str]] = mapped_column(JSONDocument)
    description: Mapped[str | None] = mapped_column(sa.Text)
    secret_encrypted: Mapped[str] = mapped_column(sa.Text)
    # After a rotation the old secret keeps signing (a second signature) until this time, so receivers can
    # switch over without dropping events.
    previous_secret_encrypted: Mapped[str | None] = mapped_column(sa.Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column()
    enabled: Mapped[bool] = mapped_column(sa.Boolean, default=True, server_default=sa.true())
    disabled_reason: Mapped[str | None] = mapped_column(sa.Text)
    disabled_at: Mapped[datetime | None] = mapped_column()
    # Start of the current run of failed attempts; cleared by any success. A long run disables the endpoint.
    failing_since: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookClientSecret(Base):
    """The secret that signs a client's per-check ``callback_url`` deliveries (endpoints have their own)."""

    __tablename__ = "webhook_client_secrets"

    client: Mapped[str] = mapped_column(sa.ForeignKey("clients.name", ondelete="CASCADE"), primary_key=True)
    secret_encrypted: Mapped[str] = mapped_column(sa.Text)
    previous_secret_encrypted: Mapped[str | None] = mapped_column(sa.Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookDelivery(Base):
    """One event to one target: the outbox row, then the delivery's state until it succeeds or gives up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.CheckConstraint(_in("status", DELIVERY_STATUSES), name="status"),
        # The sweep and the delivery task look rows up by (status, next_attempt_at).
        sa.Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        sa.Index("ix_webhook_deliveries_endpoint_id_created_at", "endpoint_id", "created_at"),
        sa.Index("ix_webhook_deliveries_check_id", "check_id"),
        sa.Index("ix_webhook_deliveries_created_at", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # The webhook-id header ("msg_<hex>"): one per event, shared by the event's targets and stable across
    # retries and redeliveries, so receivers can drop duplicates.
    message_id: Mapped[str] = mapped_column(sa.String(64))
    event_type: Mapped[str] = mapped_column(sa.String(EVENT_TYPE_MAX_LEN))
    client: Mapped[str | None] = mapped_column(sa.String(CLIENT_MAX_LEN))
    # NULL for a check's callback_url (then signed with the client's secret).
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    check_id: Mapped[uuid.UUID | None] = mapped_column(sa.ForeignKey("checks.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(sa.String(URL_MAX_LEN))
    # The exact JSON bytes (UTF-8) that are signed and sent: every retry sends the same body.
    payload: Mapped[str] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16), default="pending", server_default="pending")
    attempt_count: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    # Position in the retry schedule; a manual redelivery restarts the schedule but keeps attempt_count.
    schedule_position: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    # While a worker is sending, no other worker may claim the row; a dead worker's lease simply expires.
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    last_status_code: Mapped[int | None] = mapped_column(sa.Integer)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()

    endpoint: Mapped[WebhookEndpoint | None] = relationship(lazy="joined")
    attempts: Mapped[list[WebhookAttempt]] = relationship(
        back_populates="delivery", order_by="WebhookAttempt.attempt_number"
    )


class WebhookAttempt(Base):
    """One HTTP attempt of one delivery (or an attempt refused before any connection)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        sa.UniqueConstraint("delivery_id", "attempt_number"),
        sa.CheckConstraint(_in("outcome", ATTEMPT_OUTCOMES), name="outcome"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    delivery_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    attempt_number: Mapped[int] = mapped_column(sa.Integer)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    url: Mapped[str] = mapped_column(sa.String(URL_MAX_LEN))
    status_code: Mapped[int | None] = mapped_column(sa.Integer)
    latency_ms: Mapped[int] = mapped_column(sa.Integer)
    outcome: Mapped[str] = mapped_column(sa.String(16))
    error: Mapped[str | None] = mapped_column(sa.Text)
    response_excerpt: Mapped[str | None] = mapped_column(sa.Text)

    delivery: Mapped[WebhookDelivery] = relationship(back_populates="attempts")


__all__ = [
    "ATTEMPT_OUTCOMES",
    "DELIVERY_STATUSES",
    "WebhookAttempt",
    "WebhookClientSecret",
    "WebhookDelivery",
    "WebhookEndpoint",
]
