"""Secrets after SYNTHGUARD_SECRET_KEY changed, and rotations that replace a secret still in its overlap.

Real receiver on 127.0.0.1 and real PostgreSQL. Secrets are stored under one key and read under another, as
when an operator changes or loses the key and rotates every secret to recover, or changes it with the old
key among the fallbacks and re-encrypts them.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta

import pytest
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from db.base import utcnow
from db.session import session_scope
from db.webhook_tables import WebhookClientSecret, WebhookEndpoint
from tests.worker.webhook_helpers import Script, add_checked_image, drive, fast_settings
from worker import outbox
from worker.webhook_endpoints import (
    create_endpoint,
    reencrypt_secrets,
    reveal_client_secret,
    rotate_client_secret,
    rotate_endpoint_secret,
)
from worker.webhooks import SecretCipher, generate_secret

pytestmark = pytest.mark.usefixtures("pg_clean")

DECRYPT_ERROR = (
    "cannot decrypt a stored webhook secret: was SYNTHGUARD_SECRET_KEY changed? (the key it was stored under "
    "belongs in SYNTHGUARD_SECRET_KEY_FALLBACKS)"
)


@pytest.fixture
def old_key(settings):
    """The deployment before the key changed."""
    return fast_settings(settings)


@pytest.fixture
def new_key(settings):
    """The same deployment after SYNTHGUARD_SECRET_KEY changed."""
    return fast_settings(settings, secret_key=SecretStr(secrets.token_hex(32)))


@pytest.fixture
def new_key_with_fallback(old_key, new_key):
    """The new key, with the old one in SYNTHGUARD_SECRET_KEY_FALLBACKS."""
    return new_key.model_copy(update={"secret_key_fallbacks": (old_key.secret_key,)})


def _cipher(settings):
    return SecretCipher.from_settings(settings)


def _event(factory, **kwargs):
    with session_scope(factory) as session:
        check, verdict = add_checked_image(session, **kwargs)
        return outbox.record_check_events(session, check, verdict)


def _endpoint(factory, settings, url):
    with session_scope(factory) as session:
        endpoint, secret = create_endpoint(session, _cipher(settings), url=url, client="acme")
        return endpoint.id, secret


def test_rotating_an_endpoint_secret_after_a_key_change_restores_deliveries(
    pg_session_factory, old_key, new_key, receiver
):
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    endpoint_id, _ = _endpoint(pg_session_factory, old_key, receiver.url_for("/hook"))
    with session_scope(pg_session_factory) as session:
        new_secret = rotate_endpoint_secret(session, _cipher(new_key), endpoint_id, overlap_s=86_400)[
            1
        ].secret

    ids = _event(pg_session_factory)
    steps = drive(pg_session_factory, ids[0], new_key)

    assert [s.status for s in steps] == ["succeeded"], steps
    headers, body = script.requests[0]
    assert len(headers["webhook-signature"].split(" ")) == 1
    Webhook(new_secret).verify(body, headers)
    with session_scope(pg_session_factory) as session:
        endpoint = session.get_one(WebhookEndpoint, endpoint_id)
        assert endpoint.previous_secret_encrypted is None and endpoint.previous_secret_expires_at is None


def test_the_rotation_says_it_dropped_an_undecryptable_secret(pg_session_factory, old_key, new_key):
    endpoint_id, _ = _endpoint(pg_session_factory, old_key, "https://hooks.example.com/x")
    with session_scope(pg_session_factory) as session:
        _, after_key_change = rotate_endpoint_secret(session, _cipher(new_key), endpoint_id, overlap_s=86_400)
        _, ordinary = rotate_endpoint_secret(session, _cipher(new_key), endpoint_id, overlap_s=86_400)

    assert after_key_change.undecryptable_dropped and after_key_change.previous_signs_until is None
    assert not ordinary.undecryptable_dropped and ordinary.previous_signs_until is not None
    assert ordinary.previous_signs_until > utcnow() + timedelta(hours=23)


def test_rotating_a_client_secret_after_a_key_change_restores_callbacks(
    pg_session_factory, old_key, new_key, receiver
):
    script = Script((200, {}))
    receiver.expect_request("/cb").respond_with_handler(script)
    with session_scope(pg_session_factory) as session:
        reveal_client_secret(session, _cipher(old_key), "acme")
        new_secret = rotate_client_secret(session, _cipher(new_key), "acme", overlap_s=86_400).secret

    ids = _event(pg_session_factory, callback_url=receiver.url_for("/cb"))
    steps = drive(pg_session_factory, ids[0], new_key)

    assert [s.status for s in steps] == ["succeeded"], steps
    headers, body = script.requests[0]
    Webhook(new_secret).verify(body, headers)
    with session_scope(pg_session_factory) as session:
        rotation = rotate_client_secret(session, _cipher(old_key), "acme", overlap_s=60)
        assert rotation.undecryptable_dropped and rotation.previous_signs_until is None
        assert session.get_one(WebhookClientSecret, "acme").previous_secret_encrypted is None


def test_an_undecryptable_previous_secret_is_left_out_with_a_warning(
    pg_session_factory, old_key, new_key, receiver, caplog
):
    """A previous secret stored under the old key (e.g. rotated by a worker that still had it)."""
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    endpoint_id, secret = _endpoint(pg_session_factory, new_key, receiver.url_for("/hook"))
    with session_scope(pg_session_factory) as session:
        endpoint = session.get_one(WebhookEndpoint, endpoint_id)
        endpoint.previous_secret_encrypted = _cipher(old_key).encrypt(generate_secret())
        endpoint.previous_secret_expires_at = utcnow() + timedelta(hours=1)
    caplog.set_level(logging.WARNING, logger="worker.webhook_delivery")

    ids = _event(pg_session_factory)
    steps = drive(pg_session_factory, ids[0], new_key)

    assert [s.status for s in steps] == ["succeeded"], steps
    headers, body = script.requests[0]
    Webhook(secret).verify(body, headers)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"endpoint {endpoint_id}" in warnings[0].getMessage()
    assert DECRYPT_ERROR in warnings[0].getMessage()


def test_an_undecryptable_current_secret_still_fails_with_the_reason(
    pg_session_factory, old_key, new_key, receiver
):
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    _endpoint(pg_session_factory, old_key, receiver.url_for("/hook"))

    ids = _event(pg_session_factory)
    steps = drive(pg_session_factory, ids[0], new_key)

    assert [(s.status, s.detail) for s in steps] == [("failed", DECRYPT_ERROR)]
    assert script.requests == []


def test_a_second_rotation_keeps_the_newest_two_secrets(pg_session_factory, old_key, receiver):
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    endpoint_id, original = _endpoint(pg_session_factory, old_key, receiver.url_for("/hook"))
    with session_scope(pg_session_factory) as session:
        _, first = rotate_endpoint_secret(session, _cipher(old_key), endpoint_id, overlap_s=3600)
    with session_scope(pg_session_factory) as session:
        _, second = rotate_endpoint_secret(session, _cipher(old_key), endpoint_id, overlap_s=3600)
    assert not first.overlapping_dropped  # the original had no overlap running
    assert second.overlapping_dropped  # the original was still signing until this rotation

    ids = _event(pg_session_factory)
    drive(pg_session_factory, ids[0], old_key)

    headers, body = script.requests[0]
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(first.secret).verify(body, headers)
    Webhook(second.secret).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(original).verify(body, headers)


def test_a_rotation_without_overlap_keeps_no_previous_secret(pg_session_factory, old_key):
    endpoint_id, _ = _endpoint(pg_session_factory, old_key, "https://hooks.example.com/x")
    with session_scope(pg_session_factory) as session:
        endpoint, rotation = rotate_endpoint_secret(session, _cipher(old_key), endpoint_id, overlap_s=0)
        assert rotation.previous_signs_until is None and not rotation.undecryptable_dropped
        assert endpoint.previous_secret_encrypted is None


def test_with_the_old_key_as_fallback_deliveries_go_on_and_rekey_moves_every_secret(
    pg_session_factory, old_key, new_key, new_key_with_fallback, receiver
):
    """A key change without a stop: receivers keep their secrets, nothing fails meanwhile."""
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    receiver.expect_request("/cb").respond_with_handler(script)
    endpoint_id, endpoint_secret = _endpoint(pg_session_factory, old_key, receiver.url_for("/hook"))
    with session_scope(pg_session_factory) as session:
        client_secret = reveal_client_secret(session, _cipher(old_key), "acme")
        reveal_client_secret(session, _cipher(new_key), "beta")  # already under the new key
        # A rotation under the old key: its previous secret is under the old key too, and still signing.
        _, rotation = rotate_endpoint_secret(session, _cipher(old_key), endpoint_id, overlap_s=3600)

    ids = _event(pg_session_factory, callback_url=receiver.url_for("/cb"))
    for delivery_id in ids:
        steps = drive(pg_session_factory, delivery_id, new_key_with_fallback)
        assert [s.status for s in steps] == ["succeeded"], steps

    with session_scope(pg_session_factory) as session:
        result = reencrypt_secrets(session, _cipher(new_key_with_fallback))
    assert (result.reencrypted, result.already_current, result.undecryptable) == (3, 1, ())
    with session_scope(pg_session_factory) as session:
        assert reencrypt_secrets(session, _cipher(new_key_with_fallback)).reencrypted == 0  # idempotent
        # The secrets did not change, only the key they are stored under: the new key alone decrypts them.
        assert reveal_client_secret(session, _cipher(new_key), "acme") == client_secret

    ids = _event(pg_session_factory, callback_url=receiver.url_for("/cb"))
    for delivery_id in ids:
        steps = drive(pg_session_factory, delivery_id, new_key)
        assert [s.status for s in steps] == ["succeeded"], steps
    assert len(script.requests) == 4
    for headers, body in script.requests:
        signatures = headers["webhook-signature"].split(" ")
        if len(signatures) == 2:  # the endpoint: its rotated secret and the one still in its overlap
            Webhook(rotation.secret).verify(body, headers)
            Webhook(endpoint_secret).verify(body, headers)
        else:
            Webhook(client_secret).verify(body, headers)


def test_rekey_names_secrets_no_key_decrypts_and_leaves_them(pg_session_factory, old_key, new_key):
    endpoint_id, _ = _endpoint(pg_session_factory, old_key, "https://hooks.example.com/x")
    with session_scope(pg_session_factory) as session:
        stored = session.get_one(WebhookEndpoint, endpoint_id).secret_encrypted
        result = reencrypt_secrets(session, _cipher(new_key))  # the old key is not among the fallbacks
        assert result == type(result)(0, 0, (f"endpoint {endpoint_id}",))
        assert session.get_one(WebhookEndpoint, endpoint_id).secret_encrypted == stored


def test_a_rotation_under_a_fallback_key_stores_the_previous_secret_under_the_new_key(
    pg_session_factory, old_key, new_key, new_key_with_fallback, receiver
):
    """Else the previous secret would stop signing, mid-overlap, when the fallback key is retired."""
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    endpoint_id, original = _endpoint(pg_session_factory, old_key, receiver.url_for("/hook"))
    with session_scope(pg_session_factory) as session:
        _, rotation = rotate_endpoint_secret(
            session, _cipher(new_key_with_fallback), endpoint_id, overlap_s=3600
        )
        assert not rotation.undecryptable_dropped

    ids = _event(pg_session_factory)
    steps = drive(pg_session_factory, ids[0], new_key)  # the fallback already retired

    assert [s.status for s in steps] == ["succeeded"], steps
    headers, body = script.requests[0]
    Webhook(original).verify(body, headers)
    Webhook(rotation.secret).verify(body, headers)


def test_rekey_on_sqlite_leaves_a_rotation_committed_after_its_read(
    sqlite_url, old_key, new_key_with_fallback
):
    """SQLite reads take no lock: a rotation committed between rekey's read and its write used to be
    overwritten with the old secret, which the receiver had already replaced."""
    import sqlalchemy as sa

    from db.session import make_engine, make_session_factory

    engines = [make_engine(sqlite_url), make_engine(sqlite_url)]
    operator, rekeyer = (make_session_factory(engine) for engine in engines)
    try:
        endpoint_id, _ = _endpoint(operator, old_key, "https://hooks.example.com/x")
        rotated: list[str] = []

        def rotate_once(conn, cursor, statement, *args):
            if (
                not rotated
                and statement.lstrip().upper().startswith("SELECT")
                and "webhook_endpoints" in statement
            ):
                with session_scope(operator) as session:
                    rotation = rotate_endpoint_secret(
                        session, _cipher(new_key_with_fallback), endpoint_id, overlap_s=0
                    )[1]
                rotated.append(rotation.secret)

        sa.event.listen(engines[1], "after_cursor_execute", rotate_once)
        with session_scope(rekeyer) as session:
            result = reencrypt_secrets(session, _cipher(new_key_with_fallback))

        assert (result.reencrypted, result.changed_meanwhile) == (0, 1)
        with session_scope(operator) as session:
            stored = session.get_one(WebhookEndpoint, endpoint_id).secret_encrypted
        assert _cipher(new_key_with_fallback).decrypt(stored) == rotated[0]
    finally:
        for engine in engines:
            engine.dispose()
