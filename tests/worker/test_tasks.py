"""A real Celery worker on Redis processes real images end to end into PostgreSQL (never eager mode)."""

from __future__ import annotations

import base64
import socket
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer
from sqlalchemy.orm import Session, sessionmaker

from db.session import session_scope
from db.tables import Check, Evidence, Verdict
from tests.images import photo_bytes
from worker.app import runtime_for
from worker.requests import InvalidRequestError, parse_check_request
from worker.tasks import CHECK_IMAGE_TASK, PROCESS_CHECKS_TASK, retry_countdown

# How long to wait for the worker; a wait bound, not a timing assertion (CPU inference on a shared machine).
WAIT_S = 180.0


def wait_for_check(
    factory: sessionmaker[Session],
    client: str,
    external_id: str,
    statuses: tuple[str, ...] = ("done", "failed"),
) -> Check:
    """Poll the database (the source of truth) until the check reaches one of ``statuses``."""
    deadline = time.monotonic() + WAIT_S
    while True:
        with session_scope(factory) as session:
            check = session.scalars(
                sa.select(Check).where(Check.client == client, Check.external_id == external_id)
            ).one_or_none()
            if check is not None and check.status in statuses:
                return check
        if time.monotonic() > deadline:
            state = "missing" if check is None else f"{check.status} ({check.error})"
            pytest.fail(f"check {client}/{external_id} still {state} after {WAIT_S:.0f} s")
        time.sleep(0.2)


def send(celery_app: Any, **payload: Any) -> None:
    celery_app.send_task(CHECK_IMAGE_TASK, kwargs=payload)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def client_name() -> str:
    return f"platform-{uuid.uuid4().hex[:8]}"


def test_inline_image_end_to_end(celery_worker, celery_app, pg_session_factory, client_name, detector):
    data = photo_bytes("astronaut.png", offset=11)
    send(celery_app, image_b64=b64(data), external_id="a1", client=client_name, metadata={"uploader": 42})
    check = wait_for_check(pg_session_factory, client_name, "a1")
    assert check.status == "done", check.error
    with session_scope(pg_session_factory) as session:
        stored = session.get(Check, check.id)
        assert stored is not None and stored.verdict is not None
        assert stored.verdict.model_id == detector.model_id
        assert stored.metadata_ == {"uploader": 42}
        assert stored.has_inline_image and stored.image_data is None
        groups = session.scalars(
            sa.select(Evidence.group_name).where(Evidence.verdict_id == stored.verdict_id)
        )
        assert {"spectral", "color", "grid"} <= set(groups)


def test_url_end_to_end(celery_worker, celery_app, pg_session_factory, client_name, httpserver: HTTPServer):
    httpserver.expect_request("/u/1.jpg").respond_with_data(
        photo_bytes("coffee.png", offset=21, image_format="JPEG"), content_type="image/jpeg"
    )
    send(celery_app, image_url=httpserver.url_for("/u/1.jpg"), external_id="u1", client=client_name)
    check = wait_for_check(pg_session_factory, client_name, "u1")
    assert check.status == "done", check.error
    assert check.source_url == httpserver.url_for("/u/1.jpg")


def test_resubmission_and_duplicate_bytes(celery_worker, celery_app, pg_session_factory, client_name):
    data = photo_bytes("chelsea.png", offset=33)
    send(celery_app, image_b64=b64(data), external_id="first", client=client_name)
    first = wait_for_check(pg_session_factory, client_name, "first")
    assert first.status == "done", first.error

    # The same (client, external_id) again: the existing check, untouched.
    send(celery_app, image_b64=b64(data), external_id="first", client=client_name)
    # The same bytes under another id: the stored verdict, no second inference.
    send(celery_app, image_b64=b64(data), external_id="second", client=client_name)
    second = wait_for_check(pg_session_factory, client_name, "second")
    assert second.status == "done", second.error
    assert second.verdict_id == first.verdict_id

    with session_scope(pg_session_factory) as session:
        rows = session.scalars(sa.select(Check).where(Check.client == client_name)).all()
        assert sorted(check.external_id for check in rows) == ["first", "second"]
        assert session.get(Check, first.id).attempts == 1  # type: ignore[union-attr]
        sha = first.sha256
        assert (
            session.scalar(sa.select(sa.func.count()).select_from(Verdict).where(Verdict.sha256 == sha)) == 1
        )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"image_b64": b64(b"GIF89a but not really an image")}, "not analysable"),
        ({"image_url": "http://169.254.169.254/latest/meta-data/iam"}, "fetch failed: refused"),
        ({"image_url": "http://10.20.30.40/a.png"}, "fetch failed: refused"),
        ({"image_b64": 12345}, "invalid request: image_b64 must be a string"),
        ({"image_b64": "!!!"}, "invalid request: image_b64 is not valid base64"),
        ({"image_url": "ftp://example.com/a.png"}, "invalid request: image_url must be an http(s) URL"),
        ({}, "invalid request: exactly one of image_url and image_b64 is required"),
        (
            {"image_url": "https://example.com/a.png", "colour": "red"},
            "invalid request: unknown field(s): colour",
        ),
        # JSON carries these; PostgreSQL's text and JSONB columns refuse them.
        (
            {"image_url": "https://example.com/a\x00.png"},
            "invalid request: image_url must not contain NUL characters",
        ),
        (
            {"image_url": "https://example.com/a.png", "metadata": {"note": ["a\x00b"]}},
            "invalid request: metadata must not contain NUL characters",
        ),
        (
            {"image_url": "https://example.com/a.png", "metadata": {"\ud800": 1}},
            "invalid request: metadata is not valid Unicode",
        ),
        (
            {"image_url": "https://example.com/a.png", "metadata": {"x": float("nan")}},
            "invalid request: metadata is not valid JSON",
        ),
        (
            {"image_url": "https://example.com/a.png", "callback_url": "https://hooks.example:8080:9/cb"},
            "invalid request: callback_url refused: invalid URL",
        ),
    ],
)
def test_bad_inputs_end_as_stored_readable_failures(  # noqa: PLR0917 - fixtures and parameters
    celery_worker, celery_app, pg_session_factory, client_name, payload, reason
):
    send(celery_app, external_id="bad", client=client_name, **payload)
    check = wait_for_check(pg_session_factory, client_name, "bad")
    assert check.status == "failed"
    assert check.error is not None and reason in check.error, check.error


def test_unreachable_url_is_retried_then_failed(celery_worker, celery_app, pg_session_factory, client_name):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    send(celery_app, image_url=f"http://127.0.0.1:{port}/x.png", external_id="gone", client=client_name)
    check = wait_for_check(pg_session_factory, client_name, "gone", statuses=("failed",))
    assert check.error is not None and check.error.startswith("fetch failed: network error")
    settings = runtime_for(celery_app).settings
    assert check.attempts == settings.fetch_retries + 1


def test_an_invalid_duplicate_message_leaves_the_existing_check_alone(
    celery_worker, celery_app, pg_session_factory, client_name
):
    """A producer that resends a key with a broken payload does not fail the check its first message made."""
    from db.queries import get_or_create_check

    with session_scope(pg_session_factory) as session:
        check, _ = get_or_create_check(
            session, client=client_name, external_id="first", image_data=photo_bytes(offset=66)
        )
        check_id = check.id
    send(celery_app, image_b64="!!!", external_id="first", client=client_name)
    # The solo worker takes messages in order: once this one is stored, the duplicate has been handled.
    send(celery_app, image_b64="!!!", external_id="marker", client=client_name)
    assert wait_for_check(pg_session_factory, client_name, "marker").status == "failed"
    with session_scope(pg_session_factory) as session:
        first = session.get_one(Check, check_id)
        # Still queued, or done if the reconciler sent it meanwhile: never failed by the duplicate.
        assert first.status != "failed" and first.error is None, first.error


def test_fetch_retry_backoff_is_capped(settings):
    """Exponential backoff with full jitter, never past retry_backoff_max_s however many retries before."""
    capped = settings.model_copy(update={"retry_backoff_max_s": 60})
    for retries in range(12):
        ceiling = min(60.0, 2.0 ** (retries + 1))
        assert ceiling / 2 <= retry_countdown(retries, capped) <= ceiling, retries


def test_messages_without_a_key_are_refused_and_the_worker_keeps_serving(
    celery_worker, celery_app, pg_session_factory, client_name
):
    send(celery_app, image_b64=b64(b"x"), client=client_name)  # no external_id: nothing to store, logged
    celery_app.send_task(CHECK_IMAGE_TASK, args=["positional"])
    celery_app.send_task(PROCESS_CHECKS_TASK, kwargs={"check_ids": "not-a-list"})
    send(celery_app, image_b64=b64(photo_bytes(offset=44)), external_id="after", client=client_name)
    assert wait_for_check(pg_session_factory, client_name, "after").status == "done"


def test_process_checks_works_on_existing_rows(celery_worker, celery_app, pg_session_factory, client_name):
    from db.queries import get_or_create_check

    with session_scope(pg_session_factory) as session:
        check, _ = get_or_create_check(
            session, client=client_name, external_id="existing", image_data=photo_bytes(offset=55)
        )
        check_id = check.id
    celery_app.send_task(PROCESS_CHECKS_TASK, kwargs={"check_ids": [str(check_id)]})
    assert wait_for_check(pg_session_factory, client_name, "existing").status == "done"


def test_oversized_inline_images_are_refused_before_decoding(settings):
    small = settings.model_copy(update={"max_inline_bytes": 1000})
    with pytest.raises(InvalidRequestError, match="too large") as caught:
        parse_check_request({"client": "c", "external_id": "e", "image_b64": b64(b"x" * 5000)}, small)
    assert caught.value.key == ("c", "e")
    with pytest.raises(InvalidRequestError, match="client is longer than 100") as caught:
        parse_check_request({"client": "c" * 101, "external_id": "e", "image_b64": "eA=="}, small)
    assert caught.value.key is None


def test_a_key_the_database_cannot_store_is_refused_without_a_row(settings):
    for external_id, reason in [("e\x00", "NUL characters"), ("e\udc80", "lone surrogate")]:
        with pytest.raises(InvalidRequestError, match=reason) as caught:
            parse_check_request({"client": "c", "external_id": external_id, "image_b64": "eA=="}, settings)
        assert caught.value.key is None


def test_python_client_submits_to_the_worker(
    celery_worker, settings, pg_session_factory, client_name, tmp_path
):
    from worker.client import submit_check

    path = tmp_path / "upload.png"
    path.write_bytes(photo_bytes("rocket.jpg", offset=120))
    task_id = submit_check(
        settings.broker_url, queue=settings.queue_name, client=client_name, external_id="py", image_path=path
    )
    assert task_id
    assert wait_for_check(pg_session_factory, client_name, "py").status == "done"


def test_an_unexpected_pipeline_error_is_stored_not_lost(
    celery_worker, celery_app, pg_session_factory, client_name, monkeypatch
):
    # Fault injection: the pipeline step raises what no handler expects (a bug). The worker thread runs in
    # this process, so patching the module attribute reaches it.
    def broken_run(*args, **kwargs):
        raise KeyError("simulated bug")

    monkeypatch.setattr("worker.tasks.pipeline.run", broken_run)
    send(celery_app, image_b64=b64(photo_bytes(offset=160)), external_id="bug", client=client_name)
    check = wait_for_check(pg_session_factory, client_name, "bug")
    assert check.status == "failed"
    assert check.error == "internal error: KeyError: 'simulated bug'"
    assert check.attempts == 1
