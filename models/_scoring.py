"""Shared by inference and training: crops -> CNN logits per image, and the fusion into one calibrated score.

Keeping this in one place means the numbers the training script calibrates on are computed by exactly the code
the detector runs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from models.errors import DetectorError
from models.nets import ResidualNet, generated_logit
from models.preprocess import textured_crops

FloatArray = NDArray[np.float32]

#: Standardised evidence features are clipped to this many standard deviations.
Z_CLIP = 4.0


#: Device types the detector runs on; torch also parses "xla", "meta", "hpu", ... which cannot run it here.
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto": CUDA when available, else the CPU; anything else must name a device that is here.

    Raises:
        DetectorError: not a torch device name, a device type other than cpu/cuda/mps, or a CUDA or MPS
            device this machine does not have.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DetectorError(f"unknown device {str(device)!r}: {exc}") from exc
    if resolved.type not in SUPPORTED_DEVICE_TYPES:
        raise DetectorError(
            f"device {str(device)!r} is not supported; use one of {', '.join(SUPPORTED_DEVICE_TYPES)} or auto"
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DetectorError("device 'cuda' was requested but CUDA is not available")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise DetectorError(f"device {str(device)!r} was requested but there is no such CUDA device")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DetectorError("device 'mps' was requested but MPS (Apple GPU) is not available")
    if resolved.type == "mps" and (resolved.index or 0) > 0:
        raise DetectorError(f"device {str(device)!r} was requested but there is only one MPS device, mps:0")
    return resolved


def crop_tensor(
    rgb: FloatArray,
    size: int,
    max_crops: int,
    grid_offset: tuple[int, int] = (0, 0),
    candidates: int = 0,
) -> torch.Tensor:
    """Deterministic lattice-aligned native crops of an HxWx3 float image as (K, 3, S, S); never resized.

    With `candidates` above `max_crops`, the `max_crops` most textured of that many grid crops
    (`textured_crops`); otherwise `max_crops` crops spread evenly (`native_crops`).

    Raises:
        ImageTooSmallError: a side is shorter than `models.preprocess.MIN_SIDE`.
    """
    crops = textured_crops(rgb, size, max_crops, candidates, grid_offset=grid_offset)
    stacked = np.stack([np.ascontiguousarray(c) for c in crops]).astype(np.float32, copy=False)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2)


#: Crops per CNN batch on the GPU, where larger batches keep it busy.
GPU_CROP_BATCH = 256
#: Crops per CNN batch on the CPU. The full-resolution stem makes a batch of 256 64 px crops about 70 MB per
#: activation, far beyond the caches, and the CPU then waits on memory. On the 2-core machine
#: (`bench/bench_detect.py --crop-batch N`, 512 px JPEGs, 8 images per call, 2026-12-07): with 64 crops per
#: image, batches of 64 ran 19-22 images/s against 12-17 for 256; with the shipped 8 crops per image, 64
#: equals the whole call, and batches of 32 were slower (37-52 against 53-67).
CPU_CROP_BATCH = 64


def crop_batch_size(device: torch.device) -> int:
    """How many crops `cnn_outputs` puts through the network at once on `device`."""
    return GPU_CROP_BATCH if device.type == "cuda" else CPU_CROP_BATCH


@dataclass(frozen=True)
class CnnOutput:
    """Per-image CNN result: mean per-crop generated logit, its spread, and mean family probabilities."""

    logit: float
    crop_logit_std: float
    crops: int
    family_probs: tuple[float, float, float]


@torch.inference_mode()
def cnn_outputs(
    net: ResidualNet,
    per_image_crops: Sequence[torch.Tensor],
    device: torch.device,
    batch_size: int | None = None,
    half: bool = False,
) -> list[CnnOutput]:
    """Run all crops of all images through `net` in batches, then aggregate per image.

    The crops of many images share batches, which is what makes the GPU path fast. An image smaller than the
    crop size has smaller crops (it is never scaled up), so crops are batched with crops of their own side.
    `batch_size` defaults to `crop_batch_size(device)`; the logits do not depend on it (eval mode).
    """
    if batch_size is None:
        batch_size = crop_batch_size(device)
    by_side: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, crops in enumerate(per_image_crops):
        by_side[tuple(crops.shape[-2:])].append(index)
    outputs: dict[int, CnnOutput] = {}
    for indices in by_side.values():
        group = _same_side_outputs(net, [per_image_crops[i] for i in indices], device, batch_size, half)
        outputs.update(zip(indices, group, strict=True))
    return [outputs[index] for index in range(len(per_image_crops))]


def _same_side_outputs(
    net: ResidualNet,
    per_image_crops: Sequence[torch.Tensor],
    device: torch.device,
    batch_size: int,
    half: bool,
) -> list[CnnOutput]:
    counts = [int(c.shape[0]) for c in per_image_crops]
    everything = torch.cat(list(per_image_crops), dim=0)
    logits: list[torch.Tensor] = []
    for start in range(0, everything.shape[0], batch_size):
        chunk = everything[start : start + batch_size].to(device, non_blocking=True)
        if half:
            chunk = chunk.half()
        logits.append(net(chunk).float().cpu())
    all_logits = torch.cat(logits)
    gen = generated_logit(all_logits)
    probs = torch.softmax(all_logits, dim=1)
    outputs: list[CnnOutput] = []
    offset = 0
    for count in counts:
        g = gen[offset : offset + count]
        p = probs[offset : offset + count].mean(dim=0)
        outputs.append(
            CnnOutput(
                logit=float(g.mean()),
                crop_logit_std=float(g.std()) if count > 1 else 0.0,
                crops=count,
                family_probs=(float(p[0]), float(p[1]), float(p[2])),
            )
        )
        offset += count
    return outputs


@dataclass(frozen=True)
class Fusion:
    """Logistic fusion: logit = cnn_weight * cnn_logit + weights . z(features) + bias; score = sigmoid(logit).

    `z` standardises each evidence feature with the calibration set's mean and std; a missing (non-finite)
    feature contributes 0, its value at the mean.
    """

    feature_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[float, ...]
    cnn_weight: float
    bias: float

    def standardise(self, features: FloatArray | None) -> FloatArray:
        if not self.feature_names:
            return np.zeros(0, dtype=np.float32)
        if features is None:
            return np.zeros(len(self.feature_names), dtype=np.float32)
        values = np.asarray(features, dtype=np.float64)
        z = (values - np.asarray(self.mean)) / np.asarray(self.std)
        # Clipped: a flat or synthetic image can sit hundreds of standard deviations out, where a linear term
        # would extrapolate to absurd certainty.
        return np.clip(np.where(np.isfinite(z), z, 0.0), -Z_CLIP, Z_CLIP).astype(np.float32)

    def contributions(self, cnn_logit: float, features: FloatArray | None) -> dict[str, float]:
        """Additive terms of the fused logit, so a reviewer sees what pushed the score."""
        z = self.standardise(features)
        terms = {"cnn": self.cnn_weight * cnn_logit, "bias": self.bias}
        for name, weight, value in zip(self.feature_names, self.weights, z, strict=True):
            terms[name] = float(weight * value)
        return terms

    def logit(self, cnn_logit: float, features: FloatArray | None) -> float:
        return float(sum(self.contributions(cnn_logit, features).values()))

    def to_state(self) -> dict[str, Any]:
        return {
            "feature_names": list(self.feature_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": list(self.weights),
            "cnn_weight": self.cnn_weight,
            "bias": self.bias,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Fusion:
        return cls(
            feature_names=tuple(str(n) for n in state["feature_names"]),
            mean=tuple(float(v) for v in state["mean"]),
            std=tuple(float(v) for v in state["std"]),
            weights=tuple(float(v) for v in state["weights"]),
            cnn_weight=float(state["cnn_weight"]),
            bias=float(state["bias"]),
        )


def fit_fusion(
    cnn_logits: FloatArray,
    features: FloatArray | None,
    labels: NDArray[np.int64],
    feature_names: Sequence[str],
    l2: float = 1.0,
) -> Fusion:
    """L2-regularised logistic regression of labels (1 = generated) on [cnn_logit, z(features)].

    The CNN weight is not penalised (it is the main signal); the evidence weights are, so that a feature the
    calibration set cannot support stays near zero.
    """
    n_features = 0 if features is None else features.shape[1]
    if features is not None and n_features:
        raw = features.astype(np.float64)
        finite = np.isfinite(raw)
        mean = np.array(
            [raw[finite[:, j], j].mean() if finite[:, j].any() else 0.0 for j in range(n_features)]
        )
        std = np.array([raw[finite[:, j], j].std() if finite[:, j].any() else 1.0 for j in range(n_features)])
        std = np.where(std > 1e-12, std, 1.0)
        z = np.clip(np.where(finite, (raw - mean) / std, 0.0), -Z_CLIP, Z_CLIP)
    else:
        mean = std = np.zeros(0)
        z = np.zeros((len(labels), 0))
    x = torch.from_numpy(np.column_stack([cnn_logits.astype(np.float64), z]))
    y = torch.from_numpy(labels.astype(np.float64))
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    coef.data[0] = 1.0
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([coef, bias], max_iter=500, line_search_fn="strong_wolfe")
    # Class-balanced loss: the calibration set's class ratio is an accident of the manifest.
    positive = float(y.mean())
    sample_weight = torch.where(y > 0.5, 0.5 / max(positive, 1e-6), 0.5 / max(1 - positive, 1e-6))

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = x @ coef + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=sample_weight)
        loss = loss + l2 * (coef[1:] ** 2).sum() / len(y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimiser.step(closure)  # type: ignore[no-untyped-call]
    values = coef.detach().numpy()
    return Fusion(
        feature_names=tuple(feature_names) if n_features else (),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        weights=tuple(float(v) for v in values[1:]),
        cnn_weight=float(values[0]),
        bias=float(bias.detach()[0]),
    )
