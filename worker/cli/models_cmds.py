"""`synthguard detect`, `synthguard eval` and `synthguard train`: the detector from the command line."""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click
from PIL import Image, UnidentifiedImageError

# Only torch-free names at import: every `synthguard` command imports this module (tests/test_layering.py).
from models import DetectorError, ImageInput, create_detector, list_detectors
from worker.requests import DEFAULT_MAX_INLINE_BYTES
from worker.settings import ImageLimits, SettingsError, load_image_limits

if TYPE_CHECKING:
    from models.detector import Detector

#: The worker's default caps (SYNTHGUARD_MAX_INLINE_BYTES, SYNTHGUARD_MAX_PIXELS): `detect` refuses what a
#: check would. They are the defaults of `_read_image`; `detect` reads the environment's values, and no
#: other setting.
MAX_FILE_BYTES: Final[int] = DEFAULT_MAX_INLINE_BYTES
MAX_PIXELS: Final[int] = ImageLimits.model_fields["max_pixels"].get_default()


class _HelpOnDemandOption(click.Option):
    """An option whose help text is built when help is printed, not when the module is imported.

    For help that names detectors or conditions: listing them imports torch (`models.detector`,
    `models.data`), which only `synthguard detect/eval --help` should pay for.
    """

    def __init__(self, *args: Any, help_on_demand: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._help_on_demand = help_on_demand

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = self._help_on_demand()
        return super().get_help_record(ctx)


def _conditions() -> tuple[str, ...]:
    from models.data import CONDITIONS  # noqa: PLC0415 - imports torch

    return CONDITIONS


def _build_detector(model: str, weights: Path | None, device: str | None) -> Detector:
    try:
        if weights is not None:
            from models.detector import detector_from_weights  # noqa: PLC0415 - imports torch

            return detector_from_weights(weights, device=device)
        return create_detector(model, device=device)
    except DetectorError as exc:
        raise click.ClickException(str(exc)) from exc


def _json_safe(value: Any) -> Any:
    """Strict JSON: NaN/inf become null (they are not JSON numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _read_image(
    path: Path, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS
) -> tuple[ImageInput | None, str | None]:
    """The file as a detector input, or None and the one-line error that file's output line carries.

    The caps are the worker's (SYNTHGUARD_MAX_INLINE_BYTES, SYNTHGUARD_MAX_PIXELS): bytes before reading,
    pixels from the header before decoding.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return None, f"file too large: {size} bytes > limit {max_bytes}"
        with path.open("rb") as handle:
            # Bounded even after the stat: a file that grows meanwhile, or one whose size stat does not tell
            # (a device, /proc), is not read past the limit.
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            return None, f"file too large: more than {max_bytes} bytes"
        with Image.open(io.BytesIO(data)) as img:
            pixels = img.width * img.height
            if pixels > max_pixels:
                return (
                    None,
                    f"image too large: {img.width}x{img.height} = {pixels} pixels > limit {max_pixels}",
                )
            img.load()
            image = img.copy()
            image.info.update(img.info)
    except UnidentifiedImageError:
        # Pillow's message names the in-memory buffer (<_io.BytesIO object at 0x...>), not the file.
        return None, "cannot read image: not an image format Pillow recognises"
    except Exception as exc:  # noqa: BLE001 - Pillow raises SyntaxError, struct.error, ... on hostile files
        # One bad file must not cost the other files their results; it gets its own error line.
        return None, f"cannot read image: {str(exc) or type(exc).__name__}"
    return ImageInput(image=image, data=data, name=str(path)), None


@click.command("detect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--model",
    default="synthguard-v1",
    show_default=True,
    cls=_HelpOnDemandOption,
    help_on_demand=lambda: f"one of {list_detectors()}",
)
@click.option(
    "--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="local weights file"
)
@click.option("--device", default=None, help="auto (default: CUDA when available), cpu, cuda, cuda:N or mps")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--no-evidence", is_flag=True, help="leave the evidence dict out of the output")
def detect_command(
    *,
    paths: tuple[Path, ...],
    model: str,
    weights: Path | None,
    device: str | None,
    batch_size: int,
    no_evidence: bool,
) -> None:
    """Print one JSON object per image: path, score, verdict, family_scores, evidence, model.

    A file that cannot be read, or is over the worker's caps (SYNTHGUARD_MAX_INLINE_BYTES, 20 MiB by default;
    SYNTHGUARD_MAX_PIXELS, 40 million pixels), prints an object with "error" and the exit status is 1 at the
    end.
    """
    try:
        limits = load_image_limits()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    detector = _build_detector(model, weights, device)
    failures = 0
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        loaded = [_read_image(p, limits.max_inline_bytes, limits.max_pixels) for p in chunk]
        inputs = [item for item, _ in loaded if item is not None]
        detections = iter(detector.detect(inputs))
        for path, (item, error) in zip(chunk, loaded, strict=True):
            if item is None:
                failures += 1
                click.echo(json.dumps({"path": str(path), "error": error, "model": detector.model_id}))
                continue
            record: dict[str, Any] = {"path": str(path), **next(detections).to_dict()}
            if no_evidence:
                record.pop("evidence")
            click.echo(json.dumps(_json_safe(record), sort_keys=False))
    if failures:
        sys.exit(1)


@click.command("eval")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--conditions",
    default=lambda: ",".join(_conditions()),
    show_default="all",
    cls=_HelpOnDemandOption,
    help_on_demand=lambda: "comma-separated subset of " + ", ".join(_conditions()),
)
@click.option(
    "--holdout-source",
    "holdout_sources",
    multiple=True,
    help="evaluate this source (label:repo or repo) against the other class; repeatable",
)
@click.option("--model", default="synthguard-v1", show_default=True)
@click.option(
    "--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="local weights file"
)
@click.option("--device", default=None)
@click.option(
    "--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option(
    "--loso",
    "loso_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="leave-one-source-out: train one model per held-out source (the --holdout-source list, else the 5 "
    "largest fake and 3 largest real sources) into this folder and evaluate each on its source",
)
@click.option("--cache-dir", default=Path("runs/cache"), show_default=True, type=click.Path(path_type=Path))
@click.option("--loso-steps", default=500, show_default=True, type=click.IntRange(1), help="steps per fold")
@click.option("--taef2-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
def eval_command(
    *,
    manifest: Path,
    conditions: str,
    holdout_sources: tuple[str, ...],
    model: str,
    weights: Path | None,
    device: str | None,
    output_format: str,
    loso_dir: Path | None,
    loso_steps: int,
    taef2_dir: Path | None,
    cache_dir: Path,
) -> None:
    """ROC AUC, TPR at 1%/5% FPR, balanced accuracy, recall per generator, FPR per real source, per
    condition.
    """
    from models.data import CONDITIONS  # noqa: PLC0415 - imports torch
    from models.evaluation import evaluate, leave_one_source_out  # noqa: PLC0415 - scipy is only needed here
    from models.training import TrainConfig  # noqa: PLC0415

    if loso_dir is not None:
        try:
            summary = leave_one_source_out(
                manifest,
                loso_dir,
                train_config=TrainConfig(steps=loso_steps, device=device or "cpu"),
                sources=holdout_sources,
                taef2_dir=taef2_dir,
                cache_dir=cache_dir,
                log=lambda line: click.echo(line, err=True),
            )
        except DetectorError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(json.dumps(_json_safe(summary), indent=2))
        return

    chosen = [c.strip() for c in conditions.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CONDITIONS]
    if unknown:
        raise click.BadParameter(f"unknown condition(s) {unknown}; choose from {list(CONDITIONS)}")
    detector = _build_detector(model, weights, device)
    try:
        report = evaluate(
            detector,
            manifest,
            conditions=chosen,  # type: ignore[arg-type]
            holdout_sources=holdout_sources,
        )
    except DetectorError as exc:
        raise click.ClickException(str(exc)) from exc
    if output_format == "json":
        click.echo(json.dumps(_json_safe(report.to_dict()), indent=2))
    else:
        click.echo(report.to_table())


@click.command("train")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--taef2-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option(
    "--exclude-source", "exclude_sources", multiple=True, help="label:repo to leave out; repeatable"
)
@click.option(
    "--steps", default=None, type=click.IntRange(1), help="optimiser steps (default: the shipped recipe)"
)
@click.option(
    "--minutes", default=55.0, show_default=True, type=click.FloatRange(0.05), help="wall-clock cap"
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--cache-dir", default=Path("runs/cache"), show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--device", default="cpu", show_default=True, help="cpu (shipped recipe) or cuda (same recipe, GPU)"
)
def train_command(
    *,
    manifest: Path,
    out_dir: Path,
    taef2_dir: Path | None,
    exclude_sources: tuple[str, ...],
    steps: int | None,
    minutes: float,
    seed: int,
    cache_dir: Path,
    device: str,
) -> None:
    """Train a detector from a labelled manifest; writes DIR/weights.pt and DIR/train_summary.json."""
    from models.training import TrainConfig, train  # noqa: PLC0415 - training code is not needed to detect

    config = TrainConfig(seed=seed, max_minutes=minutes, exclude_sources=exclude_sources, device=device)
    if steps is not None:
        config = replace(config, steps=steps)
    try:
        path = train(manifest, out_dir, config, taef2_dir=taef2_dir, cache_dir=cache_dir, log=click.echo)
    except DetectorError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


@click.command("recalibrate")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--max-crops", default=None, type=click.IntRange(1, 256), help="crops per image (default: as trained)"
)
@click.option("--cache-dir", default=Path("runs/cache"), show_default=True, type=click.Path(path_type=Path))
def recalibrate_command(
    *, weights: Path, manifest: Path, out_dir: Path, max_crops: int | None, cache_dir: Path
) -> None:
    """Calibrate trained weights again (score scaling and thresholds), e.g. for another number of crops per
    image, on the calibration split of MANIFEST they were trained beside; the network is unchanged. Writes
    DIR/weights.pt."""
    from models.detector import detector_from_weights  # noqa: PLC0415
    from models.training import recalibrate, saved_training_config  # noqa: PLC0415 - not needed to detect

    try:
        config = saved_training_config(detector_from_weights(weights, device="cpu").training_info["config"])
        if max_crops is not None:
            config = replace(config, max_crops=max_crops)
        path = recalibrate(weights, manifest, out_dir, config, cache_dir=cache_dir, log=click.echo)
    except KeyError as exc:
        raise click.ClickException(f"{weights} does not say how it was trained ({exc})") from exc
    except (DetectorError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


def register(group: click.Group) -> None:
    """Add detect, eval, train and recalibrate to the `synthguard` group."""
    group.add_command(detect_command)
    group.add_command(eval_command)
    group.add_command(train_command)
    group.add_command(recalibrate_command)
