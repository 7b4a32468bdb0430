"""Thin Celery tasks: validate the message, open units of work, call the pipeline, then enqueue follow-ups.

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

import json
import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
from celery import Celery, Task, shared_task

from db.queries import get_or_create_check
from db.session import session_scope
from db.tables import CLIENT_MAX_LEN, EXTERNAL_ID_MAX_LEN, URL_MAX_LEN
from worker import netguard, pipeline
from worker.app import runtime_for
from worker.settings import Settings

log = logging.getLogger(__name__)

CHECK_IMAGE_TASK: Final = "synthguard.check_image"
PROCESS_CHECKS_TASK: Final = "synthguard.process_checks"
DELIVER_WEBHOOK_TASK: Final = "synthguard.deliver_webhook"
METADATA_MAX_BYTES: Final = 16 * 1024
MAX_IDS_PER_MESSAGE: Final = 1000
PAYLOAD_KEYS: Final = frozenset(
    {"image_url", "image_b64", "external_id", "client", "callback_url", "metadata"}
)
# Database unreachable (restart, failover): retry the whole task; claims and upserts make that harmless.
DATABASE_ERRORS: Final = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
DB_RETRY_MAX: Final = 10


class InvalidRequestError(ValueError):
    """A check_image message that cannot be processed; ``key``: (client, external_id) if those were valid."""

    def __init__(self, reason: str, key: tuple[str, str] | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


@dataclass(frozen=True)
class CheckRequest:
    client: str
    external_id: str
    image_url: str | None
    image_data: bytes | None
    callback_url: str | None
    metadata: dict[str, Any] | None


def _bounded_text(payload: Mapping[str, Any], name: str, max_len: int, *, required: bool) -> str | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{name} must not be empty")
    if len(value) > max_len:
        raise ValueError(f"{name} is longer than {max_len} characters")
    _check_storable(name, value)
    return value


def _check_storable(name: str, text: str) -> None:
    """PostgreSQL's text and JSONB hold neither NUL characters nor lone UTF-16 surrogates; JSON has both."""
    if "\x00" in text:
        raise ValueError(f"{name} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (it holds a lone surrogate)") from None


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    try:
        size = len(json.dumps(metadata, allow_nan=False))
    except ValueError as exc:  # NaN and infinities: Python's json writes them, JSONB refuses them
        raise ValueError(f"metadata is not valid JSON ({exc})") from None
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"metadata is larger than {METADATA_MAX_BYTES} bytes of JSON")
    pending: list[Any] = [metadata]
    while pending:  # every key and string value, at any depth (the size limit bounds the walk)
        value = pending.pop()
        if isinstance(value, dict):
            pending += list(value.keys()) + list(value.values())
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, str):
            _check_storable("metadata", value)


def _http_url(name: str, value: str | None) -> str | None:
    if value is not None and not value.lower().startswith(("http://", "https://")):
        raise ValueError(f"{name} must be an http(s) URL")
    return value


def _callback_url(payload: Mapping[str, Any], settings: Settings) -> str | None:
    url = _http_url("callback_url", _bounded_text(payload, "callback_url", URL_MAX_LEN, required=False))
    if url is not None:
        # Its form now (a bad port would fail every delivery); its addresses at every send, after DNS.
        try:
            netguard.check_url_form(url, netguard.HostAllowlist.from_settings(settings))
        except netguard.ForbiddenTargetError as exc:
            raise ValueError(f"callback_url refused: {exc.reason}") from None
    return url


def parse_check_request(payload: Mapping[str, Any], settings: Settings) -> CheckRequest:
    """Validate the JSON kwargs of ``synthguard.check_image``; raise InvalidRequestError with the reason."""
    try:
        client = _bounded_text(payload, "client", CLIENT_MAX_LEN, required=True)
        external_id = _bounded_text(payload, "external_id", EXTERNAL_ID_MAX_LEN, required=True)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(str(exc), None) from None
    if client is None or external_id is None:  # pragma: no cover - required=True guarantees both
        raise InvalidRequestError("client and external_id are required", None)
    try:
        return _parse_fields(payload, settings, client, external_id)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(str(exc), (client, external_id)) from None


def _parse_fields(
    payload: Mapping[str, Any], settings: Settings, client: str, external_id: str
) -> CheckRequest:
    unknown = sorted(str(name) for name in set(payload) - PAYLOAD_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    image_url = _http_url("image_url", _bounded_text(payload, "image_url", URL_MAX_LEN, required=False))
    image_b64 = payload.get("image_b64")
    if (image_url is None) == (image_b64 is None):
        raise ValueError("exactly one of image_url and image_b64 is required")
    image_data = None
    if image_b64 is not None:
        if not isinstance(image_b64, str):
            raise TypeError(f"image_b64 must be a string, not {type(image_b64).__name__}")
        image_data = pipeline.decode_base64_image(image_b64, settings.max_inline_bytes)
    callback_url = _callback_url(payload, settings)
    metadata = payload.get("metadata")
    if metadata is not None:
        _check_metadata(metadata)
    return CheckRequest(client, external_id, image_url, image_data, callback_url, metadata)


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
    "CheckRequest",
    "InvalidRequestError",
    "check_image",
    "enqueue_checks",
    "enqueue_deliveries",
    "parse_check_request",
    "process_check_ids",
    "process_checks",
    "retry_countdown",
]
