"""Pipeline commands: scan, demo, worker, enqueue, db upgrade; review listings: verdicts, checks, show."""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import re
import subprocess
import sys
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import click
import kombu.exceptions
import numpy as np
import redis.exceptions
import sqlalchemy as sa
import sqlalchemy.exc
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from db.base import utcnow
from db.migrate import is_up_to_date, upgrade_to_head
from db.queries import get_check, get_or_create_check, list_checks, list_verdicts
from db.session import make_engine, make_session_factory, session_scope
from db.tables import CHECK_STATUSES, EXTERNAL_ID_MAX_LEN, VERDICTS, Check
from worker import pipeline
from worker.requests import check_callback_url
from worker.settings import Settings, SettingsError, load_settings

IMAGE_SUFFIXES: Final = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".mpo",
        ".png",
        ".apng",
        ".webp",
        ".gif",
        ".tif",
        ".tiff",
        ".bmp",
        ".heic",
        ".heif",
        ".avif",
    }
)
#: How many names of the files a directory scan leaves out are printed (the count is always printed).
SKIPPED_NAMES_SHOWN: Final = 5
FORMATS: Final = ("table", "json")
CELL_MAX_CHARS: Final = 70
T = TypeVar("T")

format_option = click.option(
    "--format", "output_format", type=click.Choice(FORMATS), default="table", show_default=True,
    help="Output as a table or as JSON.",
)  # fmt: skip
db_option = click.option(
    "--db", "database", metavar="URL_OR_PATH",
    help="Database URL, or a path to a SQLite file (default: SYNTHGUARD_DATABASE_URL or ./synthguard.db).",
)  # fmt: skip


# --- settings and database ------------------------------------------------------------------------------


def cli_settings(database: str | None = None, **overrides: Any) -> Settings:
    """Settings from the environment plus command-line overrides; invalid settings stop with one line."""
    if database:
        overrides["database_url"] = database if "://" in database else f"sqlite:///{Path(database).resolve()}"
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _safe_url(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _db_reason(exc: sqlalchemy.exc.DatabaseError) -> str:
    """The driver's first line of an error ("file is not a database"), without SQLAlchemy's SQL dump."""
    text = str(exc.orig).strip() if exc.orig else str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def refuse_missing_sqlite_file(database_url: str) -> None:
    """Stop a command that expects a database when the SQLite file it names does not exist.

    Opening it would create an empty file, and the next message would ask for a migration of the wrong
    database: a path that does not exist is a typo or a missing ``--db``.
    """
    url = sa.engine.make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    name = url.database
    if str(url.query.get("uri", "")).lower() in ("true", "1"):  # sqlite:///file:/path?mode=ro&uri=true
        if not name.startswith("file:"):
            return
        name = name.removeprefix("file:")
    if not Path(name).exists():
        raise click.ClickException(
            f"no database at {name} (set SYNTHGUARD_DATABASE_URL, or --db where a command takes it; "
            "`synthguard db upgrade` or `synthguard scan` creates one)"
        )


def open_database(settings: Settings, *, migrate: bool) -> sessionmaker[Session]:
    """A session factory for the configured database, migrated to head if ``migrate`` (else checked)."""
    if not migrate:
        refuse_missing_sqlite_file(settings.database_url)
    engine = make_engine(settings.database_url)
    context = click.get_current_context(silent=True)
    if context is not None:
        context.call_on_close(engine.dispose)  # also when a command runs in-process (tests)
    try:
        if not is_up_to_date(engine):
            if not migrate:
                raise click.ClickException(
                    f"the database {_safe_url(settings.database_url)} is not at the current schema; "
                    "run `synthguard db upgrade`"
                )
            upgrade_to_head(settings.database_url)
    except sqlalchemy.exc.DatabaseError as exc:  # OperationalError, or a file that is not SQLite
        raise click.ClickException(
            f"cannot open the database {_safe_url(settings.database_url)}: {_db_reason(exc)}"
        ) from None
    return make_session_factory(engine)


# --- output ---------------------------------------------------------------------------------------------


#: Unicode categories printed as escapes: controls (C0, DEL, C1: terminal escape sequences), format characters
#: (bidi overrides reorder what is read) and surrogates (undecodable argv bytes; they cannot be encoded).
_ESCAPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs"})


def escape_controls(text: str) -> str:
    """``text`` with every control, format or surrogate character written as an escape (ESC as ``\\x1b``).

    Every table and text line goes through it: external ids, client names, errors and receivers' response
    excerpts come from tenants and receivers, and printed raw an escape sequence would retitle the window,
    clear the screen, fake a line, or write the clipboard (OSC 52). JSON output needs none of this: json.dumps
    escapes them.
    """
    if text.isprintable():  # the usual case: isprintable() is False for every escaped character
        return text
    return "".join(
        _escaped(char) if unicodedata.category(char) in _ESCAPED_CATEGORIES else char for char in text
    )


_SHORT_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    code = ord(char)
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    text = escape_controls(" ".join(str(value).split()))
    return text if len(text) <= CELL_MAX_CHARS else text[: CELL_MAX_CHARS - 1] + "…"


def note_if_truncated(found: int, limit: int) -> None:
    """Say on stderr that a listing stopped at ``--limit`` (callers fetch one row more than they show)."""
    if found > limit:
        click.echo(f"showing the newest {limit}; more match: narrow the filters or raise --limit", err=True)


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], output_format: str) -> None:
    """Print rows as an aligned table (only ``columns``) or as a JSON array (every key)."""
    if output_format == "json":
        click.echo(json.dumps(list(rows), indent=2, default=_json_default))
        return
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    header = "  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True))
    click.echo(header.rstrip())
    for line in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands timestamps back without a zone; every stored timestamp is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_row(check: Check) -> dict[str, Any]:
    """One check as a flat dict (the JSON form of the listings)."""
    verdict = check.verdict
    return {
        "check_id": str(check.id),
        "external_id": check.external_id,
        "client": check.client,
        "status": check.status,
        "attempts": check.attempts,
        "sha256": check.sha256,
        "verdict": check.effective_verdict,
        "model_verdict": verdict.verdict if verdict else None,
        "score": verdict.score if verdict else None,
        "decided_by": verdict.decided_by if verdict else None,
        "model": verdict.model_id if verdict else None,
        "error": check.error,
        "source_url": check.source_url,
        "created_at": _as_utc(check.created_at),
        "finished_at": _as_utc(check.finished_at),
    }


# --- inputs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanInput:
    """One thing to check: a local file or an http(s) URL, with an optional label for the output."""

    name: str
    path: Path | None = None
    url: str | None = None
    label: str | None = None


def expand_inputs(arguments: Iterable[str]) -> list[ScanInput]:
    """Files, directories (recursively, image suffixes only), URLs and @list.txt files (one entry a line)."""
    inputs: list[ScanInput] = []
    for argument in arguments:
        if argument.lower().startswith(("http://", "https://")):
            inputs.append(ScanInput(name=argument, url=argument))
        elif argument.startswith("@"):
            inputs += expand_inputs(_read_list(Path(argument[1:])))
        else:
            path = Path(argument)
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file())
                images = [file for file in files if file.suffix.lower() in IMAGE_SUFFIXES]
                inputs += [ScanInput(name=str(file), path=file) for file in images]
                _report_skipped(path, [file for file in files if file.suffix.lower() not in IMAGE_SUFFIXES])
            elif path.is_file():
                inputs.append(ScanInput(name=str(path), path=path))
            else:
                raise click.BadParameter(f"no such file, directory or URL: {argument}")
    return inputs


def _read_list(list_path: Path) -> list[str]:
    """The entries of an @list file: one path or URL a line; blank lines and # comments are left out."""
    if not list_path.is_file():
        raise click.BadParameter(f"list file not found: {list_path}")
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise click.BadParameter(
            f"list file {list_path} is not a UTF-8 text list (one path or URL a line)"
        ) from None
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _report_skipped(directory: Path, skipped: Sequence[Path]) -> None:
    """Say on stderr which files of a directory were not collected, so none is left out unannounced."""
    if not skipped:
        return
    names = [str(file.relative_to(directory)) for file in skipped[:SKIPPED_NAMES_SHOWN]]
    more = f" and {len(skipped) - len(names)} more" if len(skipped) > len(names) else ""
    message = (
        f"{directory}: skipped {len(skipped)} file(s) without an image suffix ({', '.join(names)}{more}); "
        "name a file to check it anyway"
    )
    click.echo(escape_controls(message), err=True)  # file names in an upload folder are anyone's


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def bounded_external_id(kind: str, value: str) -> str:
    """``kind:value`` if it fits the column, else ``kind-sha256:`` plus the sha256 hex of ``kind:value``.

    Cutting a long id would map two URLs (or paths) that differ only early, in the host say, to one check;
    the hash keeps them apart, and short ids keep the form already stored.
    """
    natural = f"{kind}:{value}"
    if len(natural) <= EXTERNAL_ID_MAX_LEN:
        return natural
    return f"{kind}-sha256:{hashlib.sha256(natural.encode()).hexdigest()}"


def create_check_for(
    session: Session,
    item: ScanInput,
    settings: Settings,
    *,
    client: str,
    callback_url: str | None = None,
    retry_failed: bool = False,
) -> tuple[Check, bool]:
    """The check for one input (created queued, or the existing one); files are read inline.

    A file's external id is its absolute path plus the start of its sha256, so an unchanged file maps to the
    same check (and a rescan shows the stored result) while an edited file gets a new one. Ids too long to
    store are replaced by a hash of the whole id (see ``bounded_external_id``).
    """
    data: bytes | None = None
    too_large: str | None = None
    if item.path is not None:
        size = item.path.stat().st_size
        if size > settings.max_inline_bytes:
            limit = settings.max_inline_bytes
            too_large = f"file too large: {size} bytes > limit {limit} (SYNTHGUARD_MAX_INLINE_BYTES)"
            digest = "toolarge"
        else:
            data = item.path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()[:16]
        external_id = bounded_external_id("file", f"{item.path.resolve()}@{digest}")
    else:
        external_id = bounded_external_id("url", str(item.url))
    check, created = get_or_create_check(
        session,
        client=client,
        external_id=external_id,
        source_url=item.url,
        image_data=data,
        callback_url=callback_url,
    )
    if not created and retry_failed and check.status == "failed" and too_large is None:
        # An interactive rescan gives a failed check (network down, say) a fresh start.
        check.status, check.attempts, check.error, check.finished_at = "queued", 0, None, None
        if data is not None:
            check.image_data = data
    if created and too_large is not None:
        pipeline.fail_checks(session, [check.id], too_large, settings)
    return check, created


# --- scan -----------------------------------------------------------------------------------------------


def scan_inputs(
    factory: sessionmaker[Session],
    detector: pipeline.DetectorLike,
    inputs: Sequence[ScanInput],
    settings: Settings,
    *,
    client: str = "scan",
) -> list[dict[str, Any]]:
    """Run the pipeline in this process over ``inputs`` (same code as the worker); one row per input."""
    check_ids: list[uuid.UUID] = []
    progress = tqdm(total=len(inputs), unit="image", file=sys.stderr, desc="scanning", disable=None)
    with progress:
        for batch in _chunks(inputs, settings.batch_size):
            with session_scope(factory) as session:
                batch_ids = [
                    create_check_for(session, item, settings, client=client, retry_failed=True)[0].id
                    for item in batch
                ]
            check_ids += batch_ids
            with session_scope(factory) as session:
                claimed = pipeline.claim(session, batch_ids, settings)
            delivery_ids = list(claimed.delivery_ids)
            try:
                with session_scope(factory) as session:
                    delivery_ids += pipeline.run(session, detector, claimed.check_ids, settings).delivery_ids
            except sqlalchemy.exc.SQLAlchemyError:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken batch must not end the scan unrecorded
                with session_scope(factory) as session:
                    delivery_ids += pipeline.fail_checks(
                        session, claimed.check_ids, f"internal error: {type(exc).__name__}: {exc}", settings
                    )
            deliver_inline(factory, settings, delivery_ids)
            progress.update(len(batch))
    rows: list[dict[str, Any]] = []
    with session_scope(factory) as session:
        for item, check_id in zip(inputs, check_ids, strict=True):
            check = session.get(Check, check_id)
            if check is None:  # pragma: no cover - created above in a committed transaction
                continue
            rows.append({"input": item.name, "label": item.label, **check_row(check)})
    return rows


def deliver_inline(
    factory: sessionmaker[Session], settings: Settings, delivery_ids: Sequence[uuid.UUID]
) -> None:
    """Send webhook deliveries from this process (no broker); retries stay pending for a worker's sweep."""
    if not delivery_ids:
        return
    from worker.webhook_delivery import deliver_now  # noqa: PLC0415 - only when there is something to send

    try:
        deliver_now(factory, settings, delivery_ids)
    except SettingsError as exc:
        click.echo(f"warning: {len(delivery_ids)} webhook deliveries left pending: {exc}", err=True)


SCAN_COLUMNS: Final = ("input", "status", "verdict", "score", "decided_by", "check_id")


def with_error_column(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> tuple[str, ...]:
    """The columns, plus "error" when some row failed (an empty column only widens the table)."""
    return (*columns, "error") if any(row.get("error") for row in rows) else tuple(columns)


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="PATH_OR_URL...")
@db_option
@click.option("--client", default="scan", show_default=True, help="Client name stored with the checks.")
@format_option
def scan(inputs: tuple[str, ...], database: str | None, client: str, output_format: str) -> None:
    """Check images now, in this process: files, directories, http(s) URLs or @list.txt files.

    Runs the same pipeline as the worker against SQLite by default (./synthguard.db, created and migrated on
    first use) and prints the verdicts. Images already checked by this model version are not analysed again.
    """
    settings = cli_settings(database)
    items = expand_inputs(inputs)
    factory = open_database(settings, migrate=True)
    detector = _load_detector(settings)
    rows = scan_inputs(factory, detector, items, settings, client=client)
    emit(rows, with_error_column(rows, SCAN_COLUMNS), output_format)


def _load_detector(settings: Settings) -> pipeline.DetectorLike:
    from worker.app import load_detector  # noqa: PLC0415 - imports Celery; listings should not pay for it

    click.echo(f"loading detector {settings.model_name} ...", err=True)
    try:
        return load_detector(settings)
    except Exception as exc:  # noqa: BLE001 - weights missing or tampered: one line, no traceback
        raise click.ClickException(f"cannot load detector {settings.model_name}: {exc}") from None


# --- demo -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoImage:
    file_name: str
    label: str
    make: Callable[[], bytes]


def _skimage_file(name: str) -> bytes:
    return (importlib.resources.files("skimage.data") / name).read_bytes()


def _decoder_like(name: str, factor: int = 8) -> bytes:
    """A photo box-downsampled by ``factor`` then nearest-neighbour upsampled by ``factor``, as PNG.

    The upsampling leaves the ``factor``-pixel block grid that latent-diffusion decoders (8x upsampling)
    leave. It is NOT the output of a generative model: a synthetic stand-in for that one trace.
    """
    photo = Image.open(io.BytesIO(_skimage_file(name))).convert("RGB")
    width, height = (photo.width // factor) * factor, (photo.height // factor) * factor
    small = photo.crop((0, 0, width, height)).reduce(factor)
    upsampled = small.resize((width, height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    upsampled.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_copy(name: str, quality: int) -> bytes:
    photo = Image.open(io.BytesIO(_skimage_file(name))).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _noise_png(seed: int = 0, size: int = 256) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


DEMO_IMAGES: Final = (
    DemoImage("astronaut.png", "camera photo: NASA portrait of Eileen Collins (public domain)",
              lambda: _skimage_file("astronaut.png")),
    DemoImage("coffee.png", "camera photo: coffee cup by Rachel Michetti (CC0)",
              lambda: _skimage_file("coffee.png")),
    DemoImage("chelsea.png", "camera photo: Chelsea the cat by Stefan van der Walt (CC0)",
              lambda: _skimage_file("chelsea.png")),
    DemoImage("rocket.jpg", "camera photo, JPEG: SpaceX Falcon 9 launch (public domain)",
              lambda: _skimage_file("rocket.jpg")),
    DemoImage("chelsea-q75.jpg", "made here: chelsea.png re-encoded as JPEG quality 75",
              lambda: _jpeg_copy("chelsea.png", 75)),
    DemoImage("coffee-8x-nearest.png",
              "made here: coffee.png 8x down, 8x nearest up (decoder-like grid)",
              lambda: _decoder_like("coffee.png")),
    DemoImage("noise.png", "made here: random noise (not a photo, not a generator's output)", _noise_png),
)  # fmt: skip


def write_demo_images(directory: Path) -> list[ScanInput]:
    """Write the bundled demo images into ``directory``; return them as labelled scan inputs."""
    directory.mkdir(parents=True, exist_ok=True)
    inputs = []
    for image in DEMO_IMAGES:
        path = directory / image.file_name
        path.write_bytes(image.make())
        inputs.append(ScanInput(name=image.file_name, path=path, label=image.label))
    return inputs


@click.command()
@click.argument("paths", nargs=-1, metavar="[PATH_OR_URL...]")
@db_option
@click.option(
    "--images-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("synthguard-demo"),
    show_default=True, help="Where the example images are written.",
)  # fmt: skip
@format_option
def demo(paths: tuple[str, ...], database: str | None, images_dir: Path, output_format: str) -> None:
    """Scan a few example images (public-domain photos and images made here), plus any PATH_OR_URL given.

    The examples show what the output looks like; a handful of images measures nothing about accuracy
    (see models/MODEL_CARD.md for the detector's measured performance).
    """
    settings = cli_settings(database)
    inputs = write_demo_images(images_dir) + expand_inputs(paths)
    factory = open_database(settings, migrate=True)
    detector = _load_detector(settings)
    rows = scan_inputs(factory, detector, inputs, settings, client="demo")
    for row in rows:
        row["what it is"] = row.pop("label") or "your input"
    columns = ("input", "what it is", "verdict", "score", "check_id")
    emit(rows, with_error_column(rows, columns), output_format)
    if output_format == "table":
        db_args = f" --db {database}" if database else ""
        click.echo(
            f"\nImages written to {images_dir}/; verdicts stored in {_safe_url(settings.database_url)} "
            f"(try `synthguard verdicts{db_args}` or `synthguard show CHECK_ID{db_args}`)."
        )


# --- worker and enqueue ---------------------------------------------------------------------------------


def refuse_a_key_that_does_not_decrypt(factory: sessionmaker[Session], settings: Settings) -> None:
    """Stop the worker start when no configured key decrypts the stored webhook secrets.

    A worker with another key (or the right one plus a secret file's newline) would start "ready" and fail
    every delivery it takes for good. Secrets under a fallback key start the worker with a reminder.
    """
    from worker.app import REKEY_REMINDER, UNDECRYPTING_KEY_MESSAGE  # noqa: PLC0415 - Celery
    from worker.webhook_endpoints import stored_secrets_key  # noqa: PLC0415 - httpx and cryptography
    from worker.webhooks import SecretCipher  # noqa: PLC0415

    with session_scope(factory) as session:
        state = stored_secrets_key(session, SecretCipher.from_settings(settings))
    if state == "undecryptable":
        raise click.ClickException(UNDECRYPTING_KEY_MESSAGE)
    if state == "fallback":
        click.echo(f"warning: {REKEY_REMINDER}", err=True)


@click.command()
@click.option("--concurrency", type=int, help="Worker processes (default: SYNTHGUARD_WORKER_CONCURRENCY).")
@click.option(
    "--loglevel", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"])
)
@click.option(
    "--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "solo", "threads"])
)
def worker(concurrency: int | None, loglevel: str, pool: str) -> None:
    """Run a Celery worker that takes synthguard tasks from SYNTHGUARD_BROKER_URL."""
    overrides: dict[str, Any] = {"worker_concurrency": concurrency} if concurrency else {}
    settings = cli_settings(None, **overrides)
    try:
        # The worker signs webhooks with secrets encrypted under this key.
        settings.require_secret_key()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    factory = open_database(settings, migrate=False)
    refuse_a_key_that_does_not_decrypt(factory, settings)
    # Closed now, not when the command returns: the worker runs for weeks, and its pool children would inherit
    # the idle connection's socket (each child opens its own; WorkerRuntime disposes the pool after fork).
    engine = factory.kw["bind"]
    engine.dispose()
    from worker.app import create_celery_app, runtime_for, verify_detector  # noqa: PLC0415

    # Load the weights once before forking (in a subprocess, so this process never runs torch): a missing or
    # tampered weights file stops the start here with one line instead of failing in every child.
    click.echo(f"checking detector {settings.model_name} ...", err=True)
    try:
        model_id = verify_detector(settings)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise click.ClickException(f"cannot load detector {settings.model_name}: {exc}") from None
    click.echo(f"detector {model_id} loads; starting the worker", err=True)

    app = create_celery_app(settings)
    runtime_for(app).secret_key_checked = True  # above, with a clearer stop than the worker's own check
    queues = ",".join(settings.worker_queues)
    argv = ["worker", f"--loglevel={loglevel}", f"--pool={pool}", f"--queues={queues}"]
    argv.append(f"--concurrency={settings.worker_concurrency}")
    app.worker_main(argv)


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="FILE|DIR|URL|@list.txt...")
@click.option("--client", default="cli", show_default=True, help="Client the checks belong to.")
@click.option("--callback-url", help="URL that receives the check.flagged webhook for these checks.")
@db_option
@format_option
def enqueue(
    inputs: tuple[str, ...], client: str, callback_url: str | None, database: str | None, output_format: str
) -> None:
    """Queue images for the workers; prints one check id per input (finished checks are not re-queued)."""
    settings = cli_settings(database)
    if callback_url is not None:
        # The same rule as a check_image message's: a URL no delivery can reach would lose every notice.
        try:
            check_callback_url(callback_url, settings)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--callback-url") from None
    items = expand_inputs(inputs)
    factory = open_database(settings, migrate=False)
    rows: list[dict[str, Any]] = []
    to_queue: list[uuid.UUID] = []
    with session_scope(factory) as session:
        for item in tqdm(items, unit="image", file=sys.stderr, desc="recording", disable=None):
            check, created = create_check_for(
                session, item, settings, client=client, callback_url=callback_url
            )
            if check.status == "queued":
                to_queue.append(check.id)
            state = "queued" if created and check.status == "queued" else check.status
            rows.append({"input": item.name, "check_id": str(check.id), "status": state, "new": created})
    from worker.app import create_celery_app  # noqa: PLC0415 - Celery only where a message is sent
    from worker.tasks import enqueue_checks  # noqa: PLC0415

    try:
        with create_celery_app(settings) as app:
            enqueue_checks(app, to_queue, settings.batch_size)
    except (kombu.exceptions.OperationalError, redis.exceptions.RedisError, OSError) as exc:
        raise click.ClickException(
            f"checks recorded but not queued: broker {_safe_url(settings.broker_url)} unreachable ({exc}); "
            "they are picked up once a worker's reconciler runs, or rerun this command"
        ) from None
    emit(rows, ("input", "check_id", "status"), output_format)


# --- db -------------------------------------------------------------------------------------------------


@click.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@db_option
def db_upgrade(database: str | None) -> None:
    """Create or migrate the database schema to the current version."""
    settings = cli_settings(database)
    try:
        upgrade_to_head(settings.database_url)
    except sqlalchemy.exc.DatabaseError as exc:  # OperationalError, or a file that is not SQLite
        raise click.ClickException(
            f"cannot migrate {_safe_url(settings.database_url)}: {_db_reason(exc)}"
        ) from None
    click.echo(f"{_safe_url(settings.database_url)} is at the current schema")


# --- review listings ------------------------------------------------------------------------------------

_RELATIVE_AGE: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_moment(value: str, *, param_hint: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when no zone is given) or an age before ``now``: ``30m``, ``1.5h``, ``7d``.

    The one parser of every ``--since``-like option, so each refuses an age past year 1 with a sentence.
    """
    text = value.strip()
    match = _RELATIVE_AGE.match(text.lower())
    if match:
        amount, unit = match.group(1), _UNITS[match.group(2)]
        try:
            return (now or utcnow()) - timedelta(**{unit: float(amount)})
        except OverflowError:
            raise click.BadParameter(
                f"an age of {amount} {unit} reaches before year 1; use a smaller age", param_hint=param_hint
            ) from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither an age like 30m, 24h, 7d nor an ISO 8601 time", param_hint=param_hint
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_since(value: str | None) -> datetime | None:
    """``--since``: None when not given, else :func:`parse_moment`."""
    return None if value is None else parse_moment(value, param_hint="--since")


VERDICT_COLUMNS: Final = ("check_id", "client", "external_id", "verdict", "score", "model", "created_at")


@click.command()
@click.option("--flagged", is_flag=True, help="Only flagged checks (the rule of the flagged_checks view).")
@click.option("--since", help="Only checks created since (ISO time, or an age like 24h, 7d).")
@click.option("--client", help="Only this client's checks.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@db_option
@format_option
def verdicts(  # noqa: PLR0917 - one parameter per click option
    flagged: bool, since: str | None, client: str | None, limit: int, database: str | None, output_format: str
) -> None:
    """List stored verdicts of done checks, newest first."""
    settings = cli_settings(database)
    factory = open_database(settings, migrate=False)
    with session_scope(factory) as session:
        found = list_verdicts(
            session, flagged=flagged, client=client, since=parse_since(since), limit=limit + 1
        )
        rows = [check_row(check) for check in found[:limit]]
    emit(rows, VERDICT_COLUMNS, output_format)
    note_if_truncated(len(found), limit)


CHECK_COLUMNS: Final = ("check_id", "client", "external_id", "status", "attempts", "verdict", "error")


@click.command()
@click.option("--status", type=click.Choice(CHECK_STATUSES), help="Only checks in this status.")
@click.option("--client", help="Only this client's checks.")
@click.option("--since", help="Only checks created since (ISO time, or an age like 24h, 7d).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@db_option
@format_option
def checks(  # noqa: PLR0917 - one parameter per click option
    status: str | None,
    client: str | None,
    since: str | None,
    limit: int,
    database: str | None,
    output_format: str,
) -> None:
    """List checks of every status (with the failure reason of failed ones), newest first."""
    settings = cli_settings(database)
    factory = open_database(settings, migrate=False)
    with session_scope(factory) as session:
        found = list_checks(session, status=status, client=client, since=parse_since(since), limit=limit + 1)
        rows = [check_row(check) for check in found[:limit]]
    emit(rows, CHECK_COLUMNS, output_format)
    note_if_truncated(len(found), limit)


def _describe_value(value: Any) -> str:
    if isinstance(value, dict) and "value" in value and "camera_range" in value:
        # A number with the range typical of camera photos: "0.92  (camera 0.76..1.00, within): meaning"
        low, high = (value["camera_range"] or [None, None])[:2]
        camera = f"camera {_describe_value(low)}..{_describe_value(high)}" if low is not None else "camera ?"
        verdict = f", {value['vs_camera']}" if value.get("vs_camera") else ""
        meaning = f": {value['meaning']}" if value.get("meaning") else ""
        return f"{_describe_value(value['value'])}  ({camera}{verdict}){meaning}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return str(value)


def check_details(check: Check) -> dict[str, Any]:
    """Everything about one check: the listing fields plus family scores, reasons, evidence and reviews."""
    details = check_row(check)
    verdict = check.verdict
    details.update(
        phash=check.phash,
        phash_quality=check.phash_quality,
        has_inline_image=check.has_inline_image,
        callback_url=check.callback_url,
        metadata=check.metadata_,
        started_at=_as_utc(check.started_at),
        updated_at=_as_utc(check.updated_at),
        reviewed_verdict=check.reviewed_verdict,
        threshold=verdict.threshold if verdict else None,
        family_scores=verdict.family_scores if verdict else None,
        reasons=verdict.reasons if verdict else [],
        evidence={row.group_name: row.data for row in verdict.evidence} if verdict else {},
        reviews=[
            {
                "reviewer": review.reviewer,
                "previous_verdict": review.previous_verdict,
                "new_verdict": review.new_verdict,
                "note": review.note,
                "created_at": _as_utc(review.created_at),
            }
            for review in check.reviews
        ],
    )
    return details


def _print_details(details: dict[str, Any]) -> None:
    def echo(line: str) -> None:
        click.echo(escape_controls(line))

    echo(f"check        {details['check_id']}")
    echo(f"client       {details['client']}   external id {details['external_id']}")
    source = details["source_url"] or ("inline image" if details["has_inline_image"] else "-")
    echo(f"source       {source}")
    echo(f"status       {details['status']} (attempts {details['attempts']})")
    if details["error"]:
        echo(f"error        {details['error']}")
    echo(f"created      {_cell(details['created_at'])}   finished {_cell(details['finished_at'])}")
    echo(f"sha256       {details['sha256'] or '-'}")
    echo(f"pdq hash     {details['phash'] or '-'} (quality {_cell(details['phash_quality'])})")
    if details["model"] is None:
        return
    echo(
        f"verdict      {details['verdict']}   score {details['score']:.3f}"
        f"   threshold {details['threshold']:.3f}   decided by {details['decided_by']}"
    )
    if details["reviewed_verdict"]:
        echo(
            f"             (model said {details['model_verdict']}; "
            f"a reviewer set {details['reviewed_verdict']})"
        )
    echo(f"model        {details['model']}")
    family = ", ".join(
        f"{name} {score:.3f}" for name, score in sorted((details["family_scores"] or {}).items())
    )
    echo(f"families     {family or '-'}")
    for reason in details["reasons"]:
        echo(f"reason       {reason}")
    echo("evidence")
    for group, data in sorted(details["evidence"].items()):
        echo(f"  {group}")
        if not isinstance(data, dict) or not data:
            echo(f"    {_describe_value(data)}")
            continue
        width = max(len(str(key)) for key in data)
        for key, value in data.items():
            echo(f"    {str(key).ljust(width)}  {_describe_value(value)}")
    for review in details["reviews"]:
        echo(
            f"review       {_cell(review['created_at'])} {review['reviewer']}: "
            f"{review['previous_verdict']} -> {review['new_verdict']} {review['note'] or ''}".rstrip()
        )


def _parse_check_id(check_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(check_id)
    except ValueError:
        raise click.BadParameter("not a check id (UUID)", param_hint="CHECK_ID") from None


def _existing_check(session: Session, check_id: uuid.UUID) -> Check:
    check = get_check(session, check_id)
    if check is None:
        raise click.ClickException(f"no check {check_id}")
    return check


@click.command()
@click.argument("check_id")
@db_option
@format_option
def show(check_id: str, database: str | None, output_format: str) -> None:
    """Show one check with its verdict and all its evidence."""
    parsed = _parse_check_id(check_id)
    settings = cli_settings(database)
    factory = open_database(settings, migrate=False)
    with session_scope(factory) as session:
        details = check_details(_existing_check(session, parsed))
    if output_format == "json":
        click.echo(json.dumps(details, indent=2, default=_json_default))
    else:
        _print_details(details)


@click.command()
@click.argument("check_id")
@click.option(
    "--verdict", "new_verdict", type=click.Choice(VERDICTS), required=True, help="The reviewer's verdict."
)
@click.option("--reviewer", required=True, help="Who decided (stored with the review).")
@click.option("--note", help="Why (stored; never sent in webhooks).")
@db_option
@format_option
def review(  # noqa: PLR0917 - one parameter per click option
    check_id: str, new_verdict: str, reviewer: str, note: str | None, database: str | None, output_format: str
) -> None:
    """Record a reviewer's verdict on a done check: it overrides the model's (listings, flagged_checks) and
    notifies endpoints subscribed to check.reviewed."""
    parsed = _parse_check_id(check_id)
    settings = cli_settings(database)
    factory = open_database(settings, migrate=False)
    from worker import outbox  # noqa: PLC0415 - webhook payload code only where a review is written

    with session_scope(factory) as session:
        check = _existing_check(session, parsed)
        if check.status != "done":
            raise click.ClickException(
                f"check {parsed} is {check.status}; only checks with a verdict are reviewed"
            )
        stored, delivery_ids = outbox.review_check(
            session, parsed, reviewer=reviewer, new_verdict=new_verdict, note=note
        )
        row = {**check_row(check), "review_id": str(stored.id), "previous_verdict": stored.previous_verdict}
    deliver_inline(factory, settings, delivery_ids)
    emit([row], ("check_id", "previous_verdict", "verdict", "score", "external_id"), output_format)


def register(group: click.Group) -> None:
    """Add the pipeline commands to the ``synthguard`` group."""
    for command in (scan, demo, worker, enqueue, db, verdicts, checks, show, review):
        group.add_command(command)


__all__ = [
    "create_check_for",
    "escape_controls",
    "expand_inputs",
    "register",
    "scan_inputs",
    "write_demo_images",
]
