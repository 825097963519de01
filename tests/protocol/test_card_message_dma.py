"""The real card over a real vfio-user socket with guest RAM mapped *without* an fd (QEMU's plain ``-m``):
every DMA is a DMA_READ/DMA_WRITE request the test client answers from its own bytearray, as QEMU does in
hw/vfio-user/pci.c (vfio_user_dma_read/write). Admin command, TX, loopback and RX all complete."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from device.contract import ndis, regs
from device.contract.regs import AdminFlags, AdminStatus, RxWbFlags, TxStatus, TxWbFlags
from device.nic.assembly import NicFunction, build_card
from device.nic.rings import STAT
from device.profile import profile_from_dict

from .client import DEVICE_RESET, DMA_READ, DMA_WRITE, Msg, answer_dma
from .conftest import wait_for

CONFIG, BAR0 = 7, 0
BASE = 0x1_0000_0000
SIZE = 1 << 20
ADMIN, TX, RX, BUF = BASE, BASE + 0x1000, BASE + 0x2000, BASE + 0x10000
MAC = "02:49:50:4e:43:00"  # the default profile's


@pytest.fixture
def device() -> Iterator[NicFunction]:  # overrides the fake device of conftest.py
    fn = build_card(profile_from_dict({"wire": {"type": "loopback"}}))
    yield fn
    fn.card.datapath.close()


class Guest:
    """Guest RAM the server can reach only by messages, and a register-level driver on the client."""

    def __init__(self, client) -> None:
        self.c = client
        self.mem = bytearray(SIZE)
        self.requests: list[int] = []
        serve = answer_dma({BASE: self.mem})

        def counted(m: Msg) -> bytes | None:
            self.requests.append(m.command)
            return serve(m)

        client.on_server_request = counted
        reply = client.dma_map(BASE, SIZE)  # no fd: QEMU's anonymous RAM
        assert not reply.is_error

    def put(self, addr: int, data: bytes) -> None:
        self.mem[addr - BASE : addr - BASE + len(data)] = data

    def get(self, addr: int, n: int) -> bytes:
        return bytes(self.mem[addr - BASE : addr - BASE + n])

    def w(self, offset: int, value: int) -> None:
        self.c.write32(BAR0, offset, value)

    def ring(self, block: int, base: int, length: int) -> None:
        self.w(block + regs.QREG_BASE_LO, base & 0xFFFF_FFFF)
        self.w(block + regs.QREG_BASE_HI, base >> 32)
        self.w(block + regs.QREG_LEN, length)
        self.w(block + regs.QREG_CTRL, int(regs.QueueCtrl.ENABLE))

    def until(self, cond, timeout: float = 5.0) -> None:
        """Poll over the socket: every register read also lets the client answer the server's DMA."""
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "the card did not finish"
            self.c.read32(BAR0, regs.STATUS)


def test_card_works_with_guest_ram_reachable_only_by_messages(client):
    g = Guest(client)
    client.region_write(CONFIG, 0x4, struct.pack("<H", 0x6))  # memory + bus master
    g.w(regs.CTRL, int(regs.Ctrl.ENABLE))
    g.until(lambda: client.read32(BAR0, regs.STATUS) & regs.Status.ENABLED)
    g.ring(regs.ADMINQ_BASE, ADMIN, 8)
    g.ring(regs.txq_reg(0, 0), TX, 8)
    g.ring(regs.rxq_reg(0, 0), RX, 8)

    # admin: GET_CAPS, response through DMA_WRITE
    g.put(ADMIN, regs.ADMIN_DESC.pack(opcode=ndis.Opcode.GET_CAPS, resp_addr=BUF, resp_len=4096))
    g.w(regs.ADMINQ_BASE + regs.QREG_TAIL, 1)
    g.until(lambda: regs.ADMIN_DESC.unpack(g.get(ADMIN, regs.ADMIN_DESC.size)).flags & AdminFlags.DONE)
    wb = regs.ADMIN_DESC.unpack(g.get(ADMIN, regs.ADMIN_DESC.size))
    assert (wb.status, wb.fw_status) == (AdminStatus.OK, 0) and 0 < wb.resp_len <= 4096
    assert g.get(BUF, wb.resp_len) != bytes(wb.resp_len)

    # RX buffers, then a frame out of TX that the loopback wire brings back in
    for i in range(2):
        g.put(RX + i * regs.RX_DESC.size, regs.RX_DESC.pack(addr=BUF + 0x4000 + i * 2048, buf_len=2048))
    g.w(regs.rxq_reg(0, regs.QREG_TAIL), 2)
    frame = bytes(Ether(dst=MAC, src="02:00:00:00:00:02") / IP(src="10.0.0.1", dst="10.0.0.2") /
                  UDP(sport=1, dport=7) / Raw(b"no shared RAM" * 20))
    g.put(BUF + 0x2000, frame)
    g.put(TX, regs.TX_DESC.pack(addr=BUF + 0x2000, length=len(frame),
                                flags=int(regs.TxFlags.EOP | regs.TxFlags.REPORT_STATUS)))
    g.w(regs.txq_reg(0, regs.QREG_TAIL), 1)
    g.until(lambda: regs.RX_DESC.unpack(g.get(RX, regs.RX_DESC.size)).wb_flags & RxWbFlags.DD)
    tx = regs.TX_DESC.unpack(g.get(TX, regs.TX_DESC.size))
    assert (tx.wb_status, tx.wb_flags) == (TxStatus.OK, TxWbFlags.DONE)
    rx = regs.RX_DESC.unpack(g.get(RX, regs.RX_DESC.size))
    assert rx.wb_flags == RxWbFlags.DD | RxWbFlags.EOP and rx.length == len(frame)
    assert g.get(BUF + 0x4000, len(frame)) == frame
    assert client.read32(BAR0, regs.stat_offset("DMA_ERROR")) == 0
    assert client.read32(BAR0, regs.stat_offset("RX_PACKETS")) == 1
    assert DMA_READ in g.requests and DMA_WRITE in g.requests


def test_client_gone_while_the_card_waits_for_a_dma_reply(connect, device):
    c = connect()
    assert not c.negotiate().is_error
    g = Guest(c)
    c.on_server_request = None  # requests are kept, never answered
    c.region_write(CONFIG, 0x4, struct.pack("<H", 0x6))
    g.w(regs.CTRL, int(regs.Ctrl.ENABLE))
    g.until(lambda: c.read32(BAR0, regs.STATUS) & regs.Status.ENABLED)
    g.ring(regs.ADMINQ_BASE, ADMIN, 8)
    g.put(ADMIN, regs.ADMIN_DESC.pack(opcode=ndis.Opcode.GET_CAPS, resp_addr=BUF, resp_len=4096))
    g.w(regs.ADMINQ_BASE + regs.QREG_TAIL, 1)
    g.until(lambda: bool(c.server_requests))  # the admin pass waits for its descriptor
    assert c.server_requests[0].command == DMA_READ and device.card.datapath._passes
    c.close()
    # the pass is dropped with the client, its failed reply is not counted as a DMA fault
    wait_for(lambda: not device.card.datapath._passes)
    assert device.card.stats[STAT["DMA_ERROR"]] == 0
    # a new client (after a system reset, as QEMU does) finds a working card
    c2 = connect()
    assert not c2.negotiate().is_error
    assert not c2.request(DEVICE_RESET).is_error
    g2 = Guest(c2)
    c2.region_write(CONFIG, 0x4, struct.pack("<H", 0x6))
    g2.w(regs.CTRL, int(regs.Ctrl.ENABLE))
    g2.until(lambda: c2.read32(BAR0, regs.STATUS) & regs.Status.ENABLED)
    g2.ring(regs.ADMINQ_BASE, ADMIN, 8)
    g2.put(ADMIN, regs.ADMIN_DESC.pack(opcode=ndis.Opcode.GET_CAPS, resp_addr=BUF, resp_len=4096))
    g2.w(regs.ADMINQ_BASE + regs.QREG_TAIL, 1)
    g2.until(lambda: regs.ADMIN_DESC.unpack(g2.get(ADMIN, regs.ADMIN_DESC.size)).flags & AdminFlags.DONE)
    assert regs.ADMIN_DESC.unpack(g2.get(ADMIN, regs.ADMIN_DESC.size)).status == AdminStatus.OK
