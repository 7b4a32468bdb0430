"""Hand-made forensic evidence: spectral, colour and grid measures of the pixels, and file provenance.

`pixel_evidence(rgb)` returns readable metric records grouped as "spectral", "color" and "grid", each number
beside the range typical of camera photos; `evidence_features(evidence)` turns them into a fixed-order
float32 vector (`FEATURE_NAMES`) for the learned model to fuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from models.evidence._common import ANALYSIS_SIDE, EvidenceInputs
from models.evidence.color import color_measures, color_records
from models.evidence.grid import grid_measures, grid_records
from models.evidence.provenance import read_provenance
from models.evidence.spectral import spectral_measures, spectral_records
from models.preprocess import center_crop

__all__ = [
    "ANALYSIS_SIDE",
    "EVIDENCE_VERSION",
    "FEATURE_NAMES",
    "evidence_crop",
    "evidence_features",
    "pixel_evidence",
    "pixel_evidence_batch",
    "read_provenance",
]

#: Changes whenever a metric's definition (and so its values) changes while its name stays: a fusion layer
#: fitted on features of another version must be refitted. Weights can store it beside FEATURE_NAMES.
EVIDENCE_VERSION = "2026-11-26.3"

#: Order of `evidence_features`. Names are "<group>.<metric>" as in `pixel_evidence`.
FEATURE_NAMES: tuple[str, ...] = (
    "spectral.residual_level",
    "spectral.mid_energy",
    "spectral.high_energy",
    "spectral.peak_count",
    "spectral.peak_strength",
    "color.residual_corr_rg",
    "color.residual_corr_gb",
    "color.residual_corr_rb",
    "color.cfa_r",
    "color.cfa_g",
    "color.cfa_b",
    "grid.period2",
    "grid.period4",
    "grid.period8",
    "grid.period8_off_jpeg",
    "grid.period16",
    "grid.jpeg_blockiness",
    "grid.jpeg_phase_share",
    "grid.interior_var8",
)

# Heavy-tailed metrics are compressed with log1p in the feature vector so a linear fusion layer sees them on a
# scale comparable to the others; the evidence dict keeps the plain values for reviewers.
_LOG1P_FEATURES = frozenset({"spectral.residual_level", "spectral.peak_count", "grid.jpeg_blockiness"})


def pixel_evidence(
    rgb: NDArray[np.float32], grid_offset: tuple[int, int] = (0, 0)
) -> dict[str, dict[str, Any]]:
    """Spectral, colour and grid evidence for float32 RGB pixels in [0, 1] (from `preprocess.to_rgb_array`).

    Reads one centre crop of at most 512x512 whose origin lies on the 8x8 lattice (`grid_offset` is
    `PreparedImage.grid_offset` when EXIF rotation moved it); the image is never resized. Computed on the CPU;
    `pixel_evidence_batch` does many crops at once on any device.

    Raises:
        ImageTooSmallError: a side is below `preprocess.MIN_SIDE`.
    """
    return pixel_evidence_batch([evidence_crop(rgb, grid_offset)])[0]


def evidence_crop(rgb: NDArray[np.float32], grid_offset: tuple[int, int] = (0, 0)) -> NDArray[np.float32]:
    """The part of an image the pixel evidence reads: its centre crop of at most `ANALYSIS_SIDE` px, origin on
    the 8x8 lattice (a view, never resized).

    Raises:
        ImageTooSmallError: a side is below `preprocess.MIN_SIDE`.
    """
    return center_crop(rgb, ANALYSIS_SIDE, grid_offset)


Measures = Callable[[EvidenceInputs], dict[str, torch.Tensor]]
Records = Callable[[dict[str, float]], dict[str, Any]]
#: Each group's measures (tensors, one value per crop of a batch) and its readable records (one image).
_GROUPS: dict[str, tuple[Measures, Records]] = {
    "spectral": (spectral_measures, spectral_records),
    "color": (color_measures, color_records),
    "grid": (grid_measures, grid_records),
}


def pixel_evidence_batch(
    crops: Sequence[NDArray[np.float32]], device: torch.device | str = "cpu"
) -> list[dict[str, dict[str, Any]]]:
    """`pixel_evidence` of many `evidence_crop`s, in order. Crops of the same size are stacked and measured
    together on `device` (a GPU detector measures its whole batch there); the numbers come back to the CPU
    once per size."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, crop in enumerate(crops):
        by_shape.setdefault(tuple(crop.shape), []).append(index)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for indices in by_shape.values():
        inputs = EvidenceInputs.of([crops[i] for i in indices], device)
        groups = {name: measures(inputs) for name, (measures, _) in _GROUPS.items()}
        names = [(group, key) for group, values in groups.items() for key in values]
        table = torch.stack([groups[group][key].to(torch.float64) for group, key in names], dim=1).cpu()
        for row, index in zip(table.tolist(), indices, strict=True):
            values: dict[str, dict[str, float]] = {group: {} for group in groups}
            for (group, key), value in zip(names, row, strict=True):
                values[group][key] = value
            results[index] = {group: _GROUPS[group][1](values[group]) for group in groups}
    return [results[index] for index in range(len(crops))]


def evidence_features(evidence: dict[str, dict[str, Any]]) -> NDArray[np.float32]:
    """Fixed-order float32 vector (`FEATURE_NAMES`) of the metrics in a `pixel_evidence` result.

    Missing or non-finite metrics become 0; `_LOG1P_FEATURES` are log1p-compressed.
    """
    values = np.zeros(len(FEATURE_NAMES), dtype=np.float32)
    for index, name in enumerate(FEATURE_NAMES):
        group, key = name.split(".", 1)
        record = evidence.get(group, {}).get(key)
        value = record.get("value") if isinstance(record, dict) else None
        if not isinstance(value, int | float) or not math.isfinite(value):
            continue
        number = float(value)
        if name in _LOG1P_FEATURES:
            number = math.log1p(max(number, 0.0))
        values[index] = number
    return values
