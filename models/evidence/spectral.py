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
from scipy import fft, ndimage, stats

from models.evidence._common import FloatArray, laplacian_residual, luminance, metric, summarise

GROUP = "spectral"

#: Welch tiles: averaging the periodograms of several tiles makes the spectrum stable enough that a 4-5x peak
#: over the local median is real structure, not chance. 128 px resolves the 1/8 and 1/16 cycles-per-pixel
#: lattices.
TILE = 128
SMALL_TILE = 64
#: Radial frequency bands in cycles per pixel (Nyquist is 0.5 on each axis).
MID_BAND = (0.125, 0.375)
#: Frequencies below this are dominated by window leakage of scene content and are not searched for peaks.
LOW_CUTOFF = 0.04
#: Chance probability per frequency bin that we accept for calling a bin a peak.
PEAK_FALSE_ALARM = 1e-4
MEDIAN_SIZE = 7


@lru_cache(maxsize=64)
def _peak_threshold(n_tiles: int) -> float:
    """Ratio to the local median above which a bin is a peak, for an average of `n_tiles` periodograms.

    A periodogram bin of a noise-like residual is exponential; the mean of n of them is Gamma(n, 1/n). The
    local median estimates that distribution's median, so the threshold is its (1 - PEAK_FALSE_ALARM)
    quantile over it.
    """
    dist = stats.gamma(a=n_tiles, scale=1.0 / n_tiles)
    return float(dist.isf(PEAK_FALSE_ALARM) / dist.median())


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


def _tiles(plane: FloatArray, tile: int) -> FloatArray:
    rows, cols = plane.shape[0] // tile, plane.shape[1] // tile
    cut = plane[: rows * tile, : cols * tile]
    stacked = cut.reshape(rows, tile, cols, tile).transpose(0, 2, 1, 3).reshape(-1, tile, tile)
    return np.asarray(stacked - stacked.mean(axis=(1, 2), keepdims=True), dtype=np.float32)


def spectral_evidence(crop: FloatArray) -> dict[str, Any]:
    """Spectral metrics of an RGB crop (side >= 64). Returns metric records plus a `summary` string."""
    residual = laplacian_residual(luminance(crop))
    tile = TILE if min(residual.shape) >= TILE else SMALL_TILE
    tiles = _tiles(residual, tile)
    window, radius, weight = _window_and_grid(tile)
    power = np.mean(np.abs(fft.rfft2(tiles * window, workers=1)) ** 2, axis=0)

    not_dc = radius > 0
    total = float(np.sum(power * weight * not_dc)) or 1.0
    mid = (radius >= MID_BAND[0]) & (radius < MID_BAND[1])
    high = radius >= MID_BAND[1]
    mid_energy = float(np.sum(power * weight * mid)) / total
    high_energy = float(np.sum(power * weight * high)) / total

    # Local median along both axes; the frequency axis 0 wraps around (fftfreq order), axis 1 does not.
    baseline = ndimage.median_filter(power, size=MEDIAN_SIZE, mode="nearest")
    ratio = power / np.maximum(baseline, np.float32(1e-12))
    searched = radius >= LOW_CUTOFF
    threshold = _peak_threshold(len(tiles))
    peaks = searched & (ratio > threshold)
    peak_count = int(np.count_nonzero(peaks))
    strongest = float(ratio[searched].max()) if np.any(searched) else 1.0
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
            float(peak_count),
            f"spectrum bins above {threshold:.2f}x the local median (chance 1e-4 per bin): periodic traces",
            digits=6,
        ),
        "peak_strength": metric(
            GROUP,
            "peak_strength",
            float(np.log10(max(strongest, 1e-12))),
            "log10 of the strongest bin over its local median",
        ),
    }
    result: dict[str, Any] = dict(metrics)
    result["summary"] = summarise("Noise-residual spectrum", metrics, ["mid_energy", "peak_count"])
    return result
