"""Shared helpers of the pixel evidence: residuals, metric records with camera ranges, summaries."""

from __future__ import annotations

import json
import math
from functools import cached_property, lru_cache
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
    # Element-wise, not `rgb @ weights`: a matrix product goes to OpenBLAS, which starts a thread per core in
    # every process, and many detector processes on one machine (a GPU worker) then fight over the cores.
    r, g, b = (rgb[..., c].astype(np.float32, copy=False) for c in range(3))
    return np.asarray(np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b, dtype=np.float32)


def laplacian_residual(plane: FloatArray) -> FloatArray:
    """x - mean(4 neighbours): a fixed high-pass predictor residual, same shape as the 2D `plane`.

    A linear interpolator (bilinear demosaicing, upsampling followed by smoothing) makes this residual
    exactly or nearly zero at interpolated positions, which is what the periodicity measures look for; scene
    content mostly cancels. Borders are edge-replicated so the residual keeps the plane's shape and its pixel
    coordinates (the lattice phases stay where they are, and a 64 px image still fills a 64 px tile).
    """
    padded = np.pad(plane, 1, mode="edge")
    # In-place accumulation: one temporary instead of four (this runs four times per image).
    out = padded[:-2, 1:-1] + padded[2:, 1:-1]
    out += padded[1:-1, :-2]
    out += padded[1:-1, 2:]
    out *= np.float32(-0.25)
    out += plane
    return np.asarray(out, dtype=np.float32)


class EvidenceInputs:
    """The arrays several evidence groups need, computed once per crop (luma, residuals)."""

    def __init__(self, crop: FloatArray) -> None:
        self.crop = np.asarray(crop, dtype=np.float32)

    @cached_property
    def planes(self) -> FloatArray:
        """The crop's channels as contiguous (3, H, W) planes: one copy serves luma and every residual."""
        return np.ascontiguousarray(self.crop.transpose(2, 0, 1))

    @cached_property
    def luma(self) -> FloatArray:
        return luminance(self.planes.transpose(1, 2, 0))

    @cached_property
    def luma_residual(self) -> FloatArray:
        return laplacian_residual(self.luma)

    @cached_property
    def channel_residuals(self) -> list[FloatArray]:
        return [laplacian_residual(plane) for plane in self.planes]


def as_inputs(crop: FloatArray | EvidenceInputs) -> EvidenceInputs:
    return crop if isinstance(crop, EvidenceInputs) else EvidenceInputs(crop)


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


#: Side of the blocks the periodicity measures are computed in. Every measure is estimated per block and then
#: combined across blocks with `debiased_strength`, so its expected value does not depend on how many blocks
#: an image has: a 128 px thumbnail and a 512 px crop of the same kind of image read the same on average
#: (otherwise the measures would partly encode image size, a known shortcut on the dev set). 32 px gives at
#: least 4 blocks at the 64 px minimum, and holds 4 periods of 8 and 2 of 16.
BLOCK = 32


def blocks(plane: FloatArray, side: int = BLOCK) -> FloatArray:
    """Non-overlapping side x side blocks of a 2D array (rows and columns that do not fill a block are
    dropped).

    Shape (n_blocks, side, side). Block origins are multiples of `side` (itself a multiple of 8), so every
    block sees the JPEG and colour-filter lattices at the same phase as the crop.
    """
    rows, cols = plane.shape[0] // side, plane.shape[1] // side
    cut = plane[: rows * side, : cols * side]
    return np.ascontiguousarray(
        cut.reshape(rows, side, cols, side).transpose(0, 2, 1, 3).reshape(-1, side, side)
    )


def debiased_strengths(per_block: NDArray[Any]) -> NDArray[np.float64]:
    """Norm of the component shared by all blocks, without the upward bias noise gives a norm.

    `per_block` is (..., n_blocks, k): for each leading index, one (possibly complex) k-vector per block, e.g.
    the period-8 harmonic of each block's folded profile. The squared norm of their mean is biased up by noise
    (by variance/n, so it depends on the number of blocks); the mean of the cross products between different
    blocks is not. Returns, per leading index, the signed square root of that unbiased estimate: about 0
    (either sign) when blocks share no pattern, whatever the image size, and the pattern's amplitude when
    they do.
    """
    values = np.asarray(per_block)
    n = values.shape[-2]
    if n < 2:
        own = np.sqrt(np.sum(np.abs(values) ** 2, axis=(-2, -1)))
        return np.asarray(own if n == 1 else np.zeros_like(own), dtype=np.float64)
    total = values.sum(axis=-2)
    cross = (np.sum(np.abs(total) ** 2, axis=-1) - np.sum(np.abs(values) ** 2, axis=(-2, -1))) / (n * (n - 1))
    return np.asarray(np.sign(cross) * np.sqrt(np.abs(cross)), dtype=np.float64)


def debiased_strength(per_block: NDArray[Any]) -> float:
    """`debiased_strengths` of one set of blocks: (n_blocks, k), or (n_blocks,) for k = 1."""
    values = np.asarray(per_block)
    return float(debiased_strengths(values[:, None] if values.ndim == 1 else values))
