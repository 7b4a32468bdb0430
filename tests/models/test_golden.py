"""Golden outputs of the shipped weights on fixed images made by code: any change to the weights, the crops,
the evidence features or the fusion shows up here and must be deliberate (update the pins with the weights).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models import create_detector
from models._config import SYNTHGUARD_V1
from tests.images import photo


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return decoded


def golden_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(2024)
    coarse = rng.random((32, 32, 3))
    upsampled = (np.kron(coarse, np.ones((8, 8, 1))) * 255).astype(np.uint8)  # an 8x nearest-neighbour grid
    ramp = np.linspace(30, 220, 192)[None, :, None] + rng.normal(0, 12, (192, 192, 3))
    return {
        "astronaut_png": photo("astronaut.png", 256),
        "coffee_jpeg90": _jpeg(photo("coffee.png", 256, offset=64), 90),
        "upsampled_noise": Image.fromarray(upsampled),
        "noisy_ramp": Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8)),
    }


#: Scores of synthguard-v1 (weights sha256 prefix in the key) on `golden_images()`, CPU float32.
GOLDEN: dict[str, Any] = {
    "sha": "57903f09c39c",
    "scores": {
        "astronaut_png": (0.358748, "real"),
        "coffee_jpeg90": (0.569972, "real"),
        "upsampled_noise": (0.981238, "generated"),
        "noisy_ramp": (0.000001, "real"),
    },
}


def test_shipped_scores_are_pinned():
    if GOLDEN["sha"] != SYNTHGUARD_V1.weights_sha256[:12]:
        pytest.fail("the golden scores were pinned for other weights: re-pin them with the new weights")
    torch.set_num_threads(1)
    detector = create_detector("synthguard-v1", device="cpu")
    images = golden_images()
    detections = detector.detect(list(images.values()))
    for name, detection in zip(images, detections, strict=True):
        expected_score, expected_verdict = GOLDEN["scores"][name]
        assert detection.score == pytest.approx(expected_score, abs=2e-4), name
        assert detection.verdict == expected_verdict, name
