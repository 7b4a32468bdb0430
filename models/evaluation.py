"""Metrics and the evaluation protocol: `synthguard eval MANIFEST`, and the leave-one-source-out driver.

Every metric treats "generated" as the positive class. Scores are the detector's calibrated scores; the
model's
own threshold is `threshold_generated` from its config ("uncertain" is not a positive call).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import rankdata

from models.data import (
    CONDITIONS,
    Condition,
    ManifestError,
    ManifestRow,
    apply_condition,
    largest_sources,
    load_rgb,
    read_manifest,
)

if TYPE_CHECKING:  # both import torch and the detector; evaluation loads them only when it runs a model
    from models._types import Detection
    from models.detector import Detector
    from models.training import TrainConfig

Log = Callable[[str], None]


def roc_auc(labels: NDArray[Any], scores: NDArray[Any]) -> float:
    """ROC AUC via the Mann-Whitney U statistic (ties count one half); NaN when a class is missing."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(labels: NDArray[Any], scores: NDArray[Any], max_fpr: float) -> float:
    """Largest true-positive rate over thresholds whose false-positive rate is at most `max_fpr`.

    The threshold is strict (score > t), chosen among the real images' scores, so ties never help.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    negatives = np.sort(s[~y])[::-1]
    positives = s[y]
    if len(negatives) == 0 or len(positives) == 0:
        return math.nan
    allowed = math.floor(max_fpr * len(negatives) + 1e-9)  # how many reals may score above the threshold
    threshold = negatives[allowed] if allowed < len(negatives) else -math.inf
    return float((positives > threshold).mean())


def balanced_accuracy(labels: NDArray[Any], predicted: NDArray[Any]) -> float:
    """Mean of the recall on generated and the specificity on real; NaN when a class is missing."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(predicted).astype(bool)
    if y.all() or (~y).all():
        return math.nan
    return float(0.5 * (p[y].mean() + (~p[~y]).mean()))


def rate_by_group(groups: Sequence[str], flagged: NDArray[Any]) -> dict[str, dict[str, float]]:
    """Share of flagged images per group: {group: {"n": count, "rate": share}}."""
    buckets: dict[str, list[bool]] = defaultdict(list)
    for group, flag in zip(groups, np.asarray(flagged).astype(bool), strict=True):
        buckets[group].append(bool(flag))
    return {g: {"n": len(v), "rate": float(np.mean(v))} for g, v in sorted(buckets.items())}


@dataclass
class ConditionResult:
    """Metrics for one condition."""

    condition: str
    n_real: int
    n_generated: int
    roc_auc: float
    tpr_at_1fpr: float
    tpr_at_5fpr: float
    balanced_accuracy: float
    fpr: float
    recall: float
    recall_by_generator: dict[str, dict[str, float]]
    fpr_by_real_source: dict[str, dict[str, float]]
    unanalysable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def metrics_for(
    condition: str,
    rows: Sequence[ManifestRow],
    scores: NDArray[Any],
    threshold: float,
    unanalysable: int = 0,
) -> ConditionResult:
    """All metrics of one condition from per-image scores (rows and scores aligned)."""
    labels = np.array([row.is_fake for row in rows])
    s = np.asarray(scores, dtype=np.float64)
    flagged = s >= threshold
    fakes = [row for row in rows if row.is_fake]
    reals = [row for row in rows if not row.is_fake]
    return ConditionResult(
        condition=condition,
        n_real=len(reals),
        n_generated=len(fakes),
        roc_auc=roc_auc(labels, s),
        tpr_at_1fpr=tpr_at_fpr(labels, s, 0.01),
        tpr_at_5fpr=tpr_at_fpr(labels, s, 0.05),
        balanced_accuracy=balanced_accuracy(labels, flagged),
        fpr=float(flagged[~labels].mean()) if reals else math.nan,
        recall=float(flagged[labels].mean()) if fakes else math.nan,
        recall_by_generator=rate_by_group([r.generator for r in fakes], flagged[labels]),
        fpr_by_real_source=rate_by_group([r.source_repo for r in reals], flagged[~labels]),
        unanalysable=unanalysable,
    )


@dataclass
class EvalReport:
    """Results of one evaluation run."""

    model: str
    manifest: str
    threshold: float
    holdout_sources: list[str]
    conditions: dict[str, ConditionResult] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "manifest": self.manifest,
            "threshold": self.threshold,
            "holdout_sources": self.holdout_sources,
            "seconds": round(self.seconds, 1),
            "conditions": {name: result.to_dict() for name, result in self.conditions.items()},
        }

    def to_table(self) -> str:
        lines = [
            f"model {self.model}  threshold {self.threshold:.4f}  manifest {self.manifest}",
            f"{'condition':<16}{'n_real':>7}{'n_gen':>7}{'AUC':>8}{'TPR@1%':>8}{'TPR@5%':>8}{'bal.acc':>9}"
            f"{'FPR':>7}{'recall':>8}",
        ]
        for result in self.conditions.values():
            lines.append(
                f"{result.condition:<16}{result.n_real:>7}{result.n_generated:>7}{result.roc_auc:>8.3f}"
                f"{result.tpr_at_1fpr:>8.3f}{result.tpr_at_5fpr:>8.3f}{result.balanced_accuracy:>9.3f}"
                f"{result.fpr:>7.3f}{result.recall:>8.3f}"
            )
        for result in self.conditions.values():
            lines.append(f"-- {result.condition}: recall per generator / FPR per real source")
            for name, stats in result.recall_by_generator.items():
                lines.append(f"   gen  {name:<40} n={stats['n']:<5} recall={stats['rate']:.3f}")
            for name, stats in result.fpr_by_real_source.items():
                lines.append(f"   real {name:<40} n={stats['n']:<5} FPR={stats['rate']:.3f}")
        return "\n".join(lines)


def select_rows(rows: Sequence[ManifestRow], holdout_sources: Sequence[str] = ()) -> list[ManifestRow]:
    """Rows to evaluate on: a `split == "test"` column wins; else the held-out sources plus the other class.

    With `holdout_sources`, every image of those sources is evaluated, together with all images of the other
    class that are not in the manifest's `train` split (so AUC compares the held-out source against
    something).

    Raises:
        ManifestError: a named source is not in the manifest.
    """
    if holdout_sources:
        known = {row.source for row in rows} | {row.source_repo for row in rows}
        unknown = [s for s in holdout_sources if s not in known]
        if unknown:
            raise ManifestError(
                f"holdout source(s) {unknown} not in the manifest (use 'label:repo' or 'repo')"
            )
        held = [r for r in rows if r.source in holdout_sources or r.source_repo in holdout_sources]
        held_labels = {r.label for r in held}
        others = [r for r in rows if r.label not in held_labels and r.split != "train"]
        return held + others
    tests = [row for row in rows if row.split == "test"]
    return tests or list(rows)


def evaluate(
    detector: Detector,
    manifest: Path,
    *,
    conditions: Sequence[Condition] = CONDITIONS,
    holdout_sources: Sequence[str] = (),
    batch_size: int = 16,
    log: Log | None = None,
) -> EvalReport:
    """Run `detector.detect` end to end on every selected image under every condition."""
    rows = select_rows(read_manifest(manifest), holdout_sources)
    report = _evaluate_rows(
        detector, rows, conditions=conditions, manifest=str(manifest), holdout=list(holdout_sources)
    )
    if log is not None:
        log(report.to_table())
    return report


def counterpart_split(rows: Sequence[ManifestRow], held_source: str, fraction: float, seed: int) -> list[int]:
    """Indices of a seeded `fraction` of every other-class source: the fold's test negatives (or positives).

    They are excluded from that fold's training, so a held-out fake source is compared with unseen real images
    (and a held-out real source with unseen generated images).
    """
    held_label = held_source.split(":", 1)[0]
    rng = np.random.default_rng(seed + 104729)
    by_source: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if row.label != held_label:
            by_source[row.source].append(index)
    chosen: list[int] = []
    for source in sorted(by_source):
        members = by_source[source]
        order = rng.permutation(len(members))
        chosen += [members[i] for i in order[: max(1, round(len(members) * fraction))]]
    return sorted(chosen)


#: Share of every source of the other class a leave-one-source-out fold holds back to test against.
COUNTERPART_FRACTION = 0.25


def fold_test_rows(
    rows: Sequence[ManifestRow], source: str, seed: int, fraction: float = COUNTERPART_FRACTION
) -> tuple[list[ManifestRow], list[int]]:
    """A fold's test images (held-out source, then unseen counterparts) and the counterparts' indices."""
    counterpart = counterpart_split(rows, source, fraction, seed)
    return [r for r in rows if r.source == source] + [rows[i] for i in counterpart], counterpart


def fold_dir_name(source: str) -> str:
    """The folder of a leave-one-source-out fold: the held-out source's key, made safe as a file name."""
    return source.replace(":", "__").replace("/", "_")


def fold_sources(rows: Sequence[ManifestRow], names: Sequence[str]) -> list[str]:
    """The `label:repo` source of each name (`label:repo`, or a `repo` with images of one label only).

    Checked before the first fold trains, so a mistyped last name does not cost the folds before it.

    Raises:
        ManifestError: a name matches no source, or a repo with images of both labels.
    """
    known = sorted({row.source for row in rows})
    resolved: list[str] = []
    for name in names:
        matches = [name] if name in known else [s for s in known if s.split(":", 1)[1] == name]
        if len(matches) != 1:
            problem = "matches no source" if not matches else f"is ambiguous ({', '.join(matches)})"
            raise ManifestError(
                f"holdout source {name!r} {problem}; the manifest's sources: {', '.join(known)}"
            )
        resolved.append(matches[0])
    return resolved


def leave_one_source_out(
    manifest: Path,
    out_dir: Path,
    *,
    train_config: TrainConfig,
    sources: Sequence[str] = (),
    taef2_dir: Path | None = None,
    counterpart_fraction: float = COUNTERPART_FRACTION,
    cache_dir: Path = Path("runs/cache"),
    networks_from: Path | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Train one model per held-out source and evaluate it on that source against unseen other-class images.

    `sources` defaults to the 5 largest fake and 3 largest real sources. Each fold's verdicts use that fold's
    own threshold, set (as for the shipped model) from its calibration reals only. Results go to
    `out_dir/<fold>/eval.json` and `out_dir/loso_summary.json`.

    With `networks_from` (another run's `out_dir`, trained with the same seed and recipe up to its
    detection-time settings) each fold's network is taken from there and only calibrated again under
    `train_config`, so a change in which crops are read or where the thresholds sit is measured on the very
    same networks.

    Raises:
        WeightsError: a fold of `networks_from` has no weights.
    """
    from models.detector import detector_from_weights  # noqa: PLC0415 - avoids a cycle at import
    from models.training import recalibrate, train  # noqa: PLC0415

    rows = read_manifest(manifest)
    chosen = fold_sources(rows, sources) if sources else largest_sources(rows)
    folds: dict[str, Any] = {}
    evidence_cache: dict[bytes, Any] = {}  # the hand-made evidence does not depend on the fold's model
    summary_path = out_dir / "loso_summary.json"
    for source in chosen:
        fold_dir = out_dir / fold_dir_name(source)
        test_rows, counterpart = fold_test_rows(rows, source, train_config.seed, counterpart_fraction)
        config = replace(
            train_config,
            exclude_sources=(source,),
            exclude_paths=tuple(str(rows[i].path) for i in counterpart),
        )
        log(f"== fold {source}: training without it and without {len(counterpart)} test counterparts")
        weights = fold_dir / "weights.pt"
        if not weights.is_file() and networks_from is not None:
            source_weights = networks_from / fold_dir_name(source) / "weights.pt"
            recalibrate(source_weights, manifest, fold_dir, config, cache_dir=cache_dir, log=log)
        elif not weights.is_file():
            train(manifest, fold_dir, config, taef2_dir=taef2_dir, cache_dir=cache_dir, log=log)
        detector = detector_from_weights(weights)
        detector.evidence_cache = evidence_cache
        report = _evaluate_rows(
            detector, test_rows, conditions=CONDITIONS, manifest=str(manifest), holdout=[source]
        )
        (fold_dir / "eval.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        folds[source] = report.to_dict()
        log(report.to_table().split("\n-- ")[0])
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summarise_folds(folds), indent=2) + "\n")
    return summarise_folds(folds)


def summarise_folds(folds: dict[str, Any]) -> dict[str, Any]:
    """Mean AUC per condition over folds, and the false-positive rate of each held-out real source."""
    summary: dict[str, Any] = {"folds": {}, "mean": {}}
    for source, report in folds.items():
        summary["folds"][source] = {
            cond: {
                "roc_auc": result["roc_auc"],
                "tpr_at_1fpr": result["tpr_at_1fpr"],
                "tpr_at_5fpr": result["tpr_at_5fpr"],
                "balanced_accuracy": result["balanced_accuracy"],
                "held_out_rate": result["recall"] if source.startswith("fake:") else result["fpr"],
                "threshold": report["threshold"],
            }
            for cond, result in report["conditions"].items()
        }
    for condition in CONDITIONS:
        aucs = [f[condition]["roc_auc"] for f in summary["folds"].values() if condition in f]
        if aucs:
            summary["mean"][condition] = {"roc_auc": float(np.mean(aucs)), "folds": len(aucs)}
    return summary


def detections_under(
    detector: Detector, pixels: Sequence[NDArray[np.float32]], condition: Condition, batch_size: int = 16
) -> Iterator[Detection]:
    """`detector.detect` on every image made to `condition` (see `apply_condition`), in order, in batches."""
    for start in range(0, len(pixels), batch_size):
        yield from detector.detect(
            [apply_condition(p, condition) for p in pixels[start : start + batch_size]]
        )


def _evaluate_rows(
    detector: Detector,
    rows: Sequence[ManifestRow],
    *,
    conditions: Sequence[Condition],
    manifest: str,
    holdout: list[str],
) -> EvalReport:
    started = time.monotonic()
    report = EvalReport(
        model=detector.model_id,
        manifest=manifest,
        threshold=detector.cfg.threshold_generated,
        holdout_sources=holdout,
    )
    pixels = [load_rgb(row.path) for row in rows]
    for condition in conditions:
        scores = np.empty(len(rows))
        unanalysable = 0
        for index, detection in enumerate(detections_under(detector, pixels, condition)):
            scores[index] = detection.score
            unanalysable += detection.decided_by == "unanalysable"
        report.conditions[condition] = metrics_for(
            condition, rows, scores, detector.cfg.threshold_generated, unanalysable
        )
    report.seconds = time.monotonic() - started
    return report
