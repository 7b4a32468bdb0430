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

import torch
from torch import Tensor

from models.evidence._common import (
    BLOCK,
    EvidenceInputs,
    FloatArray,
    as_inputs,
    debiased_strengths,
    metric,
    summarise,
)

GROUP = "grid"
PERIOD = 8
#: First differences are clipped at this many grey levels so strong scene edges do not dominate the folded
#: profiles; the traces looked for are a few grey levels at most.
DIFF_CLIP = 12.0 / 255.0
#: Added to mean steps before taking the blockiness ratio (a tenth of a grey level), so a flat image or a
#: block-aligned nearest-neighbour upsample (no steps inside blocks at all) gives a large finite ratio.
STEP_FLOOR = 0.1 / 255.0
#: Period-8 deviations (relative to the mean step) below about this size are noise; the boundary share is
#: damped towards 0 for them instead of dividing noise by noise.
SHARE_FLOOR = 0.01
_BOUNDARY = PERIOD - 1  # index of the difference between columns 8k+7 and 8k+8


def _clipped_steps(planes: Tensor, dim: int) -> Tensor:
    """|x[i+1] - x[i]| along `dim` of (..., H, W) planes (-2: between rows, -1: between columns), clipped.

    The last row or column has no successor; it takes the step 8 places before it, which has the same
    lattice phase, so the phase statistics are unchanged.
    """
    length = planes.shape[dim]
    inner = (planes.narrow(dim, 1, length - 1) - planes.narrow(dim, 0, length - 1)).abs().clamp_max(DIFF_CLIP)
    return torch.cat([inner, inner.narrow(dim, length - 1 - PERIOD, 1)], dim=dim)


def _step_profiles(luma: Tensor) -> Tensor:
    """(B, 2, n, 32) float64: per 32 px block, the mean step at each of its 32 columns (index 0 of dim 1) and
    rows (index 1), for (B, H, W) luma. Blocks are in row-major order on both axes."""
    batch = luma.shape[0]
    rows, cols = luma.shape[-2] // BLOCK, luma.shape[-1] // BLOCK
    height, width = rows * BLOCK, cols * BLOCK
    across_cols = _clipped_steps(luma, dim=-1)[:, :height, :width]
    across_rows = _clipped_steps(luma, dim=-2)[:, :height, :width]
    # (B, rows, 32, cols, 32): column profiles average over each block's rows, row profiles over its columns.
    col_profiles = across_cols.reshape(batch, rows, BLOCK, cols, BLOCK).mean(dim=2, dtype=torch.float64)
    row_profiles = across_rows.reshape(batch, rows, BLOCK, cols, BLOCK).mean(dim=4, dtype=torch.float64)
    row_profiles = row_profiles.transpose(2, 3)  # (B, rows, cols, 32)
    return torch.stack(
        [col_profiles.reshape(batch, rows * cols, BLOCK), row_profiles.reshape(batch, rows * cols, BLOCK)],
        dim=1,
    )


def _fill_boundary(folded: Tensor, phases: tuple[int, ...]) -> Tensor:
    """Replace the JPEG boundary phases of each profile (last dim) of `folded` by the mean of the others."""
    keep = torch.ones(folded.shape[-1], dtype=torch.bool, device=folded.device)
    keep[list(phases)] = False
    filled = folded.clone()
    filled[..., ~keep] = folded[..., keep].mean(dim=-1, keepdim=True)
    return filled


def _relative_harmonics(folded: Tensor) -> Tensor:
    """DFT of each block's folded profile over the profile's mean: relative strength of each harmonic."""
    spectrum: Tensor = torch.fft.rfft(folded, dim=-1)
    return spectrum / spectrum[..., :1].real.clamp_min(1e-12)


def _axis_measures(profiles: Tensor) -> dict[str, Tensor]:
    """Grid measures of (..., n, 32) step profiles of 32 px blocks, one value per leading index."""
    lead = profiles.shape[:-1]
    fold8 = profiles.reshape(*lead, -1, PERIOD).mean(dim=-2)  # (..., n, 8)
    fold16 = profiles.reshape(*lead, -1, 2 * PERIOD).mean(dim=-2)  # (..., n, 16)

    others = fold8[..., :_BOUNDARY].mean(dim=-1)  # the boundary is the last of the 8 phases
    blockiness = ((fold8[..., _BOUNDARY] + STEP_FLOOR) / (others + STEP_FLOOR)).mean(dim=-1)
    deviation = fold8 / fold8.mean(dim=-1, keepdim=True).clamp_min(1e-12) - 1.0
    on_boundary = debiased_strengths(deviation[..., _BOUNDARY : _BOUNDARY + 1])
    all_phases = debiased_strengths(deviation)
    share = on_boundary.clamp_min(0.0) ** 2 / (all_phases.clamp_min(0.0) ** 2 + SHARE_FLOOR**2)

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
        "jpeg_phase_share": share.clamp_max(1.0),
    }


def _interior_variation(luma_residual: Tensor) -> Tensor:
    """Strength of the 8x8 pattern of |residual| over the 6x6 block-interior phases (1..6 on each axis), per
    (B, H, W) plane.

    Each 32 px block's |residual| is folded onto the 8x8 lattice; the interior phases, whose 4-neighbour
    residual never straddles a JPEG block boundary, are taken relative to their mean, and the part a
    2x2-periodic pattern explains is removed (each phase minus the mean of the interior phases with the same
    row and column parity), so a camera's colour-filter lattice does not count as an 8-pixel grid. Blocks are
    combined with `debiased_strengths`; the result is an RMS relative deviation per phase.
    """
    batch = luma_residual.shape[0]
    rows, cols = luma_residual.shape[-2] // BLOCK, luma_residual.shape[-1] // BLOCK
    per_block = BLOCK // PERIOD
    residual = luma_residual[:, : rows * BLOCK, : cols * BLOCK].abs().clamp_max(DIFF_CLIP)
    # Folded in two sums over contiguous runs, much faster than one reduction over two strided dims:
    # (B, rows, 4, 8, W) -> (B, rows, 8, W) = (B, rows, 8, cols, 4, 8) -> (B, rows, 8, cols, 8)
    folded = residual.reshape(batch, rows, per_block, PERIOD, cols * BLOCK).sum(dim=2)
    folded = folded.reshape(batch, rows, PERIOD, cols, per_block, PERIOD).sum(dim=4)
    folded = folded.permute(0, 1, 3, 2, 4).reshape(batch, rows * cols, PERIOD, PERIOD)  # sums of 16 values
    interior = folded[..., 1:-1, 1:-1].to(torch.float64)
    relative = interior / interior.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    beyond_lattice = relative.clone()
    for dy in (0, 1):
        for dx in (0, 1):
            beyond_lattice[..., dy::2, dx::2] -= relative[..., dy::2, dx::2].mean(dim=(-2, -1), keepdim=True)
    return debiased_strengths(beyond_lattice.flatten(-2)) / 6.0


def grid_measures(inputs: EvidenceInputs) -> dict[str, Tensor]:
    """The grid metrics of every crop of the batch (origins on the 8x8 JPEG lattice), each a (B,) tensor."""
    per_axis = _axis_measures(_step_profiles(inputs.luma))  # (B, 2): across columns, across rows
    measures = {key: 0.5 * (values[:, 0] + values[:, 1]) for key, values in per_axis.items()}
    measures["interior_var8"] = _interior_variation(inputs.luma_residual)
    return measures


MEANINGS = {
    "period2": "period-2 strength of the luma difference profile (JPEG boundary phase excluded)",
    "period4": "period-4 strength of the luma difference profile (JPEG boundary phase excluded)",
    "period8": "period-8 strength of the luma difference profile, all phases (decoder grid + JPEG)",
    "period8_off_jpeg": "period-8 strength, JPEG block-boundary phase excluded (decoder grid, not JPEG)",
    "period16": "period-16 strength not explained by period 8 (JPEG boundary phases excluded)",
    "jpeg_blockiness": "luma step at the 8x8 JPEG block boundary / mean step elsewhere (1 = no blocking)",
    "jpeg_phase_share": "share of the period-8 pattern on the JPEG block boundary (1 = pure blocking)",
    "interior_var8": "variation of residual energy over the 6x6 block-interior phases (decoder grid, no JPEG "
    "boundary)",
}


def grid_records(values: dict[str, float]) -> dict[str, Any]:
    """Readable records (value, camera ranges, meaning) of one image's grid metrics, and a summary."""
    metrics = {key: metric(GROUP, key, values[key], meaning) for key, meaning in MEANINGS.items()}
    result: dict[str, Any] = dict(metrics)
    result["summary"] = summarise("8-pixel grid", metrics, ["period8_off_jpeg", "jpeg_blockiness"])
    return result


def grid_evidence(crop: FloatArray | EvidenceInputs) -> dict[str, Any]:
    """Grid records of one RGB crop whose origin is on the 8x8 JPEG lattice, or of the first of a batch."""
    return grid_records({key: float(value[0]) for key, value in grid_measures(as_inputs(crop)).items()})
