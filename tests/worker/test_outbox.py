"""The outbox: which events a check raises, for which targets, written in the caller's transaction.

Real PostgreSQL, schema from Alembic. Nothing is sent here (see test_webhooks_delivery.py for that).
"""

from __future__ import annotations

import json
import re
import socket
import uuid

import pytest
import sqlalchemy as sa

from db import queries
from db.session import session_scope
from db.tables import Check, Client, Review, Verdict
from db.webhook_tables import WebhookDelivery
from tests.worker.webhook_helpers import add_checked_image
from worker import outbox
from worker.fetch import FetchError, fetch_image
from worker.webhook_endpoints import create_endpoint, set_endpoint_enabled
from worker.webhooks import PAYLOAD_MAX_BYTES, SecretCipher

pytestmark = pytest.mark.usefixtures("pg_clean")

URL = "https://hooks.example.com/synthguard"


def _endpoint(factory, settings, *, client="acme", events=None, url=URL):
    with session_scope(factory) as session:
        endpoint, _ = create_endpoint(
            session, SecretCipher(settings.require_secret_key()), url=url, client=client, events=events
        )
        return endpoint.id


def _rows(session, ids):
    return session.scalars(
        sa.select(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).order_by(WebhookDelivery.url)
    ).all()


def test_flagged_check_writes_one_row_per_target_with_a_clean_payload(pg_session_factory, settings):
    endpoint_id = _endpoint(pg_session_factory, settings)
    with session_scope(pg_session_factory) as session:
        check, verdict = add_checked_image(session, callback_url="https://platform.example.com/cb")
        ids = outbox.record_check_events(session, check, verdict)
        rows = _rows(session, ids)
        assert [(r.event_type, r.endpoint_id, r.url, r.status) for r in rows] == [
            ("check.flagged", endpoint_id, URL, "pending"),
            ("check.flagged", None, "https://platform.example.com/cb", "pending"),
        ]
        # One event, one webhook-id for all its targets; the same bytes go to each.
        assert len({r.message_id for r in rows}) == 1 and len({r.payload for r in rows}) == 1
        payload = json.loads(rows[0].payload)
        assert payload["type"] == "check.flagged"
        assert payload["data"]["check_id"] == str(check.id)
        assert payload["data"]["external_id"] == check.external_id
        assert payload["data"]["client"] == "acme"
        assert payload["data"]["model_version"] == "1.0.0+abcdef123456"
        assert "threshold" not in rows[0].payload and "image" not in rows[0].payload
        assert len(rows[0].payload.encode()) <= PAYLOAD_MAX_BYTES


def test_outbox_rows_roll_back_with_the_verdict(pg_session_factory, settings):
    _endpoint(pg_session_factory, settings)
    with pytest.raises(RuntimeError), session_scope(pg_session_factory) as session:
        check, verdict = add_checked_image(session)
        assert outbox.record_check_events(session, check, verdict)
        raise RuntimeError("the pipeline failed after writing the verdict")
    with session_scope(pg_session_factory) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(WebhookDelivery)) == 0


def test_real_verdict_sends_nothing_and_uncertain_follows_client_policy(pg_session_factory, settings):
    _endpoint(pg_session_factory, settings, client="acme")
    _endpoint(pg_session_factory, settings, client="strict")
    with session_scope(pg_session_factory) as session:
        check, verdict = add_checked_image(session, verdict="real", score=0.1)
        assert outbox.record_check_events(session, check, verdict) == []
        check, verdict = add_checked_image(session, verdict="uncertain", score=0.6)
        assert outbox.record_check_events(session, check, verdict) == []
        session.get_one(Client, "strict").flag_uncertain = True
        check, verdict = add_checked_image(session, client="strict", verdict="uncertain")
        assert len(outbox.record_check_events(session, check, verdict)) == 1
        session.get_one(Client, "acme").flag_threshold = 0.5
        check, verdict = add_checked_image(session, verdict="uncertain", score=0.6)
        assert len(outbox.record_check_events(session, check, verdict)) == 1


def test_disabled_endpoints_and_other_clients_get_nothing(pg_session_factory, settings):
    disabled = _endpoint(pg_session_factory, settings)
    _endpoint(pg_session_factory, settings, client="other")
    with session_scope(pg_session_factory) as session:
        set_endpoint_enabled(session, disabled, enabled=False)
        check, verdict = add_checked_image(session)
        assert outbox.record_check_events(session, check, verdict) == []


def test_completed_and_failed_only_for_subscribed_endpoints(pg_session_factory, settings):
    _endpoint(pg_session_factory, settings, events=["check.flagged"])
    all_id = _endpoint(pg_session_factory, settings, events=["check.completed", "check.failed"])
    with session_scope(pg_session_factory) as session:
        check, verdict = add_checked_image(session, verdict="real", score=0.05, callback_url=URL + "/cb")
        ids = outbox.record_check_events(session, check, verdict)
        assert [(r.event_type, r.endpoint_id) for r in _rows(session, ids)] == [("check.completed", all_id)]

        check.status, check.error = "failed", "fetch refused: 10.0.0.1 is a private address"
        ids = outbox.record_check_failed(session, check)
        (row,) = _rows(session, ids)
        assert row.event_type == "check.failed" and row.endpoint_id == all_id
        assert json.loads(row.payload)["data"]["error"].startswith("fetch refused")


def test_recording_the_same_event_twice_queues_it_once(pg_session_factory, settings):
    _endpoint(pg_session_factory, settings)
    with session_scope(pg_session_factory) as session:
        check, verdict = add_checked_image(session, callback_url=URL + "/cb")
        first = outbox.record_check_events(session, check, verdict)
        again = outbox.record_check_events(session, check, verdict)
    assert len(first) == 2  # the endpoint and the callback URL
    assert again == []


def test_review_event(pg_session_factory, settings):
    endpoint_id = _endpoint(pg_session_factory, settings)
    with session_scope(pg_session_factory) as session:
        check, _ = add_checked_image(session, callback_url=URL + "/cb")
        session.refresh(check)
        review = Review(
            id=uuid.uuid4(),
            check_id=check.id,
            reviewer="alice",
            previous_verdict="generated",
            new_verdict="real",
            note="a scan of a painting",
        )
        session.add(review)
        session.flush()
        ids = outbox.record_review(session, check, review)
        rows = _rows(session, ids)
        assert [(r.event_type, r.endpoint_id) for r in rows] == [
            ("check.reviewed", endpoint_id),
            ("check.reviewed", None),  # the verdict changed: the callback hears about it
        ]
        payload = json.loads(rows[0].payload)
        data = payload["data"]
        assert data["verdict"] == "real" and data["decided_by"] == "review"
        # Every timestamp of a payload is written alike: UTC with milliseconds and a Z.
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["review"]["reviewed_at"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", payload["timestamp"])
        assert data["review"]["previous_verdict"] == "generated"
        assert "alice" not in rows[0].payload and "painting" not in rows[0].payload

        confirm = Review(
            id=uuid.uuid4(), check_id=check.id, reviewer="bob", previous_verdict="real", new_verdict="real"
        )
        session.add(confirm)
        session.flush()
        ids = outbox.record_review(session, check, confirm)
        assert [r.endpoint_id for r in _rows(session, ids)] == [endpoint_id]  # no callback: nothing changed


def test_check_flagged_is_recorded_by_the_listings_flag_rule(pg_session_factory):
    """The outbox sends ``check.flagged`` (here to the callback URL) exactly for the checks listings flag;
    a score equal to the client's threshold counts as reaching it."""
    with session_scope(pg_session_factory) as session:
        for verdict in ("generated", "uncertain", "real"):
            for flag_uncertain in (False, True):
                for threshold in (None, 0.5, 0.6, 0.9):
                    name = f"c-{verdict}-{flag_uncertain}-{threshold}"
                    check, row = add_checked_image(
                        session,
                        client=name,
                        verdict=verdict,
                        score=0.6,
                        flag_uncertain=flag_uncertain,
                        flag_threshold=threshold,
                        callback_url="https://example.com/cb",
                    )
                    events = {
                        r.event_type for r in _rows(session, outbox.record_check_events(session, check, row))
                    }
                    listed = session.scalar(
                        sa.select(sa.func.count())
                        .select_from(Check)
                        .join(Verdict, Verdict.id == Check.verdict_id)
                        .outerjoin(Client, Client.name == Check.client)
                        .where(Check.id == check.id, queries.flagged_condition())
                    )
                    assert ("check.flagged" in events) == (listed == 1), name
                    if threshold == 0.6:
                        assert "check.flagged" in events, name


def test_review_check_stores_the_review_and_its_event_together(pg_session_factory, settings):
    endpoint_id = _endpoint(pg_session_factory, settings)
    with session_scope(pg_session_factory) as session:
        check, _ = add_checked_image(session)
        check_id = check.id
    with session_scope(pg_session_factory) as session:
        review, ids = outbox.review_check(session, check_id, reviewer="alice", new_verdict="real")
        assert review.previous_verdict == "generated"
        (row,) = _rows(session, ids)
        assert (row.event_type, row.endpoint_id) == ("check.reviewed", endpoint_id)
        assert json.loads(row.payload)["data"]["verdict"] == "real"
    with session_scope(pg_session_factory) as session:
        assert session.get_one(Check, check_id).reviewed_verdict == "real"


# --- check.failed: what the payload says about fetch failures ---------------------------------------------


def _fetch_reason(settings, url, *, resolver=None, allow="", **update):
    """The reason worker/fetch.py (and netguard under it) gives for ``url``: the real wording."""
    fetch_settings = settings.model_copy(
        update={"allow_private_hosts": allow, "fetch_timeout_s": 5.0, **update}
    )
    with pytest.raises(FetchError) as excinfo:
        fetch_image(url, fetch_settings, resolver=resolver)
    return excinfo.value.reason


def _failed_event_error(factory, error):
    """The error in the check.failed payload of a check stored as failed with ``error``, and the stored one.
    The client needs an endpoint subscribed to check.failed (the ``failed_endpoint`` fixture)."""
    with session_scope(factory) as session:
        check, _ = add_checked_image(session)
        check.status, check.error, check.verdict_id = "failed", error, None
        (row,) = _rows(session, outbox.record_check_failed(session, check))
        return json.loads(row.payload)["data"]["error"], session.get_one(Check, check.id).error


@pytest.fixture
def failed_endpoint(pg_clean, pg_session_factory, settings):
    return _endpoint(pg_session_factory, settings, events=["check.failed"])


def _no_such_name(host, port):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def _resolves_to(address):
    return lambda host, port: [address]


@pytest.mark.parametrize(
    ("url", "resolver", "hidden"),
    [
        # A name the worker's DNS maps to loopback (the review's repro).
        ("http://vm:8080/a.png", _resolves_to("127.0.0.1"), ["vm ", "127.0.0.1"]),
        # A name resolving to a private address.
        ("http://db.internal/a.png", _resolves_to("10.1.2.3"), ["db.internal", "10.1.2.3"]),
        # The cloud metadata address, named or literal.
        ("http://meta/a.png", _resolves_to("169.254.169.254"), ["169.254.169.254"]),
        ("http://169.254.169.254/latest", None, ["metadata"]),
        # A port refused only because the host is not allowlisted.
        ("http://images.example.com:22/a.png", _resolves_to("93.184.215.14"), ["port 22"]),
    ],
    ids=["loopback-name", "private-name", "metadata-name", "metadata-literal", "port"],
)
@pytest.mark.usefixtures("failed_endpoint")
def test_check_failed_hides_how_the_worker_refuses_hosts(pg_session_factory, settings, url, resolver, hidden):
    stored = f"fetch failed: {_fetch_reason(settings, url, resolver=resolver)}"
    sent, kept = _failed_event_error(pg_session_factory, stored)
    assert sent == "fetch failed: refused: the image URL's host is not allowed"
    for detail in hidden:
        assert detail in stored and detail not in sent, detail
    assert kept == stored  # the operator's view keeps the detail


@pytest.mark.usefixtures("failed_endpoint")
def test_check_failed_hides_whether_a_name_resolves(pg_session_factory, settings):
    stored = (
        f"fetch failed: {_fetch_reason(settings, 'http://secret-svc.corp/a.png', resolver=_no_such_name)}"
    )
    assert "could not resolve 'secret-svc.corp'" in stored
    sent, kept = _failed_event_error(pg_session_factory, stored)
    assert sent == "fetch failed: could not fetch the image URL"
    assert kept == stored


@pytest.mark.usefixtures("failed_endpoint")
def test_check_failed_hides_connection_failures_behind_the_allowlist(pg_session_factory, settings):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reason = _fetch_reason(settings, f"http://127.0.0.1:{port}/a.png", allow="127.0.0.1")
    assert reason.startswith("network error: ")
    sent, _ = _failed_event_error(pg_session_factory, f"fetch failed: {reason}")
    assert sent == "fetch failed: could not fetch the image URL"


@pytest.mark.usefixtures("failed_endpoint")
def test_check_failed_keeps_errors_about_the_platforms_own_url(pg_session_factory, settings, receiver):
    receiver.expect_request("/missing.png").respond_with_data("no", status=404)
    receiver.expect_request("/big.png").respond_with_data(b"x" * 5000, content_type="image/png")
    not_found = _fetch_reason(settings, receiver.url_for("/missing.png"), allow="127.0.0.1")
    too_large = _fetch_reason(settings, receiver.url_for("/big.png"), allow="127.0.0.1", fetch_max_bytes=1000)
    scheme = _fetch_reason(settings, "ftp://images.example.com/a.png")
    assert not_found.startswith("server answered HTTP 404") and too_large.startswith("response too large")
    assert scheme.startswith("refused: scheme 'ftp'")
    for error in (
        f"fetch failed: {not_found}",
        f"fetch failed: {too_large}",
        f"fetch failed: {scheme}",
        "not analysable: not an image (unknown format)",
    ):
        sent, _ = _failed_event_error(pg_session_factory, error)
        assert sent == error


@pytest.mark.usefixtures("failed_endpoint")
def test_check_failed_hides_the_detail_inside_a_final_failure_that_quotes_it(pg_session_factory, settings):
    waiting = (
        f"fetch failed, will retry: {_fetch_reason(settings, 'http://vm/a.png', resolver=_no_such_name)}"
    )
    error = f"dead-lettered: processing was started 5 times without finishing; last error: {waiting}"
    sent, _ = _failed_event_error(pg_session_factory, error)
    assert sent == (
        "dead-lettered: processing was started 5 times without finishing; last error: "
        "fetch failed, will retry: could not fetch the image URL"
    )
