"""The delivery state machine: claim a due outbox row, send it, record the attempt, schedule the retry.

One delivery attempt spans two short transactions with the HTTP request between them, so no database
transaction (or row lock) is held while a slow receiver takes its 15 seconds:

1. claim: a conditional UPDATE sets a lease on the row if it is pending, due and not leased. Two workers (a
   retry task and a sweep duplicate) cannot both win it, on PostgreSQL and SQLite alike.
2. send: sign with the endpoint's (or the client's) secret(s) and POST through the guarded client.
3. record: one ``webhook_attempts`` row; the delivery becomes succeeded, failed, or pending with its
   ``next_attempt_at``; the endpoint is disabled on 410 or after failing for days.

A worker killed between 1 and 3 leaves a lease that expires; the sweep then re-enqueues the row. The receiver
may therefore see an event twice; the stable ``webhook-id`` lets it drop the duplicate.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from db.base import utcnow
from db.session import session_scope
from db.tables import Client
from db.webhook_tables import WebhookAttempt, WebhookClientSecret, WebhookDelivery, WebhookEndpoint
from worker.settings import Settings
from worker.webhooks import (
    EVENT_PING,
    RESPONSE_EXCERPT_CHARS,
    Outcome,
    RetryPolicy,
    SecretCipher,
    SecretError,
    SendResult,
    generate_secret,
    make_webhook_client,
    send_webhook,
    storable_text,
    webhook_headers,
)

__all__ = [
    "DELIVER_WEBHOOK_TASK",
    "SWEEP_WEBHOOKS_TASK",
    "DeliveryConfig",
    "DeliveryStep",
    "active_secrets",
    "claim_delivery",
    "client_secrets",
    "deliver_now",
    "deliver_once",
    "due_delivery_ids",
    "redeliver",
    "redeliver_failed_since",
    "webhook_task_routes",
]

logger = logging.getLogger(__name__)

# The Celery task that sends one delivery (worker/webhook_tasks.py); producers need only the name.
DELIVER_WEBHOOK_TASK: Final = "synthguard.deliver_webhook"
# The periodic task that re-enqueues lost deliveries (worker/webhook_tasks.py).
SWEEP_WEBHOOKS_TASK: Final = "synthguard.sweep_webhooks"
# A claim counts a row as due this early: a broker countdown may fire a little before the database clock.
DUE_TOLERANCE_S: Final = 2.0
# The lease outlives the request (timeout) by this margin before another worker may take the row over.
LEASE_MARGIN_S: Final = 30.0
ERROR_MAX_CHARS: Final = 2000


def webhook_task_routes(settings: Settings) -> dict[str, dict[str, str]]:
    """Celery ``task_routes`` that send the webhook tasks to ``settings.webhook_queue_name``.

    Every producer of these tasks (the worker app, the CLI's bare producer) routes with this, so a delivery
    never lands behind the detection backlog in ``settings.queue_name``.
    """
    route = {"queue": settings.webhook_queue_name}
    return {DELIVER_WEBHOOK_TASK: route, SWEEP_WEBHOOKS_TASK: route}


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; every stored timestamp is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DeliveryConfig:
    """The knobs of the state machine, from Settings (tests build one with a tiny schedule)."""

    policy: RetryPolicy
    timeout_s: float
    disable_after_s: float

    @property
    def lease_s(self) -> float:
        return self.timeout_s + LEASE_MARGIN_S

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryConfig:
        return cls(
            policy=RetryPolicy(tuple(settings.webhook_retry_delays_s), settings.webhook_retry_jitter),
            timeout_s=settings.webhook_timeout_s,
            disable_after_s=settings.webhook_disable_after_s,
        )


@dataclass(frozen=True)
class DeliveryStep:
    """What one call of ``deliver_once`` did.

    ``status`` is the delivery's status afterwards ("succeeded", "pending", "failed"), or "skipped" when the
    row was not ours to send (already done, not due yet, or leased by another worker). ``retry_in_s`` is set
    when another attempt is scheduled.
    """

    delivery_id: uuid.UUID
    status: str
    outcome: Outcome | None = None
    retry_in_s: float | None = None
    detail: str | None = None


def claim_delivery(session: Session, delivery_id: uuid.UUID, *, now: datetime, lease_s: float) -> bool:
    """Take the lease on a pending, due, unleased delivery.

    False when another worker holds it, it is not due yet, or it is no longer pending.
    """
    row = WebhookDelivery
    statement = (
        sa.update(row)
        .where(
            row.id == delivery_id,
            row.status == "pending",
            sa.or_(row.lease_expires_at.is_(None), row.lease_expires_at < now),
            sa.or_(
                row.next_attempt_at.is_(None),
                row.next_attempt_at <= now + timedelta(seconds=DUE_TOLERANCE_S),
            ),
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    if session.get_bind().dialect.name == "postgresql":
        # Losing a lease in a database crash only frees the row for another attempt (a duplicate the
        # webhook-id makes harmless), so this commit need not wait for the WAL flush; it halves the fsyncs
        # per delivery. The attempt record that follows the send keeps the default, durable commit.
        session.execute(sa.text("SET LOCAL synchronous_commit = off"))
    result = cast("CursorResult[Any]", session.execute(statement))
    return result.rowcount == 1


def active_secrets(
    cipher: SecretCipher,
    current: str,
    previous: str | None,
    previous_expires_at: datetime | None,
    now: datetime,
    *,
    owner: str,
) -> list[str]:
    """The secrets to sign with: the current one, plus the previous one while its rotation overlap lasts.

    A current secret that does not decrypt raises SecretError (nothing could sign). A previous one that does
    not decrypt (it was stored under an earlier SYNTHGUARD_SECRET_KEY) is left out with a warning: the
    current secret alone still gives the receiver a signature it can verify. ``owner`` names the endpoint or
    client in that warning.
    """
    secrets_ = [cipher.decrypt(current)]
    if previous is not None and previous_expires_at is not None and as_utc(previous_expires_at) > now:
        try:
            secrets_.append(cipher.decrypt(previous))
        except SecretError as exc:
            logger.warning("%s: previous webhook secret left out of the signature: %s", owner, exc)
    return secrets_


def client_secrets(session: Session, cipher: SecretCipher, client: str, now: datetime) -> list[str]:
    """The secrets signing ``client``'s callback URLs, creating the client's secret on first use.

    The operator reads it with ``synthguard webhooks client-secret CLIENT``.
    """
    row = session.get(WebhookClientSecret, client)
    if row is None:
        if session.get(Client, client) is None:
            session.add(Client(name=client))
            session.flush()
        row = WebhookClientSecret(client=client, secret_encrypted=cipher.encrypt(generate_secret()))
        session.add(row)
        session.flush()
    return active_secrets(
        cipher,
        row.secret_encrypted,
        row.previous_secret_encrypted,
        row.previous_secret_expires_at,
        now,
        owner=f"client {client!r}",
    )


@dataclass(frozen=True)
class _Prepared:
    url: str
    body: bytes
    message_id: str
    secrets: list[str]


def _finish(delivery: WebhookDelivery, status: str, error: str | None, now: datetime) -> None:
    delivery.status = status
    delivery.last_error = storable_text(error, ERROR_MAX_CHARS) if error else None
    delivery.lease_expires_at = None
    if status != "pending":
        delivery.next_attempt_at = None
        delivery.completed_at = now


def _record_attempt(session: Session, delivery: WebhookDelivery, result: SendResult, now: datetime) -> None:
    delivery.attempt_count += 1
    delivery.schedule_position += 1
    delivery.last_status_code = result.status_code
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            attempt_number=delivery.attempt_count,
            attempted_at=now,
            url=delivery.url,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            outcome=result.outcome.value,
            error=storable_text(result.error, ERROR_MAX_CHARS),
            response_excerpt=storable_text(result.response_excerpt, RESPONSE_EXCERPT_CHARS),
        )
    )


def _disable(endpoint: WebhookEndpoint, reason: str, now: datetime) -> None:
    endpoint.enabled = False
    endpoint.disabled_reason = storable_text(reason, ERROR_MAX_CHARS)
    endpoint.disabled_at = now
    logger.warning("webhook endpoint %s disabled: %s", endpoint.id, reason)


def _prepare(
    session: Session, delivery: WebhookDelivery, cipher: SecretCipher, now: datetime
) -> _Prepared | str:
    """The signed request's parts, or a reason the delivery cannot be attempted at all."""
    endpoint = delivery.endpoint
    if endpoint is not None:
        if not endpoint.enabled:
            return f"endpoint disabled: {endpoint.disabled_reason or 'by an operator'}"
        secrets_ = active_secrets(
            cipher,
            endpoint.secret_encrypted,
            endpoint.previous_secret_encrypted,
            endpoint.previous_secret_expires_at,
            now,
            owner=f"endpoint {endpoint.id}",
        )
    elif delivery.client is not None:
        secrets_ = client_secrets(session, cipher, delivery.client, now)
    else:
        return "delivery has neither an endpoint nor a client to sign for"
    return _Prepared(delivery.url, delivery.payload.encode("utf-8"), delivery.message_id, secrets_)


def deliver_once(
    session_factory: sessionmaker[Session],
    delivery_id: uuid.UUID,
    http_client: httpx.Client,
    cipher: SecretCipher,
    config: DeliveryConfig,
) -> DeliveryStep:
    """Make one attempt at ``delivery_id`` if it is due, and record it. Network trouble never raises.

    Database errors do raise (the caller's task fails and the sweep retries later; the lease expires).
    """
    now = utcnow()
    with session_scope(session_factory) as session:
        if not claim_delivery(session, delivery_id, now=now, lease_s=config.lease_s):
            current = session.get(WebhookDelivery, delivery_id)
            detail = "no such delivery" if current is None else f"not due or taken (status {current.status})"
            return DeliveryStep(delivery_id, "skipped", detail=detail)
        delivery = session.get_one(WebhookDelivery, delivery_id, populate_existing=True)
        try:
            prepared = _prepare(session, delivery, cipher, now)
        except SecretError as exc:
            # A secret we cannot decrypt will not decrypt on retry either; say so on an attempt row.
            result = SendResult(Outcome.FAILED, None, 0, error=str(exc))
            _record_attempt(session, delivery, result, now)
            _finish(delivery, "failed", result.error, now)
            return DeliveryStep(delivery_id, "failed", Outcome.FAILED, detail=result.error)
        if isinstance(prepared, str):
            _finish(delivery, "failed", prepared, now)
            return DeliveryStep(delivery_id, "failed", detail=prepared)

    # Outside any transaction: the receiver may take up to the timeout.
    headers = webhook_headers(prepared.secrets, prepared.message_id, prepared.body)
    result = send_webhook(http_client, prepared.url, prepared.body, headers, timeout_s=config.timeout_s)
    return _record(session_factory, delivery_id, result, config)


def deliver_now(
    session_factory: sessionmaker[Session], settings: Settings, delivery_ids: Sequence[uuid.UUID]
) -> list[DeliveryStep]:
    """One attempt at each delivery from this process, without a broker (``synthguard scan``, the CLI).

    Retries that come due later stay pending in the database for a worker's sweep (or the next call).
    Needs ``settings.secret_key``; raises SettingsError without it.
    """
    if not delivery_ids:
        return []
    cipher = SecretCipher.from_settings(settings)
    config = DeliveryConfig.from_settings(settings)
    with make_webhook_client(settings.allow_private_hosts, settings.webhook_timeout_s) as client:
        return [deliver_once(session_factory, key, client, cipher, config) for key in delivery_ids]


def _record(
    session_factory: sessionmaker[Session],
    delivery_id: uuid.UUID,
    result: SendResult,
    config: DeliveryConfig,
) -> DeliveryStep:
    try:
        return _record_result(session_factory, delivery_id, result, config)
    except sa.exc.DataError:
        # The texts are cleaned before they are stored; should one still be refused, the outcome matters
        # more than its wording. Unrecorded, the delivery would stay pending and be re-sent for ever.
        logger.exception(
            "webhook delivery %s: attempt texts refused by the database; stored without", delivery_id
        )
        plain = f"HTTP {result.status_code}" if result.status_code is not None else result.outcome.value
        bare = dataclasses.replace(
            result,
            error=f"{plain}; the attempt's error and response texts could not be stored",
            response_excerpt=None,
        )
        return _record_result(session_factory, delivery_id, bare, config)


def _record_result(
    session_factory: sessionmaker[Session],
    delivery_id: uuid.UUID,
    result: SendResult,
    config: DeliveryConfig,
) -> DeliveryStep:
    now = utcnow()
    with session_scope(session_factory) as session:
        delivery = session.get_one(WebhookDelivery, delivery_id, populate_existing=True)
        _record_attempt(session, delivery, result, now)
        endpoint = delivery.endpoint

        if result.outcome is Outcome.SUCCEEDED:
            _finish(delivery, "succeeded", None, now)
            if endpoint is not None:
                endpoint.failing_since = None
            return DeliveryStep(delivery_id, "succeeded", result.outcome)

        if endpoint is not None:
            if result.outcome is Outcome.GONE:
                _disable(endpoint, f"receiver answered 410 Gone on {now:%Y-%m-%d %H:%M} UTC", now)
            elif endpoint.failing_since is None:
                endpoint.failing_since = now
            elif (now - as_utc(endpoint.failing_since)).total_seconds() >= config.disable_after_s:
                since = as_utc(endpoint.failing_since)
                _disable(
                    endpoint,
                    f"every attempt failed since {since:%Y-%m-%d %H:%M} UTC; last error: {result.error}",
                    now,
                )
            if not endpoint.enabled:
                _finish(delivery, "failed", result.error, now)
                return DeliveryStep(delivery_id, "failed", result.outcome, detail=result.error)

        # A ping (`synthguard webhooks test`) is answered to an operator who is watching: one attempt only.
        if result.outcome is Outcome.RETRY and delivery.event_type != EVENT_PING:
            delay = config.policy.delay_before(
                delivery.schedule_position + 1, retry_after_s=result.retry_after_s
            )
            if delay is not None:
                _finish(delivery, "pending", result.error, now)
                delivery.next_attempt_at = now + timedelta(seconds=delay)
                return DeliveryStep(
                    delivery_id, "pending", result.outcome, retry_in_s=delay, detail=result.error
                )
            error = f"{result.error} (gave up after {delivery.schedule_position} attempts)"
            _finish(delivery, "failed", error, now)
            return DeliveryStep(delivery_id, "failed", result.outcome, detail=error)

        _finish(delivery, "failed", result.error, now)
        return DeliveryStep(delivery_id, "failed", result.outcome, detail=result.error)


def due_delivery_ids(session: Session, *, now: datetime, grace_s: float, limit: int = 500) -> list[uuid.UUID]:
    """Pending deliveries overdue by more than ``grace_s`` and not leased: their task was lost.

    Their ``next_attempt_at`` is moved to ``now`` so the next sweep leaves them alone for another grace period
    while the re-enqueued task waits in the queue.
    """
    row = WebhookDelivery
    query = (
        sa.select(row.id)
        .where(
            row.status == "pending",
            row.next_attempt_at <= now - timedelta(seconds=grace_s),
            sa.or_(row.lease_expires_at.is_(None), row.lease_expires_at < now),
        )
        .order_by(row.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(session.scalars(query))
    if ids:
        session.execute(
            sa.update(row)
            .where(row.id.in_(ids))
            .values(next_attempt_at=now)
            .execution_options(synchronize_session=False)
        )
    return ids


def redeliver(session: Session, delivery_id: uuid.UUID, *, now: datetime) -> WebhookDelivery:
    """Queue a delivery again from the start of the retry schedule (same webhook-id, same body).

    Raises LookupError for an unknown id and ValueError when its endpoint is disabled.
    """
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        raise LookupError(f"no delivery {delivery_id}")
    if delivery.endpoint is not None and not delivery.endpoint.enabled:
        raise ValueError(
            f"endpoint {delivery.endpoint.id} is disabled ({delivery.endpoint.disabled_reason}); "
            "enable it first with `synthguard webhooks enable`"
        )
    delivery.status = "pending"
    delivery.schedule_position = 0
    delivery.next_attempt_at = now
    delivery.lease_expires_at = None
    delivery.completed_at = None
    return delivery


def redeliver_failed_since(
    session: Session, since: datetime, *, now: datetime, endpoint_id: uuid.UUID | None = None
) -> list[uuid.UUID]:
    """Queue again every failed delivery created since ``since`` whose endpoint (if any) is enabled."""
    query = sa.select(WebhookDelivery).where(
        WebhookDelivery.status == "failed", WebhookDelivery.created_at >= since
    )
    if endpoint_id is not None:
        query = query.where(WebhookDelivery.endpoint_id == endpoint_id)
    ids: list[uuid.UUID] = []
    for delivery in session.scalars(query):
        if delivery.endpoint is not None and not delivery.endpoint.enabled:
            continue
        redeliver(session, delivery.id, now=now)
        ids.append(delivery.id)
    return ids
