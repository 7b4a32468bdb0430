"""Webhook delivery against a real receiver on 127.0.0.1 and real PostgreSQL (state machine called directly).

The Celery task and the sweep are exercised in test_webhooks_tasks.py with a real worker.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from db.base import utcnow
from db.session import session_scope
from db.webhook_tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tests.worker.webhook_helpers import (
    Script,
    add_checked_image,
    drive,
    fast_settings,
    load_delivery,
)
from worker import outbox
from worker.webhook_delivery import deliver_now, redeliver
from worker.webhook_endpoints import (
    create_endpoint,
    reveal_client_secret,
    rotate_client_secret,
    rotate_endpoint_secret,
)
from worker.webhooks import SecretCipher, generate_secret

pytestmark = pytest.mark.usefixtures("pg_clean")


def _endpoint(factory, settings, url, *, client="acme", events=None):
    with session_scope(factory) as session:
        endpoint, secret = create_endpoint(
            session, SecretCipher(settings.require_secret_key()), url=url, client=client, events=events
        )
        return endpoint.id, secret


def _flag(factory, **kwargs):
    with session_scope(factory) as session:
        check, verdict = add_checked_image(session, **kwargs)
        return check.id, outbox.record_check_events(session, check, verdict)


def test_flagged_check_gives_one_delivery_that_standardwebhooks_verifies(pg_session_factory, fast, receiver):
    script = Script((204, {}))
    receiver.expect_request("/hook", method="POST").respond_with_handler(script)
    endpoint_id, secret = _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))

    check_id, ids = _flag(pg_session_factory)
    assert len(ids) == 1
    steps = drive(pg_session_factory, ids[0], fast)
    assert [s.status for s in steps] == ["succeeded"]

    assert len(script.requests) == 1
    headers, body = script.requests[0]
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "check.flagged"
    assert payload["data"]["check_id"] == str(check_id)
    assert payload["data"]["verdict"] == "generated"
    assert payload["data"]["evidence_summary"] == {"grid": {"period8_peak": 4.5}}
    assert "threshold" not in body.decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)

    delivery = load_delivery(pg_session_factory, ids[0])
    assert delivery.status == "succeeded" and delivery.endpoint_id == endpoint_id
    assert [(a.outcome, a.status_code) for a in delivery.attempts] == [("succeeded", 204)]
    assert delivery.attempts[0].latency_ms >= 0
    assert headers["webhook-id"] == delivery.message_id


def test_receiver_failing_twice_then_succeeding_gets_three_attempts(pg_session_factory, fast, receiver):
    script = Script((503, {}), (500, {}), (200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))
    _, ids = _flag(pg_session_factory)

    steps = drive(pg_session_factory, ids[0], fast)
    assert [s.status for s in steps] == ["pending", "pending", "succeeded"]
    delivery = load_delivery(pg_session_factory, ids[0])
    assert [(a.attempt_number, a.outcome, a.status_code) for a in delivery.attempts] == [
        (1, "retry", 503),
        (2, "retry", 500),
        (3, "succeeded", 200),
    ]
    assert sum(a.outcome == "succeeded" for a in delivery.attempts) == 1
    assert delivery.attempts[0].error == "HTTP 503" and delivery.attempts[0].response_excerpt == "nope"
    # The receiver's idempotency key does not change across retries.
    assert len(script.requests) == 3
    assert len({headers["webhook-id"] for headers, _ in script.requests}) == 1
    with session_scope(pg_session_factory) as session:
        endpoint = session.scalars(sa.select(WebhookEndpoint)).one()
        assert endpoint.failing_since is None and endpoint.enabled


def test_retry_after_is_honoured(pg_session_factory, fast, receiver):
    receiver.expect_request("/hook").respond_with_handler(Script((429, {"Retry-After": "1"}), (200, {})))
    _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))
    _, ids = _flag(pg_session_factory)
    steps = drive(pg_session_factory, ids[0], fast)
    assert steps[0].status == "pending" and steps[0].retry_in_s == 1.0  # not the schedule's 0.05 s
    assert steps[-1].status == "succeeded"


def test_schedule_exhausted_ends_failed(pg_session_factory, settings, receiver):
    receiver.expect_request("/hook").respond_with_data("down", status=502)
    _endpoint(pg_session_factory, settings, receiver.url_for("/hook"))
    _, ids = _flag(pg_session_factory)
    fast3 = fast_settings(settings, webhook_retry_delays_s=(0.0, 0.01, 0.01))
    steps = drive(pg_session_factory, ids[0], fast3)
    assert [s.status for s in steps] == ["pending", "pending", "failed"]
    delivery = load_delivery(pg_session_factory, ids[0])
    assert delivery.status == "failed" and "gave up after 3 attempts" in (delivery.last_error or "")
    assert len(delivery.attempts) == 3


def test_410_disables_the_endpoint(pg_session_factory, fast, receiver):
    receiver.expect_request("/hook").respond_with_data("gone", status=410)
    endpoint_id, _ = _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))
    _, ids = _flag(pg_session_factory)
    steps = drive(pg_session_factory, ids[0], fast)
    assert [s.status for s in steps] == ["failed"]
    with session_scope(pg_session_factory) as session:
        endpoint = session.get_one(WebhookEndpoint, endpoint_id)
        assert not endpoint.enabled
        assert "410" in (endpoint.disabled_reason or "")
        # A disabled endpoint gets no new deliveries, and its delivery cannot be replayed until re-enabled.
        check, verdict = add_checked_image(session)
        assert outbox.record_check_events(session, check, verdict) == []
        with pytest.raises(ValueError, match="disabled"):
            redeliver(session, ids[0], now=utcnow())


def test_other_4xx_fails_without_retry(pg_session_factory, fast, receiver):
    receiver.expect_request("/hook").respond_with_data("bad", status=400)
    endpoint_id, _ = _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))
    _, ids = _flag(pg_session_factory)
    assert [s.status for s in drive(pg_session_factory, ids[0], fast)] == ["failed"]
    with session_scope(pg_session_factory) as session:
        assert session.get_one(WebhookEndpoint, endpoint_id).enabled


def test_hanging_receiver_times_out_and_is_retried(pg_session_factory, settings, receiver):
    short = fast_settings(settings, webhook_timeout_s=0.5)
    script = Script((200, {}, 3.0), (200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    _endpoint(pg_session_factory, short, receiver.url_for("/hook"))
    _, ids = _flag(pg_session_factory)

    steps = drive(pg_session_factory, ids[0], short)
    assert [s.status for s in steps] == ["pending", "succeeded"]
    delivery = load_delivery(pg_session_factory, ids[0])
    first, second = delivery.attempts
    assert first.outcome == "retry" and first.status_code is None
    assert "timeout after 0.5 s" in (first.error or "")
    assert first.latency_ms < 3000  # gave up before the receiver answered
    assert second.outcome == "succeeded"


def test_endpoint_failing_for_days_is_disabled_with_a_reason(pg_session_factory, fast, receiver):
    receiver.expect_request("/hook").respond_with_data("down", status=503)
    endpoint_id, _ = _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))
    with session_scope(pg_session_factory) as session:
        session.get_one(WebhookEndpoint, endpoint_id).failing_since = utcnow() - timedelta(days=6)
    _, ids = _flag(pg_session_factory)
    steps = drive(pg_session_factory, ids[0], fast)
    assert [s.status for s in steps] == ["failed"]
    with session_scope(pg_session_factory) as session:
        endpoint = session.get_one(WebhookEndpoint, endpoint_id)
        assert not endpoint.enabled
        assert "every attempt failed since" in (endpoint.disabled_reason or "")
        assert "HTTP 503" in (endpoint.disabled_reason or "")


def test_rotation_signs_with_old_and_new_secret(pg_session_factory, fast, receiver):
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    endpoint_id, old_secret = _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))
    with session_scope(pg_session_factory) as session:
        _, rotation = rotate_endpoint_secret(
            session, SecretCipher(fast.require_secret_key()), endpoint_id, overlap_s=3600
        )
        new_secret = rotation.secret
    assert new_secret != old_secret
    _, ids = _flag(pg_session_factory)
    drive(pg_session_factory, ids[0], fast)

    headers, body = script.requests[0]
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old_secret).verify(body, headers)
    Webhook(new_secret).verify(body, headers)

    # Once the overlap has passed only the new secret signs.
    with session_scope(pg_session_factory) as session:
        session.get_one(WebhookEndpoint, endpoint_id).previous_secret_expires_at = utcnow() - timedelta(
            seconds=1
        )
    _, ids = _flag(pg_session_factory)
    drive(pg_session_factory, ids[0], fast)
    headers, body = script.requests[1]
    Webhook(new_secret).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old_secret).verify(body, headers)


def test_callback_url_is_signed_with_the_client_secret(pg_session_factory, fast, receiver):
    script = Script((200, {}))
    receiver.expect_request("/cb").respond_with_handler(script)
    _, ids = _flag(pg_session_factory, callback_url=receiver.url_for("/cb"))
    assert len(ids) == 1
    drive(pg_session_factory, ids[0], fast)
    with session_scope(pg_session_factory) as session:
        secret = reveal_client_secret(session, SecretCipher(fast.require_secret_key()), "acme")
    headers, body = script.requests[0]
    assert Webhook(secret).verify(body, headers)["type"] == "check.flagged"


def test_client_secret_rotation_signs_callbacks_with_old_and_new_secret(pg_session_factory, fast, receiver):
    """Receivers of callback URLs switch secrets one at a time: during the overlap both verify."""
    script = Script((200, {}))
    receiver.expect_request("/cb").respond_with_handler(script)
    cipher = SecretCipher(fast.require_secret_key())
    with session_scope(pg_session_factory) as session:
        old_secret = reveal_client_secret(session, cipher, "acme")
        new_secret = rotate_client_secret(session, cipher, "acme", overlap_s=3600).secret
    assert new_secret != old_secret
    _, ids = _flag(pg_session_factory, callback_url=receiver.url_for("/cb"))
    drive(pg_session_factory, ids[0], fast)

    headers, body = script.requests[0]
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old_secret).verify(body, headers)
    Webhook(new_secret).verify(body, headers)


@pytest.mark.parametrize(
    ("host", "reason"), [("127.0.0.1", "loopback"), ("169.254.169.254", "cloud metadata endpoint")]
)
def test_callback_to_private_address_is_refused_without_allowlist(
    pg_session_factory, settings, receiver, host, reason
):
    script = Script((200, {}))
    receiver.expect_request("/cb").respond_with_handler(script)
    url = receiver.url_for("/cb").replace("127.0.0.1", host)
    locked = fast_settings(settings, allow_private_hosts="")
    _, ids = _flag(pg_session_factory, callback_url=url)

    steps = drive(pg_session_factory, ids[0], locked)
    assert [s.status for s in steps] == ["failed"]
    assert script.requests == []
    with session_scope(pg_session_factory) as session:
        attempt = session.scalars(sa.select(WebhookAttempt).where(WebhookAttempt.delivery_id == ids[0])).one()
        assert attempt.outcome == "failed" and attempt.status_code is None
        assert attempt.error is not None and attempt.error.startswith("refused:")
        assert reason in attempt.error and host in attempt.error


@pytest.mark.parametrize("url", ["https://xn--/cb", "http://hooks.example:8080:9/cb"])
def test_a_malformed_callback_url_ends_failed_with_a_recorded_attempt(pg_session_factory, fast, url):
    _, ids = _flag(pg_session_factory, callback_url=url)
    steps = drive(pg_session_factory, ids[0], fast)
    assert [s.status for s in steps] == ["failed"]
    with session_scope(pg_session_factory) as session:
        attempt = session.scalars(sa.select(WebhookAttempt).where(WebhookAttempt.delivery_id == ids[0])).one()
        assert attempt.error is not None and attempt.error.startswith("malformed URL:"), attempt.error


def test_a_redirect_to_a_malformed_host_ends_failed(pg_session_factory, fast, receiver):
    script = Script((301, {"Location": "http://xn--/cb"}))
    receiver.expect_request("/cb").respond_with_handler(script)
    _, ids = _flag(pg_session_factory, callback_url=receiver.url_for("/cb"))
    steps = drive(pg_session_factory, ids[0], fast)
    assert [s.status for s in steps] == ["failed"]
    assert len(script.requests) == 1
    with session_scope(pg_session_factory) as session:
        attempt = session.scalars(sa.select(WebhookAttempt).where(WebhookAttempt.delivery_id == ids[0])).one()
        assert attempt.error is not None and attempt.error.startswith("malformed URL:"), attempt.error


def test_redeliver_sends_the_same_event_again(pg_session_factory, fast, receiver):
    script = Script((400, {}), (200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))
    _, ids = _flag(pg_session_factory)
    assert drive(pg_session_factory, ids[0], fast)[-1].status == "failed"
    with session_scope(pg_session_factory) as session:
        redeliver(session, ids[0], now=utcnow())
    assert drive(pg_session_factory, ids[0], fast)[-1].status == "succeeded"
    (h1, b1), (h2, b2) = script.requests
    assert h1["webhook-id"] == h2["webhook-id"] and b1 == b2
    assert [a.attempt_number for a in load_delivery(pg_session_factory, ids[0]).attempts] == [1, 2]


def test_state_machine_on_sqlite(sqlite_url, settings, receiver):
    """The embedded default: the same outbox, claim, retry and sweep queries on a SQLite file."""
    from db.session import make_engine, make_session_factory
    from worker.webhook_delivery import due_delivery_ids

    script = Script((503, {}), (200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    engine = make_engine(sqlite_url)
    try:
        factory = make_session_factory(engine)
        lite = fast_settings(settings, database_url=sqlite_url)
        endpoint_id, secret = _endpoint(factory, lite, receiver.url_for("/hook"))
        _, ids = _flag(factory)
        with session_scope(factory) as session:
            assert due_delivery_ids(session, now=utcnow(), grace_s=0) == ids
        first = deliver_now(factory, lite, ids)
        assert [s.status for s in first] == ["pending"]
        # Not due yet: the call claims nothing and sends nothing; once due, it is sent.
        with session_scope(factory) as session:
            due_at = utcnow() + timedelta(seconds=60)
            session.get_one(WebhookDelivery, ids[0]).next_attempt_at = due_at
        assert [s.status for s in deliver_now(factory, lite, ids)] == ["skipped"]
        assert len(script.requests) == 1
        with session_scope(factory) as session:
            assert due_delivery_ids(session, now=utcnow(), grace_s=0) == []
            session.get_one(WebhookDelivery, ids[0]).next_attempt_at = utcnow()
        steps = drive(factory, ids[0], lite)
        assert steps[-1].status == "succeeded"
        delivery = load_delivery(factory, ids[0])
        assert [a.outcome for a in delivery.attempts] == ["retry", "succeeded"]
        assert delivery.endpoint_id == endpoint_id
        headers, body = script.requests[-1]
        Webhook(secret).verify(body, headers)
    finally:
        engine.dispose()


def test_only_one_worker_can_claim_a_delivery(pg_session_factory, fast, receiver):
    from worker.webhook_delivery import claim_delivery

    _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))
    _, ids = _flag(pg_session_factory)
    now = utcnow()
    with session_scope(pg_session_factory) as session:
        assert claim_delivery(session, ids[0], now=now, lease_s=60)
    with session_scope(pg_session_factory) as session:
        assert not claim_delivery(session, ids[0], now=now, lease_s=60)
        # A leased row is not swept either; once the lease has expired (worker died mid-send), it is.
        assert due_delivery_ids_now(session, grace_s=0) == []
        assert due_delivery_ids_now(session, grace_s=0, later_s=120) == ids
        assert claim_delivery(session, ids[0], now=now + timedelta(seconds=120), lease_s=60)


def due_delivery_ids_now(session, *, grace_s, later_s=0.0):
    from worker.webhook_delivery import due_delivery_ids

    return due_delivery_ids(session, now=utcnow() + timedelta(seconds=later_s), grace_s=grace_s)


def test_secrets_are_neither_in_the_database_nor_in_the_logs(pg_session_factory, fast, receiver, caplog):
    import logging

    receiver.expect_request("/hook").respond_with_handler(Script((500, {}), (200, {})))
    caplog.set_level(logging.DEBUG)
    endpoint_id, secret = _endpoint(pg_session_factory, fast, receiver.url_for("/hook"))
    with session_scope(pg_session_factory) as session:
        _, rotation = rotate_endpoint_secret(
            session, SecretCipher(fast.require_secret_key()), endpoint_id, overlap_s=60
        )
        new_secret = rotation.secret
    _, ids = _flag(pg_session_factory, callback_url=receiver.url_for("/hook"))
    for delivery_id in ids:
        drive(pg_session_factory, delivery_id, fast)
    with session_scope(pg_session_factory) as session:
        client_secret = reveal_client_secret(session, SecretCipher(fast.require_secret_key()), "acme")
        dump = " ".join(
            session.scalars(
                sa.text(
                    "SELECT row_to_json(t)::text FROM webhook_endpoints t UNION ALL "
                    "SELECT row_to_json(t)::text FROM webhook_client_secrets t UNION ALL "
                    "SELECT row_to_json(t)::text FROM webhook_deliveries t UNION ALL "
                    "SELECT row_to_json(t)::text FROM webhook_attempts t"
                )
            )
        )
    assert endpoint_id and str(endpoint_id) in dump  # the dump is real
    for plaintext in (secret, new_secret, client_secret):
        core = plaintext.removeprefix("whsec_")
        assert core not in dump
        assert core not in caplog.text
