"""Receivers whose answers PostgreSQL cannot store as they are: gzip-encoded and binary bodies.

Real receiver on 127.0.0.1 and real PostgreSQL (text columns refuse NUL, which SQLite would have accepted).
Before the fix, each of these attempts raised psycopg DataError while being recorded, so the delivery stayed
pending with no attempt and the sweep re-sent it for ever although the receiver had answered 200.
"""

from __future__ import annotations

import gzip
from typing import Any

import pytest
import sqlalchemy as sa
from werkzeug import Request, Response

from db.session import session_scope
from db.webhook_tables import WebhookDelivery
from tests.worker.webhook_helpers import add_checked_image, drive, fast_settings, load_delivery
from worker import outbox, webhook_delivery, webhooks
from worker.webhook_delivery import deliver_now
from worker.webhook_endpoints import create_endpoint, create_ping_delivery
from worker.webhooks import SecretCipher

pytestmark = pytest.mark.usefixtures("pg_clean")

ANSWER = b'{"received": true}'


class Answering:
    """Answers every request with ``status`` and ``body``; gzip-compresses it when the request allows gzip
    (``nginx gzip on``) or, with ``force_gzip``, always (a misconfigured or hostile receiver)."""

    def __init__(self, status: int, body: bytes, *, force_gzip: bool = False) -> None:
        self.status = status
        self.body = body
        self.force_gzip = force_gzip
        self.accept_encodings: list[str | None] = []

    def __call__(self, request: Request) -> Any:
        accept = request.headers.get("accept-encoding")
        self.accept_encodings.append(accept)
        if self.force_gzip or "gzip" in (accept or ""):
            return Response(
                gzip.compress(self.body), status=self.status, headers={"content-encoding": "gzip"}
            )
        return Response(self.body, status=self.status)


def _endpoint_and_event(factory, settings, url) -> list:
    with session_scope(factory) as session:
        create_endpoint(session, SecretCipher(settings.require_secret_key()), url=url, client="acme")
        check, verdict = add_checked_image(session)
        return outbox.record_check_events(session, check, verdict)


def test_a_receiver_that_compresses_when_allowed_gets_asked_for_identity(pg_session_factory, fast, receiver):
    answering = Answering(200, ANSWER)
    receiver.expect_request("/hook").respond_with_handler(answering)
    ids = _endpoint_and_event(pg_session_factory, fast, receiver.url_for("/hook"))

    steps = drive(pg_session_factory, ids[0], fast)

    assert [s.status for s in steps] == ["succeeded"]
    assert answering.accept_encodings == ["identity"]
    delivery = load_delivery(pg_session_factory, ids[0])
    assert delivery.status == "succeeded" and delivery.attempt_count == 1
    assert [(a.outcome, a.status_code, a.response_excerpt) for a in delivery.attempts] == [
        ("succeeded", 200, ANSWER.decode())
    ]


def test_a_gzip_answer_sent_anyway_is_recorded_decoded(pg_session_factory, fast, receiver):
    receiver.expect_request("/hook").respond_with_handler(Answering(200, ANSWER, force_gzip=True))
    ids = _endpoint_and_event(pg_session_factory, fast, receiver.url_for("/hook"))

    steps = drive(pg_session_factory, ids[0], fast)

    assert [s.status for s in steps] == ["succeeded"]
    delivery = load_delivery(pg_session_factory, ids[0])
    assert delivery.status == "succeeded" and delivery.lease_expires_at is None
    (attempt,) = delivery.attempts
    assert attempt.status_code == 200 and attempt.response_excerpt == ANSWER.decode()


def test_a_binary_answer_with_nul_and_escapes_is_stored_readable(pg_session_factory, fast, receiver):
    body = b"ok\x00\x01\x1b]0;title\x07\x1b[2J\xff\xfe line two\r\n\ttabbed\n"
    receiver.expect_request("/hook").respond_with_handler(Answering(200, body))
    ids = _endpoint_and_event(pg_session_factory, fast, receiver.url_for("/hook"))

    steps = drive(pg_session_factory, ids[0], fast)

    assert [s.status for s in steps] == ["succeeded"]
    (attempt,) = load_delivery(pg_session_factory, ids[0]).attempts
    excerpt = attempt.response_excerpt or ""
    assert excerpt.startswith("ok") and "line two\n\ttabbed\n" in excerpt
    assert not any(ord(char) < 0x20 and char not in "\n\t" for char in excerpt), repr(excerpt)
    assert "\x1b" not in excerpt and "\x00" not in excerpt and "\r" not in excerpt


def test_ping_to_a_401_gzip_receiver_ends_failed_with_its_reason(pg_session_factory, fast, receiver):
    """``synthguard webhooks test`` against a receiver refusing the signature with a compressed body."""
    receiver.expect_request("/hook").respond_with_handler(
        Answering(401, b'{"error": "bad signature"}', force_gzip=True)
    )
    with session_scope(pg_session_factory) as session:
        endpoint, _ = create_endpoint(
            session, SecretCipher(fast.require_secret_key()), url=receiver.url_for("/hook"), client="acme"
        )
        ping_id = create_ping_delivery(session, endpoint.id).id

    (step,) = deliver_now(pg_session_factory, fast, [ping_id])

    assert step.status == "failed" and step.detail == "HTTP 401"
    delivery = load_delivery(pg_session_factory, ping_id)
    assert delivery.status == "failed" and delivery.last_error == "HTTP 401"
    assert [(a.status_code, a.response_excerpt) for a in delivery.attempts] == [
        (401, '{"error": "bad signature"}')
    ]


def test_an_attempt_whose_texts_cannot_be_stored_still_records_its_outcome(
    pg_session_factory, fast, receiver, monkeypatch
):
    """Defence in depth: if a text still reaches PostgreSQL with a NUL (here the cleaning is switched off),
    the outcome is stored without the texts instead of leaving the delivery to be re-sent for ever."""
    receiver.expect_request("/hook").respond_with_handler(Answering(503, b"busy\x00", force_gzip=False))
    ids = _endpoint_and_event(pg_session_factory, fast, receiver.url_for("/hook"))
    for module in (webhooks, webhook_delivery):
        monkeypatch.setattr(module, "storable_text", lambda text, _max_chars: text)

    steps = drive(pg_session_factory, ids[0], fast_settings(fast, webhook_retry_delays_s=(0.0,)))

    assert [s.status for s in steps] == ["failed"]
    delivery = load_delivery(pg_session_factory, ids[0])
    assert delivery.status == "failed" and delivery.lease_expires_at is None
    (attempt,) = delivery.attempts
    assert (attempt.outcome, attempt.status_code, attempt.response_excerpt) == ("retry", 503, None)
    assert attempt.error == "HTTP 503; the attempt's error and response texts could not be stored"
    assert delivery.last_error is not None and delivery.last_error.startswith(attempt.error)
    with session_scope(pg_session_factory) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(WebhookDelivery)) == 1
