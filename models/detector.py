"""The detector: evidence + learned model -> one `Detection` per image, batch-first.

For each image: pixels to float RGB (any mode, EXIF orientation), hand-made evidence on a centre crop,
provenance from the file, and up to `max_crops` native-resolution crops (never resized) for the CNN. The crops
of the whole batch go through the CNN together; per image the crop logits are averaged, calibrated into one
score (a weights file may also fuse evidence features into it; the shipped weights fuse none since 1.1.0: the
evidence is reported beside the score), and compared with the thresholds of the model's config.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from models._config import SYNTHGUARD_V1, DetectorCfg
from models._registry import register_detector
from models._scoring import CnnOutput, Fusion, cnn_outputs, crop_tensor, resolve_device
from models._types import DecidedBy, Detection, ImageInput, Verdict
from models.errors import DetectorError, FlatImageError
from models.evidence import (
    FEATURE_NAMES,
    evidence_crop,
    evidence_features,
    pixel_evidence,
    pixel_evidence_batch,
    read_provenance,
)
from models.nets import FAMILIES, NetConfig, ResidualNet
from models.preprocess import prepare_image

WEIGHTS_FORMAT = "synthguard-weights/1"
#: Score reported when nothing could be measured: the even odds, stated as such by decided_by="unanalysable".
NO_INFORMATION_SCORE = 0.5


class WeightsError(DetectorError):
    """The weights file is missing, altered (sha256 mismatch) or does not match the network."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def evidence_vector(
    rgb: NDArray[np.float32], grid_offset: tuple[int, int] = (0, 0)
) -> tuple[dict[str, dict[str, Any]], NDArray[np.float32]]:
    """Pixel evidence (spectral, color, grid) and its feature vector in `FEATURE_NAMES` order."""
    evidence = pixel_evidence(rgb, grid_offset)
    return evidence, evidence_features(evidence)


#: Evidence crops measured together on a GPU: bounds the device memory of the evidence (about 0.7 GB at the
#: peak for 32 crops of 512 px, measured on the CPU) whatever the detection batch size. On the CPU crops are
#: measured one at a time, which keeps each one's arrays in the processor's caches.
EVIDENCE_BATCH_GPU = 32


def load_weights(path: Path, expected_sha256: str | None) -> tuple[dict[str, Any], str]:
    """Check the pinned sha256 first, then load with `weights_only=True` (no code can run from the file).

    Raises:
        WeightsError: missing file, sha256 mismatch, unreadable or foreign file.
    """
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    actual = sha256_of(path)
    if expected_sha256 is not None and actual != expected_sha256:
        raise WeightsError(
            f"weights file {path} has sha256 {actual}, but the config pins {expected_sha256}: "
            "the file was altered or replaced; refusing to load it"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # The type is named because torch.load's own messages can be bare (a KeyError's is just a number).
        raise WeightsError(
            f"cannot read weights file {path}: not a PyTorch weights file ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{path} is not a {WEIGHTS_FORMAT} file")
    return payload, actual


def cfg_from_weights(path: Path, name: str = "synthguard-local", version: str = "local") -> DetectorCfg:
    """A config for a locally trained weights file (e.g. `synthguard train --out DIR`), pinned to its
    sha256.
    """
    payload, sha = load_weights(path, None)
    fusion = Fusion.from_state(payload["fusion"])
    return DetectorCfg(
        name=name,
        version=version,
        weights_file=str(path.resolve()),
        weights_sha256=sha,
        crop_size=int(payload["crop_size"]),
        max_crops=int(payload["max_crops"]),
        crop_candidates=int(payload.get("crop_candidates", 0)),
        threshold_generated=float(payload["thresholds"]["generated"]),
        threshold_uncertain=float(payload["thresholds"]["uncertain"]),
        feature_names=fusion.feature_names,
        training_summary=f"trained from {payload['training'].get('manifest', '?')}",
    )


#: One and a half grey levels on the [0, 1] scale: crops whose every channel spans no more are one colour
#: (JPEG rounding of a solid colour may move a value by one level).
FLAT_RANGE = 1.5 / 255.0


def _textured(crops: torch.Tensor) -> torch.Tensor:
    """`crops` (K, 3, S, S), unless every one is a single colour, each channel within FLAT_RANGE.

    The network was never shown such crops, and its score on them says nothing (measured: solid colours
    scored 0.92-0.9999, "generated").

    Raises:
        FlatImageError: every crop is flat.
    """
    spans = crops.amax(dim=(2, 3)) - crops.amin(dim=(2, 3))
    if bool((spans <= FLAT_RANGE).all()):
        raise FlatImageError
    return crops


@dataclass
class _Prepared:
    """Per-image state between the per-image steps and the batched CNN."""

    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)
    features: NDArray[np.float32] | None = None
    crops: torch.Tensor | None = None
    #: What the pixel evidence reads (`evidence_crop`), until the batch's evidence is measured.
    evidence_pixels: NDArray[np.float32] | None = None
    reasons: list[str] = field(default_factory=list)
    unanalysable: bool = False
    size: tuple[int, int] = (0, 0)


class Detector:
    """Scores images as generated or real. Build with `models.create_detector(name)`.

    Attributes:
        cfg: the frozen config (thresholds, crops, pinned weights hash).
        device: where the CNN runs (CUDA when available unless told otherwise).
    """

    def __init__(self, cfg: DetectorCfg, device: str | torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(device)
        payload, _ = load_weights(cfg.weights_path, cfg.weights_sha256)
        if int(payload["crop_size"]) != cfg.crop_size:
            raise WeightsError(
                f"weights were trained on {payload['crop_size']} px crops, config says {cfg.crop_size}"
            )
        # Weights saved before the crop choice existed read evenly spread crops.
        if int(payload.get("crop_candidates", 0)) != cfg.crop_candidates:
            raise WeightsError(
                f"weights were calibrated on crops chosen from {payload.get('crop_candidates', 0)} "
                f"candidates, config says {cfg.crop_candidates}"
            )
        if tuple(payload["families"]) != FAMILIES:
            raise WeightsError(f"weights have classes {payload['families']}, expected {FAMILIES}")
        self.fusion = Fusion.from_state(payload["fusion"])
        if self.fusion.feature_names != cfg.feature_names:
            raise WeightsError("the weights' evidence features differ from the config's")
        missing = [n for n in self.fusion.feature_names if n not in FEATURE_NAMES]
        if missing:
            raise WeightsError(f"the weights use evidence features this version does not compute: {missing}")
        self._feature_index = [FEATURE_NAMES.index(n) for n in self.fusion.feature_names]
        self.net = ResidualNet(NetConfig.from_dict(payload["net_config"]))
        try:
            self.net.load_state_dict(payload["state_dict"], strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"weights do not match the network: {exc}") from exc
        self.net.eval().to(self.device)
        # Half precision only on CUDA: on CPU it is slower and changes scores for nothing.
        self.half = self.device.type == "cuda"
        if self.half:
            self.net.half()
        self.training_info: dict[str, Any] = dict(payload.get("training", {}))
        # Optional memo of pixel evidence keyed by a digest of the pixels: evaluation drivers that score the
        # same images with several models set it; the detector itself never needs it.
        self.evidence_cache: dict[bytes, dict[str, dict[str, Any]]] | None = None
        #: How many images' pixel evidence is measured in one call on the device.
        self.evidence_batch = EVIDENCE_BATCH_GPU if self.device.type == "cuda" else 1

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def version(self) -> str:
        return self.cfg.version

    @property
    def model_id(self) -> str:
        return self.cfg.model_id

    def _prepare(self, item: Image.Image | ImageInput) -> _Prepared:
        prepared = _Prepared()
        image, data = (item.image, item.data) if isinstance(item, ImageInput) else (item, None)
        if not isinstance(image, Image.Image):
            prepared.unanalysable = True
            prepared.reasons.append(f"not a PIL image but {type(image).__name__}")
            return prepared
        try:
            prepared.evidence["provenance"] = read_provenance(image, data)
        except Exception as exc:  # noqa: BLE001 - provenance is optional evidence; pixels still decide
            prepared.evidence["provenance"] = {
                "found": False,
                "says": None,
                "decisive": False,
                "error": str(exc),
            }
        try:
            pixels = prepare_image(image)
            rgb = pixels.rgb
            prepared.size = (int(rgb.shape[1]), int(rgb.shape[0]))
            prepared.reasons.extend(pixels.notes)
            prepared.crops = _textured(
                crop_tensor(
                    rgb, self.cfg.crop_size, self.cfg.max_crops, pixels.grid_offset, self.cfg.crop_candidates
                )
            )
        except DetectorError as exc:
            prepared.unanalysable = True
            prepared.reasons.append(str(exc))
            return prepared
        except Exception as exc:  # noqa: BLE001 - one broken image must not fail the batch
            prepared.unanalysable = True
            prepared.reasons.append(f"pixels could not be analysed: {type(exc).__name__}: {exc}")
            return prepared
        try:
            # A copy, not a view: a view would keep the whole full-resolution float image alive until the
            # batch's evidence is measured (8 images of 40 MP: about 3.8 GB).
            prepared.evidence_pixels = evidence_crop(rgb, pixels.grid_offset).copy()
        except Exception as exc:  # noqa: BLE001 - the CNN can still score; the gap is reported
            _evidence_failed(prepared, exc)
        return prepared

    def _measure_evidence(self, prepared: Sequence[_Prepared]) -> None:
        """Pixel evidence of every prepared image that has evidence pixels, measured in batches on the
        detector's device; the records and the features the fusion reads go into each `_Prepared`."""
        pending = [p for p in prepared if p.evidence_pixels is not None]
        keys: list[bytes | None] = [None] * len(pending)
        measured: list[dict[str, dict[str, Any]] | None] = [None] * len(pending)
        if self.evidence_cache is not None:
            for index, item in enumerate(pending):
                keys[index] = key = _pixels_key(item.evidence_pixels)
                if key in self.evidence_cache:
                    measured[index] = copy.deepcopy(self.evidence_cache[key])
        missing = [index for index, records in enumerate(measured) if records is None]
        for start in range(0, len(missing), self.evidence_batch):
            chunk = missing[start : start + self.evidence_batch]
            for index, records in zip(chunk, self._evidence_of([pending[i] for i in chunk]), strict=True):
                measured[index] = records
                cache_key = keys[index]
                if self.evidence_cache is not None and cache_key is not None and records is not None:
                    self.evidence_cache[cache_key] = copy.deepcopy(records)
        for item, records in zip(pending, measured, strict=True):
            item.evidence_pixels = None
            if records is None:
                continue
            item.evidence.update(records)
            item.features = evidence_features(records)[self._feature_index] if self._feature_index else None

    def _evidence_of(self, items: Sequence[_Prepared]) -> list[dict[str, dict[str, Any]] | None]:
        crops = [item.evidence_pixels for item in items if item.evidence_pixels is not None]
        try:
            return list(pixel_evidence_batch(crops, self.device))
        except Exception as exc:  # noqa: BLE001 - the CNN can still score; the gap is reported
            if len(items) > 1:  # measured again one by one, so that one image cannot spoil the others
                return [records for item in items for records in self._evidence_of([item])]
            _evidence_failed(items[0], exc)
            return [None]

    def _verdict(self, score: float) -> Verdict:
        if score >= self.cfg.threshold_generated:
            return "generated"
        if score >= self.cfg.threshold_uncertain:
            return "uncertain"
        return "real"

    def _unanalysable(self, prepared: _Prepared) -> Detection:
        evidence = prepared.evidence
        for group in ("spectral", "color", "grid"):
            evidence.setdefault(group, {"analysed": False})
        evidence["learned"] = {"analysed": False, "reason": "; ".join(prepared.reasons)}
        reasons = [*prepared.reasons, f"no pixel analysis: score {NO_INFORMATION_SCORE} means no information"]
        verdict: Verdict = "uncertain"
        decided_by: DecidedBy = "unanalysable"
        provenance = evidence.get("provenance", {})
        if provenance.get("decisive") and provenance.get("says") in {"generated", "real"}:
            verdict = provenance["says"]
            decided_by = "provenance"
            reasons.append(f"provenance decided: {provenance.get('signals')}")
        return Detection(
            score=NO_INFORMATION_SCORE,
            verdict=verdict,
            family_scores={"diffusion": 0.25, "gan": 0.25, "real": 0.5},
            evidence=evidence,
            model=self.model_id,
            decided_by=decided_by,
            threshold=self.cfg.threshold_generated,
            reasons=reasons,
        )

    def _scored(self, prepared: _Prepared, output: CnnOutput) -> Detection:
        contributions = self.fusion.contributions(output.logit, prepared.features)
        logit = sum(contributions.values())
        score = 1.0 / (1.0 + math.exp(-max(min(logit, 60.0), -60.0)))
        _, p_diffusion, p_gan = output.family_probs
        generated_mass = max(p_diffusion + p_gan, 1e-12)
        family_scores = {
            "diffusion": score * p_diffusion / generated_mass,
            "gan": score * p_gan / generated_mass,
            "real": 1.0 - score,
        }
        verdict = self._verdict(score)
        reasons = list(prepared.reasons)
        reasons.append(
            f"pixel score {score:.3f} vs thresholds {self.cfg.threshold_uncertain:.3f} (uncertain) / "
            f"{self.cfg.threshold_generated:.3f} (generated)"
        )
        decided_by: DecidedBy = "pixels"
        provenance = prepared.evidence.get("provenance", {})
        if provenance.get("decisive") and provenance.get("says") in {"generated", "real"}:
            if provenance["says"] != verdict:
                reasons.append(
                    f"provenance overrides the pixel verdict {verdict!r}: {provenance.get('signals')}"
                )
            verdict = provenance["says"]
            decided_by = "provenance"
        evidence = dict(prepared.evidence)
        evidence["learned"] = {
            "cnn_logit": round(output.logit, 4),
            "crop_logit_std": round(output.crop_logit_std, 4),
            "crops": output.crops,
            "crop_size": self.cfg.crop_size,
            "fused_logit": round(logit, 4),
            "contributions": {k: round(v, 4) for k, v in contributions.items()},
            "family_probs": dict(zip(FAMILIES, (round(p, 4) for p in output.family_probs), strict=True)),
            "meaning": "cnn_logit > 0 leans generated; contributions add up to fused_logit; score = sigmoid",
        }
        return Detection(
            score=score,
            verdict=verdict,
            family_scores=family_scores,
            evidence=evidence,
            model=self.model_id,
            decided_by=decided_by,
            threshold=self.cfg.threshold_generated,
            reasons=reasons,
        )

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image | ImageInput]) -> list[Detection]:
        """Score a batch; one `Detection` per input, in order.

        Never raises for a bad image: an image that cannot be analysed (too small, broken pixels) gets verdict
        "uncertain", decided_by "unanalysable", score 0.5 and the reason in `reasons` and
        `evidence["learned"]`.
        """
        prepared = [self._prepare(item) for item in images]
        self._measure_evidence(prepared)
        scorable = [p for p in prepared if not p.unanalysable and p.crops is not None]
        crops = [p.crops for p in scorable if p.crops is not None]
        outputs = cnn_outputs(self.net, crops, self.device, half=self.half)
        by_id = {id(p): out for p, out in zip(scorable, outputs, strict=True)}
        return [self._scored(p, by_id[id(p)]) if id(p) in by_id else self._unanalysable(p) for p in prepared]


def _evidence_failed(prepared: _Prepared, exc: Exception) -> None:
    prepared.reasons.append(f"hand-made evidence failed ({type(exc).__name__}: {exc}); CNN only")
    for group in ("spectral", "color", "grid"):
        prepared.evidence.setdefault(group, {"error": str(exc)})


def _pixels_key(pixels: NDArray[np.float32] | None) -> bytes:
    """Digest of an evidence crop's shape and pixels (for `Detector.evidence_cache`)."""
    array = np.ascontiguousarray(pixels)
    digest = hashlib.blake2b(np.array(array.shape).tobytes(), digest_size=16)
    digest.update(array.tobytes())
    return digest.digest()


@register_detector("synthguard-v1")
def synthguard_v1(device: str | torch.device | None = None) -> Detector:
    """The shipped detector: a residual CNN on 64 px native crops; the pixel evidence is reported beside."""
    return Detector(SYNTHGUARD_V1, device=device)


def detector_from_weights(path: Path, device: str | torch.device | None = None) -> Detector:
    """A detector for a locally trained weights file (thresholds and features read from the file)."""
    return Detector(cfg_from_weights(path), device=device)
