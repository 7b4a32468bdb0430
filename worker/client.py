"""A small producer helper: submit an image check from Python without running synthguard's worker code.

    from worker.client import submit_check
    submit_check("redis://localhost:6379/0", client="my-platform", external_id="upload-123",
                 image_url="https://cdn.example.com/u/123.jpg")

Any Celery producer can do the same with ``send_task("synthguard.check_image", kwargs={...})``; this helper
validates the payload first, so an oversized inline image is refused here instead of travelling through Redis.
Imports only Celery (no database, no torch).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from celery import Celery

CHECK_IMAGE_TASK: Final = "synthguard.check_image"
DEFAULT_QUEUE: Final = "synthguard"
DEFAULT_MAX_INLINE_BYTES: Final = 20 * 1024 * 1024
# The worker's limits (db.tables); a test keeps the two in step.
CLIENT_MAX_LEN: Final = 100
EXTERNAL_ID_MAX_LEN: Final = 255
URL_MAX_LEN: Final = 2048


def build_check_payload(
    *,
    client: str,
    external_id: str,
    image_url: str | None = None,
    image_bytes: bytes | None = None,
    image_path: str | Path | None = None,
    callback_url: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES,
) -> dict[str, Any]:
    """The JSON kwargs of ``synthguard.check_image``; ValueError for anything the worker would refuse."""
    if not client or len(client) > CLIENT_MAX_LEN:
        raise ValueError(f"client must be 1..{CLIENT_MAX_LEN} characters")
    if not external_id or len(external_id) > EXTERNAL_ID_MAX_LEN:
        raise ValueError(f"external_id must be 1..{EXTERNAL_ID_MAX_LEN} characters")
    sources = sum(value is not None for value in (image_url, image_bytes, image_path))
    if sources != 1:
        raise ValueError("give exactly one of image_url, image_bytes and image_path")
    payload: dict[str, Any] = {"client": client, "external_id": external_id}
    if image_url is not None:
        _check_url("image_url", image_url)
        payload["image_url"] = image_url
    else:
        if image_path is not None:
            path = Path(image_path)
            size = path.stat().st_size
            if size > max_inline_bytes:
                raise ValueError(f"inline image too large: {size} bytes > limit {max_inline_bytes}")
            image_bytes = path.read_bytes()
        assert image_bytes is not None  # noqa: S101 - exactly one source was given
        if len(image_bytes) > max_inline_bytes:
            raise ValueError(f"inline image too large: {len(image_bytes)} bytes > limit {max_inline_bytes}")
        if not image_bytes:
            raise ValueError("the inline image is empty")
        payload["image_b64"] = base64.b64encode(image_bytes).decode("ascii")
    if callback_url is not None:
        _check_url("callback_url", callback_url)
        payload["callback_url"] = callback_url
    if metadata is not None:
        payload["metadata"] = dict(metadata)
    return payload


def _check_url(name: str, url: str) -> None:
    if len(url) > URL_MAX_LEN or not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"{name} must be an http(s) URL of at most {URL_MAX_LEN} characters")


def submit_check(
    producer: Celery | str,
    *,
    queue: str = DEFAULT_QUEUE,
    **fields: Any,
) -> str:
    """Validate and send one check; returns the Celery task id. ``producer``: a Celery app or a broker URL.

    The check's result lands in the database (and in webhooks); the task id only identifies the message.
    Fields are those of :func:`build_check_payload`.
    """
    payload = build_check_payload(**fields)
    if isinstance(producer, Celery):
        return str(producer.send_task(CHECK_IMAGE_TASK, kwargs=payload, queue=queue).id)
    with Celery("synthguard-producer", broker=producer, set_as_current=False) as app:
        app.conf.update(
            task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True
        )
        return str(app.send_task(CHECK_IMAGE_TASK, kwargs=payload, queue=queue).id)


__all__ = ["build_check_payload", "submit_check"]
