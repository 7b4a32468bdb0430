"""Compute the "typical of camera photos" ranges shown beside every pixel-evidence metric.

    python -m models.evidence.calibrate_ranges MANIFEST --out models/evidence/camera_ranges.json

For each metric of `pixel_evidence`, the 5th and 95th percentiles over real photos of the manifest, in two
conditions, because a reviewer sees both kinds of upload:
- "as_is": the file's own pixels (a centre crop of at most 512 px, never resized; most dev reals are JPEGs
  cropped losslessly on their original block grid, some are lossless PNGs);
- "jpeg90": the same crop re-encoded as JPEG quality 90 (Pillow, 4:2:0), the `crop512_jpeg90` evaluation
  condition.
At most `--per-source` images are taken from each real source (evenly spaced in path order, so the choice is
deterministic), so the 500 ImageNet web photos do not drown the camera JPEGs and the lossless test photos.
The JSON holds only these derived numbers, never image data.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.errors import DetectorError
from models.evidence import pixel_evidence
from models.evidence._common import ANALYSIS_SIDE, RANGES_PATH
from models.preprocess import center_crop, prepare_image

PERCENTILES = (5.0, 95.0)
DEFAULT_PER_SOURCE = 80
JPEG_QUALITY = 90


def select_reals(manifest: Path, per_source: int) -> list[tuple[str, Path]]:
    """(source, path) of up to `per_source` real images per source, evenly spaced in path order."""
    by_source: dict[str, list[Path]] = defaultdict(list)
    with manifest.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("label") == "real":
                by_source[row.get("source_repo") or "unknown"].append(manifest.parent / row["relpath"])
    chosen: list[tuple[str, Path]] = []
    for source in sorted(by_source):
        paths = sorted(by_source[source])
        if len(paths) > per_source:
            picks = np.linspace(0, len(paths) - 1, per_source).round().astype(int)
            paths = [paths[i] for i in picks]
        chosen.extend((source, p) for p in paths)
    return chosen


def _flat_metrics(evidence: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        f"{group}.{key}": float(record["value"])
        for group, records in evidence.items()
        for key, record in records.items()
        if isinstance(record, dict) and "value" in record
    }


def _jpeg90(crop: np.ndarray) -> np.ndarray:
    pixels = Image.fromarray(np.round(crop * 255.0).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    pixels.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return prepare_image(decoded).rgb


def measure(paths: list[tuple[str, Path]]) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """Metric values per condition, and the files that could not be measured (with the reason)."""
    values: dict[str, dict[str, list[float]]] = {"as_is": defaultdict(list), "jpeg90": defaultdict(list)}
    skipped: list[str] = []
    for _source, path in paths:
        try:
            with Image.open(path) as img:
                prepared = prepare_image(img)
            crop = center_crop(prepared.rgb, ANALYSIS_SIDE, prepared.grid_offset)
            conditions = {"as_is": crop, "jpeg90": _jpeg90(crop)}
            for condition, pixels in conditions.items():
                for name, value in _flat_metrics(pixel_evidence(pixels)).items():
                    values[condition][name].append(value)
        except (OSError, DetectorError) as exc:
            skipped.append(f"{path.name}: {exc}")
    return values, skipped


def ranges_from(values: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    return {
        condition: {
            name: [float(f"{v:.4g}") for v in np.percentile(np.asarray(samples), PERCENTILES)]
            for name, samples in sorted(per_metric.items())
        }
        for condition, per_metric in values.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("manifest", type=Path, help="manifest.csv in the format of datasets/dev")
    parser.add_argument("--out", type=Path, default=RANGES_PATH)
    parser.add_argument("--per-source", type=int, default=DEFAULT_PER_SOURCE)
    args = parser.parse_args(argv)

    paths = select_reals(args.manifest, args.per_source)
    if not paths:
        print(f"no real images in {args.manifest}", file=sys.stderr)
        return 1
    values, skipped = measure(paths)
    sources: dict[str, int] = defaultdict(int)
    for source, _ in paths:
        sources[source] += 1
    payload = {
        "about": (
            "p5-p95 of each pixel-evidence metric over real photos; as_is = centre crop <= 512 px of the "
            "file's own pixels, jpeg90 = that crop re-encoded as JPEG quality 90. Made by "
            "python -m models.evidence.calibrate_ranges."
        ),
        "percentiles": list(PERCENTILES),
        "manifest": args.manifest.name,
        "images": len(paths) - len(skipped),
        "sources": dict(sorted(sources.items())),
        "skipped": skipped,
        "ranges": ranges_from(values),
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out} from {payload['images']} real images", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
