"""Test harness for the NIC: fake guest memory, a fake DeviceContext and a register-level driver.

The card is the real one (device.nic.assembly.build_card + the data path + the real firmware model); only
the vfio-user transport is replaced: guest RAM is a bytearray at GUEST_BASE (bounds-checked like
device/vfio_user/dma.py: anything not wholly inside raises DmaError), call_soon work is queued and run
by the test, call_later timers are recorded, interrupts are recorded instead of signalled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import pytest

from device.contract import regs
from device.nic.assembly import build_card
from device.nic.datapath import Datapath
from device.nic.wire import Wire
from device.pci import capabilities as pcicaps
from device.pci.config_space import COMMAND, Command
from device.profile import profile_from_dict
from device.vfio_user.device_api import REGION_CONFIG
from firmware_model.firmware import Firmware
from tests.fakes import GUEST_BASE, FakeContext

TX_DESC = regs.TX_DESC
RX_DESC = regs.RX_DESC
ADMIN_DESC = regs.ADMIN_DESC


class Driver:
    """Drives the card the way a guest driver would: BAR0 writes, descriptors in guest memory."""

    def __init__(self, function: Any, ctx: FakeContext) -> None:
        self.fn = function
        self.card = function.card
        self.ctx = ctx
        self.dma = ctx.dma
        self._next = GUEST_BASE
        self.rings: dict[tuple[str, int], tuple[int, int]] = {}  # (kind, q) -> (base iova, length)
        self.tails: dict[tuple[str, int], int] = {}

    # ----- registers
    def w(self, offset: int, value: int) -> None:
        self.fn.region_write(0, offset, struct.pack("<I", value & 0xFFFF_FFFF))

    def r(self, offset: int) -> int:
        return struct.unpack("<I", self.fn.region_read(0, offset, 4))[0]

    def stat(self, name: str) -> int:
        off = regs.stat_offset(name)
        lo = self.r(off)
        return lo | self.r(off + 4) << 32

    def config16(self, offset: int, value: int) -> None:
        self.fn.region_write(REGION_CONFIG, offset, struct.pack("<H", value))

    def bus_master(self, on: bool = True) -> None:
        self.config16(COMMAND, int(Command.MEMORY | (Command.BUS_MASTER if on else 0)))

    def enable_msix(self) -> None:
        self.config16(self.fn.msix_offset + pcicaps.MSIX_CONTROL, int(pcicaps.MsixControl.ENABLE))

    def enable(self, int_mode: regs.IntMode = regs.IntMode.SINGLE, promisc: bool = False) -> None:
        value = regs.Ctrl.ENABLE | (int(int_mode) << regs.CTRL_INT_MODE_SHIFT)
        if promisc:
            value |= regs.Ctrl.PROMISC
        self.w(regs.CTRL, int(value))

    # ----- memory
    def alloc(self, size: int, align: int = 64) -> int:
        addr = -(-self._next // align) * align
        self._next = addr + size
        assert self._next <= self.dma.base + self.dma.size, "test guest memory exhausted"
        return addr

    def put(self, data: bytes) -> int:
        addr = self.alloc(max(len(data), 1))
        self.dma.write(addr, data)
        return addr

    def peek(self, addr: int, n: int) -> bytes:
        return self.dma.read(addr, n)

    # ----- rings
    @staticmethod
    def block(kind: str, q: int) -> int:
        return {"admin": regs.ADMINQ_BASE, "tx": regs.txq_reg(q, 0), "rx": regs.rxq_reg(q, 0)}[kind]

    def setup_ring(self, kind: str, q: int = 0, length: int = 16, base: int | None = None) -> int:
        size = {"admin": ADMIN_DESC.size, "tx": TX_DESC.size, "rx": RX_DESC.size}[kind]
        if base is None:
            base = self.alloc(length * size)
            self.dma.write(base, bytes(length * size))
        rb = self.block(kind, q)
        self.w(rb + regs.QREG_BASE_LO, base & 0xFFFF_FFFF)
        self.w(rb + regs.QREG_BASE_HI, base >> 32)
        self.w(rb + regs.QREG_LEN, length)
        self.w(rb + regs.QREG_CTRL, int(regs.QueueCtrl.ENABLE))
        self.rings[(kind, q)] = (base, length)
        self.tails[(kind, q)] = 0
        return base

    def desc_addr(self, kind: str, q: int, i: int) -> int:
        base, _ = self.rings[(kind, q)]
        size = {"admin": ADMIN_DESC.size, "tx": TX_DESC.size, "rx": RX_DESC.size}[kind]
        return base + i * size

    def head(self, kind: str, q: int = 0) -> int:
        return self.r(self.block(kind, q) + regs.QREG_HEAD)

    def post(self, kind: str, q: int, desc: bytes, ring_doorbell: bool = True) -> int:
        """Write a descriptor at the driver's tail; returns its index."""
        _, length = self.rings[(kind, q)]
        i = self.tails[(kind, q)]
        self.dma.write(self.desc_addr(kind, q, i), desc)
        self.tails[(kind, q)] = (i + 1) % length
        if ring_doorbell:
            self.doorbell(kind, q)
        return i

    def doorbell(self, kind: str, q: int = 0) -> None:
        self.w(self.block(kind, q) + regs.QREG_TAIL, self.tails[(kind, q)])

    # ----- admin
    def admin(self, opcode: int, request: bytes = b"", resp_cap: int = 4096, interrupt: bool = False,
              **overrides: int) -> tuple[Any, bytes]:
        req_addr = self.put(request) if request else 0
        resp_addr = self.alloc(max(resp_cap, 1))
        fields = dict(opcode=opcode, flags=int(regs.AdminFlags.INTERRUPT) if interrupt else 0,
                      req_len=len(request), req_addr=req_addr, resp_addr=resp_addr, resp_len=resp_cap,
                      cookie=0x1234_5678_9ABC_DEF0)
        fields.update(overrides)
        i = self.post("admin", 0, ADMIN_DESC.pack(**fields))
        self.ctx.run()
        wb = ADMIN_DESC.unpack(self.peek(self.desc_addr("admin", 0, i), ADMIN_DESC.size))
        resp = self.peek(resp_addr, min(wb.resp_len, resp_cap)) if wb.resp_len else b""
        return wb, resp

    # ----- TX / RX
    def send(self, frame: bytes, flags: int = int(regs.TxFlags.EOP | regs.TxFlags.REPORT_STATUS), handle: int = 0,
             q: int = 0, ring_doorbell: bool = True, **overrides: int) -> int:
        addr = self.put(frame)
        fields = dict(addr=addr, length=len(frame), flags=flags, offload_handle=handle)
        fields.update(overrides)
        return self.post("tx", q, TX_DESC.pack(**fields), ring_doorbell)

    def tx_wb(self, i: int, q: int = 0) -> Any:
        return TX_DESC.unpack(self.peek(self.desc_addr("tx", q, i), TX_DESC.size))

    def post_rx(self, count: int, buf_len: int = 2048, q: int = 0) -> list[int]:
        out = []
        for _ in range(count):
            addr = self.alloc(buf_len)
            out.append(self.post("rx", q, RX_DESC.pack(addr=addr, buf_len=buf_len), ring_doorbell=False))
        self.doorbell("rx", q)
        return out

    def rx(self, i: int, q: int = 0) -> tuple[Any, bytes]:
        d = RX_DESC.unpack(self.peek(self.desc_addr("rx", q, i), RX_DESC.size))
        data = self.peek(d.addr, min(d.length, d.buf_len)) if d.wb_flags & regs.RxWbFlags.DD else b""
        return d, data


@dataclass
class Rig:
    fn: Any
    card: Any
    datapath: Datapath
    ctx: FakeContext
    drv: Driver
    firmware: Firmware
    wire: Wire


def make_rig(wire: dict | None = None, nic: dict | None = None, ctx: FakeContext | None = None) -> Rig:
    profile = profile_from_dict({"wire": wire or {"type": "loopback"}, "nic": nic or {}})
    fn = build_card(profile)
    card = fn.card
    dp = card.datapath
    ctx = ctx or FakeContext()
    fn.attached(ctx)  # as the server does when a client connects
    drv = Driver(fn, ctx)
    return Rig(fn, card, dp, ctx, drv, dp.firmware, dp.wire)


@pytest.fixture
def rig() -> Rig:
    """A loopback card, bus master on, enabled, admin + TX0 + RX0 rings up."""
    r = make_rig()
    r.drv.bus_master(True)
    r.drv.enable()
    r.drv.setup_ring("admin", 0, 16)
    r.drv.setup_ring("tx", 0, 16)
    r.drv.setup_ring("rx", 0, 16)
    yield r
    r.datapath.close()
