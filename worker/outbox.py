"""The webhook outbox: which events a check raises; one delivery row per target, in the caller's transaction.

The pipeline calls these functions inside the transaction that stores the verdict (or the failure, or the
review), so the notification commits or rolls back with it. They only insert rows and return their ids; the
caller enqueues ``synthguard.deliver_webhook`` for each id after the commit, and the periodic sweep sends any
row whose task was lost. No crypto and no network here: signing happens at send time.

Targets:
* every enabled endpoint of the check's client subscribed to the event type;
* the check's ``callback_url`` (signed with the client's secret) for ``check.flagged`` and for
  ``check.reviewed`` when the reviewer changed the verdict — the per-task callback answers "was my upload
  flagged?", so it does not receive ``check.completed``/``check.failed`` (subscribe an endpoint for those).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db import queries
from db.base import utcnow
from db.tables import Check, Client, Review, Verdict
from db.webhook_tables import WebhookDelivery, WebhookEndpoint
from worker.webhook_delivery import as_utc
from worker.webhooks import (
    EVENT_COMPLETED,
    EVENT_FAILED,
    EVENT_FLAGGED,
    EVENT_REVIEWED,
    CheckEventData,
    build_payload,
    timestamp_text,
)

__all__ = [
    "error_for_receiver",
    "message_id_for",
    "record_check_events",
    "record_check_failed",
    "record_review",
    "review_check",
]

# Namespace for deterministic message ids: the same event of the same check always gets the same webhook-id,
# so a pipeline re-run that records it again is recognisable by the receiver as a duplicate.
_MESSAGE_NAMESPACE: Final = uuid.UUID("6f1d8a52-3c2b-4e1a-9d0c-5b7e2f4a8c11")


# How worker/pipeline.py introduces a fetch failure in check.error: "fetch failed: <reason>", or while a retry
# waits "fetch failed, will retry: <reason>", which a final failure (retries spent, dead-lettered) may quote
# after its own reason. The reason runs to the end of the text.
_FETCH_FAILURE_MARKERS: Final = ("fetch failed: ", "fetch failed, will retry: ")
# Refusals that depend only on the URL's own text, which the receiver's platform wrote: they reveal nothing
# and tell it what to fix (worker/netguard.py _split_url).
_URL_TEXT_REFUSAL: Final = re.compile(
    r"refused: (scheme |URLs with user information|URL contains whitespace|invalid URL|URL has no host"
    r"|port \d+ is not valid)"
)
HOST_NOT_ALLOWED: Final = "refused: the image URL's host is not allowed"
COULD_NOT_FETCH: Final = "could not fetch the image URL"


def _fetch_reason_for_receiver(reason: str) -> str:
    if reason.startswith("refused: "):
        # "<host> resolves to <address>: loopback address refused", "(cloud metadata endpoint)", "port 22
        # is not allowed" (it depends on the allowlist)...: each tells a tenant how the worker's DNS and
        # network see a name it chose.
        return reason if _URL_TEXT_REFUSAL.match(reason) else HOST_NOT_ALLOWED
    if reason.startswith(("could not resolve ", "network error: ")):
        # Whether an internal name resolves, and whether a port behind the allowlist answers.
        return COULD_NOT_FETCH
    return reason  # HTTP status, size, timeout, redirects, not an image: about the platform's own URL


def error_for_receiver(error: str | None) -> str | None:
    """``check.error`` as a ``check.failed`` payload carries it: the detail of address refusals and of
    resolution and connection failures is replaced by a generic reason. The stored error (the operator's
    ``checks`` listing, the worker log) keeps it."""
    if error is None:
        return None
    found = [(error.find(marker), marker) for marker in _FETCH_FAILURE_MARKERS if marker in error]
    if not found:
        return error
    start, marker = min(found)
    head = start + len(marker)
    return error[:head] + _fetch_reason_for_receiver(error[head:])


def message_id_for(check_id: uuid.UUID, event_key: str) -> str:
    """The ``webhook-id`` of an event: ``msg_`` + a UUID derived from the check and the event."""
    return "msg_" + uuid.uuid5(_MESSAGE_NAMESPACE, f"{check_id}:{event_key}").hex


def _event_data(check: Check, verdict: Verdict | None, *, review: Review | None = None) -> CheckEventData:
    if verdict is None:
        return CheckEventData(
            check_id=str(check.id),
            external_id=check.external_id,
            client=check.client,
            status=check.status,
            error=error_for_receiver(check.error),
        )
    review_data = None
    if review is not None:
        # The reviewer's name and note stay internal; the receiver learns what changed and when.
        review_data = {
            "review_id": str(review.id),
            "previous_verdict": review.previous_verdict,
            "new_verdict": review.new_verdict,
            "reviewed_at": timestamp_text(as_utc(review.created_at)),
        }
    return CheckEventData(
        check_id=str(check.id),
        external_id=check.external_id,
        client=check.client,
        status=check.status,
        verdict=review.new_verdict if review is not None else verdict.verdict,
        score=verdict.score,
        model=verdict.model_id,
        decided_by="review" if review is not None else verdict.decided_by,
        family_scores=dict(verdict.family_scores or {}),
        evidence={row.group_name: row.data for row in verdict.evidence},
        review=review_data,
    )


def _subscribed_endpoints(session: Session, client: str, event_type: str) -> list[WebhookEndpoint]:
    endpoints = session.scalars(
        sa.select(WebhookEndpoint)
        .where(WebhookEndpoint.client == client, WebhookEndpoint.enabled.is_(True))
        .order_by(WebhookEndpoint.created_at)
    )
    # Subscriptions are a short JSON list per endpoint; filtering here works alike on SQLite and PostgreSQL.
    return [endpoint for endpoint in endpoints if event_type in (endpoint.events or [])]


def _insert(
    session: Session,
    check: Check,
    event_type: str,
    event_key: str,
    data: CheckEventData,
    *,
    include_callback: bool,
    now: datetime,
) -> list[uuid.UUID]:
    targets: list[tuple[uuid.UUID | None, str]] = [
        (endpoint.id, endpoint.url) for endpoint in _subscribed_endpoints(session, check.client, event_type)
    ]
    if include_callback and check.callback_url:
        targets.append((None, check.callback_url))
    if not targets:
        return []

    message_id = message_id_for(check.id, event_key)
    # A re-run of the same unit of work (a redelivered task) must not queue the same event twice. The message
    # id is derived from the check, so the check's own (indexed) rows are all there is to look at; message_id
    # alone has no index, and at 194k deliveries that lookup scanned the table (100-500 ms per event, with
    # the check row locked; measured 2026-12-07).
    already = {
        (endpoint_id, url)
        for endpoint_id, url in session.execute(
            sa.select(WebhookDelivery.endpoint_id, WebhookDelivery.url).where(
                WebhookDelivery.check_id == check.id, WebhookDelivery.message_id == message_id
            )
        )
    }
    body = build_payload(event_type, data, occurred_at=now).decode("utf-8")
    ids: list[uuid.UUID] = []
    for endpoint_id, url in targets:
        if (endpoint_id, url) in already:
            continue
        delivery = WebhookDelivery(
            id=uuid.uuid4(),
            message_id=message_id,
            event_type=event_type,
            client=check.client,
            endpoint_id=endpoint_id,
            check_id=check.id,
            url=url,
            payload=body,
            status="pending",
            next_attempt_at=now,
            created_at=now,
        )
        session.add(delivery)
        ids.append(delivery.id)
    session.flush()
    return ids


def record_check_events(
    session: Session, check: Check, verdict: Verdict, *, now: datetime | None = None
) -> list[uuid.UUID]:
    """Write the outbox rows for a check that got a verdict; return the delivery ids to enqueue after commit.

    ``check.flagged`` goes to subscribed endpoints and the check's callback URL when the verdict is flagged
    for this client (``db.queries.is_flagged``, the rule listings and the ``flagged_checks`` view use);
    ``check.completed`` goes to endpoints subscribed to it, flagged or not.
    """
    moment = now or utcnow()
    client = session.get(Client, check.client)
    data = _event_data(check, verdict)
    ids: list[uuid.UUID] = []
    if queries.is_flagged(check, verdict, client):
        ids += _insert(session, check, EVENT_FLAGGED, EVENT_FLAGGED, data, include_callback=True, now=moment)
    ids += _insert(session, check, EVENT_COMPLETED, EVENT_COMPLETED, data, include_callback=False, now=moment)
    return ids


def record_check_failed(session: Session, check: Check, *, now: datetime | None = None) -> list[uuid.UUID]:
    """Outbox rows for ``check.failed`` (subscribed endpoints); the payload carries the readable reason."""
    data = _event_data(check, None)
    return _insert(
        session, check, EVENT_FAILED, EVENT_FAILED, data, include_callback=False, now=now or utcnow()
    )


def record_review(
    session: Session, check: Check, review: Review, *, now: datetime | None = None
) -> list[uuid.UUID]:
    """Outbox rows for ``check.reviewed``: subscribed endpoints; the callback URL if the verdict changed."""
    if check.verdict is None:
        return []
    changed = review.previous_verdict != review.new_verdict
    data = _event_data(check, check.verdict, review=review)
    key = f"{EVENT_REVIEWED}:{review.id}"
    return _insert(session, check, EVENT_REVIEWED, key, data, include_callback=changed, now=now or utcnow())


def review_check(
    session: Session,
    check_id: uuid.UUID,
    *,
    reviewer: str,
    new_verdict: str,
    note: str | None = None,
    now: datetime | None = None,
) -> tuple[Review, list[uuid.UUID]]:
    """Store a reviewer's decision (``db.queries.record_review``) and its ``check.reviewed`` outbox rows in
    the caller's transaction; enqueue the returned delivery ids after commit. For the review commands."""
    review = queries.record_review(session, check_id, reviewer=reviewer, new_verdict=new_verdict, note=note)
    check = session.get_one(Check, check_id)
    return review, record_review(session, check, review, now=now)
