"""Webhook test helpers: rows for a checked image, a threaded local receiver, a delivery driver."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
from pytest_httpserver import HTTPServer
from sqlalchemy.orm import Session, sessionmaker

from db.session import session_scope
from db.tables import Check, Client, Evidence, Verdict
from db.webhook_tables import WebhookDelivery
from worker.settings import Settings
from worker.webhook_delivery import DeliveryConfig, DeliveryStep, deliver_once
from worker.webhooks import RetryPolicy, SecretCipher, make_webhook_client

# Tiny schedule for tests: the same state machine as production, with milliseconds instead of hours.
FAST_DELAYS = (0.0, 0.05, 0.05, 0.05, 0.05)


def run_receiver() -> Iterator[HTTPServer]:
    """A real HTTP receiver on 127.0.0.1; threaded, so a hanging handler does not block the next attempt.

    Test modules wrap it in a fixture: ``yield from run_receiver()``.
    """
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    try:
        yield server
    finally:
        server.clear()
        if server.is_running():
            server.stop()


def fast_settings(settings: Settings, **update: Any) -> Settings:
    values: dict[str, Any] = {"webhook_retry_delays_s": FAST_DELAYS, "webhook_retry_jitter": 0.0}
    values.update(update)
    return settings.model_copy(update=values)


def config_for(settings: Settings) -> DeliveryConfig:
    return DeliveryConfig(
        policy=RetryPolicy(tuple(settings.webhook_retry_delays_s), settings.webhook_retry_jitter),
        timeout_s=settings.webhook_timeout_s,
        disable_after_s=settings.webhook_disable_after_s,
    )


def cipher_for(settings: Settings) -> SecretCipher:
    return SecretCipher.from_settings(settings)


def client_for(settings: Settings) -> httpx.Client:
    return make_webhook_client(settings.allow_private_hosts, settings.webhook_timeout_s)


def add_checked_image(
    session: Session,
    *,
    client: str = "acme",
    verdict: str = "generated",
    score: float = 0.97,
    callback_url: str | None = None,
    flag_uncertain: bool = False,
    flag_threshold: float | None = None,
) -> tuple[Check, Verdict]:
    """A done check with its verdict and evidence, as the pipeline stores them."""
    if session.get(Client, client) is None:
        session.add(Client(name=client, flag_uncertain=flag_uncertain, flag_threshold=flag_threshold))
    verdict_row = Verdict(
        id=uuid.uuid4(),
        sha256=uuid.uuid4().hex * 2,
        model_name="synthguard-v1",
        model_version="1.0.0",
        weights_sha="abcdef123456" * 5 + "abcd",
        model_id="synthguard-v1@1.0.0+abcdef123456",
        score=score,
        verdict=verdict,
        family_scores={"diffusion": score, "gan": 0.0, "real": 1 - score},
        threshold=0.8,
        decided_by="pixels",
        reasons=[],
    )
    session.add(verdict_row)
    session.flush()
    session.add(Evidence(verdict_id=verdict_row.id, group_name="grid", data={"period8_peak": 4.5}))
    check = Check(
        id=uuid.uuid4(),
        client=client,
        external_id=f"upload-{uuid.uuid4().hex[:8]}",
        status="done",
        sha256=verdict_row.sha256,
        verdict_id=verdict_row.id,
        callback_url=callback_url,
    )
    session.add(check)
    session.flush()
    session.refresh(verdict_row)
    return check, verdict_row


def drive(
    factory: sessionmaker[Session],
    delivery_id: uuid.UUID,
    settings: Settings,
    *,
    http_client: httpx.Client | None = None,
    max_steps: int = 20,
) -> list[DeliveryStep]:
    """Call deliver_once until the delivery is final, waiting out each (tiny) scheduled delay."""
    client = http_client or client_for(settings)
    steps: list[DeliveryStep] = []
    try:
        for _ in range(max_steps):
            step = deliver_once(factory, delivery_id, client, cipher_for(settings), config_for(settings))
            steps.append(step)
            if step.status in ("succeeded", "failed"):
                return steps
            if step.status == "pending" and step.retry_in_s is not None:
                time.sleep(step.retry_in_s + 0.01)
            elif step.status == "skipped":
                time.sleep(0.05)
    finally:
        if http_client is None:
            client.close()
    raise AssertionError(f"delivery {delivery_id} not final after {max_steps} steps: {steps}")


def load_delivery(factory: sessionmaker[Session], delivery_id: uuid.UUID) -> WebhookDelivery:
    with session_scope(factory) as session:
        delivery = session.get_one(WebhookDelivery, delivery_id)
        _ = list(delivery.attempts)  # loaded before the session closes
        _ = delivery.endpoint
        return delivery


class Script:
    """A receiver handler answering each request from a list of (status, headers) in order (the last repeats),
    recording what arrived. ``hang_s`` on an entry makes that answer come only after a sleep."""

    def __init__(self, *answers: tuple[int, dict[str, str]] | tuple[int, dict[str, str], float]) -> None:
        self.answers = list(answers) or [(200, {})]
        self.requests: list[tuple[dict[str, str], bytes]] = []

    def __call__(self, request: Any) -> Any:
        from werkzeug import Response

        index = len(self.requests)
        self.requests.append(({k.lower(): v for k, v in request.headers.items()}, request.get_data()))
        answer = self.answers[min(index, len(self.answers) - 1)]
        if len(answer) == 3:
            time.sleep(answer[2])
        return Response("ok" if answer[0] < 300 else "nope", status=answer[0], headers=answer[1])
