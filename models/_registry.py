"""A small registry of detector constructors, keyed by name (`family-variant`, e.g. "synthguard-v1").

The registry is an object, not module state scattered over imports: `create_detector` looks names up in
`REGISTRY`, and tests can build their own `DetectorRegistry` without touching the shipped one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from models.errors import DetectorError

if TYPE_CHECKING:
    from models.detector import Detector

Factory = Callable[..., "Detector"]
F = TypeVar("F", bound=Factory)


class UnknownDetectorError(DetectorError):
    """No detector is registered under the requested name."""


class DetectorRegistry:
    """Maps detector names to factories `factory(device=None) -> Detector`."""

    def __init__(self) -> None:
        self._factories: dict[str, Factory] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering `factory` under `name`; a name can only be registered once."""

        def decorate(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"a detector named {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._factories)

    def create(self, name: str, device: str | None = None) -> Detector:
        try:
            factory = self._factories[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise UnknownDetectorError(f"no detector named {name!r}; registered: {known}") from None
        return factory(device=device)


REGISTRY = DetectorRegistry()


def register_detector(name: str) -> Callable[[F], F]:
    """Register a factory in the shipped registry (see `DetectorRegistry.register`)."""
    return REGISTRY.register(name)
