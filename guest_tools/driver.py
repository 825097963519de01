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
import os
import time
from dataclasses import dataclass
from pathlib import Path

from device.contract import regs
from device.contract.enums import UdpEspEncapsulation
from device.contract.regs import (
    ADMIN_DESC,
    RX_DESC,
    TX_DESC,
    Cause,
    Ctrl,
    ErrCode,
    Features,
    IntMode,
    QueueCtrl,
    Status,
)
from guest_tools import packets
from guest_tools.admin_queue import AdminError, AdminQueueOps, CardError, FirmwareError, enum_name
from guest_tools.dma import DmaMemory
from guest_tools.mmio import Mmio, read64
from guest_tools.sa_api import HostSa, HostSaTable, SaOps
from guest_tools.txrx import RxPacket, TxCompletion, TxRxOps

ADMIN_TIMEOUT = 5.0  # seconds; QEMU's own message timeout is 5 s, TCG makes everything slow
READY_TIMEOUT = 2.0
DEFAULT_RING_SIZE = 128  # 128 x 32-byte descriptors = one 4 KiB page (pagemap memory)
DEFAULT_ADMIN_SIZE = 16
ETH_OVERHEAD = 18  # Ethernet header + one 802.1Q tag: buffer room beyond the MTU


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
    udp_esp: int = 0  # UDP_ESP register: the UdpEspEncapsulation kinds the card offers

    @property
    def mac_text(self) -> str:
        return packets.format_mac(self.mac)


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


class Card(AdminQueueOps, SaOps, TxRxOps):
    """The ipsec-nic card driven from user space. Call :meth:`init` before anything else."""

    def __init__(self, mmio: Mmio, memory: DmaMemory, *, interrupts=None, ring_size: int = DEFAULT_RING_SIZE,
                 admin_size: int = DEFAULT_ADMIN_SIZE, state: HostSaTable | None = None,
                 admin_timeout: float = ADMIN_TIMEOUT, queue: int = 0, receive: bool = True,
                 mirror: Mmio | None = None) -> None:
        self.mmio = mmio
        # The mirror BAR (regs.MIRROR_BAR), when the caller mapped it: the waits poll M_ICR there, a
        # load from memory QEMU shares with the card instead of a trapped BAR0 read.
        self.mirror = mirror
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
        self.host_policy_drops = 0
        self.errors_seen: list[str] = []
        self._cookie = 0
        self._open = False
        self._tx_backlog: list[TxCompletion] = []
        self.vfio = None  # a guest_tools.vfio.VfioDevice when opened through vfio-pci
        self._read_icr = self._read_icr_trapped

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
        if self.mirror is not None and version >= regs.MIRROR_MIN_VERSION:
            self._read_icr = self._read_icr_mirror

    def _read_icr_trapped(self) -> int:
        return self.mmio.read32(regs.ICR)

    def _read_icr_mirror(self) -> int:
        assert self.mirror is not None
        return self.mirror.read32(regs.M_ICR)

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
            udp_esp=r(regs.reg("UDP_ESP")),
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
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None
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
        icr = self._read_icr()
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
    # statistics

    def stats(self) -> dict[str, int]:
        """The card's 64-bit statistics registers (LO read latches HI)."""
        return {name.lower(): read64(self.mmio, regs.stat_offset(name)) for name, _ in regs.STATISTICS}

    def features(self) -> list[str]:
        assert self.ident is not None
        return [name for name, m in Features.__members__.items() if self.ident.features & m]

    def offers(self, feature: Features) -> bool:
        """Does the card advertise ``feature`` in its FEATURES register (read at init)?"""
        return self.ident is not None and bool(self.ident.features & feature)

    def offers_udp_esp(self, kind: UdpEspEncapsulation) -> bool:
        """Does the card advertise UDP-ESP ``kind`` in its UDP_ESP register (read at init)?"""
        return self.ident is not None and bool(self.ident.udp_esp & kind)


def default_state_path(bdf: str) -> Path:
    return Path(os.environ.get("IPSEC_NIC_STATE_DIR", "/run/ipsec-nic")) / f"{bdf}.json"


def card_uses_vfio(bdf: str | None, irq: str) -> tuple[str, bool]:
    """(the card's address, whether open_card would drive it through vfio-pci) - without opening it."""
    from guest_tools import pci

    dev = pci.find_device(regs.VENDOR_ID, regs.DEVICE_ID, bdf)
    driver_link = dev.path / "driver"
    bound = os.path.basename(os.readlink(driver_link)) if driver_link.exists() else ""
    return dev.bdf, irq == "msix" or bound == "vfio-pci"


def _vfio_mirror(vdev) -> Mmio | None:
    """The mirror BAR through vfio when the card has one and vfio lets us mmap it (else None: polling
    the mirror by pread would cost a syscall per read, no better than ICR itself)."""
    from guest_tools.mmio import MappedMmio

    try:
        reg = vdev.region(regs.MIRROR_BAR)
        if reg.size < regs.MIRROR_BAR_SIZE or not reg.mmappable:
            return None
        return MappedMmio(vdev.fd, regs.MIRROR_BAR_SIZE, reg.offset, what="vfio mirror BAR")
    except OSError:
        return None


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
            mirror = _vfio_mirror(vdev)
            memory: DmaMemory = IovaMemory(vdev.map_dma)
            # Reset IVAR map: misc causes -> vector 0, queue n -> vector 1 + n (regs._default_ivar).
            nvec = min(2, vdev.msix_count())
            interrupts = MsixInterrupts(vdev.enable_msix(nvec)) if irq != "poll" and nvec else PollInterrupts()
        except OSError as exc:
            if vdev is not None:
                vdev.close()  # container, group and device fds (and any eventfds) go with it
            raise CardError(str(exc)) from None
        card = Card(mmio, memory, interrupts=interrupts, state=state, ring_size=ring_size, receive=receive,
                    mirror=mirror)
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
        try:
            mirror: Mmio | None = pci.Bar(dev, regs.MIRROR_BAR)
        except pci.PciError:
            mirror = None  # a card before register map 1.1: ICR is read in BAR0
        card = Card(mmio, PagemapMemory(), interrupts=PollInterrupts(), state=state, ring_size=ring_size,
                    receive=receive, mirror=mirror)
    card.bdf = dev.bdf  # type: ignore[attr-defined]
    try:
        card.init(reset=reset)
        if not reset:
            card.forget_stale()
    except BaseException:
        card.close()
        raise
    return card


# The driver's public names, wherever they are defined.
__all__ = ["AdminError", "Card", "CardError", "FirmwareError", "HostSa", "HostSaTable", "Identity", "RxPacket",
           "TxCompletion", "default_state_path", "open_card"]
