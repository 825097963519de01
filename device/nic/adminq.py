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
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from device.contract import regs
from device.contract.regs import AdminFlags, AdminStatus
from device.nic.rings import STAT, QueueEvents, RingRegs
from device.vfio_user.device_api import DmaAccess, DmaError

log = logging.getLogger(__name__)

AQ_BUDGET = 32  # descriptors per pass: admin commands can be slow (SA adds build cipher contexts)
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


class AdminQueue:
    """Processes the admin ring of one card: ``execute`` is the firmware's command entry point
    (opcode, request) -> (NDIS status, response); ``events`` counts, faults and raises causes."""

    def __init__(self, execute: Callable[[int, bytes], tuple[int, bytes]], events: QueueEvents,
                 max_buf: int) -> None:
        self.execute = execute
        self.events = events
        self.max_buf = max_buf
        self.commands = 0  # descriptors completed (any status)

    def process(self, ring: RingRegs, dma: DmaAccess) -> bool:
        """One bounded pass. Returns True when descriptors remain (caller schedules another pass)."""
        events = self.events
        base, size, head, tail = ring.base_address, ring.length, ring.head, ring.tail
        qid = ring.queue_id
        interrupt = False
        budget = AQ_BUDGET
        while head != tail and budget:
            budget -= 1
            addr = base + head * _DESC_SIZE
            try:
                desc = _UNPACK(dma.read(addr, _DESC_SIZE))
            except DmaError:
                events.dma_fault(qid)
                break
            status, fw_status, resp_len = self._execute(dma, desc, qid)
            try:
                dma.write(addr + _RESP_LEN_AT, _U32.pack(resp_len))
                dma.write(addr + _STATUS_AT, _STATUS_FW.pack(status, 0, fw_status))
                flags = (desc[1] & int(AdminFlags.INTERRUPT)) | int(AdminFlags.DONE)
                if status != AdminStatus.OK:
                    flags |= int(AdminFlags.ERROR)
                dma.write(addr + _FLAGS_AT, _U16.pack(flags))
            except DmaError:  # readable but not writable (read-only mapping)
                events.dma_fault(qid)
            self.commands += 1
            if desc[1] & AdminFlags.INTERRUPT:
                interrupt = True
            head = (head + 1) % size
        ring.set_head(head)
        if interrupt:
            events.set_cause(regs.Cause.ADMINQ)
        return head != tail and budget == 0

    def _execute(self, dma: DmaAccess, desc: tuple, qid: int) -> tuple[int, int, int]:
        """(AdminStatus, firmware status, resp_len write-back) for one descriptor."""
        (opcode, flags, _status, reserved0, _fw, req_len, req_addr, resp_addr, resp_cap, reserved1, _cookie,
         reserved2, reserved3) = desc
        events = self.events
        if reserved0 or reserved1 or reserved2 or reserved3 or flags & ~_INPUT_FLAGS:
            events.count(BAD_DESCRIPTOR)
            return AdminStatus.BAD_DESCRIPTOR, 0, 0
        if req_len > self.max_buf:
            events.count(BAD_DESCRIPTOR)
            return AdminStatus.REQUEST_TOO_LONG, 0, 0
        if resp_cap > self.max_buf:
            events.count(BAD_DESCRIPTOR)
            return AdminStatus.BAD_DESCRIPTOR, 0, 0
        try:
            request = dma.read(req_addr, req_len) if req_len else b""
        except DmaError:
            events.dma_fault(qid)
            return AdminStatus.DMA_ERROR, 0, 0
        try:
            fw_status, response = self.execute(opcode, request)
        except Exception:  # the facade promises not to raise; a bug must not stop the card
            log.exception("firmware fault executing admin opcode %#06x", opcode)  # no request bytes logged
            events.report_error(regs.ErrCode.FIRMWARE_FAULT, opcode)
            return AdminStatus.FIRMWARE_FAULT, 0, 0
        status = AdminStatus.OK
        n = len(response)
        if n > resp_cap:
            status = AdminStatus.RESPONSE_TRUNCATED
            response = response[:resp_cap]
        if response:
            try:
                dma.write(resp_addr, response)
            except DmaError:
                events.dma_fault(qid)
                return AdminStatus.DMA_ERROR, fw_status & 0xFFFF_FFFF, 0
        return status, fw_status & 0xFFFF_FFFF, n
