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
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor

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


@lru_cache(maxsize=8)
def _window_and_grid(tile: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Hann window (tile, tile), radial frequency and rfft2 bin weights (tile, tile // 2 + 1) on `device`."""
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
    return (
        torch.from_numpy(window).to(device),
        torch.from_numpy(radius).to(device),
        torch.from_numpy(weight).to(device),
    )


def _neighbourhood_mean(log_power: Tensor) -> Tensor:
    """Mean over the NEIGHBOURHOOD x NEIGHBOURHOOD bins around each bin of (..., tile, tile // 2 + 1).

    The full-frequency axis wraps around (it is periodic); the half axis of rfft2 is mirrored at its ends.
    A box sum is a difference of running sums along each axis (two cumulative sums instead of 49 terms).
    """
    rows, cols = log_power.shape[-2:]
    half = NEIGHBOURHOOD // 2
    flat = log_power.reshape(-1, 1, rows, cols)
    padded = F.pad(F.pad(flat, (0, 0, half, half), mode="circular"), (half, half, 0, 0), mode="reflect")
    running = F.pad(padded.cumsum(dim=-2), (0, 0, 1, 0))
    along_rows = running[..., NEIGHBOURHOOD:, :] - running[..., :-NEIGHBOURHOOD, :]
    running = F.pad(along_rows.cumsum(dim=-1), (1, 0, 0, 0))
    box = running[..., NEIGHBOURHOOD:] - running[..., :-NEIGHBOURHOOD]
    return (box / (NEIGHBOURHOOD * NEIGHBOURHOOD)).reshape(log_power.shape)


def spectral_measures(inputs: EvidenceInputs) -> dict[str, Tensor]:
    """The spectral metrics of every crop of the batch, each a (B,) tensor on the batch's device.

    Band energies come from the Welch average of 64 px tiles. Peaks are judged per tile against the power
    expected from that tile's neighbouring frequency bins, so the per-tile peak count and strength have the
    same distribution for a small image as for a large one; they are averaged over tiles.
    """
    residual = inputs.luma_residual  # (B, H, W)
    tiles = blocks(residual, TILE)  # (B, n, 64, 64)
    tiles = tiles - tiles.mean(dim=(-2, -1), keepdim=True)
    window, radius, weight = _window_and_grid(TILE, residual.device)
    spectra: Tensor = torch.fft.rfft2(tiles * window)
    tile_power = spectra.abs() ** 2  # (B, n, 64, 33)
    power = tile_power.mean(dim=1).to(torch.float64)  # (B, 64, 33)

    def band_sum(mask: Tensor) -> Tensor:
        return (power * weight * mask).sum(dim=(-2, -1))

    total = band_sum(radius > 0)
    total = torch.where(total > 0, total, torch.ones_like(total))
    mid_energy = band_sum((radius >= MID_BAND[0]) & (radius < MID_BAND[1])) / total
    high_energy = band_sum(radius >= MID_BAND[1]) / total

    # Expected power per bin, from the tile itself: the mean of the log power over the 7x7 neighbouring bins
    # (the bin itself left out). For an exponential periodogram E[log P] = log E[P] - Euler's gamma. Using
    # each tile's own neighbourhood (not the Welch average) keeps the per-tile statistics independent of how
    # many tiles the image has, and texture that differs from tile to tile is not mistaken for periodic peaks.
    log_power = torch.log(tile_power + 1e-30)
    window_bins = NEIGHBOURHOOD * NEIGHBOURHOOD
    others = _neighbourhood_mean(log_power) * window_bins - log_power
    expected = torch.exp(others / (window_bins - 1) + float(np.euler_gamma))
    # Bins below LOW_CUTOFF are not searched: their ratio is set to 0, which neither counts nor wins a max.
    ratios = torch.where(radius >= LOW_CUTOFF, tile_power / expected.clamp_min(1e-30), 0.0)
    peak_count = (ratios > PEAK_RATIO).sum(dim=(-2, -1)).to(torch.float64).mean(dim=1)
    peak_strength = torch.log10(ratios.amax(dim=(-2, -1)).clamp_min(1e-12)).to(torch.float64).mean(dim=1)
    flat = residual.flatten(1)
    level = (flat - flat.mean(dim=1, keepdim=True)).square().mean(dim=1).sqrt() * 255.0  # population std
    return {
        "residual_level": level,
        "mid_energy": mid_energy,
        "high_energy": high_energy,
        "peak_count": peak_count,
        "peak_strength": peak_strength,
    }


def spectral_records(values: dict[str, float]) -> dict[str, Any]:
    """Readable records (value, camera ranges, meaning) of one image's spectral metrics, and a summary."""
    meanings = {
        "residual_level": "std of the 4-neighbour high-pass residual of luma, in 8-bit grey levels",
        "mid_energy": "share of residual spectrum energy at 0.125-0.375 cycles/pixel",
        "high_energy": "share of residual spectrum energy above 0.375 cycles/pixel",
        "peak_count": f"residual spectrum bins per 64 px tile above {PEAK_RATIO:.1f}x their expected power "
        "(chance 1e-4 per bin): periodic traces",
        "peak_strength": "log10 of the strongest bin over its expected power, mean over 64 px tiles",
    }
    metrics = {
        key: metric(GROUP, key, values[key], meaning, digits=6 if key == "peak_count" else 4)
        for key, meaning in meanings.items()
    }
    result: dict[str, Any] = dict(metrics)
    result["summary"] = summarise("Noise-residual spectrum", metrics, ["mid_energy", "peak_count"])
    return result


def spectral_evidence(crop: FloatArray | EvidenceInputs) -> dict[str, Any]:
    """Spectral records of one RGB crop (side >= 64), or of the first crop of a batch."""
    return spectral_records(
        {key: float(value[0]) for key, value in spectral_measures(as_inputs(crop)).items()}
    )
