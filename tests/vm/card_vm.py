"""One card server plus one VM with that card, booted once per test module (the shape most VM suites share)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipsec_nic.runner import CardServer, run_dir, write_profile
from qemu.launch import VfioUserCard, Vm, VmConfig
from qemu.toolchain import Toolchain


@dataclass
class CardVm:
    vm: Vm
    card: CardServer
    socket: Path  # the card's vfio-user socket (a test may attach its own client after the VM is gone)
    logs: Path


@contextmanager
def card_vm(toolchain: Toolchain, logs: Path, overrides: dict[str, Any], **vm_options: Any) -> Iterator[CardVm]:
    """Start the card (default profile + ``overrides``) and boot a VM with it; on the way out check that the
    card server survived everything the tests did and never logged a traceback."""
    with run_dir() as d:
        profile = write_profile(d / "card.yaml", overrides=overrides)
        with CardServer(d / "card.sock", profile, logs / "card.log") as card:
            cfg = VmConfig(cards=(VfioUserCard(d / "card.sock"),), log_dir=logs / "vm", **vm_options)
            with Vm(cfg, toolchain) as vm:
                print(f"VM up in {vm.boot_seconds:.1f} s")
                yield CardVm(vm, card, d / "card.sock", logs)
            assert card.alive(), card.log_tail()
            assert "Traceback" not in (logs / "card.log").read_text(), card.log_tail(60)
