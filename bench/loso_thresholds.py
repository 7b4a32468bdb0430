"""Where to put the "generated" threshold, and whether the evidence helps, judged on sources left out.

Reads the fold models that `bench/loso_sweep.py` trained (`OUT/<recipe>/<fold>/weights.pt`), and for each fold
scores (a) the fold's own calibration REAL images, from which a threshold is set, and (b) the fold's test
images: the held-out source and the unseen quarter of the other class. It then reports, for the fold's score
as trained ("score") and for its CNN log-odds alone ("cnn", what a Platt-calibrated CNN ranks the same way):

- ROC AUC and TPR at 1% FPR per fold and condition;
- for each margin of `models.training.real_thresholds`, the false-positive rate on every held-out real source,
  the recall on every held-out generated source, and the recall on the unseen images of seen generators.

The thresholds use only real images' scores; the margin is in units of their logit spread, so the rule is the
same whether it is applied to the calibrated score or to the CNN log-odds (an increasing affine map).

    python bench/loso_thresholds.py ../shared/datasets/dev/manifest.csv runs/sweep/shipped \
        --out runs/thresholds.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import CONDITIONS, apply_condition, load_rgb, read_manifest
from models.detector import detector_from_weights
from models.evaluation import counterpart_split, roc_auc, tpr_at_fpr
from models.training import TrainConfig, real_thresholds, training_split

MARGINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
REPORTED = ("native", "crop512_jpeg90")


def _logit(p: NDArray[Any]) -> NDArray[Any]:
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    result: NDArray[Any] = np.log(clipped / (1 - clipped))
    return result


def score_rows(weights: Path, paths: list[Path]) -> dict[str, dict[str, list[float]]]:
    """{condition: {"score": logit of the calibrated score, "cnn": CNN log-odds}} for every path."""
    detector = detector_from_weights(weights, device="cpu")
    pixels = [load_rgb(path) for path in paths]
    out: dict[str, dict[str, list[float]]] = {}
    for condition in CONDITIONS:
        fused: list[float] = []
        cnn: list[float] = []
        for start in range(0, len(pixels), 16):
            images = [apply_condition(p, condition) for p in pixels[start : start + 16]]
            for detection in detector.detect(images):
                fused.append(float(_logit(np.array(detection.score))))
                cnn.append(float(detection.evidence["learned"]["cnn_logit"]))
        out[condition] = {"score": fused, "cnn": cnn}
    return out


def fold_scores(manifest: Path, fold_dir: Path, source: str, seed: int) -> dict[str, Any]:
    """Scores of one fold's calibration reals and test rows, split exactly as `leave_one_source_out` did."""
    rows = read_manifest(manifest)
    counterpart = counterpart_split(rows, source, 0.25, seed)
    fold_config = TrainConfig(
        seed=seed, exclude_sources=(source,), exclude_paths=tuple(str(rows[i].path) for i in counterpart)
    )
    _, calibration = training_split(rows, fold_config)
    calibration_reals = [i for i in calibration if not rows[i].is_fake]
    test = [i for i, row in enumerate(rows) if row.source == source] + counterpart
    weights = fold_dir / "weights.pt"
    return {
        "source": source,
        "calibration_reals": score_rows(weights, [rows[i].path for i in calibration_reals]),
        "test": score_rows(weights, [rows[i].path for i in test]),
        "test_is_held_out": [rows[i].source == source for i in test],
        "test_is_fake": [rows[i].is_fake for i in test],
    }


def margin_threshold(calibration_reals: NDArray[Any], margin: float) -> float:
    """The product's rule (`real_thresholds`), applied to log-odds: the threshold comes back as log-odds."""
    probabilities = 1.0 / (1.0 + np.exp(-calibration_reals.astype(np.float64)))
    return float(_logit(np.array(real_thresholds(probabilities, margin)["generated"])))


def summarise(folds: list[dict[str, Any]]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for kind in ("score", "cnn"):
        per_fold: dict[str, Any] = {}
        by_margin: dict[str, Any] = {f"{m:g}": {} for m in MARGINS}
        for fold in folds:
            source = fold["source"]
            held = np.array(fold["test_is_held_out"])
            fake = np.array(fold["test_is_fake"]).astype(np.int64)
            cal = np.concatenate([fold["calibration_reals"][c][kind] for c in CONDITIONS])
            per_fold[source] = {}
            for condition in REPORTED:
                scores = np.array(fold["test"][condition][kind])
                per_fold[source][condition] = {
                    "roc_auc": round(roc_auc(fake, scores), 3),
                    "tpr_at_1fpr": round(tpr_at_fpr(fake, scores, 0.01), 3),
                }
            for margin in MARGINS:
                threshold = margin_threshold(cal, margin)
                entry = by_margin[f"{margin:g}"].setdefault(source, {})
                for condition in REPORTED:
                    flagged = np.array(fold["test"][condition][kind]) >= threshold
                    rate = "fpr" if source.startswith("real:") else "recall"
                    entry[f"held_out_{rate}_{condition}"] = round(float(flagged[held].mean()), 3)
                    if source.startswith("real:"):
                        seen = (~held) & (fake == 1)
                        entry[f"seen_generator_recall_{condition}"] = round(float(flagged[seen].mean()), 3)
        means = {c: round(float(np.mean([f[c]["roc_auc"] for f in per_fold.values()])), 3) for c in REPORTED}
        report[kind] = {"mean_roc_auc": means, "folds": per_fold, "margins": by_margin}
    return report


def print_report(report: dict[str, Any]) -> None:
    for kind, block in report.items():
        print(f"== {kind}: mean ROC AUC {block['mean_roc_auc']}")
        for margin, folds in block["margins"].items():
            fprs = [v for f in folds.values() for k, v in f.items() if k.startswith("held_out_fpr")]
            recalls = [v for f in folds.values() for k, v in f.items() if k.startswith("held_out_recall")]
            seen = [v for f in folds.values() for k, v in f.items() if k.startswith("seen_generator")]
            print(
                f"  margin {margin:>4}: held-out real FPR worst {max(fprs, default=np.nan):.3f} "
                f"mean {np.mean(fprs) if fprs else np.nan:.3f} | held-out generator recall "
                f"{np.mean(recalls) if recalls else np.nan:.3f} | seen-generator recall "
                f"{np.mean(seen) if seen else np.nan:.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("recipe_dir", type=Path, help="OUT/<recipe> of bench/loso_sweep.py")
    parser.add_argument("--out", type=Path, default=None, help="write the report (JSON) here")
    parser.add_argument("--seed", type=int, default=0, help="the seed the folds were trained with")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    folds = []
    for fold_dir in sorted(p for p in args.recipe_dir.iterdir() if (p / "eval.json").is_file()):
        source = json.loads((fold_dir / "eval.json").read_text())["holdout_sources"][0]
        cached = fold_dir / "loso_scores.json"
        if cached.is_file() and json.loads(cached.read_text()).get("source") == source:
            fold = json.loads(cached.read_text())
        else:
            fold = fold_scores(args.manifest, fold_dir, source, args.seed)
            cached.write_text(json.dumps(fold))
        folds.append(fold)
        print(f"scored {source}", flush=True)
    report = summarise(folds)
    print_report(report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
