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

from models.evidence._common import (
    BLOCK,
    EvidenceInputs,
    FloatArray,
    as_inputs,
    debiased_strength,
    debiased_strengths,
    metric,
    summarise,
)

GROUP = "grid"
PERIOD = 8
#: First differences are clipped at this many grey levels so strong scene edges do not dominate the folded
#: profiles; the traces looked for are a few grey levels at most.
DIFF_CLIP = np.float32(12.0 / 255.0)
#: Added to mean steps before taking the blockiness ratio (a tenth of a grey level), so a flat image or a
#: block-aligned nearest-neighbour upsample (no steps inside blocks at all) gives a large finite ratio.
STEP_FLOOR = 0.1 / 255.0
#: Period-8 deviations (relative to the mean step) below about this size are noise; the boundary share is
#: damped towards 0 for them instead of dividing noise by noise.
SHARE_FLOOR = 0.01
_BOUNDARY = PERIOD - 1  # index of the difference between columns 8k+7 and 8k+8


def _clipped_steps(plane: FloatArray, axis: int) -> FloatArray:
    """|x[i+1] - x[i]| along `axis` (0: between rows, 1: between columns), clipped, same shape as `plane`.

    The last row or column has no successor; it takes the step 8 places before it, which has the same
    lattice phase, so the phase statistics are unchanged.
    """
    moved = np.moveaxis(plane, axis, 0)  # a view: the steps are taken along its first axis
    steps = np.empty_like(moved)
    inner = steps[:-1]
    np.subtract(moved[1:], moved[:-1], out=inner)
    np.abs(inner, out=inner)
    np.minimum(inner, DIFF_CLIP, out=inner)
    steps[-1] = steps[-1 - PERIOD]
    return np.moveaxis(steps, 0, axis)


def _step_profiles(plane: FloatArray) -> NDArray[np.float64]:
    """(2, n, 32): per 32 px block, the mean step at each of its 32 columns (index 0) and rows (index 1).

    Both axes are reduced in place of the plane, without copying it into blocks or transposing it; block
    order is the same on both axes (row-major over the blocks).
    """
    rows, cols = plane.shape[0] // BLOCK, plane.shape[1] // BLOCK
    height, width = rows * BLOCK, cols * BLOCK
    across_cols = _clipped_steps(plane, axis=1)[:height, :width]
    across_rows = _clipped_steps(plane, axis=0)[:height, :width]
    # (rows, 32, cols*32) averaged over each block's rows -> (rows, cols, 32) column profiles
    col_profiles = across_cols.reshape(rows, BLOCK, width).mean(axis=1, dtype=np.float64)
    # (rows, 32, cols, 32) averaged over each block's columns -> (rows, 32, cols) -> (rows, cols, 32)
    row_profiles = across_rows.reshape(rows, BLOCK, cols, BLOCK).mean(axis=3, dtype=np.float64)
    row_profiles = row_profiles.transpose(0, 2, 1)
    return np.stack([col_profiles.reshape(rows * cols, BLOCK), row_profiles.reshape(rows * cols, BLOCK)])


def _fill_boundary(folded: NDArray[np.float64], phases: tuple[int, ...]) -> NDArray[np.float64]:
    """Replace the JPEG boundary phases of each profile (last axis) of `folded` by the mean of the others."""
    keep = np.ones(folded.shape[-1], dtype=bool)
    keep[list(phases)] = False
    filled = folded.copy()
    filled[..., ~keep] = folded[..., keep].mean(axis=-1, keepdims=True)
    return filled


def _relative_harmonics(folded: NDArray[np.float64]) -> NDArray[np.complex128]:
    """DFT of each block's folded profile over the profile's mean: relative strength of each harmonic."""
    spectrum = np.fft.rfft(folded, axis=-1)
    return np.asarray(spectrum / np.maximum(spectrum[..., :1].real, 1e-12), dtype=np.complex128)


def _axis_measures(profiles: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    """Grid measures of (..., n, 32) step profiles of 32 px blocks, one value per leading index (axis)."""
    fold8 = profiles.reshape(*profiles.shape[:-1], -1, PERIOD).mean(axis=-2)  # (..., n, 8)
    fold16 = profiles.reshape(*profiles.shape[:-1], -1, 2 * PERIOD).mean(axis=-2)  # (..., n, 16)

    others = np.delete(fold8, _BOUNDARY, axis=-1).mean(axis=-1)
    blockiness = np.mean((fold8[..., _BOUNDARY] + STEP_FLOOR) / (others + STEP_FLOOR), axis=-1)
    deviation = fold8 / np.maximum(fold8.mean(axis=-1, keepdims=True), 1e-12) - 1.0
    on_boundary = debiased_strengths(deviation[..., _BOUNDARY : _BOUNDARY + 1])
    all_phases = debiased_strengths(deviation)
    share = np.maximum(on_boundary, 0.0) ** 2 / (np.maximum(all_phases, 0.0) ** 2 + SHARE_FLOOR**2)

    full = _relative_harmonics(fold8)
    clean8 = _relative_harmonics(_fill_boundary(fold8, (_BOUNDARY,)))
    clean16 = _relative_harmonics(_fill_boundary(fold16, (_BOUNDARY, _BOUNDARY + PERIOD)))
    return {
        # Period-8 harmonics of an 8-fold are k = 1 and 3; k = 2 is period 4; k = 4 is period 2.
        "period8": debiased_strengths(full[..., [1, 3]]),
        "period8_off_jpeg": debiased_strengths(clean8[..., [1, 3]]),
        "period4": debiased_strengths(clean8[..., 2:3]),
        "period2": debiased_strengths(clean8[..., 4:5]),
        # Odd harmonics of a 16-fold are the components whose period is 16 and not 8.
        "period16": debiased_strengths(clean16[..., 1::2]),
        "jpeg_blockiness": blockiness,
        "jpeg_phase_share": np.minimum(share, 1.0),
    }


def _interior_variation(luma_residual: FloatArray) -> float:
    """Strength of the 8x8 pattern of |residual| over the 6x6 block-interior phases (1..6 on each axis).

    Each 32 px block's |residual| is folded onto the 8x8 lattice; the interior phases, whose 4-neighbour
    residual never straddles a JPEG block boundary, are taken relative to their mean, and the part a
    2x2-periodic pattern explains is removed (each phase minus the mean of the interior phases with the same
    row and column parity), so a camera's colour-filter lattice does not count as an 8-pixel grid. Blocks are
    combined with `debiased_strength`; the result is an RMS relative deviation per phase.
    """
    rows, cols = luma_residual.shape[0] // BLOCK, luma_residual.shape[1] // BLOCK
    per_block = BLOCK // PERIOD
    residual = np.minimum(np.abs(luma_residual[: rows * BLOCK, : cols * BLOCK]), DIFF_CLIP)
    # Fold in two sums over contiguous runs (much faster than one mean over two strided axes):
    # (rows, 4, 8, width) -> (rows, 8, width) -> (rows, 8, cols, 4, 8) -> (rows, 8, cols, 8)
    folded_rows = residual.reshape(rows, per_block, PERIOD, cols * BLOCK).sum(axis=1)
    folded = folded_rows.reshape(rows, PERIOD, cols, per_block, PERIOD).sum(axis=3)
    folded = folded.transpose(0, 2, 1, 3).reshape(-1, PERIOD, PERIOD)  # (n, 8, 8), sums of 16 values
    interior = folded[:, 1:-1, 1:-1].astype(np.float64)
    relative = interior / np.maximum(interior.mean(axis=(1, 2), keepdims=True), 1e-12)
    beyond_lattice = relative.copy()
    for dy in (0, 1):
        for dx in (0, 1):
            beyond_lattice[:, dy::2, dx::2] -= relative[:, dy::2, dx::2].mean(axis=(1, 2), keepdims=True)
    return debiased_strength(beyond_lattice.reshape(len(beyond_lattice), -1)) / 6.0


def grid_evidence(crop: FloatArray | EvidenceInputs) -> dict[str, Any]:
    """Grid metrics of an RGB crop whose origin is on the 8x8 JPEG lattice. Returns records plus `summary`."""
    inputs = as_inputs(crop)
    per_axis = _axis_measures(_step_profiles(inputs.luma))  # index 0: across columns, 1: across rows
    combined = {key: 0.5 * float(values[0] + values[1]) for key, values in per_axis.items()}

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
        _interior_variation(inputs.luma_residual),
        "variation of residual energy over the 6x6 block-interior phases (decoder grid, no JPEG boundary)",
    )
    result: dict[str, Any] = dict(metrics)
    result["summary"] = summarise("8-pixel grid", metrics, ["period8_off_jpeg", "jpeg_blockiness"])
    return result
