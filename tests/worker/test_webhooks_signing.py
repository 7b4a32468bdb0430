"""Signing, secret storage, payloads, retry policy: the pure parts of worker/webhooks.py."""

from __future__ import annotations

import gzip
import json
import zlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker import webhooks as wh

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)


def _event(**overrides):
    fields = {
        "check_id": "0b7c2f0e-0000-4000-8000-000000000001",
        "external_id": "upload-42",
        "client": "acme",
        "status": "done",
        "verdict": "generated",
        "score": 0.973456789,
        "model": "synthguard-v1@1.0.0+abcdef123456",
        "decided_by": "pixels",
        "family_scores": {"diffusion": 0.9, "gan": 0.05, "real": 0.05},
        "evidence": {
            "spectral": {"mid_energy": {"value": 0.412345, "typical": [0.1, 0.3]}, "threshold": 0.8},
            "grid": {"period8_peak": 3.2, "decision_threshold": 2.0, "peaks": [1, 2, 3]},
            "provenance": {"c2pa": False, "software": "Stable Diffusion"},
        },
    }
    fields.update(overrides)
    return wh.CheckEventData(**fields)


def test_signature_verifies_with_standardwebhooks():
    secret = wh.generate_secret()
    body = wh.build_payload("check.flagged", _event(), occurred_at=NOW)
    headers = wh.webhook_headers([secret], "msg_123", body)
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "check.flagged"
    assert payload["data"]["check_id"] == "0b7c2f0e-0000-4000-8000-000000000001"


def test_signature_with_wrong_secret_or_tampered_body_fails():
    secret = wh.generate_secret()
    body = wh.build_payload("check.flagged", _event(), occurred_at=NOW)
    headers = wh.webhook_headers([secret], "msg_123", body)
    with pytest.raises(WebhookVerificationError):
        Webhook(wh.generate_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"generated", b"real"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": "msg_other"})


def test_rotation_header_verifies_with_old_and_new_secret():
    old, new = wh.generate_secret(), wh.generate_secret()
    body = b'{"type":"ping"}'
    headers = wh.webhook_headers([new, old], "msg_rot", body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(body, headers)
    Webhook(new).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(wh.generate_secret()).verify(body, headers)


def test_known_vector_matches_spec_formula():
    # Independent of our code path: the spec's formula computed by hand with hmac.
    import base64
    import hashlib
    import hmac

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    expected = base64.b64encode(hmac.new(b"k" * 32, b"msg_1.1700000000.{}", hashlib.sha256).digest()).decode()
    assert wh.sign(secret, "msg_1", 1_700_000_000, b"{}") == "v1," + expected


def test_secret_format_and_uniqueness():
    a, b = wh.generate_secret(), wh.generate_secret()
    assert a.startswith("whsec_") and a != b
    with pytest.raises(wh.SecretError):
        wh.sign("whsec_not base64!", "m", 1, b"")


def test_cipher_round_trip_and_wrong_key():
    secret = wh.generate_secret()
    cipher = wh.SecretCipher("a-long-deployment-secret-key")
    token = cipher.encrypt(secret)
    assert secret not in token and secret.removeprefix("whsec_") not in token
    assert cipher.decrypt(token) == secret
    with pytest.raises(wh.SecretError) as excinfo:
        wh.SecretCipher("another-key").decrypt(token)
    assert secret not in str(excinfo.value) and token not in str(excinfo.value)
    with pytest.raises(wh.SecretError):
        wh.SecretCipher("")


def test_payload_has_no_thresholds_no_image_and_a_summary():
    body = wh.build_payload("check.flagged", _event(), occurred_at=NOW)
    payload = json.loads(body)
    assert set(payload) == {"type", "timestamp", "data"}
    assert payload["timestamp"] == "2026-11-26T15:00:00.000Z"
    data = payload["data"]
    assert data["verdict"] == "generated"
    assert data["score"] == 0.9735
    assert data["model_version"] == "1.0.0+abcdef123456"
    assert data["evidence_summary"]["spectral"] == {"mid_energy": 0.4123}
    assert data["evidence_summary"]["grid"] == {"period8_peak": 3.2}
    assert data["evidence_summary"]["provenance"] == {"c2pa": False, "software": "Stable Diffusion"}
    assert b"threshold" not in body
    assert b"image" not in body


def test_payload_stays_under_limit_with_huge_evidence():
    huge = {f"group{g}": {f"k{i}": "x" * 120 for i in range(200)} for g in range(50)}
    body = wh.build_payload("check.flagged", _event(evidence=huge), occurred_at=NOW)
    assert len(body) <= wh.PAYLOAD_MAX_BYTES
    assert json.loads(body)["data"]["verdict"] == "generated"


def test_unknown_event_type_refused():
    with pytest.raises(ValueError, match="unknown"):
        wh.build_payload("check.exploded", _event(), occurred_at=NOW)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, wh.Outcome.SUCCEEDED),
        (204, wh.Outcome.SUCCEEDED),
        (301, wh.Outcome.FAILED),
        (400, wh.Outcome.FAILED),
        (404, wh.Outcome.FAILED),
        (410, wh.Outcome.GONE),
        (429, wh.Outcome.RETRY),
        (500, wh.Outcome.RETRY),
        (503, wh.Outcome.RETRY),
    ],
)
def test_classify_status(status, outcome):
    assert wh.classify_status(status) is outcome


def test_parse_retry_after():
    assert wh.parse_retry_after(None) is None
    assert wh.parse_retry_after("") is None
    assert wh.parse_retry_after("120") == 120.0
    assert wh.parse_retry_after("garbage") is None
    assert wh.parse_retry_after("99999999") == wh.MAX_RETRY_AFTER_S
    # A receiver's header never raises: odd digits, dates out of range.
    for odd in ("\u00b2", "\u0663", "Fri, 01 Jan 99999 00:00:00 GMT", "Mon, 32 Foo 2026 99:99:99 GMT"):
        assert wh.parse_retry_after(odd) is None, odd
    http_date = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert wh.parse_retry_after(http_date, now=NOW) == pytest.approx(90.0)
    past = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert wh.parse_retry_after(past, now=NOW) == 0.0


def test_default_schedule_is_eight_attempts_over_about_a_day():
    policy = wh.RetryPolicy()
    assert policy.max_attempts == 8
    no_jitter = [policy.delay_before(n, rand=lambda _a, _b: 1.0) for n in range(1, 9)]
    assert no_jitter == [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
    assert 20 * 3600 < sum(d for d in no_jitter if d) < 30 * 3600
    assert policy.delay_before(9) is None


def test_jitter_bounds_and_retry_after_wins_when_longer():
    policy = wh.RetryPolicy(jitter=0.2)
    delays = {policy.delay_before(3) for _ in range(50)}
    assert all(240 <= d <= 360 for d in delays if d is not None)
    assert len(delays) > 1  # jitter actually varies
    assert policy.delay_before(2, retry_after_s=600, rand=lambda _a, _b: 1.0) == 600
    assert policy.delay_before(3, retry_after_s=1, rand=lambda _a, _b: 1.0) == 300


def test_send_classifies_responses_and_caps_body():
    big = b"y" * (wh.RESPONSE_READ_LIMIT * 4)

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/ok":
            return httpx.Response(200, content=big)
        if path == "/slow-down":
            return httpx.Response(429, headers={"retry-after": "30"})
        if path == "/moved":
            return httpx.Response(302, headers={"location": "http://169.254.169.254/"})
        if path == "/boom":
            raise httpx.ConnectError("connection refused")
        if path == "/bug":
            raise RuntimeError("a library error nobody expected")
        return httpx.Response(404)

    client = httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=False)
    ok = wh.send_webhook(client, "http://receiver/ok", b"{}", {}, timeout_s=5)
    assert ok.outcome is wh.Outcome.SUCCEEDED and ok.status_code == 200
    assert ok.response_excerpt is not None and len(ok.response_excerpt) == wh.RESPONSE_EXCERPT_CHARS

    slow = wh.send_webhook(client, "http://receiver/slow-down", b"{}", {}, timeout_s=5)
    assert slow.outcome is wh.Outcome.RETRY and slow.retry_after_s == 30

    moved = wh.send_webhook(client, "http://receiver/moved", b"{}", {}, timeout_s=5)
    assert moved.outcome is wh.Outcome.FAILED and "not followed" in (moved.error or "")

    boom = wh.send_webhook(client, "http://receiver/boom", b"{}", {}, timeout_s=5)
    assert boom.outcome is wh.Outcome.RETRY and "ConnectError" in (boom.error or "")

    missing = wh.send_webhook(client, "http://receiver/nope", b"{}", {}, timeout_s=5)
    assert missing.outcome is wh.Outcome.FAILED and missing.status_code == 404

    # Anything else is still an outcome (retried, with its reason), never an exception for the caller.
    bug = wh.send_webhook(client, "http://receiver/bug", b"{}", {}, timeout_s=5)
    assert bug.outcome is wh.Outcome.RETRY and bug.error == "RuntimeError: a library error nobody expected"


def test_send_asks_for_an_uncompressed_answer():
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("accept-encoding"))
        return httpx.Response(204)

    client = httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=False)
    headers = wh.webhook_headers([wh.generate_secret()], "msg_1", b"{}")
    assert (
        wh.send_webhook(client, "http://receiver/", b"{}", headers, timeout_s=5).outcome
        is wh.Outcome.SUCCEEDED
    )
    # Even a caller that asks for gzip explicitly: the body is read raw, so it must come raw.
    wh.send_webhook(client, "http://receiver/", b"{}", {**headers, "Accept-Encoding": "gzip"}, timeout_s=5)
    assert seen == ["identity", "identity"]


def test_storable_text_keeps_newlines_and_tabs_and_replaces_other_controls():
    text = "a\x00b\x1b[2J\r\nc\td\x9be\x7f\ud800"
    assert wh.storable_text(text, 100) == "a\ufffdb\ufffd[2J\nc\td\ufffde\ufffd?"
    assert wh.storable_text("x" * 10, 4) == "xxxx"
    assert wh.storable_text(None, 4) is None


def test_excerpt_of_compressed_and_unknown_encodings_is_readable():
    answer = '{"received": true}'
    assert wh.excerpt_of(gzip.compress(answer.encode()), "gzip") == answer
    assert wh.excerpt_of(gzip.compress(answer.encode()), " X-GZIP ") == answer
    assert wh.excerpt_of(zlib.compress(answer.encode()), "deflate") == answer
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert wh.excerpt_of(raw_deflate.compress(answer.encode()) + raw_deflate.flush(), "deflate") == answer
    assert wh.excerpt_of(b"\x00\x01garbage", "gzip") == "(gzip-encoded body of 9 bytes that does not decode)"
    assert wh.excerpt_of(b"\x00\x01", "br") == "(br-encoded body of 2 bytes, not decoded)"
    assert wh.excerpt_of(b"", "gzip") is None
    # A compression bomb is inflated only as far as the excerpt needs (50 MB would take a while and memory).
    bomb = gzip.compress(b"A" * 50_000_000)
    assert wh.excerpt_of(bomb[: wh.RESPONSE_READ_LIMIT], "gzip") == "A" * wh.RESPONSE_EXCERPT_CHARS


@pytest.mark.parametrize(
    ("env", "expected"), [("0,5,300", (0.0, 5.0, 300.0)), ("[0, 1.5]", (0.0, 1.5)), (" 0 , 2 ", (0.0, 2.0))]
)
def test_retry_schedule_from_the_environment(monkeypatch, env, expected):
    from worker.settings import load_settings

    monkeypatch.setenv("SYNTHGUARD_WEBHOOK_RETRY_DELAYS_S", env)
    assert load_settings().webhook_retry_delays_s == expected


@pytest.mark.parametrize("env", ["abc", "[1,", "", "-5,1"])
def test_bad_retry_schedule_is_one_clear_line(monkeypatch, env):
    from worker.settings import SettingsError, load_settings

    monkeypatch.setenv("SYNTHGUARD_WEBHOOK_RETRY_DELAYS_S", env)
    with pytest.raises(SettingsError, match="SYNTHGUARD_WEBHOOK_RETRY_DELAYS_S") as excinfo:
        load_settings()
    assert "\n" not in str(excinfo.value)
