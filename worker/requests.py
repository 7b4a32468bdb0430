"""The ``synthguard.check_image`` message: its fields, their limits, and the one parser that validates it.

The worker's task (``worker.tasks.check_image``) and the producer helper (``worker.client``) both call
:func:`parse_check_request`, so a message the helper sends is one the worker accepts. Pure: no Celery,
database or torch, so a producer can import it. Its one synthguard import is ``worker.netguard``, for the
callback URL's form (that brings httpx).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from worker import netguard

CHECK_IMAGE_TASK: Final = "synthguard.check_image"
# The widths of the columns these fields are stored in (db.tables, which imports SQLAlchemy; a test keeps the
# two in step).
CLIENT_MAX_LEN: Final = 100
EXTERNAL_ID_MAX_LEN: Final = 255
URL_MAX_LEN: Final = 2048
METADATA_MAX_BYTES: Final = 16 * 1024
# The default of SYNTHGUARD_MAX_INLINE_BYTES (worker.settings imports pydantic and SQLAlchemy; a test keeps
# the two in step).
DEFAULT_MAX_INLINE_BYTES: Final = 20 * 1024 * 1024
PAYLOAD_KEYS: Final = frozenset(
    {"image_url", "image_b64", "external_id", "client", "callback_url", "metadata"}
)


class RequestSettings(Protocol):
    """The two worker settings the parser reads (``worker.settings.Settings`` has them)."""

    @property
    def max_inline_bytes(self) -> int: ...

    @property
    def allow_private_hosts(self) -> str: ...


@dataclass(frozen=True)
class RequestLimits:
    """Those two settings alone, for a producer that has no worker configuration; defaults: the worker's."""

    max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES
    allow_private_hosts: str = ""


class InvalidRequestError(ValueError):
    """A check_image message that cannot be processed; ``key``: (client, external_id) if those were valid."""

    def __init__(self, reason: str, key: tuple[str, str] | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


@dataclass(frozen=True)
class CheckRequest:
    client: str
    external_id: str
    image_url: str | None
    image_data: bytes | None
    callback_url: str | None
    metadata: dict[str, Any] | None


def parse_check_request(payload: Mapping[str, Any], settings: RequestSettings) -> CheckRequest:
    """Validate the JSON kwargs of ``synthguard.check_image``; raise InvalidRequestError with the reason."""
    try:
        client = _bounded_text(payload, "client", CLIENT_MAX_LEN, required=True)
        external_id = _bounded_text(payload, "external_id", EXTERNAL_ID_MAX_LEN, required=True)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(str(exc), None) from None
    if client is None or external_id is None:  # pragma: no cover - required=True guarantees both
        raise InvalidRequestError("client and external_id are required", None)
    try:
        return _parse_fields(payload, settings, client, external_id)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(str(exc), (client, external_id)) from None


def decode_base64_image(text: str, max_bytes: int) -> bytes:
    """Bytes of an inline base64 image, refusing oversize input before decoding it."""
    # 4 base64 characters carry 3 bytes; refuse early instead of allocating the decoded copy.
    if len(text) > (max_bytes // 3 + 1) * 4 + 4:
        raise ValueError(f"inline image too large: over {max_bytes} bytes (SYNTHGUARD_MAX_INLINE_BYTES)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image_b64 is not valid base64") from None
    if len(data) > max_bytes:
        raise ValueError(f"inline image too large: {len(data)} bytes > limit {max_bytes}")
    if not data:
        raise ValueError("image_b64 is empty")
    return data


def _parse_fields(
    payload: Mapping[str, Any], settings: RequestSettings, client: str, external_id: str
) -> CheckRequest:
    unknown = sorted(str(name) for name in set(payload) - PAYLOAD_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    image_url = _http_url("image_url", _bounded_text(payload, "image_url", URL_MAX_LEN, required=False))
    image_b64 = payload.get("image_b64")
    if (image_url is None) == (image_b64 is None):
        raise ValueError("exactly one of image_url and image_b64 is required")
    image_data = None
    if image_b64 is not None:
        if not isinstance(image_b64, str):
            raise TypeError(f"image_b64 must be a string, not {type(image_b64).__name__}")
        image_data = decode_base64_image(image_b64, settings.max_inline_bytes)
    callback_url = _callback_url(payload, settings)
    metadata = payload.get("metadata")
    if metadata is not None:
        _check_metadata(metadata)
    return CheckRequest(client, external_id, image_url, image_data, callback_url, metadata)


def _bounded_text(payload: Mapping[str, Any], name: str, max_len: int, *, required: bool) -> str | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{name} must not be empty")
    if len(value) > max_len:
        raise ValueError(f"{name} is longer than {max_len} characters")
    _check_storable(name, value)
    return value


def _check_storable(name: str, text: str) -> None:
    """PostgreSQL's text and JSONB hold neither NUL characters nor lone UTF-16 surrogates; JSON has both."""
    if "\x00" in text:
        raise ValueError(f"{name} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (it holds a lone surrogate)") from None


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    try:
        size = len(json.dumps(metadata, allow_nan=False))
    except ValueError as exc:  # NaN and infinities: Python's json writes them, JSONB refuses them
        raise ValueError(f"metadata is not valid JSON ({exc})") from None
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"metadata is larger than {METADATA_MAX_BYTES} bytes of JSON")
    pending: list[Any] = [metadata]
    while pending:  # every key and string value, at any depth (the size limit bounds the walk)
        value = pending.pop()
        if isinstance(value, dict):
            pending += list(value.keys()) + list(value.values())
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, str):
            _check_storable("metadata", value)


def _http_url(name: str, value: str | None) -> str | None:
    if value is not None and not value.lower().startswith(("http://", "https://")):
        raise ValueError(f"{name} must be an http(s) URL")
    return value


def check_callback_url(url: str, settings: RequestSettings) -> None:
    """Raise ValueError (naming the field) for a callback URL a ``check_image`` message could not carry.

    For other producers of checks (``synthguard enqueue``), so they store only what the task would.
    """
    _callback_url({"callback_url": url}, settings)


def _callback_url(payload: Mapping[str, Any], settings: RequestSettings) -> str | None:
    url = _http_url("callback_url", _bounded_text(payload, "callback_url", URL_MAX_LEN, required=False))
    if url is not None:
        # Its form now (a bad port would fail every delivery); its addresses at every send, after DNS.
        try:
            netguard.check_url_form(url, netguard.HostAllowlist.from_settings(settings))
        except netguard.ForbiddenTargetError as exc:
            raise ValueError(f"callback_url refused: {exc.reason}") from None
    return url


__all__ = [
    "CHECK_IMAGE_TASK",
    "CLIENT_MAX_LEN",
    "DEFAULT_MAX_INLINE_BYTES",
    "EXTERNAL_ID_MAX_LEN",
    "METADATA_MAX_BYTES",
    "PAYLOAD_KEYS",
    "URL_MAX_LEN",
    "CheckRequest",
    "InvalidRequestError",
    "RequestLimits",
    "RequestSettings",
    "check_callback_url",
    "decode_base64_image",
    "parse_check_request",
]
