"""The card's data path: admin queue, TX and RX rings, firmware and wire, behind the register file.

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
  is not supported and completes with BAD_HANDLE. Offload failures are not sent.
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
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from device.nic import regs
from device.nic.adminq import AdminQueue
from device.nic.regs import Ctrl, ErrCode, RxWbFlags, TxFlags, TxStatus, TxWbFlags
from device.nic.rings import STAT, RingRegs, fetch_block
from device.nic.wire import Wire
from device.pci.config_space import Command
from device.vfio_user.device_api import DeviceContext, DmaError
from firmware_model.esp import Verdict
from firmware_model.firmware import Firmware
from firmware_model.firmware import TxStatus as FwTxStatus
from firmware_model.params import IpProto

if TYPE_CHECKING:
    from device.nic.card import NicCard

log = logging.getLogger(__name__)

TX_BUDGET = 256  # descriptors per TX pass before yielding to the loop
TX_MAX_FRAGS = 64  # descriptors one frame may span
RX_BACKLOG = 64  # frames waiting for an RX descriptor
RX_BACKLOG_BYTES = 256 * 1024
ETH_HLEN = 14
VLAN_HLEN = 4

# Statistics counter indices (card.Stat order).
TX_PACKETS, TX_BYTES = STAT["TX_PACKETS"], STAT["TX_BYTES"]
RX_PACKETS, RX_BYTES = STAT["RX_PACKETS"], STAT["RX_BYTES"]
TX_CRYPTO_OK, RX_CRYPTO_OK = STAT["TX_CRYPTO_OK"], STAT["RX_CRYPTO_OK"]
RX_AUTH_FAIL, RX_REPLAY_DROP = STAT["RX_AUTH_FAIL"], STAT["RX_REPLAY_DROP"]
RX_NO_BUFFER, TX_OFFLOAD_ERROR = STAT["RX_NO_BUFFER"], STAT["TX_OFFLOAD_ERROR"]
BAD_DESCRIPTOR, DMA_ERROR = STAT["BAD_DESCRIPTOR"], STAT["DMA_ERROR"]

_TXD = regs.TX_DESC
_TXD_SIZE = _TXD.size
_TXD_UNPACK = _TXD.struct.unpack_from
_TXD_FLAGS = _TXD.by_name["flags"]
_TXD_FLAGS_AT = _TXD_FLAGS.offset
_TXD_FLAGS_UNPACK = _TXD_FLAGS.field_struct.unpack_from
_TX_WB_AT = _TXD.offset_of("wb_status")
_TX_WB = struct.Struct("<HH")  # wb_status, wb_flags
_TX_KNOWN_FLAGS = int(TxFlags.EOP | TxFlags.IPSEC_CRYPTO | TxFlags.IPSEC_PACKET | TxFlags.REPORT_STATUS |
                      TxFlags.SEQ_HI)
_SEQ_HI = int(TxFlags.SEQ_HI)
_TX_IPSEC = int(TxFlags.IPSEC_CRYPTO | TxFlags.IPSEC_PACKET)
_EOP = int(TxFlags.EOP)
_RS = int(TxFlags.REPORT_STATUS)
_TX_DONE = int(TxWbFlags.DONE)
assert _TXD.offset_of("wb_flags") == _TX_WB_AT + 2

_RXD = regs.RX_DESC
_RXD_SIZE = _RXD.size
_RXD_UNPACK = _RXD.struct.unpack
_RX_WB_AT = _RXD.offset_of("length")
# length, wb_flags, crypto_status, reserved1, offload_handle, next_header, pad_length
_RX_WB = struct.Struct("<HHHHIBB")
assert _RX_WB.size == _RXD.offset_of("reserved2") - _RX_WB_AT
_DD_EOP = int(RxWbFlags.DD | RxWbFlags.EOP)
_DD_ERROR = int(RxWbFlags.DD | RxWbFlags.ERROR)
_RX_ERROR = int(RxWbFlags.ERROR)
_CRYPTO_DONE = int(RxWbFlags.CRYPTO_DONE)
_NEXT_CRYPTO_DONE = int(RxWbFlags.NEXT_CRYPTO_DONE)
_DECAPSULATED = int(RxWbFlags.DECAPSULATED)
_HEADER_INFO = int(RxWbFlags.HEADER_INFO)
_SA_DELETE_REQ = int(RxWbFlags.SA_DELETE_REQ)
_IPSEC_CRYPTO = int(TxFlags.IPSEC_CRYPTO)
_IPSEC_PACKET = int(TxFlags.IPSEC_PACKET)
_AUTH_FAILED = frozenset(int(s) for s in regs.CryptoStatus if s.name.endswith("_AUTH_FAILED"))

_PROMISC = int(Ctrl.PROMISC)
# The register file keeps every register in one array indexed by offset / 4 (card.NicCard.mem); the
# hot paths read it directly instead of going through enum-typed properties.
_CTRL_AT = regs.CTRL >> 2
_STATUS_AT = regs.STATUS >> 2
_ICR_AT = regs.ICR >> 2
_MTU_AT = regs.reg("MTU") >> 2
_ENABLED = int(regs.Status.ENABLED)
_BUS_MASTER = int(Command.BUS_MASTER)
_Q_BASE_LO, _Q_BASE_HI, _Q_LEN = regs.QREG_BASE_LO >> 2, regs.QREG_BASE_HI >> 2, regs.QREG_LEN >> 2
_Q_HEAD, _Q_TAIL, _Q_CTRL = regs.QREG_HEAD >> 2, regs.QREG_TAIL >> 2, regs.QREG_CTRL >> 2
_Q_ENABLE = int(regs.QueueCtrl.ENABLE)
_SA_DELETE_CAUSE = int(regs.Cause.SA_DELETE_REQ)
_U16BE = struct.Struct("!H")


@dataclass
class DatapathStats:
    """Diagnostics beyond the statistics registers (ipsec-nic serve logs them; tests read them)."""

    no_bus_master: int = 0  # passes skipped because COMMAND.BUS_MASTER was clear
    rx_not_enabled: int = 0  # frames that arrived while CTRL.ENABLE was clear
    rx_filtered: int = 0  # frames for another MAC (not PROMISC)
    rx_runts: int = 0  # frames shorter than an Ethernet header
    rx_backlogged: int = 0  # frames that had to wait for an RX descriptor
    rx_discarded: int = 0  # dummy packets discarded by packet offload
    tx_not_sent: int = 0  # frames the wire could not take (peer absent, link down)
    admin_commands: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Datapath:
    """Admin queue, TX/RX engines, RX backlog, firmware and wire of one card."""

    def __init__(self, card: NicCard, firmware: Firmware, wire: Wire) -> None:
        self.card = card
        self.firmware = firmware
        self.wire = wire
        nic = card.profile.nic
        self.mac = bytes(nic.mac)
        self.admin = AdminQueue(self, nic.admin_buffer_size)
        self.ctx: DeviceContext | None = None
        self.extra = DatapathStats()
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._scheduled: set[tuple[str, int]] = set()
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
        self.ctx = None
        self._scheduled.clear()

    def close(self) -> None:
        self.detached()
        self.wire.close()

    def reset(self) -> None:
        """Card reset (called by the register file after its registers are back to reset values)."""
        self._drop_backlog()
        self._scheduled.clear()  # queued passes find their rings disabled and do nothing
        self.firmware.reset()

    # ------------------------------------------------------------------ register-file hooks

    def doorbell(self, kind: Any, index: int) -> None:
        """TAIL written (from the MMIO handler): only schedule the work."""
        self._schedule(getattr(kind, "value", kind), index)

    def ring_enabled(self, kind: Any, index: int, enabled: bool) -> None:
        if enabled and getattr(kind, "value", kind) == "rx":
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
        key = (kind, index)
        ctx = self.ctx
        if ctx is None or key in self._scheduled:
            return
        self._scheduled.add(key)
        ctx.call_soon(lambda: self._run(key))

    def _run(self, key: tuple[str, int]) -> None:
        if key not in self._scheduled:
            return  # reset or detach since it was queued
        self._scheduled.discard(key)
        kind, index = key
        more = False
        if kind == "rx":
            self.drain_backlog()
        elif self._dma_allowed():
            dma = self.ctx.dma  # type: ignore[union-attr]
            if kind == "tx":
                ring = self.card.tx_rings[index]
                if ring.enabled:
                    more = self._tx_pass(ring, dma)
            elif kind == "admin":
                ring = self.card.admin_ring
                if ring.enabled:
                    before = self.admin.commands
                    more = self.admin.process(ring, dma)
                    self.extra.admin_commands += self.admin.commands - before
        if more:
            self._schedule(kind, index)

    def _dma_allowed(self) -> bool:
        card = self.card
        if self.ctx is None or not card.mem[_STATUS_AT] & _ENABLED:
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

    def _cause(self, bit: int) -> None:
        """Raise an interrupt cause unless it is still latched in ICR (then there is nothing new to say)."""
        if not self.card.mem[_ICR_AT] & bit:
            self.card.set_cause(bit)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    # ------------------------------------------------------------------ TX

    def _tx_pass(self, ring: RingRegs, dma: Any) -> bool:
        """One bounded pass over a TX ring. True when ready descriptors remain."""
        card = self.card
        mem = card.mem
        rb = ring.base >> 2
        base, size, head, tail = mem[rb + _Q_BASE_LO] | mem[rb + _Q_BASE_HI] << 32, mem[rb + _Q_LEN], \
            mem[rb + _Q_HEAD], mem[rb + _Q_TAIL]
        ready = (tail - head) % size
        if not ready:
            return False
        want = min(ready, TX_BUDGET)
        qid = ring.queue_id
        try:
            block, n = fetch_block(dma, base, size, head, want, _TXD_SIZE)
            if n < want:  # the work wraps past the end of the ring
                rest, m = fetch_block(dma, base, size, 0, want - n, _TXD_SIZE)
                block += rest
                n += m
        except DmaError:
            self.dma_fault(qid)
            return False
        stats = card.stats
        mtu_limit = mem[_MTU_AT] + ETH_HLEN + VLAN_HLEN
        frag_limit = min(TX_MAX_FRAGS, size - 1)
        report = False
        k = 0
        while k < n:
            # Find the frame's last descriptor.
            j = k
            while not _TXD_FLAGS_UNPACK(block, j * _TXD_SIZE + _TXD_FLAGS_AT)[0] & _EOP:
                j += 1
                if j - k >= frag_limit or j == n:
                    break
            if j == n or not _TXD_FLAGS_UNPACK(block, j * _TXD_SIZE + _TXD_FLAGS_AT)[0] & _EOP:
                if j - k < frag_limit:
                    break  # the driver has not posted the rest yet
                j = k + frag_limit - 1  # no EOP within the limit: refuse that many descriptors
                status = TxStatus.BAD_DESCRIPTOR
                rs = True
            else:
                status, rs = self._tx_frame(block, k, j, dma, mtu_limit, qid, stats)
            # Write back every descriptor of the frame.
            wb = _TX_WB.pack(status, _TX_DONE)
            try:
                for i in range(k, j + 1):
                    dma.write(base + ((head + i) % size) * _TXD_SIZE + _TX_WB_AT, wb)
            except DmaError:
                self.dma_fault(qid)
            if status in (TxStatus.BAD_DESCRIPTOR, TxStatus.BAD_LENGTH):
                stats[BAD_DESCRIPTOR] += j + 1 - k
            report |= rs
            k = j + 1
        if k:
            mem[rb + _Q_HEAD] = (head + k) % size
        if report:
            self._cause(regs.cause_tx(ring.index))
        return k > 0 and n < ready

    def _tx_frame(self, block: bytes, k: int, j: int, dma: Any, mtu_limit: int, qid: int,
                  stats: list[int]) -> tuple[int, bool]:
        """Validate, read, offload and send the frame in descriptors k..j. Returns (TxStatus, REPORT_STATUS)."""
        (addr, length, flags, handle, _esp_off, _pad, _nh, tunnel_handle, _wbs, _wbf,
         seq_hi) = _TXD_UNPACK(block, k * _TXD_SIZE)
        rs = bool(flags & _RS)
        status = TxStatus.OK
        # SEQ_HI only with IPSEC_CRYPTO (the host's ESN high half, RFC 4304); else seq_hi is reserved
        if (seq_hi and not flags & _SEQ_HI) or (flags & _SEQ_HI and flags & _TX_IPSEC != _IPSEC_CRYPTO) \
                or flags & ~_TX_KNOWN_FLAGS or flags & _TX_IPSEC == _TX_IPSEC:
            status = TxStatus.BAD_DESCRIPTOR
        elif not length:
            status = TxStatus.BAD_LENGTH
        total = length
        pieces: list[tuple[int, int]] | None = None
        if j > k:
            pieces = [(addr, length)]
            for i in range(k + 1, j + 1):
                a, ln, fl, _h, _e, _p, _n, _t, _s, _f, res = _TXD_UNPACK(block, i * _TXD_SIZE)
                rs |= bool(fl & _RS)
                if res or fl & ~_TX_KNOWN_FLAGS or fl & _SEQ_HI:
                    status = TxStatus.BAD_DESCRIPTOR
                elif not ln and status == TxStatus.OK:
                    status = TxStatus.BAD_LENGTH
                pieces.append((a, ln))
                total += ln
        if status != TxStatus.OK:
            return status, rs
        if total < ETH_HLEN or total > mtu_limit:
            return TxStatus.BAD_LENGTH, rs
        try:
            if pieces is None:
                frame = dma.read(addr, length)
            else:
                frame = b"".join([dma.read(a, ln) for a, ln in pieces])
        except DmaError:
            self.dma_fault(qid)
            return TxStatus.DMA_ERROR, rs
        ipsec = flags & _TX_IPSEC
        if ipsec:
            if tunnel_handle or (ipsec == _IPSEC_CRYPTO and not handle):
                stats[TX_OFFLOAD_ERROR] += 1
                return TxStatus.BAD_HANDLE, rs
            result = self.firmware.transmit(frame, handle, ipsec == _IPSEC_PACKET,
                                            seq_hi if flags & _SEQ_HI else None)
            fw_status = result.status
            if result.sa_delete_req:
                self._cause(_SA_DELETE_CAUSE)
            if fw_status != FwTxStatus.OK or result.frame is None:
                stats[TX_OFFLOAD_ERROR] += 1
                return (TxStatus.BAD_HANDLE if fw_status == FwTxStatus.BAD_HANDLE else TxStatus.OFFLOAD_FAILED), rs
            frame = result.frame
            stats[TX_CRYPTO_OK] += 1
        if self.wire.send(frame):
            stats[TX_PACKETS] += 1
            stats[TX_BYTES] += len(frame)
        else:
            self.extra.tx_not_sent += 1
        return TxStatus.OK, rs

    # ------------------------------------------------------------------ RX

    def frame_received(self, frame: bytes) -> None:
        """A frame from the wire (wire callback, on the server loop)."""
        mem = self.card.mem
        if not mem[_STATUS_AT] & _ENABLED:
            self.extra.rx_not_enabled += 1
            return
        if len(frame) < ETH_HLEN:
            self.extra.rx_runts += 1
            return
        if not (frame[0] & 1 or frame.startswith(self.mac) or mem[_CTRL_AT] & _PROMISC):
            self.extra.rx_filtered += 1
            return
        if self._backlog:
            self._backlog_frame(frame)  # keep arrival order
            self.drain_backlog()
        elif not self._rx_deliver(frame):
            self._backlog_frame(frame)

    def _backlog_frame(self, frame: bytes) -> None:
        if len(self._backlog) >= RX_BACKLOG or self._backlog_bytes + len(frame) > RX_BACKLOG_BYTES:
            self.card.stats[RX_NO_BUFFER] += 1
            return
        self._backlog.append(frame)
        self._backlog_bytes += len(frame)
        self.extra.rx_backlogged += 1

    def _drop_backlog(self) -> None:
        self._backlog.clear()
        self._backlog_bytes = 0

    def drain_backlog(self) -> None:
        """Move waiting frames into RX descriptors while there are some (RX doorbell, ring enable)."""
        backlog = self._backlog
        while backlog:
            frame = backlog[0]
            if not self._rx_deliver(frame):
                return
            backlog.popleft()
            self._backlog_bytes -= len(frame)

    def _rx_ring(self) -> RingRegs | None:
        mem = self.card.mem
        for ring in self.card.rx_rings:
            if mem[(ring.base >> 2) + _Q_CTRL] & _Q_ENABLE:
                return ring
        return None

    def _rx_deliver(self, frame: bytes) -> bool:
        """Put one frame in the next RX descriptor. False when there is none (frame not consumed).

        A usable descriptor (well-formed, buffer reachable) is secured *before* the firmware sees the
        frame: a frame the card then cannot store must not have moved the SA's replay window, sequence
        state or lifetime counters."""
        ring = self._rx_ring()
        if ring is None or not self._dma_allowed():
            return False
        card = self.card
        mem = card.mem
        rb = ring.base >> 2
        head, tail = mem[rb + _Q_HEAD], mem[rb + _Q_TAIL]
        if head == tail:
            return False
        base, size = mem[rb + _Q_BASE_LO] | mem[rb + _Q_BASE_HI] << 32, mem[rb + _Q_LEN]
        stats = card.stats
        dma = self.ctx.dma  # type: ignore[union-attr]
        qid = ring.queue_id
        completed = False  # some descriptor was written back: the driver has something to look at
        slot = None
        try:
            while head != tail:
                addr = base + head * _RXD_SIZE
                try:
                    (buf_addr, buf_len, reserved0, _l, _f, _c, reserved1, _h, _n, _p, reserved2,
                     reserved3) = _RXD_UNPACK(dma.read(addr, _RXD_SIZE))
                except DmaError:
                    self.dma_fault(qid)
                    break  # the ring itself is unreachable: HEAD stays, the frame is lost (counted)
                head = (head + 1) % size
                bad = bool(reserved0 or reserved1 or reserved2 or reserved3 or not buf_len)
                if not bad:
                    try:
                        dma.view(buf_addr, buf_len).release()  # the whole buffer must be reachable
                    except DmaError:
                        self.dma_fault(qid)
                        bad = True
                if bad:
                    if reserved0 or reserved1 or reserved2 or reserved3 or not buf_len:
                        stats[BAD_DESCRIPTOR] += 1
                    dma.write(addr + _RX_WB_AT, _RX_WB.pack(0, _DD_ERROR, 0, 0, 0, 0, 0))
                    completed = True
                    continue  # try the frame on the next descriptor
                slot = (addr, buf_addr, buf_len)
                break
        except DmaError:  # a descriptor is readable but not writable
            self.dma_fault(qid)
        if slot is None:
            # Only unusable descriptors (or an unreachable ring): they are consumed, and the frame waits
            # in the backlog for the driver's next descriptors instead of being lost.
            mem[rb + _Q_HEAD] = head
            if completed:
                self._cause(regs.cause_rx(ring.index))
            return False

        addr, buf_addr, buf_len = slot
        result = self.firmware.receive(frame)
        wb_flags = _DD_EOP
        next_header = pad_length = 0
        out = result.frame
        crypto_status = result.crypto_status
        drop = result.discard
        if drop:
            self.extra.rx_discarded += 1
        elif result.crypto_done:
            wb_flags |= _CRYPTO_DONE
            if result.next_crypto_done:
                wb_flags |= _NEXT_CRYPTO_DONE
            entry = self._sa_entry(result.handle)
            packet_offload = entry is not None and entry.packet_offload
            if packet_offload and result.verdict == Verdict.REPLAY:
                stats[RX_REPLAY_DROP] += 1
                drop = True
            elif crypto_status == 0:
                stats[RX_CRYPTO_OK] += 1
                if packet_offload:
                    wb_flags |= _DECAPSULATED
                else:
                    trailer = _esp_trailer(out, _esp_icv_len(entry))
                    if trailer is not None:
                        next_header, pad_length = trailer
                        wb_flags |= _HEADER_INFO
            elif crypto_status in _AUTH_FAILED:
                stats[RX_AUTH_FAIL] += 1
        if result.sa_delete_req:
            wb_flags |= _SA_DELETE_REQ
            self._cause(_SA_DELETE_CAUSE)
        if drop:
            # Nothing to indicate: the secured descriptor stays with the driver for the next frame.
            head = (head - 1) % size
            mem[rb + _Q_HEAD] = head
            if completed:
                self._cause(regs.cause_rx(ring.index))
            return True
        n = len(out)
        if n > buf_len:
            wb_flags |= _RX_ERROR
            data: bytes | memoryview = memoryview(out)[:buf_len]
        else:
            data = out
        try:
            dma.write(buf_addr, data)
            dma.write(addr + _RX_WB_AT, _RX_WB.pack(min(n, 0xFFFF), wb_flags, crypto_status, 0,
                                                    result.handle, next_header, pad_length))
            completed = True
            stats[RX_PACKETS] += 1
            stats[RX_BYTES] += n
        except DmaError:  # unmapped between the check and the write: the client changed its map
            self.dma_fault(qid)
        mem[rb + _Q_HEAD] = head
        if completed:
            self._cause(regs.cause_rx(ring.index))
        return True

    def _sa_entry(self, handle: int) -> Any:
        sadb = getattr(self.firmware, "sadb", None)
        return sadb.get(handle) if sadb is not None and handle else None


def _esp_icv_len(entry: Any) -> int:
    if entry is None:
        return -1
    for p in entry.params:
        if p.proto == IpProto.ESP:
            return p.icv_len
    return -1


def _esp_trailer(frame: bytes, icv_len: int) -> tuple[int, int] | None:
    """(next header, pad length) of the ESP trailer at the end of the frame's IP packet (RFC 4303 §2:
    ... padding, pad length, next header, ICV). The IP length fields decide where the packet ends, so
    Ethernet padding after a short packet is not mistaken for the trailer."""
    if icv_len < 0:
        return None
    l3 = ETH_HLEN
    etype = _U16BE.unpack_from(frame, 12)[0]
    if etype == 0x8100:
        l3 += VLAN_HLEN
        etype = _U16BE.unpack_from(frame, 16)[0] if len(frame) >= 18 else 0
    if etype == 0x0800 and len(frame) >= l3 + 20:
        end = l3 + _U16BE.unpack_from(frame, l3 + 2)[0]
    elif etype == 0x86DD and len(frame) >= l3 + 40:
        end = l3 + 40 + _U16BE.unpack_from(frame, l3 + 4)[0]
    else:
        return None
    at = end - icv_len - 2
    if at < l3 or end > len(frame):
        return None
    return frame[at + 1], frame[at]

