"""Celery tasks for webhooks: deliver one outbox row, and the sweep that re-enqueues lost ones.

``synthguard.deliver_webhook(delivery_id)`` is a thin wrapper around ``webhook_delivery.deliver_once``: it
makes one attempt and, when a retry is due soon (``webhook_eta_max_s``), schedules itself with a countdown.
Retries further out are left to the sweep, because a Redis ETA message older than the broker's visibility
timeout would be delivered twice.

``synthguard.sweep_webhooks`` finds pending deliveries overdue by more than ``webhook_sweep_grace_s`` (their
task was lost: worker killed between commit and send, broker down at enqueue time, a long retry delay) and
enqueues them again. Every synthguard worker runs it by itself: a bootstep sends the sweep task every
``webhook_sweep_interval_s`` seconds, so no separate ``celery beat`` process is needed. Several workers
sweeping at once is harmless: rows are taken with SKIP LOCKED and a delivery is claimed by one worker only.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from typing import Any, Final

import httpx
import kombu.exceptions
import redis.exceptions
from celery import Celery, Task, shared_task

from db.base import utcnow
from db.session import session_scope
from worker.app import TimerStep, install_on_synthguard_workers, runtime_for
from worker.settings import Settings
from worker.webhook_delivery import (
    DELIVER_WEBHOOK_TASK,
    SWEEP_WEBHOOKS_TASK,
    DeliveryConfig,
    deliver_once,
    due_delivery_ids,
)
from worker.webhooks import SecretCipher, make_webhook_client

__all__ = [
    "DELIVER_WEBHOOK_TASK",
    "SWEEP_WEBHOOKS_TASK",
    "close_http_client",
    "deliver_webhook",
    "sweep_webhooks",
]

log = logging.getLogger(__name__)

SWEEP_BATCH: Final = 500

# One HTTP client (connection pool) per app and process; a forked child builds its own.
_CLIENTS: weakref.WeakKeyDictionary[Celery, tuple[int, httpx.Client]] = weakref.WeakKeyDictionary()
_CLIENTS_LOCK = threading.Lock()


def _http_client(app: Celery, settings: Settings) -> httpx.Client:
    with _CLIENTS_LOCK:
        cached = _CLIENTS.get(app)
        if cached is not None and cached[0] == os.getpid():
            return cached[1]
        client = make_webhook_client(settings.allow_private_hosts, settings.webhook_timeout_s)
        _CLIENTS[app] = (os.getpid(), client)
        return client


def close_http_client(app: Celery) -> None:
    """Close this process's webhook HTTP client of ``app`` (worker shutdown, tests)."""
    with _CLIENTS_LOCK:
        cached = _CLIENTS.pop(app, None)
    if cached is not None and cached[0] == os.getpid():
        cached[1].close()


def _enqueue(app: Celery, delivery_id: str, countdown: float | None = None) -> bool:
    try:
        app.send_task(DELIVER_WEBHOOK_TASK, kwargs={"delivery_id": delivery_id}, countdown=countdown)
    except (kombu.exceptions.OperationalError, redis.exceptions.RedisError, OSError) as exc:
        log.warning("could not enqueue webhook delivery %s (the sweep will retry): %s", delivery_id, exc)
        return False
    return True


@shared_task(name=DELIVER_WEBHOOK_TASK, bind=True, ignore_result=True)
def deliver_webhook(self: Task[Any, Any], delivery_id: str) -> str:
    """Make one attempt at a delivery; returns its status afterwards (or "skipped"/"invalid")."""
    try:
        key = uuid.UUID(str(delivery_id))
    except ValueError:
        log.warning("deliver_webhook got %r, which is not a delivery id; dropped", delivery_id)
        return "invalid"
    runtime = runtime_for(self.app)
    settings = runtime.settings
    step = deliver_once(
        runtime.session_factory,
        key,
        _http_client(self.app, settings),
        SecretCipher.from_settings(settings),
        DeliveryConfig.from_settings(settings),
    )
    log.info("webhook delivery %s: %s (%s)", key, step.status, step.detail or "ok")
    # Never hold an ETA message longer than half the broker's visibility timeout (Redis would redeliver it).
    eta_limit = min(settings.webhook_eta_max_s, settings.broker_visibility_timeout_s / 2)
    if step.status == "pending" and step.retry_in_s is not None and step.retry_in_s <= eta_limit:
        _enqueue(self.app, str(key), countdown=step.retry_in_s)
    return step.status


@shared_task(name=SWEEP_WEBHOOKS_TASK, bind=True, ignore_result=True)
def sweep_webhooks(self: Task[Any, Any], grace_s: float | None = None) -> int:
    """Re-enqueue pending deliveries whose task was lost; returns how many were enqueued."""
    runtime = runtime_for(self.app)
    settings = runtime.settings
    grace = settings.webhook_sweep_grace_s if grace_s is None else float(grace_s)
    with session_scope(runtime.session_factory) as session:
        ids = due_delivery_ids(session, now=utcnow(), grace_s=grace, limit=SWEEP_BATCH)
    sent = sum(_enqueue(self.app, str(delivery_id)) for delivery_id in ids)
    if ids:
        log.info("webhook sweep re-enqueued %d overdue deliveries", sent)
    return sent


class WebhookSweepStep(TimerStep):
    """Worker bootstep: sends ``synthguard.sweep_webhooks`` every sweep interval from the worker's timer."""

    label = "webhook sweep"

    def start(self, parent: Any) -> None:
        app: Celery = parent.app
        interval = runtime_for(app).settings.webhook_sweep_interval_s

        def send_sweep() -> None:
            try:
                app.send_task(SWEEP_WEBHOOKS_TASK)  # routed to the webhook queue
            except Exception:  # the broker may be down; try again next interval
                log.warning("could not send the webhook sweep task", exc_info=True)

        self.call_repeatedly(parent, interval, send_sweep)

    def stop(self, parent: Any) -> None:
        super().stop(parent)
        close_http_client(parent.app)


install_on_synthguard_workers(WebhookSweepStep)
