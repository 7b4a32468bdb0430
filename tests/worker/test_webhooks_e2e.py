"""End to end: ``synthguard.check_image`` on a real Celery worker with the real detector, through the
pipeline's outbox, to a callback receiver on 127.0.0.1 that verifies the Standard Webhooks signature."""

from __future__ import annotations

import base64
import io
import time
import uuid

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from standardwebhooks.webhooks import Webhook

from db.session import session_scope
from db.tables import Check, Client
from db.webhook_tables import WebhookDelivery
from tests.worker.webhook_helpers import Script
from worker.webhook_endpoints import reveal_client_secret
from worker.webhooks import SecretCipher

pytestmark = pytest.mark.usefixtures("pg_clean")

WAIT_S = 180.0


@pytest.fixture(scope="module")
def celery_app(settings):
    """The session's app, except that the webhook sweep waits a day before it sends a delivery itself: a
    callback can then only come from the task the worker enqueues after committing the outbox row, the path
    this test is about (with the default grace the sweep would deliver a minute later and hide its loss).

    Overrides conftest's ``celery_app`` for this module, so ``celery_worker`` runs this app.
    """
    from worker.app import create_celery_app, runtime_for

    app = create_celery_app(
        settings.model_copy(
            update={
                "webhook_sweep_grace_s": 86400.0,
                "queue_name": f"synthguard-test-e2e-{uuid.uuid4().hex[:8]}",
            }
        )
    )
    yield app
    runtime_for(app).engine.dispose()


def _png() -> str:
    rng = np.random.default_rng(7)
    pixels = (rng.random((192, 256, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_flagged_check_calls_back_once_with_a_verifiable_signature(
    pg_session_factory, settings, celery_app, celery_worker, receiver
):
    script = Script((200, {}))
    receiver.expect_request("/callback").respond_with_handler(script)
    with session_scope(pg_session_factory) as session:
        # A client threshold of 0 flags every verdict, so the test does not depend on what the model says.
        session.add(Client(name="e2e", flag_threshold=0.0))
        secret = reveal_client_secret(session, SecretCipher(settings.require_secret_key()), "e2e")
    external_id = f"upload-{uuid.uuid4().hex[:8]}"
    celery_app.send_task(
        "synthguard.check_image",
        kwargs={
            "image_b64": _png(),
            "external_id": external_id,
            "client": "e2e",
            "callback_url": receiver.url_for("/callback"),
        },
    )

    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not script.requests:
        time.sleep(0.2)
    assert script.requests, f"no callback within {WAIT_S} s (the sweep is held off: only the enqueue sends)"
    time.sleep(1.0)  # room for a duplicate to show up, if the outbox wrote one
    assert len(script.requests) == 1

    headers, body = script.requests[0]
    payload = Webhook(secret).verify(body, headers)
    with session_scope(pg_session_factory) as session:
        check = session.scalars(sa.select(Check).where(Check.external_id == external_id)).one()
        deliveries = session.scalars(
            sa.select(WebhookDelivery).where(WebhookDelivery.check_id == check.id)
        ).all()
        assert [(d.event_type, d.status, d.message_id) for d in deliveries] == [
            ("check.flagged", "succeeded", headers["webhook-id"])
        ]
        assert payload["type"] == "check.flagged"
        assert payload["data"]["check_id"] == str(check.id)
        assert payload["data"]["external_id"] == external_id
        assert payload["data"]["score"] == pytest.approx(check.verdict.score, abs=1e-4)
        assert payload["data"]["verdict"] == check.verdict.verdict
