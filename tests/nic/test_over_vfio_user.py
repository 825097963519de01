"""End to end without QEMU: the real card behind the real vfio-user server, guest RAM a memfd the test
client maps with DMA_MAP (as QEMU does), descriptors written into that memory, doorbells as posted
MMIO writes. Checks that ring work really runs on the server loop after the reply (call_soon) and
reaches guest memory through the real DMA table."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from device.contract import ndis, regs
from device.nic.assembly import build_card
from device.pci.config_space import COMMAND, Command
from device.profile import profile_from_dict
from device.vfio_user.server import VfioUserServer

from ..protocol.client import VfioUserClient
from ..protocol.conftest import wait_for
from .test_datapath import udp_frame

CONFIG, BAR0 = 7, 0
IOVA = 0x8000_0000
SIZE = 1 << 20


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[VfioUserClient, mmap.mmap, object]]:
    function = build_card(profile_from_dict({"wire": {"type": "loopback"}}))
    server = VfioUserServer(str(tmp_path / "card.sock"), function, dma_timeout=2.0)
    thread = server.start_in_thread()
    client = VfioUserClient(server.socket_path)
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, SIZE)
    ram = mmap.mmap(fd, SIZE)
    try:
        assert not client.negotiate().is_error
        assert not client.dma_map(IOVA, SIZE, fd=fd).is_error
        yield client, ram, function
    finally:
        client.close()
        server.stop()
        thread.join(5)
        function.card.datapath.close()
        ram.close()
        os.close(fd)


def test_admin_tx_rx_through_the_server(served):
    client, ram, function = served
    w = lambda off, val: client.write32(BAR0, off, val, posted=True)  # noqa: E731 - MMIO writes are posted
    client.region_write(CONFIG, COMMAND, struct.pack("<H", Command.MEMORY | Command.BUS_MASTER))
    w(regs.CTRL, int(regs.Ctrl.ENABLE))
    layout = {"admin": (regs.ADMINQ_BASE, 0x0000, 64), "tx": (regs.txq_reg(0, 0), 0x1000, 32),
              "rx": (regs.rxq_reg(0, 0), 0x2000, 32)}
    for block, off, _ in layout.values():
        w(block + regs.QREG_BASE_LO, IOVA + off)
        w(block + regs.QREG_BASE_HI, 0)
        w(block + regs.QREG_LEN, 8)
        w(block + regs.QREG_CTRL, 1)
    # Admin: GET_CAPS, response at 0x10000.
    ram[0:64] = regs.ADMIN_DESC.pack(opcode=ndis.Opcode.GET_CAPS, resp_addr=IOVA + 0x10000, resp_len=256)
    w(regs.ADMINQ_BASE + regs.QREG_TAIL, 1)
    wait_for(lambda: regs.ADMIN_DESC.unpack(ram[0:64]).flags & regs.AdminFlags.DONE)
    wb = regs.ADMIN_DESC.unpack(ram[0:64])
    assert wb.status == 0 and wb.resp_len == ndis.CAPS.size
    assert client.read32(BAR0, regs.ADMINQ_BASE + regs.QREG_HEAD) == 1
    # RX buffer at 0x20000, TX frame at 0x30000.
    ram[0x2000:0x2020] = regs.RX_DESC.pack(addr=IOVA + 0x20000, buf_len=2048)
    w(regs.rxq_reg(0, regs.QREG_TAIL), 1)
    frame = udp_frame(b"through vfio-user")
    ram[0x30000 : 0x30000 + len(frame)] = frame
    ram[0x1000:0x1020] = regs.TX_DESC.pack(addr=IOVA + 0x30000, length=len(frame),
                                           flags=int(regs.TxFlags.EOP | regs.TxFlags.REPORT_STATUS))
    w(regs.txq_reg(0, regs.QREG_TAIL), 1)
    wait_for(lambda: regs.RX_DESC.unpack(ram[0x2000:0x2020]).wb_flags & regs.RxWbFlags.DD)
    d = regs.RX_DESC.unpack(ram[0x2000:0x2020])
    assert ram[0x20000 : 0x20000 + d.length] == frame
    assert regs.TX_DESC.unpack(ram[0x1000:0x1020]).wb_flags == regs.TxWbFlags.DONE
    assert client.read32(BAR0, regs.stat_offset("RX_PACKETS")) == 1
