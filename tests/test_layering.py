"""The dependency direction worker -> db, models holds: checked in fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HOST_PACKAGES = ("celery", "kombu", "sqlalchemy", "redis", "httpx", "requests", "worker", "db", "alembic")


def _modules_after_import(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True
    )
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def _top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


# The package root imports little since the detector loads lazily: the modules doing the work are checked too.
@pytest.mark.parametrize(
    "module",
    [
        "models",
        "models.detector",
        "models.training",
        "models.evaluation",
        "models.taef2",
        "models.evidence.provenance",
    ],
)
def test_models_imports_no_host_framework(module):
    loaded = _top_level(_modules_after_import(module))
    assert not loaded & set(HOST_PACKAGES), sorted(loaded & set(HOST_PACKAGES))


@pytest.mark.parametrize("module", ["db", "db.queries", "db.session", "db.migrate"])
def test_db_never_imports_worker_or_celery(module):
    loaded = _top_level(_modules_after_import(module))
    assert not loaded & {"worker", "celery", "kombu", "torch", "models"}


# Commands that read or write the database, list, or print help: none of them runs the detector.
_CLI_RUN = """
import json, sys
from click.testing import CliRunner
from worker.cli import main
db = sys.argv[1]
runs = [
    ["--help"],
    ["checks", "--help"],
    ["db", "upgrade", "--db", db],
    ["checks", "--db", db],
    ["verdicts", "--db", db],
    ["webhooks", "list"],
    ["webhooks", "deliveries"],
]
results = {" ".join(args): CliRunner().invoke(main, args) for args in runs}
failed = {name: result.output for name, result in results.items() if result.exit_code != 0}
print(json.dumps({"failed": failed, "modules": sorted(sys.modules)}))
"""


def test_cli_listing_and_help_commands_import_neither_torch_nor_celery(tmp_path):
    """torch takes seconds and ~230 MB to import: only the commands that run the detector may load it, and
    Celery only those that send a message (the deferred imports in worker/cli say so)."""
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    result = subprocess.run(
        [sys.executable, "-c", _CLI_RUN, db],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
        env={**os.environ, "SYNTHGUARD_DATABASE_URL": db},
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}
    assert not _top_level(set(report["modules"])) & {"torch", "celery"}


@pytest.mark.parametrize("module", ["models", "worker.cli", "worker.client", "worker.app", "worker.pipeline"])
def test_module_import_leaves_torch_out(module):
    assert "torch" not in _modules_after_import(module)


def test_the_public_registry_lists_the_shipped_detector_in_a_fresh_interpreter():
    """`models.REGISTRY` fills on first access, although `import models` no longer imports the detectors."""
    code = "import models; print(','.join(models.REGISTRY.names()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "synthguard-v1" in result.stdout.strip().split(",")
