"""Leave-one-source-out AUC of the average of several fold models, against each model alone.

    .venv/bin/python bench/loso_ensemble.py ../shared/datasets/dev/manifest.csv runs/ens \
        --members shipped,shipped_init1

Reads the folds that `bench/loso_sweep.py --out OUT` trained for every member recipe (OUT/<recipe>/<fold>/
weights.pt). The members must share their data splits (same `TrainConfig.seed`, differing e.g. in
`init_seed`), so each fold is scored on one set of test images: the held-out source and the fold's unseen
share of the other class, rebuilt with `fold_test_rows` exactly as the fold was. Per image and condition,
the average model's log-odds are the mean of the members' CNN log-odds (a Platt scaling of the average would
rank the images the same way). Prints a table and writes OUT/ensemble.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from models.data import CONDITIONS, Condition, load_rgb, read_manifest
from models.detector import Detector, detector_from_weights
from models.evaluation import detections_under, fold_test_rows, roc_auc


def member_logits(detector: Detector, pixels: list[NDArray[np.float32]], condition: Condition) -> np.ndarray:
    """The detector's CNN log-odds for every image under `condition`, in order."""
    logits = np.empty(len(pixels))
    for index, detection in enumerate(detections_under(detector, pixels, condition)):
        learned = detection.evidence.get("learned", {})
        if "cnn_logit" not in learned:
            raise RuntimeError(f"image {index} was not scored: {detection.reasons}")
        logits[index] = learned["cnn_logit"]
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path, help="the --out directory of bench/loso_sweep.py")
    parser.add_argument("--members", required=True, help="comma-separated recipes to average")
    args = parser.parse_args()
    members = [m for m in args.members.split(",") if m]
    if len(members) < 2:
        parser.error("name at least two member recipes")
    torch.set_num_threads(1)
    rows = read_manifest(args.manifest)
    finished = [{path.parent.name for path in (args.out / m).glob("*/eval.json")} for m in members]
    fold_dirs = sorted(set.intersection(*finished))
    if not fold_dirs:
        parser.error(f"no fold under {args.out} is finished for every member")
    evidence_cache: dict[bytes, Any] = {}  # pixel evidence does not depend on the member
    folds: dict[str, Any] = {}
    for fold_dir in fold_dirs:
        report = json.loads((args.out / members[0] / fold_dir / "eval.json").read_text())
        source = report["holdout_sources"][0]
        detectors = [
            detector_from_weights(args.out / m / fold_dir / "weights.pt", device="cpu") for m in members
        ]
        seeds = {d.training_info["config"]["seed"] for d in detectors}
        if len(seeds) != 1:
            raise SystemExit(f"{fold_dir}: members were trained on different splits (seeds {sorted(seeds)})")
        test_rows, _ = fold_test_rows(rows, source, seeds.pop())
        labels = np.array([r.is_fake for r in test_rows])
        pixels = [load_rgb(r.path) for r in test_rows]
        per_condition: dict[str, Any] = {}
        for condition in CONDITIONS:
            logits = []
            for detector in detectors:
                detector.evidence_cache = evidence_cache
                logits.append(member_logits(detector, pixels, condition))
            member_aucs = [roc_auc(labels, values) for values in logits]
            per_condition[condition] = {
                "members": dict(zip(members, member_aucs, strict=True)),
                "mean_of_members": float(np.mean(member_aucs)),
                "average_model": roc_auc(labels, np.mean(logits, axis=0)),
            }
        n_source = sum(r.source == source for r in test_rows)
        folds[source] = {"n": n_source, "n_test": len(test_rows), "conditions": per_condition}
        for name, result in per_condition.items():
            aucs = " ".join(f"{a:.3f}" for a in result["members"].values())
            print(
                f"{source:55} {name:15} members {aucs}  mean {result['mean_of_members']:.3f}  "
                f"average model {result['average_model']:.3f}",
                flush=True,
            )
    weights = np.array([fold["n"] for fold in folds.values()], dtype=float)
    summary: dict[str, Any] = {"members": members, "folds": folds, "weighted_mean": {}}
    for condition in CONDITIONS:
        single, averaged = (
            float(np.average([f["conditions"][condition][key] for f in folds.values()], weights=weights))
            for key in ("mean_of_members", "average_model")
        )
        summary["weighted_mean"][condition] = {"mean_of_members": single, "average_model": averaged}
        print(
            f"fold-size-weighted mean over {len(folds)} folds, {condition}: members {single:.3f}, "
            f"average model {averaged:.3f} ({averaged - single:+.3f})"
        )
    (args.out / "ensemble.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
