"""Queries: race-safe inserts, the flagging rule (view == SQLAlchemy == Python), reviews."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from db.queries import (
    VerdictRecord,
    get_or_create_check,
    is_flagged,
    list_checks,
    list_verdicts,
    record_review,
    set_client_policy,
    upsert_verdict,
)
from db.session import make_engine, make_session_factory, session_scope
from db.tables import Check, Client, Evidence, Verdict


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        engine = make_engine(request.getfixturevalue("sqlite_url"))
        yield make_session_factory(engine)
        engine.dispose()
    else:
        request.getfixturevalue("pg_clean")
        yield request.getfixturevalue("pg_session_factory")


def record(sha256: str, verdict: str = "real", score: float = 0.1) -> VerdictRecord:
    return VerdictRecord(
        sha256=sha256,
        model_name="synthguard-v1",
        model_version="1.0",
        weights_sha="ab" * 32,
        model_id="synthguard-v1@1.0+abababababab",
        score=score,
        verdict=verdict,
        family_scores={"real": 1 - score, "diffusion": score, "gan": 0.0},
        threshold=0.5,
        decided_by="pixels",
        reasons=[],
        evidence={"grid": {"period_8": 0.1}, "spectral": {"mid_energy": 0.2}},
    )


def concurrently(count: int, work: Callable[[], Any]) -> list[Any]:
    """Run ``work`` in ``count`` threads released at the same moment; re-raise the first error."""
    barrier = threading.Barrier(count)
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(work())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_two_producers_creating_one_check_get_the_same_row(pg_clean, pg_session_factory):
    def create() -> uuid.UUID:
        with session_scope(pg_session_factory) as session:
            check, _ = get_or_create_check(session, client="race", external_id="same", image_data=b"x")
            return check.id

    ids = concurrently(4, create)
    assert len(set(ids)) == 1
    with session_scope(pg_session_factory) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Check)) == 1


def test_two_workers_storing_one_verdict_keep_one_row(pg_clean, pg_session_factory):
    def store() -> uuid.UUID:
        with session_scope(pg_session_factory) as session:
            return upsert_verdict(session, record("f" * 64)).id

    ids = concurrently(4, store)
    assert len(set(ids)) == 1
    with session_scope(pg_session_factory) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Verdict)) == 1
        assert session.scalar(sa.select(sa.func.count()).select_from(Evidence)) == 2


def _done_check(session: Session, client: str, verdict: Verdict) -> Check:
    check, _ = get_or_create_check(session, client=client, external_id=uuid.uuid4().hex)
    check.status = "done"
    check.verdict = verdict
    session.flush()
    return check


def test_view_query_and_python_agree_on_what_is_flagged(factory):
    with session_scope(factory) as session:
        set_client_policy(session, "strict", flag_threshold=0.3)
        set_client_policy(session, "cautious", flag_uncertain=True)
        # low_real scores exactly this: "at or above the threshold" flags it.
        set_client_policy(session, "edge", flag_threshold=0.35)
        generated = upsert_verdict(session, record("1" * 64, "generated", 0.95))
        uncertain = upsert_verdict(session, record("2" * 64, "uncertain", 0.55))
        low_real = upsert_verdict(session, record("3" * 64, "real", 0.35))
        real = upsert_verdict(session, record("4" * 64, "real", 0.05))
        checks = {
            (client, verdict.verdict, verdict.score): _done_check(session, client, verdict)
            for client in ("default", "strict", "cautious", "edge")
            for verdict in (generated, uncertain, low_real, real)
        }
        # A verdict on a check that is not done (being processed again) flags nothing and lists nowhere.
        not_done = _done_check(session, "default", generated)
        not_done.status = "processing"
        reviewed = _done_check(session, "default", real)
        record_review(session, reviewed.id, reviewer="alice", new_verdict="generated", note="obvious")
        overruled = _done_check(session, "default", generated)
        record_review(session, overruled.id, reviewer="bob", new_verdict="real")

    with session_scope(factory) as session:
        from_view = set(session.scalars(sa.text("SELECT DISTINCT check_id FROM flagged_checks")).all())
        from_view = {
            uuid.UUID(str(value)) if not isinstance(value, uuid.UUID) else value for value in from_view
        }
        from_query = {check.id for check in list_verdicts(session, flagged=True, limit=1000)}
        listed = {check.id for check in list_verdicts(session, limit=1000)}
        all_checks = session.scalars(sa.select(Check)).all()
        from_python = {
            check.id
            for check in all_checks
            if is_flagged(check, check.verdict, session.get(Client, check.client))
        }
    expected = {
        checks["default", "generated", 0.95].id,
        checks["strict", "generated", 0.95].id,
        checks["cautious", "generated", 0.95].id,
        checks["strict", "uncertain", 0.55].id,
        checks["strict", "real", 0.35].id,
        checks["cautious", "uncertain", 0.55].id,
        checks["edge", "generated", 0.95].id,
        checks["edge", "uncertain", 0.55].id,
        checks["edge", "real", 0.35].id,
        reviewed.id,
    }
    assert from_python == expected
    assert from_query == expected
    assert from_view == expected
    assert not_done.id not in listed and len(listed) == len(checks) + 2


def test_view_lists_evidence_newest_first(factory):
    with session_scope(factory) as session:
        verdict = upsert_verdict(session, record("5" * 64, "generated", 0.9))
        older = _done_check(session, "c", verdict)
        newer = _done_check(session, "c", verdict)
        newer.created_at = older.created_at + __import__("datetime").timedelta(seconds=5)
    with session_scope(factory) as session:
        rows = session.execute(
            sa.text("SELECT check_id, evidence_group, score, verdict FROM flagged_checks")
        ).all()
    order = [str(row.check_id).replace("-", "") for row in rows]
    assert order[0] == newer.id.hex and order[-1] == older.id.hex
    assert {row.evidence_group for row in rows} == {"grid", "spectral"}
    assert all(row.verdict == "generated" and row.score == pytest.approx(0.9) for row in rows)


def test_review_is_recorded_with_the_previous_verdict(factory):
    with session_scope(factory) as session:
        check = _done_check(session, "c", upsert_verdict(session, record("6" * 64, "uncertain", 0.6)))
        review = record_review(session, check.id, reviewer="r", new_verdict="real", note="camera original")
        assert review.previous_verdict == "uncertain"
        assert check.effective_verdict == "real"
        # A second review overrules the first, not the model: receivers decide from this what changed.
        second = record_review(session, check.id, reviewer="s", new_verdict="generated")
        assert second.previous_verdict == "real"
        assert check.effective_verdict == "generated"


def test_listings_filter_by_status_and_age(factory):
    from datetime import timedelta

    from db.base import utcnow

    with session_scope(factory) as session:
        queued, _ = get_or_create_check(session, client="c", external_id="q")
        failed, _ = get_or_create_check(session, client="c", external_id="f")
        failed.status, failed.error = "failed", "fetch failed: refused"
        queued.updated_at = utcnow() - timedelta(minutes=10)
    with session_scope(factory) as session:
        assert [check.external_id for check in list_checks(session, status="failed")] == ["f"]
        assert {check.external_id for check in list_checks(session)} == {"q", "f"}


def test_since_with_an_offset_means_the_same_instant_on_every_backend(factory):
    from datetime import UTC, datetime, timedelta, timezone

    created = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    client = f"tz-{uuid.uuid4().hex[:8]}"
    with session_scope(factory) as session:
        verdict = upsert_verdict(session, record("7" * 64))
        session.add(
            Check(
                client=client,
                external_id="x",
                status="done",
                verdict=verdict,
                created_at=created,
                updated_at=created,
            )
        )
    plus_two = timezone(timedelta(hours=2))
    cases = [
        (datetime(2026, 1, 1, 13, 30, tzinfo=plus_two), 1),
        (datetime(2026, 1, 1, 14, 0, tzinfo=plus_two), 1),  # since is inclusive
        (datetime(2026, 1, 1, 14, 30, tzinfo=plus_two), 0),
    ]
    for since, expected in cases:  # 11:30Z, 12:00Z and 12:30Z, written as +02:00
        with session_scope(factory) as session:
            for listing in (list_checks, list_verdicts):
                assert len(listing(session, client=client, since=since)) == expected, (listing, since)


def test_listings_load_each_verdict_but_not_its_evidence(factory):
    """Listings print no evidence: loading it for every verdict made a 100k-row export take 3.6 GiB."""
    from tests.worker.webhook_helpers import add_checked_image

    with session_scope(factory) as session:
        add_checked_image(session, client="listing")
    with session_scope(factory) as session:
        for listing in (list_verdicts, list_checks):
            session.expire_all()
            (check,) = listing(session)
            state = sa.inspect(check)
            assert "verdict" not in state.unloaded
            assert "evidence" in sa.inspect(check.verdict).unloaded
            assert [row.group_name for row in check.verdict.evidence] == ["grid"]  # still there on access
