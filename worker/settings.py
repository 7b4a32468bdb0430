"""Runtime settings, read from ``SYNTHGUARD_*`` environment variables and validated at start.

Built inside factories (``create_celery_app(settings)``, the CLI), never at import, so tests build their own.
"""

from __future__ import annotations

import ipaddress
import json
import re
import string
from functools import cached_property
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX: Final = "SYNTHGUARD_"
WEBHOOK_QUEUE_SUFFIX: Final = ".webhooks"
MIB: Final = 1024 * 1024

_DATABASE_BACKENDS: Final = ("sqlite", "postgresql")
_BROKER_SCHEMES: Final = ("redis", "rediss", "amqp", "amqps", "pyamqp", "memory")
_DEVICE_PATTERN: Final = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Placeholder values are refused: they would "encrypt" webhook secrets with a publicly known key.
_PLACEHOLDER_SECRETS: Final = frozenset(
    {"changeme", "change-me", "changethis", "secret", "password", "synthguard"}
)
SECRET_KEY_MIN_LEN: Final = 16
# "aaaaaaaaaaaaaaaa" or "changemechangeme" are 16 characters long but guessable: a key has at least this many
# different characters (`openssl rand -hex 32` gives 64 characters from 16).
SECRET_KEY_MIN_DISTINCT: Final = 8
_GENERATE_KEY_HINT: Final = "generate one with `openssl rand -hex 32`"
#: The longest duration any setting accepts: every duration ends up in a datetime or a deadline, and one past
#: year 9999 (or infinite) would fail there, at run time, instead of here.
MAX_DURATION_S: Final = 365 * 86400

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Durations, bounded once here (see MAX_DURATION_S).
Seconds = Annotated[float, Field(ge=0, le=MAX_DURATION_S)]
PositiveSeconds = Annotated[float, Field(gt=0, le=MAX_DURATION_S)]
WholeSeconds = Annotated[int, Field(ge=1, le=MAX_DURATION_S)]


_SettingsT = TypeVar("_SettingsT", bound=BaseSettings)


class SettingsError(Exception):
    """Settings are missing or invalid; the message is one line meant for the operator."""


#: hide_input_in_errors: a validation error never repeats a value (URLs carry passwords, keys are secrets).
_CONFIG: Final = SettingsConfigDict(
    env_prefix=ENV_PREFIX, extra="ignore", frozen=True, allow_inf_nan=False, hide_input_in_errors=True
)


class ImageLimits(BaseSettings):
    """The caps on one image, the only settings `synthguard detect` reads (so that a bad value of a setting
    it does not use cannot stop it)."""

    model_config = _CONFIG

    max_pixels: int = Field(default=40_000_000, gt=0)
    max_inline_bytes: int = Field(default=20 * MIB, gt=0)


class Settings(ImageLimits):
    """Every tunable of synthguard. Environment variable = ``SYNTHGUARD_`` + field name in upper case."""

    model_config = _CONFIG

    database_url: str = "sqlite:///./synthguard.db"
    broker_url: str = "redis://localhost:6379/0"
    # Hosts or CIDRs the URL fetcher and the webhook sender may reach although they are private/loopback.
    allow_private_hosts: str = ""
    # Encrypts webhook secrets at rest; required by the commands and tasks that touch webhook secrets.
    secret_key: SecretStr | None = None
    # Earlier values of secret_key, comma-separated: secrets stored under them still decrypt, so the key can
    # change without a stop (`synthguard webhooks rekey` then re-encrypts them under secret_key).
    # NoDecode: the environment value is split by _split_fallback_keys below, never parsed as JSON.
    secret_key_fallbacks: Annotated[tuple[SecretStr, ...], NoDecode] = ()

    model_name: str = "synthguard-v1"
    device: str = "auto"
    store_raw_images: bool = False

    fetch_max_bytes: int = Field(default=20 * MIB, gt=0)
    fetch_timeout_s: PositiveSeconds = 20.0
    fetch_max_redirects: int = Field(default=3, ge=0)
    decode_timeout_s: PositiveSeconds = 20.0
    batch_size: int = Field(default=8, ge=1)
    # A check whose processing was started this many times without finishing is failed (dead-lettered).
    max_attempts: int = Field(default=5, ge=1)
    reconcile_after_s: PositiveSeconds = 120.0
    webhook_timeout_s: PositiveSeconds = 15.0
    # Webhook delivery (worker/webhook_delivery.py). Wait before attempt 1, 2, ...: the Standard Webhooks/Svix
    # schedule (8 attempts over ~28 h), jittered by +-webhook_retry_jitter.
    # NoDecode: the environment value is "0,5,300" or a JSON list, split by _split_delays below.
    webhook_retry_delays_s: Annotated[tuple[Seconds, ...], NoDecode] = Field(
        default=(0, 5, 300, 1800, 7200, 18000, 36000, 36000), min_length=1
    )
    webhook_retry_jitter: float = Field(default=0.2, ge=0, lt=1)
    # An endpoint whose attempts have all failed for this long is disabled (Svix: 5 days).
    webhook_disable_after_s: PositiveSeconds = 5 * 86400.0
    # After rotate-secret the old secret keeps signing beside the new one this long.
    webhook_secret_overlap_s: Seconds = 86400.0
    # The sweep re-enqueues pending deliveries due for longer than the grace (their task was lost).
    webhook_sweep_interval_s: PositiveSeconds = 30.0
    webhook_sweep_grace_s: Seconds = 60.0
    # Retries due sooner than this ride a broker countdown; later ones wait for the sweep (a Redis ETA task
    # older than the visibility timeout would be redelivered twice).
    webhook_eta_max_s: Seconds = 600.0

    # Transient fetch errors (timeouts, 5xx) are retried by the task this many times with exponential backoff.
    fetch_retries: int = Field(default=3, ge=0)
    retry_backoff_max_s: WholeSeconds = 300
    # Celery worker tuning.
    worker_concurrency: int = Field(default=1, ge=1)
    worker_max_tasks_per_child: int = Field(default=200, ge=1)
    # A message not acknowledged within this time is redelivered by Redis; longer than the slowest task.
    broker_visibility_timeout_s: WholeSeconds = 900
    # The Redis key (or AMQP queue) tasks go to; an empty name would send them nowhere a worker listens.
    queue_name: str = Field(default="synthguard", pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
    # A task running longer than this is killed (its child restarts; the attempt counts toward max_attempts).
    task_time_limit_s: WholeSeconds = 900

    @property
    def webhook_queue_name(self) -> str:
        """The queue webhook deliveries and sweeps go to, beside ``queue_name``.

        A queue of their own, consumed by the same workers: in one FIFO queue a flagged image's notification
        would wait behind every upload queued before it (a backlog of hours); Celery's Redis consumer takes
        from its queues in turn, so a delivery waits for at most the batch in progress.
        """
        return f"{self.queue_name}{WEBHOOK_QUEUE_SUFFIX}"

    @property
    def worker_queues(self) -> tuple[str, str]:
        """Every queue a synthguard worker consumes."""
        return (self.queue_name, self.webhook_queue_name)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except (ArgumentError, ValueError):  # ValueError: a port that is not a number, e.g. a password's tail
            raise ValueError(
                "not a database URL (expected sqlite:///path or postgresql+psycopg://...)"
            ) from None
        if url.drivername in ("postgres", "postgresql"):
            # A bare postgresql:// means psycopg2 to SQLAlchemy 2.0; this project ships psycopg 3.
            return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        if url.get_backend_name() not in _DATABASE_BACKENDS:
            raise ValueError(f"unsupported database {url.get_backend_name()!r} (use sqlite or postgresql)")
        return value

    @field_validator("queue_name")
    @classmethod
    def _check_queue_name(cls, value: str) -> str:
        # "<name>.webhooks" is a deployment's webhook queue: a deployment whose own queue had that name would
        # take another one's deliveries as checks (and the other's workers its checks as deliveries).
        if value.endswith(WEBHOOK_QUEUE_SUFFIX):
            raise ValueError(f"names ending in {WEBHOOK_QUEUE_SUFFIX!r} are reserved for webhook queues")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in _BROKER_SCHEMES or not rest:
            raise ValueError("not a broker URL (expected redis://host:port/db)")
        # Kombu parses the port only when it connects, and its error repeats the text it read as the port:
        # the password's tail when a password holds an unescaped '/'. Parsed here, never echoed.
        try:
            urlsplit(value).port  # noqa: B018 - parsing is the check
        except ValueError:
            raise ValueError(
                "the broker URL's host or port does not parse "
                "(percent-encode '/', '#', '?' or '@' in a password)"
            ) from None
        return value

    @field_validator("allow_private_hosts")
    @classmethod
    def _check_allow_private_hosts(cls, value: str) -> str:
        # Entries are named by position, not echoed: settings errors never repeat a value.
        for position, entry in enumerate(_split_hosts(value), start=1):
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"entry {position} is not a valid CIDR") from None
            elif not re.fullmatch(r"[A-Za-z0-9.:\-\[\]_]+", entry):
                raise ValueError(f"entry {position} is not a host name or IP address") from None
        return value

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        secret = value.get_secret_value()
        if not secret.strip():
            raise ValueError(f"is only whitespace; {_GENERATE_KEY_HINT}")
        if secret != secret.strip():
            # A process that kept a secret file's newline (Kubernetes, Docker) and one that did not
            # (`$(cat file)`) hold different keys and cannot decrypt each other's secrets. Refused rather
            # than stripped: stripping would silently change the key where secrets were stored under it.
            raise ValueError(
                "has leading or trailing whitespace (the newline of a secret file?); remove it "
                "(every process must use the same key)"
            )
        problem = _weak_key_problem(secret)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("secret_key_fallbacks", mode="before")
    @classmethod
    def _split_fallback_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            # Spaces around the commas are separators, not key characters: no key with surrounding
            # whitespace was ever accepted as SYNTHGUARD_SECRET_KEY, so none can have stored a secret.
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("secret_key_fallbacks")
    @classmethod
    def _check_fallback_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for position, key in enumerate(value, start=1):
            problem = _weak_key_problem(key.get_secret_value())
            if problem:
                # By position, never by value: this message is printed and logged.
                raise ValueError(f"entry {position} {problem}")
        return value

    @model_validator(mode="after")
    def _fallbacks_need_a_key(self) -> Settings:
        if self.secret_key_fallbacks and self.secret_key is None:
            raise ValueError(
                f"{ENV_PREFIX}SECRET_KEY_FALLBACKS is set but {ENV_PREFIX}SECRET_KEY is not: the fallbacks "
                "only decrypt, secrets are stored under SYNTHGUARD_SECRET_KEY"
            )
        return self

    @field_validator("webhook_retry_delays_s", mode="before")
    @classmethod
    def _split_delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)  # a JSONDecodeError is a ValueError: reported like any bad value
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.match(value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value

    @cached_property
    def private_host_names(self) -> frozenset[str]:
        """Host names (lower case) and literal addresses allowed although private."""
        return frozenset(
            entry.lower().strip("[]") for entry in _split_hosts(self.allow_private_hosts) if "/" not in entry
        )

    @cached_property
    def private_networks(self) -> tuple[Network, ...]:
        """Networks allowed although private (from CIDR entries; single IP entries become /32 or /128)."""
        networks: list[Network] = []
        for entry in _split_hosts(self.allow_private_hosts):
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                continue  # a host name, matched by name instead
        return tuple(networks)

    def require_secret_key(self) -> str:
        """The secret key, or a SettingsError saying how to set it."""
        if self.secret_key is None:
            raise SettingsError(
                f"{ENV_PREFIX}SECRET_KEY is not set; it encrypts webhook secrets "
                "(generate one with `openssl rand -hex 32`)"
            )
        return self.secret_key.get_secret_value()


def _weak_key_problem(secret: str) -> str | None:
    """Why ``secret`` is too weak to encrypt webhook secrets with, or None."""
    if _is_placeholder(secret):
        return f"is a placeholder value; {_GENERATE_KEY_HINT}"
    if len(secret) < SECRET_KEY_MIN_LEN:
        return f"is shorter than {SECRET_KEY_MIN_LEN} characters"
    if len(set(secret)) < SECRET_KEY_MIN_DISTINCT:
        return f"has fewer than {SECRET_KEY_MIN_DISTINCT} different characters; {_GENERATE_KEY_HINT}"
    return None


def _is_placeholder(secret: str) -> bool:
    """A placeholder word, alone or padded with digits and punctuation to the length ("password12345678")."""
    return secret.lower().strip(string.digits + string.punctuation) in _PLACEHOLDER_SECRETS


def _split_hosts(value: str) -> list[str]:
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment plus ``overrides``; invalid values raise one-line SettingsError.

    The message names the variable and the problem but never echoes the value (URLs carry passwords).
    """
    return _load(Settings, **overrides)


def load_image_limits() -> ImageLimits:
    """The image caps from the environment alone; invalid values raise one-line SettingsError."""
    return _load(ImageLimits)


def _load(kind: type[_SettingsT], **overrides: Any) -> _SettingsT:
    try:
        return kind(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["loc"]:
                field = ".".join(str(part) for part in error["loc"] if isinstance(part, str))
                message = f"{ENV_PREFIX}{field.upper()}: {message}"
            problems.append(message)  # a check across settings names its variables itself
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


__all__ = ["ENV_PREFIX", "ImageLimits", "Settings", "SettingsError", "load_image_limits", "load_settings"]
