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
