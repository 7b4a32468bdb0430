"""Settings: defaults, environment, validation with one-line errors, and a clean stop of the commands."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest
from pydantic import SecretStr

from worker.settings import Settings, SettingsError, load_settings


def test_defaults_are_the_documented_ones(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SYNTHGUARD_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.database_url == "sqlite:///./synthguard.db"
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.allow_private_hosts == ""
    assert settings.secret_key is None
    assert settings.fetch_max_bytes == 20 * 1024 * 1024
    assert settings.max_pixels == 40_000_000
    assert settings.max_attempts == 5
    assert settings.store_raw_images is False


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("SYNTHGUARD_MAX_PIXELS", "1234")
    monkeypatch.setenv("SYNTHGUARD_ALLOW_PRIVATE_HOSTS", "127.0.0.1, localhost,10.0.0.0/8")
    monkeypatch.setenv("SYNTHGUARD_DATABASE_URL", "postgresql://u:pw@db/synthguard")
    settings = load_settings()
    assert settings.max_pixels == 1234
    assert settings.private_host_names == {"127.0.0.1", "localhost"}
    assert [str(network) for network in settings.private_networks] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert settings.database_url == "postgresql+psycopg://u:pw@db/synthguard"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"database_url": "mysql://root:hunter2@db/x"},
            "SYNTHGUARD_DATABASE_URL: unsupported database 'mysql'",
        ),
        ({"database_url": "not a url"}, "SYNTHGUARD_DATABASE_URL: not a database URL"),
        ({"broker_url": "localhost:6379"}, "SYNTHGUARD_BROKER_URL: not a broker URL"),
        ({"secret_key": "changeme"}, "SYNTHGUARD_SECRET_KEY: is a placeholder"),
        ({"secret_key": "short"}, "SYNTHGUARD_SECRET_KEY: is shorter than 16"),
        # Weak keys of the required length: a database dump makes each guess checkable offline.
        ({"secret_key": " " * 16}, "SYNTHGUARD_SECRET_KEY: is only whitespace"),
        ({"secret_key": "a" * 16}, "SYNTHGUARD_SECRET_KEY: has fewer than 8 different characters"),
        ({"secret_key": "changemechangeme"}, "SYNTHGUARD_SECRET_KEY: has fewer than 8 different characters"),
        ({"secret_key": "password12345678"}, "SYNTHGUARD_SECRET_KEY: is a placeholder"),
        ({"secret_key": "Synthguard-2026!"}, "SYNTHGUARD_SECRET_KEY: is a placeholder"),
        (
            {"allow_private_hosts": "10.0.0.0/33"},
            "SYNTHGUARD_ALLOW_PRIVATE_HOSTS: entry 1 is not a valid CIDR",
        ),
        (
            {"allow_private_hosts": "127.0.0.1,a b"},
            "SYNTHGUARD_ALLOW_PRIVATE_HOSTS: entry 2 is not a host name or IP address",
        ),
        ({"max_pixels": 0}, "SYNTHGUARD_MAX_PIXELS"),
        ({"fetch_max_bytes": 0}, "SYNTHGUARD_FETCH_MAX_BYTES"),
        ({"batch_size": 0}, "SYNTHGUARD_BATCH_SIZE"),  # range(0, n, 0) raises deep in the reconciler
        ({"max_attempts": 0}, "SYNTHGUARD_MAX_ATTEMPTS"),  # would dead-letter every check unprocessed
        ({"device": "tpu"}, "SYNTHGUARD_DEVICE: must be auto"),
        # Durations end up in datetimes and deadlines: an infinite or absurd one must fail here, not there.
        ({"decode_timeout_s": float("inf")}, "SYNTHGUARD_DECODE_TIMEOUT_S"),
        ({"fetch_timeout_s": float("nan")}, "SYNTHGUARD_FETCH_TIMEOUT_S"),
        ({"webhook_sweep_grace_s": 1e12}, "SYNTHGUARD_WEBHOOK_SWEEP_GRACE_S"),
        ({"webhook_retry_delays_s": "0,inf"}, "SYNTHGUARD_WEBHOOK_RETRY_DELAYS_S"),
        ({"webhook_retry_delays_s": "0,1e12"}, "SYNTHGUARD_WEBHOOK_RETRY_DELAYS_S"),
        ({"queue_name": ""}, "SYNTHGUARD_QUEUE_NAME"),
        ({"queue_name": "has space"}, "SYNTHGUARD_QUEUE_NAME"),
        ({"queue_name": "other.webhooks"}, "SYNTHGUARD_QUEUE_NAME"),  # another deployment's webhook queue
    ],
)
def test_invalid_settings_give_one_line_naming_the_variable(overrides, expected):
    with pytest.raises(SettingsError) as caught:
        load_settings(**overrides)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert "hunter2" not in message  # values (which may hold passwords) are never echoed


@pytest.mark.parametrize("padded", ["{key}\n", "{key}\r\n", " {key}", "{key}\t"])
def test_a_secret_key_with_surrounding_whitespace_is_refused_without_echoing_it(monkeypatch, padded):
    """A key read from a Kubernetes/Docker secret file keeps its newline; `$(cat file)` strips it. The two
    are different keys: a worker holding one fails every delivery signed with a secret the CLI stored."""
    key = "hunter2" + secrets.token_hex(16)
    monkeypatch.setenv("SYNTHGUARD_SECRET_KEY", padded.format(key=key))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "SYNTHGUARD_SECRET_KEY: has leading or trailing whitespace" in message
    assert "\n" not in message and "hunter2" not in message


@pytest.mark.parametrize(
    "key",
    [
        secrets.token_hex(
            32
        ),  # what the README recommends (`openssl rand -hex 32`) and tests/conftest.py uses
        secrets.token_urlsafe(32),
        "0123456789abcdef0123456789abcdef",  # the key tests use for SQLite and compose
        "correct horse battery staple",  # inner spaces are part of the key
        "changeme-7f3a9c2e1b8d",  # a placeholder word with real randomness beside it
    ],
)
def test_strong_secret_keys_are_accepted(key):
    assert load_settings(secret_key=key).require_secret_key() == key


def test_fallback_keys_are_split_on_commas_and_checked_like_the_key(monkeypatch):
    old, older = secrets.token_hex(32), secrets.token_urlsafe(32)
    monkeypatch.setenv("SYNTHGUARD_SECRET_KEY", secrets.token_hex(32))
    monkeypatch.setenv("SYNTHGUARD_SECRET_KEY_FALLBACKS", f" {old} ,{older},")
    assert [key.get_secret_value() for key in load_settings().secret_key_fallbacks] == [old, older]

    monkeypatch.setenv("SYNTHGUARD_SECRET_KEY_FALLBACKS", f"{old},hunter2")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message == (
        "invalid settings: SYNTHGUARD_SECRET_KEY_FALLBACKS: entry 2 is shorter than 16 characters"
    )
    assert old not in message  # by position, never by value


def test_settings_built_directly_never_repeat_a_value_in_their_errors():
    """load_settings formats its own message; Settings(...) raised by a script must not leak a key either."""
    from pydantic import ValidationError

    key = secrets.token_hex(10)  # short enough that pydantic would not abbreviate it in the message
    with pytest.raises(ValidationError) as caught:
        Settings(secret_key=secrets.token_hex(32), secret_key_fallbacks=f"{key},short")
    assert "entry 2 is shorter than 16 characters" in str(caught.value)
    assert key not in str(caught.value)


def test_fallback_keys_without_a_key_are_refused(monkeypatch):
    monkeypatch.delenv("SYNTHGUARD_SECRET_KEY", raising=False)
    monkeypatch.setenv("SYNTHGUARD_SECRET_KEY_FALLBACKS", secrets.token_hex(32))
    with pytest.raises(
        SettingsError, match=r"^invalid settings: SYNTHGUARD_SECRET_KEY_FALLBACKS is set but "
    ):
        load_settings()


def test_an_infinite_duration_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("SYNTHGUARD_RECONCILE_AFTER_S", "inf")
    with pytest.raises(SettingsError, match="SYNTHGUARD_RECONCILE_AFTER_S"):
        load_settings()


def test_missing_secret_is_reported_where_it_is_needed():
    with pytest.raises(SettingsError, match="SYNTHGUARD_SECRET_KEY is not set"):
        Settings().require_secret_key()
    key = "0123456789abcdef" * 2
    assert Settings(secret_key=SecretStr(key)).require_secret_key() == key


def _synthguard(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("SYNTHGUARD_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["checks"], {"SYNTHGUARD_DATABASE_URL": "mysql://x/y"}, "SYNTHGUARD_DATABASE_URL"),
        (["scan", "x.png"], {"SYNTHGUARD_BROKER_URL": "nonsense"}, "SYNTHGUARD_BROKER_URL"),
        (["worker"], {"SYNTHGUARD_DATABASE_URL": "sqlite:///:memory:"}, "SYNTHGUARD_SECRET_KEY is not set"),
    ],
)
def test_commands_stop_with_one_clear_line(args, env, expected):
    result = _synthguard(*args, env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_celery_entry_point_stops_with_one_clear_line():
    env = {key: value for key, value in os.environ.items() if not key.startswith("SYNTHGUARD_")}
    env["SYNTHGUARD_BROKER_URL"] = "nonsense"
    result = subprocess.run(
        [sys.executable, "-c", "import worker.celery"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "synthguard: invalid settings: SYNTHGUARD_BROKER_URL: not a broker URL (expected redis://host:port/db)"
    ]
