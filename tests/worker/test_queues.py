"""A flagged image's notification does not wait behind the upload backlog.

Webhook tasks have a queue of their own (``Settings.webhook_queue_name``) that the same workers consume; in
one FIFO queue a delivery would be sent only after every upload queued before it was analysed.
"""

from __future__ import annotations

import base64
import io
import time
import uuid

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from db.session import session_scope
from db.tables import Check
from db.webhook_tables import WebhookAttempt
from tests.worker.webhook_helpers import Script, add_checked_image, fast_settings
from tests.workers import in_process_worker
from worker import outbox
from worker.webhook_endpoints import create_endpoint
from worker.webhooks import SecretCipher

pytestmark = pytest.mark.usefixtures("pg_clean")

BACKLOG = 6
WAIT_S = 300.0


def _png_b64(seed: int) -> str:
    pixels = (np.random.default_rng(seed).random((160, 160, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture
def queue_app(settings):
    """An app on queues of its own; a sweep that never runs, so a delivery travels only as its own message."""
    from worker.app import create_celery_app, runtime_for

    app = create_celery_app(
        fast_settings(
            settings,
            queue_name=f"synthguard-test-queues-{uuid.uuid4().hex[:8]}",
            webhook_sweep_interval_s=3600.0,
            webhook_sweep_grace_s=3600.0,
        )
    )
    yield app
    runtime_for(app).engine.dispose()


@pytest.fixture
def delivery(pg_session_factory, settings, receiver) -> tuple[uuid.UUID, Script]:
    """A committed check.flagged delivery to the receiver, not yet enqueued, and the receiver's script."""
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    with session_scope(pg_session_factory) as session:
        cipher = SecretCipher(settings.require_secret_key())
        create_endpoint(session, cipher, url=receiver.url_for("/hook"), client="acme")
        check, verdict = add_checked_image(session)
        (delivery_id,) = outbox.record_check_events(session, check, verdict)
    return delivery_id, script


def test_a_delivery_is_sent_before_the_backlog_queued_ahead_of_it(
    pg_session_factory, detector, queue_app, delivery
):
    from worker.app import runtime_for
    from worker.tasks import enqueue_deliveries

    runtime_for(queue_app).set_detector(detector)
    queue_settings = runtime_for(queue_app).settings
    delivery_id, script = delivery
    # The backlog first, then the delivery: all waiting before any worker runs.
    for n in range(BACKLOG):
        queue_app.send_task(
            "synthguard.check_image",
            kwargs={"image_b64": _png_b64(n), "external_id": f"backlog-{n}", "client": "backlog"},
        )
    enqueue_deliveries(queue_app, [delivery_id])

    # One task at a time, in the order the worker takes them from its queues.
    with in_process_worker(queue_app, pool="solo", concurrency=1, queues=list(queue_settings.worker_queues)):
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with session_scope(pg_session_factory) as session:
                finished = session.scalars(
                    sa.select(Check.finished_at).where(
                        Check.client == "backlog", Check.finished_at.is_not(None)
                    )
                ).all()
            if len(finished) == BACKLOG:
                break
            time.sleep(0.2)
    assert len(finished) == BACKLOG, f"backlog not processed within {WAIT_S} s"
    with session_scope(pg_session_factory) as session:
        (sent_at,) = session.scalars(
            sa.select(WebhookAttempt.attempted_at).where(WebhookAttempt.delivery_id == delivery_id)
        ).all()
    assert len(script.requests) == 1
    # In one FIFO queue all six checks would finish first; taking the queues in turn, at most one does.
    assert sum(finished_at < sent_at for finished_at in finished) <= 1


@pytest.mark.parametrize(
    "only_checks_queue",
    [
        pytest.param(False, id="no -Q: the declared task_queues"),
        pytest.param(True, id="-Q <queue name>: how workers were started before webhooks had a queue"),
    ],
)
def test_a_worker_started_without_naming_the_webhook_queue_still_delivers(
    queue_app, delivery, only_checks_queue
):
    from worker.app import runtime_for
    from worker.tasks import enqueue_deliveries

    delivery_id, script = delivery
    enqueue_deliveries(queue_app, [delivery_id])
    queues = [runtime_for(queue_app).settings.queue_name] if only_checks_queue else None
    with in_process_worker(queue_app, pool="solo", concurrency=1, queues=queues):
        deadline = time.monotonic() + WAIT_S
        while not script.requests and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(script.requests) == 1
