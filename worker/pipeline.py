"""The moderation pipeline: claim -> fetch -> hash -> (reuse verdict | decode -> detect) -> store -> outbox.

One readable path shared by the Celery tasks and ``synthguard scan``. Functions take a session and never
commit: the caller owns the transactions. Two of them, on purpose:

1. ``claim(session, ids, settings)`` marks checks ``processing`` and counts the attempt. The caller commits
   this BEFORE the risky work, so an image that kills the process every time still leaves its attempt count
   behind and is dead-lettered after ``settings.max_attempts`` instead of looping forever.
2. ``run(session, detector, ids, settings)`` does the work and stores every outcome: a verdict, or status
   ``failed`` with a reason a person can read. Transient fetch errors are handed back for a retry. The work
   takes time, and meanwhile another worker may finish the check (the reconciler dead-letters it, a duplicate
   message's attempt stores its verdict): an outcome is stored only after the row is locked and found still
   unfinished; otherwise this attempt's outcome is dropped and the earlier one stands.

The webhook outbox rows are written in the same transaction as the verdict (``worker.outbox``); the ids they
return are enqueued by the caller after commit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

import numpy as np
import pdqhash
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.orm import Session

from db.base import utcnow
from db.queries import VerdictRecord, find_verdict, upsert_verdict
from db.tables import Check, Verdict
from models import Detection, ImageInput
from worker import outbox
from worker.decode import DecodeError, decode_image
from worker.fetch import FetchError, fetch_image
from worker.settings import Settings

log = logging.getLogger(__name__)

ERROR_MAX_CHARS: Final = 1000
# PDQ works on a 64x64 summary of the image; hashing a 512-px copy gives the same bits far faster
# than hashing 40 megapixels. The detector itself never sees a resized image.
PDQ_WORKING_SIZE: Final = 512
CLAIMABLE_STATUSES: Final = ("queued", "processing")
# How the error of a check put back to ``queued`` for a fetch retry begins; the reconciler gives such checks
# the retry backoff before it counts them as stuck, by this prefix.
RETRY_WAIT_PREFIX: Final = "fetch failed, will retry"


class DetectorLike(Protocol):
    """What the pipeline needs from ``models.Detector``."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    def detect(self, images: Sequence[Image.Image | ImageInput]) -> list[Detection]: ...


Fetcher = Callable[[str, Settings], bytes]
Decoder = Callable[[bytes, Settings], Image.Image]


@dataclass(frozen=True)
class CheckOutcome:
    """What happened to one check in one pipeline run."""

    check_id: uuid.UUID
    status: str  # "done", "failed", or "queued" (waiting for a retry after a transient error)
    error: str | None = None
    verdict: str | None = None
    score: float | None = None
    reused_verdict: bool = False


@dataclass
class PipelineResult:
    """Outcomes of one run, plus the work the caller does after commit."""

    outcomes: list[CheckOutcome] = field(default_factory=list)
    delivery_ids: list[uuid.UUID] = field(default_factory=list)
    # Checks that hit a transient fetch error and were put back to "queued" for the task to retry.
    retry_ids: list[uuid.UUID] = field(default_factory=list)
    inferences: int = 0


@dataclass(frozen=True)
class _Pending:
    """A check whose bytes are in hand and whose verdict is not known yet."""

    check: Check
    data: bytes
    sha256: str


@dataclass(frozen=True)
class _Decoded(_Pending):
    image: Image.Image


@dataclass(frozen=True)
class Claim:
    """Result of :func:`claim`: the checks to work on, and outbox rows of the ones dead-lettered."""

    check_ids: list[uuid.UUID]
    dead_lettered: list[uuid.UUID]
    delivery_ids: list[uuid.UUID]


def readable(reason: str) -> str:
    """A stored error: one line, bounded."""
    line = " ".join(reason.split())
    return line if len(line) <= ERROR_MAX_CHARS else line[: ERROR_MAX_CHARS - 1] + "…"


# --- step 1: claim ---------------------------------------------------------------------------------------


def claim(session: Session, check_ids: Sequence[uuid.UUID], settings: Settings) -> Claim:
    """Mark the claimable checks ``processing`` and count the attempt; return the ids to work on.

    Done and failed checks are skipped (a redelivered message is harmless). A check already started
    ``settings.max_attempts`` times is failed instead: every earlier attempt died without storing an outcome,
    so the image most likely kills the worker. The caller commits before calling :func:`run`.
    """
    if not check_ids:
        return Claim([], [], [])
    checks = _lock_unfinished_checks(session, check_ids)
    now = utcnow()
    claimed: list[uuid.UUID] = []
    dead = PipelineResult()
    for check in checks:
        if check.attempts >= settings.max_attempts:
            reason = (
                f"dead-lettered: processing was started {check.attempts} times without finishing "
                f"(limit SYNTHGUARD_MAX_ATTEMPTS={settings.max_attempts}); the image may crash the worker"
            )
            # An earlier attempt may have stored why it did not finish (e.g. a fetch to retry): keep it.
            _record_failure(  # the row is locked and unfinished: _lock_unfinished_checks above
                session,
                check,
                f"{reason}; last error: {check.error}" if check.error else reason,
                settings,
                dead,
            )
            log.warning("check %s dead-lettered after %d attempts", check.id, check.attempts)
            continue
        check.status = "processing"
        check.attempts += 1
        check.started_at = now
        check.updated_at = now
        claimed.append(check.id)
    return Claim(claimed, [outcome.check_id for outcome in dead.outcomes], dead.delivery_ids)


# --- step 2: run -----------------------------------------------------------------------------------------


def run(
    session: Session,
    detector: DetectorLike,
    check_ids: Sequence[uuid.UUID],
    settings: Settings,
    *,
    retry_transient: bool = False,
    fetcher: Fetcher = fetch_image,
    decoder: Decoder = decode_image,
) -> PipelineResult:
    """Process claimed checks (status ``processing``) to a stored outcome each.

    Args:
        session: the unit of work; not committed here.
        detector: the loaded detector (one per worker process).
        check_ids: checks previously claimed by :func:`claim`; others are skipped.
        settings: limits for fetching, decoding and raw-image storage.
        retry_transient: put checks with a transient fetch error back to ``queued`` (the task retries them);
            when False (last try, or ``scan``) they fail with the reason.
        fetcher, decoder: the URL fetcher and image decoder (injected by tests of hostile inputs).

    Returns:
        Per-check outcomes, outbox delivery ids to enqueue after commit, and ids to retry.
    """
    result = PipelineResult()
    checks = session.scalars(
        sa.select(Check)
        .where(Check.id.in_(list(check_ids)), Check.status == "processing")
        .order_by(Check.created_at)
        .options(sa.orm.undefer(Check.image_data))
    ).all()

    # Nothing is written until the slow steps (fetch, decode, detect) are over; their outcomes are stored
    # after them, in the order they came. On SQLite the first write takes the database's one write lock
    # until commit: held through a batch of slow URL fetches, it made every other writer (enqueue, scan,
    # review, the other worker processes) wait and fail with "database is locked" after 30 s.
    stores: list[_Store] = []
    with session.no_autoflush:
        pending: list[_Pending] = []
        for check in checks:
            try:
                data = _image_bytes(check, settings, fetcher)
            except FetchError as exc:
                if exc.transient and retry_transient:
                    stores.append((check, partial(_store_retry, check, exc.reason, result)))
                else:
                    stores.append(_failure(session, check, f"fetch failed: {exc.reason}", settings, result))
                continue
            except _InvalidInputError as exc:
                stores.append(_failure(session, check, str(exc), settings, result))
                continue
            except Exception as exc:
                # An error no fetch path expected belongs to this check's URL: fail it alone, not its batch.
                log.exception("fetching check %s failed unexpectedly", check.id)
                reason = f"fetch failed: {type(exc).__name__}: {exc}"
                stores.append(_failure(session, check, reason, settings, result))
                continue
            sha256 = hashlib.sha256(data).hexdigest()
            check.sha256 = sha256
            if not settings.store_raw_images:
                check.image_data = None
            elif check.image_data is None:
                check.image_data = data
            pending.append(_Pending(check, data, sha256))

        to_detect = _reuse_stored_verdicts(session, detector, pending, result, stores=stores)
        decoded = _decode_all(session, to_detect, settings, decoder, result, stores=stores)
        detections = _detect_unique(detector, decoded, settings.batch_size, result)
        # The batch's rows locked at once, in the order every locker uses, before the first write: the first
        # store would otherwise flush every changed check, locking their rows in the ORM's order (a deadlock
        # with a claim of the same batch on PostgreSQL). A check finished meanwhile by another worker loses
        # this attempt's changes (sha256, perceptual hash, image bytes) instead of having them written on it.
        # The lock is held until commit, so these are the checks whose outcomes are stored below.
        unfinished = _lock_unfinished_ids(session, [check.id for check in checks])
        for check in checks:
            if check.id not in unfinished:
                session.expire(check)
                log.warning(
                    "check %s became %s while this attempt ran; its outcome is not stored",
                    check.id,
                    check.status,
                )
    for check, store in stores:
        if check.id in unfinished:
            store()
    detected = [item for item in decoded if item.check.id in unfinished]
    _store_detections(session, detector, detected, detections, settings=settings, result=result)
    return result


class _InvalidInputError(Exception):
    """The check's stored input cannot be processed (no image, bad base64, too large)."""


def _image_bytes(check: Check, settings: Settings, fetcher: Fetcher) -> bytes:
    if check.image_data is not None:
        if len(check.image_data) > settings.max_inline_bytes:
            raise _InvalidInputError(
                f"inline image too large: {len(check.image_data)} bytes > limit {settings.max_inline_bytes}"
            )
        return check.image_data
    if check.source_url:
        return fetcher(check.source_url, settings)
    if check.has_inline_image:
        # Bytes were cleared after an earlier outcome; only a reviewer re-run lands here.
        raise _InvalidInputError("the inline image is no longer stored (SYNTHGUARD_STORE_RAW_IMAGES is off)")
    raise _InvalidInputError("no image: the check has neither an image URL nor inline image bytes")


#: An outcome to store once the slow work is over, and the check it belongs to.
_Store = tuple[Check, Callable[[], None]]


def _failure(
    session: Session, check: Check, reason: str, settings: Settings, result: PipelineResult
) -> _Store:
    return check, partial(_record_failure, session, check, reason, settings, result)


def _reuse_stored_verdicts(
    session: Session,
    detector: DetectorLike,
    pending: list[_Pending],
    result: PipelineResult,
    *,
    stores: list[_Store],
) -> list[_Pending]:
    """Attach stored verdicts for bytes already analysed by this model version; return the rest."""
    remaining: list[_Pending] = []
    for item in pending:
        verdict = find_verdict(session, item.sha256, detector.model_id)
        if verdict is None:
            remaining.append(item)
            continue
        _copy_perceptual_hash(session, item.check)
        stores.append((item.check, partial(_store_done, session, item.check, verdict, result, reused=True)))
    return remaining


def _copy_perceptual_hash(session: Session, check: Check) -> None:
    """Take the PDQ hash from an earlier check of the same bytes (no decode needed)."""
    earlier = session.execute(
        sa.select(Check.phash, Check.phash_quality)
        .where(Check.sha256 == check.sha256, Check.phash.is_not(None), Check.id != check.id)
        .limit(1)
    ).first()
    if earlier is not None:
        check.phash, check.phash_quality = earlier.phash, earlier.phash_quality


def _decode_all(
    session: Session,
    pending: list[_Pending],
    settings: Settings,
    decoder: Decoder,
    result: PipelineResult,
    *,
    stores: list[_Store],
) -> list[_Decoded]:
    decoded: list[_Decoded] = []
    for item in pending:
        try:
            image = decoder(item.data, settings)
        except DecodeError as exc:
            stores.append(_failure(session, item.check, f"not analysable: {exc.reason}", settings, result))
            continue
        item.check.phash, item.check.phash_quality = perceptual_hash(image)
        decoded.append(_Decoded(item.check, item.data, item.sha256, image))
    return decoded


def perceptual_hash(image: Image.Image) -> tuple[str | None, int | None]:
    """PDQ hash (64 hex digits) and quality 0..100 of an image, or (None, None) if it cannot be hashed."""
    try:
        working = image.convert("RGB")
        working.thumbnail((PDQ_WORKING_SIZE, PDQ_WORKING_SIZE))
        bits, quality = pdqhash.compute(np.asarray(working, dtype=np.uint8))
    except (ValueError, OSError, RuntimeError) as exc:
        log.warning("PDQ hash failed: %s", exc)
        return None, None
    packed = np.packbits(np.asarray(bits, dtype=np.uint8))
    return packed.tobytes().hex(), int(quality)


def _detect_unique(
    detector: DetectorLike, pending: list[_Decoded], batch_size: int, result: PipelineResult
) -> dict[str, Detection | str]:
    """Detections (or the detector's error) by sha256: the same bytes twice in one batch are analysed once."""
    unique: dict[str, _Decoded] = {}
    for item in pending:
        unique.setdefault(item.sha256, item)
    detections = _detect_isolating_failures(detector, list(unique.values()), batch_size)
    result.inferences += sum(1 for detection in detections.values() if isinstance(detection, Detection))
    return detections


def _store_detections(
    session: Session,
    detector: DetectorLike,
    pending: list[_Decoded],
    detections: dict[str, Detection | str],
    *,
    settings: Settings,
    result: PipelineResult,
) -> None:
    stored: dict[str, Verdict] = {}
    for sha256, outcome in detections.items():
        if isinstance(outcome, Detection):
            stored[sha256] = upsert_verdict(session, verdict_record(detector, sha256, outcome))
    analysed: set[str] = set()
    for item in pending:
        verdict = stored.get(item.sha256)
        if verdict is not None:
            _store_done(session, item.check, verdict, result, reused=item.sha256 in analysed)
            analysed.add(item.sha256)
        else:
            reason = detections.get(item.sha256)
            _record_failure(session, item.check, f"detector failed: {reason}", settings, result)


def _detect_isolating_failures(
    detector: DetectorLike, items: list[_Decoded], batch_size: int
) -> dict[str, Detection | str]:
    """Detections by sha256; a batch that raises is retried image by image so one bad image fails alone."""
    outcomes: dict[str, Detection | str] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = [ImageInput(image=item.image, data=item.data, name=str(item.check.id)) for item in chunk]
        started = time.perf_counter()
        try:
            detections = detector.detect(inputs)
        except Exception as exc:  # noqa: BLE001 - any detector failure must end as a stored reason
            if len(chunk) == 1:
                outcomes[chunk[0].sha256] = f"{type(exc).__name__}: {exc}"
                continue
            log.warning("detector failed on a batch of %d, retrying one by one: %s", len(chunk), exc)
            for item in chunk:
                outcomes.update(_detect_isolating_failures(detector, [item], 1))
            continue
        log.info("detected %d images in %.2f s", len(chunk), time.perf_counter() - started)
        for item, detection in zip(chunk, detections, strict=True):
            outcomes[item.sha256] = detection
    return outcomes


def verdict_record(detector: DetectorLike, sha256: str, detection: Detection) -> VerdictRecord:
    """Flatten a Detection into the verdicts/evidence rows (JSON-safe: no NaN, no NumPy scalars)."""
    return VerdictRecord(
        sha256=sha256,
        model_name=detector.name,
        model_version=detector.version,
        weights_sha=_weights_sha(detector),
        model_id=detector.model_id,
        score=min(1.0, max(0.0, float(detection.score))),
        verdict=detection.verdict,
        family_scores={str(key): float(value) for key, value in detection.family_scores.items()},
        threshold=float(detection.threshold),
        decided_by=detection.decided_by,
        reasons=[str(reason) for reason in detection.reasons],
        evidence={str(group): json_safe(data) for group, data in detection.evidence.items()},
    )


def _weights_sha(detector: DetectorLike) -> str:
    cfg = getattr(detector, "cfg", None)
    full = getattr(cfg, "weights_sha256", None)
    if isinstance(full, str) and full:
        return full
    # "<name>@<version>+<sha12>": the short hash is what the model id carries.
    return detector.model_id.rpartition("+")[2]


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that every JSON column accepts: NaN/inf -> None, NumPy -> Python, keys -> str."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


# --- storing outcomes ------------------------------------------------------------------------------------


def _lock_unfinished_ids(session: Session, check_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Lock the rows of ``check_ids`` until the transaction ends; return the ids of those still unfinished.

    Every caller (claim, run's store phase, fail_checks) locks through here. PostgreSQL: the rows are locked
    in one order, (created_at, id), so two transactions on overlapping batches cannot deadlock. Then the
    decision is a write (the status set to itself where it is unfinished), not a read: on SQLite, where
    SQLAlchemy leaves ``FOR UPDATE`` out and a read takes no lock, the read may predate another worker's
    commit, and a write based on it overwrote the check that worker had finished (a done, flagged check
    turned failed, its image bytes already dropped). The write waits for such a commit (one writer at a
    time) and sees its result. Nothing in the session is flushed first when the caller holds
    ``no_autoflush``: a flush would lock the dirty rows in the ORM's own order.
    """
    candidates = session.scalars(
        sa.select(Check.id)
        .where(Check.id.in_(list(check_ids)), Check.status.in_(CLAIMABLE_STATUSES))
        .order_by(Check.created_at, Check.id)
        .with_for_update()
    ).all()
    if not candidates:
        return set()
    rows = session.execute(
        sa.update(Check)
        .where(Check.id.in_(candidates), Check.status.in_(CLAIMABLE_STATUSES))
        .values(status=Check.status)
        .returning(Check.id)
        .execution_options(synchronize_session=False)
    )
    return {row[0] for row in rows}


def _lock_unfinished_checks(session: Session, check_ids: Sequence[uuid.UUID]) -> list[Check]:
    """The unfinished checks of ``check_ids``, oldest first, locked and read after the lock."""
    unfinished = _lock_unfinished_ids(session, check_ids)
    if not unfinished:
        return []
    # populate_existing: a Check already in the session is overwritten with the row as it is now.
    return list(
        session.scalars(
            sa.select(Check)
            .where(Check.id.in_(list(unfinished)))
            .order_by(Check.created_at, Check.id)
            .execution_options(populate_existing=True)
        ).all()
    )


def _store_retry(check: Check, reason: str, result: PipelineResult) -> None:
    """Put ``check`` back to ``queued`` for the task's retry (its row locked and unfinished, as below)."""
    check.status = "queued"
    check.error = readable(f"{RETRY_WAIT_PREFIX}: {reason}")
    result.retry_ids.append(check.id)
    result.outcomes.append(CheckOutcome(check.id, "queued", check.error))


def _store_done(
    session: Session,
    check: Check,
    verdict: Verdict,
    result: PipelineResult,
    *,
    reused: bool,
) -> None:
    """Store ``check``'s verdict, whose row the caller holds locked and found unfinished."""
    now = utcnow()
    check.verdict = verdict
    check.status = "done"
    check.error = None
    check.finished_at = now
    check.updated_at = now
    session.flush()
    result.delivery_ids += outbox.record_check_events(session, check, verdict, now=now)
    result.outcomes.append(
        CheckOutcome(check.id, "done", None, verdict.verdict, verdict.score, reused_verdict=reused)
    )


def _record_failure(
    session: Session, check: Check, reason: str, settings: Settings, result: PipelineResult
) -> None:
    """Fail ``check``, whose row the caller holds locked and found unfinished (claim, run, fail_checks)."""
    _fail(check, reason, settings)
    session.flush()
    result.delivery_ids += outbox.record_check_failed(session, check)
    result.outcomes.append(CheckOutcome(check.id, "failed", check.error))


def _fail(check: Check, reason: str, settings: Settings) -> None:
    now = utcnow()
    check.status = "failed"
    check.error = readable(reason)
    check.finished_at = now
    check.updated_at = now
    if not settings.store_raw_images:
        check.image_data = None


def fail_checks(
    session: Session, check_ids: Sequence[uuid.UUID], reason: str, settings: Settings
) -> list[uuid.UUID]:
    """Fail still-unfinished checks with ``reason`` (e.g. retries exhausted); return outbox delivery ids."""
    result = PipelineResult()
    for check in _lock_unfinished_checks(session, check_ids):
        detail = f"{reason}: {check.error}" if check.error else reason
        _record_failure(session, check, detail, settings, result)
    return result.delivery_ids


__all__ = [
    "CheckOutcome",
    "Claim",
    "DetectorLike",
    "PipelineResult",
    "claim",
    "fail_checks",
    "json_safe",
    "perceptual_hash",
    "readable",
    "run",
    "verdict_record",
]
