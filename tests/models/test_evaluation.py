"""Metric functions against hand-computed cases, the evaluation conditions, and an end-to-end eval."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import create_detector
from models.data import ManifestError, ManifestRow, apply_condition, largest_sources, load_rgb, read_manifest
from models.evaluation import (
    balanced_accuracy,
    counterpart_split,
    evaluate,
    metrics_for,
    roc_auc,
    select_rows,
    summarise_folds,
    tpr_at_fpr,
)
from tests.models.test_training import write_tiny_manifest

#: Pillow's Tests/images/apng/chunk_no_fctl.png (432 bytes): Image.open succeeds, load() raises
#: SyntaxError("APNG contains frame sequence errors"), which is neither OSError nor ValueError.
HOSTILE_APNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAIAAAABACAYAAADS1n9/AAAACGFjVEwAAAABAAAAALQt6aAAAADASURBVHic7c4xEQAACAAh+5fW"
    "GAz+UYCZzWs8EIsHYvFALB6IxQOxeCAWD8TigVg8EIsHYvFALB6IxQOxeCAWD8TigVg8EIsHYvFALB6IxQOxeCAWD8TigVg8EIsH"
    "YvFALB6IxQOxeCAWD8TigVg8EIsHYvFALB6IxQOxeCAWD8TigVg8EIsHYvFALB6IxQOxeCAWD8TigVg8EIsHYvFALB6IxQOxeCAW"
    "D8TigVg8EIsHYvFALB6IxQOxeCAWD4Q6M/jDssHt8MMAAACXZmRBVAAAAAB4nO3SoQEAMBCEsNt/6e8YFUTEI9htR9d+B2AADIAB"
    "MAAGwAAYAANgAAyAATAABsAAGAADYAAMgAEwAAbAABgAA2AADIABMAAGwAAYAANgAAyAATAABsAAGAADYAAMgAHiDBBngDgDxBkg"
    "zgBxBogzQJwB4gwQZ4A4A8QZIM4AcQaIM0CcAeIMEGeAOAPEPRXYw7LaoHXkAAAAAElFTkSuQmCC"
)
#: Pillow's Tests/images/decompression_bomb.gif (44 bytes): a GIF that claims 65535x65535 pixels, so Pillow
#: raises DecompressionBombError (an Exception, not an OSError).
DECOMPRESSION_BOMB_GIF = base64.b64decode("R0lGODlhIAAgAPEDAAAAAP8AAP//AP///yH5BMkAAAAALAAAAP///ykFAI8=")


def test_roc_auc_hand_computed():
    # Pairs (generated, real): (0.9, 0.8) ok, (0.9, 0.3) ok, (0.4, 0.8) wrong, (0.4, 0.3) ok -> 3/4.
    assert roc_auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.3])) == pytest.approx(0.75)
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    # A tie counts one half: one pair tied, one won -> (1 + 0.5) / 2.
    assert roc_auc(np.array([1, 0, 0]), np.array([0.5, 0.5, 0.1])) == pytest.approx(0.75)
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.3, 0.4])))


def test_tpr_at_fpr_hand_computed():
    reals = np.arange(100) / 100.0  # 0.00 .. 0.99
    fakes = np.array([0.995, 0.985, 0.975, 0.965, 0.5, 0.1])
    labels = np.r_[np.zeros(100), np.ones(6)]
    scores = np.r_[reals, fakes]
    # 1% FPR: one real (0.99) may be above the threshold -> threshold 0.98 -> fakes 0.995, 0.985 pass.
    assert tpr_at_fpr(labels, scores, 0.01) == pytest.approx(2 / 6)
    # 5% FPR: five reals (0.95..0.99) above -> threshold 0.94 -> four fakes pass.
    assert tpr_at_fpr(labels, scores, 0.05) == pytest.approx(4 / 6)
    # 0% FPR: above the best real only.
    assert tpr_at_fpr(labels, scores, 0.0) == pytest.approx(1 / 6)


def test_tpr_at_fpr_ties_never_help():
    labels = np.array([0, 0, 1])
    scores = np.array([0.5, 0.1, 0.5])
    assert tpr_at_fpr(labels, scores, 0.0) == 0.0


def test_balanced_accuracy_hand_computed():
    labels = np.array([1, 1, 1, 1, 0, 0])
    predicted = np.array([1, 1, 1, 0, 1, 0])
    # recall 3/4, specificity 1/2 -> 0.625
    assert balanced_accuracy(labels, predicted) == pytest.approx(0.625)
    assert math.isnan(balanced_accuracy(np.ones(3), np.ones(3)))


def _row(label: str, generator: str, source: str) -> ManifestRow:
    return ManifestRow(Path("x"), label, generator, source, "PNG")  # type: ignore[arg-type]


def test_metrics_per_generator_and_real_source():
    rows = [
        _row("fake", "sdxl", "r1"),
        _row("fake", "sdxl", "r1"),
        _row("fake", "flux", "r2"),
        _row("real", "camera", "cams"),
        _row("real", "camera", "cams"),
        _row("real", "camera", "web"),
    ]
    scores = np.array([0.9, 0.2, 0.95, 0.1, 0.7, 0.3])
    result = metrics_for("native", rows, scores, threshold=0.6)
    assert result.recall_by_generator == {"flux": {"n": 1, "rate": 1.0}, "sdxl": {"n": 2, "rate": 0.5}}
    assert result.fpr_by_real_source == {"cams": {"n": 2, "rate": 0.5}, "web": {"n": 1, "rate": 0.0}}
    assert result.recall == pytest.approx(2 / 3)
    assert result.fpr == pytest.approx(1 / 3)
    assert result.balanced_accuracy == pytest.approx(0.5 * (2 / 3 + 2 / 3))
    # Pairs: 0.9 beats 0.1,0.7,0.3; 0.2 beats 0.1; 0.95 beats all three -> 7/9.
    assert result.roc_auc == pytest.approx(7 / 9)


def test_conditions_crop_without_resizing():
    rgb = np.random.default_rng(0).random((700, 600, 3)).astype(np.float32)
    jpeg = apply_condition(rgb, "crop512_jpeg90")
    png = apply_condition(rgb, "crop512_png")
    native = apply_condition(rgb, "native")
    assert jpeg.size == png.size == (512, 512)
    assert native.size == (600, 700)
    expected = np.clip(np.rint(rgb[94:606, 44:556] * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(png), expected)
    assert not np.array_equal(np.asarray(jpeg), expected)  # lossy
    assert native.info == {}
    small = apply_condition(rgb[:300, :200], "crop512_png")
    assert small.size == (200, 300)


def test_holdout_selection_and_counterparts(tmp_path):
    rows = read_manifest(write_tiny_manifest(tmp_path / "data", per_class=8))
    held = select_rows(rows, ["fake:github:test/fake-0"])
    assert {r.source for r in held if r.is_fake} == {"fake:github:test/fake-0"}
    assert all(not r.is_fake for r in held if r.source != "fake:github:test/fake-0")
    counterpart = counterpart_split(rows, "fake:github:test/fake-0", 0.25, seed=0)
    assert counterpart and all(not rows[i].is_fake for i in counterpart)
    assert {rows[i].source for i in counterpart} == {"real:github:test/real-0", "real:github:test/real-1"}
    assert largest_sources(rows, n_fake=1, n_real=1) == ["fake:github:test/fake-0", "real:github:test/real-0"]


def test_summary_averages_folds():
    def fold(auc: float, rate: float) -> dict:
        result = {"roc_auc": auc, "tpr_at_1fpr": 0, "tpr_at_5fpr": 0, "balanced_accuracy": 0}
        result |= {"recall": rate, "fpr": rate}
        return {"threshold": 0.9, "conditions": {"native": result}}

    summary = summarise_folds({"fake:a": fold(0.8, 0.5), "real:b": fold(1.0, 0.05)})
    assert summary["mean"]["native"]["roc_auc"] == pytest.approx(0.9)
    assert summary["folds"]["real:b"]["native"]["held_out_rate"] == 0.05


def test_end_to_end_eval_on_a_tiny_manifest(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=4, size=128)
    detector = create_detector("synthguard-v1", device="cpu")
    report = evaluate(detector, manifest, conditions=("native", "crop512_jpeg90"))
    assert set(report.conditions) == {"native", "crop512_jpeg90"}
    for result in report.conditions.values():
        assert result.n_real == result.n_generated == 4
        assert 0.0 <= result.roc_auc <= 1.0
        assert set(result.fpr_by_real_source) == {"github:test/real-0", "github:test/real-1"}
    table = report.to_table()
    assert "crop512_jpeg90" in table and "AUC" in table
    assert report.to_dict()["threshold"] == detector.cfg.threshold_generated


def test_too_small_images_are_counted_not_dropped(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=2, size=96)
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "real" / "0.jpg")
    report = evaluate(create_detector("synthguard-v1", device="cpu"), manifest, conditions=("native",))
    assert report.conditions["native"].unanalysable == 1
    assert report.conditions["native"].n_real == 2


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_read_manifest_accepts_a_byte_order_mark(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a BOM, which used to hide the relpath column.
    manifest = _write(tmp_path / "m.csv", "\ufeffrelpath,label\nreal/a.jpg,real\nfake/b.png,fake\n")
    rows = read_manifest(manifest)
    assert [row.path for row in rows] == [tmp_path / "real/a.jpg", tmp_path / "fake/b.png"]


def test_read_manifest_refuses_text_that_is_not_utf8(tmp_path):
    manifest = _write(tmp_path / "m.csv", "relpath,label\nréel/a.jpg,real\n", encoding="latin-1")
    with pytest.raises(ManifestError, match=r"m\.csv is not UTF-8 text"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("fake/b.png", "the row has no label"),  # short row: DictReader fills label with None
        (",fake", "the row has no relpath"),
        ("", None),  # a blank line is skipped by csv, not an error
    ],
)
def test_read_manifest_names_the_line_of_a_row_without_relpath_or_label(tmp_path, bad_row, message):
    text = f"relpath,label,generator\nreal/a.jpg,real,camera\n{bad_row}\nfake/c.png,fake,x\n"
    manifest = _write(tmp_path / "m.csv", text)
    if message is None:
        assert len(read_manifest(manifest)) == 2
        return
    with pytest.raises(ManifestError, match=rf"m\.csv:3: {message}"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    ("data", "error"),
    [(HOSTILE_APNG, "SyntaxError"), (DECOMPRESSION_BOMB_GIF, "DecompressionBombError")],
)
def test_load_rgb_turns_any_decode_failure_into_a_manifest_error(tmp_path, data, error):
    path = tmp_path / "hostile.img"
    path.write_bytes(data)
    with pytest.raises(ManifestError, match=f"cannot decode {re.escape(str(path))}: {error}"):
        load_rgb(path)
