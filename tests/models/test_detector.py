"""The shipped detector through its public API: batches, odd modes, refusals, and the pinned weights."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
from models import Detector, DetectorError, ImageInput, WeightsError, create_detector, list_detectors
from models._config import SYNTHGUARD_V1
from models._registry import DetectorRegistry, UnknownDetectorError
from models.detector import sha256_of
from tests.conftest import shared_dir
from tests.images import photo


@pytest.fixture(scope="module")
def shipped() -> Detector:
    torch.set_num_threads(1)
    return create_detector("synthguard-v1", device="cpu")


def _check(detection: models.Detection, thresholds: tuple[float, float]) -> None:
    assert 0.0 <= detection.score <= 1.0
    assert math.isclose(sum(detection.family_scores.values()), 1.0, abs_tol=1e-6)
    assert set(detection.family_scores) == {"diffusion", "gan", "real"}
    assert set(detection.evidence) >= {"spectral", "color", "grid", "provenance", "learned"}
    uncertain, generated = thresholds
    if detection.decided_by == "pixels":
        expected = (
            "generated"
            if detection.score >= generated
            else "uncertain"
            if detection.score >= uncertain
            else "real"
        )
        assert detection.verdict == expected
    json.dumps(detection.to_dict())  # plain data only: no tensors, no numpy scalars


def test_registry_lists_and_builds_the_shipped_detector(shipped):
    assert "synthguard-v1" in list_detectors()
    assert shipped.name == "synthguard-v1"
    sha = sha256_of(SYNTHGUARD_V1.weights_path)
    assert sha == SYNTHGUARD_V1.weights_sha256
    assert shipped.model_id == f"synthguard-v1@{shipped.version}+{sha[:12]}"


def test_unknown_name_is_a_detector_error():
    with pytest.raises(UnknownDetectorError, match="no detector named 'nope'") as info:
        create_detector("nope")
    assert isinstance(info.value, DetectorError)


def test_registry_refuses_a_second_registration_under_one_name():
    registry = DetectorRegistry()
    registry.register("a")(lambda device=None: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(lambda device=None: None)


def test_public_api_is_explicit():
    for name in models.__all__:
        assert hasattr(models, name), name
    expected = {"create_detector", "list_detectors", "Detector", "Detection", "ImageInput", "DetectorError"}
    assert expected <= set(models.__all__)


def test_weights_file_is_small():
    assert SYNTHGUARD_V1.weights_path.stat().st_size < 20 * 1024 * 1024


def test_batch_gives_one_detection_per_image_in_order(shipped):
    images = [photo("astronaut.png", 256), photo("coffee.png", 200, offset=40), photo("chelsea.png", 128)]
    batch = shipped.detect(images)
    assert len(batch) == 3
    for image, detection in zip(images, batch, strict=True):
        single = shipped.detect([image])[0]
        assert single.score == pytest.approx(detection.score, abs=1e-5)
        _check(detection, (SYNTHGUARD_V1.threshold_uncertain, SYNTHGUARD_V1.threshold_generated))
        assert detection.model == shipped.model_id
        assert detection.evidence["learned"]["crops"] >= 1


def test_detect_is_deterministic(shipped):
    image = photo("rocket.jpg", 300)
    first, second = shipped.detect([image])[0], shipped.detect([image])[0]
    assert first.score == second.score
    assert first.evidence["learned"] == second.evidence["learned"]


def test_empty_batch(shipped):
    assert shipped.detect([]) == []


def _mode_images() -> dict[str, Image.Image]:
    base = photo("astronaut.png", 160)
    rgba = base.convert("RGBA")
    rgba.putalpha(200)
    p_transparent = base.convert("P")
    p_transparent.info["transparency"] = 0
    sixteen = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    buffer = io.BytesIO()
    sixteen.save(buffer, format="PNG")
    buffer.seek(0)
    png16 = Image.open(buffer)
    png16.load()
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = io.BytesIO()
    base.crop((0, 0, 160, 120)).save(jpeg, format="JPEG", quality=90, exif=exif.tobytes())
    jpeg.seek(0)
    rotated = Image.open(jpeg)
    rotated.load()
    return {
        "L": base.convert("L"),
        "LA": base.convert("LA"),
        "P": base.convert("P"),
        "P+transparency": p_transparent,
        "RGBA": rgba,
        "CMYK": base.convert("CMYK"),
        "I;16": sixteen,
        "16-bit PNG": png16,
        "I": base.convert("I"),
        "F": base.convert("F"),
        "1": base.convert("1"),
        "YCbCr": base.convert("YCbCr"),
        "EXIF-rotated JPEG": rotated,
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_every_odd_mode_is_scored(shipped, mode):
    image = _mode_images()[mode]
    detection = shipped.detect([image])[0]
    assert detection.decided_by == "pixels", detection.reasons
    assert math.isfinite(detection.score)
    _check(detection, (SYNTHGUARD_V1.threshold_uncertain, SYNTHGUARD_V1.threshold_generated))


def test_exif_rotation_is_applied_before_cropping(shipped):
    image = _mode_images()["EXIF-rotated JPEG"]
    assert image.size == (160, 120)
    detection = shipped.detect([image])[0]
    # 160x120 rotated by 90 degrees: the spectral/colour/grid crop is at most 120 px wide and 160 tall.
    assert detection.decided_by == "pixels"


def test_too_small_image_is_uncertain_with_the_reason(shipped):
    detection = shipped.detect([Image.new("RGB", (63, 500), (120, 30, 40))])[0]
    assert detection.verdict == "uncertain"
    assert detection.decided_by == "unanalysable"
    assert detection.score == 0.5
    assert any("63x500" in reason and "64" in reason for reason in detection.reasons)
    assert detection.evidence["learned"]["analysed"] is False


def _float_nan() -> Image.Image:
    return Image.fromarray(np.full((96, 96), np.nan, dtype=np.float32), mode="F")


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(Image.new("RGB", (256, 256), (0, 255, 0)), id="green"),
        pytest.param(Image.new("RGB", (300, 200), (255, 0, 255)), id="magenta"),
        pytest.param(Image.new("L", (128, 128), 0), id="black"),
        pytest.param(_float_nan(), id="all-NaN float"),
    ],
)
def test_a_flat_image_is_unanalysable_not_scored(shipped, image):
    detection = shipped.detect([image])[0]
    assert (detection.verdict, detection.decided_by, detection.score) == ("uncertain", "unanalysable", 0.5)
    assert any("flat" in reason for reason in detection.reasons), detection.reasons


def test_a_smooth_gradient_is_still_analysed(shipped):
    ramp = np.tile(np.linspace(0, 255, 256).astype(np.uint8), (256, 1))
    assert shipped.detect([Image.fromarray(ramp)])[0].decided_by == "pixels"


def test_the_evidence_crop_does_not_keep_the_whole_image_alive(shipped):
    prepared = shipped._prepare(photo("astronaut.png", 200))
    assert prepared.evidence_pixels is not None and prepared.evidence_pixels.base is None


def test_one_bad_image_does_not_fail_the_batch(shipped):
    good = photo("coffee.png", 128)
    broken = ImageInput(image="not an image", data=None)  # type: ignore[arg-type]
    results = shipped.detect([good, broken, Image.new("L", (10, 10)), good])
    assert [r.decided_by for r in results] == ["pixels", "unanalysable", "unanalysable", "pixels"]
    assert results[0].score == pytest.approx(results[3].score, abs=1e-6)
    assert "not a PIL image" in results[1].reasons[0]


def test_image_input_bytes_feed_provenance(shipped):
    image = photo("astronaut.png", 128)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    detection = shipped.detect([ImageInput(image=image, data=buffer.getvalue(), name="x.png")])[0]
    assert detection.evidence["provenance"]["decisive"] is False
    assert detection.decided_by == "pixels"


def test_provenance_hit_decides_and_says_so(shipped):
    folder = shared_dir() / "datasets" / "provenance"
    if not folder.is_dir():
        pytest.skip(f"shared provenance images not found at {folder}")
    path = next(p for p in sorted(folder.rglob("*.png")))
    image = Image.open(path)
    image.load()
    detection = shipped.detect([ImageInput(image=image, data=path.read_bytes(), name=path.name)])[0]
    assert detection.decided_by == "provenance"
    assert detection.verdict == "generated"
    assert detection.evidence["provenance"]["says"] == "generated"
    assert 0.0 <= detection.score <= 1.0  # the pixel score is still reported beside the provenance verdict


def test_an_unanalysable_image_that_declares_itself_generated_is_decided_by_provenance(shipped):
    """Too small for the pixel analysis, but its metadata carries generation settings: that still decides."""
    from PIL import PngImagePlugin

    from tests.images import encode
    from tests.models.test_provenance import A1111_PARAMETERS

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_PARAMETERS)
    data = encode(Image.new("RGB", (40, 40), (1, 2, 3)), "PNG", pnginfo=info)
    image = Image.open(io.BytesIO(data))
    image.load()
    detection = shipped.detect([ImageInput(image=image, data=data, name="tiny.png")])[0]
    assert (detection.verdict, detection.decided_by, detection.score) == ("generated", "provenance", 0.5)
    assert detection.evidence["learned"]["analysed"] is False


def test_tampered_weights_are_refused(tmp_path):
    tampered = tmp_path / "synthguard-v1.pt"
    shutil.copyfile(SYNTHGUARD_V1.weights_path, tampered)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    cfg = SYNTHGUARD_V1.with_weights(tampered, SYNTHGUARD_V1.weights_sha256)
    with pytest.raises(WeightsError, match="altered or replaced"):
        Detector(cfg, device="cpu")


def test_foreign_file_with_matching_hash_is_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    cfg = SYNTHGUARD_V1.with_weights(foreign, sha256_of(foreign))
    with pytest.raises(WeightsError, match="is not a synthguard-weights"):
        Detector(cfg, device="cpu")


def test_pickled_code_is_never_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("executed",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "synthguard-weights/1", "x": Boom()}, evil)
    cfg = SYNTHGUARD_V1.with_weights(evil, sha256_of(evil))
    with pytest.raises(WeightsError, match="cannot read weights"):
        Detector(cfg, device="cpu")


def test_missing_weights_file(tmp_path):
    cfg = SYNTHGUARD_V1.with_weights(tmp_path / "absent.pt", "0" * 64)
    with pytest.raises(WeightsError, match="does not exist"):
        Detector(cfg, device="cpu")


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(DetectorError, match="CUDA is not available"):
        create_detector("synthguard-v1", device="cuda")


def test_importing_models_loads_no_host_framework():
    code = (
        "import json, sys, models, models.detector, models.training, models.evaluation, models.data; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True
    )
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert not loaded & {"celery", "kombu", "sqlalchemy", "redis", "httpx", "requests", "worker", "db"}


def test_weights_path_is_inside_the_package():
    assert Path(models.__file__).parent / "weights" == SYNTHGUARD_V1.weights_path.parent


def test_evidence_memo_gives_the_same_detections(shipped):
    images = [photo("astronaut.png", 192), photo("coffee.png", 160)]
    plain = shipped.detect(images)
    shipped.evidence_cache = {}
    try:
        first = shipped.detect(images)
        second = shipped.detect(images)
        assert len(shipped.evidence_cache) == 2
    finally:
        shipped.evidence_cache = None
    for a, b, c in zip(plain, first, second, strict=True):
        assert a.score == b.score == c.score
        assert a.evidence == b.evidence == c.evidence


def test_evidence_is_measured_per_batch_and_one_failure_spoils_nothing_else(shipped, monkeypatch):
    images = [photo("astronaut.png", 192), photo("coffee.png", 96), photo("chelsea.png", 160)]
    alone = [shipped.detect([image])[0] for image in images]
    calls: list[int] = []
    measure = models.detector.pixel_evidence_batch

    def failing_on_96_px(crops, device="cpu"):
        calls.append(len(crops))
        if any(crop.shape[0] == 96 for crop in crops):
            raise RuntimeError("simulated failure of the evidence of a 96 px crop")
        return measure(crops, device)

    monkeypatch.setattr(models.detector, "pixel_evidence_batch", failing_on_96_px)
    monkeypatch.setattr(shipped, "evidence_batch", 8)  # as on a GPU: the whole batch in one call
    together = shipped.detect(images)
    # The whole batch in one call first; after the failure, one call per image.
    assert calls == [3, 1, 1, 1]
    for index in (0, 2):
        assert together[index].evidence == alone[index].evidence
        assert together[index].score == pytest.approx(alone[index].score, abs=1e-6)
    failed = together[1]
    assert failed.verdict in {"real", "uncertain", "generated"}
    assert failed.evidence["learned"]["crops"] >= 1  # the CNN still scored it
    assert "simulated failure" in failed.evidence["grid"]["error"]
    assert any("hand-made evidence failed" in reason for reason in failed.reasons)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (evidence measured on the GPU)"
)
def test_evidence_on_cuda_reads_like_on_cpu():
    images = [photo("astronaut.png", 512), photo("coffee.png", 256)]
    on_cpu = create_detector("synthguard-v1", device="cpu").detect(images)
    on_cuda = create_detector("synthguard-v1", device="cuda").detect(images)
    for cpu, cuda in zip(on_cpu, on_cuda, strict=True):
        for group in ("spectral", "color", "grid"):
            for key, record in cpu.evidence[group].items():
                if key == "summary":
                    continue
                # A peak count is a count of bins past a threshold: float rounding can move a bin or two
                # across it, 1/64 per bin with the 64 tiles of a 512 px crop.
                slack = 0.1 if key == "peak_count" else 1e-3
                assert cuda.evidence[group][key]["value"] == pytest.approx(
                    record["value"], rel=0.01, abs=slack
                ), (group, key)
