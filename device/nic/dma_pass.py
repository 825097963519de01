"""Resumable ring passes: the card's DMA works whether guest RAM is shared with us or not.

QEMU shares guest RAM through DMA_MAP with an fd only when RAM has a file behind it (a memfd backend);
with plain ``-m`` it sends DMA_MAP without an fd, and such a range is reachable only through
VFIO_USER_DMA_READ/DMA_WRITE messages (qemu docs/interop/vfio-user.rst, "VFIO_USER_DMA_MAP": the fd is
optional). QEMU answers those on its main loop, and it waits for our replies with its big lock held, so a
handler must never wait for a reply (device_api.py).

So a ring pass (TX, RX, admin) is a generator that *yields* its DMA accesses instead of performing them::

    desc = yield Read(addr, 32)
    yield Write(addr + 16, wb)
    yield Reachable(buf_addr, buf_len)    # the whole buffer is mapped writable (RX secures its buffer)

and :class:`DmaPass` runs it. An access to fd-backed memory is done at once and the generator goes on in
the same call (no message, no extra loop turn: the shared-memory path stays synchronous). An access to a
message-only range is sent as DMA_READ/DMA_WRITE and the pass stops there; the reply resumes it from the
server loop. Any failure (unmapped, read-only, client error or timeout) is thrown into the generator as
:class:`DmaError` at the yield, so the engines keep their plain ``try/except DmaError`` structure.

Every access waits for its own reply before the pass goes on: an RX frame's data is acknowledged before
its write-back (DD) is sent, an admin response before its DONE flag - the order the datasheet promises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

from device.vfio_user.device_api import DeviceContext, DmaError

log = logging.getLogger(__name__)


class Read(NamedTuple):
    """Read ``length`` bytes at ``addr``; the yield evaluates to the bytes."""

    addr: int
    length: int


class Write(NamedTuple):
    """Write ``data`` at ``addr``; the yield evaluates to None once the write is done."""

    addr: int
    data: bytes | bytearray | memoryview


class Reachable(NamedTuple):
    """Check that [addr, addr+length) lies in one writable mapping (no data moves)."""

    addr: int
    length: int


DmaOp = Read | Write | Reachable
Pass = Generator[DmaOp, Any, Any]


class DmaPass:
    """Runs one pass generator to its end; ``done(result)`` gets the generator's return value.

    ``cancel()`` (card reset, client gone) closes the generator where it waits; a reply that arrives later
    is ignored, so nothing more is read or written for that pass."""

    __slots__ = ("_gen", "_ctx", "_done", "_running", "cancelled", "finished", "messages")

    def __init__(self, ctx: DeviceContext, gen: Pass, done: Callable[[Any], None]) -> None:
        self._gen = gen
        self._ctx = ctx
        self._done = done
        self._running = False
        self.cancelled = False
        self.finished = False
        self.messages = 0  # DMA accesses that went through vfio-user messages

    def start(self) -> None:
        self._step(None, None)

    def cancel(self) -> None:
        if self.finished:
            return
        self.cancelled = True
        self.finished = True
        if not self._running:  # else _step closes it when the generator yields next
            self._gen.close()

    def _step(self, value: Any, error: DmaError | None) -> None:
        self._running = True
        try:
            self._run(value, error)
        finally:
            self._running = False

    def _run(self, value: Any, error: DmaError | None) -> None:
        gen = self._gen
        dma = self._ctx.dma
        while True:
            try:
                op = gen.throw(error) if error is not None else gen.send(value)
            except StopIteration as stop:
                self.finished = True
                self._done(stop.value)
                return
            except Exception:  # an engine bug must not stop the server loop (the pass is abandoned)
                log.exception("ring pass failed")
                self.finished = True
                self._done(None)
                return
            if self.cancelled:
                gen.close()
                return
            error = None
            kind = type(op)
            try:
                if kind is Read:
                    value = dma.read(op.addr, op.length)
                elif kind is Write:
                    dma.write(op.addr, op.data)
                    value = None
                else:
                    info = dma.mapped(op.addr, op.length)
                    if info is None or not info.writable:
                        raise DmaError(f"{op.length} bytes at {op.addr:#x} are not in one writable mapped range")
                    value = None
                continue
            except DmaError as exc:
                if kind is Reachable or not self._send(op, kind):
                    error = exc
                    continue
            return  # waits for the client's reply

    def _send(self, op: DmaOp, kind: type) -> bool:
        """Issue ``op`` as a vfio-user message if its range exists without an fd. False: it cannot be done."""
        info = self._ctx.dma.mapped(op.addr, len(op.data) if kind is Write else op.length)
        if info is None or info.fd_backed or not (info.writable if kind is Write else info.readable):
            return False
        self.messages += 1
        if kind is Read:
            self._ctx.dma_read_async(op.addr, op.length, self._read_done)
        else:
            self._ctx.dma_write_async(op.addr, bytes(op.data), self._write_done)
        return True

    def _read_done(self, data: bytes | None) -> None:
        if self.cancelled:
            return
        if data is None:
            self._step(None, DmaError("message DMA read failed"))
        else:
            self._step(data, None)

    def _write_done(self, ok: bool) -> None:
        if self.cancelled:
            return
        self._step(None, None if ok else DmaError("message DMA write failed"))
