"""How many webhook deliveries per second one worker sustains to a local receiver on 127.0.0.1.

Everything is real: PostgreSQL (a throw-away database migrated with Alembic), the Redis broker, the production
Celery app and ``synthguard.deliver_webhook`` task, signing, the SSRF-guarded httpx client, and an HTTP
receiver in a separate process (so it does not share this process's GIL with the worker).

Two figures:
* ``worker``: N outbox rows enqueued at once, one Celery worker (threads pool, concurrency 1 by default)
  drains them; rate = N / (time from first enqueue to the last row marked succeeded).
* ``loop``: the same state machine called in a plain loop, no broker: the cost of one delivery without Celery.

Run:  .venv/bin/python bench/bench_webhooks.py --count 500
(needs PostgreSQL and Redis on 127.0.0.1, like the tests; the numbers depend on how busy the machine is.)
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import sqlalchemy as sa
from celery.contrib.testing.worker import start_worker
from pydantic import SecretStr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from db.migrate import upgrade_to_head  # noqa: E402
from db.session import make_engine, make_session_factory, session_scope  # noqa: E402
from db.tables import Check, Client, Verdict  # noqa: E402
from db.webhook_tables import WebhookDelivery  # noqa: E402
from worker import outbox  # noqa: E402
from worker.app import create_celery_app  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.webhook_delivery import DeliveryConfig, deliver_once  # noqa: E402
from worker.webhook_endpoints import create_endpoint  # noqa: E402
from worker.webhooks import SecretCipher, make_webhook_client  # noqa: E402

RECEIVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real receiver behind a load balancer
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def _make_database(admin_dsn: str) -> tuple[str, str]:
    name = f"synthguard_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _outbox_rows(factory: sa.orm.sessionmaker[sa.orm.Session], count: int) -> list[uuid.UUID]:
    """``count`` flagged checks, each with its committed outbox row (one endpoint subscribed)."""
    ids: list[uuid.UUID] = []
    with session_scope(factory) as session:
        if session.get(Client, "bench") is None:
            session.add(Client(name="bench"))
        for _ in range(count):
            verdict = Verdict(
                id=uuid.uuid4(),
                sha256=secrets.token_hex(32),
                model_name="synthguard-v1",
                model_version="1.0.0",
                weights_sha="0" * 64,
                model_id="synthguard-v1@1.0.0+000000000000",
                score=0.95,
                verdict="generated",
                family_scores={"diffusion": 0.9, "gan": 0.05, "real": 0.05},
                threshold=0.5,
                decided_by="pixels",
                reasons=[],
            )
            session.add(verdict)
            session.flush()
            check = Check(
                id=uuid.uuid4(),
                client="bench",
                external_id=uuid.uuid4().hex,
                status="done",
                sha256=verdict.sha256,
                verdict_id=verdict.id,
            )
            session.add(check)
            session.flush()
            session.refresh(verdict)
            ids += outbox.record_check_events(session, check, verdict)
    return ids


def _wait_all_succeeded(
    factory: sa.orm.sessionmaker[sa.orm.Session], ids: list[uuid.UUID], limit_s: float
) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with session_scope(factory) as session:
            left = session.scalar(
                sa.select(sa.func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status != "succeeded")
            )
        if left == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"not all deliveries succeeded within {limit_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=500, help="deliveries per measurement")
    parser.add_argument("--concurrency", type=int, default=1, help="worker threads (1 = one worker slot)")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--admin-dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    args = parser.parse_args()

    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    db_name, url = _make_database(args.admin_dsn)
    try:
        port = int((receiver.stdout.readline() if receiver.stdout else "").strip())
        upgrade_to_head(url)
        settings = Settings(
            database_url=url,
            broker_url=args.broker,
            allow_private_hosts="127.0.0.1",
            secret_key=SecretStr(secrets.token_hex(32)),
            queue_name=f"synthguard-bench-{uuid.uuid4().hex[:8]}",
            worker_concurrency=args.concurrency,
        )
        engine = make_engine(url)
        factory = make_session_factory(engine)
        cipher = SecretCipher.from_settings(settings)
        with session_scope(factory) as session:
            create_endpoint(session, cipher, url=f"http://127.0.0.1:{port}/hook", client="bench")

        # loop: the state machine alone
        ids = _outbox_rows(factory, args.count)
        config = DeliveryConfig.from_settings(settings)
        with make_webhook_client(settings.allow_private_hosts, settings.webhook_timeout_s) as client:
            started = time.perf_counter()
            for delivery_id in ids:
                step = deliver_once(factory, delivery_id, client, cipher, config)
                assert step.status == "succeeded", step
            loop_s = time.perf_counter() - started
        print(f"loop:   {args.count} deliveries in {loop_s:.2f} s = {args.count / loop_s:.0f} deliveries/s")

        # worker: through Redis and a real Celery worker
        ids = _outbox_rows(factory, args.count)
        app = create_celery_app(settings)
        with start_worker(
            app,
            pool="threads",
            concurrency=args.concurrency,
            perform_ping_check=False,
            queues=list(settings.worker_queues),
            loglevel="WARNING",
        ):
            started = time.perf_counter()
            for delivery_id in ids:
                app.send_task("synthguard.deliver_webhook", kwargs={"delivery_id": str(delivery_id)})
            _wait_all_succeeded(factory, ids, limit_s=600)
            worker_s = time.perf_counter() - started
        print(
            f"worker: {args.count} deliveries in {worker_s:.2f} s = {args.count / worker_s:.0f} deliveries/s "
            f"(one Celery worker, threads pool, concurrency {args.concurrency}, receiver 204 on 127.0.0.1, "
            f"{os.cpu_count()} CPUs)"
        )
        engine.dispose()
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
        _drop_database(args.admin_dsn, db_name)


if __name__ == "__main__":
    main()
