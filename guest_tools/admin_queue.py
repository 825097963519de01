"""The driver's admin queue: one command at a time through the AdminDesc ring (datasheet §5), and the
errors a command can end in."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from device.contract import regs
from device.contract.ndis import Opcode
from device.contract.regs import ADMIN_DESC, AdminFlags, AdminStatus, IntMode, Status
from device.contract.status import NdisStatus
from guest_tools import sa as sa_wire

if TYPE_CHECKING:
    from guest_tools.dma import DmaBuffer
    from guest_tools.mmio import Mmio


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


class AdminQueueOps:
    """Card's admin-queue part: uses the ring and buffers Card.init set up."""

    mmio: Mmio
    irq: object
    aq: object
    aq_req: DmaBuffer
    aq_resp: DmaBuffer
    admin_buf_size: int
    admin_timeout: float
    _cookie: int
    _open: bool
    # admin commands whose DONE was seen only after their timeout (a starved card server; kept for `stats`)
    late_admin_completions: int = 0

    def _wait(self, ready, timeout: float, what: str) -> None:
        raise NotImplementedError  # Card._wait

    def _error_text(self) -> str:
        raise NotImplementedError  # Card._error_text

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
            head = self.mmio.read32(regs.ADMINQ_BASE + regs.QREG_HEAD)
            # The card writes DONE before it moves HEAD (datasheet §5), so a command that completed in the
            # last instant shows DONE now. It has run - failing it here would leave the driver believing,
            # say, that an SA it added is absent - so it is taken, late, instead of reported as lost.
            if not done():
                hint = "the card stopped (STATUS.FATAL): run 'reset'" if status & Status.FATAL else \
                    "is the device server running?"
                raise AdminError(
                    f"admin command {_opcode_name(opcode)} timed out after {timeout or self.admin_timeout:g} s: "
                    f"{hint} (descriptor {i}, AQ_HEAD={head}, AQ_TAIL={ring.tail}, "
                    f"STATUS={status:#x}, {self._error_text()})") from None
            self.late_admin_completions += 1
            print(f"warning: admin command {_opcode_name(opcode)} completed only after its "
                  f"{timeout or self.admin_timeout:g} s timeout (is the host overloaded?)", file=sys.stderr)
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
