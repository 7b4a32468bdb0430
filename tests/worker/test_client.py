"""The producer helper (worker.client) refuses, before sending, what the worker's parser refuses."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
import uuid
from typing import Any

import pytest
import redis
from kombu.utils.json import dumps as celery_json_dumps
from kombu.utils.json import loads as celery_json_loads

from db import tables
from worker import client
from worker.requests import (
    CLIENT_MAX_LEN,
    DEFAULT_MAX_INLINE_BYTES,
    EXTERNAL_ID_MAX_LEN,
    METADATA_MAX_BYTES,
    URL_MAX_LEN,
    InvalidRequestError,
    decode_base64_image,
    parse_check_request,
)
from worker.settings import Settings

VALID_FIELDS: dict[str, Any] = {
    "client": "acme",
    "external_id": "upload-1",
    "image_url": "https://images.example.com/u/1.png",
}
# The worker whose parser the client must agree with: a small inline limit, one host allowed on any port.
WORKER_SETTINGS = Settings(
    database_url="sqlite:///unused.db", max_inline_bytes=1000, allow_private_hosts="hooks.internal"
)


def test_the_client_imports_neither_the_database_code_nor_torch():
    # A fresh interpreter: this test process has imported everything already.
    code = "import json, sys; import worker.client; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True
    )
    loaded = {name.split(".")[0] for name in json.loads(result.stdout.strip().splitlines()[-1])}
    assert "celery" in loaded  # the probe sees the imports it should
    forbidden = {
        "torch",
        "numpy",
        "PIL",
        "models",
        "db",
        "sqlalchemy",
        "psycopg",
        "pydantic",
        "pydantic_settings",
    }
    assert not loaded & forbidden, sorted(loaded & forbidden)


def test_the_limits_are_the_database_columns_and_the_settings_defaults():
    assert (CLIENT_MAX_LEN, EXTERNAL_ID_MAX_LEN, URL_MAX_LEN) == (
        tables.CLIENT_MAX_LEN,
        tables.EXTERNAL_ID_MAX_LEN,
        tables.URL_MAX_LEN,
    )
    assert Settings.model_fields["max_inline_bytes"].default == DEFAULT_MAX_INLINE_BYTES
    assert Settings.model_fields["allow_private_hosts"].default == ""


@pytest.mark.parametrize(
    ("bad_field", "field_name"),
    [
        pytest.param({"client": "   "}, "client", id="blank client"),
        pytest.param({"external_id": "upload\x001"}, "external_id", id="NUL in external_id"),
        pytest.param({"metadata": {"score": math.nan}}, "metadata", id="NaN in metadata"),
        pytest.param({"metadata": {"notes": "x" * 17 * 1024}}, "metadata", id="17 KiB of metadata"),
        pytest.param(
            {"callback_url": "https://hooks.example.com:22/h"}, "callback_url", id="callback on port 22"
        ),
    ],
)
def test_submit_check_refuses_before_sending(redis_url, bad_field, field_name):
    queue = f"synthguard-client-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match=rf"^{field_name} ") as caught:
            client.submit_check(redis_url, queue=queue, **(VALID_FIELDS | bad_field))
        assert isinstance(caught.value, InvalidRequestError)  # the worker's own refusal, not a look-alike
        assert broker.llen(queue) == 0
        # The same message without the bad field lands in the list just read: an empty queue meant "not sent".
        client.submit_check(redis_url, queue=queue, **VALID_FIELDS)
        assert broker.llen(queue) == 1
    finally:
        broker.delete(queue)
        broker.close()


def test_submit_check_through_a_synthguard_app_uses_its_queue(redis_url, settings, monkeypatch):
    from worker.app import create_celery_app, runtime_for

    monkeypatch.delenv("SYNTHGUARD_QUEUE_NAME", raising=False)
    queue = f"synthguard-client-app-{uuid.uuid4().hex[:8]}"
    app = create_celery_app(settings.model_copy(update={"queue_name": queue}))
    broker = redis.Redis.from_url(redis_url)
    try:
        client.submit_check(app, **VALID_FIELDS)
        assert broker.llen(queue) == 1
    finally:
        broker.delete(queue)
        broker.close()
        runtime_for(app).engine.dispose()


def test_submit_check_sends_to_the_queue_the_workers_read(redis_url, monkeypatch):
    """An operator who renamed the queue gets the helper's messages where the workers consume them."""
    queue = f"synthguard-client-env-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("SYNTHGUARD_QUEUE_NAME", queue)
    broker = redis.Redis.from_url(redis_url)
    try:
        client.submit_check(redis_url, **VALID_FIELDS)
        assert broker.llen(queue) == 1
        assert broker.llen("synthguard") == 0
    finally:
        broker.delete(queue)
        broker.close()


def _on_the_wire(fields: dict[str, Any]) -> dict[str, Any]:
    """The check_image kwargs the worker receives for these client fields: base64 image, Celery's JSON."""
    message = dict(fields)
    if "image_bytes" in message:
        message["image_b64"] = base64.b64encode(message.pop("image_bytes")).decode("ascii")
    return celery_json_loads(celery_json_dumps(message))


def _metadata_of_json_size(size: int) -> dict[str, str]:
    metadata = {"k": ""}
    metadata["k"] = "v" * (size - len(json.dumps(metadata)))
    assert len(json.dumps(metadata)) == size
    return metadata


# (a change to the valid client fields, whether the client's message is the worker's reason word for word).
# The accepted ones sit just inside a limit that a refused one crosses.
AGREEMENT_CASES = [
    pytest.param({"client": "   "}, True, id="blank client"),
    pytest.param({"client": ""}, True, id="empty client"),
    pytest.param({"client": 7}, True, id="client not a string"),
    pytest.param({"client": "c" * 101}, True, id="client over 100"),
    pytest.param({"client": "c" * 100}, True, id="client of 100"),
    pytest.param({"external_id": "upload\x001"}, True, id="NUL in external_id"),
    pytest.param({"external_id": "upload\udc80"}, True, id="lone surrogate in external_id"),
    pytest.param({"external_id": "e" * 256}, True, id="external_id over 255"),
    pytest.param({"image_url": "file:///etc/passwd"}, True, id="image_url not http"),
    pytest.param({"image_url": "https://a.example/" + "p" * 2048}, True, id="image_url over 2048"),
    pytest.param({"image_url": None, "image_bytes": b""}, True, id="empty inline image"),
    pytest.param({"image_url": None, "image_bytes": b"x" * 1001}, False, id="inline image over the limit"),
    pytest.param({"image_url": None, "image_bytes": b"x" * 1000}, True, id="inline image at the limit"),
    pytest.param({"image_url": None}, False, id="no image"),
    pytest.param({"image_bytes": b"x"}, False, id="two images"),
    pytest.param({"callback_url": "ftp://hooks.example.com/h"}, True, id="callback not http"),
    pytest.param({"callback_url": "https://hooks.example.com:22/h"}, True, id="callback on port 22"),
    pytest.param({"callback_url": "https://hooks.example.com:8443/h"}, True, id="callback on port 8443"),
    pytest.param(
        {"callback_url": "https://hooks.internal:22/h"}, True, id="callback on port 22, allowed host"
    ),
    pytest.param({"callback_url": "https://user@hooks.example.com/h"}, True, id="callback with user info"),
    pytest.param({"callback_url": "https://hooks.example.com/a b"}, True, id="callback with a space"),
    pytest.param({"callback_url": "https://:443/h"}, True, id="callback without a host"),
    pytest.param({"metadata": [1, 2]}, True, id="metadata not an object"),
    pytest.param({"metadata": {"score": math.nan}}, True, id="NaN in metadata"),
    pytest.param({"metadata": {"score": -math.inf}}, True, id="infinity in metadata"),
    pytest.param({"metadata": {"notes": "x" * 17 * 1024}}, True, id="17 KiB of metadata"),
    pytest.param(
        {"metadata": _metadata_of_json_size(METADATA_MAX_BYTES + 1)}, True, id="metadata 1 byte over"
    ),
    pytest.param({"metadata": _metadata_of_json_size(METADATA_MAX_BYTES)}, True, id="metadata at the limit"),
    pytest.param({"metadata": {"a\x00": 1}}, True, id="NUL in a metadata key"),
    pytest.param({"metadata": {"a": [{"b": "\ud800"}]}}, True, id="lone surrogate deep in metadata"),
]


@pytest.mark.parametrize(("change", "same_words"), AGREEMENT_CASES)
def test_the_client_and_the_worker_refuse_the_same_messages(change, same_words):
    fields = {key: value for key, value in (VALID_FIELDS | change).items() if value is not None}
    try:
        parse_check_request(_on_the_wire(fields), WORKER_SETTINGS)
    except InvalidRequestError as exc:
        worker_refusal: str | None = exc.reason
    else:
        worker_refusal = None
    try:
        payload = client.build_check_payload(
            **fields,
            max_inline_bytes=WORKER_SETTINGS.max_inline_bytes,
            allow_private_hosts=WORKER_SETTINGS.allow_private_hosts,
        )
    except ValueError as exc:
        client_refusal: str | None = str(exc)
    else:
        client_refusal = None
        assert _on_the_wire(payload) == _on_the_wire(fields)  # what was checked is what is sent
    assert (client_refusal is None) == (worker_refusal is None), (client_refusal, worker_refusal)
    if same_words:
        assert client_refusal == worker_refusal


def test_the_worker_task_uses_the_shared_parser():
    from worker import tasks

    assert tasks.parse_check_request is parse_check_request
    assert tasks.CHECK_IMAGE_TASK is client.CHECK_IMAGE_TASK


def test_without_the_workers_allowlist_the_client_assumes_the_default():
    fields = VALID_FIELDS | {"callback_url": "https://hooks.internal:22/h"}
    with pytest.raises(ValueError, match="callback_url refused: port 22"):
        client.build_check_payload(**fields)
    assert client.build_check_payload(**fields, allow_private_hosts="hooks.internal")["callback_url"]


def test_the_client_reads_neither_an_oversized_file_nor_a_missing_one(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2000)
    with pytest.raises(ValueError, match="too large: 2000 bytes > limit 1000"):
        client.build_check_payload(client="c", external_id="e", image_path=big, max_inline_bytes=1000)
    with pytest.raises(FileNotFoundError):
        client.build_check_payload(client="c", external_id="e", image_path=tmp_path / "missing.png")
    payload = client.build_check_payload(client="c", external_id="e", image_bytes=b"abc", metadata={"k": 1})
    assert payload == {"client": "c", "external_id": "e", "image_b64": "YWJj", "metadata": {"k": 1}}


def test_base64_images_are_decoded_within_the_limit():
    assert decode_base64_image(base64.b64encode(b"abc").decode(), 10) == b"abc"
    with pytest.raises(ValueError, match="too large"):
        decode_base64_image(base64.b64encode(b"x" * 11).decode(), 10)
    with pytest.raises(ValueError, match="too large: over 10 bytes"):  # refused by its length, not decoded
        decode_base64_image("A" * 1000, 10)
    with pytest.raises(ValueError, match="not valid base64"):
        decode_base64_image("not base64!!", 100)
    with pytest.raises(ValueError, match="empty"):
        decode_base64_image("", 100)
