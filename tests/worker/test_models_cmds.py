"""`detect`, `eval`, `train` and `recalibrate`, through a click group built here (as worker/cli does)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.images import photo
from tests.models.test_evaluation import DECOMPRESSION_BOMB_GIF, HOSTILE_APNG
from tests.models.test_training import write_tiny_manifest
from worker.cli.models_cmds import MAX_FILE_BYTES, _read_image, register


@pytest.fixture
def cli() -> click.Group:
    @click.group()
    def group() -> None:
        """test group"""

    register(group)
    return group


def test_commands_are_registered(cli):
    assert {"detect", "eval", "train", "recalibrate"} <= set(cli.commands)


def test_detect_prints_one_json_object_per_image(cli, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.jpg"
    photo("astronaut.png", 200).save(first)
    photo("coffee.png", 160).save(second, quality=90)
    result = CliRunner().invoke(cli, ["detect", str(first), str(second)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["path"] for line in lines] == [str(first), str(second)]
    for line in lines:
        assert {"path", "score", "verdict", "family_scores", "evidence", "model"} <= set(line)
        assert line["model"].startswith("synthguard-v1@")
        assert line["verdict"] in {"generated", "real", "uncertain"}


def test_detect_reports_unreadable_files_and_exits_nonzero(cli, tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    photo("chelsea.png", 128).save(good)
    bad.write_bytes(b"not an image at all")
    result = CliRunner().invoke(cli, ["detect", str(bad), str(good), "--no-evidence"])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert lines[0]["error"] == "cannot read image: not an image format Pillow recognises"  # no buffer repr
    assert lines[1]["path"] == str(good) and "evidence" not in lines[1]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (HOSTILE_APNG, "APNG contains frame sequence errors"),  # SyntaxError from Pillow
        (DECOMPRESSION_BOMB_GIF, "decompression bomb"),
    ],
)
def test_detect_reports_a_hostile_file_without_losing_the_others(cli, tmp_path, data, error):
    good, hostile = tmp_path / "good.png", tmp_path / "hostile.png"
    photo("chelsea.png", 128).save(good)
    hostile.write_bytes(data)
    result = CliRunner().invoke(cli, ["detect", str(good), str(hostile), "--no-evidence"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["path"] for line in lines] == [str(good), str(hostile)]
    assert "verdict" in lines[0] and "error" not in lines[0]
    assert lines[1]["error"].startswith("cannot read image:") and error in lines[1]["error"]


def test_detect_refuses_a_file_over_the_size_cap_before_reading_it(cli, tmp_path, monkeypatch):
    good, big = tmp_path / "good.png", tmp_path / "big.png"
    photo("chelsea.png", 128).save(good)
    with big.open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: no real write of 20 MiB
    real_open = type(big).open

    def no_reading_of_big(self, *args, **kwargs):
        assert self != big, "the oversized file was opened"
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(type(big), "open", no_reading_of_big)
    result = CliRunner().invoke(cli, ["detect", str(big), str(good), "--no-evidence"])
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert lines[0] == {
        "path": str(big),
        "error": f"file too large: {MAX_FILE_BYTES + 1} bytes > limit {MAX_FILE_BYTES}",
        "model": lines[1]["model"],
    }
    assert lines[1]["path"] == str(good) and "verdict" in lines[1]


def test_detect_applies_the_workers_caps_from_the_environment(cli, tmp_path):
    """The caps a deployment sets for its workers hold for `detect` too (it used fixed defaults)."""
    wide, small = tmp_path / "wide.png", tmp_path / "small.png"
    photo("chelsea.png", 160).save(wide)
    photo("chelsea.png", 96).save(small)
    with Image.open(wide) as image:
        width, height = image.size
    env = {"SYNTHGUARD_MAX_PIXELS": str(width * height - 1)}
    result = CliRunner().invoke(cli, ["detect", str(wide), str(small), "--no-evidence"], env=env)
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    pixels = width * height
    assert lines[0]["error"] == f"image too large: {width}x{height} = {pixels} pixels > limit {pixels - 1}"
    assert "verdict" in lines[1]

    size = wide.stat().st_size
    env = {"SYNTHGUARD_MAX_INLINE_BYTES": str(size - 1)}
    result = CliRunner().invoke(cli, ["detect", str(wide), "--no-evidence"], env=env)
    assert json.loads(result.output)["error"] == f"file too large: {size} bytes > limit {size - 1}"

    result = CliRunner().invoke(cli, ["detect", str(wide)], env={"SYNTHGUARD_MAX_PIXELS": "0"})
    assert result.exit_code == 1
    assert "Error: invalid settings: SYNTHGUARD_MAX_PIXELS: " in result.output

    # A bad value of a setting `detect` does not use does not stop it.
    result = CliRunner().invoke(
        cli, ["detect", str(small), "--no-evidence"], env={"SYNTHGUARD_SECRET_KEY": "short"}
    )
    assert result.exit_code == 0, result.output


def test_detect_reads_no_more_than_the_cap_when_stat_understates_the_size(tmp_path):
    # /proc files report size 0; the read itself is bounded as well.
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc here")
    item, error = _read_image(status, max_bytes=16)
    assert item is None and error == "file too large: more than 16 bytes"


def test_detect_with_an_unusable_device_is_a_clear_error(cli, tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    photo("chelsea.png", 128).save(image)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device, message in (("mps", "MPS (Apple GPU) is not available"), ("xla", "is not supported")):
        result = CliRunner().invoke(cli, ["detect", str(image), "--device", device])
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit), result.exception
        assert message in result.output and "Traceback" not in result.output


def test_detect_small_image_is_uncertain_not_a_crash(cli, tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (20, 20)).save(tiny)
    result = CliRunner().invoke(cli, ["detect", str(tiny)])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output)
    assert line["verdict"] == "uncertain" and line["decided_by"] == "unanalysable"


def test_eval_json_and_table(cli, tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=3, size=96)
    args = ["eval", str(manifest), "--conditions", "crop512_png", "--format", "json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert list(report["conditions"]) == ["crop512_png"]
    assert report["conditions"]["crop512_png"]["n_real"] == 3
    table = CliRunner().invoke(cli, ["eval", str(manifest), "--conditions", "native"])
    assert table.exit_code == 0 and "AUC" in table.output


def test_eval_rejects_unknown_condition_and_holdout(cli, tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=2, size=96)
    bad = CliRunner().invoke(cli, ["eval", str(manifest), "--conditions", "webp"])
    assert bad.exit_code != 0 and "unknown condition" in bad.output
    missing = CliRunner().invoke(cli, ["eval", str(manifest), "--holdout-source", "fake:nowhere"])
    assert missing.exit_code != 0 and "not in the manifest" in missing.output


@pytest.mark.parametrize("command", ["eval", "train"])
def test_eval_and_train_name_an_undecodable_image_without_a_traceback(cli, tmp_path, command):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=2, size=96)
    hostile = tmp_path / "data" / "fake" / "1.png"
    hostile.write_bytes(HOSTILE_APNG)
    args = {
        "eval": ["eval", str(manifest), "--conditions", "native"],
        "train": ["train", str(manifest), "--out", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c")],
    }[command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert (
        f"Error: cannot decode {hostile}: SyntaxError: APNG contains frame sequence errors" in result.output
    )


def test_eval_names_a_manifest_row_without_a_label(cli, tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=2, size=96)
    with manifest.open("a") as handle:
        handle.write("fake/0.png\n")  # a short row: one column of five
    result = CliRunner().invoke(cli, ["eval", str(manifest), "--conditions", "native"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert f"Error: {manifest}:6: the row has no label" in result.output


def test_eval_holdout_source(cli, tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=4, size=96)
    args = ["eval", str(manifest), "--holdout-source", "fake:github:test/fake-1", "--conditions", "native"]
    result = CliRunner().invoke(cli, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["holdout_sources"] == ["fake:github:test/fake-1"]
    assert report["conditions"]["native"]["n_generated"] == 2


def test_train_then_detect_with_the_new_weights(cli, tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=6, size=96)
    out = tmp_path / "model"
    args = ["train", str(manifest), "--out", str(out), "--steps", "3", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (out / "weights.pt").is_file()
    image = tmp_path / "x.png"
    photo("rocket.jpg", 128).save(image)
    detected = CliRunner().invoke(cli, ["detect", str(image), "--weights", str(out / "weights.pt")])
    assert detected.exit_code == 0, detected.output
    assert json.loads(detected.output)["model"].startswith("synthguard-local@local+")


def test_recalibrate_for_more_crops_keeps_the_network(cli, tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=6, size=96)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    trained = tmp_path / "model" / "weights.pt"
    args = ["train", str(manifest), "--out", str(trained.parent), "--steps", "3", "--seed", "2", *cache]
    assert CliRunner().invoke(cli, args).exit_code == 0
    out = tmp_path / "more-crops"
    args = ["recalibrate", str(trained), str(manifest), "--out", str(out), "--max-crops", "4", *cache]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    before, after = torch.load(trained, weights_only=True), torch.load(out / "weights.pt", weights_only=True)
    assert (before["max_crops"], after["max_crops"]) == (8, 4)
    # The training settings (a non-default seed, hence the same calibration split) are read from the file.
    assert after["training"]["config"]["seed"] == 2 and after["training"]["config"]["steps"] == 3
    for name, tensor in before["state_dict"].items():
        assert torch.equal(tensor, after["state_dict"][name]), name


def test_recalibrate_refuses_a_file_that_is_not_weights(cli, tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=4, size=96)
    bogus = tmp_path / "weights.pt"
    bogus.write_bytes(b"not a weights file")
    result = CliRunner().invoke(cli, ["recalibrate", str(bogus), str(manifest), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x" / "weights.pt").exists()


def test_eval_leave_one_source_out(cli, tmp_path):
    manifest = write_tiny_manifest(tmp_path / "data", per_class=10, size=96)
    args = ["eval", str(manifest), "--loso", str(tmp_path / "loso"), "--loso-steps", "2"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(cli, [*args, "--holdout-source", "fake:github:test/fake-0"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary["folds"]) == ["fake:github:test/fake-0"]
    assert set(summary["mean"]) == {"native", "crop512_jpeg90", "crop512_png"}
    fold_dir = tmp_path / "loso" / "fake__github__test_fake-0"
    assert (fold_dir / "weights.pt").is_file() and (fold_dir / "eval.json").is_file()


def test_eval_leave_one_source_out_checks_every_holdout_before_training(cli, tmp_path):
    """A mistyped last source used to fail after the folds before it had trained (minutes each)."""
    manifest = write_tiny_manifest(tmp_path / "data", per_class=10, size=96)
    args = ["eval", str(manifest), "--loso", str(tmp_path / "loso"), "--loso-steps", "2"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--holdout-source", "github:test/fake-0"]
    result = CliRunner().invoke(cli, [*args, "--holdout-source", "fake:github:test/nope"])
    assert result.exit_code == 1
    assert "Error: holdout source 'fake:github:test/nope' matches no source; the manifest's sources: " in (
        result.output
    )
    assert not (tmp_path / "loso").exists()  # no fold trained

    # A bare repo names the one source it holds.
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["folds"]) == ["fake:github:test/fake-0"]
