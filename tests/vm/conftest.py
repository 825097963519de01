"""VM-level test fixtures: the toolchain (built on first use, reused after) and a shared guest."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from qemu import toolchain as toolchain_module
from qemu.launch import Vm, VmConfig


@pytest.fixture(scope="session")
def toolchain(request: pytest.FixtureRequest) -> toolchain_module.Toolchain:
    """The VM toolchain. On a fresh machine this builds it (a few minutes, progress shown)."""
    existing = toolchain_module.load()
    if existing is not None:
        return existing
    if os.geteuid() != 0:
        pytest.skip(
            "VM toolchain not built and building it needs root: run `sudo ipsec-nic vm setup` "
            f"(cache {toolchain_module.cache_dir()})"
        )
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return toolchain_module.setup(progress=lambda line: print(line, flush=True))


@pytest.fixture(scope="session")
def guest(toolchain: toolchain_module.Toolchain) -> Iterator[Vm]:
    """One plain VM (no card) for the whole session; run commands with guest.run(...)."""
    with Vm(VmConfig(timeout_s=300), toolchain) as vm:
        yield vm


# The interop suites' shared topology (card + Linux XFRM peer in one VM).
from .fixtures_interop import interop  # noqa: E402, F401
