"""The admin queue engine: AdminDesc ring -> Firmware.execute -> write-back.

The driver fills descriptors HEAD..TAIL-1 and writes AQ_TAIL; the card (from ctx.call_soon, never
inside the MMIO handler) processes each one:

1. validate: reserved fields zero, no unknown flag bits (DONE/ERROR left over from an earlier use
   are ignored), req_len and resp_len <= AQ_MAX_BUF;
2. read the request buffer by DMA (key material only ever travels this way and is never logged);
3. ``Firmware.execute(opcode, request)`` -> (NDIS status, response);
4. write the response (cut to resp_len with status RESPONSE_TRUNCATED when it does not fit; resp_len
   then says how long the whole response was);
5. write back status, fw_status and resp_len, then flags = DONE (| ERROR when status != OK) last, so a
   driver that sees DONE sees the rest;
6. advance HEAD; raise the ADMINQ cause if the descriptor asked for INTERRUPT.

A descriptor whose own memory is unreachable stops the ring where it is (HEAD stays; DMA_ERROR counted,
ERR_CODE = DMA_FAULT with the admin queue id); the next doorbell retries.

The server has one loop and QEMU waits (5 s at most) for every MMIO reply, so one pass is bounded in
time (AQ_PASS_SECONDS), not only in descriptors: a V2_ADD_SA list may hold 4,096 SAs (~0.15 s of
cipher setup, far more on a loaded host). Such a list is executed LIST_CHUNK entries per pass, as
V2_ADD_SA commands of its own, and the per-entry results are joined into the one response (the
command already succeeds per entry, so the split does not change what the driver sees). The list is
decoded whole first (a malformed list adds nothing): that one step is not split (~60 ms for 4,096 entries).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable

from device.contract import ndis, regs
from device.contract.regs import AdminFlags, AdminStatus
from device.contract.status import NdisStatus
from device.nic.dma_pass import READ, WRITE, Pass
from device.nic.rings import STAT, QueueEvents, RingRegs
from device.vfio_user.device_api import DmaError

log = logging.getLogger(__name__)

AQ_BUDGET = 32  # descriptors per pass: admin commands can be slow (SA adds build cipher contexts)
# Time one pass may take before it yields to the loop (QEMU's MMIO replies wait meanwhile). At least
# one step always runs, so the ring still advances on a slow host.
AQ_PASS_SECONDS = 0.002
# V2_ADD_SA entries executed per step (~35 us each: about 1 ms per step).
LIST_CHUNK = 32
_DESC = regs.ADMIN_DESC
_DESC_SIZE = _DESC.size
_UNPACK = _DESC.struct.unpack
_INPUT_FLAGS = int(AdminFlags.INTERRUPT | AdminFlags.DONE | AdminFlags.ERROR)
_STATUS_AT = _DESC.offset_of("status")
_STATUS_FW = struct.Struct("<HHI")  # status, reserved0, fw_status
_RESP_LEN_AT = _DESC.offset_of("resp_len")
_U32 = struct.Struct("<I")
_FLAGS_AT = _DESC.offset_of("flags")
_U16 = struct.Struct("<H")
BAD_DESCRIPTOR = STAT["BAD_DESCRIPTOR"]
assert _STATUS_FW.size == _DESC.offset_of("req_len") - _STATUS_AT


class _ListInProgress:
    """A long V2_ADD_SA list being executed over several passes."""

    __slots__ = ("addr", "desc", "entries", "done", "results", "status")

    def __init__(self, addr: int, desc: tuple, entries: list) -> None:
        self.addr = addr
        self.desc = desc
        self.entries = entries
        self.done = 0
        self.results: list = []
        self.status: int | None = None  # first failing chunk's status while no chunk succeeded


class AdminQueue:
    """Processes the admin ring of one card: ``execute`` is the firmware's command entry point
    (opcode, request) -> (NDIS status, response); ``events`` counts, faults and raises causes."""

    def __init__(self, execute: Callable[[int, bytes], tuple[int, bytes]], events: QueueEvents,
                 max_buf: int) -> None:
        self.execute = execute
        self.events = events
        self.max_buf = max_buf
        self.commands = 0  # descriptors completed (any status)
        self._list: _ListInProgress | None = None

    def abandon(self) -> None:
        """Card reset: a list half executed is forgotten with the SAs it added."""
        self._list = None

    def process(self, ring: RingRegs) -> Pass:
        """One bounded pass (a DMA pass, device/nic/dma_pass.py). Returns True when descriptors remain
        (the caller schedules another pass)."""
        eng = self.events
        base, size, head, tail = ring.base_address, ring.length, ring.head, ring.tail
        qid = ring.queue_id
        interrupt = False
        budget = AQ_BUDGET
        deadline = time.monotonic() + AQ_PASS_SECONDS
        while head != tail and budget:
            budget -= 1
            addr = base + head * _DESC_SIZE
            try:
                desc = _UNPACK((yield READ, addr, _DESC_SIZE))
            except DmaError:
                eng.dma_fault(qid)
                break
            step = yield from self._list_step(addr, desc, qid, deadline)
            if step is None:  # the list goes on in the next pass
                budget = 0
                break
            status, fw_status, resp_len = step
            try:
                yield (WRITE, addr + _RESP_LEN_AT, _U32.pack(resp_len))
                yield (WRITE, addr + _STATUS_AT, _STATUS_FW.pack(status, 0, fw_status))
                flags = (desc[1] & int(AdminFlags.INTERRUPT)) | int(AdminFlags.DONE)
                if status != AdminStatus.OK:
                    flags |= int(AdminFlags.ERROR)
                yield (WRITE, addr + _FLAGS_AT, _U16.pack(flags))  # DONE last, after the rest is acknowledged
            except DmaError:  # readable but not writable (read-only mapping)
                eng.dma_fault(qid)
            self.commands += 1
            if desc[1] & AdminFlags.INTERRUPT:
                interrupt = True
            head = (head + 1) % size
            if time.monotonic() >= deadline:
                budget = 0
                break
        ring.set_head(head)
        if interrupt:
            eng.set_cause(regs.Cause.ADMINQ)
        return head != tail and budget == 0

    def _list_step(self, addr: int, desc: tuple, qid: int, deadline: float) -> Pass:
        """Run the descriptor at ``addr``, a long V2_ADD_SA list in chunks until ``deadline``: the
        write-back triple when done, None when the list continues in the next pass."""
        lst = self._list
        if lst is not None and (lst.addr != addr or lst.desc != desc):
            lst = self._list = None  # the ring moved under us (driver re-programmed it)
        if lst is None:
            if desc[0] != ndis.Opcode.V2_ADD_SA or self._refuse(desc) is not None or not desc[5]:
                return (yield from self._execute(desc, qid))
            try:
                entries = ndis.unpack_v2_add_sa_list((yield READ, desc[6], desc[5]))
            except (DmaError, ndis.ParseError):
                return (yield from self._execute(desc, qid))  # reports the fault or the firmware's refusal
            if len(entries) <= LIST_CHUNK:
                return (yield from self._execute(desc, qid))
            lst = self._list = _ListInProgress(addr, desc, entries)
        while lst.done < len(lst.entries):
            chunk = lst.entries[lst.done : lst.done + LIST_CHUNK]
            lst.done += len(chunk)
            try:
                status, response = self.execute(ndis.Opcode.V2_ADD_SA, ndis.pack_v2_add_sa_list(chunk))
                results = ndis.unpack_counted(response, ndis.V2_ADD_SA_RESULT)
            except Exception:  # the facade promises not to raise; a bug must not stop the card
                log.exception("firmware fault executing a V2_ADD_SA list")  # no request bytes logged
                self._list = None
                self.events.report_error(regs.ErrCode.FIRMWARE_FAULT, desc[0])
                return AdminStatus.FIRMWARE_FAULT, 0, 0
            lst.results.extend(results)
            if status == NdisStatus.SUCCESS:
                lst.status = NdisStatus.SUCCESS
            elif lst.status is None:
                lst.status = status
            if lst.done < len(lst.entries) and time.monotonic() >= deadline:
                return None
        self._list = None
        return (yield from self._respond(desc, qid, int(NdisStatus.FAILURE if lst.status is None else lst.status),
                                         ndis.pack_counted(lst.results)))

    def _execute(self, desc: tuple, qid: int) -> Pass:
        """(AdminStatus, firmware status, resp_len write-back) for one descriptor (a DMA pass step)."""
        opcode, req_len, req_addr = desc[0], desc[5], desc[6]
        eng = self.events
        refused = self._refuse(desc)
        if refused is not None:
            eng.count(BAD_DESCRIPTOR)
            return refused, 0, 0
        try:
            request = (yield READ, req_addr, req_len) if req_len else b""
        except DmaError:
            eng.dma_fault(qid)
            return AdminStatus.DMA_ERROR, 0, 0
        try:
            fw_status, response = self.execute(opcode, request)
        except Exception:  # the facade promises not to raise; a bug must not stop the card
            log.exception("firmware fault executing admin opcode %#06x", opcode)  # no request bytes logged
            eng.report_error(regs.ErrCode.FIRMWARE_FAULT, opcode)
            return AdminStatus.FIRMWARE_FAULT, 0, 0
        return (yield from self._respond(desc, qid, fw_status, response))

    def _refuse(self, desc: tuple) -> int | None:
        """The AdminStatus a malformed descriptor gets, or None."""
        (_opcode, flags, _status, reserved0, _fw, req_len, _req_addr, _resp_addr, resp_cap, reserved1, _cookie,
         reserved2, reserved3) = desc
        if reserved0 or reserved1 or reserved2 or reserved3 or flags & ~_INPUT_FLAGS:
            return AdminStatus.BAD_DESCRIPTOR
        if req_len > self.max_buf:
            return AdminStatus.REQUEST_TOO_LONG
        if resp_cap > self.max_buf:
            return AdminStatus.BAD_DESCRIPTOR
        return None

    def _respond(self, desc: tuple, qid: int, fw_status: int, response: bytes) -> Pass:
        """Write the response (truncated to the descriptor's capacity); the write-back triple (a DMA pass step)."""
        resp_addr, resp_cap = desc[7], desc[8]
        eng = self.events
        status = AdminStatus.OK
        n = len(response)
        if n > resp_cap:
            status = AdminStatus.RESPONSE_TRUNCATED
            response = response[:resp_cap]
        if response:
            try:
                yield (WRITE, resp_addr, response)
            except DmaError:
                eng.dma_fault(qid)
                return AdminStatus.DMA_ERROR, fw_status & 0xFFFF_FFFF, 0
        return status, fw_status & 0xFFFF_FFFF, n
