"""How a model's per-crop log-odds depend on how textured the crop is, on images it never trained on.

For every image, up to `--candidates` lattice-aligned 64 px crops are read (the detector's deterministic grid,
denser), each with its CNN log-odds of "generated" and its texture (`models.preprocess.crop_texture`: the
mean absolute Laplacian of its luminance). Printed per evaluation condition: ROC AUC of the image score
made by averaging the crops' log-odds over (a) the detector's own 8 grid crops, (b) every candidate, (c) the
8 flattest candidates, (d) the 8 most textured; and the crop-level AUC per texture quartile (crops pooled
over images).

    python bench/crop_texture_probe.py ../shared/datasets/dev/manifest.csv

By default it reads the shipped weights' own calibration split (`TrainConfig(seed=0)`): images the CNN never
trained on, from the sources it trained beside. With `--fold-dir` it reads a leave-one-source-out fold's
held-out images instead (its `eval.json` names the source; the counterpart images are re-derived).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models._scoring import crop_tensor
from models.data import CONDITIONS, build_pixel_cache, read_manifest
from models.detector import detector_from_weights
from models.evaluation import fold_test_rows
from models.nets import generated_logit
from models.preprocess import crop_texture, prepare_image
from models.training import TrainConfig, condition_pixels, pixel_cache_path, roc_auc, training_split


@torch.inference_mode()
def crop_logits(
    net: torch.nn.Module, rgb: NDArray[np.float32], count: int, offset: tuple[int, int]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    batch = crop_tensor(rgb, 64, count, offset)
    texture = np.array([crop_texture(crop.permute(1, 2, 0).numpy()) for crop in batch], dtype=np.float32)
    return generated_logit(net(batch)).numpy(), texture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--weights", type=Path, default=Path("models/weights/synthguard-v1.pt"))
    parser.add_argument("--fold-dir", type=Path, default=None)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
    parser.add_argument("--out", type=Path, default=None, help="write the per-crop numbers here (.npz)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = read_manifest(args.manifest)
    cache = build_pixel_cache(rows, pixel_cache_path(rows, args.cache_dir))
    if args.fold_dir is not None:
        source = json.loads((args.fold_dir / "eval.json").read_text())["holdout_sources"][0]
        test_rows, _ = fold_test_rows(rows, source, TrainConfig().seed)
        position = {str(row.path): i for i, row in enumerate(rows)}
        indices = [position[str(row.path)] for row in test_rows]
        detector = detector_from_weights(args.fold_dir / "weights.pt")
    else:
        _, indices = training_split(rows, TrainConfig(seed=0))
        detector = detector_from_weights(args.weights)
    net = detector.net.float().cpu().eval()
    labels = np.array([int(rows[i].is_fake) for i in indices])
    saved: dict[str, NDArray[np.float32]] = {}
    for condition in ("native", "crop512_jpeg90"):
        assert condition in CONDITIONS
        scores: dict[str, list[float]] = {"grid8": [], "all": [], "flattest8": [], "richest8": []}
        pooled_logit: list[NDArray[np.float32]] = []
        pooled_texture: list[NDArray[np.float32]] = []
        pooled_label: list[NDArray[np.int64]] = []
        for index in indices:
            pixels = condition_pixels(cache.images[index], condition)
            prepared = prepare_image(Image.fromarray(pixels))
            grid_logits, _ = crop_logits(net, prepared.rgb, 8, prepared.grid_offset)
            logits, texture = crop_logits(net, prepared.rgb, args.candidates, prepared.grid_offset)
            order = np.argsort(texture, kind="stable")
            scores["grid8"].append(float(grid_logits.mean()))
            scores["all"].append(float(logits.mean()))
            scores["flattest8"].append(float(logits[order[:8]].mean()))
            scores["richest8"].append(float(logits[order[-8:]].mean()))
            pooled_logit.append(logits)
            pooled_texture.append(texture)
            pooled_label.append(np.full(len(logits), int(rows[index].is_fake)))
        print(f"== {condition}: {len(indices)} images ({labels.sum()} generated)")
        for name, values in scores.items():
            print(f"  image AUC {name:>10}: {roc_auc(labels, np.array(values)):.3f}")
        logit_all = np.concatenate(pooled_logit)
        texture_all = np.concatenate(pooled_texture)
        label_all = np.concatenate(pooled_label)
        edges = np.quantile(texture_all, [0.25, 0.5, 0.75])
        bins = np.digitize(texture_all, edges)
        for q in range(4):
            chosen = bins == q
            print(
                f"  crop AUC texture quartile {q + 1}: {roc_auc(label_all[chosen], logit_all[chosen]):.3f} "
                f"({chosen.sum()} crops, {label_all[chosen].mean():.2f} generated)"
            )
        saved[f"{condition}_logit"] = logit_all
        saved[f"{condition}_texture"] = texture_all
        saved[f"{condition}_label"] = label_all.astype(np.float32)
    if args.out is not None:
        np.savez(args.out, **saved)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
