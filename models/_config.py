"""Frozen configuration that travels with a set of weights: what to load, how to crop, where the thresholds
are.

The shipped model's values are pinned here (including the weights' sha256), so a verdict can always be traced
to the exact file that produced it, and a changed file is refused rather than silently used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class DetectorCfg:
    """Everything about one detector version except the tensors.

    Attributes:
        name: registry name, e.g. "synthguard-v1".
        version: version of the weights and thresholds (changes whenever the weights change).
        weights_file: file name under `models/weights/` (or an absolute path for locally trained weights).
        weights_sha256: pinned sha256 of the weights file; a mismatch is refused.
        crop_size: side of the native-resolution crops the CNN reads (never resized).
        max_crops: how many crops per image are read and aggregated.
        crop_candidates: 0 spreads the `max_crops` crops evenly over the image; N > max_crops reads the
            `max_crops` most textured of N evenly spread candidates. The thresholds were set with the same
            choice, so the weights file records it and a mismatch is refused.
        threshold_generated: score at or above which the verdict is "generated".
        threshold_uncertain: score at or above which (and below `threshold_generated`) the verdict is
            "uncertain".
        feature_names: evidence features the fusion layer uses, in order.
        families: class names of the CNN head.
        licence: licence of the weights.
        training_summary: one line on data and recipe (details in MODEL_CARD.md).
    """

    name: str
    version: str
    weights_file: str
    weights_sha256: str
    crop_size: int
    max_crops: int
    threshold_generated: float
    threshold_uncertain: float
    feature_names: tuple[str, ...]
    families: tuple[str, ...] = ("real", "diffusion", "gan")
    crop_candidates: int = 0
    licence: str = "Apache-2.0"
    training_summary: str = ""

    @property
    def weights_path(self) -> Path:
        path = Path(self.weights_file)
        return path if path.is_absolute() else WEIGHTS_DIR / path

    @property
    def model_id(self) -> str:
        """ "<name>@<version>+<weights sha256[:12]>", the identity stored with every verdict."""
        return f"{self.name}@{self.version}+{self.weights_sha256[:12]}"

    def with_weights(self, path: Path, sha256: str) -> DetectorCfg:
        return replace(self, weights_file=str(path.resolve()), weights_sha256=sha256)


SYNTHGUARD_V1 = DetectorCfg(
    name="synthguard-v1",
    version="1.2.0",
    weights_file="synthguard-v1.pt",
    weights_sha256="57903f09c39c4ade650df4a175f3bbf7ee89fbba40eb2b5c6ecfd4111cc3e273",
    crop_size=64,
    max_crops=8,
    threshold_generated=0.944725,
    threshold_uncertain=0.770357,
    # The hand-made evidence is computed and shown, but no longer enters the score (MODEL_CARD.md says why).
    feature_names=(),
    training_summary=(
        "residual CNN on 8 native 64 px crops, Platt-calibrated; 3500 steps on datasets/dev + taef2 "
        "reconstructions, every image drawn alike within its class, seed 0; see models/MODEL_CARD.md"
    ),
)
