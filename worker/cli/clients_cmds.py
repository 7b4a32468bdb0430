"""``synthguard clients ...``: show and set each client's flagging policy (the ``clients`` table).

The policy is read where a check is judged: ``verdicts --flagged`` and the ``flagged_checks`` view apply the
current policy to every stored check, while the webhook sender decides ``check.flagged`` once, when a check
gets its verdict, so a change reaches webhooks for checks finished afterwards only.
"""

from __future__ import annotations

import math
from typing import Any, Final

import click
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.orm import Session

from db.queries import flagged_condition, set_client_policy
from db.session import session_scope
from db.tables import CLIENT_MAX_LEN, Check, Client, Verdict
from worker.cli.pipeline_cmds import cli_settings, db_option, emit, format_option, open_database

__all__ = ["check_client_name", "register"]

CLIENT_COLUMNS: Final = ("client", "flag_threshold", "flag_uncertain", "checks", "flagged")
#: (flag_threshold, flag_uncertain) of a client without a ``clients`` row: only ``generated`` is flagged.
DEFAULT_POLICY: Final[tuple[float | None, bool]] = (None, False)


def check_client_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """The bounds a check_image message puts on ``client`` (worker/requests.py); a click callback for every
    argument or option naming a client to create (a policy, an endpoint, a client secret)."""
    if not value.strip():
        raise click.BadParameter("must not be empty")
    if len(value) > CLIENT_MAX_LEN:
        raise click.BadParameter(f"is longer than {CLIENT_MAX_LEN} characters")
    if "\x00" in value:
        raise click.BadParameter("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv arrive as lone surrogates
        raise click.BadParameter("is not valid UTF-8") from None
    return value


def _threshold(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    # Not click.FloatRange: NaN compares false both ways and would pass it, then flag nothing, silently.
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise click.BadParameter(f"{value} is not a score between 0 and 1")
    return value


def client_rows(session: Session, name: str | None = None) -> list[dict[str, Any]]:
    """One row per client, by name: its policy and how many checks it has, and how many of them are flagged.

    A client is any name in the ``clients`` table or on a check; one without a ``clients`` row has the default
    policy (only ``generated`` is flagged) and ``registered`` false. ``flagged`` counts the checks
    ``verdicts --flagged`` lists, by the same SQL condition.
    """
    # Verdicts are outer-joined here to count every check; list_verdicts inner-joins them, hence the id test.
    flagged = sa.and_(Verdict.id.is_not(None), flagged_condition(Check, Client, Verdict))
    counts = (
        sa.select(
            Check.client,
            sa.func.count(Check.id),
            # count() of a CASE without ELSE: portable to SQLite and PostgreSQL, unlike FILTER on old SQLite.
            sa.func.count(sa.case((flagged, Check.id))),
        )
        .outerjoin(Verdict, Check.verdict_id == Verdict.id)
        .outerjoin(Client, Client.name == Check.client)
        .group_by(Check.client)
    )
    policies = sa.select(Client)
    if name is not None:
        counts = counts.where(Check.client == name)
        policies = policies.where(Client.name == name)
    checks_and_flagged = {client: (total, hits) for client, total, hits in session.execute(counts)}
    stored = {client.name: client for client in session.scalars(policies)}
    rows: list[dict[str, Any]] = []
    for client_name in sorted(checks_and_flagged.keys() | stored.keys()):
        policy = stored.get(client_name)
        total, hits = checks_and_flagged.get(client_name, (0, 0))
        rows.append(
            {
                "client": client_name,
                "flag_threshold": policy.flag_threshold if policy else None,
                "flag_uncertain": bool(policy and policy.flag_uncertain),
                "registered": policy is not None,
                "checks": total,
                "flagged": hits,
            }
        )
    return rows


def _emit_clients(rows: list[dict[str, Any]], output_format: str) -> None:
    if output_format == "json":
        emit(rows, CLIENT_COLUMNS, output_format)
        return
    # The exact threshold (the table would round it to 3 decimals, and "at or above" is exact) and yes/no.
    readable = [
        {
            **row,
            "flag_threshold": None if row["flag_threshold"] is None else repr(row["flag_threshold"]),
            "flag_uncertain": "yes" if row["flag_uncertain"] else "no",
        }
        for row in rows
    ]
    emit(readable, CLIENT_COLUMNS, output_format)


@click.group("clients")
def clients() -> None:
    """Clients (platforms) and their flagging policy: which verdicts are flagged besides `generated`."""


@clients.command("list")
@db_option
@format_option
def list_cmd(database: str | None, output_format: str) -> None:
    """Every client with its policy, its number of checks and of flagged checks (as `verdicts --flagged`)."""
    settings = cli_settings(database)
    factory = open_database(settings, migrate=False)
    with session_scope(factory) as session:
        rows = client_rows(session)
    _emit_clients(rows, output_format)


@clients.command("set")
@click.argument("name", callback=check_client_name)
@click.option(
    "--flag-threshold", type=float, callback=_threshold, metavar="SCORE",
    help="Also flag any check scoring at or above SCORE (0..1), whatever its verdict.",
)  # fmt: skip
@click.option("--no-flag-threshold", is_flag=True, help="Remove the threshold: only verdicts decide.")
@click.option(
    "--flag-uncertain/--no-flag-uncertain", default=None,
    help="Also flag `uncertain` verdicts, or stop doing so.",
)  # fmt: skip
@db_option
@format_option
def set_cmd(  # noqa: PLR0917 - one parameter per click option
    name: str,
    flag_threshold: float | None,
    no_flag_threshold: bool,
    flag_uncertain: bool | None,
    database: str | None,
    output_format: str,
) -> None:
    """Create client NAME or change its policy; options left out keep their value (new: only `generated`)."""
    if flag_threshold is not None and no_flag_threshold:
        raise click.UsageError("give either --flag-threshold or --no-flag-threshold")
    settings = cli_settings(database)
    factory = open_database(settings, migrate=False)
    try:
        with session_scope(factory) as session:
            # Locked on PostgreSQL, so two `set`s changing different options both keep their change.
            current = session.get(Client, name, with_for_update=True)
            # A client without a row is judged by the default policy, so that is what a new one starts from.
            before = DEFAULT_POLICY if current is None else (current.flag_threshold, current.flag_uncertain)
            threshold, uncertain = before
            if flag_threshold is not None or no_flag_threshold:
                threshold = flag_threshold
            if flag_uncertain is not None:
                uncertain = flag_uncertain
            set_client_policy(session, name, flag_threshold=threshold, flag_uncertain=uncertain)
            rows = client_rows(session, name)
    except sqlalchemy.exc.IntegrityError:
        raise click.ClickException(
            f"client {name!r} was created by another command meanwhile; run this one again"
        ) from None
    if current is None:
        note = "" if rows[0]["checks"] else " (no checks from it yet: is the name right?)"
        click.echo(f"created client {name!r}{note}", err=True)
    if (threshold, uncertain) != before:
        click.echo(
            "`verdicts --flagged` and flagged_checks judge every stored check by the new policy at once; "
            "webhooks follow it for checks finished from now on",
            err=True,
        )
    _emit_clients(rows, output_format)


def register(group: click.Group) -> None:
    """Add the ``clients`` command group to the ``synthguard`` CLI."""
    group.add_command(clients)
