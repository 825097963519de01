"""Shared fixtures for the card unit tests: the default card and a recording DeviceContext."""

from __future__ import annotations

import pytest

from device.nic.assembly import NicFunction, build_card
from device.profile import Profile, load_profile
from tests.fakes import FakeContext


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


def pytest_collection_modifyitems(config, items):
    """Tests marked `matrix` (long grids) run only when `-m` names them; otherwise they are deselected,
    not skipped, so a default run reports exactly what it ran."""
    if "matrix" in (config.option.markexpr or ""):
        return
    chosen = [item for item in items if item.get_closest_marker("matrix") is None]
    if len(chosen) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("matrix")])
        items[:] = chosen
