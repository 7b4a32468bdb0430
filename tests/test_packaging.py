"""The wheel that `pip install .` builds (and the Docker images install) carries every file the code reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "db", "worker", "migrations")
#: Suffixes of files read at run time: code, weights, camera ranges, Alembic's revision template.
RUNTIME_SUFFIXES = {".py", ".pt", ".json", ".mako"}


def test_the_wheel_holds_every_file_the_packages_read(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    tracked = subprocess.run(
        ["git", "ls-files", *PACKAGES, "pyproject.toml", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    source = tmp_path / "source"
    for name in tracked:  # a copy of the tracked tree, so the build writes nothing into the checkout
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    needed = {
        name for name in tracked if name.split("/")[0] in PACKAGES and Path(name).suffix in RUNTIME_SUFFIXES
    }
    assert "models/evidence/camera_ranges.json" in needed
    assert sorted(needed - packaged) == []
