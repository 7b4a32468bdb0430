"""Real Celery workers in a thread of the test process (never Celery's eager mode)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kombu.asynchronous import set_event_loop

if TYPE_CHECKING:
    from celery import Celery
    from celery.worker import WorkController


@contextmanager
def in_process_worker(app: Celery, **options: Any) -> Iterator[WorkController]:
    """``celery.contrib.testing.worker.start_worker`` on a fresh event loop.

    Kombu keeps one event loop per process and a worker adopts the one it finds, timer included. A deployed
    worker is alone in its process; here an earlier worker's closed loop would be adopted, and the timer the
    new worker schedules on (the webhook sweep, the reconciler) would never be driven.
    """
    from celery.contrib.testing.worker import start_worker

    from worker.app import runtime_for

    # The start-up check of SYNTHGUARD_SECRET_KEY against the stored webhook secrets reads whatever an
    # earlier test left in the shared database (secrets stored under other keys, on purpose); the tests of
    # that check start real `celery` and `synthguard worker` processes instead.
    runtime_for(app).secret_key_checked = True
    set_event_loop(None)
    try:
        with start_worker(app, perform_ping_check=False, loglevel="WARNING", **options) as worker:
            yield worker
    finally:
        set_event_loop(None)
