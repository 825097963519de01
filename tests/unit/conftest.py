"""Shared fixtures for the card unit tests: the default card and a recording DeviceContext."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from device.nic.assembly import NicFunction, build_card
from device.profile import Profile, load_profile


@dataclass
class FakeContext:
    """Records what the device asks of the vfio-user library (no sockets)."""

    triggers: list[tuple[int, int]] = field(default_factory=list)
    timers: list[tuple[float, Callable[[], None]]] = field(default_factory=list)
    soon: list[Callable[[], None]] = field(default_factory=list)
    configured: bool = True
    dma: object = None

    def trigger_irq(self, index: int, vector: int = 0) -> bool:
        if not self.configured:
            return False
        self.triggers.append((index, vector))
        return True

    def irq_configured(self, index: int, vector: int = 0) -> bool:
        return self.configured

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        self.timers.append((delay, callback))
        return object()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:  # pragma: no cover - unused
        pass

    def remove_reader(self, fd: int) -> None:  # pragma: no cover - unused
        pass


@pytest.fixture(scope="session")
def profile() -> Profile:
    return load_profile()


@pytest.fixture
def ctx() -> FakeContext:
    return FakeContext()


@pytest.fixture
def fn(profile: Profile, ctx: FakeContext) -> NicFunction:
    function = build_card(profile)
    function.attached(ctx)  # type: ignore[arg-type]
    return function
