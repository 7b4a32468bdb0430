"""Colour evidence: cross-channel residual correlation and colour-filter-array (demosaicing) periodicity.

A camera sensor records one colour per pixel through a 2x2 Bayer filter (G R / B G) and interpolates the
other two. Interpolated samples are linear mixtures of their neighbours, so a neighbour-prediction residual
is smaller at interpolated positions than at recorded ones: its magnitude varies with period 2 along rows and
columns (a checkerboard for green, one site in four for red and blue). Images synthesised by a network were
never mosaicked and lack this lattice; their channels' residuals are also correlated differently from a
demosaicked sensor's. Heavy JPEG compression or resizing weakens the lattice, so its absence alone says
little; its presence is real-camera evidence.
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

GROUP = "color"
CHANNELS = ("r", "g", "b")
PAIRS = ((0, 1), (1, 2), (0, 2))
PAIR_NAMES = ("rg", "gb", "rb")
#: Floor added to each 2x2 cell's residual sum (a quarter grey level) so flat regions do not divide by zero.
CELL_FLOOR = 0.25 / 255.0


def _correlations(residuals: Tensor) -> Tensor:
    """Pearson correlation of each pair of channel residuals (B, 3, H, W) -> (B, 3) in `PAIRS` order; 0 when
    a channel is constant."""
    centred = residuals - residuals.mean(dim=(-2, -1), keepdim=True)
    # float32 sums: torch reduces with many partial sums, accurate far beyond the 4 digits reported.
    energy = (centred * centred).sum(dim=(-2, -1)).to(torch.float64)  # (B, 3)
    correlations = []
    for i, j in PAIRS:
        cross = (centred[:, i] * centred[:, j]).sum(dim=(-2, -1)).to(torch.float64)
        denom = (energy[:, i] * energy[:, j]).sqrt()
        correlations.append(torch.where(denom > 0, cross / torch.where(denom > 0, denom, 1.0), 0.0))
    return torch.stack(correlations, dim=1)


def lattice_strength(residuals: Tensor) -> Tensor:
    """Strength of the period-2 (2x2 lattice) pattern in |residual|, one value per (..., H, W) plane: about
    0 = none, 1 = bilinear demosaicing.

    In each 2x2 cell the four |residual| values are divided by the cell's sum, so strong edges weigh no more
    than flat texture; averaging over the cells of a 32 px block gives each lattice site's share of the
    block's residual (1/4 each for noise). The shares are split into their three non-constant Walsh
    components (row parity, column parity, checkerboard), and `debiased_strengths` combines the blocks, so
    the value neither grows with noise nor depends on the image size.
    """
    lead = residuals.shape[:-2]
    rows, cols = residuals.shape[-2] // BLOCK, residuals.shape[-1] // BLOCK
    half_rows, half_cols, cells = rows * BLOCK // 2, cols * BLOCK // 2, BLOCK // 2
    magnitude = residuals[..., : rows * BLOCK, : cols * BLOCK].abs()
    # The four lattice sites of every 2x2 cell as contiguous planes (..., 4, H/2, W/2), in the order
    # (row, column) = (0, 0), (0, 1), (1, 0), (1, 1).
    sites = magnitude.reshape(*lead, half_rows, 2, half_cols, 2)
    sites = sites.movedim((-3, -1), (-4, -3)).reshape(*lead, 4, half_rows, half_cols).contiguous()
    site_shares = sites / (sites.sum(dim=-3, keepdim=True) + CELL_FLOOR)
    # Mean share of each site over the 16 x 16 cells of each 32 px block, in two sums over contiguous runs.
    per_block = site_shares.reshape(*lead, 4, rows, cells, half_cols).sum(dim=-2)
    per_block = per_block.reshape(*lead, 4, rows, cols, cells).sum(dim=-1) / (cells * cells)
    shares = per_block.flatten(-2).transpose(-1, -2)  # (..., n, 4)
    shares = shares.to(torch.float64)
    shares = shares / shares.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    s00, s01, s10, s11 = shares.unbind(dim=-1)
    walsh = torch.stack([s00 + s01 - s10 - s11, s00 - s01 + s10 - s11, s00 - s01 - s10 + s11], dim=-1)
    return debiased_strengths(walsh)


def color_measures(inputs: EvidenceInputs) -> dict[str, Tensor]:
    """The colour metrics of every crop of the batch, each a (B,) tensor on the batch's device."""
    residuals = inputs.channel_residuals  # (B, 3, H, W)
    correlations = _correlations(residuals)
    lattices = lattice_strength(residuals)  # (B, 3)
    measures = {f"residual_corr_{pair}": correlations[:, k] for k, pair in enumerate(PAIR_NAMES)}
    measures.update({f"cfa_{channel}": lattices[:, c] for c, channel in enumerate(CHANNELS)})
    return measures


def color_records(values: dict[str, float]) -> dict[str, Any]:
    """Readable records (value, camera ranges, meaning) of one image's colour metrics, and a summary."""
    metrics: dict[str, dict[str, Any]] = {}
    for pair in PAIR_NAMES:
        metrics[f"residual_corr_{pair}"] = metric(
            GROUP,
            f"residual_corr_{pair}",
            values[f"residual_corr_{pair}"],
            f"correlation of the {pair[0].upper()} and {pair[1].upper()} high-pass residuals",
        )
    for channel in CHANNELS:
        metrics[f"cfa_{channel}"] = metric(
            GROUP,
            f"cfa_{channel}",
            values[f"cfa_{channel}"],
            f"2x2 colour-filter-array lattice strength of the {channel.upper()} residual "
            "(demosaicing trace; <= 0 = none)",
        )
    result: dict[str, Any] = dict(metrics)
    result["summary"] = summarise("Colour residuals", metrics, ["cfa_g", "residual_corr_rg"])
    return result


def color_evidence(crop: FloatArray | EvidenceInputs) -> dict[str, Any]:
    """Colour records of one RGB crop (side >= 64), or of the first crop of a batch."""
    return color_records({key: float(value[0]) for key, value in color_measures(as_inputs(crop)).items()})
