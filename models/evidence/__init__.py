"""Hand-made forensic evidence: spectral, colour and grid measures of the pixels, and file provenance.

`pixel_evidence(rgb)` returns readable metric records grouped as "spectral", "color" and "grid", each number
beside the range typical of camera photos; `evidence_features(evidence)` turns them into a fixed-order
float32 vector (`FEATURE_NAMES`) for the learned model to fuse.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.evidence._common import ANALYSIS_SIDE, EvidenceInputs
from models.evidence.color import color_evidence
from models.evidence.grid import grid_evidence
from models.evidence.provenance import read_provenance
from models.evidence.spectral import spectral_evidence
from models.preprocess import center_crop

__all__ = [
    "ANALYSIS_SIDE",
    "EVIDENCE_VERSION",
    "FEATURE_NAMES",
    "evidence_features",
    "pixel_evidence",
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
    `PreparedImage.grid_offset` when EXIF rotation moved it); the image is never resized.

    Raises:
        ImageTooSmallError: a side is below `preprocess.MIN_SIDE`.
    """
    inputs = EvidenceInputs(center_crop(rgb, ANALYSIS_SIDE, grid_offset))
    return {
        "spectral": spectral_evidence(inputs),
        "color": color_evidence(inputs),
        "grid": grid_evidence(inputs),
    }


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
