"""Celery app factory. Built from a Settings object, never at import (tests build their own apps).

Reliability choices, each for a reason:
- JSON only (no pickle): a message is data, never code;
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose process dies is redelivered, not lost
  (tasks are idempotent: checks are keyed by (client, external_id), verdicts by (sha256, model_id));
- prefetch 1: a long CPU/GPU task does not hold other messages hostage in a busy worker's buffer;
- ``worker_max_tasks_per_child``: bounds memory growth of torch allocations;
- results ignored: the database is the source of truth;
- the detector is loaded once per worker process after fork (never CUDA in the parent) and the SQLAlchemy pool
  inherited from the parent is disposed in each child.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery, bootsteps
from celery.signals import worker_init, worker_process_init
from kombu import Exchange, Queue
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_session_factory
from worker.settings import Settings
from worker.webhook_delivery import webhook_task_routes

if TYPE_CHECKING:
    from worker.pipeline import DetectorLike

log = logging.getLogger(__name__)

# Modules whose tasks (and worker bootsteps: webhook sweep, reconciler) every synthguard app carries.
TASK_MODULES = ("worker.tasks", "worker.webhook_tasks", "worker.reconcile")


class WorkerRuntime:
    """Per-process resources of one Celery app: engine, session factory and the detector, created lazily."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._session_factory: sessionmaker[Session] | None = None
        self._detector: DetectorLike | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        #: Set once SYNTHGUARD_SECRET_KEY was checked against the stored webhook secrets at worker start.
        self.secret_key_checked = False

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = make_engine(self.settings.database_url)
            return self._engine

    @property
    def session_factory(self) -> sessionmaker[Session]:
        engine = self.engine
        with self._lock:
            if self._session_factory is None:
                self._session_factory = make_session_factory(engine)
            return self._session_factory

    @property
    def detector(self) -> DetectorLike:
        """The detector of this process, loaded on first use (in a worker child: right after fork)."""
        with self._lock:
            if self._detector is None:
                self._detector = load_detector(self.settings)
            return self._detector

    def set_detector(self, detector: DetectorLike) -> None:
        """Use an already loaded detector (tests share one per session; ``scan`` loads its own)."""
        with self._lock:
            self._detector = detector

    def after_fork(self) -> None:
        """In a new child: drop the parent's pooled connections (a socket must not be shared by processes).

        worker_process_init also fires without a fork (the solo pool sends it at start): then nothing is done,
        since dropping this process's own open connections unclosed would leak them.
        """
        with self._lock:
            if os.getpid() == self._pid:
                return
            self._pid = os.getpid()
            if self._engine is not None:
                self._engine.dispose(close=False)


# A child loads torch and the weights before it reports ready; Celery's 4 s default would kill it mid-load.
CHILD_START_TIMEOUT_S = 300.0
_VERIFY_SCRIPT = """
import sys
import models
detector = models.create_detector(sys.argv[1], device="cpu")
print(detector.model_id)
"""


def verify_detector(settings: Settings, timeout_s: float = 600.0) -> str:
    """Load the configured detector once in a separate interpreter; return its model id.

    The worker's parent process calls this before forking: a missing or tampered weights file stops the start
    with one line. It runs in a subprocess because a parent that has run torch operations (thread pools,
    OpenMP) cannot fork safely: the children hang on locks held by threads that do not exist in them.

    Raises:
        RuntimeError: the detector cannot be loaded; the message is the loader's last line of error output.
    """
    result = subprocess.run(  # noqa: S603 - fixed script, the interpreter running this code
        [sys.executable, "-c", _VERIFY_SCRIPT, settings.model_name],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"the loader exited with status {result.returncode}")
    return result.stdout.strip().splitlines()[-1]


def load_detector(settings: Settings) -> DetectorLike:
    """Create the configured detector; ``device="auto"`` picks CUDA when available."""
    import models  # noqa: PLC0415 - deferred: importing torch is slow and a producer never needs it

    device = None if settings.device == "auto" else settings.device
    detector: DetectorLike = models.create_detector(settings.model_name, device=device)
    log.info("loaded detector %s", detector.model_id)
    return detector


_RUNTIMES: weakref.WeakKeyDictionary[Celery, WorkerRuntime] = weakref.WeakKeyDictionary()


def runtime_for(app: Celery) -> WorkerRuntime:
    """The runtime of an app made by :func:`create_celery_app`."""
    try:
        return _RUNTIMES[app]
    except KeyError:
        raise RuntimeError("this Celery app was not created by worker.app.create_celery_app") from None


class TimerStep(bootsteps.StartStopStep):
    """A worker bootstep whose periodic work runs from the worker's timer, in its main thread.

    Not from a thread of its own: the prefork pool forks new children from the main thread at any time (at
    start, after a child died, after ``worker_max_tasks_per_child``), and a child forked while another thread
    holds a lock (the runtime's, the SQLAlchemy pool's, the producer pool's) inherits it locked and hangs
    for ever. Measured here: with a reconciler thread, pool processes forked during its first pass hung in
    ``worker_process_init``. Timer callbacks run in the event loop, which is also where forks happen, so the
    work and a fork never overlap.

    Subclasses schedule with :meth:`call_after` / :meth:`call_repeatedly`; stopping the worker cancels every
    entry, on a cold shutdown too (Celery then calls ``terminate``, whose default does nothing for a step
    without ``obj``, and the entries would outlive the worker).
    """

    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._entries: list[Any] = []

    def call_after(self, parent: Any, seconds: float, fn: Callable[[], None]) -> None:
        self._entries.append(parent.timer.call_after(seconds, fn))

    def call_repeatedly(self, parent: Any, seconds: float, fn: Callable[[], None]) -> None:
        self._entries.append(parent.timer.call_repeatedly(seconds, fn))

    def stop(self, parent: Any) -> None:
        for entry in self._entries:
            entry.cancel()
        self._entries = []

    def terminate(self, parent: Any) -> None:
        self.stop(parent)


def install_on_synthguard_workers(step: type[TimerStep]) -> None:
    """Add ``step`` to the workers of apps made by :func:`create_celery_app` (not to other apps' workers)."""

    def add_step(sender: Any = None, **_: Any) -> None:
        # worker_init fires before the worker builds its blueprint from app.steps, so the step joins it here.
        app = getattr(sender, "app", None)
        if app is not None and app in _RUNTIMES:
            app.steps["worker"].add(step)

    uid = f"synthguard-step-{step.__module__}.{step.__name__}"
    worker_init.connect(add_step, weak=False, dispatch_uid=uid)


def _consume_webhook_queue(sender: Any = None, **_: Any) -> None:
    """A worker that takes checks also takes their webhook tasks, whatever its ``-Q`` says.

    Before webhooks had a queue of their own, ``-Q <queue name>`` was a complete worker; started that way now,
    it would process checks while their deliveries (and the sweep that re-sends lost ones) piled up unseen
    in ``<queue name>.webhooks``. A worker given only the webhook queue (dedicated senders) is left as it is.
    """
    app = getattr(sender, "app", None)
    if app is None or app not in _RUNTIMES:
        return
    settings = _RUNTIMES[app].settings
    queues = app.amqp.queues
    consumed = {queue.name for queue in queues.consume_from.values()} if queues.consume_from else None
    if consumed is None or settings.webhook_queue_name in consumed or settings.queue_name not in consumed:
        return  # every declared queue (no -Q), both named, or not a checks worker
    queues.select_add(settings.webhook_queue_name)
    log.warning(
        "also consuming %s: the webhook tasks of the checks this worker processes go there "
        "(name both queues in -Q, or use `synthguard worker`)",
        settings.webhook_queue_name,
    )


worker_init.connect(_consume_webhook_queue, weak=False, dispatch_uid="synthguard-consume-webhook-queue")

UNDECRYPTING_KEY_MESSAGE = (
    "SYNTHGUARD_SECRET_KEY does not decrypt the stored webhook secrets; set the key they were stored with, "
    "or keep it in SYNTHGUARD_SECRET_KEY_FALLBACKS beside a new key (every worker and `synthguard webhooks` "
    "command needs the same keys)"
)
REKEY_REMINDER = (
    "webhook secrets are stored under a key in SYNTHGUARD_SECRET_KEY_FALLBACKS; run `synthguard webhooks "
    "rekey` to re-encrypt them under SYNTHGUARD_SECRET_KEY"
)


def _refuse_a_key_that_does_not_decrypt(sender: Any = None, **_: Any) -> None:
    """`celery -A worker.celery worker` checks the key as `synthguard worker` does (which checked it already).

    Without this, a worker started with another key would run "ready" and fail every delivery it takes, for
    good. Without a key it starts as before (its deliveries fail saying the key is unset), and a database it
    cannot reach yet does not stop it: the tasks wait for the database the same way.
    """
    app = getattr(sender, "app", None)
    runtime = _RUNTIMES.get(app) if app is not None else None
    if runtime is None or runtime.secret_key_checked or runtime.settings.secret_key is None:
        return
    from worker.webhook_endpoints import stored_secrets_key  # noqa: PLC0415 - httpx, cryptography
    from worker.webhooks import SecretCipher  # noqa: PLC0415

    # An engine of its own, disposed at once: this is the main process, whose pool children must not inherit
    # an open connection.
    engine = make_engine(runtime.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            state = stored_secrets_key(session, SecretCipher.from_settings(runtime.settings))
    except SQLAlchemyError as exc:
        log.warning("could not check SYNTHGUARD_SECRET_KEY against the stored webhook secrets: %s", exc)
        return
    finally:
        engine.dispose()
    if state == "undecryptable":
        log.error(UNDECRYPTING_KEY_MESSAGE)
        raise SystemExit(f"synthguard: {UNDECRYPTING_KEY_MESSAGE}")
    if state == "fallback":
        log.warning(REKEY_REMINDER)
    runtime.secret_key_checked = True


worker_init.connect(
    _refuse_a_key_that_does_not_decrypt, weak=False, dispatch_uid="synthguard-refuse-undecrypting-key"
)


def _share_cpu_threads(processes: int) -> None:
    """Give each worker child its share of the CPU cores for torch's intra-op threads.

    By default every child would use all cores, and N children would oversubscribe the machine N times.
    """
    if processes <= 1:
        return
    import torch  # noqa: PLC0415 - only in a worker child, after fork

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app for ``settings`` with synthguard's tasks registered."""
    app = Celery("synthguard", broker=settings.broker_url, include=list(TASK_MODULES), set_as_current=False)
    app.conf.update(
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        # Redis down at start or later: keep retrying instead of exiting into a crash loop.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_default_queue=settings.queue_name,
        # Declared, so that a plain `celery -A worker.celery worker` (no --queues) consumes both, as
        # `synthguard worker` does; the same exchange and routing key Celery gives a queue it creates itself.
        task_queues=[Queue(name, Exchange(name), routing_key=name) for name in settings.worker_queues],
        task_routes=webhook_task_routes(settings),
        task_time_limit=settings.task_time_limit_s,
        enable_utc=True,
        timezone="UTC",
        worker_hijack_root_logger=False,
        worker_proc_alive_timeout=CHILD_START_TIMEOUT_S,
    )
    runtime = WorkerRuntime(settings)
    _RUNTIMES[app] = runtime

    def _init_child(**_signal_kwargs: Any) -> None:
        runtime.after_fork()
        _share_cpu_threads(settings.worker_concurrency)
        runtime.detector  # noqa: B018 - load before the first task, in the child, never in the parent

    worker_process_init.connect(_init_child, weak=False, dispatch_uid=f"synthguard-init-{id(app)}")
    # Register the tasks on this app now, so send_task/apply_async work without a worker finalising it.
    for module in TASK_MODULES:
        importlib.import_module(module)
    app.finalize()
    return app


__all__ = [
    "REKEY_REMINDER",
    "UNDECRYPTING_KEY_MESSAGE",
    "WorkerRuntime",
    "create_celery_app",
    "load_detector",
    "runtime_for",
    "verify_detector",
]
