"""models.evidence pixel measures: known answers on images made here (grid, CFA, spectral peaks), the record
format reviewers read, the feature vector the learned model fuses, and the camera-range calibration."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from models.evidence import (
    FEATURE_NAMES,
    calibrate_ranges,
    evidence_features,
    pixel_evidence,
    pixel_evidence_batch,
)
from models.evidence._common import RANGES_PATH, debiased_strength
from models.preprocess import center_crop, to_rgb_array

GROUPS = ("spectral", "color", "grid")


def _noise(size: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size, 3), dtype=np.float32)


def _scene(size: int = 512, seed: int = 1) -> np.ndarray:
    """Smooth random colour field plus mild sensor-like noise: a stand-in for photo content."""
    rng = np.random.default_rng(seed)
    channels = [ndimage.gaussian_filter(rng.random((size, size)), 3) for _ in range(3)]
    scene = np.stack(channels, axis=-1)
    scene = (scene - scene.min()) / (scene.max() - scene.min())
    return np.clip(scene * 0.8 + 0.1 + rng.normal(0, 0.01, scene.shape), 0, 1).astype(np.float32)


def _decoder_like(size: int = 512, seed: int = 2, smooth: bool = True) -> np.ndarray:
    """What an 8x latent decoder leaves: a latent-resolution image upsampled 8x by nearest neighbour, then a
    small convolution (skipped with smooth=False)."""
    latent = np.random.default_rng(seed).random((size // 8, size // 8, 3))
    upsampled = np.repeat(np.repeat(latent, 8, axis=0), 8, axis=1)
    if not smooth:
        return upsampled.astype(np.float32)
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=float) / 16
    convolved = np.stack(
        [ndimage.convolve(upsampled[..., c], kernel, mode="wrap") for c in range(3)], axis=-1
    )
    noise = np.random.default_rng(seed + 1).normal(0, 0.004, convolved.shape)
    return np.clip(convolved + noise, 0, 1).astype(np.float32)


def _bayer_demosaicked(scene: np.ndarray) -> np.ndarray:
    """Sample `scene` through a G R / B G Bayer filter, then bilinear demosaicing, as a simple camera does."""
    mask = np.zeros(scene.shape, dtype=bool)
    mask[0::2, 1::2, 0] = True
    mask[0::2, 0::2, 1] = True
    mask[1::2, 1::2, 1] = True
    mask[1::2, 0::2, 2] = True
    green_kernel = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], dtype=float) / 4
    red_blue_kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=float) / 4
    planes = []
    for channel in range(3):
        sampled = np.where(mask[..., channel], scene[..., channel], 0.0)
        kernel = green_kernel if channel == 1 else red_blue_kernel
        planes.append(ndimage.convolve(sampled, kernel, mode="mirror"))
    return np.clip(np.stack(planes, axis=-1), 0, 1).astype(np.float32)


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return to_rgb_array(Image.open(io.BytesIO(buffer.getvalue())))


def _value(evidence: dict[str, dict[str, Any]], name: str) -> float:
    group, key = name.split(".")
    return float(evidence[group][key]["value"])


# --- record format and feature vector
# ------------------------------------------------------------------------


def test_every_metric_is_a_readable_record_with_a_camera_range() -> None:
    evidence = pixel_evidence(_scene(256))
    assert set(evidence) == set(GROUPS)
    for group in GROUPS:
        records = evidence[group]
        assert isinstance(records["summary"], str)
        assert len(records["summary"]) > 20
        for key, record in records.items():
            if key == "summary":
                continue
            assert math.isfinite(record["value"])
            assert record["meaning"]
            low, high = record["camera_range"]
            assert low <= high
            assert record["vs_camera"] in {"within", "above", "below"}
            assert len(record["camera_range_jpeg90"]) == 2
    json.dumps(evidence)  # stored as JSON by the worker


def test_vs_camera_says_which_side_of_the_camera_range_a_value_lies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviewers read the direction: "above" and "below" must not swap, and the range's ends are inside it."""
    from models.evidence import _common

    monkeypatch.setattr(_common, "camera_range", lambda name, condition="as_is": [1.0, 2.0])
    sides = {value: _common.metric("grid", "x", value, "test")["vs_camera"] for value in (0.5, 1.0, 2.0, 3.0)}
    assert sides == {0.5: "below", 1.0: "within", 2.0: "within", 3.0: "above"}


def test_feature_vector_follows_feature_names() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    evidence = pixel_evidence(_scene(256))
    features = evidence_features(evidence)
    assert features.dtype == np.float32
    assert features.shape == (len(FEATURE_NAMES),)
    assert np.isfinite(features).all()
    for index, name in enumerate(FEATURE_NAMES):
        group, key = name.split(".")
        assert key in evidence[group], name
        if name not in {"spectral.residual_level", "spectral.peak_count", "grid.jpeg_blockiness"}:
            assert features[index] == pytest.approx(_value(evidence, name), rel=1e-6, abs=1e-7)
    # Missing or non-finite metrics become 0 rather than NaN in the model's input.
    broken = {"spectral": {"mid_energy": {"value": float("nan")}}}
    assert not evidence_features(broken).any()


def test_constant_image_gives_finite_numbers() -> None:
    flat = np.full((128, 128, 3), 0.5, dtype=np.float32)
    features = evidence_features(pixel_evidence(flat))
    assert np.isfinite(features).all()


def test_camera_ranges_cover_every_feature_in_both_conditions() -> None:
    ranges = json.loads(RANGES_PATH.read_text(encoding="utf-8"))["ranges"]
    for condition in ("as_is", "jpeg90"):
        assert set(FEATURE_NAMES) <= set(ranges[condition])


# --- grid
# ------------------------------------------------------------------------------------------------------


def test_decoder_grid_shows_at_period_8_and_noise_does_not() -> None:
    decoder = pixel_evidence(_decoder_like())
    noise = pixel_evidence(_noise())
    assert _value(decoder, "grid.period8_off_jpeg") > 0.2
    assert _value(decoder, "grid.interior_var8") > 0.2
    assert abs(_value(noise, "grid.period8_off_jpeg")) < 0.01
    assert abs(_value(noise, "grid.period8")) < 0.01
    assert abs(_value(noise, "grid.interior_var8")) < 0.01
    assert abs(_value(noise, "grid.period4")) < 0.01
    assert abs(_value(noise, "grid.period2")) < 0.01


def test_block_aligned_nearest_upsample_is_all_on_the_boundary_phase() -> None:
    evidence = pixel_evidence(_decoder_like(smooth=False))
    assert _value(evidence, "grid.period8") > 0.5
    assert _value(evidence, "grid.jpeg_phase_share") > 0.5
    assert _value(evidence, "grid.jpeg_blockiness") > 5


def test_jpeg_blocking_is_reported_apart_from_the_decoder_grid() -> None:
    """Heavy JPEG on photo-like content: strong blockiness at the boundary phase, but the off-boundary
    period-8 measure stays far below a decoder's; JPEG on the decoder image keeps its off-boundary grid."""
    jpeg_scene = pixel_evidence(_jpeg(_scene(), quality=40))
    plain_scene = pixel_evidence(_scene())
    decoder_jpeg = pixel_evidence(_jpeg(_decoder_like(), quality=90))
    assert _value(jpeg_scene, "grid.jpeg_blockiness") > 1.3
    assert _value(plain_scene, "grid.jpeg_blockiness") < 1.1
    assert _value(jpeg_scene, "grid.jpeg_phase_share") > 0.5
    assert _value(decoder_jpeg, "grid.period8_off_jpeg") > 3 * max(
        _value(jpeg_scene, "grid.period8_off_jpeg"), 0.01
    )


def test_grid_measures_do_not_depend_on_image_size() -> None:
    """The per-block, debiased estimates read the same on a 128 px and a 512 px image of the same kind."""
    decoder = _decoder_like()
    big = _value(pixel_evidence(decoder), "grid.period8_off_jpeg")
    small = _value(pixel_evidence(center_crop(decoder, 128)), "grid.period8_off_jpeg")
    assert small == pytest.approx(big, rel=0.25)
    for size in (64, 128, 512):
        noise = pixel_evidence(_noise(size, seed=size))
        for name in ("grid.period8", "grid.period16", "color.cfa_g", "grid.interior_var8"):
            assert abs(_value(noise, name)) < 0.03, (size, name)


def test_debiased_strength_is_unbiased_for_noise_and_finds_a_shared_pattern() -> None:
    rng = np.random.default_rng(0)
    for blocks in (4, 64):
        null = [debiased_strength(rng.normal(0, 1, (blocks, 3))) for _ in range(400)]
        assert abs(float(np.mean(null))) < 0.1
    shared = debiased_strength(rng.normal(0, 0.1, (64, 3)) + 1.0)
    assert shared == pytest.approx(math.sqrt(3), rel=0.05)


# --- colour
# ----------------------------------------------------------------------------------------------------


def test_bayer_demosaicking_shows_cfa_periodicity_and_noise_does_not() -> None:
    camera = pixel_evidence(_bayer_demosaicked(_scene()))
    synthetic = pixel_evidence(_scene())
    noise = pixel_evidence(_noise())
    for channel in ("r", "g", "b"):
        assert _value(camera, f"color.cfa_{channel}") > 0.3
        assert abs(_value(synthetic, f"color.cfa_{channel}")) < 0.03
        assert abs(_value(noise, f"color.cfa_{channel}")) < 0.03


def test_cross_channel_residual_correlation() -> None:
    grey_scene = np.repeat(_scene()[..., :1], 3, axis=2)
    correlated = pixel_evidence(grey_scene + np.random.default_rng(5).normal(0, 0.002, grey_scene.shape))
    independent = pixel_evidence(_noise())
    assert _value(correlated, "color.residual_corr_rg") > 0.5
    assert abs(_value(independent, "color.residual_corr_rg")) < 0.05


# --- spectral
# --------------------------------------------------------------------------------------------------


def test_periodic_pattern_shows_spectral_peaks_and_noise_does_not() -> None:
    rows, cols = np.mgrid[:512, :512]
    pattern = 0.04 * np.sin(2 * np.pi * (0.3 * cols + 0.1 * rows))
    periodic = pixel_evidence(np.clip(_scene() + pattern[..., None], 0, 1).astype(np.float32))
    noise = pixel_evidence(_noise())
    assert _value(periodic, "spectral.peak_count") >= 1
    assert _value(noise, "spectral.peak_count") < 1
    assert _value(periodic, "spectral.peak_strength") > _value(noise, "spectral.peak_strength") + 1
    assert _value(periodic, "spectral.mid_energy") > _value(noise, "spectral.mid_energy")


def test_spectral_peak_measures_do_not_depend_on_image_size() -> None:
    rows, cols = np.mgrid[:512, :512]
    pattern = 0.03 * np.sin(2 * np.pi * (0.25 * cols + 0.125 * rows))
    periodic = np.clip(_scene() + pattern[..., None], 0, 1).astype(np.float32)
    big = pixel_evidence(periodic)
    small = pixel_evidence(center_crop(periodic, 128))
    for name in ("spectral.peak_count", "spectral.peak_strength", "spectral.mid_energy"):
        assert _value(small, name) == pytest.approx(_value(big, name), rel=0.2), name


def test_band_energies_are_shares() -> None:
    evidence = pixel_evidence(_noise())
    mid = _value(evidence, "spectral.mid_energy")
    high = _value(evidence, "spectral.high_energy")
    assert 0 <= mid <= 1
    assert 0 <= high <= 1
    assert mid + high <= 1.0 + 1e-3
    # White noise through the 4-neighbour high-pass keeps most energy at the highest frequencies.
    assert high > 0.7


# --- calibration
# ---------------------------------------------------------------------------------------------


def test_calibrate_ranges_runs_on_a_small_manifest(tmp_path: Path) -> None:
    rows = []
    for index in range(4):
        label = "fake" if index == 3 else "real"
        relpath = f"{label}/img{index}.png"
        (tmp_path / label).mkdir(exist_ok=True)
        pixels = np.round(_scene(160, seed=index) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / relpath)
        rows.append({"relpath": relpath, "label": label, "source_repo": f"src{index % 2}"})
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["relpath", "label", "source_repo"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "ranges.json"
    assert calibrate_ranges.main([str(manifest), "--out", str(out)]) == 0
    payload = json.loads(out.read_text(encoding="utf-8"))
    assert payload["images"] == 3  # reals only
    for condition in ("as_is", "jpeg90"):
        for name in FEATURE_NAMES:
            low, high = payload["ranges"][condition][name]
            assert low <= high
    assert (
        payload["ranges"]["jpeg90"]["grid.jpeg_blockiness"][1]
        > payload["ranges"]["as_is"]["grid.jpeg_blockiness"][0]
    )


def test_dev_images_are_analysed(shared_datasets: Path) -> None:
    manifest = shared_datasets / "dev" / "manifest.csv"
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    picks = rows[:: max(1, len(rows) // 12)]
    for row in picks:
        with Image.open(manifest.parent / row["relpath"]) as image:
            features = evidence_features(pixel_evidence(to_rgb_array(image)))
        assert np.isfinite(features).all()


# --- recorded values: a faster implementation must measure the same thing
# ------------------------------------------------------------------------

REFERENCE_PATH = Path(__file__).with_name("data") / "evidence_reference.json"


def _reference_images() -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """Images of every kind the metrics react to, at sizes that leave partial blocks, with lattice offsets."""
    scene = _scene(512, seed=5)
    return {
        "scene_512": (scene, (0, 0)),
        "scene_jpeg75_600x520": (_jpeg(_scene(600, seed=6)[:520], 75), (0, 0)),
        "decoder_like_512": (_decoder_like(512, seed=7), (0, 0)),
        "nearest_8x_256": (_decoder_like(256, seed=8, smooth=False), (0, 0)),
        "bayer_demosaicked_328x200": (_bayer_demosaicked(scene[:328, :200]), (0, 0)),
        "noise_96x160": (_noise(160, seed=9)[:96], (0, 0)),
        "small_64": (_scene(64, seed=10), (0, 0)),
        "odd_257x131_offset": (_jpeg(_scene(300, seed=11)[:257, :131], 90), (3, 5)),
        "constant_128": (np.full((128, 128, 3), 0.5, dtype=np.float32), (0, 0)),
    }


def _reference_values() -> dict[str, dict[str, float]]:
    values = {}
    for name, (rgb, offset) in _reference_images().items():
        features = evidence_features(pixel_evidence(rgb, offset))
        values[name] = {feature: float(v) for feature, v in zip(FEATURE_NAMES, features, strict=True)}
    return values


def test_metric_values_match_the_recorded_reference() -> None:
    """The camera ranges were calibrated with these definitions: a rewrite for speed (or a library upgrade)
    must give the same numbers, up to float rounding and the metrics' 4 significant digits."""
    recorded = json.loads(REFERENCE_PATH.read_text(encoding="utf-8"))
    measured = _reference_values()
    assert set(measured) == set(recorded)
    for image, features in measured.items():
        for feature, value in features.items():
            expected = recorded[image][feature]
            assert value == pytest.approx(expected, rel=2e-3, abs=1e-5), (image, feature)


if __name__ == "__main__":
    # Re-record only when a metric's definition changes on purpose (bump EVIDENCE_VERSION and the ranges).
    reference = json.dumps(_reference_values(), indent=1, sort_keys=True)
    REFERENCE_PATH.write_text(reference + "\n", encoding="utf-8")


def test_a_batch_of_crops_reads_like_each_crop_alone() -> None:
    crops = [_scene(256, seed=20), _decoder_like(128, seed=21), _scene(256, seed=22), _noise(128, seed=23)]
    together = pixel_evidence_batch(crops)
    for crop, batched in zip(crops, together, strict=True):
        alone = pixel_evidence(crop)
        assert set(batched) == set(alone) == set(GROUPS)
        for group in GROUPS:
            for key, record in alone[group].items():
                if key != "summary":
                    assert batched[group][key]["value"] == pytest.approx(record["value"], rel=1e-4, abs=1e-6)
