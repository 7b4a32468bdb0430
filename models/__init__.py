"""synthguard's detector: forensic evidence plus a small learned model, as a pure library.

Typical use:

    import models
    detector = models.create_detector("synthguard-v1")
    detections = detector.detect([pil_image, models.ImageInput(image=other, data=file_bytes)])

This package imports only PyTorch, NumPy, Pillow (and c2pa for provenance); never Celery, SQLAlchemy, Redis
or HTTP.
"""

from __future__ import annotations

from models._config import SYNTHGUARD_V1, DetectorCfg
from models._registry import REGISTRY, DetectorRegistry, UnknownDetectorError, register_detector
from models._types import Detection, ImageInput
from models.detector import Detector, WeightsError, detector_from_weights
from models.errors import DetectorError, ImageTooSmallError, UnsupportedImageError

__all__ = [
    "SYNTHGUARD_V1",
    "Detection",
    "Detector",
    "DetectorCfg",
    "DetectorError",
    "DetectorRegistry",
    "ImageInput",
    "ImageTooSmallError",
    "UnknownDetectorError",
    "UnsupportedImageError",
    "WeightsError",
    "create_detector",
    "detector_from_weights",
    "list_detectors",
    "register_detector",
]


def create_detector(name: str = "synthguard-v1", device: str | None = None) -> Detector:
    """Build a registered detector.

    Args:
        name: registry name (see `list_detectors()`).
        device: "cpu", "cuda", "cuda:N", or None / "auto" for CUDA when available.

    Raises:
        UnknownDetectorError: no detector has that name.
        WeightsError: the weights file is missing or does not match its pinned sha256.
    """
    return REGISTRY.create(name, device=device)


def list_detectors() -> list[str]:
    """Names accepted by `create_detector`."""
    return REGISTRY.names()
