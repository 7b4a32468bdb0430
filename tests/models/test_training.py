"""Training end to end on tiny images made here, the augmentation's class-blindness, and the taef2 module."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import DetectorError, detector_from_weights
from models.data import ManifestError, read_manifest
from models.nets import NetConfig
from models.preprocess import CROP_ALIGN
from models.taef2 import TinyAutoencoder
from models.training import (
    Augmentation,
    Sample,
    TrainConfig,
    _batch,
    augmented_crop,
    real_thresholds,
    recalibrate,
    reconstructed_region,
    reconstructions,
    sampling_probabilities,
    saved_training_config,
    split_calibration,
    train,
    training_differences,
)
from tests.conftest import shared_dir


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stand-in for a generated image: coarse noise upsampled 8x by nearest neighbour (a decoder grid)."""
    small = rng.random((size // 8, size // 8, 3))
    return (np.kron(small, np.ones((8, 8, 1))) * 255).astype(np.uint8)


def _camera_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stand-in for a photo: fine-grained sensor-like noise around a gradient."""
    ramp = np.linspace(40, 200, size)[None, :, None]
    return np.clip(ramp + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)


def write_tiny_manifest(folder: Path, per_class: int = 6, size: int = 96) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(per_class):
        for label, maker, fmt in (("real", _camera_like, "JPEG"), ("fake", _smooth_noise, "PNG")):
            rel = f"{label}/{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            (folder / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(maker(rng, size)).save(folder / rel, format=fmt, quality=95)
            generator = "camera" if label == "real" else "test-diffusion"
            source = f"github:test/{label}-{i % 2}"
            rows.append(
                {"relpath": rel, "label": label, "generator": generator, "source_repo": source, "format": fmt}
            )
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


TINY = TrainConfig(steps=6, batch_size=8, calibration_fraction=0.34, max_crops=4)


def test_tiny_training_produces_weights_that_load_and_detect(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data")
    weights = train(manifest, tmp_path / "out", TINY, cache_dir=tmp_path / "cache", log=lambda _: None)
    assert weights.is_file()
    assert weights.stat().st_size < 20 * 1024 * 1024
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["training_images"] + summary["calibration"]["calibration_images"] == 12
    assert 0.0 <= summary["thresholds"]["uncertain"] <= summary["thresholds"]["generated"] <= 1.0
    detector = detector_from_weights(weights, device="cpu")
    detections = detector.detect([Image.fromarray(_smooth_noise(np.random.default_rng(5), 128))])
    assert detections[0].decided_by == "pixels"
    assert detector.model_id.endswith(summary_sha(weights))


@pytest.mark.parametrize("evidence_in_score", [False, True])
def test_evidence_enters_the_score_only_when_the_recipe_asks(tmp_path, evidence_in_score):
    manifest = write_tiny_manifest(tmp_path / "data")
    config = replace(TINY, evidence_in_score=evidence_in_score)
    weights = train(manifest, tmp_path / "out", config, cache_dir=tmp_path / "cache", log=lambda _: None)
    detector = detector_from_weights(weights, device="cpu")
    (detection,) = detector.detect([Image.fromarray(_camera_like(np.random.default_rng(6), 128))])
    terms = set(detection.evidence["learned"]["contributions"])
    assert bool(detector.cfg.feature_names) is evidence_in_score
    assert ("spectral.mid_energy" in terms) is evidence_in_score
    assert {"cnn", "bias"} <= terms
    # Reviewers see the evidence either way.
    assert "value" in detection.evidence["spectral"]["mid_energy"]


def summary_sha(path: Path) -> str:
    from models.detector import sha256_of

    return sha256_of(path)[:12]


def test_training_is_reproducible_with_a_seed(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data")
    first = train(manifest, tmp_path / "a", TINY, cache_dir=tmp_path / "cache", log=lambda _: None)
    second = train(manifest, tmp_path / "b", TINY, cache_dir=tmp_path / "cache", log=lambda _: None)
    state_a = torch.load(first, weights_only=True)["state_dict"]
    state_b = torch.load(second, weights_only=True)["state_dict"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_recalibrating_for_textured_crops_keeps_the_network_and_records_the_choice(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", size=160)
    trained = train(manifest, tmp_path / "a", TINY, cache_dir=tmp_path / "cache", log=lambda _: None)
    config = replace(TINY, crop_candidates=9)
    quiet = {"cache_dir": tmp_path / "cache", "log": lambda _: None}
    again = recalibrate(trained, manifest, tmp_path / "b", config, **quiet)
    before = torch.load(trained, weights_only=True)
    after = torch.load(again, weights_only=True)
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert (before["crop_candidates"], after["crop_candidates"]) == (0, 9)
    assert after["training"]["recalibrated_from"]["path"] == str(trained)
    summary = json.loads((tmp_path / "b" / "train_summary.json").read_text())
    assert summary["config"]["crop_candidates"] == 9
    assert summary["calibration"]["calibration_images"] == 4
    detector = detector_from_weights(again, device="cpu")
    assert detector.cfg.crop_candidates == 9
    image = Image.fromarray(_camera_like(np.random.default_rng(8), 160))
    (detection,) = detector.detect([image])
    assert detection.decided_by == "pixels"
    assert detection.evidence["learned"]["crops"] == 4
    with pytest.raises(ValueError, match="weight_decay"):
        recalibrate(trained, manifest, tmp_path / "c", replace(config, weight_decay=0.1), **quiet)


def test_a_sweep_can_recalibrate_another_runs_fold_networks(tmp_path):
    from models.detector import WeightsError
    from models.evaluation import fold_dir_name, leave_one_source_out

    manifest = write_tiny_manifest(tmp_path / "data", per_class=10, size=160)
    source = "fake:github:test/fake-0"
    quiet = {"sources": [source], "cache_dir": tmp_path / "cache", "log": lambda _: None}
    config = replace(TINY, steps=2)
    leave_one_source_out(manifest, tmp_path / "grid", train_config=config, **quiet)
    textured = replace(config, crop_candidates=9)
    summary = leave_one_source_out(
        manifest, tmp_path / "textured", train_config=textured, networks_from=tmp_path / "grid", **quiet
    )
    assert list(summary["folds"]) == [source]
    fold = fold_dir_name(source)
    before = torch.load(tmp_path / "grid" / fold / "weights.pt", weights_only=True)
    after = torch.load(tmp_path / "textured" / fold / "weights.pt", weights_only=True)
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert after["crop_candidates"] == 9
    assert after["training"]["recalibrated_from"]["path"] == str(tmp_path / "grid" / fold / "weights.pt")
    assert (tmp_path / "textured" / fold / "eval.json").is_file()
    with pytest.raises(WeightsError, match="does not exist"):
        leave_one_source_out(
            manifest, tmp_path / "other", train_config=textured, networks_from=tmp_path / "missing", **quiet
        )


def test_training_differences_ignore_detection_settings_and_settings_saved_before_they_existed():
    saved = json.loads(json.dumps(asdict(TINY)))
    del saved["augmentation"]["noise_p"]  # as in a file saved before the setting existed: it trained without
    assert training_differences(saved, replace(TINY, max_crops=64, crop_candidates=9, device="cuda")) == []
    noisy = replace(TINY, augmentation=Augmentation(noise_p=0.3), seed=4)
    assert training_differences(saved, noisy) == ["augmentation", "seed"]


def test_a_saved_training_config_rebuilds_the_config_it_was_saved_from():
    config = replace(
        TINY,
        seed=3,
        exclude_sources=("fake:github:test/fake-1",),
        net=NetConfig(width=8, use_npr=1),
        augmentation=Augmentation(noise_p=0.3, chroma_subsampling=(0, 2)),
    )
    saved = json.loads(json.dumps(asdict(config)))
    assert saved_training_config(saved) == config
    del saved["augmentation"]["noise_p"]  # saved before the setting existed: trained as its default
    assert saved_training_config(saved).augmentation.noise_p == Augmentation().noise_p
    with pytest.raises(ValueError, match="does not know"):
        saved_training_config({**saved, "future_setting": 1})
    saved["augmentation"]["future_setting"] = 1
    with pytest.raises(ValueError, match="does not fit"):
        saved_training_config(saved)


def test_weights_calibrated_on_other_crops_than_the_config_reads_are_refused(tmp_path):
    from models._config import DetectorCfg
    from models.detector import Detector, WeightsError, cfg_from_weights

    manifest = write_tiny_manifest(tmp_path / "data")
    trained = train(manifest, tmp_path / "a", TINY, cache_dir=tmp_path / "cache", log=lambda _: None)
    cfg: DetectorCfg = replace(cfg_from_weights(trained), crop_candidates=64)
    with pytest.raises(WeightsError, match="candidates"):
        Detector(cfg, device="cpu")


def test_weights_with_larger_crops_score_a_batch_that_mixes_in_a_smaller_image(tmp_path):
    """An image smaller than the crop size is read at its own size (never scaled up), in the same batch."""
    manifest = write_tiny_manifest(tmp_path / "data")
    config = replace(TINY, crop_size=80)
    weights = train(manifest, tmp_path / "out", config, cache_dir=tmp_path / "cache", log=lambda _: None)
    detector = detector_from_weights(weights, device="cpu")
    rng = np.random.default_rng(3)
    large, small = (Image.fromarray(_camera_like(rng, side)) for side in (128, 72))
    together = detector.detect([large, small])
    alone = [detector.detect([image])[0] for image in (large, small)]
    assert [d.decided_by for d in together] == ["pixels", "pixels"]
    assert [d.evidence["learned"]["crops"] for d in together] == [4, 1]
    for mixed, single in zip(together, alone, strict=True):
        assert mixed.score == pytest.approx(single.score, abs=1e-6)


def test_init_seed_alone_changes_the_trained_network(tmp_path):
    """`init_seed` None means `seed`; another value gives other weights (the splits stay on `seed`)."""
    manifest = write_tiny_manifest(tmp_path / "data")

    def state(name: str, config: TrainConfig) -> dict[str, torch.Tensor]:
        path = train(manifest, tmp_path / name, config, cache_dir=tmp_path / "cache", log=lambda _: None)
        return torch.load(path, weights_only=True)["state_dict"]

    default, same, other = (
        state("a", TINY),
        state("b", replace(TINY, init_seed=0)),
        state("c", replace(TINY, init_seed=1)),
    )
    assert all(torch.equal(default[k], same[k]) for k in default)
    assert not all(torch.equal(default[k], other[k]) for k in default)


def test_averaged_weights_hold_the_learning_rate_and_measure_batch_norm_again(tmp_path):
    """`average_weights_from`: the schedule stops falling there, later steps are averaged, then batch-norm
    statistics come from `bn_refresh_batches` fresh batches (not from the training steps)."""
    manifest = write_tiny_manifest(tmp_path / "data")
    plain_log: list[str] = []
    averaged_log: list[str] = []
    plain = train(
        manifest,
        tmp_path / "plain",
        replace(TINY, steps=4),
        cache_dir=tmp_path / "cache",
        log=plain_log.append,
    )
    averaged = train(
        manifest,
        tmp_path / "averaged",
        replace(TINY, steps=4, average_weights_from=0.5, bn_refresh_batches=5),
        cache_dir=tmp_path / "cache",
        log=averaged_log.append,
    )
    # Step 3 of 4: the cosine schedule is at 2e-3 * (1 + cos(3 pi / 4)) / 2 = 2.93e-4; held from step 2 it
    # stays at 2e-3 * (1 + cos(pi / 2)) / 2 = 1e-3.
    assert any(line.startswith("step 3/4 ") and "lr 2.93e-04" in line for line in plain_log)
    assert any(line.startswith("step 3/4 ") and "lr 1.00e-03" in line for line in averaged_log)
    assert "averaged the weights of 2 steps" in averaged_log
    assert not any(line.startswith("averaged") for line in plain_log)

    def batches_tracked(path: Path) -> set[int]:
        state = torch.load(path, weights_only=True)["state_dict"]
        return {int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}

    assert batches_tracked(plain) == {4}
    assert batches_tracked(averaged) == {5}
    assert detector_from_weights(averaged, device="cpu").model_id


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU training path)")
def test_training_on_cuda_writes_weights_that_load_on_the_cpu(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data")
    config = TrainConfig(steps=6, batch_size=8, calibration_fraction=0.34, max_crops=4, device="cuda")
    weights = train(manifest, tmp_path / "out", config, cache_dir=tmp_path / "cache", log=lambda _: None)
    state = torch.load(weights, weights_only=True)["state_dict"]
    assert all(tensor.device.type == "cpu" for tensor in state.values())
    detector = detector_from_weights(weights, device="cpu")
    image = Image.fromarray(_smooth_noise(np.random.default_rng(5), 128))
    assert detector.detect([image])[0].decided_by == "pixels"


@pytest.mark.parametrize("device", ["tpu-9000", "cuda:7", "meta"])
def test_a_training_device_the_machine_lacks_is_refused_before_any_work(tmp_path, device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    manifest = write_tiny_manifest(tmp_path / "data")
    config = TrainConfig(steps=1, device=device)
    with pytest.raises(DetectorError, match="training device"):
        train(manifest, tmp_path / "out", config, cache_dir=tmp_path / "cache", log=lambda _: None)
    assert not (tmp_path / "cache").exists(), "the device is checked before the pixel cache is built"


def test_excluding_an_unknown_source_is_a_clear_error(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data")
    config = TrainConfig(steps=1, exclude_sources=("fake:nowhere",))
    with pytest.raises(ManifestError, match="matches no source"):
        train(manifest, tmp_path / "out", config, cache_dir=tmp_path / "cache", log=lambda _: None)


def test_excluding_a_whole_class_is_refused(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data")
    config = TrainConfig(steps=1, exclude_sources=("fake:github:test/fake-0", "fake:github:test/fake-1"))
    with pytest.raises(ManifestError, match="real and generated"):
        train(manifest, tmp_path / "out", config, cache_dir=tmp_path / "cache", log=lambda _: None)


def test_augmentation_never_depends_on_the_class():
    pixels = _camera_like(np.random.default_rng(0), 128)
    aug = Augmentation(
        lossless_history_p=0.5,
        final_jpeg_p=0.5,
        off_lattice_p=0.0,
        blur_p=0.5,
        resize_p=0.5,
        chroma_subsampling=(0, 1, 2),
        texture_candidates=3,
        noise_p=0.5,
        saturation_p=0.5,
        channel_shuffle_p=0.5,
    )
    for seed in range(20):
        real_sample = Sample(pixels, family=0, lossless=True, source="a")
        fake_sample = Sample(pixels, family=1, lossless=True, source="b")
        real = augmented_crop(real_sample, 64, aug, np.random.default_rng(seed))
        fake = augmented_crop(fake_sample, 64, aug, np.random.default_rng(seed))
        assert np.array_equal(real, fake)


@pytest.mark.parametrize("paired", [True, False])
def test_paired_reconstructions_bring_their_real_photo_cropped_alike(paired):
    rng = np.random.default_rng(0)
    photo = _camera_like(rng, 96)
    # A "reconstruction" with the very pixels of its photo: a twin cropped alike is then the same crop.
    reconstruction = Sample(
        photo.copy(), family=1, lossless=True, source="taef2", is_reconstruction=True, partner=photo
    )
    other_real = Sample(_camera_like(rng, 96), family=0, lossless=False, source="camera")
    generated = Sample(_smooth_noise(rng, 96), family=1, lossless=True, source="generator")
    probabilities = np.array([0.5, 0.2, 0.3])
    # The batch's first draw from its generator is which samples it holds.
    drawn = np.random.default_rng(1).choice(3, size=48, p=probabilities)
    x, y = _batch(
        [other_real, reconstruction, generated],
        probabilities=probabilities,
        size=64,
        batch_size=48,
        aug=Augmentation(off_lattice_p=0.5, lossless_history_p=0.5, final_jpeg_p=0.5),
        rng=np.random.default_rng(1),
        paired=paired,
    )
    crops, labels = x.numpy(), y.numpy()
    real_slots = np.flatnonzero(labels == 0)
    twins = [
        i for i in np.flatnonzero(drawn == 1) if any(np.array_equal(crops[i], crops[j]) for j in real_slots)
    ]
    n_reconstructions = int((drawn == 1).sum())
    assert 0 < n_reconstructions < int((drawn == 0).sum())
    if paired:
        # Every reconstruction drawn has its twin among the real crops, which replaced real draws one for one.
        assert len(twins) == n_reconstructions
        assert len(real_slots) == int((drawn == 0).sum())
        assert all(labels[i] == 1 for i in twins)
    else:
        assert twins == []
        assert np.array_equal(labels, np.where(drawn == 0, 0, 1))


def test_reconstructions_have_the_shape_of_the_region_they_pair_with(tmp_path):
    weights = shared_dir() / "weights" / "taef2"
    if not (weights / "taef2_encoder.pth").is_file():
        pytest.skip(f"taef2 weights not found at {weights}")
    torch.set_num_threads(1)
    photo = _camera_like(np.random.default_rng(3), 140)[:, :100]
    (reconstruction,) = reconstructions(
        [photo], ["photo"], taef2_dir=weights, side=64, cache_path=tmp_path / "taef2.pt", log=lambda _: None
    )
    region = reconstructed_region(photo, 64)
    assert region.shape == reconstruction.shape == (64, 64, 3)
    assert np.array_equal(region, photo[38:102, 18:82])
    # The autoencoder smooths the sensor-like noise away but keeps the region's brightness ramp.
    column_means = region.mean(axis=(0, 2)), reconstruction.mean(axis=(0, 2))
    assert np.abs(column_means[0] - column_means[1]).mean() < 10
    assert np.corrcoef(*column_means)[0, 1] > 0.9


def test_texture_candidates_draw_crops_where_the_image_has_texture():
    from models.preprocess import crop_texture

    pixels = np.full((128, 256, 3), 128, dtype=np.uint8)
    pixels[:, 128:] = _camera_like(np.random.default_rng(2), 128)  # the right half is textured
    sample = Sample(pixels, family=0, lossless=False, source="a")
    plain = Augmentation(final_jpeg_p=0.0, flip_p=0.0, off_lattice_p=0.0)
    picky = replace(plain, texture_candidates=4)

    def textured_share(aug: Augmentation) -> float:
        rng = np.random.default_rng(0)
        crops = [augmented_crop(sample, 64, aug, rng) for _ in range(200)]
        return float(np.mean([crop_texture(c.astype(np.float32) / 255) > 0.01 for c in crops]))

    # A random position lands fully in the flat half about a third of the time; the most textured of four
    # almost never does.
    assert textured_share(plain) < 0.8
    assert textured_share(picky) > 0.95


def _assert_not_drawn_when_off(sample: Sample, plain: Augmentation, probability: str) -> None:
    """With `probability` 0 no random number is drawn for it, so recipes measured before it existed repeat
    exactly; a tiny probability draws one and so moves the stream (the check can fail)."""
    off, tiny = np.random.default_rng(7), np.random.default_rng(7)
    barely = replace(plain, **{probability: 1e-12})
    assert np.array_equal(augmented_crop(sample, 64, plain, off), augmented_crop(sample, 64, barely, tiny))
    assert off.random() != tiny.random()


def test_blur_softens_crops_and_is_not_drawn_when_off():
    pixels = _camera_like(np.random.default_rng(0), 128)
    sample = Sample(pixels, family=0, lossless=False, source="a")
    plain = Augmentation(final_jpeg_p=0.0, flip_p=0.0)
    blurred = Augmentation(final_jpeg_p=0.0, flip_p=0.0, blur_p=1.0, blur_sigma=(1.0, 1.5))

    def roughness(crop: np.ndarray) -> float:
        return float(np.abs(np.diff(crop.astype(float), axis=1)).mean())

    for seed in range(5):
        sharp = augmented_crop(sample, 64, plain, np.random.default_rng(seed))
        soft = augmented_crop(sample, 64, blurred, np.random.default_rng(seed))
        assert roughness(soft) < 0.5 * roughness(sharp)
    _assert_not_drawn_when_off(sample, plain, "blur_p")


def test_noise_roughens_flat_crops_and_is_not_drawn_when_off():
    sample = Sample(np.full((96, 96, 3), 100, dtype=np.uint8), family=1, lossless=False, source="a")
    plain = Augmentation(final_jpeg_p=0.0, flip_p=0.0)
    noisy = replace(plain, noise_p=1.0, noise_sigma=(2.0, 3.0))
    for seed in range(5):
        assert np.ptp(augmented_crop(sample, 64, plain, np.random.default_rng(seed))) == 0
        crop = augmented_crop(sample, 64, noisy, np.random.default_rng(seed)).astype(float)
        assert 1.5 < crop.std() < 3.5
        assert abs(crop.mean() - 100) < 0.5
    _assert_not_drawn_when_off(sample, plain, "noise_p")


def test_saturation_keeps_luma_and_scales_colour_and_is_not_drawn_when_off():
    rng = np.random.default_rng(4)
    pixels = np.clip(rng.normal(128, 40, (96, 96, 3)), 0, 255).astype(np.uint8)
    sample = Sample(pixels, family=1, lossless=False, source="a")
    plain = Augmentation(final_jpeg_p=0.0, flip_p=0.0, off_lattice_p=0.0)
    grey = replace(plain, saturation_p=1.0, saturation_range=(0.0, 0.0))
    vivid = replace(plain, saturation_p=1.0, saturation_range=(1.5, 1.5))
    weights = np.array([0.299, 0.587, 0.114])

    def luma_and_chroma(crop: np.ndarray) -> tuple[np.ndarray, float]:
        luma = crop.astype(float) @ weights
        return luma, float(np.abs(crop - luma[..., None]).mean())

    base_luma, base_chroma = luma_and_chroma(augmented_crop(sample, 64, plain, np.random.default_rng(1)))
    grey_crop = augmented_crop(sample, 64, grey, np.random.default_rng(1))
    assert np.ptp(grey_crop.astype(int), axis=2).max() <= 1  # grey: the three channels agree (rounding)
    vivid_luma, vivid_chroma = luma_and_chroma(augmented_crop(sample, 64, vivid, np.random.default_rng(1)))
    assert np.abs(vivid_luma - base_luma).mean() < 3.0  # luma kept, up to rounding and clipping
    assert 1.25 * base_chroma < vivid_chroma < 1.55 * base_chroma
    _assert_not_drawn_when_off(sample, plain, "saturation_p")


def test_channel_shuffle_reorders_the_channels_and_is_not_drawn_when_off():
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 10, 120, 240
    sample = Sample(pixels, family=0, lossless=False, source="a")
    plain = Augmentation(final_jpeg_p=0.0, flip_p=0.0, off_lattice_p=0.0)
    shuffled = replace(plain, channel_shuffle_p=1.0)
    orders = {tuple(augmented_crop(sample, 64, shuffled, np.random.default_rng(s))[0, 0]) for s in range(40)}
    assert orders <= {
        (10, 120, 240),
        (10, 240, 120),
        (120, 10, 240),
        (120, 240, 10),
        (240, 10, 120),
        (240, 120, 10),
    }
    assert len(orders) == 6
    _assert_not_drawn_when_off(sample, plain, "channel_shuffle_p")


def test_crops_stay_on_the_jpeg_lattice_unless_told_otherwise():
    # A ramp image: the crop's first pixel reveals its offset.
    ramp = np.zeros((256, 256, 3), dtype=np.uint8)
    ramp[..., 0] = np.arange(256)[None, :]
    ramp[..., 1] = np.arange(256)[:, None]
    aug = Augmentation(lossless_history_p=0.0, final_jpeg_p=0.0, off_lattice_p=0.0, flip_p=0.0)
    sample = Sample(ramp, family=0, lossless=True, source="a")
    rng = np.random.default_rng(3)
    for _ in range(50):
        crop = augmented_crop(sample, 64, aug, rng)
        assert crop.shape == (64, 64, 3)
        assert int(crop[0, 0, 0]) % CROP_ALIGN == 0
        assert int(crop[0, 0, 1]) % CROP_ALIGN == 0


def test_sampling_balances_classes_and_damps_large_sources():
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    samples = [Sample(img, 0, False, "real:big") for _ in range(100)] + [Sample(img, 0, False, "real:small")]
    samples += [Sample(img, 1, True, "fake:x") for _ in range(4)]
    samples += [Sample(img, 1, True, "taef2", is_reconstruction=True) for _ in range(10)]
    p = sampling_probabilities(samples, 64, reconstruction_share=0.25, source_weight_power=0.5)
    assert p.sum() == pytest.approx(1.0)
    assert p[:101].sum() == pytest.approx(0.5)
    assert p[101:105].sum() == pytest.approx(0.375)
    assert p[105:].sum() == pytest.approx(0.125)
    # 1/sqrt(100) vs 1/sqrt(1): the small source's image is drawn 10x as often as one big-source image.
    assert p[100] / p[0] == pytest.approx(10.0)


def test_source_weight_power_one_gives_every_source_the_same_share():
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    samples = [Sample(img, 0, False, "real:big") for _ in range(100)] + [Sample(img, 0, False, "real:small")]
    samples += [Sample(img, 1, True, "fake:x") for _ in range(30)] + [Sample(img, 1, True, "fake:y")]
    p = sampling_probabilities(samples, 64, reconstruction_share=0.0, source_weight_power=1.0)
    assert p[:100].sum() == pytest.approx(p[100])  # 100 images of one source weigh as much as one of another
    assert p[101:131].sum() == pytest.approx(p[131]) == pytest.approx(0.25)
    flat = sampling_probabilities(samples, 64, reconstruction_share=0.0, source_weight_power=0.0)
    assert flat[0] == pytest.approx(flat[100]) == pytest.approx(0.5 / 101)


def test_too_small_images_are_never_sampled():
    samples = [
        Sample(np.zeros((32, 200, 3), np.uint8), 0, False, "a"),
        Sample(np.zeros((64, 64, 3), np.uint8), 0, False, "a"),
    ]
    samples.append(Sample(np.zeros((64, 64, 3), np.uint8), 1, True, "b"))
    p = sampling_probabilities(samples, 64, reconstruction_share=0.0, source_weight_power=0.0)
    assert p[0] == 0.0


def test_calibration_split_takes_a_share_of_every_source(tmp_path):
    rows = read_manifest(write_tiny_manifest(tmp_path / "data", per_class=10))
    train_idx, cal_idx = split_calibration(rows, 0.2, seed=0)
    assert not set(train_idx) & set(cal_idx)
    assert len(train_idx) + len(cal_idx) == len(rows)
    for source in {r.source for r in rows}:
        assert sum(rows[i].source == source for i in cal_idx) == 1  # 20% of 5 images per source


def _cbsd68_crop() -> torch.Tensor:
    folder = shared_dir() / "datasets" / "dev" / "real" / "cszn__IRCNN"
    images = sorted(folder.rglob("*.png")) if folder.is_dir() else []
    if not images:
        pytest.skip(f"CBSD68 photos not found under {folder}")
    with Image.open(images[0]) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    top, left = (rgb.shape[0] - 256) // 2, (rgb.shape[1] - 256) // 2
    crop = np.ascontiguousarray(rgb[top : top + 256, left : left + 256])
    return torch.from_numpy(crop).permute(2, 0, 1)[None]


def test_thresholds_come_from_the_reals_and_sit_above_their_99th_percentile():
    rng = np.random.default_rng(3)
    logits = rng.logistic(-3.0, 0.5, 2000)
    reals = 1.0 / (1.0 + np.exp(-logits))
    q90, q99 = np.quantile(logits, [0.90, 0.99])

    bare = real_thresholds(reals, margin=0.0)
    wide = real_thresholds(reals, margin=2.0)

    assert bare["generated"] == pytest.approx(1.0 / (1.0 + np.exp(-q99)))
    assert wide["generated"] == pytest.approx(1.0 / (1.0 + np.exp(-(q99 + 2.0 * (q99 - q90)))))
    assert wide["uncertain"] == bare["uncertain"] == pytest.approx(np.quantile(reals, 0.95))
    assert (reals >= wide["generated"]).mean() < (reals >= bare["generated"]).mean() <= 0.011
    # Shifting every real up (a source the model scores higher) moves both thresholds up with it.
    assert real_thresholds(reals * 0.5 + 0.5, margin=2.0)["generated"] > wide["generated"]


def test_thresholds_without_calibration_reals_are_a_clear_error():
    with pytest.raises(ManifestError, match="no calibration real images"):
        real_thresholds(np.array([]), margin=2.0)


def test_taef2_loads_strictly_and_round_trips_a_photo():
    weights = shared_dir() / "weights" / "taef2"
    if not (weights / "taef2_encoder.pth").is_file():
        pytest.skip(f"taef2 weights not found at {weights}")
    torch.set_num_threads(1)
    model = TinyAutoencoder.from_dir(weights)
    assert sum(p.numel() for p in model.encoder.parameters()) == pytest.approx(1.34e6, rel=0.05)
    x = _cbsd68_crop()
    y = model.reconstruct(x)
    psnr = 10 * torch.log10(1 / ((y - x) ** 2).mean())
    assert 24.0 < float(psnr) < 32.0
    assert not torch.equal(x, y)


def test_taef2_refuses_sides_off_the_latent_grid():
    with pytest.raises(ValueError, match="multiples of 8"):
        TinyAutoencoder().reconstruct(torch.zeros(1, 3, 60, 64))


def test_a_network_with_the_npr_view_trains_saves_and_loads(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data")
    config = replace(TINY, net=NetConfig(use_npr=1))
    weights = train(manifest, tmp_path / "out", config, cache_dir=tmp_path / "cache", log=lambda _: None)
    detector = detector_from_weights(weights, device="cpu")
    assert detector.net.config.use_npr == 1
    (detection,) = detector.detect([Image.fromarray(_smooth_noise(np.random.default_rng(7), 128))])
    assert 0.0 <= detection.score <= 1.0


def test_resize_history_downscales_crops_and_is_not_drawn_when_off():
    # Stripes with period 8 px: downscaled by 0.5 they have period 4, which a plain crop never shows.
    stripes = np.zeros((256, 256, 3), dtype=np.uint8)
    for column in range(4):
        stripes[:, column::8] = 255
    sample = Sample(stripes, family=1, lossless=False, source="a")
    plain = Augmentation(final_jpeg_p=0.0, flip_p=0.0, off_lattice_p=0.0, lossless_history_p=0.0)
    halved = replace(plain, resize_p=1.0, resize_scale=(0.5, 0.5))
    for seed in range(5):
        crop = augmented_crop(sample, 64, plain, np.random.default_rng(seed)).astype(float)
        small = augmented_crop(sample, 64, halved, np.random.default_rng(seed)).astype(float)
        assert crop.shape == small.shape == (64, 64, 3)
        row, small_row = crop[32, :, 0], small[32, 8:-8, 0]
        assert np.abs(row[:-4] - row[4:]).min() == 255  # period 8 as stored: half a period inverts it
        assert np.abs(small_row[:-4] - small_row[4:]).max() < 10  # period 4 after the downscale
        assert np.abs(small_row[:-2] - small_row[2:]).max() > 200  # and not period 2
    # A resampled crop counts as lossless: it gets the JPEG history even though the sample was stored as JPEG.
    with_history = replace(halved, lossless_history_p=1.0, history_quality=(40, 40))
    resampled = augmented_crop(sample, 64, halved, np.random.default_rng(0))
    assert not np.array_equal(resampled, augmented_crop(sample, 64, with_history, np.random.default_rng(0)))
    _assert_not_drawn_when_off(sample, plain, "resize_p")


def test_chroma_subsampling_is_drawn_per_jpeg_step_and_not_when_off():
    # Red and blue alternate every pixel column: 4:4:4 keeps that chroma detail, 4:2:0 halves it away.
    columns = np.zeros((128, 128, 3), dtype=np.uint8)
    columns[:, 0::2, 0] = 255
    columns[:, 1::2, 2] = 255
    sample = Sample(columns, family=1, lossless=True, source="a")
    plain = Augmentation(flip_p=0.0, off_lattice_p=0.0, lossless_history_p=1.0, final_jpeg_p=0.0)
    plain = replace(plain, history_quality=(95, 95))

    def red_alternation(crop: np.ndarray) -> float:
        red = crop[..., 0].astype(float)
        return float(np.abs(red[:, 1:] - red[:, :-1]).mean())

    full = augmented_crop(sample, 64, replace(plain, chroma_subsampling=(0,)), np.random.default_rng(0))
    halved = augmented_crop(sample, 64, plain, np.random.default_rng(0))
    assert red_alternation(full) > 200
    assert red_alternation(halved) < 100
    # Every listed subsampling is drawn, and each JPEG step draws its own.
    drawn = {
        red_alternation(augmented_crop(sample, 64, replace(plain, chroma_subsampling=(0, 2)), rng)) > 200
        for rng in (np.random.default_rng(seed) for seed in range(20))
    }
    assert drawn == {True, False}
    # Off (empty), no random number is drawn for it, so the recipes measured before it existed repeat exactly:
    # drawing between two 4:2:0 entries (Pillow's default) gives the same crop but moves the stream.
    off, drawing = np.random.default_rng(7), np.random.default_rng(7)
    assert np.array_equal(
        augmented_crop(sample, 64, plain, off),
        augmented_crop(sample, 64, replace(plain, chroma_subsampling=(2, 2)), drawing),
    )
    assert off.random() != drawing.random()
