"""The card's data path: admin queue, TX and RX rings, firmware and wire, behind the register file.
The TX and RX engines are device/nic/tx.py and device/nic/rx.py; this module runs them.

:class:`Datapath` plugs into :class:`device.nic.card.NicCard` through its hooks (doorbell, ring enable,
card enable, reset) and does all work from ``ctx.call_soon``, never inside an MMIO handler (QEMU
waits on those with its big lock held; docs/architecture.md).

Decisions (datasheet material):

- **Preconditions for any DMA**: a client is attached, CTRL.ENABLE took effect (STATUS.ENABLED) and
  the PCI COMMAND register has Bus Master set. Without bus mastering nothing is read or written;
  doorbells are remembered by the ring registers and processed once the driver sets it and rings
  again; received frames wait in the RX backlog (and are counted as RX_NO_BUFFER when it overflows).
- **TX write-back**: every descriptor the card consumes gets ``wb_status`` and ``wb_flags = DONE``
  written back, whatever REPORT_STATUS says (the driver can always reclaim by polling DONE);
  REPORT_STATUS decides only whether the TXn cause is raised. A frame spans descriptors up to the one
  with EOP (at most TX_MAX_FRAGS); its offload fields (IPSEC_*, offload_handle, tunnel_handle) are
  taken from its first descriptor. A frame may be at most MTU + 18 bytes (Ethernet header and one
  802.1Q tag) and at least 14 (an Ethernet header).
- **TX offload**: IPSEC_CRYPTO with handle 0 is BAD_HANDLE; ``tunnel_handle`` (transport over tunnel)
  goes to the firmware, which refuses it unless the profile offers it. Offload failures are not sent.
- **RX queue choice**: there is no RSS; every received frame goes to the lowest-numbered enabled RX
  queue.
- **RX filter**: own MAC, broadcast and multicast (group bit), or anything with CTRL.PROMISC.
- **RX backlog**: frames that find no free RX descriptor wait in a small FIFO (RX_BACKLOG frames,
  RX_BACKLOG_BYTES bytes) retried on every RX doorbell; a frame that does not fit is dropped and
  counted in RX_NO_BUFFER. Firmware processing (decryption, replay window) happens only when the
  frame gets a descriptor, so a dropped frame never moves an SA's state.
- **RX write-back**: the frame is written first, then length/flags/status in one write, so DD is seen
  last. A frame longer than the buffer is cut to buf_len with ERROR set (length = original size).
  A malformed RX descriptor (reserved bits, buf_len 0) is completed with DD|ERROR and length 0 and the
  frame moves on to the next descriptor. Packet-offload frames refused by the anti-replay window are
  dropped and counted in RX_REPLAY_DROP; dummy packets (next header 59, RFC 4303 §2.6) are discarded.
- **DMA faults**: a buffer the card cannot reach completes its descriptor with DMA_ERROR (TX) or
  DD|ERROR (RX); an unreachable descriptor stops that ring pass (HEAD stays). Either way DMA_ERROR is
  counted, ERR_CODE = DMA_FAULT with the ring's queue id, the ERROR cause is raised, and the card
  keeps serving (never FATAL: the guest may have remapped memory).
- **Reset** (CTRL.RESET, FLR, DEVICE_RESET): the register file resets (rings off, counters 0), the
  backlog is dropped and Firmware.reset() deletes every SA. The wire stays as it is (link is physical).
- **Guest RAM not shared** (QEMU without a memfd backend maps RAM without an fd): every pass is a
  resumable DMA pass (device/nic/dma_pass.py); its accesses to such RAM go out as vfio-user DMA_READ/
  DMA_WRITE messages and the pass continues when QEMU answers. One pass per ring is in flight; a doorbell
  meanwhile runs the ring again afterwards; frames from the wire wait in the RX backlog. A reset or a
  detach abandons the passes in flight: nothing more is read or written for them, but DMA_WRITE messages
  already sent are still carried out by QEMU (it executes our requests in order, also after its reset).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from device.contract.regs import ErrCode
from device.nic.adminq import AdminQueue
from device.nic.dma_pass import DmaPass, Pass
from device.nic.rings import (
    DMA_ERROR,
    ENABLED,
    ICR_AT,
    STATUS_AT,
    DatapathStats,
)
from device.nic.rx import RxPath
from device.nic.tx import TxPath
from device.nic.wire import Wire
from device.pci.config_space import Command
from device.vfio_user.device_api import DeviceContext
from firmware_model.firmware import Firmware

if TYPE_CHECKING:
    from device.nic.card import NicCard

log = logging.getLogger(__name__)

_BUS_MASTER = int(Command.BUS_MASTER)
_RX_KEY = ("rx", 0)
_STARTING = object()  # a pass in its first, synchronous step


class Datapath(TxPath, RxPath):
    """Admin queue, TX/RX engines, RX backlog, firmware and wire of one card."""

    def __init__(self, card: NicCard, firmware: Firmware, wire: Wire) -> None:
        self.card = card
        self.firmware = firmware
        self.wire = wire
        nic = card.profile.nic
        self.mac = bytes(nic.mac)
        self.admin = AdminQueue(firmware.execute, self, nic.admin_buffer_size)
        self.ctx: DeviceContext | None = None
        self.extra = DatapathStats()
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._scheduled: set[tuple[str, int]] = set()
        self._passes: dict[tuple[str, int], Any] = {}  # passes running or waiting for a DMA reply
        self._rerun: set[tuple[str, int]] = set()  # rings rung while their pass waited
        self._warned: set[str] = set()
        card.doorbell_hook = self.doorbell
        card.ring_enable_hook = self.ring_enabled
        card.enable_hook = self.card_enabled
        card.reset_hooks.append(self.reset)

    # ------------------------------------------------------------------ lifecycle

    def attached(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self.wire.attach(ctx, self.frame_received, self.card.set_link)
        self.card.set_link(self.wire.link_up)
        if self.card.enabled:
            self._kick_all()

    def detached(self) -> None:
        self.wire.detach()
        self._abandon_passes()
        self.ctx = None
        self._scheduled.clear()

    def close(self) -> None:
        self.detached()
        self.wire.close()

    def reset(self) -> None:
        """Card reset (called by the register file after its registers are back to reset values)."""
        self._drop_backlog()
        self._scheduled.clear()  # queued passes find their rings disabled and do nothing
        self._abandon_passes()
        self.admin.abandon()
        self.firmware.reset()

    # ------------------------------------------------------------------ register-file hooks

    def doorbell(self, kind: Any, index: int) -> None:
        """TAIL written (from the MMIO handler): only schedule the work."""
        self._schedule(getattr(kind, "value", kind), index)

    def ring_enabled(self, kind: Any, index: int, enabled: bool) -> None:
        kind = getattr(kind, "value", kind)
        if not enabled:
            # A pass waiting for message DMA on this ring is abandoned, as by a reset: re-enabling sets
            # HEAD to 0, and the pass must not write its old HEAD or descriptors over the new ring.
            key = _RX_KEY if kind == "rx" else (kind, index)
            p = self._passes.get(key)
            if isinstance(p, DmaPass):
                del self._passes[key]
                self._rerun.discard(key)
                self._cancel(p)
        elif kind == "rx":
            self._schedule("rx", index)

    def card_enabled(self, enabled: bool) -> None:
        if enabled:
            self._kick_all()
        else:
            self.extra.rx_not_enabled += len(self._backlog)
            self._drop_backlog()

    def _kick_all(self) -> None:
        card = self.card
        if card.admin_ring.enabled:
            self._schedule("admin", 0)
        for ring in card.tx_rings:
            if ring.enabled:
                self._schedule("tx", ring.index)
        if self._backlog:
            self._schedule("rx", 0)

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, kind: str, index: int) -> None:
        key = _RX_KEY if kind == "rx" else (kind, index)  # one RX pass serves every RX queue
        ctx = self.ctx
        if ctx is None or key in self._scheduled:
            return
        self._scheduled.add(key)
        ctx.call_soon(lambda: self._run(key))

    def _run(self, key: tuple[str, int]) -> None:
        if key not in self._scheduled:
            return  # reset or detach since it was queued
        self._scheduled.discard(key)
        if key in self._passes:  # its pass waits for the client: run the ring again when it ends
            self._rerun.add(key)
            return
        kind, index = key
        gen: Pass | None = None
        if kind == "rx":
            gen = self.drain_backlog()
        elif self._dma_allowed():
            if kind == "tx":
                ring = self.card.tx_rings[index]
                if ring.enabled:
                    gen = self._tx_pass(ring)
            elif kind == "admin":
                ring = self.card.admin_ring
                if ring.enabled:
                    gen = self._admin_pass(ring)
        if gen is not None:
            self._start_pass(key, gen)

    def _admin_pass(self, ring: Any) -> Pass:
        before = self.admin.commands
        more = yield from self.admin.process(ring)
        self.extra.admin_commands += self.admin.commands - before
        return more

    def _start_pass(self, key: tuple[str, int], gen: Pass) -> None:
        """Run a pass: to its end now when guest RAM is shared, else up to its first DMA message."""
        # The hot accesses go to shared RAM directly, so most passes end in this first step: no runner.
        self._passes[key] = _STARTING  # busy (a frame arriving meanwhile waits in the backlog)
        try:
            first = gen.send(None)
        except StopIteration as stop:
            self._passes.pop(key, None)
            self._pass_done(key, None, stop.value)
            return
        except Exception:  # an engine bug must not stop the server loop (the pass is abandoned)
            log.exception("ring pass failed")
            self._passes.pop(key, None)
            return
        p = DmaPass(self.ctx, gen, lambda more: self._pass_done(key, p, more))  # type: ignore[arg-type]
        self._passes[key] = p
        p.start(first)

    def _pass_done(self, key: tuple[str, int], p: DmaPass | None, more: Any) -> None:
        if p is not None:
            self.extra.dma_messages += p.messages
            if self._passes.get(key) is p:
                del self._passes[key]
        if more or key in self._rerun:
            self._rerun.discard(key)
            self._schedule(*key)

    def _abandon_passes(self) -> None:
        passes = list(self._passes.values())
        self._passes.clear()
        self._rerun.clear()
        for p in passes:
            if p is not _STARTING:
                self._cancel(p)

    def _cancel(self, p: DmaPass) -> None:
        self.extra.dma_messages += p.messages
        self.extra.passes_abandoned += 1  # an RX frame in such a pass is lost with it
        p.cancel()

    def _rx_busy(self) -> bool:
        return _RX_KEY in self._passes

    def _start_rx(self, frame: bytes | None) -> None:
        """A frame came from the wire: deliver it (None: the backlog) unless an RX pass is in flight."""
        if self.ctx is None:
            if frame is not None:
                self._backlog_frame(frame)
            return
        if _RX_KEY in self._passes:
            return  # the pass in flight drains the backlog when it gets there
        self._start_pass(_RX_KEY, self.rx_first(frame) if frame is not None else self.drain_backlog())

    def _dma_allowed(self) -> bool:
        card = self.card
        if self.ctx is None or not card.mem[STATUS_AT] & ENABLED:
            return False
        fn = card.function
        if fn is not None and not fn.command & _BUS_MASTER:
            self.extra.no_bus_master += 1
            self._warn_once("bm", "card has work but PCI COMMAND.BUS_MASTER is clear: no DMA until it is set")
            return False
        return True

    # ------------------------------------------------------------------ shared helpers

    def count(self, stat: int, amount: int = 1) -> None:
        self.card.stats[stat] += amount

    def dma_fault(self, queue_id: int) -> None:
        self.card.stats[DMA_ERROR] += 1
        self.card.report_error(ErrCode.DMA_FAULT, queue_id)

    def set_cause(self, bits: int) -> None:
        self.card.set_cause(bits)

    def report_error(self, code: ErrCode, info: int = 0) -> None:
        self.card.report_error(code, info)

    def _cause(self, bit: int) -> None:
        """Raise an interrupt cause unless it is still latched in ICR (then there is nothing new to say)."""
        if not self.card.mem[ICR_AT] & bit:
            self.card.set_cause(bit)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)
