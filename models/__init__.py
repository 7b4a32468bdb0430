"""synthguard's detector: forensic evidence plus a small learned model, as a pure library.

Typical use:

    import models
    detector = models.create_detector("synthguard-v1")
    detections = detector.detect([pil_image, models.ImageInput(image=other, data=file_bytes)])

This package imports only PyTorch, NumPy, Pillow (and c2pa for provenance); never Celery, SQLAlchemy, Redis
or HTTP. PyTorch is imported on first use of the detector (`create_detector`, `list_detectors`, `Detector`,
`WeightsError`, `detector_from_weights`), not by `import models`: the worker's CLI and producers use the
plain types and errors, and importing torch alone takes seconds and a few hundred MB.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from models._config import SYNTHGUARD_V1, DetectorCfg
from models._registry import REGISTRY as _REGISTRY
from models._registry import DetectorRegistry, UnknownDetectorError, register_detector
from models._types import Detection, ImageInput
from models.errors import DetectorError, ImageTooSmallError, UnsupportedImageError

if TYPE_CHECKING:
    from models.detector import Detector, WeightsError, detector_from_weights

#: Public names that live in `models.detector` (which imports torch), resolved on first access (PEP 562).
_DETECTOR_NAMES = frozenset({"Detector", "WeightsError", "detector_from_weights"})

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


def __getattr__(name: str) -> Any:
    if name in _DETECTOR_NAMES:
        return getattr(_detector_module(), name)
    if name == "REGISTRY":  # the registry with the shipped detectors in it, as before the lazy import
        _detector_module()
        return _REGISTRY
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _DETECTOR_NAMES | {"REGISTRY"})


def _detector_module() -> ModuleType:
    """`models.detector`, imported on first need; importing it registers the shipped detectors."""
    return importlib.import_module("models.detector")


def create_detector(name: str = "synthguard-v1", device: str | None = None) -> Detector:
    """Build a registered detector.

    Args:
        name: registry name (see `list_detectors()`).
        device: "cpu", "cuda", "cuda:N", or None / "auto" for CUDA when available.

    Raises:
        UnknownDetectorError: no detector has that name.
        WeightsError: the weights file is missing or does not match its pinned sha256.
    """
    _detector_module()
    return _REGISTRY.create(name, device=device)


def list_detectors() -> list[str]:
    """Names accepted by `create_detector` (imports torch: the shipped detectors register on import)."""
    _detector_module()
    return _REGISTRY.names()
