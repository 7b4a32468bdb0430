"""``synthguard webhooks ...``: register endpoints, rotate secrets, inspect and replay deliveries, ping.

Secrets are printed exactly when they are created or rotated (and by ``client-secret`` on request); they are
never written to logs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import click
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from db.base import utcnow
from db.migrate import is_up_to_date
from db.session import make_engine, make_session_factory, session_scope
from db.webhook_tables import WebhookDelivery, WebhookEndpoint
from worker import netguard
from worker.cli.clients_cmds import check_client_name
from worker.cli.pipeline_cmds import (
    escape_controls,
    note_if_truncated,
    parse_moment,
    refuse_missing_sqlite_file,
)
from worker.settings import Settings, SettingsError, load_settings
from worker.webhook_delivery import (
    DELIVER_WEBHOOK_TASK,
    DeliveryStep,
    as_utc,
    deliver_now,
    redeliver,
    redeliver_failed_since,
    webhook_task_routes,
)
from worker.webhook_endpoints import (
    EndpointError,
    SecretRotation,
    create_endpoint,
    create_ping_delivery,
    list_endpoints,
    reencrypt_secrets,
    reveal_client_secret,
    rotate_client_secret,
    rotate_endpoint_secret,
    set_endpoint_enabled,
)
from worker.webhooks import EVENT_TYPES, SecretCipher, SecretError

__all__ = ["register"]


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _cipher(settings: Settings) -> SecretCipher:
    try:
        return SecretCipher.from_settings(settings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@contextmanager
def _database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    refuse_missing_sqlite_file(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        if not is_up_to_date(engine):
            raise click.ClickException(
                "the database schema is not up to date; run `synthguard db upgrade` first"
            )
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """``--failed-since``: :func:`parse_moment`."""
    return parse_moment(value, param_hint="--failed-since", now=now)


def _split_events(values: Sequence[str]) -> list[str] | None:
    events = [item.strip() for value in values for item in value.split(",") if item.strip()]
    return events or None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else as_utc(moment).isoformat(timespec="seconds")


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [
        [("" if row.get(col) is None else escape_controls(str(row[col]))) for col in columns] for row in rows
    ]
    widths = [max(len(col), *(len(cell[i]) for cell in cells)) for i, col in enumerate(columns)]
    click.echo("  ".join(col.ljust(widths[i]) for i, col in enumerate(columns)).rstrip())
    for cell in cells:
        click.echo("  ".join(value.ljust(widths[i]) for i, value in enumerate(cell)).rstrip())


def _endpoint_row(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": str(endpoint.id),
        "client": endpoint.client,
        "url": endpoint.url,
        "events": list(endpoint.events or []),
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "failing_since": _iso(endpoint.failing_since),
        "rotation_ends": _iso(endpoint.previous_secret_expires_at),
        "created_at": _iso(endpoint.created_at),
    }


def _delivery_row(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": str(delivery.id),
        "webhook_id": delivery.message_id,
        "event": delivery.event_type,
        "client": delivery.client,
        "endpoint_id": None if delivery.endpoint_id is None else str(delivery.endpoint_id),
        "check_id": None if delivery.check_id is None else str(delivery.check_id),
        "url": delivery.url,
        "status": delivery.status,
        "attempts": delivery.attempt_count,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "next_attempt_at": _iso(delivery.next_attempt_at),
        "created_at": _iso(delivery.created_at),
        "completed_at": _iso(delivery.completed_at),
    }


def _warn_if_refused(url: str, settings: Settings) -> None:
    try:
        netguard.check_url(url, netguard.HostAllowlist.parse(settings.allow_private_hosts))
    except netguard.ForbiddenTargetError as exc:
        if netguard.CLOUD_METADATA_REASON in exc.reason:
            # The allowlist hint would be wrong twice: a range does not open a metadata address (only an exact
            # entry does), and opening one would post events to the service that hands out cloud credentials.
            hint = "a cloud metadata address is never a webhook receiver; register the receiver's own URL"
        else:
            hint = "set SYNTHGUARD_ALLOW_PRIVATE_HOSTS if it is an internal receiver you trust"
        click.echo(
            escape_controls(f"warning: deliveries to this URL are refused right now ({exc.reason}); {hint}"),
            err=True,
        )


def _enqueue(settings: Settings, delivery_ids: Sequence[uuid.UUID]) -> None:
    """Send the delivery tasks; if the broker is unreachable the rows wait for a worker's sweep."""
    if not delivery_ids:
        return
    from celery import Celery  # noqa: PLC0415 - only a command that sends a message imports Celery

    # A bare producer: the full worker app would import and register every task module (pipeline, reconciler)
    # and connect the worker's signal handlers, just to send a message.
    app = Celery("synthguard-cli", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_name,
        task_routes=webhook_task_routes(settings),
    )
    try:
        for delivery_id in delivery_ids:
            app.send_task(DELIVER_WEBHOOK_TASK, kwargs={"delivery_id": str(delivery_id)})
    except Exception as exc:  # noqa: BLE001 - any broker trouble: the database rows are enough
        click.echo(
            f"could not reach the broker ({type(exc).__name__}); a worker's sweep will send them", err=True
        )


def _send_here(factory: sessionmaker[Session], settings: Settings, delivery_id: uuid.UUID) -> DeliveryStep:
    """One attempt from this process (``test`` and ``redeliver --here``); retries are left to the workers."""
    _cipher(settings)  # a missing secret key ends the command with one clear line
    return deliver_now(factory, settings, [delivery_id])[0]


def _parse_id(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a {what} id") from None


@click.group("webhooks")
def webhooks() -> None:
    """Webhook endpoints, secrets and deliveries (Standard Webhooks signatures)."""


@webhooks.command("add")
@click.argument("url")
@click.option(
    "--client", "client_name", required=True, callback=check_client_name,
    help="Client (platform) the endpoint belongs to.",
)  # fmt: skip
@click.option(
    "--events",
    multiple=True,
    help=f"Event types, comma separated or repeated (default: check.flagged,check.reviewed). "
    f"Known: {', '.join(EVENT_TYPES)}.",
)
@click.option("--description", default=None, help="A note for operators.")
def add_cmd(url: str, client_name: str, events: tuple[str, ...], description: str | None) -> None:
    """Register URL for a client; prints the endpoint id and its signing secret (shown only now)."""
    settings = _settings()
    cipher = _cipher(settings)
    with _database(settings) as factory, session_scope(factory) as session:
        try:
            endpoint, secret = create_endpoint(
                session,
                cipher,
                url=url,
                client=client_name,
                events=_split_events(events),
                description=description,
            )
        except EndpointError as exc:
            raise click.ClickException(escape_controls(str(exc))) from None
        endpoint_id, subscribed = endpoint.id, list(endpoint.events)
        twins = [
            (other.id, sorted(set(other.events or []) & set(subscribed)))
            for other in session.scalars(
                sa.select(WebhookEndpoint).where(
                    WebhookEndpoint.client == client_name,
                    WebhookEndpoint.url == endpoint.url,
                    WebhookEndpoint.enabled.is_(True),
                    WebhookEndpoint.id != endpoint_id,
                )
            )
        ]
    for other_id, shared in twins:
        if shared:  # legitimate with disjoint events; with shared ones every such event arrives twice
            message = (
                f"warning: endpoint {other_id} already sends {', '.join(shared)} to this URL for "
                f"{client_name}; each will arrive twice "
                f"(`synthguard webhooks disable {other_id}` if this one replaces it)"
            )
            click.echo(escape_controls(message), err=True)
    _warn_if_refused(url, settings)
    click.echo(f"endpoint: {endpoint_id}")
    click.echo(f"events:   {', '.join(subscribed)}")
    click.echo(f"secret:   {secret}")
    click.echo("Store the secret now: it is not shown again (rotate-secret makes a new one).", err=True)


@webhooks.command("list")
@click.option("--client", "client_name", default=None, help="Only this client's endpoints.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_cmd(client_name: str | None, fmt: str) -> None:
    """List endpoints (secrets are never shown)."""
    settings = _settings()
    with _database(settings) as factory, session_scope(factory) as session:
        rows = [_endpoint_row(endpoint) for endpoint in list_endpoints(session, client_name)]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["events"] = ",".join(row["events"])
        row["state"] = "enabled" if row["enabled"] else f"disabled: {row['disabled_reason']}"
    _print_table(rows, ["id", "client", "url", "events", "state"])


@webhooks.command("disable")
@click.argument("endpoint_id")
@click.option("--reason", default=None, help="Why (shown by `list`).")
def disable_cmd(endpoint_id: str, reason: str | None) -> None:
    """Stop sending to an endpoint (its pending deliveries fail with the reason)."""
    settings = _settings()
    with _database(settings) as factory, session_scope(factory) as session:
        try:
            set_endpoint_enabled(session, endpoint_id, enabled=False, reason=reason)
        except EndpointError as exc:
            raise click.ClickException(escape_controls(str(exc))) from None
    click.echo(f"endpoint {endpoint_id} disabled")


@webhooks.command("enable")
@click.argument("endpoint_id")
def enable_cmd(endpoint_id: str) -> None:
    """Send to an endpoint again (after a 410, an outage, or `disable`)."""
    settings = _settings()
    with _database(settings) as factory, session_scope(factory) as session:
        try:
            set_endpoint_enabled(session, endpoint_id, enabled=True)
        except EndpointError as exc:
            raise click.ClickException(escape_controls(str(exc))) from None
    click.echo(f"endpoint {endpoint_id} enabled")


@webhooks.command("rotate-secret")
@click.argument("endpoint_id")
def rotate_secret_cmd(endpoint_id: str) -> None:
    """Give an endpoint a new secret; the old one keeps signing beside it for the overlap period."""
    settings = _settings()
    cipher = _cipher(settings)
    with _database(settings) as factory, session_scope(factory) as session:
        try:
            _, rotation = rotate_endpoint_secret(
                session, cipher, endpoint_id, overlap_s=settings.webhook_secret_overlap_s
            )
        except EndpointError as exc:
            raise click.ClickException(escape_controls(str(exc))) from None
    click.echo(f"secret:   {rotation.secret}")
    _explain_rotation(rotation)


def _explain_rotation(rotation: SecretRotation) -> None:
    """What the receiver must do now; on stderr, so the secret alone can be captured from stdout."""
    if rotation.undecryptable_dropped:
        click.echo(
            "The old secret could not be decrypted with SYNTHGUARD_SECRET_KEY or its fallbacks and was "
            "dropped: only the new secret signs from now on; give it to the receiver now.",
            err=True,
        )
    elif rotation.previous_signs_until is None:
        click.echo("Only the new secret signs from now on; give it to the receiver now.", err=True)
    else:
        until = _iso(rotation.previous_signs_until)
        click.echo(
            f"Both secrets sign every delivery until {until}; switch the receiver before then.", err=True
        )
    if rotation.overlapping_dropped:
        click.echo(
            "warning: the secret from the previous rotation stopped signing now; "
            "receivers still using it fail verification.",
            err=True,
        )


@webhooks.command("client-secret")
@click.argument("client_name", callback=check_client_name)
@click.option("--rotate", is_flag=True, help="Make a new secret (the old one keeps signing for the overlap).")
def client_secret_cmd(client_name: str, rotate: bool) -> None:
    """Print the secret that signs CLIENT's per-check callback_url deliveries (created on first use)."""
    settings = _settings()
    cipher = _cipher(settings)
    with _database(settings) as factory, session_scope(factory) as session:
        try:
            if rotate:
                rotation = rotate_client_secret(
                    session, cipher, client_name, overlap_s=settings.webhook_secret_overlap_s
                )
                secret = rotation.secret
            else:
                rotation, secret = None, reveal_client_secret(session, cipher, client_name)
        except SecretError as exc:
            raise click.ClickException(escape_controls(str(exc))) from None
    click.echo(secret)
    if rotation is not None:
        _explain_rotation(rotation)


@webhooks.command("rekey")
def rekey_cmd() -> None:
    """Re-encrypt every stored secret under SYNTHGUARD_SECRET_KEY (after a key change; the old key in
    SYNTHGUARD_SECRET_KEY_FALLBACKS). The secrets themselves do not change: receivers need do nothing."""
    settings = _settings()
    cipher = _cipher(settings)
    with _database(settings) as factory, session_scope(factory) as session:
        result = reencrypt_secrets(session, cipher)
    click.echo(
        f"{result.reencrypted} secret(s) re-encrypted under SYNTHGUARD_SECRET_KEY, "
        f"{result.already_current} already were"
        + (
            f", {result.changed_meanwhile} replaced by another command meanwhile (run rekey again)"
            if result.changed_meanwhile
            else ""
        )
    )
    if result.undecryptable:
        names = ", ".join(escape_controls(name) for name in result.undecryptable)
        raise click.ClickException(
            f"{len(result.undecryptable)} secret(s) decrypt under none of the keys and were left as they "
            f"were: {names}. Add the key they were stored under to SYNTHGUARD_SECRET_KEY_FALLBACKS and run "
            "rekey again, or give them new secrets (rotate-secret ID, client-secret CLIENT --rotate)."
        )
    if settings.secret_key_fallbacks:
        click.echo(
            "Every stored secret is under SYNTHGUARD_SECRET_KEY: SYNTHGUARD_SECRET_KEY_FALLBACKS can be "
            "removed once every worker and command runs with this key.",
            err=True,
        )


@webhooks.command("deliveries")
@click.option("--failed", is_flag=True, help="Only deliveries that gave up.")
@click.option("--pending", is_flag=True, help="Only deliveries still waiting to be sent or retried.")
@click.option("--endpoint", "endpoint_id", default=None, help="Only this endpoint's deliveries.")
@click.option("--check", "check_id", default=None, help="Only this check's deliveries.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def deliveries_cmd(
    *, failed: bool, pending: bool, endpoint_id: str | None, check_id: str | None, limit: int, fmt: str
) -> None:
    """List deliveries, newest first."""
    settings = _settings()
    query = (
        sa.select(WebhookDelivery)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
        .limit(limit + 1)
    )
    statuses = [status for status, wanted in (("failed", failed), ("pending", pending)) if wanted]
    if statuses:
        query = query.where(WebhookDelivery.status.in_(statuses))
    if endpoint_id is not None:
        query = query.where(WebhookDelivery.endpoint_id == _parse_id(endpoint_id, "endpoint"))
    if check_id is not None:
        query = query.where(WebhookDelivery.check_id == _parse_id(check_id, "check"))
    with _database(settings) as factory, session_scope(factory) as session:
        found = session.scalars(query).all()
        rows = [_delivery_row(delivery) for delivery in found[:limit]]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        note_if_truncated(len(found), limit)
        return
    for row in rows:
        row["last"] = row["last_status_code"] or ""
        if row["last_error"]:
            row["last"] = f"{row['last']} {row['last_error']}".strip()[:80]
    _print_table(rows, ["id", "event", "status", "attempts", "created_at", "url", "last"])
    note_if_truncated(len(found), limit)


@webhooks.command("show")
@click.argument("delivery_id")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def show_cmd(delivery_id: str, fmt: str) -> None:
    """One delivery: every attempt (time, status, latency, error, response excerpt) and the payload."""
    settings = _settings()
    with _database(settings) as factory, session_scope(factory) as session:
        delivery = session.get(WebhookDelivery, _parse_id(delivery_id, "delivery"))
        if delivery is None:
            raise click.ClickException(f"no delivery {delivery_id}")
        row = _delivery_row(delivery)
        attempts: list[dict[str, Any]] = [
            {
                "n": attempt.attempt_number,
                "at": _iso(attempt.attempted_at),
                "outcome": attempt.outcome,
                "status": attempt.status_code,
                "latency_ms": attempt.latency_ms,
                "error": attempt.error,
                "response": attempt.response_excerpt or "",
            }
            for attempt in delivery.attempts
        ]
        payload = delivery.payload
    if fmt == "json":
        click.echo(json.dumps({**row, "attempts": attempts, "payload": json.loads(payload)}, indent=2))
        return
    for attempt in attempts:
        attempt["response"] = str(attempt["response"])[:60].replace("\n", " ")
    width = max(len(key) for key in row)
    for key, value in row.items():
        click.echo(f"{key.ljust(width)}  {'' if value is None else escape_controls(str(value))}")
    click.echo("\nattempts:")
    _print_table(attempts, ["n", "at", "outcome", "status", "latency_ms", "error", "response"])
    click.echo("\npayload:")
    click.echo(json.dumps(json.loads(payload), indent=2))


@webhooks.command("redeliver")
@click.argument("delivery_id", required=False)
@click.option(
    "--failed-since", default=None, help="Every failed delivery created since T (2h, 7d, or ISO time)."
)
@click.option("--endpoint", "endpoint_id", default=None, help="With --failed-since: only this endpoint.")
@click.option("--here", is_flag=True, help="Make the first attempt from this process instead of a worker.")
def redeliver_cmd(
    delivery_id: str | None, failed_since: str | None, endpoint_id: str | None, here: bool
) -> None:
    """Send a delivery again (same webhook-id and body, fresh retry schedule)."""
    if (delivery_id is None) == (failed_since is None):
        raise click.UsageError("give either a DELIVERY_ID or --failed-since T")
    settings = _settings()
    now = utcnow()
    with _database(settings) as factory:
        with session_scope(factory) as session:
            try:
                if delivery_id is not None:
                    ids = [redeliver(session, _parse_id(delivery_id, "delivery"), now=now).id]
                else:
                    since = parse_since(failed_since or "", now=now)
                    endpoint = None if endpoint_id is None else _parse_id(endpoint_id, "endpoint")
                    ids = redeliver_failed_since(session, since, now=now, endpoint_id=endpoint)
            except (LookupError, ValueError) as exc:
                raise click.ClickException(escape_controls(str(exc))) from None
        if here:
            for key in ids:
                step = _send_here(factory, settings, key)
                click.echo(escape_controls(f"{key}  {step.status}  {step.detail or ''}".rstrip()))
            return
    _enqueue(settings, ids)
    click.echo(f"{len(ids)} deliver{'y' if len(ids) == 1 else 'ies'} queued again")
    for key in ids:
        click.echo(str(key))


@webhooks.command("test")
@click.argument("endpoint_id")
def test_cmd(endpoint_id: str) -> None:
    """Send a signed `ping` event to an endpoint now and print what the receiver answered."""
    settings = _settings()
    with _database(settings) as factory:
        with session_scope(factory) as session:
            try:
                delivery_id = create_ping_delivery(session, endpoint_id).id
            except EndpointError as exc:
                raise click.ClickException(escape_controls(str(exc))) from None
        step = _send_here(factory, settings, delivery_id)
        with session_scope(factory) as session:
            delivery = session.get_one(WebhookDelivery, delivery_id)
            attempt = delivery.attempts[-1] if delivery.attempts else None
            summary = (
                "no attempt made"
                if attempt is None
                else f"HTTP {attempt.status_code} in {attempt.latency_ms} ms"
                if attempt.status_code is not None
                else f"no response after {attempt.latency_ms} ms"
            )
    detail = f": {step.detail}" if step.detail else ""
    click.echo(escape_controls(f"ping {delivery_id}: {step.status} ({summary}){detail}"))
    if step.status != "succeeded":
        raise SystemExit(1)


def register(group: click.Group) -> None:
    """Add the ``webhooks`` command group to the ``synthguard`` CLI."""
    group.add_command(webhooks)
