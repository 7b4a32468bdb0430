"""``synthguard webhooks ...`` end to end: real PostgreSQL, a receiver on 127.0.0.1, Redis for redeliver."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
from click.testing import CliRunner
from standardwebhooks.webhooks import Webhook

from db.session import session_scope
from db.webhook_tables import WebhookAttempt, WebhookDelivery
from tests.worker.webhook_helpers import Script, add_checked_image, drive, fast_settings
from worker import outbox
from worker.cli.webhook_cmds import parse_since, webhooks

pytestmark = pytest.mark.usefixtures("pg_clean")


@pytest.fixture
def queue_name():
    return f"synthguard-test-cli-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cli(settings, queue_name):
    env = {
        "SYNTHGUARD_DATABASE_URL": settings.database_url,
        "SYNTHGUARD_BROKER_URL": settings.broker_url,
        "SYNTHGUARD_SECRET_KEY": settings.require_secret_key(),
        "SYNTHGUARD_ALLOW_PRIVATE_HOSTS": "127.0.0.1",
        "SYNTHGUARD_QUEUE_NAME": queue_name,
        "SYNTHGUARD_WEBHOOK_TIMEOUT_S": "5",
    }
    runner = CliRunner()

    def run(*args: str, ok: bool = True, **env_overrides: str):
        result = runner.invoke(webhooks, list(args), env={**env, **env_overrides}, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def _add(cli, url, *extra):
    out = cli("add", url, "--client", "acme", *extra).output
    endpoint_id = re.search(r"endpoint: (\S+)", out).group(1)
    secret = re.search(r"secret:\s+(whsec_\S+)", out).group(1)
    return endpoint_id, secret


def test_adding_a_url_twice_for_a_client_warns_of_double_deliveries(cli):
    first, _ = _add(cli, "https://hooks.example.com/a", "--events", "check.flagged,check.failed")
    other_events = cli(
        "add", "https://hooks.example.com/a", "--client", "acme", "--events", "check.completed"
    )
    assert "already sends" not in other_events.stderr  # disjoint events: nothing arrives twice
    twin = cli("add", "https://hooks.example.com/a", "--client", "acme", "--events", "check.failed")
    assert f"endpoint {first} already sends check.failed to this URL" in twin.stderr
    other_client = cli("add", "https://hooks.example.com/a", "--client", "zeta")
    assert "already sends" not in other_client.stderr


def test_rotation_says_what_signs_from_now_on(cli):
    endpoint_id, _ = _add(cli, "https://hooks.example.com/r")
    ordinary = cli("rotate-secret", endpoint_id)
    assert "Both secrets sign every delivery until 20" in ordinary.stderr
    again = cli("rotate-secret", endpoint_id)
    assert "the secret from the previous rotation stopped signing now" in again.stderr

    # After a key change the old secrets cannot be decrypted: the rotation must not promise an overlap.
    other_key = {"SYNTHGUARD_SECRET_KEY": secrets.token_hex(32)}
    after_key_change = cli("rotate-secret", endpoint_id, **other_key)
    assert "could not be decrypted" in after_key_change.stderr
    assert "Both secrets sign" not in after_key_change.stderr
    cli("client-secret", "acme")
    rotated_client = cli("client-secret", "acme", "--rotate", **other_key)
    assert rotated_client.stdout.startswith("whsec_") and "could not be decrypted" in rotated_client.stderr


def test_add_list_test_rotate_disable(cli, receiver):
    script = Script((200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    endpoint_id, secret = _add(cli, receiver.url_for("/hook"), "--events", "check.flagged,check.failed")

    listed = json.loads(cli("list", "--format", "json").output)
    assert [(e["id"], e["events"], e["enabled"]) for e in listed] == [
        (endpoint_id, ["check.failed", "check.flagged"], True)
    ]
    assert secret not in cli("list").output

    out = cli("test", endpoint_id).output
    assert "succeeded" in out and "HTTP 200" in out
    headers, body = script.requests[-1]
    assert Webhook(secret).verify(body, headers)["type"] == "ping"

    new_secret = re.search(r"(whsec_\S+)", cli("rotate-secret", endpoint_id).output).group(1)
    cli("test", endpoint_id)
    headers, body = script.requests[-1]
    Webhook(secret).verify(body, headers)
    Webhook(new_secret).verify(body, headers)

    cli("disable", endpoint_id, "--reason", "maintenance")
    assert "disabled: maintenance" in cli("list").output
    refused = cli("test", endpoint_id, ok=False)
    assert refused.exit_code != 0 and "disabled" in refused.output
    cli("enable", endpoint_id)
    cli("test", endpoint_id)
    assert len(script.requests) == 3


def test_add_refuses_unknown_events_and_bad_urls(cli):
    result = cli(
        "add", "https://example.com/hook", "--client", "acme", "--events", "check.exploded", ok=False
    )
    assert result.exit_code != 0 and "unknown event type" in result.output
    result = cli("add", "ftp://example.com/hook", "--client", "acme", ok=False)
    assert result.exit_code != 0 and "scheme" in result.output


def test_add_warns_when_the_url_is_refused_now(cli):
    private = cli("add", "http://10.255.0.1/hook", "--client", "acme")
    assert "warning" in private.stderr and "private address refused" in private.stderr
    assert "set SYNTHGUARD_ALLOW_PRIVATE_HOSTS if it is an internal receiver you trust" in private.stderr
    # A metadata address is not opened by a range in the allowlist, and should not be opened at all: the
    # allowlist hint would be wrong.
    for allowed in ("127.0.0.1", "169.254.0.0/16"):
        metadata = cli(
            "add", "http://169.254.169.254/latest", "--client", "acme", SYNTHGUARD_ALLOW_PRIVATE_HOSTS=allowed
        )
        assert "warning" in metadata.stderr and "cloud metadata" in metadata.stderr
        assert "a cloud metadata address is never a webhook receiver" in metadata.stderr
        assert "SYNTHGUARD_ALLOW_PRIVATE_HOSTS" not in metadata.stderr


@pytest.mark.parametrize(
    ("client", "reason"),
    [("", "must not be empty"), ("   ", "must not be empty"), ("n" * 101, "is longer than 100 characters")],
)
def test_client_names_a_check_could_not_have_are_refused_with_one_line(cli, client, reason):
    """The rule of `clients set` (and of a check_image message): a longer name was a database traceback, an
    empty one an endpoint that no check could ever notify."""
    for command in (["add", "https://hooks.example.com/in", "--client", client], ["client-secret", client]):
        result = cli(*command, ok=False)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert f"Error: Invalid value for '--client': {reason}" in result.stderr or (
            f"Error: Invalid value for 'CLIENT_NAME': {reason}" in result.stderr
        )
    assert json.loads(cli("list", "--format", "json").output) == []


def test_show_and_deliveries_escape_control_characters_from_receivers(cli, pg_session_factory):
    """A receiver (any tenant) writes the response excerpt; printed raw, its escape sequences would retitle
    the operator's terminal, fake a line, or write the clipboard (OSC 52). JSON keeps the exact text."""
    body = "\x1b]0;owned-title\x07\x1b[2J\x1b[31mFAKE: delivery succeeded\x1b[0m\x1b]52;c;cm0gLXJmIH4K\x07"
    error = "HTTP 500\x1b]0;also-owned\x07"
    endpoint_id, _ = _add(cli, "https://hooks.example.com/in")
    with session_scope(pg_session_factory) as session:
        check, verdict = add_checked_image(session)
        (delivery_id,) = outbox.record_check_events(session, check, verdict)
        delivery = session.get_one(WebhookDelivery, delivery_id)
        delivery.status, delivery.attempt_count, delivery.last_status_code = "failed", 1, 500
        delivery.last_error = error
        session.add(
            WebhookAttempt(delivery_id=delivery_id, attempt_number=1, url=delivery.url, status_code=500,
                           latency_ms=3, outcome="failed", error=error, response_excerpt=body)
        )  # fmt: skip

    for command in (["show", str(delivery_id)], ["deliveries"]):
        table = cli(*command).output
        assert "\x1b" not in table and "\x07" not in table, command
        assert "\\x1b]0;" in table, command  # shown escaped, not dropped
    as_json = json.loads(cli("show", str(delivery_id), "--format", "json").output)
    assert as_json["attempts"][0]["response"] == body
    assert as_json["attempts"][0]["error"] == as_json["last_error"] == error
    (listed,) = json.loads(cli("deliveries", "--format", "json").output)
    assert listed["last_error"] == error

    # A disabled endpoint's reason (the receiver's answer when a 410 disabled it) in `list` and `test`.
    cli("disable", endpoint_id, "--reason", error)
    for command, ok in ((["list"], True), (["test", endpoint_id], False)):
        shown = cli(*command, ok=ok).output
        assert "HTTP 500\\x1b]0;also-owned\\x07" in shown and "\x1b" not in shown, command


@pytest.mark.parametrize("status", [404, 503])
def test_test_to_a_failing_receiver_exits_nonzero_after_one_attempt(cli, receiver, status):
    receiver.expect_request("/hook").respond_with_data("nope", status=status)
    endpoint_id, _ = _add(cli, receiver.url_for("/hook"))
    result = cli("test", endpoint_id, ok=False)
    assert result.exit_code == 1 and f"HTTP {status}" in result.output and "failed" in result.output
    (ping,) = json.loads(cli("deliveries", "--format", "json").output)
    assert ping["event"] == "ping" and ping["status"] == "failed" and ping["attempts"] == 1


def test_deliveries_show_and_redeliver(cli, receiver, pg_session_factory, settings, queue_name):
    script = Script((500, {}), (200, {}))
    receiver.expect_request("/hook").respond_with_handler(script)
    endpoint_id, _ = _add(cli, receiver.url_for("/hook"))
    with session_scope(pg_session_factory) as session:
        check, verdict = add_checked_image(session)
        (delivery_id,) = outbox.record_check_events(session, check, verdict)
    one_try = fast_settings(settings, webhook_retry_delays_s=(0.0,))
    assert drive(pg_session_factory, delivery_id, one_try)[-1].status == "failed"

    failed = json.loads(cli("deliveries", "--failed", "--format", "json").output)
    assert [(d["id"], d["status"], d["last_status_code"]) for d in failed] == [
        (str(delivery_id), "failed", 500)
    ]
    assert json.loads(cli("deliveries", "--endpoint", str(uuid.uuid4()), "--format", "json").output) == []
    mine = json.loads(cli("deliveries", "--endpoint", endpoint_id, "--format", "json").output)
    assert [d["id"] for d in mine] == [str(delivery_id)]
    shown = cli("show", str(delivery_id)).output
    assert "HTTP 500" in shown and '"type": "check.flagged"' in shown
    as_json = json.loads(cli("show", str(delivery_id), "--format", "json").output)
    assert as_json["id"] == str(delivery_id) and as_json["payload"]["type"] == "check.flagged"
    assert [(a["n"], a["status"]) for a in as_json["attempts"]] == [(1, 500)]

    # Through the broker: the task message lands on the configured queue.
    out = cli("redeliver", "--failed-since", "1h").output
    assert "1 delivery queued again" in out and str(delivery_id) in out
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        # Routed to the webhook queue, not behind the detection backlog.
        assert broker.llen(queue_name) == 0
        assert broker.llen(f"{queue_name}.webhooks") == 1
        message = json.loads(broker.lpop(f"{queue_name}.webhooks"))
        assert message["headers"]["task"] == "synthguard.deliver_webhook"
    finally:
        broker.close()

    # From this process.
    out = cli("redeliver", str(delivery_id), "--here").output
    assert "succeeded" in out
    assert cli("deliveries", "--failed", "--format", "json").output.strip() == "[]"
    assert len({headers["webhook-id"] for headers, _ in script.requests}) == 1


def test_client_secret_signs_callbacks(cli, receiver, pg_session_factory, settings):
    script = Script((200, {}))
    receiver.expect_request("/cb").respond_with_handler(script)
    secret = cli("client-secret", "acme").output.strip()
    assert secret.startswith("whsec_")
    assert cli("client-secret", "acme").output.strip() == secret
    with session_scope(pg_session_factory) as session:
        check, verdict = add_checked_image(session, callback_url=receiver.url_for("/cb"))
        (delivery_id,) = outbox.record_check_events(session, check, verdict)
    drive(pg_session_factory, delivery_id, settings)
    headers, body = script.requests[0]
    Webhook(secret).verify(body, headers)


def test_missing_secret_key_is_one_clear_line(cli):
    result = cli("add", "https://example.com/h", "--client", "acme", ok=False, SYNTHGUARD_SECRET_KEY="")
    assert result.exit_code != 0 and "SYNTHGUARD_SECRET_KEY is not set" in result.output


def test_parse_since():
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    assert parse_since("2h", now=now) == now - timedelta(hours=2)
    assert parse_since("7d", now=now) == now - timedelta(days=7)
    assert parse_since("2026-11-25T10:00:00", now=now) == datetime(2026, 11, 25, 10, tzinfo=UTC)
    with pytest.raises(Exception, match="neither"):
        parse_since("yesterday", now=now)
