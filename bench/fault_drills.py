"""Fault drills: real worker processes, a real Redis and PostgreSQL, real kills. Prints a datasheet table.

Usage::

    .venv/bin/python bench/fault_drills.py                  # every drill but the PostgreSQL restart
    .venv/bin/python bench/fault_drills.py --drills child_kill,sigterm --n 16
    .venv/bin/python bench/fault_drills.py --pg-restart     # also restart the machine's PostgreSQL (shared!)

Each drill gets its own Redis (``redis-server`` on a private port, append-only as in docker/compose.yml
unless the drill says otherwise), its own PostgreSQL database (migrated with Alembic, dropped afterwards) and
its own queue, and runs ``celery -A worker.celery worker`` subprocesses configured only through
``SYNTHGUARD_*`` variables, as in production. Checks are recorded in the database first and then enqueued
(what ``synthguard enqueue`` does), so a check whose message is lost is still visible and can be counted.

Columns: submitted; done and failed (stored outcomes); lost (no outcome when the drill's wait ended);
duplicated (verdict rows beyond one per image and model version, plus IntegrityErrors in the worker logs);
extra attempts (processing restarts caused by the fault); recovery (seconds from the fault, or from the end
of the outage, until every check had an outcome). The hostile-corpus drill adds outcomes by kind and the
workers' peak RSS.

The functions here are also used by tests/worker/test_faults.py with smaller numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import redis
import sqlalchemy as sa
from celery import Celery
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from db.migrate import upgrade_to_head  # noqa: E402 - after the sys.path fix for direct runs
from db.queries import get_or_create_check  # noqa: E402
from db.session import make_engine, make_session_factory, session_scope  # noqa: E402
from db.tables import Check, Verdict  # noqa: E402
from worker.app import create_celery_app  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.tasks import CHECK_IMAGE_TASK, PROCESS_CHECKS_TASK, enqueue_checks  # noqa: E402

PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
FINISHED = ("done", "failed")
DEFAULT_WAIT_S = 180.0
WORKER_READY_S = 120.0


def shared_dir() -> Path:
    override = os.environ.get("SYNTHGUARD_SHARED_DIR")
    return Path(override) if override else (REPO / ".." / "shared").resolve()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- images
# --------------------------------------------------------------------------------------------------


def make_images(count: int, size: int = 160, seed: int = 0) -> list[bytes]:
    """Distinct small PNGs (smooth colour field plus noise), so no two share a stored verdict."""
    images = []
    for index in range(count):
        rng = np.random.default_rng(seed * 100_003 + index)
        coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        base = np.asarray(
            Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16
        )
        noisy = np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(noisy).save(out, "PNG")
        images.append(out.getvalue())
    return images


def slow_decode_image() -> bytes:
    """A valid 40-megapixel WebP (~70 KiB) the decoder needs about a second for: past a 0.3 s limit."""
    gradient = Image.linear_gradient("L").resize((8000, 5000))
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient))
    out = io.BytesIO()
    image.save(out, "WEBP", quality=80)
    return out.getvalue()


# --- processes
# -----------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid_text = stat.rsplit(")", 1)[1].split()[:2]
        if state in ("Z", "X"):  # a killed process not reaped yet: nothing left to kill or measure
            continue
        children.setdefault(int(ppid_text), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _status_kib(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RedisServer:
    """A private redis-server; ``appendonly`` as shipped in docker/compose.yml unless a drill turns it off."""

    def __init__(self, workdir: Path, *, appendonly: bool = True, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--daemonize", "no", "--protected-mode", "yes", "--logfile", "redis.log"]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)
        client.close()

    def kill9(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=20)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=2)


@dataclass
class RssPeaks:
    """Highest VmHWM (peak resident set) seen per process role, KiB."""

    main: int = 0
    pool: int = 0
    decoder: int = 0


class WorkerProcess:
    """``celery -A <app> worker`` as a subprocess in its own session, with its log in a file."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *, name: str, concurrency: int, pool: str
    ) -> None:
        self.log_path = log_path
        self.name = name
        argv = [sys.executable, "-m", "celery", "-A", env.get("DRILL_APP_MODULE", "worker.celery"), "worker"]
        argv += ["--loglevel=INFO", f"--pool={pool}", f"--concurrency={concurrency}"]
        argv += [f"--hostname={name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        # Both queues, as `synthguard worker` consumes them (Settings.worker_queues).
        queue = env["SYNTHGUARD_QUEUE_NAME"]
        argv += [f"--queues={queue},{queue}.webhooks"]
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid = self.process.pid
        self.peaks = RssPeaks()
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._sampling.wait(0.2) and self.process.poll() is None:
            self.peaks.main = max(self.peaks.main, _status_kib(self.pid, "VmHWM"))
            for pid in _descendants(self.pid):
                role = "decoder" if "_decode_child" in _cmdline(pid) else "pool"
                peak = _status_kib(pid, "VmHWM")
                setattr(self.peaks, role, max(getattr(self.peaks, role), peak))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = WORKER_READY_S) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker {self.name} exited ({self.process.returncode}):\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker {self.name} not ready after {timeout:.0f} s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.2)

    def pool_pids(self) -> list[int]:
        return [pid for pid in _descendants(self.pid) if "_decode_child" not in _cmdline(pid)]

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill_pool(self) -> list[int]:
        """kill -9 every pool process (the main process stays and starts new ones)."""
        pids = sorted(self.pool_pids())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def kill9(self) -> None:
        """The whole worker: main process and pool, at once (decoder children follow via PDEATHSIG)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()
        self._finish()

    def terminate(self, timeout: float = 120) -> float:
        """SIGTERM (warm shutdown: running tasks finish, the rest go back to the queue); returns seconds."""
        start = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
        self._finish()
        return time.monotonic() - start

    def _finish(self) -> None:
        self._sampling.set()
        # Pool children of a killed main process may linger a moment; they hold no messages.
        for pid in _descendants(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


# --- one drill's environment
# ---------------------------------------------------------------------------------


@dataclass
class DrillResult:
    name: str
    submitted: int
    done: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    extra_attempts: int = 0
    recovery_s: float | None = None
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class DrillEnv:
    """Redis + database + producer app + worker factory for one drill."""

    def __init__(self, tag: str, workdir: Path, *, appendonly: bool = True, **overrides: Any) -> None:
        self.tag = tag
        self.workdir = workdir
        self.redis = RedisServer(workdir, appendonly=appendonly)
        self.redis.start()
        self.db_name = f"synthguard_drill_{tag}_{secrets.token_hex(3)}"
        with psycopg.connect(**PG_ADMIN, autocommit=True) as admin:  # type: ignore[arg-type]
            admin.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db_name}"
        upgrade_to_head(self.db_url)
        values: dict[str, Any] = {
            "database_url": self.db_url,
            "broker_url": self.redis.url,
            "queue_name": f"drill-{tag}-{secrets.token_hex(3)}",
            "secret_key": secrets.token_hex(32),
            "device": "cpu",
            "batch_size": 4,
            "worker_concurrency": 2,
            "reconcile_after_s": 8.0,
            "decode_timeout_s": 10.0,
            "max_attempts": 3,
            "fetch_retries": 1,
            "retry_backoff_max_s": 2,
        }
        values.update(overrides)
        self.values = values
        self.settings = Settings(**values)
        self.app: Celery = create_celery_app(self.settings)
        self.engine = make_engine(self.db_url)
        self.factory: sessionmaker[Session] = make_session_factory(self.engine)
        self.workers: list[WorkerProcess] = []

    def env(self, **overrides: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHGUARD_")}
        for key, value in {**self.values, **overrides}.items():
            env[f"SYNTHGUARD_{key.upper()}"] = str(value)
        # Two cores shared by everything: one torch thread per pool process keeps the drill honest.
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def worker(
        self,
        name: str = "w1",
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        ready: bool = True,
        **overrides: Any,
    ) -> WorkerProcess:
        log_path = self.workdir / f"{self.tag}-{name}.log"
        worker = WorkerProcess(self.env(**overrides), log_path, name=name, concurrency=concurrency, pool=pool)
        self.workers.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    def record(self, images: Sequence[bytes], client: str = "drill") -> list[uuid.UUID]:
        """Store checks (status queued) without sending messages."""
        ids = []
        with session_scope(self.factory) as session:
            for data in images:
                check, _ = get_or_create_check(
                    session, client=client, external_id=uuid.uuid4().hex, image_data=data
                )
                ids.append(check.id)
        return ids

    def submit(self, images: Sequence[bytes], client: str = "drill") -> list[uuid.UUID]:
        ids = self.record(images, client)
        enqueue_checks(self.app, ids, self.settings.batch_size)
        return ids

    def statuses(self, ids: Sequence[uuid.UUID]) -> Counter[str]:
        with session_scope(self.factory) as session:
            rows = session.execute(
                sa.select(Check.status, sa.func.count()).where(Check.id.in_(list(ids))).group_by(Check.status)
            ).all()
        return Counter({status: int(count) for status, count in rows})

    def status_and_attempts(self, check_id: uuid.UUID) -> tuple[str, int]:
        with session_scope(self.factory) as session:
            row = session.execute(sa.select(Check.status, Check.attempts).where(Check.id == check_id)).one()
        return str(row.status), int(row.attempts)

    def wait_any(self, ids: Sequence[uuid.UUID], status: str, timeout: float = DEFAULT_WAIT_S) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.statuses(ids)[status]:
                return True
            time.sleep(0.05)
        return False

    def wait_finished(self, ids: Sequence[uuid.UUID], timeout: float = DEFAULT_WAIT_S) -> float | None:
        """Seconds until every check had an outcome, or None if the wait ended first."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            counts = self.statuses(ids)
            if counts["done"] + counts["failed"] == len(ids):
                return time.monotonic() - start
            time.sleep(0.1)
        return None

    def result(
        self, name: str, ids: Sequence[uuid.UUID], recovery_s: float | None, notes: str = ""
    ) -> DrillResult:
        counts = self.statuses(ids)
        with session_scope(self.factory) as session:
            attempts = (
                session.scalar(sa.select(sa.func.sum(Check.attempts)).where(Check.id.in_(list(ids)))) or 0
            )
            duplicate_verdicts = (
                session.scalar(
                    sa.select(
                        sa.func.count()
                        - sa.func.count(sa.distinct(sa.func.concat(Verdict.sha256, Verdict.model_id)))
                    )
                )
                or 0
            )
            # Outcomes stored half-way: done without a verdict, failed without a reason.
            in_ids = Check.id.in_(list(ids))
            partial = session.scalar(
                sa.select(sa.func.count()).where(
                    in_ids,
                    sa.or_(
                        sa.and_(Check.status == "done", Check.verdict_id.is_(None)),
                        sa.and_(Check.status == "failed", sa.func.coalesce(Check.error, "") == ""),
                    ),
                )
            )
        integrity_errors = sum(worker.log().count("IntegrityError") for worker in self.workers)
        done, failed = counts["done"], counts["failed"]
        return DrillResult(
            name=name,
            submitted=len(ids),
            done=done,
            failed=failed,
            lost=len(ids) - done - failed,
            duplicated=int(duplicate_verdicts) + integrity_errors,
            extra_attempts=max(0, int(attempts) - len(ids)),
            recovery_s=recovery_s,
            notes=notes,
            details={"partial": int(partial or 0)},
        )

    def close(self) -> None:
        for worker in self.workers:
            if worker.alive():
                worker.kill9()
        self.engine.dispose()
        self.redis.kill9()
        with psycopg.connect(**PG_ADMIN, autocommit=True) as admin:  # type: ignore[arg-type]
            admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


@contextlib.contextmanager
def drill_env(tag: str, workdir: Path | None = None, **kwargs: Any) -> Iterator[DrillEnv]:
    own_dir = workdir is None
    directory = Path(tempfile.mkdtemp(prefix=f"synthguard-drill-{tag}-")) if workdir is None else workdir
    env = DrillEnv(tag, directory, **kwargs)
    try:
        yield env
    finally:
        env.close()
        if own_dir and not os.environ.get("SYNTHGUARD_DRILL_KEEP"):
            shutil.rmtree(directory, ignore_errors=True)


# --- the drills
# ----------------------------------------------------------------------------------------------


def drill_child_kill(workdir: Path | None = None, n: int = 24, kills: int = 2) -> DrillResult:
    """kill -9 the pool processes mid-batch, twice: acks_late + reject_on_worker_lost redeliver at once.

    Every pool process is killed, not one: with two children, one may be idle between batches at the moment
    of the kill (seen in CI), and then the drill proved nothing. The main process stays and starts new ones.
    """
    with drill_env("child_kill", workdir) as env:
        worker = env.worker(concurrency=2)
        ids = env.submit(make_images(n, seed=1))
        killed: list[int] = []
        fault_at = time.monotonic()
        for _ in range(kills):
            env.wait_any(ids, "processing", timeout=60)
            time.sleep(0.05)
            killed += worker.kill_pool()
            fault_at = time.monotonic()
            time.sleep(1.0)
        env.wait_finished(ids)
        recovery = time.monotonic() - fault_at
        result = env.result("every pool process kill -9 (x2)", ids, recovery, f"killed pids {killed}")
        result.details["worker_alive"] = worker.alive()
        return result


def drill_worker_kill(workdir: Path | None = None, n: int = 24) -> DrillResult:
    """kill -9 the whole worker mid-batch, start a new one: the reconciler re-sends what was unacked."""
    with drill_env("worker_kill", workdir) as env:
        worker = env.worker(concurrency=2)
        ids = env.submit(make_images(n, seed=2))
        env.wait_any(ids, "processing", timeout=60)
        in_flight = env.statuses(ids)["processing"]
        worker.kill9()
        fault_at = time.monotonic()
        restarted = env.worker("w2", concurrency=2)
        ready_at = time.monotonic()
        env.wait_finished(ids)
        recovery = time.monotonic() - fault_at
        result = env.result(
            "whole worker kill -9 + restart",
            ids,
            recovery,
            f"restart took {ready_at - fault_at:.1f} s; reconcile_after_s={env.settings.reconcile_after_s:g}",
        )
        result.details["restart_s"] = ready_at - fault_at
        result.details["in_flight_at_kill"] = in_flight
        result.details["worker_alive"] = restarted.alive()
        return result


def drill_worker_kill_without_reconciler(workdir: Path | None = None, n: int = 12) -> DrillResult:
    """Baseline for the drill above: the reconciler effectively off, kombu's unacked restore alone.

    The visibility timeout is 30 s (the shipped default is 900 s) so the baseline ends in about a minute:
    kombu hands an unacknowledged message out again only once it is older than the visibility timeout.
    """
    with drill_env("kombu_restore", workdir, reconcile_after_s=1e6, broker_visibility_timeout_s=30) as env:
        worker = env.worker(concurrency=2)
        ids = env.submit(make_images(n, seed=12))
        env.wait_any(ids, "processing", timeout=60)
        worker.kill9()
        fault_at = time.monotonic()
        restarted = env.worker("w2", concurrency=2)
        ready_at = time.monotonic()
        env.wait_finished(ids, timeout=400)
        recovery = time.monotonic() - fault_at
        result = env.result(
            "baseline: worker kill -9 + restart, no reconciler",
            ids,
            recovery,
            f"restart took {ready_at - fault_at:.1f} s; kombu restores unacked messages (visibility 30 s)",
        )
        result.details["worker_alive"] = restarted.alive()
        return result


def drill_redis_restart(workdir: Path | None = None, n: int = 24, *, appendonly: bool = True) -> DrillResult:
    """kill -9 Redis while messages are queued, start it again on the same files."""
    tag = "redis_aof" if appendonly else "redis_noaof"
    with drill_env(tag, workdir, appendonly=appendonly) as env:
        worker = env.worker(concurrency=1)
        ids = env.submit(make_images(n, seed=3 if appendonly else 4))
        env.wait_any(ids, "processing", timeout=60)
        waiting_before = env.redis.client().llen(env.settings.queue_name)
        env.redis.kill9()
        time.sleep(1.0)
        env.redis.start()
        restarted_at = time.monotonic()
        waiting_after = env.redis.client().llen(env.settings.queue_name)
        env.wait_finished(ids)
        recovery = time.monotonic() - restarted_at
        mode = "appendonly (as shipped)" if appendonly else "no persistence"
        result = env.result(
            f"redis kill -9 + restart, {mode}",
            ids,
            recovery,
            f"messages queued {waiting_before} -> {waiting_after} after restart",
        )
        result.details.update(
            waiting_before=waiting_before, waiting_after=waiting_after, worker_alive=worker.alive()
        )
        return result


def drill_redis_down_at_start(
    workdir: Path | None = None, n: int = 12, outage_s: float = 10.0
) -> DrillResult:
    """Worker started while Redis is down; checks recorded meanwhile; Redis comes up after ``outage_s``."""
    with drill_env("redis_down_start", workdir) as env:
        env.redis.kill9()
        worker = env.worker(concurrency=1, ready=False)
        ids = env.record(
            make_images(n, seed=5)
        )  # enqueue impossible: rows only, as `synthguard enqueue` leaves them
        time.sleep(outage_s)
        alive_during_outage = worker.alive()
        env.redis.start()
        up_at = time.monotonic()
        env.wait_finished(ids)
        recovery = time.monotonic() - up_at
        result = env.result(
            f"redis down at worker start ({outage_s:g} s)",
            ids,
            recovery,
            f"worker alive through outage: {alive_during_outage}; messages sent by the reconciler",
        )
        result.details.update(alive_during_outage=alive_during_outage, worker_alive=worker.alive())
        return result


def drill_redis_outage_busy(workdir: Path | None = None, n: int = 24, outage_s: float = 10.0) -> DrillResult:
    """Redis stopped for ``outage_s`` while the worker is busy, then started on the same append-only file."""
    with drill_env("redis_outage", workdir) as env:
        worker = env.worker(concurrency=1)
        pid_before = worker.pid
        ids = env.submit(make_images(n, seed=6))
        env.wait_any(ids, "processing", timeout=60)
        env.redis.stop()
        time.sleep(outage_s)
        alive_during_outage = worker.alive()
        env.redis.start()
        up_at = time.monotonic()
        env.wait_finished(ids)
        recovery = time.monotonic() - up_at
        same_process = worker.alive() and worker.pid == pid_before
        result = env.result(
            f"redis stopped {outage_s:g} s while busy",
            ids,
            recovery,
            f"worker alive through outage: {alive_during_outage}, same process after: {same_process}",
        )
        result.details.update(alive_during_outage=alive_during_outage, worker_alive=same_process)
        return result


def drill_poison(workdir: Path | None = None, n: int = 8) -> DrillResult:
    """An image that kills the decoder every time, and a check that kills the worker process every time."""
    with drill_env("poison", workdir, decode_timeout_s=0.3, max_attempts=3) as env:
        worker = env.worker(concurrency=1)
        decoder_killer = env.submit([slow_decode_image()], client="poison")
        process_killer = env.submit(make_images(1, seed=70), client="poison")
        good = env.submit(make_images(n, seed=7))
        kills = 0
        killed_attempt = 0
        deadline = time.monotonic() + DEFAULT_WAIT_S
        # Each time the process-killer check is claimed again (its attempt count goes up), the pool process
        # working on it dies (kill -9), as if the image crashed the interpreter. The database counts the
        # attempts; the claim (or the reconciler) dead-letters it at max_attempts.
        # The pool process is looked up while the check waits (a /proc scan is slow under load), so the kill
        # itself follows the "processing" status within one short database poll.
        pool_pid: int | None = None
        while time.monotonic() < deadline:
            if pool_pid is None or not _running(pool_pid):
                pids = sorted(worker.pool_pids())
                pool_pid = pids[0] if pids else None
            status, attempts = env.status_and_attempts(process_killer[0])
            if status in FINISHED:
                break
            if status == "processing" and attempts > killed_attempt and pool_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pool_pid, signal.SIGKILL)
                kills += 1
                killed_attempt = attempts
                pool_pid = None
            time.sleep(0.005)
        env.wait_finished(good + decoder_killer + process_killer)
        with session_scope(env.factory) as session:
            errors = {
                str(c.id): (c.status, c.attempts, c.error)
                for c in session.scalars(
                    sa.select(Check).where(Check.id.in_(decoder_killer + process_killer))
                )
            }
        decoder_status = errors[str(decoder_killer[0])]
        killer_status = errors[str(process_killer[0])]
        result = env.result(
            "poison: decoder-killer + process-killer",
            good + decoder_killer + process_killer,
            None,
            f"decoder-killer: {decoder_status[0]} after {decoder_status[1]} attempt(s) "
            f"({decoder_status[2]}); "
            f"process-killer: {killer_status[0]} after {killer_status[1]} attempts, {kills} kills",
        )
        result.details.update(
            decoder_killer=decoder_status,
            process_killer=killer_status,
            kills=kills,
            good=env.statuses(good),
            worker_alive=worker.alive(),
        )
        return result


def _publish_raw(env: DrillEnv, body: bytes, content_type: str, task: str) -> None:
    with env.app.connection_for_write() as connection:
        producer = connection.Producer()
        task_id = str(uuid.uuid4())
        producer.publish(
            body,
            routing_key=env.settings.queue_name,
            exchange="",
            content_type=content_type,
            content_encoding="utf-8" if content_type == "application/json" else "binary",
            headers={"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None},
            retry=False,
        )


class _Canary:
    """Unpickling this would create a file: proof that a pickle message was never deserialised."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def drill_malformed(workdir: Path | None = None, n: int = 4) -> DrillResult:
    """Bad JSON, unknown task, wrong argument types, a pickle message: refused and logged; work goes on."""
    with drill_env("malformed", workdir) as env:
        worker = env.worker(concurrency=1)
        canary = env.workdir / "pickle-was-loaded"
        bad = [
            (b"{this is not json", "application/json", PROCESS_CHECKS_TASK),
            (
                json.dumps([[], {"check_ids": ["x"]}, {}]).encode(),
                "application/json",
                "synthguard.no_such_task",
            ),
            (
                json.dumps([[], {"check_ids": "not-a-list"}, {}]).encode(),
                "application/json",
                PROCESS_CHECKS_TASK,
            ),
            (
                json.dumps([[], {"check_ids": [123, None]}, {}]).encode(),
                "application/json",
                PROCESS_CHECKS_TASK,
            ),
            (
                json.dumps([[], {"client": 5, "external_id": ["x"]}, {}]).encode(),
                "application/json",
                CHECK_IMAGE_TASK,
            ),
            (json.dumps([["positional"], {}, {}]).encode(), "application/json", CHECK_IMAGE_TASK),
            (
                pickle.dumps(([], {"check_ids": [_Canary(str(canary))]}, {})),
                "application/x-python-serialize",
                PROCESS_CHECKS_TASK,
            ),
        ]
        for body, content_type, task in bad:
            _publish_raw(env, body, content_type, task)
        ids = env.submit(make_images(n, seed=8))
        recovery = env.wait_finished(ids)
        log = worker.log()
        signs = {
            "bad JSON": "decode" in log.lower(),
            "unknown task": "unregistered task" in log.lower(),
            "wrong types": "refused" in log.lower(),
            "pickle refused": ("disallowed" in log.lower() or "refusing" in log.lower())
            and not canary.exists(),
        }
        result = env.result(
            "malformed messages (7 kinds) then good ones",
            ids,
            recovery,
            "refused and logged: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in signs.items()),
        )
        result.details.update(signs=signs, pickle_loaded=canary.exists(), worker_alive=worker.alive())
        return result


def drill_two_workers(workdir: Path | None = None, n: int = 12) -> DrillResult:
    """Two workers get the same image (under n ids) and the same check twice, at once."""
    with drill_env("two_workers", workdir, batch_size=1) as env:
        first = env.worker("w1", concurrency=1)
        second = env.worker("w2", concurrency=1)
        same = make_images(1, seed=9)[0]
        ids = env.submit([same] * n)
        # Every id once more: each check is now in two messages that the two workers may take at once.
        enqueue_checks(env.app, ids, 1)
        recovery = env.wait_finished(ids)
        time.sleep(1.0)  # let the duplicate messages be processed (they find finished checks)
        with session_scope(env.factory) as session:
            verdict_rows = session.scalar(sa.select(sa.func.count()).select_from(Verdict)) or 0
            verdict_ids = set(session.scalars(sa.select(Check.verdict_id).where(Check.id.in_(ids))))
        result = env.result(
            f"two workers, same image x{n} and duplicate messages",
            ids,
            recovery,
            f"verdict rows {verdict_rows}, distinct verdicts on the checks {len(verdict_ids)}",
        )
        result.details.update(
            verdict_rows=verdict_rows,
            distinct_verdicts=len(verdict_ids),
            workers_alive=first.alive() and second.alive(),
        )
        return result


def drill_sigterm(workdir: Path | None = None, n: int = 24) -> DrillResult:
    """SIGTERM mid-batch: warm shutdown finishes running tasks, returns the rest; a new worker finishes."""
    with drill_env("sigterm", workdir) as env:
        worker = env.worker(concurrency=2)
        ids = env.submit(make_images(n, seed=10))
        env.wait_any(ids, "processing", timeout=60)
        shutdown_s = worker.terminate()
        exit_code = worker.process.returncode
        at_exit = env.statuses(ids)
        stopped_at = time.monotonic()
        env.worker("w2", concurrency=2)
        env.wait_finished(ids)
        recovery = time.monotonic() - stopped_at
        result = env.result(
            "SIGTERM mid-batch + restart",
            ids,
            recovery,
            f"warm shutdown took {shutdown_s:.1f} s, exit {exit_code}; left processing at exit: "
            f"{at_exit['processing']}",
        )
        result.details.update(
            shutdown_s=shutdown_s, exit_code=exit_code, processing_at_exit=at_exit["processing"]
        )
        return result


def drill_pg_restart(workdir: Path | None = None, n: int = 40, mode: str = "fast") -> DrillResult:
    """Restart the machine's PostgreSQL mid-batch (``-m fast`` or ``-m immediate``, i.e. crash recovery).

    The worker recovers by itself: pooled connections are pre-pinged, a task whose transaction failed is
    retried (the claim and the upserts make a retry harmless).
    """
    with drill_env(f"pg_{mode}", workdir) as env:
        worker = env.worker(concurrency=2)
        ids = env.submit(make_images(n, seed=11 if mode == "fast" else 13))
        env.wait_any(ids, "done", timeout=90)
        before = env.statuses(ids)
        started = time.monotonic()
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart", "-m", mode],
            check=True,
            timeout=120,
        )
        restarted_at = time.monotonic()
        env.engine.dispose()
        env.wait_finished(ids)
        # From the start of the restart: the worker may finish during it (retrying as the server returns).
        recovery = time.monotonic() - started
        log = worker.log()
        retries = log.count(" retry: Retry in ")
        result = env.result(
            f"PostgreSQL restart ({mode}) mid-batch",
            ids,
            recovery,
            f"at restart: {before['done']} done, {before['processing']} processing, "
            f"{before['queued']} queued; restart took {restarted_at - started:.1f} s; task retries {retries}",
        )
        result.details.update(worker_alive=worker.alive(), task_retries=retries, before=dict(before))
        return result


def _outcome_kind(status: str, error: str | None) -> str:
    if status == "done":
        return "analysed (verdict)"
    text = (error or "").lower()
    for needle, kind in (
        ("unsupported image format", "refused: format not allowed"),
        ("not a recognised image", "refused: not an image"),
        ("too large", "refused: too many pixels"),
        ("degenerate", "refused: degenerate size"),
        ("truncated", "failed: truncated"),
        ("corrupt", "failed: corrupt data"),
        ("timed out", "failed: decode timed out"),
        ("crashed", "failed: decoder crashed"),
        ("out of memory", "failed: decoder out of memory"),
    ):
        if needle in text:
            return kind
    return "failed: other"


def drill_hostile(workdir: Path | None = None, corpus: Path | None = None) -> DrillResult:
    """Every file of the hostile corpus through a real worker: outcomes by kind and peak RSS."""
    corpus = corpus or shared_dir() / "datasets" / "hostile" / "pillow-tests"
    files = sorted(p for p in corpus.glob("*") if p.is_file() and p.name != "LICENSE")
    if not files:
        raise FileNotFoundError(f"hostile corpus not found at {corpus}")
    with drill_env("hostile", workdir) as env:
        worker = env.worker(concurrency=2)
        pid_before = worker.pid
        ids = env.submit([p.read_bytes() for p in files], client="hostile")
        recovery = env.wait_finished(ids, timeout=600)
        with session_scope(env.factory) as session:
            rows = session.execute(sa.select(Check.status, Check.error).where(Check.id.in_(ids))).all()
        kinds = Counter(_outcome_kind(status, error) for status, error in rows)
        unreadable = [error for status, error in rows if status == "failed" and not (error or "").strip()]
        result = env.result(
            f"hostile corpus ({len(files)} files)",
            ids,
            recovery,
            "; ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items())),
        )
        result.details.update(
            kinds=dict(kinds),
            unreadable_failures=len(unreadable),
            peak_rss_kib={
                "main": worker.peaks.main,
                "pool": worker.peaks.pool,
                "decoder": worker.peaks.decoder,
            },
            worker_alive=worker.alive() and worker.pid == pid_before,
        )
        return result


def drill_hostile_urls(workdir: Path | None = None) -> DrillResult:
    """SSRF attempts through a real worker (no allowlist): each fails as refused; no socket reaches us."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    urls = [
        f"http://127.0.0.1:{port}/a.png",
        f"http://localhost:{port}/a.png",
        f"http://2130706433:{port}/a.png",
        f"http://0x7f.1:{port}/a.png",
        f"http://127.1:{port}/a.png",
        f"http://0177.0.0.1:{port}/a.png",
        f"http://[::ffff:127.0.0.1]:{port}/a.png",
        f"http://[::1]:{port}/a.png",
        f"http://user@127.0.0.1:{port}/a.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.1/a.png",
        "http://100.64.0.1/a.png",
        "http://[fc00::1]/a.png",
        "http://[fe80::1]/a.png",
        f"ftp://127.0.0.1:{port}/a.png",
    ]
    try:
        with drill_env("hostile_urls", workdir, allow_private_hosts="") as env:
            worker = env.worker(concurrency=1)
            ids = []
            with session_scope(env.factory) as session:
                for url in urls:
                    check, _ = get_or_create_check(
                        session, client="ssrf", external_id=uuid.uuid4().hex, source_url=url
                    )
                    ids.append(check.id)
            enqueue_checks(env.app, ids, env.settings.batch_size)
            recovery = env.wait_finished(ids)
            with session_scope(env.factory) as session:
                rows = session.scalars(sa.select(Check).where(Check.id.in_(ids)))
                errors = [check.error or "" for check in rows]
            connections = 0
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.close()
                connections += 1
            refused = sum("refused" in error or "not allowed" in error for error in errors)
            result = env.result(
                f"SSRF URLs through the worker ({len(urls)})",
                ids,
                recovery,
                f"failed as refused: {refused}/{len(urls)}; connections reaching 127.0.0.1: {connections}",
            )
            result.details.update(refused=refused, connections=connections, errors=errors)
            result.details["worker_alive"] = worker.alive()
            return result
    finally:
        listener.close()


DRILLS: dict[str, Callable[..., DrillResult]] = {
    "child_kill": drill_child_kill,
    "worker_kill": drill_worker_kill,
    "worker_kill_baseline": drill_worker_kill_without_reconciler,
    "redis_aof": lambda workdir=None, n=24: drill_redis_restart(workdir, n, appendonly=True),
    "redis_noaof": lambda workdir=None, n=24: drill_redis_restart(workdir, n, appendonly=False),
    "redis_down_start": drill_redis_down_at_start,
    "redis_outage": drill_redis_outage_busy,
    "poison": drill_poison,
    "malformed": drill_malformed,
    "two_workers": drill_two_workers,
    "sigterm": drill_sigterm,
    "hostile": drill_hostile,
    "hostile_urls": drill_hostile_urls,
    "pg_restart": drill_pg_restart,
    "pg_restart_immediate": lambda workdir=None, n=40: drill_pg_restart(workdir, n, mode="immediate"),
}


def format_table(results: Sequence[DrillResult]) -> str:
    header = "| drill | submitted | done | failed | lost | duplicated | extra attempts | recovery | notes |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.1f} s"
        lines.append(
            f"| {r.name} | {r.submitted} | {r.done} | {r.failed} | {r.lost} | {r.duplicated} | "
            f"{r.extra_attempts} | {recovery} | {r.notes} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--drills", default=",".join(name for name in DRILLS if not name.startswith("pg_")))
    parser.add_argument("--n", type=int, default=None, help="checks per drill (each drill has its default)")
    parser.add_argument("--pg-restart", action="store_true", help="also restart the machine's PostgreSQL")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    names = [name.strip() for name in args.drills.split(",") if name.strip()]
    if args.pg_restart:
        names += [name for name in ("pg_restart", "pg_restart_immediate") if name not in names]
    results = []
    for name in names:
        started = time.monotonic()
        kwargs = {} if args.n is None or name.startswith("hostile") else {"n": args.n}
        try:
            result = DRILLS[name](**kwargs)
        except Exception as exc:  # noqa: BLE001 - one broken drill must not hide the others' figures
            result = DrillResult(
                name=name, submitted=0, notes=f"DRILL ERROR: {type(exc).__name__}: {exc}"[:300]
            )
        results.append(result)
        print(f"[{name}] {time.monotonic() - started:.0f} s: {result}", file=sys.stderr, flush=True)
    print(format_table(results))
    partial = {r.name: r.details.get("partial") for r in results}
    print(f"\nPartial outcomes (done without a verdict, failed without a reason): {partial}")
    for r in results:
        if "peak_rss_kib" in r.details:
            peaks = r.details["peak_rss_kib"]
            print(
                f"\nPeak RSS during '{r.name}': worker main {peaks['main'] / 1024:.0f} MiB, "
                f"pool process {peaks['pool'] / 1024:.0f} MiB, "
                f"decoder child {peaks['decoder'] / 1024:.0f} MiB"
            )
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2, default=str))


if __name__ == "__main__":
    main()
