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

import math
from typing import Any

import numpy as np

from models.evidence._common import (
    EvidenceInputs,
    FloatArray,
    as_inputs,
    blocks,
    debiased_strength,
    metric,
    summarise,
)

GROUP = "color"
CHANNELS = ("r", "g", "b")
PAIRS = ((0, 1), (1, 2), (0, 2))
#: Floor added to each 2x2 cell's residual sum (a quarter grey level) so flat regions do not divide by zero.
CELL_FLOOR = np.float32(0.25 / 255.0)


def _correlations(residuals: list[FloatArray]) -> dict[str, float]:
    """Pearson correlation of each pair of channel residuals ("rg", "gb", "rb"); 0 when one is constant."""
    # Each residual is centred and its sum of squares taken once, for all three pairs. Sums of products
    # rather than np.dot, which would go to (multi-threaded) BLAS; see `luminance`.
    centred = [(r - r.mean()).ravel() for r in residuals]
    energy = [float(np.sum(c * c, dtype=np.float64)) for c in centred]
    correlations = {}
    for (i, j), pair in zip(PAIRS, ("rg", "gb", "rb"), strict=True):
        denom = math.sqrt(energy[i] * energy[j])
        cross = float(np.sum(centred[i] * centred[j], dtype=np.float64))
        correlations[pair] = cross / denom if denom > 0 else 0.0
    return correlations


def lattice_strength(residual: FloatArray) -> float:
    """Strength of the period-2 (2x2 lattice) pattern in |residual|: about 0 = none, 1 = bilinear demosaicing.

    In each 2x2 cell the four |residual| values are divided by the cell's sum, so strong edges weigh no more
    than flat texture; averaging over the cells of a 32 px block gives each lattice site's share of the
    block's residual (1/4 each for noise). The shares are split into their three non-constant Walsh
    components (row parity, column parity, checkerboard), and `debiased_strength` combines the blocks, so the
    value neither grows with noise nor depends on the image size.
    """
    magnitude = np.abs(blocks(residual))
    sites = [magnitude[:, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)]
    inverse_total = np.float32(1.0) / (sites[0] + sites[1] + sites[2] + sites[3] + CELL_FLOOR)
    shares = np.stack([np.mean(site * inverse_total, axis=(1, 2)) for site in sites], axis=1).astype(
        np.float64
    )
    shares /= np.maximum(shares.sum(axis=1, keepdims=True), 1e-12)
    s00, s01, s10, s11 = shares.T
    walsh = np.stack([s00 + s01 - s10 - s11, s00 - s01 + s10 - s11, s00 - s01 - s10 + s11], axis=1)
    return debiased_strength(walsh)


def color_evidence(crop: FloatArray | EvidenceInputs) -> dict[str, Any]:
    """Colour metrics of an RGB crop (side >= 64). Returns metric records plus a `summary` string."""
    residuals = as_inputs(crop).channel_residuals
    metrics: dict[str, dict[str, Any]] = {}
    for pair, correlation in _correlations(residuals).items():
        metrics[f"residual_corr_{pair}"] = metric(
            GROUP,
            f"residual_corr_{pair}",
            correlation,
            f"correlation of the {pair[0].upper()} and {pair[1].upper()} high-pass residuals",
        )
    for channel, residual in zip(CHANNELS, residuals, strict=True):
        metrics[f"cfa_{channel}"] = metric(
            GROUP,
            f"cfa_{channel}",
            lattice_strength(residual),
            f"2x2 colour-filter-array lattice strength of the {channel.upper()} residual "
            "(demosaicing trace; <= 0 = none)",
        )
    result: dict[str, Any] = dict(metrics)
    result["summary"] = summarise("Colour residuals", metrics, ["cfa_g", "residual_corr_rg"])
    return result
