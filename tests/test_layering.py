"""The dependency direction worker -> db, models holds: checked in fresh interpreters."""

from __future__ import annotations

import json
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


def test_models_imports_no_host_framework():
    loaded = _top_level(_modules_after_import("models"))
    assert not loaded & set(HOST_PACKAGES), sorted(loaded & set(HOST_PACKAGES))


@pytest.mark.parametrize("module", ["db", "db.queries", "db.session", "db.migrate"])
def test_db_never_imports_worker_or_celery(module):
    loaded = _top_level(_modules_after_import(module))
    assert not loaded & {"worker", "celery", "kombu", "torch", "models"}
