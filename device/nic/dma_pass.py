"""Resumable ring passes: the card's DMA works whether guest RAM is shared with us or not.

QEMU shares guest RAM through DMA_MAP with an fd only when RAM has a file behind it (a memfd backend);
with plain ``-m`` it sends DMA_MAP without an fd, and such a range is reachable only through
VFIO_USER_DMA_READ/DMA_WRITE messages (qemu docs/interop/vfio-user.rst, "VFIO_USER_DMA_MAP": the fd is
optional). QEMU answers those on its main loop, and it waits for our replies with its big lock held, so a
handler must never wait for a reply (device_api.py).

So a ring pass (TX, RX, admin) is a generator that *yields* its DMA accesses instead of performing them,
as plain tuples (the hot path makes millions of them)::

    desc = yield READ, addr, 32             # evaluates to the bytes
    yield WRITE, addr + 16, wb              # evaluates to None once written
    yield REACHABLE, buf_addr, buf_len      # the whole buffer is mapped (RX secures its buffer first)

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
from typing import Any

from device.vfio_user.device_api import DeviceContext, DmaError

log = logging.getLogger(__name__)


READ, WRITE, REACHABLE = 0, 1, 2  # op[0]; then (addr, length) or (addr, data)
DmaOp = tuple[int, int, Any]
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

    def start(self, first: DmaOp | None = None) -> None:
        """Run until the end or the first message; ``first``: the op the generator already yielded."""
        self._step(None, None, first)

    def cancel(self) -> None:
        if self.finished:
            return
        self.cancelled = True
        self.finished = True
        if not self._running:  # else _step closes it when the generator yields next
            self._gen.close()

    def _step(self, value: Any, error: DmaError | None, op: DmaOp | None = None) -> None:
        self._running = True
        try:
            self._run(value, error, op)
        finally:
            self._running = False

    def _run(self, value: Any, error: DmaError | None, op: DmaOp | None) -> None:
        gen = self._gen
        send = gen.send
        dma = self._ctx.dma
        while True:
            if op is None:
                try:
                    op = send(value) if error is None else gen.throw(error)
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
            kind, addr, arg = op
            op = None
            error = value = None
            try:
                if kind == READ:
                    value = dma.read(addr, arg)
                elif kind == WRITE:
                    dma.write(addr, arg)
                else:
                    dma.view(addr, arg).release()
                continue
            except DmaError as exc:
                error = exc
            if self._message(kind, addr, arg):
                if kind != REACHABLE:
                    return  # waits for the client's reply
                error = None

    def _message(self, kind: int, addr: int, arg: Any) -> bool:
        """Issue a READ/WRITE as a vfio-user message if its range exists without an fd (a REACHABLE range
        needs none). False: it cannot be done at all."""
        ctx = self._ctx
        info = ctx.dma.mapped(addr, len(arg) if kind == WRITE else arg)
        if info is None or info.fd_backed or not (info.readable if kind == READ else info.writable):
            return False
        if kind == READ:
            self.messages += 1
            ctx.dma_read_async(addr, arg, self._read_done)
        elif kind == WRITE:
            self.messages += 1
            ctx.dma_write_async(addr, bytes(arg), self._write_done)
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
