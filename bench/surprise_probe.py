"""Probe: does a pixel predictor trained on real photos only find generated images less surprising?

    .venv/bin/python bench/surprise_probe.py ../shared/datasets/dev/manifest.csv --out runs/surprise

The idea is zero-shot detection by coding cost (Cozzolino et al., "Zero-Shot Detection of AI-Generated
Images", ECCV 2024): a model of real images' pixels predicts each pixel from its neighbours; on a real photo
the actual coding cost (negative log-likelihood) matches what the model itself expects (the entropy of its
predicted distributions), while generated images, smoother in their fine detail, cost less than expected.
No generated image is used in training, so every generator in the dev set is unseen.

The predictor here is a blind-spot network: one 7x7 convolution whose centre tap is zeroed for all three
channels, then 1x1 layers, so each pixel is predicted from its 48 neighbours only (not from itself). It
outputs, per pixel and channel, the location and scale of a Laplace distribution. The image statistic is the
mean over pixels and channels of (NLL - entropy), the "surprise gap"; the fake-ness score is its negative
(fixed before the run: generated images are expected to be less surprising). The mean NLL alone is reported
beside it.

Two settings, both scored in the `native` and `crop512_jpeg90` conditions (the dev images are at most 512 px,
so `crop512_png` equals `native`):
- `half`: trained on a seeded half of every real source; the other half against all generated images;
- `without:<source>`: trained on every real image of the other sources; that source against all generated
  images (the three largest real sources).
Training crops get the detector's own augmentation (`models.training.augmented_crop`): JPEG histories drawn
alike, so the predictor knows compressed and lossless photos.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from models.data import LOSSLESS_FORMATS, build_pixel_cache, largest_sources, read_manifest
from models.evaluation import roc_auc
from models.training import (
    Augmentation,
    Sample,
    augmented_crop,
    condition_pixels,
    pixel_cache_path,
)

KERNEL = 7
WIDTH = 32
BATCH = 32
#: The statistic is read on the centre crop of at most this side (cropped, not resized), after the condition.
SCORE_SIDE = 256
CROP = 64
CONDITIONS_SCORED = ("native", "crop512_jpeg90")


class BlindSpotPredictor(nn.Module):
    """Per pixel and channel, a Laplace location and log-scale predicted from the 7x7 neighbourhood without
    the pixel itself."""

    mask: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.neighbours = nn.Conv2d(3, WIDTH, KERNEL)
        mask = torch.ones(1, 1, KERNEL, KERNEL)
        mask[..., KERNEL // 2, KERNEL // 2] = 0.0
        self.register_buffer("mask", mask)
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(WIDTH, WIDTH, 1),
            nn.ReLU(),
            nn.Conv2d(WIDTH, WIDTH, 1),
            nn.ReLU(),
            nn.Conv2d(WIDTH, 6, 1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.neighbours.weight * self.mask
        features = nn.functional.conv2d(x, weight, self.neighbours.bias)
        out = self.head(features)
        margin = KERNEL // 2
        location = out[:, :3] + _neighbour_mean(x)[..., margin:-margin, margin:-margin]
        log_scale = out[:, 3:].clamp(-9.0, 2.0)
        return location, log_scale


def _neighbour_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of the 8 adjacent pixels: a baseline prediction the network corrects."""
    kernel = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device) / 8.0
    kernel[:, :, 1, 1] = 0.0
    return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def laplace_terms(model: BlindSpotPredictor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel NLL and entropy (nats) of the pixels the model predicts, on the [0, 1] scale."""
    location, log_scale = model(x)
    margin = KERNEL // 2
    target = x[..., margin:-margin, margin:-margin]
    nll = (target - location).abs() / log_scale.exp() + log_scale + np.log(2.0)
    entropy = 1.0 + np.log(2.0) + log_scale
    return nll, entropy


def to_tensor(pixels: NDArray[np.uint8]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div(255.0)


def train_predictor(samples: list[Sample], steps: int, seed: int) -> BlindSpotPredictor:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = BlindSpotPredictor()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    aug = Augmentation()
    usable = [s for s in samples if min(s.pixels.shape[:2]) >= CROP]
    for step in range(steps):
        batch = torch.stack(
            [
                to_tensor(augmented_crop(usable[int(rng.integers(len(usable)))], CROP, aug, rng))
                for _ in range(BATCH)
            ]
        )
        nll, _ = laplace_terms(model, batch)
        loss = nll.mean()
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        schedule.step()
        if step % 500 == 0:
            print(f"  step {step} nll {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def image_statistics(model: BlindSpotPredictor, pixels: NDArray[np.uint8]) -> tuple[float, float]:
    """(mean surprise gap, mean NLL) of one image's centre crop."""
    height, width = pixels.shape[:2]
    top, left = max(0, (height - SCORE_SIDE) // 2), max(0, (width - SCORE_SIDE) // 2)
    centre = pixels[top : top + SCORE_SIDE, left : left + SCORE_SIDE]
    nll, entropy = laplace_terms(model, to_tensor(centre)[None])
    return float((nll - entropy).mean()), float(nll.mean())


def score_setting(
    model: BlindSpotPredictor,
    images: list[NDArray[np.uint8]],
    labels: NDArray[np.int64],
    groups: list[str],
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for condition in CONDITIONS_SCORED:
        stats = np.array([image_statistics(model, condition_pixels(img, condition)) for img in images])
        fake_by_gap, fake_by_nll = -stats[:, 0], -stats[:, 1]
        per_generator = {}
        for group in sorted(set(groups)):
            chosen = np.array([g == group or label == 0 for g, label in zip(groups, labels, strict=True)])
            if group.startswith("fake:") and chosen.sum() > labels[chosen].sum():
                per_generator[group] = roc_auc(labels[chosen], fake_by_gap[chosen])
        result[condition] = {
            "auc_gap": roc_auc(labels, fake_by_gap),
            "auc_nll": roc_auc(labels, fake_by_nll),
            "gap_mean_real": float(stats[labels == 0, 0].mean()),
            "gap_mean_fake": float(stats[labels == 1, 0].mean()),
            "auc_gap_by_fake_source": per_generator,
        }
        print(
            f"  {condition}: AUC gap {result[condition]['auc_gap']:.3f}"
            f" nll {result[condition]['auc_nll']:.3f}",
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/surprise"))
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="half,without", help="half, without, or both")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = read_manifest(args.manifest)
    cache = build_pixel_cache(rows, pixel_cache_path(rows, args.cache_dir))
    real = [i for i, r in enumerate(rows) if not r.is_fake]
    fake = [i for i, r in enumerate(rows) if r.is_fake]

    def sample(i: int) -> Sample:
        row = rows[i]
        return Sample(cache.images[i], 0, row.file_format in LOSSLESS_FORMATS, row.source)

    settings: list[tuple[str, list[int], list[int]]] = []
    if "half" in args.settings:
        rng = np.random.default_rng(args.seed + 101)
        train_idx: list[int] = []
        test_idx: list[int] = []
        for source in sorted({rows[i].source for i in real}):
            members = [i for i in real if rows[i].source == source]
            order = rng.permutation(len(members))
            half = len(members) // 2
            train_idx += [members[k] for k in order[:half]]
            test_idx += [members[k] for k in order[half:]]
        settings.append(("half", train_idx, test_idx))
    if "without" in args.settings:
        for source in [s for s in largest_sources(rows) if s.startswith("real:")]:
            settings.append(
                (
                    f"without:{source}",
                    [i for i in real if rows[i].source != source],
                    [i for i in real if rows[i].source == source],
                )
            )
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, train_idx, test_real in settings:
        started = time.monotonic()
        print(f"{name}: training on {len(train_idx)} real images", flush=True)
        model = train_predictor([sample(i) for i in train_idx], args.steps, args.seed)
        test = test_real + fake
        labels = np.array([int(rows[i].is_fake) for i in test], dtype=np.int64)
        results[name] = score_setting(
            model, [cache.images[i] for i in test], labels, [rows[i].source for i in test]
        )
        results[name]["minutes"] = (time.monotonic() - started) / 60
        (args.out / "surprise.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: {c: v[c]["auc_gap"] for c in CONDITIONS_SCORED} for k, v in results.items()}))


if __name__ == "__main__":
    main()
