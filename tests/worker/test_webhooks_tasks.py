"""The webhook tasks on a real Celery worker (Redis) against real PostgreSQL and a receiver on 127.0.0.1.

The worker here is the production app built from test settings with a tiny retry schedule and a fast sweep;
it uses the threads pool, so no detector is loaded (these tasks never detect anything).
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from standardwebhooks.webhooks import Webhook

from db.session import session_scope
from db.webhook_tables import WebhookDelivery
from tests.worker.webhook_helpers import Script, add_checked_image, fast_settings
from tests.workers import in_process_worker
from worker import outbox
from worker.webhook_endpoints import create_endpoint
from worker.webhooks import SecretCipher

pytestmark = pytest.mark.usefixtures("pg_clean")

WAIT_S = 60.0


@pytest.fixture(scope="module")
def webhook_settings(settings):
    return fast_settings(
        settings,
        queue_name=f"synthguard-test-webhooks-{uuid.uuid4().hex[:8]}",
        webhook_sweep_interval_s=0.3,
        webhook_sweep_grace_s=0.0,
    )


@pytest.fixture(scope="module")
def webhook_app(webhook_settings):
    from worker.app import create_celery_app, runtime_for

    app = create_celery_app(webhook_settings)
    yield app
    runtime_for(app).engine.dispose()


@pytest.fixture(scope="module")
def webhook_worker(webhook_app, webhook_settings):
    with in_process_worker(
        webhook_app,
        pool="threads",
        concurrency=2,
        queues=list(webhook_settings.worker_queues),
        shutdown_timeout=10.0,
    ) as worker:
        yield worker


def _wait_final(factory, delivery_id) -> WebhookDelivery:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with session_scope(factory) as session:
            delivery = session.get_one(WebhookDelivery, delivery_id)
            if delivery.status != "pending":
                _ = list(delivery.attempts)
                return delivery
        time.sleep(0.1)
    raise AssertionError(f"delivery {delivery_id} still pending after {WAIT_S} s")


def _flagged_delivery(factory, settings, url) -> tuple[uuid.UUID, str]:
    """Commit an outbox row for a flagged check and enqueue nothing, as if the worker died after commit."""
    with session_scope(factory) as session:
        _, secret = create_endpoint(
            session, SecretCipher(settings.require_secret_key()), url=url, client="acme"
        )
        check, verdict = add_checked_image(session)
        (delivery_id,) = outbox.record_check_events(session, check, verdict)
    return delivery_id, secret


def test_committed_but_never_enqueued_delivery_is_sent_by_the_sweep(
    pg_session_factory, webhook_settings, webhook_worker, receiver
):
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    delivery_id, secret = _flagged_delivery(pg_session_factory, webhook_settings, receiver.url_for("/hook"))

    delivery = _wait_final(pg_session_factory, delivery_id)
    assert delivery.status == "succeeded"
    assert [a.outcome for a in delivery.attempts] == ["succeeded"]
    headers, body = script.requests[0]
    assert Webhook(secret).verify(body, headers)["type"] == "check.flagged"


def test_task_retries_until_the_receiver_recovers(
    pg_session_factory, webhook_settings, webhook_app, webhook_worker, receiver
):
    script = Script((503, {}), (502, {}), (200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    delivery_id, _ = _flagged_delivery(pg_session_factory, webhook_settings, receiver.url_for("/hook"))
    webhook_app.send_task("synthguard.deliver_webhook", kwargs={"delivery_id": str(delivery_id)})

    delivery = _wait_final(pg_session_factory, delivery_id)
    assert delivery.status == "succeeded"
    assert [(a.outcome, a.status_code) for a in delivery.attempts] == [
        ("retry", 503),
        ("retry", 502),
        ("succeeded", 200),
    ]
    assert len(script.requests) == 3


def test_invalid_delivery_id_is_dropped_and_the_worker_carries_on(
    pg_session_factory, webhook_settings, webhook_app, webhook_worker, receiver
):
    receiver.expect_request("/hook").respond_with_data("ok")
    webhook_app.send_task("synthguard.deliver_webhook", kwargs={"delivery_id": "not-a-uuid"})
    webhook_app.send_task("synthguard.deliver_webhook", kwargs={"delivery_id": str(uuid.uuid4())})
    delivery_id, _ = _flagged_delivery(pg_session_factory, webhook_settings, receiver.url_for("/hook"))
    webhook_app.send_task("synthguard.deliver_webhook", kwargs={"delivery_id": str(delivery_id)})
    assert _wait_final(pg_session_factory, delivery_id).status == "succeeded"


def test_webhook_tasks_skip_the_detection_backlog(settings):
    """Deliveries and sweeps go to the webhook queue; check batches to the detection queue behind them."""
    import redis

    from worker.app import create_celery_app, runtime_for
    from worker.tasks import enqueue_checks, enqueue_deliveries

    queue_name = f"synthguard-test-routes-{uuid.uuid4().hex[:8]}"
    app = create_celery_app(fast_settings(settings, queue_name=queue_name))
    app_settings = runtime_for(app).settings
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        assert enqueue_checks(app, [uuid.uuid4() for _ in range(3)], batch_size=1) == 3
        deliveries = [uuid.uuid4(), uuid.uuid4()]
        enqueue_deliveries(app, deliveries)
        app.send_task("synthguard.sweep_webhooks")
        assert broker.llen(app_settings.queue_name) == 3
        waiting = [json.loads(raw) for raw in broker.lrange(app_settings.webhook_queue_name, 0, -1)]
        tasks = sorted(message["headers"]["task"] for message in waiting)
        assert tasks == ["synthguard.deliver_webhook"] * 2 + ["synthguard.sweep_webhooks"]
        assert app_settings.worker_queues == (app_settings.queue_name, app_settings.webhook_queue_name)
    finally:
        broker.delete(app_settings.queue_name, app_settings.webhook_queue_name)
        broker.close()
        runtime_for(app).engine.dispose()


def test_a_stopped_worker_sends_no_more_sweeps(settings):
    """The sweep's timer entry ends with the worker, also on the cold shutdown the test harness uses.

    The worker consumes another queue, so the sweeps it sends stay countable in the webhook queue.
    """
    import redis

    from worker.app import create_celery_app, runtime_for

    app = create_celery_app(
        fast_settings(
            settings,
            queue_name=f"synthguard-test-sweep-{uuid.uuid4().hex[:8]}",
            webhook_sweep_interval_s=0.2,
        )
    )
    sweeps_queue = runtime_for(app).settings.webhook_queue_name
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        with in_process_worker(app, pool="solo", queues=[f"{sweeps_queue}-unused"], shutdown_timeout=10.0):
            deadline = time.monotonic() + WAIT_S
            while broker.llen(sweeps_queue) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert broker.llen(sweeps_queue) >= 2  # the sweep runs while the worker does
        broker.delete(sweeps_queue)
        time.sleep(1.0)  # five sweep intervals
        assert broker.llen(sweeps_queue) == 0
    finally:
        broker.delete(sweeps_queue)
        broker.close()
        runtime_for(app).engine.dispose()
