"""Shared helpers of the pixel evidence: residuals, metric records with camera ranges, summaries."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

FloatArray = NDArray[np.float32]

#: Pixel evidence reads at most this much of the image: a centre crop, never a resize.
ANALYSIS_SIDE = 512

RANGES_PATH = Path(__file__).with_name("camera_ranges.json")

log = logging.getLogger(__name__)


def luminance(planes: Tensor) -> Tensor:
    """Rec. 601 luma of (..., 3, H, W) planes: JPEG codes this channel at full resolution, so block traces
    live here."""
    return 0.299 * planes[..., 0, :, :] + 0.587 * planes[..., 1, :, :] + 0.114 * planes[..., 2, :, :]


def laplacian_residual(planes: Tensor) -> Tensor:
    """x - mean(4 neighbours) of every (..., H, W) plane: a fixed high-pass predictor residual, same shape.

    A linear interpolator (bilinear demosaicing, upsampling followed by smoothing) makes this residual
    exactly or nearly zero at interpolated positions, which is what the periodicity measures look for; scene
    content mostly cancels. Borders are edge-replicated so the residual keeps the plane's shape and its pixel
    coordinates (the lattice phases stay where they are, and a 64 px image still fills a 64 px tile).
    """
    # Accumulated in place, edge replication included, instead of summing shifted views of a padded copy:
    # on the CPU that runs about five times faster, and gives the same numbers.
    neighbours = torch.empty_like(planes)
    neighbours[..., 1:, :] = planes[..., :-1, :]
    neighbours[..., 0, :] = planes[..., 0, :]
    neighbours[..., :-1, :] += planes[..., 1:, :]
    neighbours[..., -1, :] += planes[..., -1, :]
    neighbours[..., :, 1:] += planes[..., :, :-1]
    neighbours[..., :, 0] += planes[..., :, 0]
    neighbours[..., :, :-1] += planes[..., :, 1:]
    neighbours[..., :, -1] += planes[..., :, -1]
    return neighbours.mul_(-0.25).add_(planes)


class EvidenceInputs:
    """A batch of same-size RGB crops on one device, and the arrays several evidence groups need from them
    (luma, residuals), each computed once."""

    def __init__(self, planes: Tensor) -> None:
        """`planes`: (B, 3, H, W) float32 in [0, 1], on the device to compute on."""
        self.planes = planes.to(torch.float32).contiguous()

    @classmethod
    def of(cls, crops: Sequence[FloatArray], device: torch.device | str = "cpu") -> EvidenceInputs:
        """Inputs for same-size (H, W, 3) float32 crops (numpy), stacked on `device`."""
        # One copy into planar (B, 3, H, W) layout, straight from the (possibly strided) crop views.
        planes = np.stack([np.asarray(c, dtype=np.float32).transpose(2, 0, 1) for c in crops])
        return cls(torch.from_numpy(planes).to(device))

    @cached_property
    def luma(self) -> Tensor:
        return luminance(self.planes)  # (B, H, W)

    @cached_property
    def luma_residual(self) -> Tensor:
        return laplacian_residual(self.luma)  # (B, H, W)

    @cached_property
    def channel_residuals(self) -> Tensor:
        return laplacian_residual(self.planes)  # (B, 3, H, W)


def as_inputs(crop: FloatArray | EvidenceInputs) -> EvidenceInputs:
    """`crop` itself, or a batch of one for a single (H, W, 3) crop (on the CPU)."""
    return crop if isinstance(crop, EvidenceInputs) else EvidenceInputs.of([crop])


@lru_cache(maxsize=1)
def _load_ranges() -> dict[str, Any]:
    try:
        loaded = json.loads(RANGES_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        # The file ships with the package: without it the evidence still works, but a reviewer should know
        # why every number says "uncalibrated".
        log.warning("camera ranges not loaded (%s); evidence is shown uncalibrated", exc)
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


def blocks(planes: Tensor, side: int = BLOCK) -> Tensor:
    """Non-overlapping side x side blocks of (..., H, W) planes, as (..., n_blocks, side, side).

    Rows and columns that do not fill a block are dropped; blocks are in row-major order. Block origins are
    multiples of `side` (itself a multiple of 8), so every block sees the JPEG and colour-filter lattices at
    the same phase as the crop.
    """
    rows, cols = planes.shape[-2] // side, planes.shape[-1] // side
    lead = planes.shape[:-2]
    cut = planes[..., : rows * side, : cols * side]
    tiled = cut.reshape(*lead, rows, side, cols, side).transpose(-3, -2)
    # A contiguous copy: elementwise work on the permuted view would run several times slower on the CPU.
    return tiled.reshape(*lead, rows * cols, side, side).contiguous()


def debiased_strengths(per_block: Tensor) -> Tensor:
    """Norm of the component shared by all blocks, without the upward bias noise gives a norm.

    `per_block` is (..., n_blocks, k): for each leading index, one (possibly complex) k-vector per block, e.g.
    the period-8 harmonic of each block's folded profile. The squared norm of their mean is biased up by noise
    (by variance/n, so it depends on the number of blocks); the mean of the cross products between different
    blocks is not. Returns, per leading index, the signed square root of that unbiased estimate: about 0
    (either sign) when blocks share no pattern, whatever the image size, and the pattern's amplitude when
    they do.
    """
    n = per_block.shape[-2]
    power = per_block.abs() ** 2
    if n < 2:
        own = power.sum(dim=(-2, -1)).sqrt()
        return own if n == 1 else torch.zeros_like(own)
    shared = per_block.sum(dim=-2).abs() ** 2
    cross = (shared.sum(dim=-1) - power.sum(dim=(-2, -1))) / (n * (n - 1))
    return cross.sign() * cross.abs().sqrt()


def debiased_strength(per_block: NDArray[Any]) -> float:
    """`debiased_strengths` of one set of blocks given as a numpy array: (n_blocks, k), or (n_blocks,)."""
    values = torch.from_numpy(np.asarray(per_block))
    return float(debiased_strengths(values[:, None] if values.ndim == 1 else values))
