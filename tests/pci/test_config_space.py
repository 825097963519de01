"""Config space model: masks, BAR sizing, capabilities, reset, FLR; cross-checked with pciutils' lspci."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from device.contract import regs
from device.pci import capabilities as caps
from device.pci.config_space import (
    BAR0,
    COMMAND,
    COMMAND_WRITABLE,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    ROM_ADDRESS,
    STATUS,
    BarLayout,
    BarType,
    CapabilityId,
    ConfigSpace,
    StatusBits,
)
from device.vfio_user.device_api import IRQ_MSIX, REGION_CONFIG

CFG = REGION_CONFIG


def rd(fn, offset: int, size: int) -> int:
    return int.from_bytes(fn.region_read(CFG, offset, size), "little")


def wr(fn, offset: int, size: int, value: int) -> None:
    fn.region_write(CFG, offset, value.to_bytes(size, "little"))


def test_header_identity(fn, profile):
    assert rd(fn, 0x00, 2) == profile.pci.vendor_id == regs.VENDOR_ID
    assert rd(fn, 0x02, 2) == profile.pci.device_id
    assert rd(fn, 0x09, 3) == 0x020000
    assert rd(fn, 0x08, 1) == profile.pci.revision
    assert rd(fn, 0x0E, 1) == 0  # type 0 header, single function
    assert rd(fn, 0x2C, 2) == profile.pci.subsystem_vendor_id
    assert rd(fn, INTERRUPT_PIN, 1) == 1


@pytest.mark.parametrize(("bar", "expect"), [(0, 0xFFFF_C000), (1, 0), (2, 0xFFFF_F000), (3, 0), (4, 0xFFFF_F000), (5, 0)])
def test_bar_sizing_reads_back_size_and_type(fn, bar, expect):
    wr(fn, BAR0 + 4 * bar, 4, 0xFFFF_FFFF)
    assert rd(fn, BAR0 + 4 * bar, 4) == expect
    size = (~expect + 1) & 0xFFFF_FFFF if expect else 0
    assert size == fn.region_info(bar).size


def test_bar_keeps_programmed_address_and_type_bits(fn):
    wr(fn, BAR0, 4, 0xFEB0_0000 | 0xF)  # type bits are read-only
    assert rd(fn, BAR0, 4) == 0xFEB0_0000
    assert fn.bar_base(0) == 0xFEB0_0000


def test_64bit_prefetchable_bar_sizing():
    cs = ConfigSpace()
    cs.define_bar(BarLayout(0, 1 << 20, BarType.MEM64_PREFETCH))
    cs.write(BAR0, b"\xff" * 8)
    assert cs.u32(BAR0) == 0xFFF0_000C
    assert cs.u32(BAR0 + 4) == 0xFFFF_FFFF
    cs.write(BAR0, struct.pack("<II", 0x8000_0000, 0x1))
    assert cs.bar_address(0) == 0x1_8000_0000


def test_bar_layout_validation():
    with pytest.raises(ValueError, match="power of two"):
        BarLayout(0, 3000)
    with pytest.raises(ValueError, match="index"):
        BarLayout(5, 4096, BarType.MEM64)


def test_rom_bar_sizing_reads_zero(fn):
    # QEMU's vfio_pci_size_rom: write 0xFFFFF800, read back; 0 means no ROM
    wr(fn, ROM_ADDRESS, 4, 0xFFFF_F800)
    assert rd(fn, ROM_ADDRESS, 4) == 0
    assert fn.region_info(6).size == 0


def test_command_writable_bits(fn):
    wr(fn, COMMAND, 2, 0xFFFF)
    assert rd(fn, COMMAND, 2) == COMMAND_WRITABLE == 0x0547
    assert fn.bus_master_enabled() and fn.memory_enabled()
    wr(fn, COMMAND, 2, 0)
    assert rd(fn, COMMAND, 2) == 0 and not fn.bus_master_enabled()


def test_status_w1c_and_read_only_bits(fn):
    fn.config.set_u16(STATUS, fn.config.u16(STATUS) | StatusBits.RECEIVED_MASTER_ABORT)
    before = rd(fn, STATUS, 2)
    assert before & StatusBits.CAPABILITIES_LIST
    wr(fn, STATUS, 2, 0xFFFF)
    after = rd(fn, STATUS, 2)
    assert not after & StatusBits.RECEIVED_MASTER_ABORT  # W1C cleared
    assert after & StatusBits.CAPABILITIES_LIST  # RO survives all-ones
    assert not after & StatusBits.INTERRUPT  # not settable by software


def test_interrupt_line_writable_pin_not(fn):
    wr(fn, INTERRUPT_LINE, 2, 0xFF0B)
    assert rd(fn, INTERRUPT_LINE, 1) == 0x0B
    assert rd(fn, INTERRUPT_PIN, 1) == 1


def test_capability_chain(fn):
    chain = fn.config.walk_capabilities()
    assert [cid for cid, _ in chain] == [CapabilityId.POWER_MANAGEMENT, CapabilityId.MSIX, CapabilityId.PCI_EXPRESS]
    for _, offset in chain:
        assert 0x40 <= offset < 0x100 and offset % 4 == 0
    assert rd(fn, chain[-1][1] + 1, 1) == 0  # list ends
    assert fn.config.walk_extended_capabilities() == [(0x0003, 0x100)]


def test_msix_capability_consistent_with_bar2(fn, profile):
    off = fn.msix_offset
    control = rd(fn, off + caps.MSIX_CONTROL, 2)
    table = rd(fn, off + caps.MSIX_TABLE, 4)
    pba = rd(fn, off + caps.MSIX_PBA, 4)
    n = (control & 0x7FF) + 1
    assert n == profile.nic.msix_vectors == fn.irq_info(IRQ_MSIX).count
    assert table & 7 == pba & 7 == 2  # BIR: BAR2
    bar2 = fn.region_info(2).size
    assert (table & ~7) + 16 * n <= (pba & ~7)
    assert (pba & ~7) + ((n + 63) // 64) * 8 <= bar2 == regs.BAR2_SIZE


def test_msix_control_only_enable_and_mask_writable(fn):
    off = fn.msix_offset + caps.MSIX_CONTROL
    original = rd(fn, off, 2)
    wr(fn, off, 2, 0xFFFF)
    assert rd(fn, off, 2) == (original & 0x7FF) | 0xC000
    assert fn.msix_enabled() and fn.msix_function_masked()


def test_pcie_capability_endpoint_with_flr(fn):
    base = fn.pcie_offset
    flags = rd(fn, base + caps.PCIE_CAPS, 2)
    assert flags & 0xF == 2 and (flags >> 4) & 0xF == 0  # v2, Endpoint
    assert rd(fn, base + caps.PCIE_DEVCAP, 4) & caps.DEVCAP_FLR


def test_flr_resets_function_and_card(fn):
    wr(fn, BAR0, 4, 0xFEB0_0000)
    wr(fn, COMMAND, 2, 0x6)
    fn.region_write(0, regs.reg("SCRATCH"), (0x1234).to_bytes(4, "little"))
    devctl = fn.pcie_offset + caps.PCIE_DEVCTL
    wr(fn, devctl, 2, rd(fn, devctl, 2) | caps.DEVCTL_INITIATE_FLR)
    assert rd(fn, devctl, 2) & caps.DEVCTL_INITIATE_FLR == 0
    assert rd(fn, devctl, 2) == caps.DEVCTL_RESET
    assert rd(fn, BAR0, 4) == 0 and rd(fn, COMMAND, 2) == 0
    assert fn.region_read(0, regs.reg("SCRATCH"), 4) == bytes(4)


def test_power_state_d0_d3_only(fn):
    pmcsr = fn.pm_offset + caps.PM_PMCSR
    wr(fn, pmcsr, 2, 3)
    assert fn.power_state() == 3
    wr(fn, pmcsr, 2, 1)  # D1 unsupported: ignored
    assert fn.power_state() == 3
    wr(fn, pmcsr, 2, 0)
    assert fn.power_state() == 0
    assert rd(fn, pmcsr, 2) & caps.PMCSR_NO_SOFT_RESET


def test_reset_restores_everything(fn):
    pristine = fn.region_read(CFG, 0, 4096)
    for off in range(0, 0x100, 4):
        wr(fn, off, 4, 0xFFFF_FFFF)
    assert fn.region_read(CFG, 0, 4096) != pristine
    fn.reset()
    assert fn.region_read(CFG, 0, 4096) == pristine


def test_config_access_out_of_range_is_einval(fn):
    from device.vfio_user.device_api import VfioUserError

    with pytest.raises(VfioUserError):
        fn.region_read(CFG, 4094, 4)
    with pytest.raises(VfioUserError):
        fn.region_write(CFG, 4096, b"\0")


def test_unaligned_odd_config_writes_apply_per_byte(fn):
    wr(fn, 0x3B, 3, 0x00_22_11)  # reserved byte 0x3B (RO), INTERRUPT_LINE (RW), INTERRUPT_PIN (RO)
    assert rd(fn, INTERRUPT_LINE, 1) == 0x22 and rd(fn, INTERRUPT_PIN, 1) == 1


def _lspci_dump(data: bytes) -> str:
    lines = ["00:03.0 Ethernet controller: ipsec-nic"]
    lines += [f"{off:03x}: " + " ".join(f"{b:02x}" for b in data[off : off + 16]) for off in range(0, len(data), 16)]
    return "\n".join(lines) + "\n"


def _lspci() -> tuple[str, ...] | None:
    """The host's lspci, else the VM toolchain tree's (it has pciutils; `ipsec-nic test` builds it first)."""
    if shutil.which("lspci"):
        return ("lspci",)
    from qemu import toolchain

    tc = toolchain.load()
    if tc is None or not (tc.root / "usr/bin/lspci").exists():
        return None
    return toolchain.tree_runner(tc.root, "usr/bin/lspci")


LSPCI = _lspci()


@pytest.mark.skipif(LSPCI is None, reason="no lspci: neither pciutils on the host nor a built VM toolchain")
def test_lspci_decodes_our_config_space(fn, tmp_path, profile):
    """pciutils parses the config space independently: ids, class, every capability, FLR, DSN."""
    dump = tmp_path / "config.txt"
    dump.write_text(_lspci_dump(fn.region_read(CFG, 0, 4096)))
    out = subprocess.run([*LSPCI, "-F", str(dump), "-vvv", "-nn"], capture_output=True, text=True,
                         check=True).stdout
    # The class name comes from pci.ids, which the minimal tree lacks; the class code is what we set.
    assert re.search(r"(Ethernet controller|Class) \[0200\]: Device \[ec5e:0001\] \(rev 01\)", out), out
    assert "Capabilities: [40] Power Management version 3" in out
    assert f"MSI-X: Enable- Count={profile.nic.msix_vectors} Masked-" in out
    assert "Vector table: BAR=2 offset=00000000" in out
    assert "PBA: BAR=2 offset=00000800" in out
    assert "Express (v2) Endpoint" in out
    assert "FLReset+" in out
    assert "Interrupt: pin A" in out
    mac = profile.nic.mac
    dsn = "-".join(f"{b:02x}" for b in mac[:3] + b"\xff\xfe" + mac[3:])
    assert f"Device Serial Number {dsn}" in out
