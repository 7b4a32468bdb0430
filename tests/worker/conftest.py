"""Fixtures shared by the worker tests (the session-wide ones are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.worker.webhook_helpers import fast_settings, run_receiver
from worker.settings import Settings


@pytest.fixture
def receiver() -> Iterator[Any]:
    """A webhook receiver on 127.0.0.1 (pytest-httpserver), fresh for each test."""
    yield from run_receiver()


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """The session's settings with a webhook retry schedule of milliseconds and no jitter."""
    return fast_settings(settings)
