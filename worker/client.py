"""A small producer helper: submit an image check from Python without running synthguard's worker code.

    from worker.client import submit_check
    submit_check("redis://localhost:6379/0", client="my-platform", external_id="upload-123",
                 image_url="https://cdn.example.com/u/123.jpg")

Any Celery producer can do the same with ``send_task("synthguard.check_image", kwargs={...})``; this helper
first runs the worker's own parser (``worker.requests``) on the message, so a message the worker would refuse
is refused here instead of travelling through Redis to become a failed check. Imports Celery and httpx (for
the callback URL check); no database, no torch.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from celery import Celery

from worker.requests import (
    CHECK_IMAGE_TASK,
    DEFAULT_MAX_INLINE_BYTES,
    RequestLimits,
    parse_check_request,
)

DEFAULT_QUEUE: Final = "synthguard"
QUEUE_ENV: Final = "SYNTHGUARD_QUEUE_NAME"
CELERY_DEFAULT_QUEUE: Final = "celery"


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
    allow_private_hosts: str = "",
) -> dict[str, Any]:
    """The JSON kwargs of ``synthguard.check_image``, checked by the parser the worker runs on them.

    Raises ValueError, naming the field, for everything that parser refuses: a field of the wrong type; a
    blank ``client`` or ``external_id``, or one over 100 or 255 characters; NUL characters or lone
    surrogates in any text, metadata included; a URL that is not http(s) or is over 2048 characters; a
    ``callback_url`` whose form ``worker.netguard`` refuses (user information, a privileged port other than 80
    and 443, no host); ``metadata`` that is not a JSON object, holds NaN or infinity, or is over 16 KiB as
    JSON; an empty inline image or one over ``max_inline_bytes``. Also ValueError unless exactly one image
    source is given, and the OSError of an unreadable ``image_path``.

    Two limits are worker settings, which this helper cannot see. The defaults are the worker's defaults; pass
    the worker's values if it sets others: ``max_inline_bytes`` (SYNTHGUARD_MAX_INLINE_BYTES) and
    ``allow_private_hosts`` (SYNTHGUARD_ALLOW_PRIVATE_HOSTS: a callback to a host listed there by name may use
    any port).

    Not checked here, as the worker checks them later and not when the message arrives: where the image and
    callback hosts resolve to (at each fetch or delivery, after DNS), and whether the bytes are an image.
    """
    sources = sum(value is not None for value in (image_url, image_bytes, image_path))
    if sources != 1:
        raise ValueError("give exactly one of image_url, image_bytes and image_path")
    payload: dict[str, Any] = {"client": client, "external_id": external_id}
    stand_in: str | None = None
    if image_url is not None:
        payload["image_url"] = image_url
    else:
        # The parser would refuse an oversized image too; checking first avoids reading and encoding it.
        if image_path is not None:
            path = Path(image_path)
            size = path.stat().st_size
            if size > max_inline_bytes:
                raise ValueError(f"inline image too large: {size} bytes > limit {max_inline_bytes}")
            image_bytes = path.read_bytes()
        assert image_bytes is not None  # noqa: S101 - exactly one source was given
        if len(image_bytes) > max_inline_bytes:
            raise ValueError(f"inline image too large: {len(image_bytes)} bytes > limit {max_inline_bytes}")
        payload["image_b64"] = base64.b64encode(image_bytes).decode("ascii")
        stand_in = base64.b64encode(image_bytes[:3]).decode("ascii")
    if callback_url is not None:
        payload["callback_url"] = callback_url
    if metadata is not None:
        # A copy of a mapping; anything else goes to the parser as it is, to be refused with the field's name.
        payload["metadata"] = dict(metadata) if isinstance(metadata, Mapping) else metadata
    # The image was size-checked above and encoded here: the parser reads its first three bytes instead of
    # decoding megabytes just encoded, which doubled the peak memory (an empty image is still refused).
    checked = payload if stand_in is None else {**payload, "image_b64": stand_in}
    parse_check_request(checked, RequestLimits(max_inline_bytes, allow_private_hosts))
    return payload


def submit_check(
    producer: Celery | str,
    *,
    queue: str | None = None,
    **fields: Any,
) -> str:
    """Validate and send one check; returns the Celery task id. ``producer``: a Celery app or a broker URL.

    ``queue``: the workers' queue; by default ``SYNTHGUARD_QUEUE_NAME`` from the environment, as the workers
    read it, else the default queue configured on ``producer`` when it is an app (a synthguard app's), else
    ``synthguard`` (a message sent to a queue no worker consumes waits there unseen).
    The check's result lands in the database (and in webhooks); the task id only identifies the message.
    Fields are those of :func:`build_check_payload`, which raises ValueError before anything is sent.
    """
    payload = build_check_payload(**fields)
    configured = producer.conf.task_default_queue if isinstance(producer, Celery) else None
    if configured == CELERY_DEFAULT_QUEUE:  # an app nobody pointed at synthguard's queue
        configured = None
    queue = queue or os.environ.get(QUEUE_ENV) or configured or DEFAULT_QUEUE
    if isinstance(producer, Celery):
        return str(producer.send_task(CHECK_IMAGE_TASK, kwargs=payload, queue=queue).id)
    with Celery("synthguard-producer", broker=producer, set_as_current=False) as app:
        app.conf.update(
            task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True
        )
        return str(app.send_task(CHECK_IMAGE_TASK, kwargs=payload, queue=queue).id)


__all__ = [
    "CHECK_IMAGE_TASK",
    "DEFAULT_MAX_INLINE_BYTES",
    "DEFAULT_QUEUE",
    "build_check_payload",
    "submit_check",
]
