"""Operator actions on webhook endpoints and secrets (the CLI's ``synthguard webhooks`` calls these).

Each takes the caller's session and never commits. Functions that create or rotate a secret return the
plaintext once, for the operator to hand to the receiver; only the encrypted form is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.base import utcnow
from db.tables import URL_MAX_LEN, Client
from db.webhook_tables import WebhookClientSecret, WebhookDelivery, WebhookEndpoint
from worker import netguard
from worker.webhooks import (
    DEFAULT_ENDPOINT_EVENTS,
    EVENT_PING,
    EVENT_TYPES,
    SecretCipher,
    build_ping_payload,
    generate_secret,
)

__all__ = [
    "EndpointError",
    "create_endpoint",
    "create_ping_delivery",
    "get_endpoint",
    "list_endpoints",
    "reveal_client_secret",
    "rotate_client_secret",
    "rotate_endpoint_secret",
    "set_endpoint_enabled",
]


class EndpointError(ValueError):
    """An operator request that cannot be done; the message says why."""


def _ensure_client(session: Session, name: str) -> None:
    if session.get(Client, name) is None:
        session.add(Client(name=name))
        session.flush()


def _check_events(events: Sequence[str]) -> list[str]:
    unknown = sorted(set(events) - set(EVENT_TYPES))
    if unknown:
        raise EndpointError(f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}")
    return sorted(set(events))


def _check_url_shape(url: str) -> None:
    if len(url) > URL_MAX_LEN:
        raise EndpointError(f"URL is longer than {URL_MAX_LEN} characters")
    try:
        netguard.check_url_form(url, netguard.HostAllowlist())
    except netguard.ForbiddenTargetError as exc:
        raise EndpointError(f"URL refused: {exc.reason}") from None


def get_endpoint(session: Session, endpoint_id: str | uuid.UUID) -> WebhookEndpoint:
    try:
        key = endpoint_id if isinstance(endpoint_id, uuid.UUID) else uuid.UUID(str(endpoint_id))
    except ValueError:
        raise EndpointError(f"{endpoint_id!r} is not an endpoint id") from None
    endpoint = session.get(WebhookEndpoint, key)
    if endpoint is None:
        raise EndpointError(f"no webhook endpoint {key}")
    return endpoint


def create_endpoint(
    session: Session,
    cipher: SecretCipher,
    *,
    url: str,
    client: str,
    events: Sequence[str] | None = None,
    description: str | None = None,
) -> tuple[WebhookEndpoint, str]:
    """Register ``url`` for ``client``; returns the endpoint and its new ``whsec_`` secret (shown once)."""
    _check_url_shape(url)
    subscribed = _check_events(events or DEFAULT_ENDPOINT_EVENTS)
    _ensure_client(session, client)
    secret = generate_secret()
    endpoint = WebhookEndpoint(
        id=uuid.uuid4(),
        client=client,
        url=url,
        events=subscribed,
        description=description,
        secret_encrypted=cipher.encrypt(secret),
        enabled=True,
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret


def rotate_endpoint_secret(
    session: Session, cipher: SecretCipher, endpoint_id: str | uuid.UUID, *, overlap_s: float
) -> tuple[WebhookEndpoint, str]:
    """Give the endpoint a new secret; the old one keeps signing beside it for ``overlap_s`` seconds."""
    endpoint = get_endpoint(session, endpoint_id)
    secret = generate_secret()
    endpoint.previous_secret_encrypted = endpoint.secret_encrypted
    endpoint.previous_secret_expires_at = utcnow() + timedelta(seconds=overlap_s)
    endpoint.secret_encrypted = cipher.encrypt(secret)
    return endpoint, secret


def set_endpoint_enabled(
    session: Session, endpoint_id: str | uuid.UUID, *, enabled: bool, reason: str | None = None
) -> WebhookEndpoint:
    endpoint = get_endpoint(session, endpoint_id)
    endpoint.enabled = enabled
    if enabled:
        endpoint.disabled_reason = None
        endpoint.disabled_at = None
        endpoint.failing_since = None
    else:
        endpoint.disabled_reason = reason or "disabled by an operator"
        endpoint.disabled_at = utcnow()
    return endpoint


def _client_secret_row(
    session: Session, cipher: SecretCipher, client: str
) -> tuple[WebhookClientSecret, bool]:
    row = session.get(WebhookClientSecret, client)
    if row is not None:
        return row, False
    _ensure_client(session, client)
    row = WebhookClientSecret(client=client, secret_encrypted=cipher.encrypt(generate_secret()))
    session.add(row)
    session.flush()
    return row, True


def reveal_client_secret(session: Session, cipher: SecretCipher, client: str) -> str:
    """The secret signing ``client``'s callback URLs (created on first use), for the operator to pass on."""
    row, _created = _client_secret_row(session, cipher, client)
    return cipher.decrypt(row.secret_encrypted)


def rotate_client_secret(session: Session, cipher: SecretCipher, client: str, *, overlap_s: float) -> str:
    row, created = _client_secret_row(session, cipher, client)
    if created:
        return cipher.decrypt(row.secret_encrypted)
    secret = generate_secret()
    row.previous_secret_encrypted = row.secret_encrypted
    row.previous_secret_expires_at = utcnow() + timedelta(seconds=overlap_s)
    row.secret_encrypted = cipher.encrypt(secret)
    return secret


def create_ping_delivery(
    session: Session, endpoint_id: str | uuid.UUID, *, now: datetime | None = None
) -> WebhookDelivery:
    """An outbox row carrying a signed ``ping`` to the endpoint (``synthguard webhooks test``)."""
    endpoint = get_endpoint(session, endpoint_id)
    if not endpoint.enabled:
        raise EndpointError(f"endpoint {endpoint.id} is disabled ({endpoint.disabled_reason})")
    moment = now or utcnow()
    delivery = WebhookDelivery(
        id=uuid.uuid4(),
        message_id="msg_" + uuid.uuid4().hex,
        event_type=EVENT_PING,
        client=endpoint.client,
        endpoint_id=endpoint.id,
        url=endpoint.url,
        payload=build_ping_payload(endpoint_id=str(endpoint.id), occurred_at=moment).decode("utf-8"),
        status="pending",
        next_attempt_at=moment,
        created_at=moment,
    )
    session.add(delivery)
    session.flush()
    return delivery


def list_endpoints(session: Session, client: str | None = None) -> list[WebhookEndpoint]:
    query = sa.select(WebhookEndpoint).order_by(WebhookEndpoint.client, WebhookEndpoint.created_at)
    if client is not None:
        query = query.where(WebhookEndpoint.client == client)
    return list(session.scalars(query))
