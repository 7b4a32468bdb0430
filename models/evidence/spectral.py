"""Spectral evidence: the Fourier spectrum of a high-pass noise residual.

Camera noise is broadband and its residual spectrum is smooth. Generators leave (a) a different share of
energy at mid frequencies, because their decoders synthesise texture band-limited by their upsampling stages,
and (b) sharp periodic peaks from transposed convolutions / upsampling (GAN checkerboards at 1/2 and 1/4
cycles per pixel, 8x latent decoders at multiples of 1/8). JPEG's 8x8 blocks also put peaks on the 1/8
lattice; the grid group separates those two sources, this group reports the spectrum as it is.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from scipy import fft, ndimage

from models.evidence._common import EvidenceInputs, FloatArray, as_inputs, blocks, metric, summarise

GROUP = "spectral"

#: Tiles of the Welch average. One fixed size for every image keeps the measures' distributions independent of
#: the image size (a 64 px minimum image has one tile, a 512 px crop 64); 64 px still puts the 1/8 and 1/16
#: cycles-per-pixel lattices on exact frequency bins.
TILE = 64
#: Radial frequency bands in cycles per pixel (Nyquist is 0.5 on each axis).
MID_BAND = (0.125, 0.375)
#: Frequencies below this are dominated by window leakage of scene content and are not searched for peaks.
LOW_CUTOFF = 0.04
#: Chance probability per frequency bin and tile accepted for calling the bin a peak.
PEAK_FALSE_ALARM = 1e-4
#: A single tile's periodogram bin of a noise-like residual is exponential around its expected power, so this
#: ratio to the expected power has chance probability PEAK_FALSE_ALARM.
PEAK_RATIO = float(-np.log(PEAK_FALSE_ALARM))
#: Side, in frequency bins, of the neighbourhood that sets each bin's expected power.
NEIGHBOURHOOD = 7


@lru_cache(maxsize=4)
def _window_and_grid(tile: int) -> tuple[FloatArray, np.ndarray, np.ndarray]:
    hann = np.hanning(tile).astype(np.float32)
    window = np.outer(hann, hann).astype(np.float32)
    fy = np.fft.fftfreq(tile)[:, None]
    fx = np.fft.rfftfreq(tile)[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    # rfft2 keeps half the plane: interior columns stand for two bins each of the full spectrum.
    weight = np.full(radius.shape, 2.0)
    weight[:, 0] = 1.0
    if tile % 2 == 0:
        weight[:, -1] = 1.0
    return window, radius, weight


def spectral_evidence(crop: FloatArray | EvidenceInputs) -> dict[str, Any]:
    """Spectral metrics of an RGB crop (side >= 64). Returns metric records plus a `summary` string.

    Band energies come from the Welch average of 64 px tiles. Peaks are judged per tile against the power
    expected from that tile's neighbouring frequency bins, so the per-tile peak count and strength have the
    same distribution for a small image as for a large one; they are averaged over tiles.
    """
    residual = as_inputs(crop).luma_residual
    tiles = blocks(residual, TILE)
    tiles = tiles - tiles.mean(axis=(1, 2), keepdims=True)
    window, radius, weight = _window_and_grid(TILE)
    tile_power = np.abs(fft.rfft2(tiles * window, workers=1)) ** 2  # (n, 64, 33)
    power = tile_power.mean(axis=0)

    not_dc = radius > 0
    total = float(np.sum(power * weight * not_dc)) or 1.0
    mid = (radius >= MID_BAND[0]) & (radius < MID_BAND[1])
    high = radius >= MID_BAND[1]
    mid_energy = float(np.sum(power * weight * mid)) / total
    high_energy = float(np.sum(power * weight * high)) / total

    # Expected power per bin, from the tile itself: the mean of the log power over the 7x7 neighbouring bins
    # (the bin itself left out). For an exponential periodogram E[log P] = log E[P] - Euler's gamma. Using
    # each tile's own neighbourhood (not the Welch average) keeps the per-tile statistics independent of how
    # many tiles the image has, and texture that differs from tile to tile is not mistaken for periodic peaks.
    log_power = np.log(tile_power + np.float32(1e-30))
    window_bins = NEIGHBOURHOOD * NEIGHBOURHOOD
    local = ndimage.uniform_filter(
        log_power, size=(1, NEIGHBOURHOOD, NEIGHBOURHOOD), mode=["nearest", "wrap", "mirror"]
    )
    expected = np.exp((local * window_bins - log_power) / (window_bins - 1) + np.float32(np.euler_gamma))
    searched = radius >= LOW_CUTOFF
    ratios = tile_power[:, searched] / np.maximum(expected[:, searched], np.float32(1e-30))
    peak_count = float(np.mean(np.count_nonzero(ratios > PEAK_RATIO, axis=1)))
    peak_strength = float(np.mean(np.log10(np.maximum(ratios.max(axis=1), 1e-12))))
    level = float(residual.std()) * 255.0

    metrics = {
        "residual_level": metric(
            GROUP,
            "residual_level",
            level,
            "std of the 4-neighbour high-pass residual of luma, in 8-bit grey levels",
        ),
        "mid_energy": metric(
            GROUP, "mid_energy", mid_energy, "share of residual spectrum energy at 0.125-0.375 cycles/pixel"
        ),
        "high_energy": metric(
            GROUP, "high_energy", high_energy, "share of residual spectrum energy above 0.375 cycles/pixel"
        ),
        "peak_count": metric(
            GROUP,
            "peak_count",
            peak_count,
            f"residual spectrum bins per 64 px tile above {PEAK_RATIO:.1f}x their expected power "
            "(chance 1e-4 per bin): periodic traces",
            digits=6,
        ),
        "peak_strength": metric(
            GROUP,
            "peak_strength",
            peak_strength,
            "log10 of the strongest bin over its expected power, mean over 64 px tiles",
        ),
    }
    result: dict[str, Any] = dict(metrics)
    result["summary"] = summarise("Noise-residual spectrum", metrics, ["mid_energy", "peak_count"])
    return result
