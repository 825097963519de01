"""The real card (build_card) served by the vfio-user server, driven by the test client like QEMU does
at realize time (vfio-user-notes.md §2.1): info, config read, ROM/BAR sizing, MSI-X caps, BAR0 MMIO,
interrupts through eventfds, DEVICE_RESET."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from device.contract import regs
from device.nic.assembly import NicFunction, build_card
from device.pci import capabilities as caps
from device.profile import load_profile

from .client import DEVICE_RESET, IRQ_ACTION_TRIGGER, IRQ_DATA_EVENTFD
from .conftest import wait_for
from .helpers import eventfd_value

CONFIG, BAR0, BAR2 = 7, 0, 2


@pytest.fixture
def device() -> Iterator[NicFunction]:  # overrides the fake device of conftest.py
    yield build_card(load_profile())


def test_info_matches_qemu_expectations(client):
    argsz, flags, num_regions, num_irqs = client.get_info()
    assert flags == 0b11 and (num_regions, num_irqs) == (9, 5)  # RESET | PCI
    sizes = {}
    for index in range(9):
        m = client.get_region_info(index)
        assert not m.is_error
        sizes[index] = struct.unpack("<IIIIQQ", m.payload)[4]
    assert sizes == {0: regs.BAR0_SIZE, 1: 0, 2: regs.BAR2_SIZE, 3: 0, 4: regs.MIRROR_BAR_SIZE, 5: 0, 6: 0, 7: 4096, 8: 0}
    counts = [struct.unpack("<IIII", client.get_irq_info(i).payload)[3] for i in range(5)]
    assert counts == [1, 0, 5, 1, 1]  # INTx, MSI, MSI-X, ERR, REQ


def test_realize_sequence_reads(client):
    config = client.region_read(CONFIG, 0, 4096)  # one message, as QEMU's first config read
    assert struct.unpack_from("<HH", config, 0) == (regs.VENDOR_ID, regs.DEVICE_ID)
    # ROM sizing: no ROM
    client.write32(CONFIG, 0x30, 0xFFFF_F800)
    assert client.read32(CONFIG, 0x30) == 0
    # BAR type bits, then sizing as the guest firmware does it (writes are forwarded)
    assert client.read32(CONFIG, 0x10) == 0 and client.read32(CONFIG, 0x18) == 0  # 32-bit memory
    client.write32(CONFIG, 0x10, 0xFFFF_FFFF)
    assert client.read32(CONFIG, 0x10) == (~(regs.BAR0_SIZE - 1)) & 0xFFFF_FFFF
    # MSI-X cap fields QEMU reads in vfio_msix_early_setup
    pointer = config[0x34]
    found = {}
    while pointer:
        found[config[pointer]] = pointer
        pointer = config[pointer + 1]
    msix = found[0x11]
    flags = struct.unpack("<H", client.region_read(CONFIG, msix + 2, 2))[0]
    table, pba = client.read32(CONFIG, msix + 4), client.read32(CONFIG, msix + 8)
    assert (flags & 0x7FF) + 1 == 5 and table == 0 | 2 and pba == regs.MSIX_PBA_OFFSET | 2
    assert client.region_read(BAR2, regs.MSIX_PBA_OFFSET, 8) == bytes(8)
    assert client.read32(CONFIG, 0x3C) & 0xFF00 == 0x0100  # interrupt pin A


def test_bar0_registers_over_the_socket(client):
    assert client.region_read(BAR0, regs.ID, 4) == b"IPNC"
    client.write32(BAR0, regs.reg("SCRATCH"), 0xCAFEF00D, posted=True)  # NO_REPLY, like QEMU's MMIO
    assert client.read32(BAR0, regs.reg("SCRATCH")) == 0xCAFEF00D
    with pytest.raises(OSError):
        client.region_read(BAR0, regs.BAR0_SIZE, 4)
    client.request(DEVICE_RESET)
    assert client.read32(BAR0, regs.reg("SCRATCH")) == 0


def test_msix_interrupt_reaches_the_eventfd(client):
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        m = client.set_irqs(2, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, 1, 1, [efd])
        assert not m.is_error
        config = client.region_read(CONFIG, 0, 256)
        pointer, msix = config[0x34], None
        while pointer:
            if config[pointer] == 0x11:
                msix = pointer
            pointer = config[pointer + 1]
        client.region_write(CONFIG, 0x4, struct.pack("<H", 0x6))  # memory + bus master
        client.region_write(CONFIG, msix + caps.MSIX_CONTROL, struct.pack("<H", caps.MsixControl.ENABLE))
        client.write32(BAR0, regs.CTRL, regs.IntMode.VECTORS << regs.CTRL_INT_MODE_SHIFT)
        client.write32(BAR0, regs.reg("IMS"), regs.Cause.TX0)
        client.write32(BAR0, regs.reg("ICS"), regs.Cause.TX0)  # TX0 -> vector 1 (IVAR reset map)
        wait_for(lambda: eventfd_value(efd) == 1)
    finally:
        os.close(efd)


def test_intx_interrupt_reaches_the_eventfd(client):
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        assert not client.set_irqs(0, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, 0, 1, [efd]).is_error
        client.write32(BAR0, regs.CTRL, regs.IntMode.SINGLE << regs.CTRL_INT_MODE_SHIFT)
        client.write32(BAR0, regs.reg("IMS"), regs.Cause.LINK)
        client.write32(BAR0, regs.reg("ICS"), regs.Cause.LINK)
        wait_for(lambda: eventfd_value(efd) == 1)
        status = struct.unpack("<H", client.region_read(CONFIG, 0x6, 2))[0]
        assert status & 0x8  # Interrupt Status follows the level
        client.write32(BAR0, regs.ICR, regs.Cause.LINK)
        assert not struct.unpack("<H", client.region_read(CONFIG, 0x6, 2))[0] & 0x8
    finally:
        os.close(efd)
