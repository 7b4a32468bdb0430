"""docker/compose.yml cannot be run here (no Docker); this keeps it consistent with the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.settings import ENV_PREFIX, Settings

DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"


@pytest.fixture(scope="module")
def compose() -> Any:
    return yaml.safe_load((DOCKER_DIR / "compose.yml").read_text(encoding="utf-8"))


def _environments(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service.get("environment") or {} for name, service in compose["services"].items()}


def test_every_synthguard_variable_is_a_real_setting(compose):
    fields = {name.upper() for name in Settings.model_fields}
    seen = set()
    for service, environment in _environments(compose).items():
        assert isinstance(environment, dict), f"{service}: use the mapping form for environment"
        for variable in environment:
            if variable.startswith(ENV_PREFIX):
                seen.add(variable)
                assert variable.removeprefix(ENV_PREFIX) in fields, f"{service} sets unknown {variable}"
    assert {"SYNTHGUARD_DATABASE_URL", "SYNTHGUARD_BROKER_URL", "SYNTHGUARD_SECRET_KEY"} <= seen


def test_the_settings_the_worker_gets_are_valid(compose):
    environment = _environments(compose)["worker"]
    # Substitute ${VAR:?...} / ${VAR:-default} the way compose does, with sample values for required ones.
    samples = {"POSTGRES_PASSWORD": "pw", "SYNTHGUARD_SECRET_KEY": "0123456789abcdef0123456789abcdef"}

    def substitute(value: Any) -> str:
        def one(match: re.Match[str]) -> str:
            name, operator, rest = match.group(1), match.group(2), match.group(3)
            if name in samples:
                return samples[name]
            assert operator == ":-", f"${{{name}}} has no default and no sample"
            return rest

        return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", one, str(value))

    values = {
        key.removeprefix("SYNTHGUARD_").lower(): substitute(value)
        for key, value in environment.items()
        if key.startswith("SYNTHGUARD_")
    }
    settings = Settings.model_validate(values)
    assert settings.database_url.startswith("postgresql+psycopg://synthguard:pw@postgres")


def test_services_wait_for_healthy_dependencies_and_the_migration(compose):
    services = compose["services"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    assert "healthcheck" in services["redis"] and "healthcheck" in services["postgres"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for worker in ("worker", "worker-gpu"):
        depends = services[worker]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_dockerfiles_copy_every_package():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DOCKER_DIR / name).read_text(encoding="utf-8")
        for package in ("models", "db", "worker", "migrations"):
            assert f"COPY {package} ./{package}" in text, f"{name} misses {package}/"
        assert 'ENTRYPOINT ["synthguard"]' in text
