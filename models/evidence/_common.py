"""Shared helpers of the pixel evidence: residuals, metric records with camera ranges, summaries."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]

#: Pixel evidence reads at most this much of the image: a centre crop, never a resize.
ANALYSIS_SIDE = 512

RANGES_PATH = Path(__file__).with_name("camera_ranges.json")


def luminance(rgb: FloatArray) -> FloatArray:
    """Rec. 601 luma: JPEG codes this channel at full resolution, so block traces live here."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.asarray(rgb @ weights, dtype=np.float32)


def laplacian_residual(plane: FloatArray) -> FloatArray:
    """x - mean(4 neighbours): a fixed high-pass predictor residual, shape (H-2, W-2).

    Output[i, j] belongs to input pixel (i+1, j+1). A linear interpolator (bilinear demosaicing, upsampling
    followed by smoothing) makes this residual exactly or nearly zero at interpolated positions, which is
    what the periodicity measures look for; scene content mostly cancels.
    """
    centre = plane[1:-1, 1:-1]
    neighbours = plane[:-2, 1:-1] + plane[2:, 1:-1] + plane[1:-1, :-2] + plane[1:-1, 2:]
    return np.asarray(centre - np.float32(0.25) * neighbours, dtype=np.float32)


@lru_cache(maxsize=1)
def _load_ranges() -> dict[str, Any]:
    try:
        loaded = json.loads(RANGES_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def camera_range(name: str, condition: str = "as_is") -> list[float] | None:
    """p5-p95 of metric `name` over real dev photos (see calibrate_ranges.py), or None when not calibrated."""
    ranges = _load_ranges().get("ranges", {}).get(condition, {})
    value = ranges.get(name)
    if isinstance(value, list) and len(value) == 2:
        return [float(value[0]), float(value[1])]
    return None


def finite(value: float) -> float:
    """Replace NaN/inf (constant images, empty regions) by 0 so every metric stays a readable number."""
    return float(value) if math.isfinite(value) else 0.0


def metric(group: str, key: str, value: float, meaning: str, digits: int = 4) -> dict[str, Any]:
    """One readable number (`digits` significant digits) beside the ranges typical of camera photos."""
    name = f"{group}.{key}"
    rounded = float(f"{finite(value):.{digits}g}")
    as_is = camera_range(name, "as_is")
    record: dict[str, Any] = {
        "value": rounded,
        "camera_range": as_is,
        "camera_range_jpeg90": camera_range(name, "jpeg90"),
        "meaning": meaning,
    }
    if as_is is None:
        record["vs_camera"] = "uncalibrated"
    elif rounded < as_is[0]:
        record["vs_camera"] = "below"
    elif rounded > as_is[1]:
        record["vs_camera"] = "above"
    else:
        record["vs_camera"] = "within"
    return record


def summarise(title: str, metrics: dict[str, dict[str, Any]], headline: list[str]) -> str:
    """A sentence a reviewer can read: the headline numbers, then which metrics leave the camera range."""
    parts = []
    for key in headline:
        record = metrics[key]
        rng = record["camera_range"]
        typical = f" (camera {rng[0]:.3g}..{rng[1]:.3g})" if rng else ""
        parts.append(f"{key.replace('_', ' ')} {record['value']:.3g}{typical}")
    outside = [k for k, r in metrics.items() if r["vs_camera"] in {"above", "below"}]
    tail = (
        "all metrics within the range of camera photos"
        if not outside
        else "outside the camera range: " + ", ".join(f"{k} ({metrics[k]['vs_camera']})" for k in outside)
    )
    if all(r["vs_camera"] == "uncalibrated" for r in metrics.values()):
        tail = "camera ranges not calibrated"
    return f"{title}: " + "; ".join(parts) + f". {tail}."
