"""Plain data that leaves the detector: no ORM rows, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

Verdict = Literal["generated", "real", "uncertain"]
DecidedBy = Literal["pixels", "provenance", "unanalysable"]


@dataclass(frozen=True)
class ImageInput:
    """One image to analyse: decoded pixels plus, optionally, the original file bytes.

    The bytes are only read for provenance (C2PA manifests, XMP); pixels are never re-decoded from them.
    """

    image: Image.Image
    data: bytes | None = None
    name: str | None = None


@dataclass(frozen=True)
class Detection:
    """The detector's answer for one image.

    Attributes:
        score: calibrated probability that the image was generated, 0..1.
        verdict: "generated", "real" or "uncertain" (thresholds come from the model's config).
        family_scores: probabilities for at least "diffusion", "gan" and "real"; they sum to 1.
        evidence: one dict per group ("spectral", "color", "grid", "provenance", "learned"); every number
            a reviewer should read comes with the range typical of camera photos.
        model: "<name>@<version>+<weights sha256[:12]>".
        decided_by: "pixels", "provenance" (a metadata hit decided it) or "unanalysable" (too small, etc.).
    """

    score: float
    verdict: Verdict
    family_scores: dict[str, float]
    evidence: dict[str, dict[str, Any]]
    model: str
    decided_by: DecidedBy = "pixels"
    threshold: float = 0.5
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "verdict": self.verdict,
            "family_scores": dict(self.family_scores),
            "evidence": self.evidence,
            "model": self.model,
            "decided_by": self.decided_by,
            "threshold": self.threshold,
            "reasons": list(self.reasons),
        }
