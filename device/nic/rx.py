"""The card's RX engine: a frame from the wire -> RX filter and backlog -> Firmware.receive -> an RX
descriptor and its write-back (the decisions are in device/nic/datapath.py's docstring and the datasheet)."""

from __future__ import annotations

import struct
from collections import deque
from typing import TYPE_CHECKING

from device.contract import regs
from device.contract.net import ETH_HLEN
from device.contract.regs import Ctrl, RxWbFlags
from device.nic.dma_pass import REACHABLE, READ, WRITE, Pass
from device.nic.rings import (
    BAD_DESCRIPTOR,
    CTRL_AT,
    ENABLED,
    Q_BASE_HI,
    Q_BASE_LO,
    Q_CTRL,
    Q_ENABLE,
    Q_HEAD,
    Q_LEN,
    Q_TAIL,
    RX_AUTH_FAIL,
    RX_BYTES,
    RX_CRYPTO_OK,
    RX_NO_BUFFER,
    RX_PACKETS,
    RX_REPLAY_DROP,
    SA_DELETE_CAUSE,
    STAT,
    STATUS_AT,
    DatapathStats,
    RingRegs,
)
from device.vfio_user.device_api import DeviceContext, DmaError
from firmware_model.firmware import Firmware

if TYPE_CHECKING:
    from device.nic.card import NicCard

RX_BACKLOG = 64  # frames waiting for an RX descriptor
RX_BACKLOG_BYTES = 256 * 1024

_RXD = regs.RX_DESC
_RXD_SIZE = _RXD.size
_RXD_UNPACK = _RXD.struct.unpack
_RX_WB_AT = _RXD.offset_of("length")
# length, wb_flags, crypto_status, reserved1, offload_handle, next_header, pad_length, reserved2,
# next_offload_handle
_RX_WB = struct.Struct("<HHHHIBBHI")
assert _RX_WB.size == _RXD_SIZE - _RX_WB_AT
_DD_EOP = int(RxWbFlags.DD | RxWbFlags.EOP)
_DD_ERROR = int(RxWbFlags.DD | RxWbFlags.ERROR)
_RX_ERROR = int(RxWbFlags.ERROR)
_CRYPTO_DONE = int(RxWbFlags.CRYPTO_DONE)
_NEXT_CRYPTO_DONE = int(RxWbFlags.NEXT_CRYPTO_DONE)
_DECAPSULATED = int(RxWbFlags.DECAPSULATED)
_HEADER_INFO = int(RxWbFlags.HEADER_INFO)
_SA_DELETE_REQ = int(RxWbFlags.SA_DELETE_REQ)
_L4_CSUM_OK = int(RxWbFlags.L4_CSUM_OK)
_POLICY_MISMATCH = int(RxWbFlags.POLICY_MISMATCH)
RX_POLICY_DROP = STAT["RX_POLICY_DROP"]
_AUTH_FAILED = frozenset(int(s) for s in regs.CryptoStatus if s.name.endswith("_AUTH_FAILED"))
_PROMISC = int(Ctrl.PROMISC)


class RxPath:
    """The RX part of Datapath (it shares the card, firmware, DMA context and counters)."""

    card: NicCard
    firmware: Firmware
    ctx: DeviceContext | None
    extra: DatapathStats
    mac: bytes
    _backlog: deque[bytes]
    _backlog_bytes: int

    def dma_fault(self, queue_id: int) -> None:
        raise NotImplementedError  # Datapath.dma_fault

    def _cause(self, bit: int) -> None:
        raise NotImplementedError  # Datapath._cause

    def _dma_allowed(self) -> bool:
        raise NotImplementedError  # Datapath._dma_allowed

    def _rx_busy(self) -> bool:
        raise NotImplementedError  # Datapath._rx_busy

    def _start_rx(self, frame: bytes | None) -> None:
        raise NotImplementedError  # Datapath._start_rx

    def frame_received(self, frame: bytes) -> None:
        """A frame from the wire (wire callback, on the server loop)."""
        mem = self.card.mem
        if not mem[STATUS_AT] & ENABLED:
            self.extra.rx_not_enabled += 1
            return
        if len(frame) < ETH_HLEN:
            self.extra.rx_runts += 1
            return
        if not (frame[0] & 1 or frame.startswith(self.mac) or mem[CTRL_AT] & _PROMISC):
            self.extra.rx_filtered += 1
            return
        if self._backlog or self._rx_busy():
            self._backlog_frame(frame)  # keep arrival order
            self._start_rx(None)
        else:
            self._start_rx(frame)

    def rx_first(self, frame: bytes) -> Pass:
        """The RX pass for a frame straight from the wire (nothing was waiting)."""
        if not (yield from self._rx_deliver(frame)):
            self._backlog_frame(frame, front=True)  # frames that came meanwhile queue behind it
            return False
        if self._backlog:  # frames that arrived while this one waited for message DMA
            yield from self.drain_backlog()
        return False

    def _backlog_frame(self, frame: bytes, front: bool = False) -> None:
        if len(self._backlog) >= RX_BACKLOG or self._backlog_bytes + len(frame) > RX_BACKLOG_BYTES:
            self.card.stats[RX_NO_BUFFER] += 1
            return
        if front:
            self._backlog.appendleft(frame)
        else:
            self._backlog.append(frame)
        self._backlog_bytes += len(frame)
        self.extra.rx_backlogged += 1

    def _drop_backlog(self) -> None:
        self._backlog.clear()
        self._backlog_bytes = 0

    def drain_backlog(self) -> Pass:
        """The RX pass that moves waiting frames into RX descriptors while there are some (RX doorbell,
        ring enable)."""
        backlog = self._backlog
        while backlog:
            frame = backlog[0]
            if not (yield from self._rx_deliver(frame)):
                return False
            if backlog and backlog[0] is frame:  # (a reset meanwhile emptied it)
                backlog.popleft()
                self._backlog_bytes -= len(frame)
        return False

    def _rx_ring(self) -> RingRegs | None:
        mem = self.card.mem
        for ring in self.card.rx_rings:
            if mem[(ring.base >> 2) + Q_CTRL] & Q_ENABLE:
                return ring
        return None

    def _rx_deliver(self, frame: bytes) -> Pass:
        """Put one frame in the next RX descriptor (a DMA pass step). False when there is none (frame not
        consumed).

        A usable descriptor (well-formed, buffer reachable) is secured *before* the firmware sees the
        frame: a frame the card then cannot store must not have moved the SA's replay window, sequence
        state or lifetime counters."""
        ring = self._rx_ring()
        if ring is None or not self._dma_allowed():
            return False
        card = self.card
        mem = card.mem
        rb = ring.base >> 2
        head, tail = mem[rb + Q_HEAD], mem[rb + Q_TAIL]
        if head == tail:
            return False
        base, size = mem[rb + Q_BASE_LO] | mem[rb + Q_BASE_HI] << 32, mem[rb + Q_LEN]
        stats = card.stats
        qid = ring.queue_id
        dma = self.ctx.dma  # type: ignore[union-attr]
        # Hot accesses go straight to shared guest RAM; DmaError (not shared, or a fault) hands the
        # access to the pass runner, which sends it as a message or throws the fault back here.
        completed = False  # some descriptor was written back: the driver has something to look at
        slot = None
        try:
            while head != tail:
                addr = base + head * _RXD_SIZE
                try:
                    try:
                        raw = dma.read(addr, _RXD_SIZE)
                    except DmaError:
                        raw = yield READ, addr, _RXD_SIZE
                    (buf_addr, buf_len, reserved0, _l, _f, _c, reserved1, _h, _n, _p, reserved2,
                     _nh) = _RXD_UNPACK(raw)
                except DmaError:
                    self.dma_fault(qid)
                    break  # the ring itself is unreachable: HEAD stays, the frame is lost (counted)
                head = (head + 1) % size
                # next_offload_handle is a write-back field: a reused descriptor may still hold an old one
                bad = bool(reserved0 or reserved1 or reserved2 or not buf_len)
                if not bad:
                    try:  # the whole buffer must be reachable
                        try:
                            dma.view(buf_addr, buf_len).release()
                        except DmaError:
                            yield REACHABLE, buf_addr, buf_len
                    except DmaError:
                        self.dma_fault(qid)
                        bad = True
                if bad:
                    if reserved0 or reserved1 or reserved2 or not buf_len:
                        stats[BAD_DESCRIPTOR] += 1
                    yield (WRITE, addr + _RX_WB_AT, _RX_WB.pack(0, _DD_ERROR, 0, 0, 0, 0, 0, 0, 0))
                    completed = True
                    continue  # try the frame on the next descriptor
                slot = (addr, buf_addr, buf_len)
                break
        except DmaError:  # a descriptor is readable but not writable
            self.dma_fault(qid)
        if slot is None:
            # Only unusable descriptors (or an unreachable ring): they are consumed, and the frame waits
            # in the backlog for the driver's next descriptors instead of being lost.
            card.store(rb + Q_HEAD, head)
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
        elif result.policy_drop:
            stats[RX_POLICY_DROP] += 1  # packet offload: outside the SA's selector (RFC 4301 §5.2)
            drop = True
        elif result.policy_mismatch:
            wb_flags |= _POLICY_MISMATCH  # indicated unprocessed: no CRYPTO_DONE, handle 0
        elif result.crypto_done:
            wb_flags |= _CRYPTO_DONE
            if result.next_crypto_done:
                wb_flags |= _NEXT_CRYPTO_DONE
            if result.replay_drop:
                stats[RX_REPLAY_DROP] += 1
                drop = True
            elif crypto_status == 0:
                stats[RX_CRYPTO_OK] += 1
                if result.l4_csum_ok:
                    wb_flags |= _L4_CSUM_OK
                if result.decapsulated:
                    wb_flags |= _DECAPSULATED
                elif result.next_header >= 0:
                    next_header, pad_length = result.next_header, result.pad_length
                    wb_flags |= _HEADER_INFO
            elif crypto_status in _AUTH_FAILED:
                stats[RX_AUTH_FAIL] += 1
        if result.sa_delete_req:
            wb_flags |= _SA_DELETE_REQ
            self._cause(SA_DELETE_CAUSE)
        if drop:
            # Nothing to indicate: the secured descriptor stays with the driver for the next frame.
            head = (head - 1) % size
            card.store(rb + Q_HEAD, head)
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
            try:
                dma.write(buf_addr, data)
            except DmaError:
                yield WRITE, buf_addr, data  # acknowledged before the write-back below: DD is seen last
            wb = _RX_WB.pack(min(n, 0xFFFF), wb_flags, crypto_status, 0, result.handle, next_header, pad_length, 0,
                             result.next_handle)
            try:
                dma.write(addr + _RX_WB_AT, wb)
            except DmaError:
                yield WRITE, addr + _RX_WB_AT, wb
            completed = True
            stats[RX_PACKETS] += 1
            stats[RX_BYTES] += n
        except DmaError:  # unmapped between the check and the write: the client changed its map
            self.dma_fault(qid)
        card.store(rb + Q_HEAD, head)
        if completed:
            self._cause(regs.cause_rx(ring.index))
        return True
