"""Fault drills with real processes: kill -9, SIGTERM, Redis killed or stopped, poison and malformed messages.

Each test runs one drill from bench/fault_drills.py (its own redis-server on a free port, its own PostgreSQL
database, ``celery -A worker.celery worker`` subprocesses) with small numbers, and asserts what the issue
asks: every check ends done or failed, none lost, never two verdicts for one image and model version, the
worker alive. The timings these drills measure are reported by the bench script, never asserted here.

The PostgreSQL restart drill restarts the machine's shared server, so it runs only when
SYNTHGUARD_DRILL_PG_RESTART=1.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench import fault_drills as drills

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server binary not installed"),
    pytest.mark.timeout(280),
]


def assert_nothing_lost(result: drills.DrillResult) -> None:
    assert result.submitted > 0
    assert result.lost == 0, result
    assert result.duplicated == 0, result
    assert result.done + result.failed == result.submitted
    assert result.details["partial"] == 0  # no done check without its verdict, no failure without a reason


def test_worker_child_killed_mid_batch_loses_nothing(tmp_path: Path) -> None:
    result = drills.drill_child_kill(tmp_path, n=16, kills=2)
    assert_nothing_lost(result)
    assert result.done == 16
    assert result.extra_attempts > 0  # the kills really hit work in progress
    assert result.details["worker_alive"]


def test_whole_worker_killed_and_restarted_recovers_through_the_reconciler(tmp_path: Path) -> None:
    result = drills.drill_worker_kill(tmp_path, n=12)
    assert_nothing_lost(result)
    assert result.done == 12
    assert result.extra_attempts > 0
    assert result.details["worker_alive"]


def test_redis_killed_with_appendonly_keeps_the_queued_messages(tmp_path: Path) -> None:
    result = drills.drill_redis_restart(tmp_path, n=16, appendonly=True)
    assert_nothing_lost(result)
    assert result.details["waiting_before"] > 0
    assert result.details["waiting_after"] == result.details["waiting_before"]


def test_redis_killed_without_persistence_is_recovered_by_the_reconciler(tmp_path: Path) -> None:
    result = drills.drill_redis_restart(tmp_path, n=16, appendonly=False)
    assert result.details["waiting_before"] > 0
    assert result.details["waiting_after"] == 0  # Redis forgot the messages...
    assert_nothing_lost(result)  # ...the database did not


def test_redis_down_when_the_worker_starts(tmp_path: Path) -> None:
    result = drills.drill_redis_down_at_start(tmp_path, n=8, outage_s=10.0)
    assert result.details["alive_during_outage"]
    assert_nothing_lost(result)
    assert result.done == 8


def test_redis_stopped_while_busy(tmp_path: Path) -> None:
    result = drills.drill_redis_outage_busy(tmp_path, n=16, outage_s=10.0)
    assert result.details["alive_during_outage"]
    assert result.details["worker_alive"]  # the same process: no crash loop
    assert_nothing_lost(result)


def test_poison_images_are_dead_lettered_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    result = drills.drill_poison(tmp_path, n=6)
    assert_nothing_lost(result)
    status, attempts, error = result.details["decoder_killer"]
    assert status == "failed"
    assert attempts == 1
    assert "decode timed out" in error
    status, attempts, error = result.details["process_killer"]
    assert status == "failed"
    assert attempts == 3  # max_attempts in the drill: counted in the database across process deaths
    assert "dead-lettered" in error
    assert result.details["good"] == {"done": 6}
    assert result.details["worker_alive"]


def test_malformed_messages_are_refused_and_logged(tmp_path: Path) -> None:
    result = drills.drill_malformed(tmp_path, n=4)
    assert result.details["signs"] == {
        "bad JSON": True,
        "unknown task": True,
        "wrong types": True,
        "pickle refused": True,
    }
    assert not result.details["pickle_loaded"]
    assert_nothing_lost(result)
    assert result.done == 4
    assert result.details["worker_alive"]


def test_two_workers_same_image_give_one_verdict(tmp_path: Path) -> None:
    result = drills.drill_two_workers(tmp_path, n=10)
    assert_nothing_lost(result)
    assert result.details["verdict_rows"] == 1
    assert result.details["distinct_verdicts"] == 1
    assert result.details["workers_alive"]


def test_sigterm_during_work_finishes_or_returns_the_batch(tmp_path: Path) -> None:
    result = drills.drill_sigterm(tmp_path, n=16)
    assert result.details["exit_code"] == 0  # a warm shutdown, not the drill's kill after a timeout
    assert result.details["processing_at_exit"] == 0
    assert_nothing_lost(result)


def test_hostile_corpus_through_a_real_worker(tmp_path: Path) -> None:
    corpus = drills.shared_dir() / "datasets" / "hostile" / "pillow-tests"
    if not corpus.is_dir():
        pytest.skip(f"hostile corpus not found at {corpus} (set SYNTHGUARD_SHARED_DIR)")
    result = drills.drill_hostile(tmp_path, corpus)
    assert_nothing_lost(result)
    assert result.details["unreadable_failures"] == 0
    assert result.details["worker_alive"]
    assert result.done > 0
    assert result.failed > 0


def test_ssrf_urls_through_a_real_worker_fail_as_refused_without_a_connection(tmp_path: Path) -> None:
    result = drills.drill_hostile_urls(tmp_path)
    assert_nothing_lost(result)
    assert result.failed == result.submitted
    assert result.details["refused"] == result.submitted
    assert result.details["connections"] == 0
    assert all(error.startswith("fetch failed: refused") for error in result.details["errors"])
    assert result.details["worker_alive"]


@pytest.mark.skipif(
    os.environ.get("SYNTHGUARD_DRILL_PG_RESTART") != "1",
    reason="restarts the machine's shared PostgreSQL; set SYNTHGUARD_DRILL_PG_RESTART=1 to run",
)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restart_mid_batch(tmp_path: Path, mode: str) -> None:
    result = drills.drill_pg_restart(tmp_path, n=24, mode=mode)
    assert_nothing_lost(result)
    assert result.details["worker_alive"]
