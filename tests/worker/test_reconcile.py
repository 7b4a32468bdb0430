"""The reconciler against real PostgreSQL and Redis (no worker needed: it talks to both directly).

Time is moved by passing ``now`` instead of sleeping: rows look ``reconcile_after_s`` old without waiting.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from db.base import utcnow
from db.queries import get_or_create_check
from db.session import make_engine, make_session_factory, session_scope
from db.tables import Check
from db.webhook_tables import WebhookDelivery
from tests.images import photo_bytes
from worker import pipeline
from worker.reconcile import ids_waiting_in_broker, reconcile_interval_s, reconcile_once
from worker.settings import Settings
from worker.tasks import PROCESS_CHECKS_TASK
from worker.webhook_delivery import DELIVER_WEBHOOK_TASK
from worker.webhook_endpoints import create_endpoint
from worker.webhooks import EVENT_FAILED, SecretCipher


@pytest.fixture
def broker(settings: Settings) -> redis.Redis:
    client = redis.Redis.from_url(settings.broker_url)
    client.delete(*settings.worker_queues)
    yield client
    client.delete(*settings.worker_queues)
    client.close()


def queued_ids(client: redis.Redis, queue: str) -> list[list[str]]:
    """check_ids of each process_checks message waiting in ``queue``, oldest first."""
    batches = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        assert message["headers"]["task"] == PROCESS_CHECKS_TASK
        assert message["content-type"] == "application/json"
        body = json.loads(base64.b64decode(message["body"]))
        batches.append(body[1]["check_ids"])
    return batches


def queued_deliveries(client: redis.Redis, queue: str) -> list[str]:
    """delivery_id of each deliver_webhook message waiting in ``queue``, oldest first."""
    ids = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        assert message["headers"]["task"] == DELIVER_WEBHOOK_TASK
        ids.append(json.loads(base64.b64decode(message["body"]))[1]["delivery_id"])
    return ids


def make_check(
    factory: sessionmaker[Session],
    *,
    status: str = "queued",
    attempts: int = 0,
    age_s: float = 0.0,
    error: str | None = None,
) -> uuid.UUID:
    with session_scope(factory) as session:
        check, _ = get_or_create_check(
            session,
            client="reconcile-test",
            external_id=uuid.uuid4().hex,
            source_url="http://127.0.0.1:9/never-fetched.png",
        )
        check_id = check.id
    with session_scope(factory) as session:
        # A plain UPDATE: the ORM's onupdate would overwrite the back-dated updated_at.
        session.execute(
            sa.update(Check)
            .where(Check.id == check_id)
            .values(
                status=status,
                attempts=attempts,
                error=error,
                updated_at=utcnow() - timedelta(seconds=age_s),
            )
        )
    return check_id


def row(factory: sessionmaker[Session], check_id: uuid.UUID) -> Check:
    with session_scope(factory) as session:
        check = session.get(Check, check_id)
        assert check is not None
        session.expunge(check)
        return check


def later(settings: Settings, factor: float = 2.0) -> datetime:
    return utcnow() + timedelta(seconds=settings.reconcile_after_s * factor)


@pytest.mark.usefixtures("pg_clean")
def test_stuck_checks_are_requeued_once_per_window(
    celery_app: Any, pg_session_factory: sessionmaker[Session], settings: Settings, broker: redis.Redis
) -> None:
    stuck_processing = make_check(pg_session_factory, status="processing", attempts=1)
    stuck_queued = make_check(pg_session_factory, status="queued")
    now = later(settings)

    result = reconcile_once(celery_app, pg_session_factory, settings, now=now)

    assert sorted(result.requeued) == sorted([stuck_processing, stuck_queued])
    assert result.dead_lettered == []
    sent = [check_id for batch in queued_ids(broker, settings.queue_name) for check_id in batch]
    assert sorted(sent) == sorted(str(i) for i in (stuck_processing, stuck_queued))
    assert row(pg_session_factory, stuck_processing).status == "processing"  # left for claim() to take again

    # Same moment again: updated_at was bumped, and the queued one is now waiting in the broker anyway.
    again = reconcile_once(celery_app, pg_session_factory, settings, now=now)
    assert again.requeued == []
    assert len(queued_ids(broker, settings.queue_name)) == result.messages


@pytest.mark.usefixtures("pg_clean")
def test_fresh_and_finished_checks_are_left_alone(
    celery_app: Any, pg_session_factory: sessionmaker[Session], settings: Settings, broker: redis.Redis
) -> None:
    make_check(pg_session_factory, status="queued")
    make_check(pg_session_factory, status="processing", attempts=1)
    old = settings.reconcile_after_s * 10
    make_check(pg_session_factory, status="done", attempts=1, age_s=old)
    make_check(pg_session_factory, status="failed", attempts=1, age_s=old)

    result = reconcile_once(celery_app, pg_session_factory, settings)  # now: the fresh ones are not stuck

    assert result.requeued == []
    assert broker.llen(settings.queue_name) == 0


@pytest.mark.usefixtures("pg_clean")
def test_exhausted_checks_are_dead_lettered_not_requeued(
    celery_app: Any, pg_session_factory: sessionmaker[Session], settings: Settings, broker: redis.Redis
) -> None:
    with session_scope(pg_session_factory) as session:
        create_endpoint(
            session,
            SecretCipher(settings.require_secret_key()),
            url="https://hooks.example/synthguard",
            client="reconcile-test",
            events=[EVENT_FAILED],
        )
    poison = make_check(pg_session_factory, status="processing", attempts=settings.max_attempts)
    healthy = make_check(pg_session_factory, status="processing", attempts=settings.max_attempts - 1)

    result = reconcile_once(celery_app, pg_session_factory, settings, now=later(settings))

    assert result.dead_lettered == [poison]
    assert result.requeued == [healthy]
    dead = row(pg_session_factory, poison)
    assert dead.status == "failed"
    assert dead.error is not None
    assert "dead-lettered" in dead.error
    assert str(settings.max_attempts) in dead.error
    assert queued_ids(broker, settings.queue_name) == [[str(healthy)]]
    # The check.failed notice is sent now, not left for the webhook sweep to find a minute later.
    with session_scope(pg_session_factory) as session:
        failed_notice = session.scalars(
            sa.select(WebhookDelivery.id).where(
                WebhookDelivery.check_id == poison, WebhookDelivery.event_type == EVENT_FAILED
            )
        ).one()
    assert queued_deliveries(broker, settings.webhook_queue_name) == [str(failed_notice)]


@pytest.mark.usefixtures("pg_clean")
def test_a_final_attempt_dead_lettered_while_it_runs_stays_failed(
    celery_app: Any,
    pg_session_factory: sessionmaker[Session],
    settings: Settings,
    broker: redis.Redis,
    detector: Any,
) -> None:
    limited = settings.model_copy(update={"max_attempts": 2})
    check_id = make_check(pg_session_factory, status="queued", attempts=1)
    with session_scope(pg_session_factory) as session:
        assert pipeline.claim(session, [check_id], limited).check_ids == [check_id]  # the final attempt
    passes: list[Any] = []

    def slow_fetch(url: str, _settings: Settings) -> bytes:
        # The fetch outlasts reconcile_after_s: another worker's reconciler takes the attempt for dead.
        passes.append(reconcile_once(celery_app, pg_session_factory, limited, now=later(limited)))
        return photo_bytes(offset=3)

    with session_scope(pg_session_factory) as session:
        result = pipeline.run(session, detector, [check_id], limited, fetcher=slow_fetch)

    assert [one.dead_lettered for one in passes] == [[check_id]]
    assert result.outcomes == []
    check = row(pg_session_factory, check_id)
    assert check.status == "failed" and check.verdict_id is None
    assert check.error is not None and check.error.startswith("dead-lettered")


@pytest.mark.usefixtures("pg_clean")
def test_queued_check_still_waiting_in_the_broker_is_not_duplicated(
    celery_app: Any, pg_session_factory: sessionmaker[Session], settings: Settings, broker: redis.Redis
) -> None:
    in_queue = make_check(pg_session_factory, status="queued")
    lost = make_check(pg_session_factory, status="queued")
    celery_app.send_task(PROCESS_CHECKS_TASK, kwargs={"check_ids": [str(in_queue)]})
    assert ids_waiting_in_broker(settings) == {str(in_queue)}

    result = reconcile_once(celery_app, pg_session_factory, settings, now=later(settings))

    assert result.requeued == [lost]
    assert result.left_in_broker == 1
    assert queued_ids(broker, settings.queue_name) == [[str(in_queue)], [str(lost)]]


@pytest.mark.usefixtures("pg_clean")
def test_queued_checks_are_left_alone_while_the_queue_is_too_long_to_inspect(
    celery_app: Any,
    pg_session_factory: sessionmaker[Session],
    settings: Settings,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One waiting message stands for a queue longer than the 2,000 a pass reads: a queued check may be
    # anywhere in it, and re-sending every one would double the backlog.
    monkeypatch.setattr("worker.reconcile.BROKER_SCAN_LIMIT", 0)
    celery_app.send_task(PROCESS_CHECKS_TASK, kwargs={"check_ids": [str(uuid.uuid4())]})
    assert ids_waiting_in_broker(settings) is None
    queued = make_check(pg_session_factory, status="queued")
    orphaned = make_check(pg_session_factory, status="processing", attempts=1)

    result = reconcile_once(celery_app, pg_session_factory, settings, now=later(settings))

    assert result.requeued == [orphaned]  # a claimed check is not waiting in any queue: it is re-sent
    assert result.left_in_broker == 1
    assert queued_ids(broker, settings.queue_name)[1:] == [[str(orphaned)]]
    assert row(pg_session_factory, queued).status == "queued"


@pytest.mark.usefixtures("pg_clean")
def test_a_row_locked_by_another_reconciler_is_skipped_not_waited_for(
    celery_app: Any,
    pg_url: str,
    settings: Settings,
    broker: redis.Redis,
    pg_session_factory: sessionmaker[Session],
) -> None:
    busy = make_check(pg_session_factory, status="processing", attempts=1)
    free = make_check(pg_session_factory, status="processing", attempts=1)
    # lock_timeout turns waiting behind the other reconciler's lock (the pass would stall) into an error.
    impatient = make_engine(pg_url, connect_args={"options": "-c lock_timeout=2000"})
    try:
        with impatient.connect() as other, other.begin():
            other.execute(sa.select(Check.id).where(Check.id == busy).with_for_update())
            result = reconcile_once(
                celery_app, make_session_factory(impatient), settings, now=later(settings)
            )
    finally:
        impatient.dispose()

    assert result.requeued == [free]
    assert queued_ids(broker, settings.queue_name) == [[str(free)]]


@pytest.mark.usefixtures("pg_clean")
def test_a_backlog_waiting_in_the_broker_does_not_hide_orphaned_checks(
    celery_app: Any, pg_session_factory: sessionmaker[Session], settings: Settings, broker: redis.Redis
) -> None:
    # More old queued checks waiting in Redis than a pass acts on (a small limit stands for the 2000).
    backlog = [make_check(pg_session_factory, status="queued", age_s=3600) for _ in range(4)]
    for check_id in backlog:
        celery_app.send_task(PROCESS_CHECKS_TASK, kwargs={"check_ids": [str(check_id)]})
    # Newer than the backlog: one claimed by a worker killed since, one whose message was lost.
    orphaned = make_check(pg_session_factory, status="processing", attempts=1)
    lost = make_check(pg_session_factory, status="queued")

    result = reconcile_once(celery_app, pg_session_factory, settings, now=later(settings), rows_per_pass=3)

    assert result.requeued == [orphaned, lost]
    assert result.left_in_broker == len(backlog)
    assert queued_ids(broker, settings.queue_name)[len(backlog) :] == [[str(orphaned), str(lost)]]


@pytest.mark.usefixtures("pg_clean")
def test_a_pass_acts_on_at_most_rows_per_pass_and_the_next_pass_goes_on(
    celery_app: Any, pg_session_factory: sessionmaker[Session], settings: Settings, broker: redis.Redis
) -> None:
    oldest_first = [
        make_check(pg_session_factory, status="processing", attempts=1, age_s=age) for age in (30, 20, 10)
    ]
    lost = make_check(pg_session_factory, status="queued", age_s=40)
    now = later(settings)

    first = reconcile_once(celery_app, pg_session_factory, settings, now=now, rows_per_pass=2)
    second = reconcile_once(celery_app, pg_session_factory, settings, now=now, rows_per_pass=2)

    assert first.requeued == oldest_first[:2]  # processing checks first, however old the queued one is
    assert second.requeued == [oldest_first[2], lost]
    assert broker.llen(settings.queue_name) == first.messages + second.messages


@pytest.mark.usefixtures("pg_clean")
def test_check_waiting_for_a_fetch_retry_gets_the_backoff_as_grace(
    celery_app: Any, pg_session_factory: sessionmaker[Session], settings: Settings, broker: redis.Redis
) -> None:
    retrying = make_check(
        pg_session_factory, status="queued", error=f"{pipeline.RETRY_WAIT_PREFIX}: HTTP 503"
    )
    lost = make_check(pg_session_factory, status="queued")  # no error (NULL): no grace
    grace = settings.reconcile_after_s + settings.retry_backoff_max_s

    soon = utcnow() + timedelta(seconds=settings.reconcile_after_s + 0.5 * settings.retry_backoff_max_s)
    assert reconcile_once(celery_app, pg_session_factory, settings, now=soon).requeued == [lost]

    late = utcnow() + timedelta(seconds=grace + 1)
    assert reconcile_once(celery_app, pg_session_factory, settings, now=late).requeued == [retrying]


@pytest.mark.usefixtures("pg_clean")
def test_broker_down_rolls_back_so_the_next_pass_retries(
    pg_session_factory: sessionmaker[Session], settings: Settings
) -> None:
    from worker.app import create_celery_app

    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})
    app = create_celery_app(down)
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 0
    app.conf.broker_transport_options = {"max_retries": 0}
    stuck = make_check(pg_session_factory, status="processing", attempts=1)
    before = row(pg_session_factory, stuck).updated_at

    with pytest.raises(Exception, match=r"(?i)connect|refused|Error"):
        reconcile_once(app, pg_session_factory, down, now=later(settings))

    assert row(pg_session_factory, stuck).updated_at == before  # not marked: found again next pass


def test_interval_is_a_quarter_of_the_threshold_within_bounds(settings: Settings) -> None:
    assert reconcile_interval_s(settings.model_copy(update={"reconcile_after_s": 120.0})) == 30.0
    assert reconcile_interval_s(settings.model_copy(update={"reconcile_after_s": 2.0})) == 1.0
    assert reconcile_interval_s(settings.model_copy(update={"reconcile_after_s": 3600.0})) == 60.0
