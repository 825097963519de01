"""The card's TX engine: descriptors from a TX ring -> Firmware.transmit -> wire, with write-back
(the decisions are in device/nic/datapath.py's docstring and the datasheet)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from device.contract import regs
from device.contract.net import ETH_HLEN
from device.contract.regs import TxFlags, TxStatus, TxWbFlags
from device.nic.dma_pass import READ, WRITE, Pass
from device.nic.rings import (
    BAD_DESCRIPTOR,
    MTU_AT,
    Q_BASE_HI,
    Q_BASE_LO,
    Q_HEAD,
    Q_LEN,
    Q_TAIL,
    SA_DELETE_CAUSE,
    TX_BYTES,
    TX_CRYPTO_OK,
    TX_OFFLOAD_ERROR,
    TX_PACKETS,
    DatapathStats,
    RingRegs,
    fetch_block,
)
from device.vfio_user.device_api import DeviceContext, DmaError
from firmware_model.firmware import Firmware, TxOutcome

if TYPE_CHECKING:
    from device.nic.card import NicCard
    from device.nic.wire import Wire

TX_BUDGET = 256  # descriptors per TX pass before yielding to the loop
TX_MAX_FRAGS = 64  # descriptors one frame may span
VLAN_HLEN = 4

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
_IPSEC_CRYPTO = int(TxFlags.IPSEC_CRYPTO)
_IPSEC_PACKET = int(TxFlags.IPSEC_PACKET)
# Hot-path constants: module globals instead of enum attribute lookups, and the write-back of every status
# packed once (indexed by the status value).
_OK = TxStatus.OK
_BAD_DESCRIPTOR = TxStatus.BAD_DESCRIPTOR
_BAD_LENGTH = TxStatus.BAD_LENGTH
_FW_OK = TxOutcome.OK
_WB = [_TX_WB.pack(s, _TX_DONE) for s in range(max(TxStatus) + 1)]


class TxPath:
    """The TX part of Datapath (it shares the card, firmware, wire and counters)."""

    card: NicCard
    firmware: Firmware
    wire: Wire
    extra: DatapathStats
    ctx: DeviceContext | None

    def dma_fault(self, queue_id: int) -> None:
        raise NotImplementedError  # Datapath.dma_fault

    def _cause(self, bit: int) -> None:
        raise NotImplementedError  # Datapath._cause

    def _tx_pass(self, ring: RingRegs) -> Pass:
        """One bounded pass over a TX ring (a DMA pass, device/nic/dma_pass.py). True when ready descriptors remain."""
        card = self.card
        mem = card.mem
        rb = ring.base >> 2
        base, size, head, tail = mem[rb + Q_BASE_LO] | mem[rb + Q_BASE_HI] << 32, mem[rb + Q_LEN], \
            mem[rb + Q_HEAD], mem[rb + Q_TAIL]
        ready = (tail - head) % size
        if not ready:
            return False
        want = min(ready, TX_BUDGET)
        qid = ring.queue_id
        dma = self.ctx.dma  # type: ignore[union-attr]
        write = dma.write
        try:
            # Straight from shared guest RAM (then the pass needs no runner at all); else through the
            # pass runner, which sends a message or throws.
            n = min(want, size - head)
            try:
                block = dma.read(base + head * _TXD_SIZE, n * _TXD_SIZE)
            except DmaError:
                block, n = yield from fetch_block(base, size, head, want, _TXD_SIZE)
            if n < want:  # the work wraps past the end of the ring
                rest, m = yield from fetch_block(base, size, 0, want - n, _TXD_SIZE)
                block += rest
                n += m
        except DmaError:
            self.dma_fault(qid)
            return False
        stats = card.stats
        mtu_limit = mem[MTU_AT] + ETH_HLEN + VLAN_HLEN
        frag_limit = min(TX_MAX_FRAGS, size - 1)
        report = False
        k = 0
        while k < n:
            if _TXD_FLAGS_UNPACK(block, k * _TXD_SIZE + _TXD_FLAGS_AT)[0] & _EOP:
                # A frame in one descriptor (the common case): a plain call while its data is in shared
                # RAM; None sends it the generator way (message DMA, or the DMA error thrown there).
                j = k
                done = self._tx_single(block, k, mtu_limit, stats)
                if done is None:
                    status, rs = yield from self._tx_frame(block, k, j, mtu_limit, qid, stats)
                else:
                    status, rs = done
            else:
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
                    status = _BAD_DESCRIPTOR
                    rs = True
                else:
                    status, rs = yield from self._tx_frame(block, k, j, mtu_limit, qid, stats)
            # Write back every descriptor of the frame (after the frame went out: data before DONE).
            wb = _WB[status]
            try:
                for i in range(k, j + 1):
                    at = base + ((head + i) % size) * _TXD_SIZE + _TX_WB_AT
                    try:  # straight to shared guest RAM; else the pass runner sends a message (or throws)
                        write(at, wb)
                    except DmaError:
                        yield WRITE, at, wb
            except DmaError:
                self.dma_fault(qid)
            if status in (_BAD_DESCRIPTOR, _BAD_LENGTH):
                stats[BAD_DESCRIPTOR] += j + 1 - k
            report |= rs
            k = j + 1
        if k:
            card.store(rb + Q_HEAD, (head + k) % size)
        if report:
            self._cause(regs.cause_tx(ring.index))
        return k > 0 and n < ready

    def _tx_frame(self, block: bytes, k: int, j: int, mtu_limit: int, qid: int,
                  stats: list[int]) -> Pass:
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
                try:  # straight from shared guest RAM; else the pass runner sends a message (or throws)
                    frame = self.ctx.dma.read(addr, length)  # type: ignore[union-attr]
                except DmaError:
                    frame = yield READ, addr, length
            else:
                parts = []
                for a, ln in pieces:
                    parts.append((yield READ, a, ln))
                frame = b"".join(parts)
        except DmaError:
            self.dma_fault(qid)
            return TxStatus.DMA_ERROR, rs
        return self._tx_out(frame, flags, handle, seq_hi, tunnel_handle, stats), rs

    def _tx_single(self, block: bytes, k: int, mtu_limit: int, stats: list[int]) -> tuple[int, bool] | None:
        """_tx_frame for a frame in one descriptor whose data is in shared guest RAM, without a generator:
        (TxStatus, REPORT_STATUS), or None when the data needs message DMA or is unreachable (then
        _tx_frame does it all again, from the validation on, and reports the error)."""
        (addr, length, flags, handle, _esp_off, _pad, _nh, tunnel_handle, _wbs, _wbf,
         seq_hi) = _TXD_UNPACK(block, k * _TXD_SIZE)
        rs = bool(flags & _RS)
        # the same checks, in the same order, as _tx_frame
        if (seq_hi and not flags & _SEQ_HI) or (flags & _SEQ_HI and flags & _TX_IPSEC != _IPSEC_CRYPTO) \
                or flags & ~_TX_KNOWN_FLAGS or flags & _TX_IPSEC == _TX_IPSEC:
            return _BAD_DESCRIPTOR, rs
        if length < ETH_HLEN or length > mtu_limit:  # zero included: BAD_LENGTH either way
            return _BAD_LENGTH, rs
        try:
            frame = self.ctx.dma.read(addr, length)  # type: ignore[union-attr]
        except DmaError:
            return None
        return self._tx_out(frame, flags, handle, seq_hi, tunnel_handle, stats), rs

    def _tx_out(self, frame: bytes, flags: int, handle: int, seq_hi: int, tunnel_handle: int,
                stats: list[int]) -> int:
        """Offload (per the descriptor's flags) and send a frame read from guest RAM: its TxStatus."""
        ipsec = flags & _TX_IPSEC
        if ipsec:
            if ipsec == _IPSEC_CRYPTO and not handle:
                stats[TX_OFFLOAD_ERROR] += 1
                return TxStatus.BAD_HANDLE
            # tunnel_handle: transport over tunnel (the firmware refuses it unless the profile offers it)
            result = self.firmware.transmit(frame, handle, ipsec == _IPSEC_PACKET,
                                            seq_hi if flags & _SEQ_HI else None, tunnel_handle)
            fw_status = result.status
            if result.sa_delete_req:
                self._cause(SA_DELETE_CAUSE)
            if fw_status != _FW_OK or result.frame is None:
                stats[TX_OFFLOAD_ERROR] += 1
                return TxStatus.BAD_HANDLE if fw_status == TxOutcome.BAD_HANDLE else TxStatus.OFFLOAD_FAILED
            frame = result.frame
            stats[TX_CRYPTO_OK] += 1
        if self.wire.send(frame):
            stats[TX_PACKETS] += 1
            stats[TX_BYTES] += len(frame)
        else:
            self.extra.tx_not_sent += 1
        return _OK
