"""User-space driver for the ipsec-nic card (runs in the guest on its python3, or in host tests).

Shape follows ixy: :meth:`Card.init` is a straight sequence of steps, one method per step, each named
after the registers it programs (device/contract/regs.py is the register contract; docs/datasheet.md renders
it). DMA memory comes as :class:`~guest_tools.dma.DmaBuffer` (view, iova) pairs; register access goes
through :class:`~guest_tools.mmio.Mmio`. Both are injected, so tests run this very driver against the
device model in one process (tests/guest/harness.py).

State across processes. The card keeps its SAs and CTRL.ENABLE across driver processes; rings and the
admin queue live in *this* process's memory. So every process (re)programs the admin queue and the
rings it uses at init (without CTRL.RESET unless asked), and :meth:`Card.close` disables them again, so
the card never DMAs into memory of a process that has gone. (After a SIGKILL with pagemap memory the
rings stay pointed at freed pages until the next process re-initialises: run ``reset`` in doubt. With
vfio the IOMMU mapping dies with the process.) What the host must remember about its crypto-offload SAs
- the outbound sequence counter, the ESN high half it pushed, IV/ICV sizes for framing - is kept in a
small JSON state file (never keys), see :class:`HostSaTable`.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from device.contract import ndis, regs
from device.contract import sa as sa_codec
from device.contract.enums import Direction, IpProto
from device.contract.ndis import Opcode
from device.contract.regs import (
    ADMIN_DESC,
    RX_DESC,
    TX_DESC,
    AdminFlags,
    AdminStatus,
    Cause,
    CryptoStatus,
    Ctrl,
    ErrCode,
    Features,
    IntMode,
    QueueCtrl,
    RxWbFlags,
    Status,
    TxFlags,
    TxStatus,
    TxWbFlags,
)
from device.contract.sa import SaParams
from device.contract.status import NdisStatus
from guest_tools import packets
from guest_tools import sa as sa_wire
from guest_tools.dma import DmaMemory
from guest_tools.mmio import Mmio, read64

ADMIN_TIMEOUT = 5.0  # seconds; QEMU's own message timeout is 5 s, TCG makes everything slow
READY_TIMEOUT = 2.0
DEFAULT_RING_SIZE = 128  # 128 x 32-byte descriptors = one 4 KiB page (pagemap memory)
DEFAULT_ADMIN_SIZE = 16
ETH_OVERHEAD = 18  # Ethernet header + one 802.1Q tag: buffer room beyond the MTU


class CardError(RuntimeError):
    """Card or driver failure; the message says what to check."""


class AdminError(CardError):
    """An admin descriptor failed (AdminStatus) or timed out."""

    def __init__(self, message: str, status: int = -1) -> None:
        super().__init__(message)
        self.status = status


class FirmwareError(CardError):
    """The firmware completed a command with an NDIS error status."""

    def __init__(self, opcode: int, fw_status: int, detail: str = "") -> None:
        name = _opcode_name(opcode)
        super().__init__(f"{name} failed: {sa_wire.status_message(fw_status)}" + (f" ({detail})" if detail else ""))
        self.opcode = opcode
        self.fw_status = fw_status


def _opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode:#06x}"


_ADMIN_STATUS_HELP = {
    AdminStatus.DMA_ERROR: "the card could not reach the request/response buffer (bus mastering off? "
    "IOMMU mapping missing?)",
    AdminStatus.REQUEST_TOO_LONG: "request longer than AQ_MAX_BUF",
    AdminStatus.RESPONSE_TRUNCATED: "response did not fit the buffer",
    AdminStatus.BAD_DESCRIPTOR: "reserved descriptor fields or flags not zero (driver bug)",
    AdminStatus.FIRMWARE_FAULT: "the firmware failed internally (see the device server log)",
}


def enum_name(enum_type, value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return f"UNKNOWN({value})"


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class TxCompletion:
    index: int
    status: int

    @property
    def status_name(self) -> str:
        return enum_name(TxStatus, self.status)


@dataclass
class RxPacket:
    frame: bytes  # as the card wrote it (crypto offload: decrypted in place, ESP header/trailer kept)
    length: int  # frame length the card reported (larger than len(frame) when truncated)
    flags: int  # RxWbFlags
    crypto_status: int
    handle: int
    next_header: int = 0
    pad_length: int = 0
    inner: bytes | None = None  # crypto offload success: the frame with ESP stripped (None otherwise)
    note: str = ""

    @property
    def crypto_done(self) -> bool:
        return bool(self.flags & RxWbFlags.CRYPTO_DONE)

    @property
    def sa_delete_req(self) -> bool:
        return bool(self.flags & RxWbFlags.SA_DELETE_REQ)

    @property
    def decapsulated(self) -> bool:
        return bool(self.flags & RxWbFlags.DECAPSULATED)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & RxWbFlags.ERROR)

    @property
    def crypto_status_name(self) -> str:
        return enum_name(CryptoStatus, self.crypto_status)

    def summary(self) -> dict:
        return {
            "length": self.length, "crypto_done": self.crypto_done,
            "crypto_status": self.crypto_status_name if self.crypto_done else "-",
            "sa_delete_req": self.sa_delete_req, "decapsulated": self.decapsulated, "handle": self.handle,
            "truncated": self.truncated, "inner_length": len(self.inner) if self.inner is not None else None,
            "note": self.note,
        }


@dataclass(frozen=True)
class Identity:
    regmap: str
    hw_version: str
    fw_version: str
    features: int
    sa_capacity: int
    num_txq: int
    num_rxq: int
    max_ring: int
    num_msix: int
    mac: bytes
    max_mtu: int
    aq_max_len: int
    aq_max_buf: int

    @property
    def mac_text(self) -> str:
        return packets.format_mac(self.mac)


# ---------------------------------------------------------------------------------------------
# what the host remembers about its SAs (no keys)


@dataclass
class HostSa:
    handle: int
    spi: int
    direction: int
    offload: str  # "crypto" | "packet"
    esn: bool = False
    next_seq: int = 1  # outbound crypto offload: sequence number of the next packet
    seq_hi_pushed: int = 0  # ESN high half last told to the card (UPDATE_SA)
    iv_len: int = 0
    icv_len: int = 0
    align: int = 4
    tunnel: bool = False
    encap: tuple[int, int] | None = None
    src: str = ""
    dst: str = ""

    def geometry(self) -> packets.EspGeometry:
        return packets.EspGeometry(self.spi, self.iv_len, self.icv_len, self.align, self.tunnel, self.encap,
                                   self.src, self.dst)


class HostSaTable:
    """handle -> HostSa, optionally persisted to a JSON file so separate CLI processes share it."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.sas: dict[int, HostSa] = {}
        if self.path is not None and self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                for item in raw.get("sas", []):
                    if item.get("encap") is not None:
                        item["encap"] = tuple(item["encap"])
                    sa = HostSa(**item)
                    self.sas[sa.handle] = sa
            except (OSError, ValueError, TypeError) as exc:
                raise CardError(f"host SA state {self.path} unreadable ({exc}); delete it and run 'reset'") from None

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sas": [asdict(s) for s in self.sas.values()]}, indent=1))
        os.replace(tmp, self.path)

    def get(self, handle: int) -> HostSa | None:
        return self.sas.get(handle)


# ---------------------------------------------------------------------------------------------
# interrupts


class PollInterrupts:
    """No interrupts: the driver polls ICR and descriptors (CTRL.INT_MODE = POLL)."""

    mode = IntMode.POLL
    name = "poll"

    def wait(self, timeout: float) -> None:
        time.sleep(timeout)

    def close(self) -> None:
        pass


class MsixInterrupts:
    """MSI-X through vfio eventfds (CTRL.INT_MODE = VECTORS, IVAR reset map: misc -> 0, queue n -> 1+n)."""

    mode = IntMode.VECTORS
    name = "msix"

    def __init__(self, eventfds: list[int]) -> None:
        self.eventfds = eventfds

    def wait(self, timeout: float) -> None:
        from guest_tools.vfio import wait_eventfds

        wait_eventfds(self.eventfds, timeout)

    def close(self) -> None:
        pass  # the vfio device owns the fds


# ---------------------------------------------------------------------------------------------
# rings


class _Ring:
    """One descriptor ring in DMA memory plus the driver's shadow indices."""

    def __init__(self, memory: DmaMemory, entries: int, desc_size: int) -> None:
        self.entries = entries
        self.desc_size = desc_size
        self.mem = memory.alloc(entries * desc_size, align=max(regs.RING_ALIGN, desc_size))
        self.mem.view[:] = b"\xff" * self.mem.size  # ixy: early device DMA of junk shows up
        self.tail = 0  # next descriptor the driver fills
        self.clean = 0  # next descriptor the driver expects the card to finish

    def at(self, index: int) -> int:
        return index * self.desc_size


def _pow2_floor(value: int) -> int:
    return 1 << (max(1, value).bit_length() - 1)


class Card:
    """The ipsec-nic card driven from user space. Call :meth:`init` before anything else."""

    def __init__(self, mmio: Mmio, memory: DmaMemory, *, interrupts=None, ring_size: int = DEFAULT_RING_SIZE,
                 admin_size: int = DEFAULT_ADMIN_SIZE, state: HostSaTable | None = None,
                 admin_timeout: float = ADMIN_TIMEOUT, queue: int = 0, receive: bool = True) -> None:
        self.mmio = mmio
        # A process that will not receive leaves its RX ring off: frames that arrive meanwhile wait in
        # the card's RX backlog for the next process that does (datasheet §7), instead of landing in
        # this process's buffers and vanishing with it.
        self.receive = receive
        self.memory = memory
        self.irq = interrupts or PollInterrupts()
        self.want_ring = ring_size
        self.want_admin = admin_size
        self.host = state or HostSaTable()
        self.admin_timeout = admin_timeout
        self.queue = queue
        self.ident: Identity | None = None
        self.sa_delete_requests = 0
        self.errors_seen: list[str] = []
        self._cookie = 0
        self._open = False
        self._tx_backlog: list[TxCompletion] = []
        self.vfio = None  # a guest_tools.vfio.VfioDevice when opened through vfio-pci

    # ------------------------------------------------------------------------------------------
    # init sequence

    def init(self, reset: bool = False) -> Card:
        self._check_identity()
        if reset:
            self._reset()
        self._wait_ready()
        self.ident = self._read_capabilities()
        self._quiesce()
        self._setup_admin_queue()
        self._setup_tx_ring()
        if self.receive:
            self._setup_rx_ring()
        self._setup_interrupts()
        self._enable()
        self._open = True
        if reset:
            self.host.sas.clear()
            self.host.save()
        return self

    def _check_identity(self) -> None:
        """ID and REGMAP_VERSION: is this the card, and does this driver speak its register map?"""
        ident = self.mmio.read32(regs.reg("ID"))
        if ident == 0xFFFF_FFFF:
            raise CardError("BAR0 reads all ones: the card is not responding; is the device server running "
                            "and COMMAND.MEMORY set?")
        if ident != regs.ID_MAGIC:
            raise CardError(f"ID register is {ident:#010x}, not {regs.ID_MAGIC:#010x} ('IPNC'): wrong device "
                            "selected (--bdf)?")
        version = self.mmio.read32(regs.reg("REGMAP_VERSION"))
        if version >> 16 != regs.REGMAP_VERSION_VALUE >> 16:
            raise CardError(f"register map {regs.decode_version(version)} is not compatible with this driver "
                            f"({regs.decode_version(regs.REGMAP_VERSION_VALUE)}): update guest_tools")

    def _reset(self) -> None:
        """CTRL.RESET: every register, ring and SA back to reset state (self-clearing)."""
        self.mmio.write32(regs.CTRL, Ctrl.RESET)

    def _wait_ready(self) -> None:
        """STATUS.READY within READY_TIMEOUT; STATUS.FATAL means only CTRL.RESET helps."""
        self._wait(lambda: self.mmio.read32(regs.STATUS) & Status.READY, READY_TIMEOUT,
                   "STATUS.READY after reset: is the device server running?")
        status = self.mmio.read32(regs.STATUS)
        if status & Status.FATAL:
            raise CardError(f"card stopped by a fatal error ({self._error_text()}): run 'reset'")

    def _read_capabilities(self) -> Identity:
        r = self.mmio.read32
        mac = r(regs.reg("MAC_LO")).to_bytes(4, "little") + (r(regs.reg("MAC_HI")) & 0xFFFF).to_bytes(2, "little")
        return Identity(
            regmap=regs.decode_version(r(regs.reg("REGMAP_VERSION"))),
            hw_version=regs.decode_version(r(regs.reg("HW_VERSION"))),
            fw_version=regs.decode_version(r(regs.reg("FW_VERSION"))),
            features=r(regs.reg("FEATURES")), sa_capacity=r(regs.reg("SA_CAPACITY")),
            num_txq=r(regs.reg("NUM_TXQ")), num_rxq=r(regs.reg("NUM_RXQ")), max_ring=r(regs.reg("MAX_RING_SIZE")),
            num_msix=r(regs.reg("NUM_MSIX")), mac=mac, max_mtu=r(regs.reg("MAX_MTU")),
            aq_max_len=r(regs.reg("AQ_MAX_LEN")), aq_max_buf=r(regs.reg("AQ_MAX_BUF")),
        )

    def _quiesce(self) -> None:
        """Ring CTRL = 0 for the rings this driver uses (a previous process may have left them pointing at
        its memory), IMC = all, ICR cleared. CTRL.ENABLE and the SAs stay."""
        assert self.ident is not None
        if self.queue >= min(self.ident.num_txq, self.ident.num_rxq):
            raise CardError(f"queue {self.queue} does not exist (card has {self.ident.num_txq} TX / "
                            f"{self.ident.num_rxq} RX queues)")
        self.mmio.write32(regs.rxq_reg(self.queue, regs.QREG_CTRL), 0)
        self.mmio.write32(regs.txq_reg(self.queue, regs.QREG_CTRL), 0)
        self.mmio.write32(regs.ADMINQ_BASE + regs.QREG_CTRL, 0)
        self.mmio.write32(regs.reg("IMC"), 0xFFFF_FFFF)
        self.mmio.write32(regs.ICR, 0xFFFF_FFFF)

    def _program_ring(self, base: int, ring: _Ring, tail: int) -> None:
        """BASE_LO/HI, LEN, TAIL, then CTRL.ENABLE (the card checks base/len on 0->1 and zeroes HEAD)."""
        self.mmio.write32(base + regs.QREG_BASE_LO, ring.mem.iova & 0xFFFF_FFFF)
        self.mmio.write32(base + regs.QREG_BASE_HI, ring.mem.iova >> 32)
        self.mmio.write32(base + regs.QREG_LEN, ring.entries)
        self.mmio.write32(base + regs.QREG_TAIL, tail)
        self.mmio.write32(base + regs.QREG_CTRL, QueueCtrl.ENABLE)
        if not self.mmio.read32(base + regs.QREG_CTRL) & QueueCtrl.ENABLE:
            raise CardError(f"ring at {base:#x} did not enable ({self._error_text()}): base {ring.mem.iova:#x} / "
                            f"length {ring.entries} refused")

    def _setup_admin_queue(self) -> None:
        """AQ_*: a ring of 64-byte AdminDesc plus one request and one response buffer (one command at a time)."""
        assert self.ident is not None
        limit = min(self.want_admin, self.ident.aq_max_len, self.memory.max_contiguous // ADMIN_DESC.size)
        entries = _pow2_floor(limit)
        if entries < regs.MIN_RING_SIZE:
            raise CardError(f"admin queue too small ({entries}); AQ_MAX_LEN is {self.ident.aq_max_len}")
        self.aq = _Ring(self.memory, entries, ADMIN_DESC.size)
        self.admin_buf_size = max(64, min(self.ident.aq_max_buf or 4096, self.memory.max_contiguous, 4096))
        self.aq_req = self.memory.alloc(self.admin_buf_size, align=64)
        self.aq_resp = self.memory.alloc(self.admin_buf_size, align=64)
        self._program_ring(regs.ADMINQ_BASE, self.aq, 0)

    def _data_ring_entries(self) -> int:
        assert self.ident is not None
        limit = min(self.want_ring, self.ident.max_ring or self.want_ring,
                    self.memory.max_contiguous // TX_DESC.size)
        entries = _pow2_floor(limit)
        if entries < regs.MIN_RING_SIZE:
            raise CardError(f"ring size {entries} below {regs.MIN_RING_SIZE}")
        return entries

    def _buffer_size(self) -> int:
        """Packet buffer size: 2 KiB halves of a page when the MTU allows, else a page (or more with vfio)."""
        assert self.ident is not None
        mtu = self.mmio.read32(regs.reg("MTU"))
        want = mtu + ETH_OVERHEAD
        size = 2048
        while size < want and size < min(self.memory.max_contiguous, 0x8000):
            size *= 2
        if want > size:
            # Pagemap memory is contiguous within one page only: lower the MTU to what fits.
            self.mmio.write32(regs.reg("MTU"), size - ETH_OVERHEAD)
            self.errors_seen.append(f"MTU lowered from {mtu} to {size - ETH_OVERHEAD} to fit {size}-byte buffers")
        return size

    def _setup_tx_ring(self) -> None:
        """TXQ n: descriptor ring + one buffer per descriptor; empty (TAIL = HEAD = 0)."""
        self.buf_size = self._buffer_size()
        entries = self._data_ring_entries()
        self.txr = _Ring(self.memory, entries, TX_DESC.size)
        self.tx_bufs = [self.memory.alloc(self.buf_size, align=self.buf_size) for _ in range(entries)]
        self._program_ring(regs.txq_reg(self.queue, 0), self.txr, 0)

    def _setup_rx_ring(self) -> None:
        """RXQ n: every descriptor armed with a buffer, TAIL = entries - 1.

        The card fills descriptors from HEAD up to TAIL - 1; TAIL == HEAD means "no buffers", so one
        armed descriptor always stays back: with N entries the card can hold at most N - 1 frames."""
        entries = self._data_ring_entries()
        self.rxr = _Ring(self.memory, entries, RX_DESC.size)
        self.rx_bufs = [self.memory.alloc(self.buf_size, align=self.buf_size) for _ in range(entries)]
        for i in range(entries):
            self._arm_rx(i)
        self.rxr.tail = entries - 1
        self._program_ring(regs.rxq_reg(self.queue, 0), self.rxr, self.rxr.tail)

    def _arm_rx(self, i: int) -> None:
        buf = self.rx_bufs[i]
        at = self.rxr.at(i)
        self.rxr.mem.view[at:at + RX_DESC.size] = RX_DESC.pack(addr=buf.iova, buf_len=buf.size)

    def _setup_interrupts(self) -> None:
        """CTRL.INT_MODE + IMS: admin, error, SaDeleteReq and this queue pair's TX/RX causes."""
        self.causes = int(Cause.ADMINQ | Cause.ERROR | Cause.SA_DELETE_REQ) | regs.cause_tx(self.queue) | \
            regs.cause_rx(self.queue)
        if self.irq.mode != IntMode.POLL:
            self.mmio.write32(regs.reg("IMS"), self.causes)

    def _enable(self) -> None:
        """CTRL.ENABLE with the interrupt mode; STATUS.ENABLED confirms."""
        ctrl = self.mmio.read32(regs.CTRL) & Ctrl.PROMISC
        ctrl |= Ctrl.ENABLE | (int(self.irq.mode) << regs.CTRL_INT_MODE_SHIFT)
        self.mmio.write32(regs.CTRL, ctrl)
        self._wait(lambda: self.mmio.read32(regs.STATUS) & Status.ENABLED, READY_TIMEOUT,
                   f"STATUS.ENABLED after CTRL.ENABLE ({self._error_text()})")

    def close(self) -> None:
        """Disable this process's rings (RX first: it is the one the card writes unprompted), then
        release interrupts and the vfio device, also after a failed init()."""
        if self._open:
            self._open = False
            with contextlib.suppress(Exception):
                self.mmio.write32(regs.rxq_reg(self.queue, regs.QREG_CTRL), 0)
                self.mmio.write32(regs.txq_reg(self.queue, regs.QREG_CTRL), 0)
                self.mmio.write32(regs.ADMINQ_BASE + regs.QREG_CTRL, 0)
                self.mmio.write32(regs.reg("IMC"), self.causes)
            self.host.save()
        self.irq.close()
        if self.vfio is not None:
            self.vfio.close()
            self.vfio = None

    def __enter__(self) -> Card:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # waiting and interrupt causes

    def _error_text(self) -> str:
        code = self.mmio.read32(regs.reg("ERR_CODE"))
        info = self.mmio.read32(regs.reg("ERR_INFO"))
        return f"ERR_CODE={enum_name(ErrCode, code)} ERR_INFO={info:#x}"

    def service(self) -> int:
        """Read and acknowledge ICR (W1C); note SA delete requests and errors. Returns the causes seen."""
        icr = self.mmio.read32(regs.ICR)
        if icr:
            self.mmio.write32(regs.ICR, icr)
            if icr & Cause.SA_DELETE_REQ:
                self.sa_delete_requests += 1
            if icr & Cause.ERROR:
                self.errors_seen.append(self._error_text())
        return icr

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        pause = 0.00002
        while True:
            if ready():
                return
            self.service()  # also what moves a test harness's device model along
            if ready():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise CardError(f"timed out after {timeout:g} s waiting for {what}")
            self.irq.wait(min(pause, left))
            pause = min(pause * 2, 0.002)

    # ------------------------------------------------------------------------------------------
    # admin queue

    def admin(self, opcode: int, request: bytes = b"", timeout: float | None = None) -> tuple[int, bytes]:
        """Run one admin command; returns (fw_status, response). Raises AdminError for descriptor failures."""
        if not self._open:
            raise CardError("card not initialised: call init() first")
        if len(request) > self.admin_buf_size:
            raise AdminError(f"{_opcode_name(opcode)} request of {len(request)} bytes exceeds the "
                             f"{self.admin_buf_size}-byte admin buffer", AdminStatus.REQUEST_TOO_LONG)
        ring = self.aq
        i = ring.tail
        at = ring.at(i)
        self.aq_req.view[:len(request)] = request
        self._cookie = (self._cookie + 1) & 0xFFFF_FFFF_FFFF_FFFF
        flags = AdminFlags.INTERRUPT if self.irq.mode != IntMode.POLL else 0
        ring.mem.view[at:at + ADMIN_DESC.size] = ADMIN_DESC.pack(
            opcode=opcode, flags=flags, req_len=len(request), req_addr=self.aq_req.iova if request else 0,
            resp_addr=self.aq_resp.iova, resp_len=self.aq_resp.size, cookie=self._cookie)
        ring.tail = (i + 1) % ring.entries
        self.mmio.write32(regs.ADMINQ_BASE + regs.QREG_TAIL, ring.tail)  # doorbell

        view = ring.mem.view

        def done() -> bool:
            return bool(ADMIN_DESC.get(view, at, "flags") & AdminFlags.DONE)

        try:
            self._wait(done, timeout or self.admin_timeout, f"admin command {_opcode_name(opcode)}")
        except CardError:
            status = self.mmio.read32(regs.STATUS)
            hint = "the card stopped (STATUS.FATAL): run 'reset'" if status & Status.FATAL else \
                "is the device server running?"
            raise AdminError(f"admin command {_opcode_name(opcode)} timed out after {timeout or self.admin_timeout:g} s: "
                             f"{hint} (AQ_HEAD={self.mmio.read32(regs.ADMINQ_BASE + regs.QREG_HEAD)}, "
                             f"STATUS={status:#x}, {self._error_text()})") from None
        # DONE: the card has read the request; wipe it so SA keys do not linger in DMA memory (§5.1)
        self.aq_req.view[:len(request)] = bytes(len(request))
        d = ADMIN_DESC.unpack(view, at)
        ring.clean = ring.tail
        if d.cookie != self._cookie:
            raise AdminError(f"admin descriptor {i} came back with cookie {d.cookie:#x}, expected {self._cookie:#x} "
                             "(card and driver disagree on the admin ring: run 'reset')")
        if d.status != AdminStatus.OK:
            raise AdminError(f"admin command {_opcode_name(opcode)}: {enum_name(AdminStatus, d.status)}: "
                             f"{_ADMIN_STATUS_HELP.get(d.status, 'unknown admin status')}", d.status)
        if d.resp_len > self.aq_resp.size:
            raise AdminError(f"admin command {_opcode_name(opcode)}: response length {d.resp_len} exceeds the buffer")
        return d.fw_status, bytes(self.aq_resp.view[:d.resp_len])

    def command(self, opcode: int, request: bytes = b"") -> bytes:
        """Admin command that must succeed: raises FirmwareError naming the NDIS status otherwise."""
        fw_status, response = self.admin(opcode, request)
        if fw_status != NdisStatus.SUCCESS:
            raise FirmwareError(opcode, fw_status)
        return response

    # ------------------------------------------------------------------------------------------
    # SA operations

    def caps(self) -> ndis.CapsWire:
        return ndis.CapsWire.unpack(self.command(Opcode.GET_CAPS))

    def firmware_stats(self) -> ndis.GlobalStats:
        return ndis.GlobalStats.unpack(self.command(Opcode.GET_STATS))

    def add_sa(self, params: SaParams, offload: str = "crypto", v1: bool = False) -> int:
        """Offload one SA; returns its handle. ``offload``: "crypto" (V2_ADD_SA_EX, or V1_ADD_SA /
        V1_ADD_UDPESP_SA with ``v1``) or "packet" (ADD_SA_PACKET)."""
        try:
            if offload == "packet":
                if v1:
                    raise ValueError("v1 commands have no packet offload")
                opcode, request = Opcode.ADD_SA_PACKET, sa_codec.add_sa_packet(params)
            elif offload != "crypto":
                raise ValueError(f"offload must be 'crypto' or 'packet', not {offload!r}")
            elif v1 and params.encap is not None:
                opcode, request = Opcode.V1_ADD_UDPESP_SA, sa_codec.v1_add_udpesp_sa(params)
            elif v1:
                opcode, request = Opcode.V1_ADD_SA, sa_codec.v1_add_sa(params)
            else:
                opcode, request = Opcode.V2_ADD_SA_EX, sa_codec.v2_add_sa_ex(params)
        except ValueError as exc:
            raise CardError(f"SA {params.spi:#x} cannot be offloaded: {exc}") from None
        response = self.command(opcode, request)
        handle = struct.unpack_from("<I", response)[0] if len(response) >= 4 else 0
        if handle == 0:
            raise CardError(f"{_opcode_name(opcode)} succeeded but returned handle 0 (firmware bug)")
        host = HostSa(handle, params.spi, int(params.direction), offload, params.esn,
                      next_seq=params.seq + 1, seq_hi_pushed=params.seq >> 32)
        if offload == "crypto" and params.proto == IpProto.ESP:
            g = sa_wire.esp_geometry(params)
            host.iv_len, host.icv_len, host.align, host.tunnel = g.iv_len, g.icv_len, g.align, g.tunnel
            host.encap, host.src, host.dst = g.encap, g.src, g.dst
        self.host.sas[handle] = host
        self.host.save()
        return handle

    def delete_sa(self, handles: list[int]) -> None:
        self.command(Opcode.V2_DELETE_SA, sa_codec.v2_delete(handles))
        for h in handles:
            self.host.sas.pop(h, None)
        self.host.save()

    def list_sas(self) -> list[ndis.SaListEntry]:
        rows: list[ndis.SaListEntry] = []
        start = 0
        per_page = max(1, (self.admin_buf_size - ndis.LIST_SAS_RESPONSE.size) // ndis.SA_LIST_ENTRY.size)
        for _ in range(ndis.MAX_LIST_SAS_ENTRIES):
            head, entries = ndis.unpack_list_sas(self.command(Opcode.LIST_SAS,
                                                              ndis.ListSasRequest(start, per_page).pack()))
            rows += entries
            if head.next_index == 0xFFFF_FFFF or head.next_index == start:
                break
            start = head.next_index
        return rows

    def delete_all(self) -> int:
        handles = sorted({e.offload_handle for e in self.list_sas()})
        if handles:
            self.delete_sa(handles)
        return len(handles)

    def forget_stale(self) -> None:
        """Drop host state for handles the card no longer has (reset elsewhere, deleted by another process)."""
        live = {e.offload_handle for e in self.list_sas()}
        for h in [h for h in self.host.sas if h not in live]:
            del self.host.sas[h]
        self.host.save()

    def update_sa(self, handle: int, seq_hi: int, spi: int | None = None, proto: IpProto = IpProto.ESP) -> None:
        if spi is None:
            known = self.host.get(handle)
            if known is None:
                match = [e for e in self.list_sas() if e.offload_handle == handle]
                if not match:
                    raise CardError(f"SA handle {handle:#x} not on the card ('sa list')")
                spi, proto = match[0].spi, IpProto(match[0].proto)
            else:
                spi = known.spi
        self.command(Opcode.V2_UPDATE_SA, sa_codec.v2_update_sa(handle, spi, seq_hi, proto))
        known = self.host.get(handle)
        if known is not None:
            known.seq_hi_pushed = seq_hi
            self.host.save()

    def sa_stats(self, handle: int) -> list[ndis.SaStatsEntry]:
        return ndis.unpack_sa_stats(self.command(Opcode.GET_SA_STATS, ndis.HandleRequest(handle).pack()))[1]

    # ------------------------------------------------------------------------------------------
    # transmit

    def _tx_reclaim_wait(self) -> None:
        def reclaimed() -> bool:
            self._tx_backlog.extend(self.poll_tx())  # kept for the caller's next poll_tx()
            return self._tx_free() > 0

        self._wait(reclaimed, 2.0,
                   "a free TX descriptor: the card is not completing TX (device server running? link up?)")

    def _tx_free(self) -> int:
        r = self.txr
        return r.entries - 1 - ((r.tail - r.clean) % r.entries)

    def send_raw(self, frame: bytes, flags: int = 0, handle: int = 0, esp_offset: int = 0, pad_length: int = 0,
                 next_header: int = 0) -> int:
        """Queue one frame on the TX ring (one descriptor, EOP | REPORT_STATUS). Returns the descriptor index."""
        if not self._open:
            raise CardError("card not initialised: call init() first")
        if not frame:
            raise CardError("refusing to send an empty frame")
        if len(frame) > self.buf_size:
            raise CardError(f"frame of {len(frame)} bytes exceeds the {self.buf_size}-byte TX buffer (MTU?)")
        if self._tx_free() == 0:
            self._tx_reclaim_wait()
        r = self.txr
        i = r.tail
        buf = self.tx_bufs[i]
        buf.view[:len(frame)] = frame
        at = r.at(i)
        r.mem.view[at:at + TX_DESC.size] = TX_DESC.pack(
            addr=buf.iova, length=len(frame), flags=int(flags | TxFlags.EOP | TxFlags.REPORT_STATUS),
            offload_handle=handle, esp_offset=esp_offset, pad_length=pad_length, next_header=next_header)
        r.tail = (i + 1) % r.entries
        self.mmio.write32(regs.txq_reg(self.queue, regs.QREG_TAIL), r.tail)
        return i

    def send(self, frame: bytes, handle: int = 0, mode: str | None = None) -> int:
        """Send an Ethernet frame carrying a plain IP packet.

        mode None/"plain": as is (handle must be 0). "crypto": the driver builds ESP for outbound SA
        ``handle`` (its own sequence counter) and the card encrypts. "packet": the card encapsulates
        with SA ``handle`` (0 = the card picks the SA by selector)."""
        mode = mode or ("crypto" if handle else "plain")
        if mode == "plain":
            if handle:
                raise CardError("a plain frame takes no SA handle (use --mode crypto or packet)")
            return self.send_raw(frame)
        if mode == "packet":
            return self.send_raw(frame, TxFlags.IPSEC_PACKET, handle)
        if mode != "crypto":
            raise CardError(f"send mode must be plain, crypto or packet, not {mode!r}")
        sa = self.host.get(handle)
        if sa is None or sa.offload != "crypto" or sa.direction != Direction.OUTBOUND or not sa.icv_len:
            raise CardError(f"handle {handle:#x} is not an outbound crypto-offload ESP SA added through this "
                            "tool ('sa list'; the host needs its framing state)")
        l3 = packets.l3_offset(frame)
        if l3 < 0:
            raise CardError("crypto offload needs an Ethernet frame carrying IPv4 or IPv6")
        seq = sa.next_seq
        if not sa.esn and seq > 0xFFFF_FFFF:
            raise CardError(f"SA {sa.spi:#x}: sequence numbers exhausted (RFC 4303 §3.3.3): add a new SA")
        if sa.esn and seq >> 32 != sa.seq_hi_pushed:
            self.update_sa(handle, seq >> 32, sa.spi)  # the card needs the ESN high half (RFC 4304)
        try:
            esp = packets.build_esp(sa.geometry(), frame[l3:], seq)
        except packets.FrameError as exc:
            raise CardError(f"cannot build ESP: {exc}") from None
        out = bytearray(frame[:l3]) + esp.packet
        if out[l3] >> 4 == 6 and l3 >= 2:
            out[l3 - 2:l3] = packets.ETH_P_IPV6.to_bytes(2, "big")
        elif l3 >= 2:
            out[l3 - 2:l3] = packets.ETH_P_IP.to_bytes(2, "big")
        index = self.send_raw(bytes(out), TxFlags.IPSEC_CRYPTO, handle, l3 + esp.esp_offset, esp.pad_length,
                              esp.next_header)
        sa.next_seq = seq + 1
        return index

    def poll_tx(self) -> list[TxCompletion]:
        """Collect finished TX descriptors (wb_flags.DONE) in order."""
        r = self.txr
        out, self._tx_backlog = self._tx_backlog, []
        view = r.mem.view
        while r.clean != r.tail:
            at = r.at(r.clean)
            if not TX_DESC.get(view, at, "wb_flags") & TxWbFlags.DONE:
                break
            out.append(TxCompletion(r.clean, TX_DESC.get(view, at, "wb_status")))
            r.clean = (r.clean + 1) % r.entries
        return out

    def flush_tx(self, timeout: float = 5.0) -> list[TxCompletion]:
        """Wait until every queued frame completed; returns their completions."""
        done: list[TxCompletion] = []

        def all_done() -> bool:
            done.extend(self.poll_tx())
            return self.txr.clean == self.txr.tail

        self._wait(all_done, timeout, "TX completions (device server running? link up?)")
        return done

    # ------------------------------------------------------------------------------------------
    # receive

    def _rx_ready(self) -> bool:
        at = self.rxr.at(self.rxr.clean)
        return bool(RX_DESC.get(self.rxr.mem.view, at, "wb_flags") & RxWbFlags.DD)

    def recv(self, timeout: float = 0.0, limit: int = 64) -> list[RxPacket]:
        """Frames the card wrote back, waiting up to ``timeout`` seconds for the first one."""
        if not self.receive:
            raise CardError("this card handle was opened without an RX ring (receive=False)")
        if not self._rx_ready() and timeout > 0:
            with contextlib.suppress(CardError):
                self._wait(self._rx_ready, timeout, "a received frame")
        out: list[RxPacket] = []
        r = self.rxr
        while len(out) < limit and self._rx_ready():
            i = r.clean
            d = RX_DESC.unpack(r.mem.view, r.at(i))
            buf = self.rx_bufs[i]
            frame = bytes(buf.view[:min(d.length, buf.size)])
            out.append(self._rx_packet(frame, d))
            self._arm_rx(i)
            r.clean = (i + 1) % r.entries
            # Hand the re-armed descriptor back: TAIL = i keeps one descriptor between TAIL and HEAD.
            self.mmio.write32(regs.rxq_reg(self.queue, regs.QREG_TAIL), i)
        return out

    def _rx_packet(self, frame: bytes, d) -> RxPacket:
        pkt = RxPacket(frame, d.length, d.wb_flags, d.crypto_status, d.offload_handle, d.next_header, d.pad_length)
        if pkt.sa_delete_req:
            self.sa_delete_requests += 1
        if not pkt.crypto_done or pkt.decapsulated or pkt.crypto_status != CryptoStatus.SUCCESS:
            return pkt
        sa = self.host.get(d.offload_handle)
        if sa is None or sa.offload != "crypto" or not sa.icv_len:
            pkt.note = "decrypted by the card; SA unknown to this host, ESP left in place"
            return pkt
        l3 = packets.l3_offset(frame)
        try:
            stripped = packets.strip_esp(sa.geometry(), frame[l3:]) if l3 >= 0 else None
        except packets.FrameError as exc:
            pkt.note = f"cannot strip ESP: {exc}"
            return pkt
        if stripped is None:
            pkt.note = "not an IP frame"
        elif stripped.packet is None:
            pkt.note = "dummy packet (next header 59, RFC 4303 §2.6)"
        else:
            head = bytearray(frame[:l3])
            etype = packets.ETH_P_IPV6 if stripped.packet[0] >> 4 == 6 else packets.ETH_P_IP
            head[l3 - 2:l3] = etype.to_bytes(2, "big")
            pkt.inner = bytes(head) + stripped.packet
        return pkt

    # ------------------------------------------------------------------------------------------
    # statistics

    def stats(self) -> dict[str, int]:
        """The card's 64-bit statistics registers (LO read latches HI)."""
        return {name.lower(): read64(self.mmio, regs.stat_offset(name)) for name, _ in regs.STATISTICS}

    def features(self) -> list[str]:
        assert self.ident is not None
        return [name for name, m in Features.__members__.items() if self.ident.features & m]


def default_state_path(bdf: str) -> Path:
    return Path(os.environ.get("IPSEC_NIC_STATE_DIR", "/run/ipsec-nic")) / f"{bdf}.json"


def open_card(bdf: str | None = None, irq: str = "auto", reset: bool = False, state_path: str | None = None,
              ring_size: int = DEFAULT_RING_SIZE, receive: bool = True) -> Card:
    """Find the card in sysfs and initialise it: vfio (IOVA DMA, MSI-X) when asked for or already bound to
    vfio-pci, else sysfs BAR mmap + pagemap DMA + polling."""
    from guest_tools import pci

    try:
        dev = pci.find_device(regs.VENDOR_ID, regs.DEVICE_ID, bdf)
        pci.require_root()
    except pci.PciError as exc:
        raise CardError(f"card not found: {exc}") from None
    driver_link = dev.path / "driver"
    bound = os.path.basename(os.readlink(driver_link)) if driver_link.exists() else ""
    state = HostSaTable(state_path or default_state_path(dev.bdf))
    # A device bound to vfio-pci sits behind the IOMMU: physical (pagemap) addresses would not reach us.
    use_vfio = irq == "msix" or bound == "vfio-pci"
    if use_vfio:
        from guest_tools import vfio
        from guest_tools.dma import IovaMemory

        vdev = None
        try:
            vfio.bind_to_vfio(dev.bdf)
            vdev = vfio.VfioDevice(dev.bdf)
            vdev.enable_bus_master()
            mmio = vdev.bar0(regs.BAR0_SIZE)
            memory: DmaMemory = IovaMemory(vdev.map_dma)
            # Reset IVAR map: misc causes -> vector 0, queue n -> vector 1 + n (regs._default_ivar).
            nvec = min(2, vdev.msix_count())
            interrupts = MsixInterrupts(vdev.enable_msix(nvec)) if irq != "poll" and nvec else PollInterrupts()
        except OSError as exc:
            if vdev is not None:
                vdev.close()  # container, group and device fds (and any eventfds) go with it
            raise CardError(str(exc)) from None
        card = Card(mmio, memory, interrupts=interrupts, state=state, ring_size=ring_size, receive=receive)
        card.vfio = vdev  # the card owns the vfio fds from here on and closes them in close()
    else:
        if irq == "msix":
            raise CardError("MSI-X needs vfio-pci and an IOMMU")
        from guest_tools.dma import PagemapMemory

        try:
            pci.enable_device(dev, bus_master=True)
            mmio = pci.Bar(dev, 0)
        except pci.PciError as exc:
            raise CardError(str(exc)) from None
        card = Card(mmio, PagemapMemory(), interrupts=PollInterrupts(), state=state, ring_size=ring_size,
                    receive=receive)
    card.bdf = dev.bdf  # type: ignore[attr-defined]
    try:
        card.init(reset=reset)
        if not reset:
            card.forget_stale()
    except BaseException:
        card.close()
        raise
    return card
