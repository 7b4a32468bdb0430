"""resolve_device: the device names the detector accepts, and clear refusals for the rest."""

from __future__ import annotations

import pytest
import torch

from models import DetectorError
from models._scoring import resolve_device


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in {"cpu", "cuda"}
    assert resolve_device("auto") == resolve_device(None)


@pytest.mark.parametrize("name", ["xla", "meta", "hpu", "ipu", "lazy"])
def test_device_types_torch_parses_but_the_detector_cannot_use_are_refused(name):
    with pytest.raises(DetectorError, match=r"not supported; use one of cpu, cuda, mps or auto"):
        resolve_device(name)


def test_unknown_device_name_is_a_detector_error():
    with pytest.raises(DetectorError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_mps_without_mps_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DetectorError, match=r"MPS .* is not available"):
        resolve_device("mps")


def test_mps_with_mps_resolves_and_has_one_device(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    with pytest.raises(DetectorError, match="only one MPS device"):
        resolve_device("mps:1")
