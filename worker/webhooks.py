"""Webhook payloads, Standard Webhooks signing, secret storage, retry policy and the HTTP send.

Nothing here touches the database: the delivery state machine (worker/webhook_delivery.py) and the outbox
writer (worker/outbox.py) call these pure pieces, so each can be tested alone.

Spec followed: https://www.standardwebhooks.com/ (headers ``webhook-id``, ``webhook-timestamp``,
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``; ``whsec_`` base64 secrets;
several space-separated signatures while a secret is rotated).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import logging
import math
import random
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Final

import httpx
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from worker import netguard

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RETRY_DELAYS_S",
    "EVENT_TYPES",
    "PAYLOAD_MAX_BYTES",
    "CheckEventData",
    "Outcome",
    "RetryPolicy",
    "SecretCipher",
    "SecretError",
    "SendResult",
    "build_payload",
    "classify_status",
    "excerpt_of",
    "generate_secret",
    "make_webhook_client",
    "parse_retry_after",
    "send_webhook",
    "sign",
    "signature_header",
    "storable_text",
    "summarize_evidence",
    "timestamp_text",
    "webhook_headers",
]

EVENT_FLAGGED: Final = "check.flagged"
EVENT_COMPLETED: Final = "check.completed"
EVENT_FAILED: Final = "check.failed"
EVENT_REVIEWED: Final = "check.reviewed"
EVENT_PING: Final = "ping"
EVENT_TYPES: Final = (EVENT_FLAGGED, EVENT_COMPLETED, EVENT_FAILED, EVENT_REVIEWED, EVENT_PING)
# What an endpoint gets when it is added without --events: the two events a moderation platform acts on.
DEFAULT_ENDPOINT_EVENTS: Final = (EVENT_FLAGGED, EVENT_REVIEWED)

PAYLOAD_MAX_BYTES: Final = 20_000
SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the spec's prefix, not a secret
# Standard Webhooks asks for 24..64 random bytes; 32 matches the HMAC-SHA256 block strength.
SECRET_BYTES: Final = 32
# The response body is read up to this many bytes (a hostile receiver cannot make us buffer megabytes),
# and this much of it is kept on the attempt row for operators.
RESPONSE_READ_LIMIT: Final = 16 * 1024
RESPONSE_EXCERPT_CHARS: Final = 1024
# C0 and C1 control characters except newline and tab. PostgreSQL text refuses NUL (the attempt could not be
# stored at all), and ESC/CSI sequences from a receiver would drive the operator's terminal (`webhooks show`).
_CONTROL_CHARACTERS: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Svix / Standard Webhooks schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
# -> 8 attempts over ~28 h.
DEFAULT_RETRY_DELAYS_S: Final[tuple[float, ...]] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
# A Retry-After larger than this is clamped: a receiver must not park a delivery for weeks.
MAX_RETRY_AFTER_S: Final = 24 * 3600.0
USER_AGENT: Final = "synthguard-webhooks/0.1 (+https://www.standardwebhooks.com/)"


class SecretError(ValueError):
    """A webhook secret that cannot be decoded or decrypted (wrong SYNTHGUARD_SECRET_KEY, corrupt row)."""


# --------------------------------------------------------------------------------------------------------
# Secrets: generation, encryption at rest, signing
# --------------------------------------------------------------------------------------------------------


def generate_secret() -> str:
    """Return a new ``whsec_<base64>`` signing secret (shown to the operator once, stored encrypted)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def _secret_bytes(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SecretError("webhook secret is not whsec_<base64>") from exc
    if not decoded:
        raise SecretError("webhook secret is empty")
    return decoded


class SecretCipher:
    """Encrypts webhook secrets for storage, with a key derived from ``settings.secret_key``.

    A database dump alone does not reveal the secrets; the deployment's secret key is needed too. HKDF gives
    a key that is used for nothing else, so the same secret key can serve other purposes safely. Secrets are
    always encrypted under the current key; the fallback keys (earlier values of it) only decrypt, so the key
    can change while secrets stored under the old one are still in use (`reencrypt` moves them over).
    """

    _INFO: Final = b"synthguard webhook signing secrets v1"

    def __init__(self, secret_key: str, fallback_keys: Sequence[str] = ()) -> None:
        if not secret_key:
            raise SecretError("SYNTHGUARD_SECRET_KEY is empty: webhook secrets cannot be encrypted")
        self._current = Fernet(self._derive(secret_key))
        # MultiFernet encrypts with the first key and decrypts with whichever of them fits.
        self._any = MultiFernet([self._current, *(Fernet(self._derive(key)) for key in fallback_keys)])

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretCipher:
        """The cipher of ``settings.secret_key`` and its fallbacks; SettingsError when the key is unset."""
        fallbacks = [key.get_secret_value() for key in settings.secret_key_fallbacks]
        return cls(settings.require_secret_key(), fallbacks)

    @classmethod
    def _derive(cls, secret_key: str) -> bytes:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=cls._INFO).derive(
            secret_key.encode("utf-8")
        )
        return base64.urlsafe_b64encode(derived)

    def encrypt(self, secret: str) -> str:
        _secret_bytes(secret)  # refuse to store something we could never sign with
        return self._current.encrypt(secret.encode("ascii")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._any.decrypt(token.encode("ascii")).decode("ascii")
        except InvalidToken as exc:
            # Never include the token or the key in the message: this text ends up in attempt rows and logs.
            raise SecretError(_UNDECRYPTABLE) from exc

    def is_current(self, token: str) -> bool:
        """Whether ``token`` is encrypted under the current key (not a fallback, not an unknown key)."""
        try:
            self._current.decrypt(token.encode("ascii"))
        except InvalidToken:
            return False
        return True

    def reencrypt(self, token: str) -> str:
        """``token``'s secret encrypted under the current key; SecretError when no key decrypts it."""
        try:
            return self._any.rotate(token.encode("ascii")).decode("ascii")
        except InvalidToken as exc:
            raise SecretError(_UNDECRYPTABLE) from exc


_UNDECRYPTABLE: Final = (
    "cannot decrypt a stored webhook secret: was SYNTHGUARD_SECRET_KEY changed? (the key it was stored "
    "under belongs in SYNTHGUARD_SECRET_KEY_FALLBACKS)"
)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``message_id.timestamp.body`` (Standard Webhooks)."""
    signed = message_id.encode("utf-8") + b"." + str(timestamp).encode("ascii") + b"." + body
    digest = hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_header(secrets_: Sequence[str], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per active secret, space separated (rotation)."""
    if not secrets_:
        raise SecretError("no signing secret")
    return " ".join(sign(secret, message_id, timestamp, body) for secret in secrets_)


def webhook_headers(
    secrets_: Sequence[str], message_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """Headers for one attempt. The id stays the same across retries; the timestamp is the send time,
    because receivers reject timestamps older than a few minutes."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature_header(secrets_, message_id, ts, body),
    }


# --------------------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckEventData:
    """What a check event says, independent of the ORM rows it came from."""

    check_id: str
    external_id: str | None
    client: str | None
    status: str
    verdict: str | None = None
    score: float | None = None
    model: str | None = None
    decided_by: str | None = None
    family_scores: Mapping[str, float] = field(default_factory=dict)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    review: Mapping[str, Any] | None = None


def _is_threshold_key(key: str) -> bool:
    # Thresholds stay private: a receiver that learns them learns how to slip just under them.
    lowered = key.lower()
    return "threshold" in lowered or lowered in {"cutoff", "operating_point"}


def _compact_scalar(value: Any) -> Any:
    """A JSON scalar small enough for the summary, or None to leave the entry out."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, str):
        return value if len(value) <= 120 else value[:117] + "..."
    return None


def _summarize_group(group: Mapping[str, Any], max_entries: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key, entry in group.items():
        if len(summary) >= max_entries:
            break
        if not isinstance(key, str) or _is_threshold_key(key):
            continue
        # Evidence numbers come as {"value": x, "typical": [lo, hi]}; the value is the summary.
        value = entry["value"] if isinstance(entry, Mapping) and "value" in entry else entry
        compact = _compact_scalar(value)
        if compact is not None or value is None:
            summary[key] = compact
    return summary


def summarize_evidence(evidence: Mapping[str, Any], max_entries_per_group: int = 12) -> dict[str, Any]:
    """Top-level scalar numbers of each evidence group.

    Nested detail stays in the database; the receiver fetches it by check id.
    """
    summary: dict[str, Any] = {}
    for group_name, group in evidence.items():
        if not isinstance(group_name, str) or _is_threshold_key(group_name):
            continue
        if isinstance(group, Mapping):
            compact = _summarize_group(group, max_entries_per_group)
            if compact:
                summary[group_name] = compact
    return summary


def timestamp_text(moment: datetime) -> str:
    """A payload timestamp: UTC, milliseconds, ``Z`` (``2026-11-26T15:00:00.000Z``), alike in every field."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(payload: Mapping[str, Any]) -> bytes:
    # Compact separators and sorted keys: the signed bytes are stable and small.
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


def build_payload(event_type: str, event: CheckEventData, *, occurred_at: datetime) -> bytes:
    """The JSON body ``{"type", "timestamp", "data"}`` for a check event, at most PAYLOAD_MAX_BYTES.

    No raw image, no image URL, no thresholds. The receiver fetches anything more by ``data.check_id``.
    The evidence summary is shrunk, then dropped, if the body would exceed the limit.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    data: dict[str, Any] = {
        "check_id": event.check_id,
        "external_id": event.external_id,
        "client": event.client,
        "status": event.status,
    }
    if event.verdict is not None:
        data["verdict"] = event.verdict
        data["score"] = None if event.score is None else round(float(event.score), 4)
        data["model"] = event.model
        data["model_version"] = _model_version(event.model)
        data["decided_by"] = event.decided_by
        data["family_scores"] = {
            name: round(float(value), 4)
            for name, value in event.family_scores.items()
            if isinstance(value, int | float) and math.isfinite(value)
        }
    if event.error is not None:
        data["error"] = event.error[:500]
    if event.review is not None:
        data["review"] = {k: v for k, v in event.review.items() if not _is_threshold_key(str(k))}

    payload: dict[str, Any] = {"type": event_type, "timestamp": timestamp_text(occurred_at), "data": data}
    for entries in (12, 6, 3):
        if event.evidence:
            data["evidence_summary"] = summarize_evidence(event.evidence, entries)
        body = _encode(payload)
        if len(body) <= PAYLOAD_MAX_BYTES:
            return body
    data.pop("evidence_summary", None)
    data["evidence_summary_truncated"] = True
    if "review" in data:
        data["review"] = {"truncated": True}
    body = _encode(payload)
    if len(body) > PAYLOAD_MAX_BYTES:  # only possible with absurd ids; refuse rather than send a broken event
        raise ValueError(f"webhook payload is {len(body)} bytes, over {PAYLOAD_MAX_BYTES}")
    return body


def build_ping_payload(*, endpoint_id: str, occurred_at: datetime) -> bytes:
    return _encode(
        {"type": EVENT_PING, "timestamp": timestamp_text(occurred_at), "data": {"endpoint_id": endpoint_id}}
    )


def _model_version(model: str | None) -> str | None:
    # "synthguard-v1@1.2.0+abcdef123456" -> "1.2.0+abcdef123456"
    if not model or "@" not in model:
        return None
    return model.split("@", 1)[1]


# --------------------------------------------------------------------------------------------------------
# Retry policy
# --------------------------------------------------------------------------------------------------------


class Outcome(enum.StrEnum):
    """What one attempt means for the delivery."""

    SUCCEEDED = "succeeded"  # 2xx: done
    RETRY = "retry"  # network error, timeout, 5xx, 429: try again later if attempts remain
    FAILED = "failed"  # other 4xx, 3xx (redirects are not followed), refused address: give up now
    GONE = "gone"  # 410: the receiver asked us to stop; the endpoint is disabled


def classify_status(status_code: int) -> Outcome:
    if 200 <= status_code < 300:
        return Outcome.SUCCEEDED
    if status_code == 410:
        return Outcome.GONE
    if status_code == 429 or status_code >= 500:
        return Outcome.RETRY
    return Outcome.FAILED


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/invalid."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():  # str.isdigit alone admits "²", which float() refuses
        return min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return min(max(0.0, (when - reference).total_seconds()), MAX_RETRY_AFTER_S)


@dataclass(frozen=True)
class RetryPolicy:
    """When attempt N+1 happens after attempt N failed.

    ``delays_s[i]`` is the wait before attempt i+1 (the first is normally 0: send immediately), so the length
    of the schedule is the number of attempts. Each wait is jittered by +-``jitter`` (a fraction) so that
    deliveries failing together do not retry together.
    """

    delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not self.delays_s:
            raise ValueError("a retry schedule needs at least one attempt")
        if any(d < 0 for d in self.delays_s):
            raise ValueError("retry delays must be >= 0")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    @property
    def max_attempts(self) -> int:
        return len(self.delays_s)

    def delay_before(
        self,
        attempt_number: int,
        *,
        retry_after_s: float | None = None,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt_number`` (1-based), or None when the schedule is spent.

        A receiver's ``Retry-After`` is honoured when it asks for longer than the schedule would wait.
        """
        if attempt_number < 1:
            raise ValueError("attempt numbers start at 1")
        if attempt_number > self.max_attempts:
            return None
        base = self.delays_s[attempt_number - 1]
        delay = base * rand(1 - self.jitter, 1 + self.jitter) if base > 0 else 0.0
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
        return delay


# --------------------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    """One HTTP attempt, as stored on the attempt row."""

    outcome: Outcome
    status_code: int | None
    latency_ms: int
    error: str | None = None
    response_excerpt: str | None = None
    retry_after_s: float | None = None


def storable_text(text: str | None, max_chars: int) -> str | None:
    """``text`` as it may be stored and printed: control characters (NUL included) other than newline and tab
    become U+FFFD, CRLF becomes LF, lone surrogates become ``?``, and it is cut to ``max_chars``."""
    if text is None:
        return None
    encodable = text.replace("\r\n", "\n").encode("utf-8", errors="replace").decode("utf-8")
    return _CONTROL_CHARACTERS.sub("\ufffd", encodable)[:max_chars]


def _read_capped(response: httpx.Response, limit: int, deadline: float) -> tuple[bytes, str]:
    """Up to ``limit`` body bytes, and the content-encoding still to undo on them ("identity" when none)."""
    if response.is_stream_consumed:  # already buffered (in-memory transports), and already decoded by httpx
        return response.content[:limit], "identity"
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_raw():
        chunks.append(chunk)
        size += len(chunk)
        # The per-read timeout alone lets a receiver trickle bytes forever; the deadline bounds the read.
        if size >= limit or time.monotonic() > deadline:
            break
    return b"".join(chunks)[:limit], response.headers.get("content-encoding", "identity")


def _inflate_prefix(raw: bytes, max_bytes: int) -> bytes | None:
    """The first ``max_bytes`` of a gzip, zlib or raw deflate body (the prefix read may end mid-stream), or
    None if it is none of them. ``max_length`` bounds the output, so a compression bomb costs nothing."""
    for wbits in (zlib.MAX_WBITS | 32, -zlib.MAX_WBITS):  # |32: gzip or zlib header, detected; then raw
        try:
            return zlib.decompressobj(wbits).decompress(raw, max_bytes)
        except zlib.error:
            continue
    return None


def excerpt_of(raw: bytes, content_encoding: str) -> str | None:
    """What an attempt row keeps of a response body: readable text, at most RESPONSE_EXCERPT_CHARS.

    Webhook requests ask for ``identity``; a receiver that compresses anyway gets its gzip or deflate body
    decoded (as far as the excerpt needs), any other encoding is named instead of stored as binary.
    """
    if not raw:
        return None
    encoding = content_encoding.strip().lower()[:40]
    if encoding in ("", "identity"):
        text = raw.decode("utf-8", errors="replace")
    elif encoding in ("gzip", "x-gzip", "deflate"):
        # 4 bytes per character at most in UTF-8: enough bytes for a full excerpt.
        inflated = _inflate_prefix(raw, RESPONSE_EXCERPT_CHARS * 4)
        if not inflated:  # raw deflate may accept garbage without an error, yielding nothing
            text = f"({encoding}-encoded body of {len(raw)} bytes that does not decode)"
        else:
            text = inflated.decode("utf-8", errors="replace")
    else:
        text = f"({encoding}-encoded body of {len(raw)} bytes, not decoded)"
    return storable_text(text, RESPONSE_EXCERPT_CHARS)


def _describe_exception(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def make_webhook_client(allow_private_hosts: str, timeout_s: float) -> httpx.Client:
    """The sender's HTTP client: connects only to addresses netguard validated (after DNS resolution),
    never follows redirects, ignores proxy variables. ``allow_private_hosts`` is the settings' allowlist."""
    return netguard.make_guarded_client(
        netguard.HostAllowlist.parse(allow_private_hosts),
        timeout=timeout_s,
        headers={"user-agent": USER_AGENT},
    )


def send_webhook(
    client: httpx.Client,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    refused_errors: Iterable[type[BaseException]] = (netguard.ForbiddenTargetError,),
) -> SendResult:
    """POST one signed body and classify what happened. Never raises: every failure is an outcome.

    ``client`` must not follow redirects and must only connect to validated addresses
    (``make_webhook_client``); exceptions of ``refused_errors`` raised by its transport mean the address
    was refused, which is final rather than retried. ``timeout_s`` bounds the whole exchange, not each
    socket read.
    """
    refused = tuple(refused_errors)
    request_headers = httpx.Headers(headers)
    # httpx asks for gzip/deflate by default. The body is read raw and capped, so ask for plain bytes: a
    # compressed answer used to reach the attempt row as binary.
    request_headers["accept-encoding"] = "identity"
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        with (
            netguard.deadline(timeout_s),
            client.stream("POST", url, content=body, headers=request_headers, timeout=timeout_s) as response,
        ):
            raw, content_encoding = _read_capped(response, RESPONSE_READ_LIMIT, deadline)
            status = response.status_code
            response_headers = response.headers
    except refused as exc:
        reason = _refusal_text(exc)
        # netguard reports a failed DNS lookup with the same exception as a forbidden address; a lookup
        # failure is a network error like any other and is retried, a forbidden address is final.
        if reason.startswith("could not resolve"):
            return SendResult(Outcome.RETRY, None, _elapsed_ms(started), error=reason)
        return SendResult(Outcome.FAILED, None, _elapsed_ms(started), error=f"refused: {reason}")
    except httpx.TimeoutException as exc:
        timeout_error = f"timeout after {timeout_s:g} s ({type(exc).__name__})"
        return SendResult(Outcome.RETRY, None, _elapsed_ms(started), error=timeout_error)
    except httpx.HTTPError as exc:
        return SendResult(Outcome.RETRY, None, _elapsed_ms(started), error=_describe_exception(exc))
    except OSError as exc:  # DNS failures surfaced by a custom transport
        return SendResult(Outcome.RETRY, None, _elapsed_ms(started), error=_describe_exception(exc))
    except (httpx.InvalidURL, ValueError) as exc:
        # A bad port, or a host idna refuses (IDNAError is a UnicodeError), in the URL or in a redirect's
        # Location (httpx builds the next request even when it does not follow it): no retry mends that.
        malformed = f"malformed URL: {_describe_exception(exc)}"
        return SendResult(Outcome.FAILED, None, _elapsed_ms(started), error=malformed)
    except Exception as exc:
        # Whatever else a library raises must still end as a recorded attempt: the delivery then backs off
        # and, if it keeps failing, ends failed with this reason instead of being re-sent blind forever.
        log.exception("webhook POST to %s failed unexpectedly", url)
        return SendResult(Outcome.RETRY, None, _elapsed_ms(started), error=_describe_exception(exc))

    retry_after = parse_retry_after(response_headers.get("retry-after"))
    location = response_headers.get("location")
    outcome = classify_status(status)
    error: str | None = None
    if outcome is not Outcome.SUCCEEDED:
        error = f"HTTP {status}"
        if 300 <= status < 400:
            error += f": redirect to {location!r} not followed" if location else ": redirect not followed"
        elif outcome is Outcome.GONE:
            error += ": receiver says the endpoint is gone"
    return SendResult(
        outcome,
        status,
        _elapsed_ms(started),
        error=error,
        response_excerpt=excerpt_of(raw, content_encoding),
        retry_after_s=retry_after if outcome is Outcome.RETRY else None,
    )


def _refusal_text(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else _describe_exception(exc)


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
