"""Grid evidence: periodicity with period 8 (and 2, 4, 16) left by decoders that upsample 8x.

Latent-diffusion decoders turn each latent cell into an 8x8 pixel block through nearest-neighbour or
transposed- convolution upsampling and convolutions, so pixel statistics repeat every 8 pixels (and every 2
and 4 from the intermediate 2x stages; 16 for some newer autoencoders). JPEG also works on an 8x8 lattice,
and under a JPEG-matched comparison both classes carry JPEG blocking, so a bare "period-8 energy" would
mostly measure JPEG. This module splits the period-8 pattern by phase:

* The crop starts on the JPEG lattice (preprocess aligns offsets to multiples of 8, using the lattice phase
  after EXIF rotation), so JPEG block boundaries sit between columns 8k+7 and 8k+8 of the crop. JPEG's
  blocking shows as an excess of the luma first difference exactly at that boundary phase: `jpeg_blockiness`.
* `period8_off_jpeg`, `period4`, `period2` and `period16` are measured with the boundary phase replaced by
  the mean of the others, so they only see variation among the seven (fifteen) non-boundary phases: a
  decoder's in-block pattern, which JPEG blocking alone barely produces.
* `interior_var8` does the same in 2D: it compares the residual energy of the 6x6 block-interior phases, whose
  neighbour residual never straddles a JPEG block boundary.
* `jpeg_phase_share` says how much of the period-8 pattern sits on the JPEG boundary phase (1 = all of it, as
  for pure JPEG blocking or a block-aligned nearest-neighbour upsample).
JPEG's quantised DCT basis does add some in-block structure at low quality, so this separation is partial;
its camera ranges are calibrated both as-is and after JPEG q90 re-encoding (see calibrate_ranges.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.evidence._common import FloatArray, laplacian_residual, luminance, metric, summarise

GROUP = "grid"
PERIOD = 8
#: First differences are clipped at this many grey levels so strong scene edges do not dominate the folded
#: profiles; the traces looked for are a few grey levels at most.
DIFF_CLIP = np.float32(12.0 / 255.0)
_BOUNDARY = PERIOD - 1  # index of the difference between columns 8k+7 and 8k+8


def _fold(profile: FloatArray, period: int) -> FloatArray:
    usable = (len(profile) // period) * period
    return np.asarray(profile[:usable].reshape(-1, period).mean(axis=0), dtype=np.float32)


def _without_boundary(folded: FloatArray, boundary_phases: tuple[int, ...]) -> FloatArray:
    keep = np.ones(len(folded), dtype=bool)
    keep[list(boundary_phases)] = False
    filled = folded.astype(np.float64).copy()
    filled[~keep] = filled[keep].mean()
    return np.asarray(filled, dtype=np.float32)


def _harmonics(folded: FloatArray) -> NDArray[np.float64]:
    """|DFT| of a folded profile divided by its mean (DC): relative strength of each harmonic."""
    spectrum = np.abs(np.fft.rfft(folded.astype(np.float64)))
    return np.asarray(spectrum / max(float(spectrum[0]), 1e-12), dtype=np.float64)


def _axis_measures(diff_profile: FloatArray) -> dict[str, float]:
    fold8 = _fold(diff_profile, PERIOD)
    fold16 = _fold(diff_profile, 2 * PERIOD)
    others = np.delete(fold8, _BOUNDARY)
    other_mean = float(others.mean())
    blockiness = float(fold8[_BOUNDARY]) / other_mean if other_mean > 0 else 1.0
    deviation = fold8.astype(np.float64) - float(fold8.mean())
    dev_energy = float(np.sum(deviation**2))
    boundary_share = float(deviation[_BOUNDARY] ** 2) / dev_energy if dev_energy > 0 else 0.0

    full = _harmonics(fold8)
    clean8 = _harmonics(_without_boundary(fold8, (_BOUNDARY,)))
    clean16 = _harmonics(_without_boundary(fold16, (_BOUNDARY, _BOUNDARY + PERIOD)))
    return {
        # Period-8 harmonics of an 8-fold are k = 1 and 3; k = 2 is period 4; k = 4 is period 2.
        "period8": float(np.hypot(full[1], full[3])),
        "period8_off_jpeg": float(np.hypot(clean8[1], clean8[3])),
        "period4": float(clean8[2]),
        "period2": float(clean8[4]),
        # Odd harmonics of a 16-fold are the components whose period is 16 and not 8.
        "period16": float(np.sqrt(np.sum(clean16[1::2] ** 2))),
        "jpeg_blockiness": blockiness,
        "jpeg_phase_share": boundary_share,
    }


def _interior_variation(plane: FloatArray) -> float:
    """Variation of mean |residual| over the 6x6 block-interior phases (1..6 on each axis), relative to its
    mean.

    The part a 2x2-periodic pattern explains is removed first (each phase minus the mean of the interior
    phases with the same row and column parity), so a camera's colour-filter lattice does not count as an
    8-pixel grid.
    """
    residual = np.abs(laplacian_residual(plane))
    residual = np.minimum(residual, DIFF_CLIP)
    # residual[i, j] belongs to pixel (i+1, j+1): pad one row/column in front so indices are pixel phases.
    h, w = residual.shape
    rows, cols = (h + 1) // PERIOD, (w + 1) // PERIOD
    padded = np.zeros((rows * PERIOD, cols * PERIOD), dtype=np.float32)
    take_h, take_w = min(h, rows * PERIOD - 1), min(w, cols * PERIOD - 1)
    padded[1 : 1 + take_h, 1 : 1 + take_w] = residual[:take_h, :take_w]
    phases = padded.reshape(rows, PERIOD, cols, PERIOD).mean(axis=(0, 2))[1:-1, 1:-1].astype(np.float64)
    mean = float(phases.mean())
    if mean <= 0:
        return 0.0
    beyond_lattice = phases.copy()
    for dy in (0, 1):
        for dx in (0, 1):
            beyond_lattice[dy::2, dx::2] -= phases[dy::2, dx::2].mean()
    return float(np.sqrt(np.mean(beyond_lattice**2))) / mean


def grid_evidence(crop: FloatArray) -> dict[str, Any]:
    """Grid metrics of an RGB crop whose origin is on the 8x8 JPEG lattice. Returns records plus `summary`."""
    plane = luminance(crop)
    dx = np.minimum(np.abs(np.diff(plane, axis=1)), DIFF_CLIP).mean(axis=0)
    dy = np.minimum(np.abs(np.diff(plane, axis=0)), DIFF_CLIP).mean(axis=1)
    across_cols = _axis_measures(np.asarray(dx, dtype=np.float32))
    across_rows = _axis_measures(np.asarray(dy, dtype=np.float32))
    combined = {key: 0.5 * (across_cols[key] + across_rows[key]) for key in across_cols}

    meanings = {
        "period2": "period-2 strength of the luma difference profile (JPEG boundary phase excluded)",
        "period4": "period-4 strength of the luma difference profile (JPEG boundary phase excluded)",
        "period8": "period-8 strength of the luma difference profile, all phases (decoder grid + JPEG)",
        "period8_off_jpeg": "period-8 strength, JPEG block-boundary phase excluded (decoder grid, not JPEG)",
        "period16": "period-16 strength not explained by period 8 (JPEG boundary phases excluded)",
        "jpeg_blockiness": "luma step at the 8x8 JPEG block boundary / mean step elsewhere (1 = no blocking)",
        "jpeg_phase_share": "share of the period-8 pattern on the JPEG block boundary (1 = pure blocking)",
    }
    metrics = {key: metric(GROUP, key, combined[key], meanings[key]) for key in meanings}
    metrics["interior_var8"] = metric(
        GROUP,
        "interior_var8",
        _interior_variation(plane),
        "variation of residual energy over the 6x6 block-interior phases (decoder grid, no JPEG boundary)",
    )
    result: dict[str, Any] = dict(metrics)
    result["summary"] = summarise("8-pixel grid", metrics, ["period8_off_jpeg", "jpeg_blockiness"])
    return result
