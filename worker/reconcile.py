"""The reconciler: the database is the source of truth, the broker only a delivery mechanism.

A check is lost to the broker when its message vanishes: Redis restarted without persistence, the worker that
held it unacknowledged was killed (kombu restores such messages only after the visibility timeout, 15 min by
default), the enqueue failed after the row was committed. The row remains, ``queued`` or ``processing``, and
stops moving. The reconciler finds those rows and sends them again:

- a check ``queued`` or ``processing`` whose ``updated_at`` is older than ``reconcile_after_s`` is
  re-enqueued (one ``synthguard.process_checks`` message per ``batch_size`` checks) and its ``updated_at`` is
  bumped, so it is re-sent at most once per window however many workers reconcile at once (rows are taken
  with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL);
- one that already used ``max_attempts`` attempts is dead-lettered here (status ``failed`` with the reason):
  every attempt died without storing an outcome, so the image most likely kills the worker;
- a ``queued`` check whose message is still waiting in the Redis queue (a backlog, not a loss) is left alone,
  so a long queue is not amplified by duplicates; a check put back to ``queued`` to wait for a fetch retry
  gets ``retry_backoff_max_s`` more before it counts as stuck.

Re-sending is safe because processing is idempotent: ``claim`` skips finished checks and verdicts are
upserted by (sha256, model_id). A batch that legitimately runs longer than ``reconcile_after_s`` may be
processed twice (wasted work, never a second verdict): keep ``reconcile_after_s`` above the slowest batch.

How it runs: every synthguard worker runs it by itself, from the worker's own timer in its main process (a
bootstep; worker.app.TimerStep says why not a thread), every ``reconcile_after_s / 4`` seconds (1..60 s).
It talks to the database directly, not through a task, so a long queue or a busy pool does not delay it; a
broker outage only postpones the re-sends (the transaction rolls back, nothing is marked). The same pass is
available as the task ``synthguard.reconcile`` (e.g. for celery beat) and as :func:`reconcile_once` for
scripts.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import kombu.exceptions
import redis
import redis.exceptions
import sqlalchemy as sa
import sqlalchemy.exc
from celery import Celery, Task, shared_task
from sqlalchemy.orm import Session, sessionmaker

from db.base import utcnow
from db.session import session_scope
from db.tables import Check
from worker import pipeline
from worker.app import TimerStep, install_on_synthguard_workers, runtime_for
from worker.settings import Settings
from worker.tasks import PROCESS_CHECKS_TASK, enqueue_checks, enqueue_deliveries

__all__ = [
    "RECONCILE_TASK",
    "ReconcileResult",
    "ReconcilerStep",
    "ids_waiting_in_broker",
    "reconcile",
    "reconcile_interval_s",
    "reconcile_once",
]

log = logging.getLogger(__name__)

RECONCILE_TASK: Final = "synthguard.reconcile"
# Rows acted on per pass (re-sent or dead-lettered); a larger backlog of stuck checks is worked off over the
# next passes. Queued checks whose message still waits in Redis do not count.
ROWS_PER_PASS: Final = 2000
# Messages inspected in the Redis queue; past this, the queue is a backlog and queued checks are left alone.
# Every worker runs a pass every reconcile_after_s / 4 in its main process: at 12,250 messages (98k ids) the
# read took 0.9 s and the id query 1.8 s per pass (measured 2026-12-07); 2,000 messages cost about a sixth.
BROKER_SCAN_LIMIT: Final = 2_000
# kombu's Redis transport keeps priority levels in separate lists named queue + this separator + level.
_PRIORITY_SEPARATOR: Final = "\x06\x16"
_PRIORITY_LEVELS: Final = (0, 3, 6, 9)
_BROKER_ERRORS: Final = (kombu.exceptions.OperationalError, redis.exceptions.RedisError, OSError)


@dataclass
class ReconcileResult:
    """What one pass did."""

    requeued: list[uuid.UUID] = field(default_factory=list)
    dead_lettered: list[uuid.UUID] = field(default_factory=list)
    left_in_broker: int = 0
    messages: int = 0


def reconcile_interval_s(settings: Settings) -> float:
    """How often each worker reconciles: a quarter of the stuck threshold, between 1 and 60 s."""
    return min(60.0, max(1.0, settings.reconcile_after_s / 4))


def _check_ids_in_message(raw: bytes | str) -> Iterable[str]:
    try:
        message = json.loads(raw)
        headers = message.get("headers") or {}
        if headers.get("task") != PROCESS_CHECKS_TASK:
            return ()
        body = message["body"]
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        kwargs = decoded[1] if isinstance(decoded, list) and len(decoded) > 1 else {}
        ids = kwargs.get("check_ids") if isinstance(kwargs, dict) else None
        return [str(item) for item in ids] if isinstance(ids, list) else ()
    except (ValueError, KeyError, TypeError, AttributeError):
        return ()


def ids_waiting_in_broker(settings: Settings) -> set[str] | None:
    """Check ids of ``process_checks`` messages waiting in the Redis queue, or None when unknown.

    None means: not a Redis broker, Redis unreachable, or a queue longer than BROKER_SCAN_LIMIT (a backlog).
    Only waiting messages count, not unacknowledged ones: those belong to a worker that may be dead.
    """
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        keys = [settings.queue_name] + [
            f"{settings.queue_name}{_PRIORITY_SEPARATOR}{level}" for level in _PRIORITY_LEVELS[1:]
        ]
        lengths = [int(client.llen(key)) for key in keys]
        if sum(lengths) > BROKER_SCAN_LIMIT:
            return None
        waiting: set[str] = set()
        for key, length in zip(keys, lengths, strict=True):
            if length:
                for raw in client.lrange(key, 0, length - 1):
                    waiting.update(_check_ids_in_message(raw))
    except _BROKER_ERRORS:
        return None
    finally:
        client.close()
    return waiting


def _stuck_checks(
    session: Session, settings: Settings, now: datetime, waiting: set[str] | None, limit: int
) -> tuple[list[Check], int]:
    """Stuck checks to act on, locked; and how many stuck ``queued`` ones were left to their waiting message.

    Two bounded queries, so rows that are left alone never take the places of rows to act on: every stuck
    ``processing`` check is acted on (re-sent or dead-lettered), and ``queued`` ones whose message still
    waits in Redis are skipped before the limit (a backlog of them would otherwise fill every pass and hide a
    check orphaned by a killed worker until the backlog drained).
    """
    threshold = now - timedelta(seconds=settings.reconcile_after_s)
    # Lock the check rows only (the verdict relationship is loaded by a second SELECT; it is not needed here).
    locked = (
        sa.select(Check)
        .order_by(Check.updated_at)
        .options(sa.orm.lazyload(Check.verdict))
        .with_for_update(skip_locked=True, of=Check)
    )
    processing = session.scalars(
        locked.where(Check.status == "processing", Check.updated_at < threshold).limit(limit)
    ).all()

    retry_threshold = threshold - timedelta(seconds=settings.retry_backoff_max_s)
    # coalesce: with a NULL error the NOT(...) below would be NULL, and the row silently skipped.
    waiting_for_retry = sa.func.coalesce(Check.error, "").startswith(pipeline.RETRY_WAIT_PREFIX)
    stuck_queued = sa.and_(
        Check.status == "queued",
        Check.updated_at < threshold,
        sa.or_(sa.not_(waiting_for_retry), Check.updated_at < retry_threshold),
    )
    # Ids first, unlocked: at most len(waiting) of them are skipped, so this many rows hold the places left.
    # With the queue too long to inspect (waiting is None) every queued check counts as waiting.
    places = limit - len(processing)
    if places <= 0:  # stuck processing checks filled the pass; queued ones wait for the next
        return list(processing), 0
    scan = places + (len(waiting) if waiting is not None else 0)
    candidates = session.scalars(
        sa.select(Check.id).where(stuck_queued).order_by(Check.updated_at, Check.id).limit(scan)
    ).all()
    lost = [check_id for check_id in candidates if waiting is not None and str(check_id) not in waiting]
    queued = session.scalars(locked.where(Check.id.in_(lost[:places]), stuck_queued)).all() if lost else []
    return [*processing, *queued], len(candidates) - len(lost)


def reconcile_once(
    app: Celery,
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    now: datetime | None = None,
    rows_per_pass: int = ROWS_PER_PASS,
) -> ReconcileResult:
    """One pass: dead-letter exhausted stuck checks, re-enqueue the other stuck ones. See the module doc.

    At most ``rows_per_pass`` checks are acted on; stuck ``processing`` ones first.

    Raises the broker's error if re-enqueueing fails; the transaction is then rolled back, so the same
    checks are found again on the next pass.
    """
    now = now or utcnow()
    result = ReconcileResult()
    waiting = ids_waiting_in_broker(settings)
    delivery_ids: list[uuid.UUID] = []
    with session_scope(session_factory) as session:
        stuck, result.left_in_broker = _stuck_checks(session, settings, now, waiting, rows_per_pass)
        exhausted = [check.id for check in stuck if check.attempts >= settings.max_attempts]
        if exhausted:
            delivery_ids = pipeline.fail_checks(
                session,
                exhausted,
                f"dead-lettered: processing was started {settings.max_attempts} or more times without "
                f"finishing (limit SYNTHGUARD_MAX_ATTEMPTS={settings.max_attempts}); the image may crash "
                "the worker",
                settings,
            )
            result.dead_lettered = exhausted
        # Queued checks still in the queue (or in a backlog too long to inspect) are not lost, only waiting:
        # _stuck_checks left them out.
        to_send = [check for check in stuck if check.id not in exhausted]
        if to_send:
            ids = [check.id for check in to_send]
            result.messages = enqueue_checks(app, ids, settings.batch_size)
            for check in to_send:
                check.updated_at = now
            result.requeued = ids
    enqueue_deliveries(app, delivery_ids)
    if result.requeued or result.dead_lettered:
        log.warning(
            "reconciler: re-enqueued %d stuck check(s) in %d message(s), dead-lettered %d",
            len(result.requeued),
            result.messages,
            len(result.dead_lettered),
        )
    return result


@shared_task(bind=True, name=RECONCILE_TASK, ignore_result=True)
def reconcile(self: Task[Any, Any]) -> dict[str, int]:
    """Task form of one reconcile pass (for celery beat or a manual kick); returns counts."""
    runtime = runtime_for(self.app)
    result = reconcile_once(self.app, runtime.session_factory, runtime.settings)
    return {"requeued": len(result.requeued), "dead_lettered": len(result.dead_lettered)}


class ReconcilerStep(TimerStep):
    """Worker bootstep: runs :func:`reconcile_once` from the worker's timer (see :class:`TimerStep` for why).

    A pass is short (one indexed query, a few messages); while the broker is down the event loop is
    reconnecting and passes simply wait.
    """

    label = "synthguard reconciler"

    def start(self, parent: Any) -> None:
        app: Celery = parent.app
        runtime = runtime_for(app)
        interval = reconcile_interval_s(runtime.settings)

        def run_pass() -> None:
            try:
                reconcile_once(app, runtime.session_factory, runtime.settings)
            except _BROKER_ERRORS as exc:
                log.warning("reconciler: broker unavailable, will retry: %s", exc)
            except sqlalchemy.exc.SQLAlchemyError as exc:
                log.warning("reconciler: database unavailable, will retry: %s", exc)
            except Exception:
                log.exception("reconciler pass failed; will retry")

        # The first pass soon after start: a worker restarted after a crash recovers its checks at once.
        self.call_after(parent, 1.0, run_pass)
        self.call_repeatedly(parent, interval, run_pass)


install_on_synthguard_workers(ReconcilerStep)
