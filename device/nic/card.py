"""The NIC's BAR0 register file (identity, capabilities, control, interrupts, ring registers, stats).

Structure follows QEMU's igb (hw/net/igb_core.c): register values live in one array indexed by
offset/4, reset is a copy of a reset image built from the register table in device/contract/regs.py, and
registers with behaviour are named in sparse read/write dispatch dicts; everything else shares a
generic store. Unknown or read-only writes are counted and logged once, never fatal.

Extension points for the data path (rings, admin queue, wire): assign
``doorbell_hook(kind, index)``, ``ring_enable_hook(kind, index, enabled)``, ``enable_hook(enabled)``
and append to ``reset_hooks``; raise interrupt causes with :meth:`NicCard.set_cause`; count with
:meth:`NicCard.add_stat`; report errors with :meth:`NicCard.report_error`; move a ring's HEAD with
:meth:`Ring.set_head`.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from device.contract import regs
from device.contract.regs import Access, Cause, Ctrl, ErrCode, IntMode, QueueCtrl, QueueId, Status
from device.pci.function import PciFunction
from device.profile import Profile
from device.vfio_user.device_api import DeviceContext, MmapArea
from firmware_model.capabilities import Capabilities

log = logging.getLogger(__name__)

# The firmware model exposes no version of its own yet; this is what FW_VERSION reports.
FIRMWARE_VERSION = regs.encode_version(1, 0, 0)

_DWORDS = regs.BAR0_SIZE // 4
_CTRL_WRITABLE = Ctrl.ENABLE | Ctrl.PROMISC | Ctrl.INT_MODE

class ClientHooks(Protocol):
    """What the register file tells the data path about the vfio-user client (device/nic/datapath.py)."""

    def attached(self, ctx: DeviceContext) -> None: ...

    def detached(self) -> None: ...


Stat = enum.IntEnum("Stat", [name for name, _ in regs.STATISTICS], start=0)  # type: ignore[misc]


class QueueKind(enum.Enum):
    ADMIN = "admin"
    TX = "tx"
    RX = "rx"


_QUEUE_ID = {QueueKind.ADMIN: QueueId.ADMIN, QueueKind.TX: QueueId.TX, QueueKind.RX: QueueId.RX}


def firmware_capabilities(profile: Profile) -> Capabilities:
    """The firmware's capabilities for this card (the one place the card asks the firmware model)."""
    return Capabilities.from_profile(profile.firmware)


def feature_bits(caps: Capabilities, msix_vectors: int) -> int:
    f = regs.Features.CRYPTO_OFFLOAD | regs.Features.INTX
    for flag, on in (
        (regs.Features.PACKET_OFFLOAD, caps.packet_offload),
        (regs.Features.ESP, caps.esp),
        (regs.Features.AH, caps.ah),
        (regs.Features.AH_ESP_COMBINED, caps.ah_esp_combined),
        (regs.Features.TRANSPORT, caps.transport),
        (regs.Features.TUNNEL, caps.tunnel),
        (regs.Features.TRANSPORT_TUNNEL_COMBINED, caps.transport_tunnel_combined),
        (regs.Features.IPV6, caps.ipv6),
        (regs.Features.IPV4_OPTIONS, caps.ipv4_options),
        (regs.Features.IPV6_EXT_HEADERS, caps.ipv6),  # same rule as Capabilities.to_wire()
        (regs.Features.ESN, caps.esn),
        (regs.Features.UDP_ESP, bool(caps.udp_esp)),
        (regs.Features.ANTI_REPLAY, caps.packet_offload and caps.max_replay_window > 0),
        (regs.Features.LIFETIMES, caps.packet_offload),
        (regs.Features.LSO, caps.lso),
        (regs.Features.MSIX, msix_vectors > 0),
    ):
        if on:
            f |= flag
    return int(f)


def profile_register_values(profile: Profile, caps: Capabilities) -> dict[str, int]:
    """Reset values of the registers whose table entry says ``reset_from`` (profile/firmware)."""
    nic = profile.nic
    return {
        "HW_VERSION": nic.hw_version,
        "FW_VERSION": FIRMWARE_VERSION,
        "FEATURES": feature_bits(caps, nic.msix_vectors),
        "SA_CAPACITY": caps.sa_capacity,
        "ENC_ALGOS": caps.encryption_mask,
        "AUTH_ALGOS": caps.authentication_mask,
        "UDP_ESP": int(caps.udp_esp),
        "MAX_REPLAY_WINDOW": caps.max_replay_window if caps.packet_offload else 0,
        "NUM_TXQ": nic.tx_queues,
        "NUM_RXQ": nic.rx_queues,
        "MAX_RING_SIZE": nic.ring_size,
        "NUM_MSIX": nic.msix_vectors,
        "MAC_LO": int.from_bytes(nic.mac[0:4], "little"),
        "MAC_HI": int.from_bytes(nic.mac[4:6], "little"),
        "MAX_MTU": nic.max_mtu,
        "MTU": nic.mtu,
        "AQ_MAX_LEN": nic.admin_queue_size,
        "AQ_MAX_BUF": nic.admin_buffer_size,
    }


@dataclass
class Ring:
    """One ring's registers (admin queue, a TX or an RX queue) inside the card's register array."""

    card: NicCard
    kind: QueueKind
    index: int
    base: int  # BAR0 offset of the ring's register block
    max_len: int

    def _get(self, rel: int) -> int:
        return self.card.mem[(self.base + rel) >> 2]

    @property
    def base_address(self) -> int:
        return self._get(regs.QREG_BASE_LO) | self._get(regs.QREG_BASE_HI) << 32

    @property
    def length(self) -> int:
        return self._get(regs.QREG_LEN)

    @property
    def head(self) -> int:
        return self._get(regs.QREG_HEAD)

    @property
    def tail(self) -> int:
        return self._get(regs.QREG_TAIL)

    @property
    def enabled(self) -> bool:
        return bool(self._get(regs.QREG_CTRL) & QueueCtrl.ENABLE)

    @property
    def queue_id(self) -> int:
        return _QUEUE_ID[self.kind] | self.index

    def set_head(self, value: int) -> None:
        self.card.store((self.base + regs.QREG_HEAD) >> 2, value % max(self.length, 1))

    def pending(self) -> int:
        """Descriptors made ready by the driver and not yet processed."""
        n = self.length
        return (self.tail - self.head) % n if n else 0

    def config_error(self) -> str:
        """Why the ring's base/length cannot be used ('' if they can)."""
        n = self.length
        if n < regs.MIN_RING_SIZE or n > self.max_len or n & (n - 1):
            return f"length {n} is not a power of two in {regs.MIN_RING_SIZE}..{self.max_len}"
        if self.base_address % regs.RING_ALIGN:
            return f"base {self.base_address:#x} is not {regs.RING_ALIGN}-byte aligned"
        if self.tail >= n:
            return f"tail {self.tail} is not below length {n}"
        return ""


MIRROR_MEMFD_NAME = "ipsec-nic-mirror"  # shows in a mapping process's /proc/PID/maps (the bench checks)


class MirrorBar:
    """BAR4, the mirror BAR: reads come from the card's shared mirror memory; writes are ignored."""

    def __init__(self, card: NicCard) -> None:
        self.card = card
        self.ignored_writes = 0

    def read(self, offset: int, size: int) -> int:
        with self.card.shared.cast("B") as view:  # released at once: close() may drop the mapping
            return int.from_bytes(view[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.ignored_writes += 1  # read-only (through the mapping a write lands in memory until the next update)

    def reset(self) -> None:
        pass  # the mirrors follow BAR0, whose reset rewrites them

    def shared_mapping(self) -> tuple[int, tuple[MmapArea, ...]] | None:
        """What PciFunction.region_info offers for mmap (None: profile nic.mirror_mmap is off)."""
        return self.card.mirror_mapping() if self.card.profile.nic.mirror_mmap else None


class NicCard:
    """BAR0 of the card. Implements the PCI function's BarHandler interface."""

    def __init__(self, profile: Profile, caps: Capabilities) -> None:
        self.profile = profile
        self.caps = caps
        nic = profile.nic
        self.reset_image = array("I", bytes(4 * _DWORDS))
        self.implemented = bytearray(_DWORDS)
        self.read_only = bytearray(_DWORDS)
        values = profile_register_values(profile, caps)
        queues = {regs.Block.TXQ: nic.tx_queues, regs.Block.RXQ: nic.rx_queues}
        for r in regs.REGISTERS:
            for i in range(min(r.count, queues.get(r.block, r.count))):
                at = r.element_offset(i) >> 2
                self.implemented[at] = 1
                self.read_only[at] = r.access is Access.RO
                self.reset_image[at] = values.get(r.name, r.element_reset(i)) if r.reset_from else r.element_reset(i)
        self.mem = array("I", self.reset_image)
        # The mirror BAR (regs.MIRROR_BAR) as the client sees it: private memory until a client asks for
        # the region's mmap (mirror_mapping), then a memfd (no fd for a card nobody maps).
        self.shared = memoryview(bytearray(regs.MIRROR_BAR_SIZE)).cast("I")
        self._shared_file = None
        self._shared_map: mmap.mmap | None = None
        # BAR0 dword of a source register -> mirror BAR dword of its mirror.
        self.mirror_of: dict[int, int] = {
            src >> 2: m >> 2 for src, m in regs.mirror_sources(nic.tx_queues, nic.rx_queues).items()}
        self.mirror_bar = MirrorBar(self)
        self.stats = [0] * len(Stat)
        self._latched_hi: dict[int, int] = {}
        self.function: PciFunction | None = None
        self.ctx: DeviceContext | None = None
        self.link_up = False
        self.ignored_writes = 0
        self.bad_accesses = 0
        self._warned: set[str] = set()
        self._last_fire: dict[int, float] = {}
        self._deferred: set[int] = set()

        self.admin_ring = Ring(self, QueueKind.ADMIN, 0, regs.ADMINQ_BASE, nic.admin_queue_size)
        self.tx_rings = [Ring(self, QueueKind.TX, q, regs.txq_reg(q, 0), nic.ring_size)
                         for q in range(nic.tx_queues)]
        self.rx_rings = [Ring(self, QueueKind.RX, q, regs.rxq_reg(q, 0), nic.ring_size)
                         for q in range(nic.rx_queues)]

        # Extension points (the data path plugs in here).
        self.doorbell_hook: Callable[[QueueKind, int], None] | None = None
        self.ring_enable_hook: Callable[[QueueKind, int, bool], None] | None = None
        self.enable_hook: Callable[[bool], None] | None = None
        self.reset_hooks: list[Callable[[], None]] = []
        self.datapath: ClientHooks | None = None  # set by build_card; attached/detached with the client

        # Sparse dispatch tables (igb_macreg_readops / writeops): offset -> handler.
        self.read_ops: dict[int, Callable[[int], int]] = {}
        self.write_ops: dict[int, Callable[[int, int], None]] = {
            regs.reg("CTRL"): self._write_ctrl,
            regs.reg("MTU"): self._write_mtu,
            regs.reg("ICR"): self._write_icr,
            regs.reg("ICS"): self._write_ics,
            regs.reg("IMS"): self._write_ims,
            regs.reg("IMC"): self._write_imc,
            regs.reg("ITR"): self._write_itr,
        }
        for name in ("ICS", "IMC"):
            self.read_ops[regs.reg(name)] = self._read_zero  # write-only
        for i in range(len(Stat)):
            lo = regs.STATS_BASE + 8 * i
            self.read_ops[lo] = self._read_stat_lo
            self.read_ops[lo + 4] = self._read_stat_hi
        for ring in self.rings():
            self.write_ops[ring.base + regs.QREG_BASE_LO] = self._ring_config_writer(ring)
            self.write_ops[ring.base + regs.QREG_BASE_HI] = self._ring_config_writer(ring)
            self.write_ops[ring.base + regs.QREG_LEN] = self._ring_config_writer(ring)
            self.write_ops[ring.base + regs.QREG_TAIL] = self._tail_writer(ring)
            self.write_ops[ring.base + regs.QREG_CTRL] = self._ring_ctrl_writer(ring)
        self._sync_mirrors()

    # ----- wiring -----

    def bind(self, function: PciFunction) -> None:
        self.function = function

    def attached(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        if self.datapath is not None:
            self.datapath.attached(ctx)

    def detached(self) -> None:
        if self.datapath is not None:
            self.datapath.detached()
        self.ctx = None
        self.close()  # the client that mapped the mirror BAR is gone; the next one gets a fresh file

    def mirror_mapping(self) -> tuple[int, tuple[MmapArea, ...]]:
        """The fd of the mirror BAR and its areas a vfio-user client may mmap (all of it)."""
        if self._shared_file is None:
            fd = os.memfd_create(MIRROR_MEMFD_NAME, os.MFD_CLOEXEC)
            self._shared_file = os.fdopen(fd, "r+b", buffering=0)  # owns the fd
            os.ftruncate(fd, regs.MIRROR_BAR_SIZE)
            self._shared_map = mmap.mmap(fd, regs.MIRROR_BAR_SIZE)
            shared = memoryview(self._shared_map).cast("I")
            shared[:] = self.shared
            self.shared = shared
        return self._shared_file.fileno(), (MmapArea(0, regs.MIRROR_BAR_SIZE),)

    def close(self) -> None:
        """Release the shared mapping and its fd (the card itself keeps working on private memory)."""
        if self._shared_file is not None:
            private = memoryview(bytearray(regs.MIRROR_BAR_SIZE)).cast("I")
            private[:] = self.shared
            self.shared.release()
            self.shared = private
            assert self._shared_map is not None
            self._shared_map.close()
            self._shared_file.close()
            self._shared_file = self._shared_map = None

    def store(self, at: int, value: int) -> None:
        """Set BAR0 register dword ``at`` (offset >> 2) and, when it has one, its mirror in BAR4."""
        self.mem[at] = value
        m = self.mirror_of.get(at)
        if m is not None:
            self.shared[m] = value

    def _sync_mirrors(self) -> None:
        for src, m in self.mirror_of.items():
            self.shared[m] = self.mem[src]

    def rings(self) -> list[Ring]:
        return [self.admin_ring, *self.tx_rings, *self.rx_rings]

    # ----- BarHandler -----

    def read(self, offset: int, size: int) -> int:
        if size == 4 and offset % 4 == 0:
            return self._read32(offset)
        if size == 8 and offset % 8 == 0:
            low = self._read32(offset)  # LO first, so a 64-bit counter read latches its HI
            return low | self._read32(offset + 4) << 32
        # Narrow or unaligned read: the bytes of the dwords it touches (each read once).
        first = offset & ~3
        last = (offset + size - 1) & ~3
        raw = b"".join(self._read32(at).to_bytes(4, "little") for at in range(first, last + 4, 4))
        rel = offset - first
        return int.from_bytes(raw[rel : rel + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 4 and offset % 4 == 0:
            self._write32(offset, value)
        elif size == 8 and offset % 8 == 0:
            self._write32(offset, value & 0xFFFF_FFFF)
            self._write32(offset + 4, value >> 32)
        else:
            # Registers take whole-dword writes only (datasheet: "Register access").
            self.bad_accesses += 1
            self._warn("narrow", f"BAR0: ignored {size}-byte write at {offset:#x} (registers take 32-bit writes)")

    def reset(self) -> None:
        """Card reset (CTRL.RESET, FLR, DEVICE_RESET): every register and counter to its reset value."""
        self.mem[:] = self.reset_image
        self._sync_mirrors()
        self._set_status(Status.LINK_UP, self.link_up)  # the link is physical: it survives a reset
        self.stats = [0] * len(Stat)
        self._latched_hi.clear()
        self._last_fire.clear()
        self._deferred.clear()
        if self.function is not None:
            self.function.deassert_intx()
        for hook in self.reset_hooks:
            hook()

    # ----- dword access -----

    def _read32(self, offset: int) -> int:
        op = self.read_ops.get(offset)
        if op is not None:
            return op(offset)
        at = offset >> 2
        if at < _DWORDS and self.implemented[at]:
            return self.mem[at]
        self._warn(f"r{offset:#x}", f"BAR0: read of unimplemented register {offset:#x} returns 0")
        return 0

    def _write32(self, offset: int, value: int) -> None:
        op = self.write_ops.get(offset)
        if op is not None:
            op(offset, value)
            return
        at = offset >> 2
        if at < _DWORDS and self.implemented[at] and not self.read_only[at]:
            self.mem[at] = value  # generic store (SCRATCH, IVAR, ...)
            return
        self.ignored_writes += 1
        self._warn(f"w{offset:#x}", f"BAR0: write {value:#x} to read-only/unimplemented {offset:#x} ignored")

    def _read_zero(self, offset: int) -> int:
        return 0

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def get(self, name: str) -> int:
        return self.mem[regs.reg(name) >> 2]

    def _put(self, name: str, value: int) -> None:
        self.store(regs.reg(name) >> 2, value & 0xFFFF_FFFF)

    # ----- control and status -----

    def _set_status(self, bits: int, on: bool) -> None:
        value = self.get("STATUS")
        self._put("STATUS", value | bits if on else value & ~bits)

    def _write_ctrl(self, offset: int, value: int) -> None:
        if value & Ctrl.RESET:
            self.reset()  # self-clearing: the rest of this write is not applied
            return
        old = self.get("CTRL")
        new = value & _CTRL_WRITABLE
        self._put("CTRL", new)
        fatal = bool(self.get("STATUS") & Status.FATAL)
        enabled = bool(new & Ctrl.ENABLE) and not fatal
        was_enabled = bool(self.get("STATUS") & Status.ENABLED)
        self._set_status(Status.ENABLED, enabled)
        if enabled != was_enabled and self.enable_hook is not None:
            self.enable_hook(enabled)
        if (old ^ new) & Ctrl.INT_MODE:
            self._update_interrupts(self.get("ICR") & self.get("IMS"))

    @property
    def enabled(self) -> bool:
        return bool(self.get("STATUS") & Status.ENABLED)

    @property
    def int_mode(self) -> int:
        return (self.get("CTRL") & Ctrl.INT_MODE) >> regs.CTRL_INT_MODE_SHIFT

    def _write_mtu(self, offset: int, value: int) -> None:
        if not regs.MIN_MTU <= value <= self.get("MAX_MTU"):
            self.report_error(ErrCode.BAD_MTU, value)
            return
        self._put("MTU", value)

    def set_link(self, up: bool) -> None:
        """The wire backend connected or went away."""
        changed = up != self.link_up
        self.link_up = up
        self._set_status(Status.LINK_UP, up)
        if changed:
            self.set_cause(Cause.LINK)

    def report_error(self, code: ErrCode, info: int = 0, fatal: bool = False) -> None:
        self._put("ERR_CODE", code)
        self._put("ERR_INFO", info)
        if fatal:
            self._set_status(Status.FATAL, True)
            if self.enabled:
                self._set_status(Status.ENABLED, False)
                if self.enable_hook is not None:
                    self.enable_hook(False)
        self.set_cause(Cause.ERROR)

    # ----- statistics -----

    def add_stat(self, stat: Stat, amount: int = 1) -> None:
        self.stats[stat] = (self.stats[stat] + amount) & 0xFFFF_FFFF_FFFF_FFFF

    def _read_stat_lo(self, offset: int) -> int:
        i = (offset - regs.STATS_BASE) >> 3
        value = self.stats[i]
        self._latched_hi[i] = value >> 32
        return value & 0xFFFF_FFFF

    def _read_stat_hi(self, offset: int) -> int:
        i = (offset - regs.STATS_BASE) >> 3
        return self._latched_hi.get(i, self.stats[i] >> 32)

    # ----- interrupts -----

    def set_cause(self, bits: int) -> None:
        """Latch interrupt causes in ICR and signal the ones that are unmasked."""
        bits &= regs.CAUSES_DEFINED
        icr = self.get("ICR")
        fresh = bits & ~icr
        self._put("ICR", icr | bits)
        self._update_interrupts(fresh & self.get("IMS"))

    def _write_icr(self, offset: int, value: int) -> None:
        self._put("ICR", self.get("ICR") & ~value)
        self._update_interrupts(0)

    def _write_ics(self, offset: int, value: int) -> None:
        self.set_cause(value)

    def _write_ims(self, offset: int, value: int) -> None:
        ims = self.get("IMS")
        newly = value & regs.CAUSES_DEFINED & ~ims
        self._put("IMS", ims | newly)
        self._update_interrupts(newly & self.get("ICR"))  # unmasking a pending cause signals it

    def _write_imc(self, offset: int, value: int) -> None:
        self._put("IMS", self.get("IMS") & ~value)
        self._update_interrupts(0)

    def _write_itr(self, offset: int, value: int) -> None:
        self._put("ITR", value & 0xFFFF)

    def vector_for(self, cause_bit: int) -> int | None:
        """MSI-X vector IVAR routes ``cause_bit`` to (None when its valid bit is clear)."""
        entry = (self.mem[(regs.reg("IVAR") >> 2) + cause_bit // 4] >> (8 * (cause_bit % 4))) & 0xFF
        return entry & regs.IVAR_VECTOR_MASK if entry & regs.IVAR_VALID else None

    def _update_interrupts(self, fresh: int) -> None:
        """Drive the interrupt outputs from ICR & IMS. ``fresh``: unmasked causes that just appeared."""
        fn = self.function
        if fn is None:
            return
        mode = self.int_mode
        pending = self.get("ICR") & self.get("IMS")
        if mode not in (IntMode.SINGLE, IntMode.VECTORS):
            fn.deassert_intx()  # POLL (and the reserved value 3): no interrupts
            return
        if fn.msix_enabled():
            if not fresh:
                return
            if mode == IntMode.SINGLE:
                self._fire(0)
                return
            vectors = {self.vector_for(bit) for bit in range(32) if fresh >> bit & 1}
            for vector in sorted(v for v in vectors if v is not None):
                self._fire(vector)
        elif pending:
            fn.raise_interrupt(0)  # INTx is a level: asserted while any unmasked cause is set
        else:
            fn.deassert_intx()

    def _fire(self, vector: int) -> None:
        """Signal an MSI-X vector, at most once per ITR microseconds (later ones are deferred)."""
        assert self.function is not None
        gap = self.get("ITR") * 1e-6
        now = time.monotonic()
        last = self._last_fire.get(vector)
        if gap and last is not None and now - last < gap and self.ctx is not None:
            if vector not in self._deferred:
                self._deferred.add(vector)
                self.ctx.call_later(gap - (now - last), lambda: self._fire_deferred(vector))
            return
        self._last_fire[vector] = now
        self.function.raise_interrupt(vector)

    def _fire_deferred(self, vector: int) -> None:
        self._deferred.discard(vector)
        pending = self.get("ICR") & self.get("IMS")
        if self.int_mode == IntMode.SINGLE:
            still = pending != 0
        else:
            still = any(pending >> bit & 1 and self.vector_for(bit) == vector for bit in range(32))
        if still and self.function is not None and self.function.msix_enabled():
            self._last_fire[vector] = time.monotonic()
            self.function.raise_interrupt(vector)

    # ----- rings -----

    def _ring_config_writer(self, ring: Ring) -> Callable[[int, int], None]:
        def write(offset: int, value: int) -> None:
            if ring.enabled:
                # Base and length are fixed while the ring runs (checked when it is enabled).
                self.ignored_writes += 1
                self._warn(f"ring{offset:#x}", f"BAR0: {ring.kind.value} ring {ring.index} is enabled; "
                           f"write to {offset:#x} ignored")
                return
            self.mem[offset >> 2] = value

        return write

    def _tail_writer(self, ring: Ring) -> Callable[[int, int], None]:
        def write(offset: int, value: int) -> None:
            if not ring.enabled:
                self.mem[offset >> 2] = value  # checked against LEN when the ring is enabled
                return
            if value >= ring.length:
                self.report_error(ErrCode.BAD_RING_CONFIG, ring.queue_id)
                return
            self.mem[offset >> 2] = value
            self.on_doorbell(ring.kind, ring.index)

        return write

    def _ring_ctrl_writer(self, ring: Ring) -> Callable[[int, int], None]:
        def write(offset: int, value: int) -> None:
            want = bool(value & QueueCtrl.ENABLE)
            if want == ring.enabled:
                return
            if want:
                problem = ring.config_error()
                if problem:
                    self._warn(f"cfg{offset:#x}", f"BAR0: cannot enable {ring.kind.value} ring {ring.index}: "
                               f"{problem}")
                    self.report_error(ErrCode.BAD_RING_CONFIG, ring.queue_id)
                    return
                self.store((ring.base + regs.QREG_HEAD) >> 2, 0)
            self.mem[offset >> 2] = int(QueueCtrl.ENABLE) if want else 0
            if self.ring_enable_hook is not None:
                self.ring_enable_hook(ring.kind, ring.index, want)
            if want and ring.pending():
                self.on_doorbell(ring.kind, ring.index)

        return write

    def on_doorbell(self, kind: QueueKind, index: int) -> None:
        """The driver moved a ring's TAIL (the data path processes the ring from here)."""
        if self.doorbell_hook is not None:
            self.doorbell_hook(kind, index)
