"""Fixtures shared by every test package: real PostgreSQL, SQLite, Redis, settings, detector, Celery worker.

Everything runs against the services on 127.0.0.1 (PostgreSQL trust auth as user ``postgres``, Redis on 6379);
`.ci/run` starts them where they are not running. The schema is always built by ``alembic upgrade head``.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import redis
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from db.base import Base
from db.migrate import upgrade_to_head
from db.session import make_engine, make_session_factory
from worker.settings import Settings

if TYPE_CHECKING:
    from celery import Celery
    from celery.worker import WorkController

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_HOST = os.environ.get("SYNTHGUARD_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SYNTHGUARD_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("SYNTHGUARD_TEST_PG_USER", "postgres")
REDIS_HOST = os.environ.get("SYNTHGUARD_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("SYNTHGUARD_TEST_REDIS_PORT", "6379"))
# Redis db 0 is left to development workers; test sessions claim one of the others.
REDIS_TEST_DBS = range(1, 16)
REDIS_CLAIM_KEY = "synthguard:test-session-claim"
REDIS_CLAIM_TTL_S = 3 * 3600


def shared_dir() -> Path:
    """The ../shared folder (datasets, weights), overridable with SYNTHGUARD_SHARED_DIR."""
    override = os.environ.get("SYNTHGUARD_SHARED_DIR")
    return Path(override) if override else (REPO_ROOT / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """../shared/datasets, or a skip saying it is absent (it is never committed)."""
    path = shared_dir() / "datasets"
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path} (set SYNTHGUARD_SHARED_DIR)")
    return path


# --- PostgreSQL -----------------------------------------------------------------------------------


def _pg_admin_connection() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True, connect_timeout=5
        )
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as {PG_USER} (run .ci/run): {exc}")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database created for this test session, migrated to head, dropped at the end."""
    name = f"synthguard_test_{os.getpid()}_{secrets.token_hex(4)}"
    with _pg_admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    try:
        upgrade_to_head(url)
        yield url
    finally:
        with _pg_admin_connection() as admin:
            # FORCE: a worker thread that has not returned its connection must not leave the database behind.
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def pg_session_factory(pg_engine: sa.Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)


@pytest.fixture
def pg_clean(pg_engine: sa.Engine) -> Iterator[None]:
    """Empty every table before the test (the database itself is shared by the session)."""
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    with pg_engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {tables} CASCADE")
    yield


# --- SQLite ---------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file migrated to head."""
    url = f"sqlite:///{tmp_path / 'synthguard.db'}"
    upgrade_to_head(url)
    return url


# --- Redis ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database number claimed for this test session (several sessions may run at once), flushed."""
    session_id = f"{os.getpid()}-{uuid.uuid4().hex}"
    for db_number in REDIS_TEST_DBS:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db_number, socket_connect_timeout=5)
        try:
            claimed = client.set(REDIS_CLAIM_KEY, session_id, nx=True, ex=REDIS_CLAIM_TTL_S)
        except redis.ConnectionError as exc:
            pytest.fail(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} (run .ci/run): {exc}")
        if not claimed:
            client.close()
            continue
        client.flushdb()
        client.set(REDIS_CLAIM_KEY, session_id, ex=REDIS_CLAIM_TTL_S)
        try:
            yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db_number}"
        finally:
            client.flushdb()  # also releases the claim
            client.close()
        return
    pytest.fail(f"every Redis test database {REDIS_TEST_DBS} is claimed by another test session")


# --- Settings, detector, Celery -------------------------------------------------------------------


@pytest.fixture(scope="session")
def settings(pg_url: str, redis_url: str) -> Settings:
    """Settings for tests: the session's PostgreSQL and Redis; local receivers allowed; short limits.

    Derive variants with ``settings.model_copy(update={...})``.
    """
    return Settings(
        database_url=pg_url,
        broker_url=redis_url,
        allow_private_hosts="127.0.0.1,localhost,::1",
        secret_key=SecretStr(secrets.token_hex(32)),
        device="cpu",
        fetch_timeout_s=5.0,
        decode_timeout_s=20.0,
        fetch_retries=1,
        retry_backoff_max_s=1,
        broker_visibility_timeout_s=60,
        reconcile_after_s=5.0,
        webhook_timeout_s=5.0,
        # A queue name of its own, so a stray development worker never takes this session's tasks.
        queue_name=f"synthguard-test-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="session")
def detector(settings: Settings) -> Any:
    """The real detector, loaded once per test session."""
    import models

    return models.create_detector(settings.model_name, device="cpu")


@pytest.fixture(scope="session")
def celery_app(settings: Settings) -> Celery:
    """The production Celery app built from the test settings (JSON only, acks late, real Redis broker)."""
    from worker.app import create_celery_app

    return create_celery_app(settings)


@pytest.fixture(scope="module")
def celery_worker(celery_app: Celery, detector: Any) -> Iterator[WorkController]:
    """A real Celery worker consuming from Redis in a thread of this process (never Celery's eager mode).

    Module-scoped: it consumes only while the module that asked for it runs, and the queue is purged when it
    stops, so tests elsewhere that inspect the queue (the reconciler's) meet no consumer and no leftovers.
    Shares the session's detector.
    """
    from tests.workers import in_process_worker
    from worker.app import runtime_for

    runtime_for(celery_app).set_detector(detector)
    with in_process_worker(
        celery_app,
        pool="solo",
        concurrency=1,
        queues=list(runtime_for(celery_app).settings.worker_queues),
        shutdown_timeout=30.0,
    ) as worker:
        yield worker
    # Messages its timers (webhook sweep, reconciler) published in its last moments must
    # not reach later modules, which inspect the queue.
    celery_app.control.purge()
