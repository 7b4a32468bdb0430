"""`synthguard clients`: the policy it sets is the one `verdicts --flagged` and the webhook outbox apply."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy.orm import Session, sessionmaker

from db.queries import get_or_create_check
from db.session import make_engine, make_session_factory, session_scope
from db.tables import CLIENT_MAX_LEN, Client
from db.webhook_tables import WebhookDelivery
from tests.worker.webhook_helpers import add_checked_image
from worker import outbox
from worker.cli import main
from worker.webhooks import EVENT_FLAGGED

CALLBACK = "https://platform.example/hooks/check"


@dataclass(frozen=True)
class Backend:
    url: str
    factory: sessionmaker[Session]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
        engine = make_engine(url)
        yield Backend(url, make_session_factory(engine))
        engine.dispose()
    else:
        request.getfixturevalue("pg_clean")
        yield Backend(request.getfixturevalue("pg_url"), request.getfixturevalue("pg_session_factory"))


def run(backend: Backend, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--db", backend.url], catch_exceptions=False)


def run_json(backend: Backend, *args: str) -> Any:
    result = run(backend, *args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def flagged_ids(backend: Backend, client: str) -> set[str]:
    return {row["check_id"] for row in run_json(backend, "verdicts", "--flagged", "--client", client)}


def listed(backend: Backend) -> dict[str, dict[str, Any]]:
    return {row["client"]: row for row in run_json(backend, "clients", "list")}


def stored_policy(backend: Backend, name: str) -> tuple[float | None, bool] | None:
    with session_scope(backend.factory) as session:
        client = session.get(Client, name)
        return None if client is None else (client.flag_threshold, client.flag_uncertain)


def test_flag_uncertain_set_from_the_cli_is_what_verdicts_flagged_lists(backend):
    with session_scope(backend.factory) as session:
        uncertain = str(add_checked_image(session, client="acme", verdict="uncertain", score=0.6)[0].id)
        generated = str(add_checked_image(session, client="acme", verdict="generated", score=0.97)[0].id)
        add_checked_image(session, client="acme", verdict="real", score=0.1)
        add_checked_image(session, client="other", verdict="uncertain", score=0.6)

    assert flagged_ids(backend, "acme") == {generated}

    result = run(backend, "clients", "set", "acme", "--flag-uncertain")
    assert result.exit_code == 0, result.output
    assert "webhooks follow it for checks finished from now on" in result.stderr
    assert flagged_ids(backend, "acme") == {uncertain, generated}
    assert stored_policy(backend, "acme") == (None, True)
    # Only acme's policy changed: the other client's uncertain verdict stays unflagged.
    assert flagged_ids(backend, "other") == set()

    result = run(backend, "clients", "set", "acme", "--no-flag-uncertain")
    assert result.exit_code == 0, result.output
    assert flagged_ids(backend, "acme") == {generated}


def test_threshold_flags_at_or_above_and_options_left_out_keep_their_value(backend):
    with session_scope(backend.factory) as session:
        at_06 = str(add_checked_image(session, client="acme", verdict="real", score=0.6)[0].id)
        at_03 = str(add_checked_image(session, client="acme", verdict="real", score=0.3)[0].id)

    assert run_json(backend, "clients", "set", "acme", "--flag-uncertain")[0]["flag_uncertain"] is True
    [row] = run_json(backend, "clients", "set", "acme", "--flag-threshold", "0.6")
    # Setting the threshold did not reset flag_uncertain (set_client_policy alone would have).
    assert (row["flag_threshold"], row["flag_uncertain"]) == (0.6, True)
    assert stored_policy(backend, "acme") == (0.6, True)
    assert flagged_ids(backend, "acme") == {at_06}  # "at or above": exactly 0.6 is flagged

    run_json(backend, "clients", "set", "acme", "--flag-threshold", "0.25")
    assert flagged_ids(backend, "acme") == {at_06, at_03}

    [row] = run_json(backend, "clients", "set", "acme", "--no-flag-threshold")
    assert (row["flag_threshold"], row["flag_uncertain"]) == (None, True)
    assert flagged_ids(backend, "acme") == set()


def test_list_shows_every_client_with_its_policy_and_the_flagged_count_verdicts_gives(backend):
    with session_scope(backend.factory) as session:
        add_checked_image(session, client="acme", verdict="uncertain", score=0.6, flag_uncertain=True)
        add_checked_image(session, client="acme", verdict="real", score=0.7)
        add_checked_image(session, client="acme", verdict="real", score=0.1)
        add_checked_image(session, client="beta", verdict="generated", score=0.9)
        # A client known only from a check it submitted (no clients row): the default policy.
        get_or_create_check(session, client="walk-in", external_id="upload-1")

    assert run(backend, "clients", "set", "beta", "--flag-threshold", "0.65").exit_code == 0
    assert run(backend, "clients", "set", "acme", "--flag-threshold", "0.65").exit_code == 0
    rows = listed(backend)

    assert list(rows) == ["acme", "beta", "walk-in"]
    assert {name: (row["flag_threshold"], row["flag_uncertain"]) for name, row in rows.items()} == {
        "acme": (0.65, True),
        "beta": (0.65, False),
        "walk-in": (None, False),
    }
    assert [rows[name]["registered"] for name in rows] == [True, True, False]
    assert {name: row["checks"] for name, row in rows.items()} == {"acme": 3, "beta": 1, "walk-in": 1}
    assert {name: row["flagged"] for name, row in rows.items()} == {"acme": 2, "beta": 1, "walk-in": 0}
    for name, row in rows.items():
        assert row["flagged"] == len(flagged_ids(backend, name))

    table = run(backend, "clients", "list").stdout.splitlines()
    assert table[0].split() == ["CLIENT", "FLAG_THRESHOLD", "FLAG_UNCERTAIN", "CHECKS", "FLAGGED"]
    assert table[1].split() == ["acme", "0.65", "yes", "3", "2"]
    assert table[3].split() == ["walk-in", "-", "no", "1", "0"]


def test_a_policy_change_applies_to_webhooks_for_checks_finished_afterwards(backend):
    def flagged_deliveries_for_a_new_uncertain_check() -> list[WebhookDelivery]:
        # What the pipeline does when a check gets its verdict, in the same transaction.
        with session_scope(backend.factory) as session:
            check, verdict = add_checked_image(
                session, client="acme", verdict="uncertain", score=0.6, callback_url=CALLBACK
            )
            ids = outbox.record_check_events(session, check, verdict)
            return [session.get_one(WebhookDelivery, key) for key in ids]

    assert flagged_deliveries_for_a_new_uncertain_check() == []

    assert run(backend, "clients", "set", "acme", "--flag-uncertain").exit_code == 0
    [delivery] = flagged_deliveries_for_a_new_uncertain_check()
    assert (delivery.event_type, delivery.url, delivery.client) == (EVENT_FLAGGED, CALLBACK, "acme")

    assert run(backend, "clients", "set", "acme", "--no-flag-uncertain").exit_code == 0
    assert flagged_deliveries_for_a_new_uncertain_check() == []


def test_new_client_is_created_with_a_note_when_it_has_no_checks(backend):
    result = run(backend, "clients", "set", "newco")
    assert result.exit_code == 0, result.output
    assert "created client 'newco' (no checks from it yet" in result.stderr
    assert "webhooks follow it" not in result.stderr  # the default policy: nothing changed
    assert stored_policy(backend, "newco") == (None, False)
    longest = "n" * CLIENT_MAX_LEN
    assert run(backend, "clients", "set", longest, "--flag-uncertain").exit_code == 0
    assert stored_policy(backend, longest) == (None, True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["acme", "--flag-threshold", "nan"], "nan is not a score between 0 and 1"),
        (["acme", "--flag-threshold", "inf"], "inf is not a score between 0 and 1"),
        (["acme", "--flag-threshold", "1.01"], "1.01 is not a score between 0 and 1"),
        (["acme", "--flag-threshold", "-0.1"], "-0.1 is not a score between 0 and 1"),
        (["acme", "--flag-threshold", "0.5", "--no-flag-threshold"], "either --flag-threshold or"),
        (["   "], "must not be empty"),
        (["n" * (CLIENT_MAX_LEN + 1)], f"is longer than {CLIENT_MAX_LEN} characters"),
        (["ac\x00me"], "must not contain NUL"),
    ],
)
def test_set_refuses_bad_values_with_one_error_line_and_stores_nothing(sqlite_url, args, message):
    engine = make_engine(sqlite_url)
    backend = Backend(sqlite_url, make_session_factory(engine))
    result = run(backend, "clients", "set", *args, "--flag-uncertain")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert listed(backend) == {}
    engine.dispose()


def test_clients_refuse_an_unmigrated_database_with_one_line(tmp_path):
    (tmp_path / "empty.db").touch()
    result = CliRunner().invoke(main, ["clients", "list", "--db", str(tmp_path / "empty.db")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1
    assert len(lines) == 1 and "run `synthguard db upgrade`" in lines[0]
