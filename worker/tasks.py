"""Thin Celery tasks: parse the message, open units of work, call the pipeline, then enqueue follow-ups.

The message schema and its parser live in ``worker.requests``, shared with the producer ``worker.client``.

``synthguard.check_image`` is the public entry point (any Celery producer, no synthguard import needed):

    app.send_task("synthguard.check_image", kwargs={
        "image_url": "https://...",          # or "image_b64": "<base64 bytes>", exactly one of the two
        "external_id": "upload-123",         # your id; (client, external_id) is the idempotency key
        "client": "my-platform",
        "callback_url": "https://...",       # optional: check.flagged webhook target
        "metadata": {"any": "json"},         # optional, at most 16 KiB of JSON
    })

``synthguard.process_checks`` processes checks that already exist (``synthguard enqueue``, the reconciler,
retries after transient fetch errors).
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Sequence
from typing import Any, Final

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
from celery import Celery, Task, shared_task

from db.queries import get_or_create_check
from db.session import session_scope
from worker import pipeline
from worker.app import runtime_for
from worker.requests import CHECK_IMAGE_TASK, InvalidRequestError, parse_check_request
from worker.settings import Settings
from worker.webhook_delivery import DELIVER_WEBHOOK_TASK

log = logging.getLogger(__name__)

PROCESS_CHECKS_TASK: Final = "synthguard.process_checks"
MAX_IDS_PER_MESSAGE: Final = 1000
# Database unreachable (restart, failover): retry the whole task; claims and upserts make that harmless.
DATABASE_ERRORS: Final = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
DB_RETRY_MAX: Final = 10


def retry_countdown(retries: int, settings: Settings) -> float:
    """Exponential backoff with full jitter: up to 2, 4, 8 ... s, capped at ``retry_backoff_max_s``."""
    ceiling = min(float(settings.retry_backoff_max_s), 2.0 ** (retries + 1))
    return random.uniform(ceiling / 2, ceiling)


def enqueue_deliveries(app: Celery, delivery_ids: Sequence[uuid.UUID]) -> None:
    """Send one delivery task per outbox row. Called only after the rows are committed.

    A broker failure here loses nothing: the rows are in the database and the periodic sweep sends them.
    """
    for delivery_id in delivery_ids:
        try:
            app.send_task(DELIVER_WEBHOOK_TASK, kwargs={"delivery_id": str(delivery_id)})
        except (kombu.exceptions.OperationalError, redis.exceptions.RedisError, OSError) as exc:
            log.warning(
                "could not enqueue webhook delivery %s (the sweep will send it): %s", delivery_id, exc
            )


def enqueue_checks(app: Celery, check_ids: Sequence[uuid.UUID], batch_size: int) -> int:
    """Enqueue ``process_checks`` for existing checks in batches; returns the number of messages sent."""
    messages = 0
    for start in range(0, len(check_ids), batch_size):
        batch = [str(check_id) for check_id in check_ids[start : start + batch_size]]
        app.send_task(PROCESS_CHECKS_TASK, kwargs={"check_ids": batch})
        messages += 1
    return messages


def process_check_ids(task: Task[Any, Any], check_ids: Sequence[uuid.UUID]) -> pipeline.PipelineResult | None:
    """Claim (committed first: attempts count even if the work kills the process), work, notify, retry."""
    runtime = runtime_for(task.app)
    settings = runtime.settings
    with session_scope(runtime.session_factory) as session:
        claimed = pipeline.claim(session, check_ids, settings)
    enqueue_deliveries(task.app, claimed.delivery_ids)
    if not claimed.check_ids:
        return None
    retries = int(task.request.retries or 0)
    try:
        with session_scope(runtime.session_factory) as session:
            result = pipeline.run(
                session,
                runtime.detector,
                claimed.check_ids,
                settings,
                retry_transient=retries < settings.fetch_retries,
            )
    except DATABASE_ERRORS:
        raise  # the database is unreachable: the task is retried (autoretry_for)
    except Exception as exc:
        # A bug or an unexpected library error: the batch's work was rolled back; store why instead of leaving
        # the checks "processing" until the reconciler's deadline.
        log.exception("pipeline failed on %d check(s)", len(claimed.check_ids))
        with session_scope(runtime.session_factory) as session:
            delivery_ids = pipeline.fail_checks(
                session, claimed.check_ids, f"internal error: {type(exc).__name__}: {exc}", settings
            )
        enqueue_deliveries(task.app, delivery_ids)
        return None
    enqueue_deliveries(task.app, result.delivery_ids)
    if result.retry_ids:
        countdown = retry_countdown(retries, settings)
        log.info(
            "retrying %d check(s) in %.1f s after transient fetch errors", len(result.retry_ids), countdown
        )
        # Through the task's own app (not the current_app proxy), carrying the retry count forward.
        task.app.send_task(
            PROCESS_CHECKS_TASK,
            kwargs={"check_ids": [str(check_id) for check_id in result.retry_ids]},
            countdown=countdown,
            retries=retries + 1,
        )
    return result


@shared_task(
    bind=True,
    name=CHECK_IMAGE_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    autoretry_for=DATABASE_ERRORS,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=DB_RETRY_MAX,
)
def check_image(self: Task[Any, Any], *args: Any, **payload: Any) -> str | None:
    """Create (or find) the check for (client, external_id) and process it; returns the check id."""
    runtime = runtime_for(self.app)
    settings = runtime.settings
    if args:
        log.error("refused %s message with positional arguments; send JSON kwargs", CHECK_IMAGE_TASK)
        return None
    try:
        request = parse_check_request(payload, settings)
    except InvalidRequestError as exc:
        return _store_invalid_request(self, exc, settings)
    with session_scope(runtime.session_factory) as session:
        check, created = get_or_create_check(
            session,
            client=request.client,
            external_id=request.external_id,
            source_url=request.image_url,
            image_data=request.image_data,
            callback_url=request.callback_url,
            metadata=request.metadata,
        )
        check_id, status = check.id, check.status
    if not created and status in ("done", "failed"):
        log.info("check %s (%s/%s) already %s", check_id, request.client, request.external_id, status)
        return str(check_id)
    process_check_ids(self, [check_id])
    return str(check_id)


def _store_invalid_request(task: Task[Any, Any], exc: InvalidRequestError, settings: Settings) -> str | None:
    if exc.key is None:
        # Without (client, external_id) there is no row to store the failure in; the log is the record.
        log.error("refused %s message: %s", CHECK_IMAGE_TASK, exc.reason)
        return None
    runtime = runtime_for(task.app)
    client, external_id = exc.key
    with session_scope(runtime.session_factory) as session:
        check, created = get_or_create_check(session, client=client, external_id=external_id)
        check_id = check.id
        delivery_ids = (
            pipeline.fail_checks(session, [check.id], f"invalid request: {exc.reason}", settings)
            if created
            else []
        )
    enqueue_deliveries(task.app, delivery_ids)
    log.warning("check %s (%s/%s) refused: %s", check_id, client, external_id, exc.reason)
    return str(check_id)


@shared_task(
    bind=True,
    name=PROCESS_CHECKS_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    autoretry_for=DATABASE_ERRORS,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=DB_RETRY_MAX,
)
def process_checks(self: Task[Any, Any], check_ids: Any = None) -> int:
    """Process existing checks by id (list of UUID strings); returns how many were worked on."""
    if not isinstance(check_ids, list) or not check_ids or len(check_ids) > MAX_IDS_PER_MESSAGE:
        log.error(
            "refused %s message: check_ids must be a list of 1..%d ids",
            PROCESS_CHECKS_TASK,
            MAX_IDS_PER_MESSAGE,
        )
        return 0
    ids: list[uuid.UUID] = []
    for raw in check_ids:
        try:
            ids.append(uuid.UUID(str(raw)))
        except ValueError:
            log.error("refused check id %r in %s: not a UUID", raw, PROCESS_CHECKS_TASK)  # noqa: TRY400
    result = process_check_ids(self, ids)
    return 0 if result is None else len(result.outcomes)


__all__ = [
    "CHECK_IMAGE_TASK",
    "PROCESS_CHECKS_TASK",
    "check_image",
    "enqueue_checks",
    "enqueue_deliveries",
    "process_check_ids",
    "process_checks",
    "retry_countdown",
]
