"""Operator actions on webhook endpoints and secrets (the CLI's ``synthguard webhooks`` calls these).

Each takes the caller's session and never commits. Functions that create or rotate a secret return the
plaintext once, for the operator to hand to the receiver; only the encrypted form is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.base import utcnow
from db.tables import URL_MAX_LEN, Client
from db.webhook_tables import WebhookClientSecret, WebhookDelivery, WebhookEndpoint
from worker import netguard
from worker.webhook_delivery import as_utc
from worker.webhooks import (
    DEFAULT_ENDPOINT_EVENTS,
    EVENT_PING,
    EVENT_TYPES,
    SecretCipher,
    SecretError,
    build_ping_payload,
    generate_secret,
)

__all__ = [
    "EndpointError",
    "Reencryption",
    "SecretRotation",
    "create_endpoint",
    "create_ping_delivery",
    "get_endpoint",
    "list_endpoints",
    "reencrypt_secrets",
    "reveal_client_secret",
    "rotate_client_secret",
    "rotate_endpoint_secret",
    "set_endpoint_enabled",
    "stored_secrets_key",
]


class EndpointError(ValueError):
    """An operator request that cannot be done; the message says why."""


@dataclass(frozen=True)
class SecretRotation:
    """What a secret rotation did, for the message to the operator.

    ``secret`` is the new ``whsec_`` secret (shown once). ``previous_signs_until`` is when the replaced secret
    stops signing beside it, or None when it stopped at once: it could not be decrypted
    (``undecryptable_dropped``), or the overlap is 0. ``overlapping_dropped`` says that a secret from an
    earlier rotation was still inside its overlap and stopped signing now.
    """

    secret: str
    previous_signs_until: datetime | None
    undecryptable_dropped: bool = False
    overlapping_dropped: bool = False


def _decrypts(cipher: SecretCipher, token: str) -> bool:
    try:
        cipher.decrypt(token)
    except SecretError:
        return False
    return True


def _rotate(
    cipher: SecretCipher, row: WebhookEndpoint | WebhookClientSecret, overlap_s: float
) -> SecretRotation:
    """Give ``row`` a new current secret; the replaced one becomes its previous secret for ``overlap_s``.

    Two secrets at most, as Standard Webhooks has it: a previous secret still inside its overlap is replaced
    by the current one. A current secret that the key cannot decrypt (SYNTHGUARD_SECRET_KEY changed since it
    was stored) is dropped rather than kept as previous: nothing can sign with it, and keeping it would only
    put an undecryptable secret on every delivery of the overlap.
    """
    now = utcnow()
    overlapping = (
        row.previous_secret_encrypted is not None
        and row.previous_secret_expires_at is not None
        and as_utc(row.previous_secret_expires_at) > now
        and _decrypts(cipher, row.previous_secret_encrypted)
    )
    old_decrypts = _decrypts(cipher, row.secret_encrypted)
    secret = generate_secret()
    if old_decrypts and overlap_s > 0:
        # Under the current key, so that it keeps signing if the fallback key it may be under is retired.
        row.previous_secret_encrypted = cipher.reencrypt(row.secret_encrypted)
        row.previous_secret_expires_at = now + timedelta(seconds=overlap_s)
    else:
        row.previous_secret_encrypted = None
        row.previous_secret_expires_at = None
    row.secret_encrypted = cipher.encrypt(secret)
    return SecretRotation(
        secret=secret,
        previous_signs_until=row.previous_secret_expires_at,
        undecryptable_dropped=not old_decrypts,
        overlapping_dropped=overlapping,
    )


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
) -> tuple[WebhookEndpoint, SecretRotation]:
    """Give the endpoint a new secret; the old one keeps signing beside it for ``overlap_s`` seconds.

    The endpoint keeps the newest two secrets: a second rotation within the overlap stops the first secret
    signing at once (``SecretRotation.overlapping_dropped``). An old secret the current key cannot decrypt is
    dropped (``undecryptable_dropped``) and only the new secret signs.
    """
    endpoint = get_endpoint(session, endpoint_id)
    return endpoint, _rotate(cipher, endpoint, overlap_s)


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


def rotate_client_secret(
    session: Session, cipher: SecretCipher, client: str, *, overlap_s: float
) -> SecretRotation:
    """Give ``client`` a new callback signing secret, as ``rotate_endpoint_secret`` does for an
    endpoint (newest two kept; an undecryptable old secret dropped). A client without one gets its first."""
    row, created = _client_secret_row(session, cipher, client)
    if created:
        return SecretRotation(secret=cipher.decrypt(row.secret_encrypted), previous_signs_until=None)
    return _rotate(cipher, row, overlap_s)


#: What the configured keys make of the stored secrets (`stored_secrets_key`).
StoredSecretsKey = Literal["none stored", "current", "fallback", "undecryptable"]


def stored_secrets_key(session: Session, cipher: SecretCipher) -> StoredSecretsKey:
    """Whether the cipher decrypts the stored webhook secrets, and under which of its keys.

    One secret stands for all, the most recently written: the likeliest to be under the key the operator
    means (all of them are stored under one key, or are being moved to it by ``reencrypt_secrets``).
    """
    token = session.scalar(
        sa.select(WebhookEndpoint.secret_encrypted).order_by(WebhookEndpoint.updated_at.desc()).limit(1)
    ) or session.scalar(
        sa.select(WebhookClientSecret.secret_encrypted)
        .order_by(WebhookClientSecret.updated_at.desc())
        .limit(1)
    )
    if token is None:
        return "none stored"
    if cipher.is_current(token):
        return "current"
    return "fallback" if _decrypts(cipher, token) else "undecryptable"


@dataclass(frozen=True)
class Reencryption:
    """What ``reencrypt_secrets`` did: counts of stored secrets, and the ones no key decrypts.

    ``undecryptable`` names each such secret ("endpoint <id>" or "client <name>", plus "(previous)" for
    the secret still signing beside a rotated one); their rows are left as they were. ``changed_meanwhile``
    counts secrets another command replaced while this one ran (a rotation): left to it, not overwritten.
    """

    reencrypted: int
    already_current: int
    undecryptable: tuple[str, ...]
    changed_meanwhile: int = 0


def reencrypt_secrets(session: Session, cipher: SecretCipher) -> Reencryption:
    """Encrypt every stored webhook secret under the cipher's current key.

    For a change of SYNTHGUARD_SECRET_KEY with the old key among the fallbacks. A previous secret whose
    overlap has ended is left alone: it never signs again. Each secret is replaced only where it is still the
    one read (compare and swap): on SQLite the read takes no lock, and a rotation committed in between would
    otherwise be overwritten with the old secret, which the receiver no longer has.
    """
    now = utcnow()
    reencrypted = already_current = changed_meanwhile = 0
    undecryptable: list[str] = []
    rows: list[tuple[str, WebhookEndpoint | WebhookClientSecret]] = [
        (f"endpoint {row.id}", row)
        for row in session.scalars(sa.select(WebhookEndpoint).order_by(WebhookEndpoint.id).with_for_update())
    ]
    rows += [
        (f"client {row.client}", row)
        for row in session.scalars(
            sa.select(WebhookClientSecret).order_by(WebhookClientSecret.client).with_for_update()
        )
    ]
    for label, row in rows:
        previous_signs = (
            row.previous_secret_expires_at is not None and as_utc(row.previous_secret_expires_at) > now
        )
        for attribute, name in (
            ("secret_encrypted", label),
            ("previous_secret_encrypted", f"{label} (previous)"),
        ):
            token = getattr(row, attribute)
            if token is None or (attribute == "previous_secret_encrypted" and not previous_signs):
                continue
            if cipher.is_current(token):
                already_current += 1
                continue
            try:
                new_token = cipher.reencrypt(token)
            except SecretError:
                undecryptable.append(name)
                continue
            model = type(row)
            column = getattr(model, attribute)
            key = (
                WebhookEndpoint.id == row.id
                if isinstance(row, WebhookEndpoint)
                else WebhookClientSecret.client == row.client
            )
            swapped = session.execute(
                sa.update(model)
                .where(key, column == token)
                .values({attribute: new_token})
                .execution_options(synchronize_session=False)
            )
            if swapped.rowcount == 1:  # type: ignore[attr-defined]
                reencrypted += 1
            else:
                changed_meanwhile += 1
    return Reencryption(reencrypted, already_current, tuple(undecryptable), changed_meanwhile)


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
