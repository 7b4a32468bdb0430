"""The pipeline called directly (no Celery), with the real detector, on PostgreSQL and SQLite."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer
from sqlalchemy.orm import Session, sessionmaker

from db.queries import get_or_create_check
from db.session import make_engine, make_session_factory, session_scope
from db.tables import Check, Evidence, Verdict
from db.webhook_tables import WebhookDelivery
from models import ImageInput
from tests.images import noise_bytes, photo_bytes
from worker import pipeline
from worker.fetch import FetchError
from worker.settings import Settings
from worker.webhook_endpoints import create_endpoint
from worker.webhooks import EVENT_COMPLETED, EVENT_FAILED, EVENT_FLAGGED, SecretCipher


class CountingDetector:
    """The real detector, counting the images it is asked to analyse (to prove verdict reuse)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.images = 0

    name = property(lambda self: self.inner.name)
    version = property(lambda self: self.inner.version)
    model_id = property(lambda self: self.inner.model_id)
    cfg = property(lambda self: self.inner.cfg)

    def detect(self, images: Sequence[Any]) -> list[Any]:
        self.images += len(images)
        detections: list[Any] = self.inner.detect(images)
        return detections


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
        engine = make_engine(url)
        yield make_session_factory(engine)
        engine.dispose()
    else:
        request.getfixturevalue("pg_clean")
        yield request.getfixturevalue("pg_session_factory")


@pytest.fixture
def counting(detector: Any) -> CountingDetector:
    return CountingDetector(detector)


def submit(factory: sessionmaker[Session], **fields: Any) -> uuid.UUID:
    fields.setdefault("client", "tests")
    fields.setdefault("external_id", uuid.uuid4().hex)
    with session_scope(factory) as session:
        check, _ = get_or_create_check(session, **fields)
        return check.id


def process(
    factory: sessionmaker[Session],
    detector: Any,
    ids: list[uuid.UUID],
    settings: Settings,
    **options: Any,
) -> pipeline.PipelineResult:
    """What the task wrapper does: the claim committed first, then the work in a second transaction."""
    with session_scope(factory) as session:
        claimed = pipeline.claim(session, ids, settings)
    with session_scope(factory) as session:
        return pipeline.run(session, detector, claimed.check_ids, settings, **options)


def load(factory: sessionmaker[Session], check_id: uuid.UUID) -> Check:
    with session_scope(factory) as session:
        check = session.get(Check, check_id)
        assert check is not None
        return check


def test_photos_get_a_verdict_with_evidence_and_hashes(factory, counting, settings):
    data = [photo_bytes("astronaut.png", offset=0), photo_bytes("coffee.png", offset=40)]
    ids = [submit(factory, image_data=item) for item in data]

    result = process(factory, counting, ids, settings)

    assert [outcome.status for outcome in result.outcomes] == ["done", "done"]
    assert counting.images == 2
    for check_id in ids:
        check = load(factory, check_id)
        assert check.status == "done" and check.error is None and check.attempts == 1
        assert check.verdict is not None
        assert check.verdict.model_id == counting.model_id
        assert 0.0 <= check.verdict.score <= 1.0
        assert check.verdict.verdict in ("generated", "real", "uncertain")
        assert check.phash is not None and len(check.phash) == 64
        assert check.sha256 is not None and len(check.sha256) == 64
        assert check.finished_at is not None
    with session_scope(factory) as session:
        groups = set(session.scalars(sa.select(Evidence.group_name)).all())
        assert {"spectral", "color", "grid"} <= groups
        # Raw bytes are not kept unless SYNTHGUARD_STORE_RAW_IMAGES asks for it.
        stored = session.scalars(sa.select(Check.image_data).where(Check.id.in_(ids))).all()
        assert stored == [None, None]


def test_scores_match_the_detector_called_directly(factory, detector, settings):
    import io

    from PIL import Image

    data = photo_bytes("chelsea.png", offset=10)
    check_id = submit(factory, image_data=data)
    process(factory, detector, [check_id], settings)
    expected = detector.detect([ImageInput(image=Image.open(io.BytesIO(data)).convert("RGB"), data=data)])[0]
    verdict = load(factory, check_id).verdict
    assert verdict is not None
    assert verdict.score == pytest.approx(expected.score, abs=1e-4)
    assert verdict.verdict == expected.verdict


def test_same_bytes_under_another_id_reuse_the_verdict(factory, counting, settings):
    data = photo_bytes("astronaut.png", offset=64)
    first = submit(factory, image_data=data, external_id="first")
    process(factory, counting, [first], settings)
    assert counting.images == 1

    second = submit(factory, image_data=data, external_id="second")
    result = process(factory, counting, [second], settings)

    assert counting.images == 1  # no second inference
    assert result.outcomes[0].reused_verdict
    assert load(factory, first).verdict_id == load(factory, second).verdict_id
    assert load(factory, second).phash == load(factory, first).phash
    with session_scope(factory) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Verdict)) == 1


def test_same_bytes_twice_in_one_batch_are_analysed_once(factory, counting, settings):
    data = photo_bytes("coffee.png", offset=100)
    ids = [submit(factory, image_data=data) for _ in range(3)]
    result = process(factory, counting, ids, settings)
    assert counting.images == 1
    assert len({load(factory, check_id).verdict_id for check_id in ids}) == 1
    # The oldest check's verdict is its own analysis; the two others reuse it.
    assert [(o.check_id, o.reused_verdict) for o in result.outcomes] == list(
        zip(ids, [False, True, True], strict=True)
    )


def test_resubmission_returns_the_existing_check(factory):
    first = submit(factory, image_data=b"x", external_id="dup")
    second = submit(factory, image_data=b"y", external_id="dup")
    assert first == second
    with session_scope(factory) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Check)) == 1


def test_a_non_image_is_a_stored_readable_failure(factory, counting, settings):
    check_id = submit(factory, image_data=b"%PDF-1.7 definitely not an image")
    result = process(factory, counting, [check_id], settings)
    check = load(factory, check_id)
    assert check.status == "failed"
    assert check.error is not None and check.error.startswith("not analysable:")
    assert result.outcomes[0].status == "failed"
    assert counting.images == 0


def test_an_image_over_the_pixel_limit_is_refused(factory, counting, settings):
    check_id = submit(factory, image_data=noise_bytes(size=200))  # 40,000 pixels
    process(factory, counting, [check_id], settings.model_copy(update={"max_pixels": 10_000}))
    check = load(factory, check_id)
    assert check.status == "failed"
    assert check.error is not None and "pixel" in check.error.lower()
    assert counting.images == 0


def test_a_private_address_is_refused_without_the_allowlist(factory, counting, settings):
    strict = settings.model_copy(update={"allow_private_hosts": ""})
    ids = [
        submit(factory, source_url="http://127.0.0.1:9/image.png"),
        submit(factory, source_url="http://169.254.169.254/latest/meta-data/"),
        submit(factory, source_url="http://10.1.2.3/cat.jpg"),
    ]
    process(factory, counting, ids, strict, retry_transient=True)
    for check_id in ids:
        check = load(factory, check_id)
        assert check.status == "failed"  # refused is permanent: no retry
        assert check.error is not None and check.error.startswith("fetch failed: refused")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_url_is_retried_then_fails(factory, counting, settings):
    url = f"http://127.0.0.1:{_closed_port()}/gone.png"
    check_id = submit(factory, source_url=url)

    first = process(factory, counting, [check_id], settings, retry_transient=True)
    assert first.retry_ids == [check_id]
    check = load(factory, check_id)
    assert check.status == "queued"
    assert check.error is not None and check.error.startswith(pipeline.RETRY_WAIT_PREFIX)

    process(factory, counting, [check_id], settings, retry_transient=False)
    check = load(factory, check_id)
    assert check.status == "failed"
    assert check.error is not None and check.error.startswith("fetch failed:")
    assert check.attempts == 2


def test_a_fetch_that_succeeds_on_retry_leaves_no_stale_error(factory, counting, settings):
    """The retry-wait note of the failed attempt goes once the retry gets a verdict."""
    check_id = submit(factory, source_url="https://images.example/flaky.png")
    answers: list[FetchError | bytes] = [
        FetchError("server answered HTTP 503 Service Unavailable", transient=True),
        photo_bytes("coffee.png", offset=81),
    ]

    def flaky(url: str, _settings: Any) -> bytes:
        answer = answers.pop(0)
        if isinstance(answer, FetchError):
            raise answer
        return answer

    process(factory, counting, [check_id], settings, fetcher=flaky, retry_transient=True)
    error = load(factory, check_id).error
    assert error is not None and error.startswith(pipeline.RETRY_WAIT_PREFIX)

    process(factory, counting, [check_id], settings, fetcher=flaky, retry_transient=True)
    check = load(factory, check_id)
    assert (check.status, check.error, check.attempts) == ("done", None, 2)


def test_an_image_url_is_fetched_and_analysed(factory, counting, settings, httpserver: HTTPServer):
    data = photo_bytes("rocket.jpg", offset=30, image_format="JPEG")
    httpserver.expect_request("/upload.jpg").respond_with_data(data, content_type="image/jpeg")
    check_id = submit(factory, source_url=httpserver.url_for("/upload.jpg"))
    process(factory, counting, [check_id], settings)
    check = load(factory, check_id)
    assert check.status == "done", check.error
    assert check.source_url is not None and check.has_inline_image is False
    assert counting.images == 1


def test_a_check_that_keeps_dying_is_dead_lettered(factory, counting, settings):
    check_id = submit(factory, image_data=photo_bytes(offset=5))
    limited = settings.model_copy(update={"max_attempts": 2})
    for _ in range(2):  # two claims whose work never finished (the process died)
        with session_scope(factory) as session:
            assert pipeline.claim(session, [check_id], limited).check_ids == [check_id]
    with session_scope(factory) as session:
        claim = pipeline.claim(session, [check_id], limited)
    assert claim.check_ids == [] and claim.dead_lettered == [check_id]
    check = load(factory, check_id)
    assert check.status == "failed"
    assert check.error is not None and "dead-lettered" in check.error and check.attempts == 2
    # A failure ends the check like a verdict does: the inline bytes are not kept (README: "held only until
    # the check is processed"), whichever way it failed.
    with session_scope(factory) as session:
        assert session.scalar(sa.select(Check.image_data).where(Check.id == check_id)) is None


def test_a_dead_lettered_check_keeps_its_last_error(factory, counting, settings):
    check_id = submit(factory, source_url="https://images.example/slow.png")
    limited = settings.model_copy(update={"max_attempts": 1})
    with session_scope(factory) as session:
        assert pipeline.claim(session, [check_id], limited).check_ids == [check_id]
        check = session.get(Check, check_id)
        assert check is not None
        check.status, check.error = "queued", "fetch failed, will retry: HTTP 503"  # what run stores
    with session_scope(factory) as session:
        assert pipeline.claim(session, [check_id], limited).dead_lettered == [check_id]
    error = load(factory, check_id).error
    assert error is not None and error.startswith("dead-lettered")
    assert error.endswith("last error: fetch failed, will retry: HTTP 503")


def test_an_unexpected_fetch_error_fails_only_its_own_check(factory, counting, settings):
    good = photo_bytes("coffee.png", offset=61)

    def fetcher(url: str, _settings: Any) -> bytes:
        if "broken" in url:
            raise RuntimeError("a library error no fetch path expected")
        return good

    ids = [
        submit(factory, source_url="https://images.example/good.png"),
        submit(factory, source_url="https://images.example/broken.png"),
    ]
    process(factory, counting, ids, settings, fetcher=fetcher)
    assert load(factory, ids[0]).status == "done"
    broken = load(factory, ids[1])
    assert broken.status == "failed"
    assert broken.error == "fetch failed: RuntimeError: a library error no fetch path expected"


def _finished_meanwhile_by_another_worker(
    factory: sessionmaker[Session], settings: Settings, check_id: uuid.UUID
) -> str:
    """What the reconciler does to an attempt it takes for dead: dead-letter it, in its own transaction."""
    with session_scope(factory) as session:
        assert pipeline.fail_checks(session, [check_id], "dead-lettered: started 1 or more times", settings)
    error = load(factory, check_id).error
    assert error is not None
    return error


def _events(factory: sessionmaker[Session], check_id: uuid.UUID) -> list[str]:
    with session_scope(factory) as session:
        return list(
            session.scalars(sa.select(WebhookDelivery.event_type).where(WebhookDelivery.check_id == check_id))
        )


@pytest.mark.parametrize("fetch_fails", [False, True], ids=["verdict", "transient-fetch-error"])
def test_a_check_finished_by_another_worker_during_the_attempt_keeps_that_outcome(
    factory, counting, settings, fetch_fails
):
    with session_scope(factory) as session:
        create_endpoint(
            session,
            SecretCipher(settings.require_secret_key()),
            url="https://hooks.example/synthguard",
            client="tests",
            events=[EVENT_FLAGGED, EVENT_COMPLETED, EVENT_FAILED],
        )
    check_id = submit(factory, source_url="https://images.example/slow.png")
    stored_error = ""

    def slow_fetch(url: str, _settings: Any) -> bytes:
        # Between the claim and the store: the row is finished by someone else while this attempt works.
        nonlocal stored_error
        stored_error = _finished_meanwhile_by_another_worker(factory, settings, check_id)
        if fetch_fails:
            raise FetchError("HTTP 503", transient=True)
        return photo_bytes("coffee.png", offset=71)

    keep_images = settings.model_copy(update={"store_raw_images": True})
    result = process(factory, counting, [check_id], keep_images, fetcher=slow_fetch, retry_transient=True)

    assert result.outcomes == [] and result.delivery_ids == [] and result.retry_ids == []
    check = load(factory, check_id)
    assert (check.status, check.error, check.verdict_id) == ("failed", stored_error, None)
    # Nothing of this attempt is written on the finished row: not the bytes it fetched, nor their hashes.
    with session_scope(factory) as session:
        written = session.execute(
            sa.select(Check.sha256, Check.phash, Check.image_data).where(Check.id == check_id)
        ).one()
    assert tuple(written) == (None, None, None)
    assert stored_error.startswith("dead-lettered")
    assert _events(factory, check_id) == [EVENT_FAILED]  # the dead-letter's webhook only


def test_finished_checks_are_not_claimed_again(factory, counting, settings):
    check_id = submit(factory, image_data=photo_bytes(offset=7))
    process(factory, counting, [check_id], settings)
    with session_scope(factory) as session:
        assert pipeline.claim(session, [check_id], settings).check_ids == []
    assert load(factory, check_id).attempts == 1


def test_raw_images_are_kept_when_asked(factory, counting, settings):
    data = photo_bytes(offset=9)
    check_id = submit(factory, image_data=data)
    process(factory, counting, [check_id], settings.model_copy(update={"store_raw_images": True}))
    with session_scope(factory) as session:
        assert session.scalar(sa.select(Check.image_data).where(Check.id == check_id)) == data


def test_json_safe_removes_nan_and_numpy():
    import numpy as np

    value = {"a": np.float32(1.5), "b": float("nan"), "c": (np.int64(2), float("inf")), 3: np.array([1, 2])}
    assert pipeline.json_safe(value) == {"a": 1.5, "b": None, "c": [2, None], "3": [1, 2]}


# --- SQLite: a read older than another worker's commit ------------------------------------------------------


@pytest.fixture
def two_sqlite_workers(sqlite_url: str) -> Iterator[tuple[sessionmaker[Session], sessionmaker[Session]]]:
    """Two workers' session factories on one SQLite file, each with its own engine (as two processes)."""
    engines = [make_engine(sqlite_url), make_engine(sqlite_url)]
    yield make_session_factory(engines[0]), make_session_factory(engines[1])
    for engine in engines:
        engine.dispose()


def after_first_read_of_checks(factory: sessionmaker[Session], action: Any) -> None:
    """Run ``action`` once, right after the first SELECT on ``checks`` that ``factory``'s engine executes:
    what another worker does while this one holds rows it read, but has not written yet."""
    fired = False

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal fired
        if not fired and statement.lstrip().upper().startswith("SELECT") and "FROM checks" in statement:
            fired = True
            action()

    sa.event.listen(factory.kw["bind"], "after_cursor_execute", hook)


def test_a_claim_does_not_take_a_check_another_worker_finished_after_its_read(
    two_sqlite_workers, counting, settings
):
    """Two messages for one check (two `enqueue` runs, a redelivery): worker B read it queued, worker A then
    finished it. B's claim used to set it back to processing with a stale attempt count, and B's run then
    failed it ("the inline image is no longer stored"): a done, flagged check turned failed."""
    worker_a, worker_b = two_sqlite_workers
    check_id = submit(worker_a, image_data=photo_bytes(offset=31))
    after_first_read_of_checks(worker_b, lambda: process(worker_a, counting, [check_id], settings))

    with session_scope(worker_b) as session:
        claimed = pipeline.claim(session, [check_id], settings)

    assert claimed.check_ids == [] and claimed.dead_lettered == []
    check = load(worker_a, check_id)
    assert (check.status, check.attempts, check.error) == ("done", 1, None)


def test_fail_checks_leaves_a_check_another_worker_finished_after_its_read(
    two_sqlite_workers, counting, settings
):
    """The reconciler's dead-letter (or a task's last retry) read the check unfinished, then A finished it."""
    worker_a, worker_b = two_sqlite_workers
    check_id = submit(worker_a, image_data=photo_bytes(offset=37))
    after_first_read_of_checks(worker_b, lambda: process(worker_a, counting, [check_id], settings))

    with session_scope(worker_b) as session:
        assert pipeline.fail_checks(session, [check_id], "dead-lettered: retries spent", settings) == []

    check = load(worker_a, check_id)
    assert (check.status, check.error) == ("done", None)


def test_a_claim_counts_the_attempt_from_the_row_as_it_is_when_written(
    two_sqlite_workers, counting, settings
):
    """B read the check queued with 0 attempts; A claimed it (1 attempt) and died before an outcome. B's claim
    counts 2, not 1 again: the dead-letter limit counts every attempt."""
    worker_a, worker_b = two_sqlite_workers
    check_id = submit(worker_a, image_data=photo_bytes(offset=41))

    def claim_and_die() -> None:
        with session_scope(worker_a) as session:
            assert pipeline.claim(session, [check_id], settings).check_ids == [check_id]

    after_first_read_of_checks(worker_b, claim_and_die)
    with session_scope(worker_b) as session:
        assert pipeline.claim(session, [check_id], settings).check_ids == [check_id]
    check = load(worker_a, check_id)
    assert (check.status, check.attempts) == ("processing", 2)


def _another_writer_gets_in(sqlite_url: str) -> bool:
    """Whether a second connection can take SQLite's write lock now (a 0.2 s wait, not the 30 s default)."""
    import sqlite3

    connection = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=0.2, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    finally:
        connection.close()
    return True


def test_a_batch_holds_no_sqlite_write_lock_while_it_fetches_and_detects(
    sqlite_url, two_sqlite_workers, counting, settings
):
    """An outcome stored early (a 404) took the database's one write lock until commit: every other writer
    (enqueue, scan, the other worker processes) then waited through the batch's slow fetches and detection,
    and failed with "database is locked" after 30 s."""
    factory, _ = two_sqlite_workers
    missing = submit(factory, source_url="https://images.example/missing.png")
    slow = submit(factory, source_url="https://images.example/slow.png")
    inline = submit(factory, image_data=photo_bytes(offset=43))
    seen: dict[str, bool] = {}

    def fetcher(url: str, _settings: Any) -> bytes:
        if url.endswith("missing.png"):
            raise FetchError("server answered HTTP 404 Not Found", transient=False)
        seen["during a later fetch"] = _another_writer_gets_in(sqlite_url)
        return photo_bytes("coffee.png", offset=47)

    class WatchingDetector(CountingDetector):
        def detect(self, images: Sequence[Any]) -> list[Any]:
            seen["during detection"] = _another_writer_gets_in(sqlite_url)
            return super().detect(images)

    result = process(
        factory, WatchingDetector(counting.inner), [missing, slow, inline], settings, fetcher=fetcher
    )

    assert seen == {"during a later fetch": True, "during detection": True}
    assert [(o.check_id, o.status) for o in result.outcomes] == [
        (missing, "failed"), (slow, "done"), (inline, "done")
    ]  # fmt: skip
    assert load(factory, missing).error == "fetch failed: server answered HTTP 404 Not Found"


@pytest.mark.usefixtures("pg_clean")
def test_the_store_phase_locks_the_batch_in_the_claims_order(
    pg_session_factory, pg_engine, counting, settings
):
    """PostgreSQL: another transaction (a duplicate message's claim) holds the batch's older row and then asks
    for the newer one. The store phase used to flush the changed checks first, locking the newer row in the
    ORM's order, then wait for the older: a deadlock, and one of the two transactions aborted."""
    import threading
    import time as clock

    older = submit(pg_session_factory, source_url="https://images.example/missing.png")
    newer = submit(pg_session_factory, image_data=photo_bytes(offset=53))
    older_locked = threading.Event()
    errors: list[BaseException] = []

    def claim_like_transaction() -> None:
        try:
            with pg_engine.connect() as connection, connection.begin():
                for check_id in (older, newer):  # the claims' order: created_at
                    connection.execute(sa.select(Check.id).where(Check.id == check_id).with_for_update())
                    older_locked.set()
                    clock.sleep(0.5)  # the store phase reaches its first write meanwhile
        except BaseException as exc:
            errors.append(exc)
            older_locked.set()

    def fetcher(url: str, _settings: Any) -> bytes:
        raise FetchError("server answered HTTP 404 Not Found", transient=False)

    other = threading.Thread(target=claim_like_transaction)

    class StartsTheOtherTransaction(CountingDetector):
        def detect(self, images: Sequence[Any]) -> list[Any]:
            other.start()
            assert older_locked.wait(10)
            return super().detect(images)

    process(
        pg_session_factory,
        StartsTheOtherTransaction(counting.inner),
        [older, newer],
        settings,
        fetcher=fetcher,
    )
    other.join(10)

    assert errors == []
    assert (load(pg_session_factory, older).status, load(pg_session_factory, newer).status) == (
        "failed",
        "done",
    )
