"""The vfio-user server loop: the only module here that owns sockets.

One selector loop serves the listening socket, the one attached client, device-registered readers
(wire sockets, timer fds) and timers. QEMU's client is strict about timing and framing, so:

* replies are queued in message order and flushed once per received chunk; ``ctx.call_soon`` work
  runs only after that flush, because QEMU holds its big lock while it waits for our reply;
* server->client DMA_READ/DMA_WRITE are sent asynchronously and matched by id when the client
  answers, while the loop keeps serving requests (a blocking request would deadlock QEMU:
  vm-recon.md);
* one client at a time: while attached the listener is not polled; on disconnect the device is
  told (``detached``), DMA maps and irq fds are dropped, device state is kept, and the next
  client is accepted (spec "Client Disconnection").
"""

from __future__ import annotations

import array
import contextlib
import errno
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import protocol as p
from .connection import (
    NEED_DATA,
    BadRequest,
    ClientReply,
    Disconnect,
    IgnoredReply,
    VfioUserConnection,
)
from .device_api import VfioUserDevice, VfioUserError
from .dma import DmaTable
from .irq import IrqTable
from .protocol import Command, ProtocolError

log = logging.getLogger(__name__)

# Event masks of the loop (epoll's own bits).
EVENT_READ = select.EPOLLIN
EVENT_WRITE = select.EPOLLOUT
_EPOLL_TROUBLE = select.EPOLLERR | select.EPOLLHUP


class _Poller:
    """A bare epoll with an fd -> callback table: what ``selectors`` offers the loop, minus its per-event
    key objects and wrapper calls (docs/performance.md: ~0.7 us per message on this server's hot path).
    Registering a registered object raises KeyError, as selectors does."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._entries: dict[int, tuple[Callable[[int, int], None], int]] = {}  # fd -> (callback, events)

    @staticmethod
    def _fd(fileobj: Any) -> int:
        return fileobj if isinstance(fileobj, int) else fileobj.fileno()

    def register(self, fileobj: Any, events: int, callback: Callable[[int, int], None]) -> None:
        fd = self._fd(fileobj)
        if fd < 0:
            raise ValueError("closed file")
        if fd in self._entries:
            raise KeyError(f"fd {fd} is already registered")
        self._ep.register(fd, events)
        self._entries[fd] = (callback, events)

    def modify(self, fileobj: Any, events: int, callback: Callable[[int, int], None]) -> None:
        fd = self._fd(fileobj)
        if fd not in self._entries:
            raise KeyError(f"fd {fd} is not registered")
        self._ep.modify(fd, events)
        self._entries[fd] = (callback, events)

    def unregister(self, fileobj: Any) -> None:
        fd = self._fd(fileobj)
        if self._entries.pop(fd, None) is None:
            raise KeyError(f"fd {fd} is not registered")
        with contextlib.suppress(OSError):  # already closed: epoll dropped it itself
            self._ep.unregister(fd)

    def close(self) -> None:
        self._ep.close()
        self._entries.clear()

    def run(self, server: VfioUserServer, once: bool = False) -> None:
        """The server's loop until it stops (one round if ``once``): poll, call back, then the due timers and
        the ``call_soon`` work. One method with the loop state in locals: every Python call and attribute
        load here is paid once per message (docs/performance.md, the server CPU figure)."""
        poll = self._ep.poll
        entries = self._entries
        ready_q = server._ready_q
        timers = server._timers
        while once or not server._stopping:
            if ready_q:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            else:
                timeout = -1.0
            for fd, mask in poll(timeout):
                entry = entries.get(fd)
                if entry is None:
                    continue  # unregistered by an earlier callback of the same round
                callback, events = entry
                if mask & _EPOLL_TROUBLE:  # error / hang-up: let the callback's read or write find out
                    mask |= events
                callback(mask & events, fd)
            if timers:
                server._run_timers()
            if ready_q:
                server._run_ready()
            if once:
                return


# One receive call takes up to this much; a 1 MiB REGION_WRITE just needs several calls.
RECV_SIZE = 256 * 1024
# Ancillary buffer for the most fds a message may carry; more sets MSG_CTRUNC (the kernel drops
# the excess) and the request is refused with EINVAL.
ANC_SIZE = socket.CMSG_SPACE(p.MAX_MSG_FDS * array.array("i").itemsize)
# Plain ints: socket.MSG_CTRUNC is an IntFlag whose ``&`` costs microseconds per message.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
# _serve_mmio: REGION_READ reply layout and data mask by access size.
_READ_REPLIES = {n: (layout.pack, (1 << (8 * n)) - 1) for n, layout in p.HEADER_REGION_RW_VALUE.items()}
_pack_write_reply = p.HEADER_REGION_RW.pack
_REGION_READ = int(Command.REGION_READ)
_REGION_WRITE = int(Command.REGION_WRITE)
_TYPE_REPLY = p.TYPE_REPLY
_NO_REPLY = p.FLAG_NO_REPLY
# How long a DMA_READ/DMA_WRITE may wait for the client (QEMU's own reply timeout is 5 s).
DMA_REQUEST_TIMEOUT = 5.0
# Reply bytes queued for one client before we stop reading its requests. QEMU reads every reply
# it waits for, so it never gets near this; a client that pipelines requests and never reads
# would otherwise make us buffer without bound (30 k unread 4 KiB reads = 118 MiB). Four of the
# largest replies (1 MiB REGION_READ) fit, so a client with a few big reads in flight is not
# slowed. We read again once the client has drained to half of it.
MAX_QUEUED_OUTPUT = 4 * (p.MAX_DATA_XFER_SIZE + 64)
RESUME_QUEUED_OUTPUT = MAX_QUEUED_OUTPUT // 2
# Mode of the listening socket: connecting needs write permission on it (unix(7)), so only the
# owner can attach. The directory a server creates for it is private too.
SOCKET_MODE = 0o600
SOCKET_DIR_MODE = 0o700


class TimerHandle:
    """Returned by call_later; ``cancel()`` stops a callback that has not run yet."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _DmaOp:
    """One message-based DMA transfer, possibly split into several requests."""

    __slots__ = ("write", "done", "parts", "remaining", "finished", "timer", "iova", "ids")

    def __init__(self, write: bool, iova: int, pieces: int, done: Callable[[Any], None]) -> None:
        self.write = write
        self.iova = iova
        self.done = done
        self.parts: list[bytes] = [b""] * pieces
        self.remaining = pieces
        self.finished = False
        self.timer: TimerHandle | None = None
        self.ids: list[int] = []  # our request ids still waiting for the client


class _ClientContext:
    """The DeviceContext handed to the device while a client is attached."""

    def __init__(self, server: VfioUserServer, dma: DmaTable, irqs: IrqTable) -> None:
        self._server = server
        self.dma = dma
        self.irqs = irqs
        self.active = True

    def trigger_irq(self, index: int, vector: int = 0) -> bool:
        return self.active and self.irqs.trigger(index, vector)

    def irq_configured(self, index: int, vector: int = 0) -> bool:
        return self.active and self.irqs.configured(index, vector)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._server.call_soon(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return self._server.call_later(delay, callback)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._server.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        self._server.remove_reader(fd)

    def dma_read_async(self, iova: int, length: int, done: Callable[[bytes | None], None]) -> None:
        self._server._dma_async(self, False, iova, length, done)

    def dma_write_async(self, iova: int, data: bytes, done: Callable[[bool], None]) -> None:
        self._server._dma_async(self, True, iova, data, done)


def _prepare_socket_path(path: str) -> None:
    """Remove a stale socket file; refuse a live server or a non-socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise RuntimeError(f"a live server is already listening on {path}")


def _prepare_socket_dir(path: str) -> None:
    """Create the socket's directory private (0700) if missing; warn if others may write to it
    (they could replace the socket file with their own)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=SOCKET_DIR_MODE, exist_ok=True)
        os.chmod(parent, SOCKET_DIR_MODE)  # makedirs' mode is filtered by the umask
        return
    st = os.stat(parent)
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        log.warning("socket directory %s is writable by other users; use a private directory (0700)", parent)


class VfioUserServer:
    """Serve ``device`` to vfio-user clients on a UNIX socket, one client at a time.

    Use ``serve_forever()`` (blocking) or ``start_in_thread()`` for tests; ``stop()`` may be
    called from any thread or a signal handler.
    """

    def __init__(self, socket_path: str, device: VfioUserDevice, *,
                 ready_callback: Callable[[], None] | None = None,
                 dma_timeout: float = DMA_REQUEST_TIMEOUT) -> None:
        self.socket_path = os.fspath(socket_path)
        self.device = device
        self.ready_callback = ready_callback
        self.dma_timeout = dma_timeout
        self.ready = threading.Event()
        self.clients_served = 0
        self.dma_messages = 0  # DMA_READ/DMA_WRITE requests sent to the current client (guest RAM not shared)
        self._sel = _Poller()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, EVENT_READ, self._on_wake)
        self._listener: socket.socket | None = None
        self._listener_ino: tuple[int, int] | None = None
        self._stopping = False
        self._closed = False
        self._ready_q: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._readers: dict[int, Callable[[], None]] = {}
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rbufs = [self._rview]
        # The single-message MMIO path (_serve_mmio). Tests turn it off to compare against the general path;
        # mmio_fast_messages counts the requests it served.
        self.mmio_fast_path = True
        self.mmio_fast_messages = 0
        self._fast = False  # mmio_fast_path and not tracing, for the attached client
        # region -> (size, handler read/write) where the device exposes its BAR handler (PciFunction)
        self._mmio_reads: dict[int, tuple[int, Callable[[int, int], int]]] = {}
        self._mmio_writes: dict[int, tuple[int, Callable[[int, int, int], None]]] = {}
        # Per-client state
        self._sock: socket.socket | None = None
        self._conn: VfioUserConnection | None = None
        self._ctx: _ClientContext | None = None
        self._dma = DmaTable()
        self._irqs = IrqTable([])
        self._batch: list[bytes] = []  # replies without fds, joined at flush
        self._out: deque[tuple[bytes, tuple[int, ...]]] = deque()
        self._queued = 0  # bytes in _batch and _out
        self._paused = False  # not reading the client: too much output queued
        self._resume_scheduled = False
        self._events = 0  # selector events registered for the client socket
        self._dma_ops: dict[int, tuple[_DmaOp, int, int, int]] = {}
        self._regions: list[tuple[int, bool, bool]] = []  # (size, readable, writable)
        self._read_limits: list[int] = []
        self._write_limits: list[int] = []
        self._trace = False
        self._handlers: dict[type, Callable[[Any], None]] = {
            p.RegionRead: self._on_region_read,
            p.RegionWrite: self._on_region_write,
            p.Version: self._on_version,
            p.DmaMap: self._on_dma_map,
            p.DmaUnmap: self._on_dma_unmap,
            p.GetDeviceInfo: self._on_device_info,
            p.GetRegionInfo: self._on_region_info,
            p.GetRegionIoFds: self._on_region_io_fds,
            p.GetIrqInfo: self._on_irq_info,
            p.SetIrqs: self._on_set_irqs,
            p.RegionWriteMulti: self._on_region_write_multi,
            p.DeviceReset: self._on_device_reset,
            p.DeviceFeature: self._on_device_feature,
        }

    # ================================================================ public loop API

    def listen(self) -> None:
        """Bind and listen (removing a stale socket file); then signal readiness."""
        if self._listener is not None:
            return
        _prepare_socket_dir(self.socket_path)
        _prepare_socket_path(self.socket_path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lsock.bind(self.socket_path)
            # Before listen(): until then a connect() is refused, so nobody slips in meanwhile.
            os.chmod(self.socket_path, SOCKET_MODE)
            lsock.listen(4)
            lsock.setblocking(False)
        except OSError:
            lsock.close()
            raise
        st = os.stat(self.socket_path)
        self._listener_ino = (st.st_dev, st.st_ino)
        self._listener = lsock
        self._sel.register(lsock, EVENT_READ, self._on_accept)
        log.info("vfio-user server listening on %s", self.socket_path)
        self.ready.set()
        if self.ready_callback is not None:
            self.ready_callback()

    def serve_forever(self, listen: bool = True) -> None:
        """Run the loop until stop(); ``listen=False`` serves only adopted clients."""
        try:
            if listen:
                self.listen()
            self._sel.run(self)
        finally:
            self.close()

    def start_in_thread(self) -> threading.Thread:
        """Listen now (errors surface here) and serve from a daemon thread."""
        self.listen()
        t = threading.Thread(target=self.serve_forever, name="vfio-user-server", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """Ask the loop to finish; safe from other threads and signal handlers."""
        self._stopping = True
        self._wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            self._drop_client("server shutting down")
        for fd in list(self._readers):
            self.remove_reader(fd)
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            try:  # only remove the path if it is still our socket
                st = os.stat(self.socket_path)
                if (st.st_dev, st.st_ino) == self._listener_ino:
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("vfio-user server stopped")

    # ================================================================ scheduling (DeviceContext)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._ready_q.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._ready_q.append(callback)
        self._wake()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        h = TimerHandle(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (h.when, next(self._seq), h))
        return h

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        if fd in self._readers:
            self._sel.modify(fd, EVENT_READ, self._reader_dispatch)
        else:
            self._sel.register(fd, EVENT_READ, self._reader_dispatch)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)

    # ================================================================ loop internals

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _on_wake(self, _mask: int, _key: Any) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)

    def _reader_dispatch(self, _mask: int, fd: int) -> None:
        cb = self._readers.get(fd)
        if cb is not None:
            self._guarded(cb, "reader callback")

    @staticmethod
    def _guarded(cb: Callable[..., None], what: str, *args: Any) -> None:
        try:
            cb(*args)
        except Exception:
            log.exception("device %s %r failed", what, cb)

    def _run_once(self) -> None:
        """One round of the loop (tests step the server with it)."""
        self._sel.run(self, once=True)

    def _run_ready(self) -> None:
        n = len(self._ready_q)  # callbacks added meanwhile wait for the next round
        for _ in range(n):
            self._guarded(self._ready_q.popleft(), "call_soon callback")
        if n:
            self._flush()

    def _run_timers(self) -> None:
        timers = self._timers
        if not timers:
            return
        now = time.monotonic()
        ran = False
        while timers and timers[0][0] <= now:
            h = heapq.heappop(timers)[2]
            if not h.cancelled:
                h.cancelled = True
                ran = True
                self._guarded(h.callback, "timer callback")
        if ran:
            self._flush()

    # ================================================================ client socket

    def _on_accept(self, _mask: int, _key: Any) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        self._sel.unregister(self._listener)  # one client at a time; others wait in the backlog
        self.adopt_client(sock)

    def adopt_client(self, sock: socket.socket) -> None:
        """Serve an already-connected socket (accept() result, or a socketpair end in tests)."""
        if self._sock is not None:
            raise RuntimeError("a client is already attached")
        sock.setblocking(False)
        self._sock = sock
        self._conn = VfioUserConnection()
        self._dma = DmaTable()
        self._batch = []
        self._out.clear()
        self._queued = 0
        self._paused = self._resume_scheduled = False
        self._trace = log.isEnabledFor(logging.DEBUG)
        self._fast = self.mmio_fast_path and not self._trace  # tracing logs every request: general path
        self._events = EVENT_READ
        self._sel.register(sock, EVENT_READ, self._on_client_io)
        self.clients_served += 1
        log.info("client connected on %s (#%d)", self.socket_path, self.clients_served)

    def _on_client_io(self, mask: int, _fd: Any) -> None:
        """Poll callback of the client socket: send what waits, then receive one chunk and serve it."""
        try:
            if mask & EVENT_WRITE:
                self._flush()
            sock = self._sock
            if not mask & EVENT_READ or sock is None or self._paused:
                return
            try:
                n, anc, flags, _ = sock.recvmsg_into(self._rbufs, ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop_client(f"receive failed: {exc}")
                return
            # QEMU's vCPU waits for each trapped access, so a chunk is usually exactly one small REGION_READ
            # or REGION_WRITE: serve it without the event objects, unless replies still wait to be sent.
            if not anc and not flags and self._fast and not self._out:
                m = self._conn.take_mmio(self._rbuf, n)  # type: ignore[union-attr]
                if m is not None:
                    self._serve_mmio(m)
                    return
            self._take_chunk(n, anc, flags)
        except Exception as exc:  # a bug or a hostile message: lose this client, keep serving
            log.exception("internal error serving the client")
            self._drop_client(f"internal error: {type(exc).__name__}")

    def _receive(self) -> None:
        """Receive one chunk from the client and serve it (what the loop does when the socket is readable)."""
        self._on_client_io(EVENT_READ, None)

    def _resume(self) -> None:
        """The client drained its replies: handle the requests already buffered, read again."""
        self._resume_scheduled = False
        if self._sock is None or not self._paused:
            return
        self._paused = False
        try:
            self._process()
        except Exception as exc:
            log.exception("internal error serving the client")
            self._drop_client(f"internal error: {type(exc).__name__}")

    def _take_chunk(self, n: int, anc: list[tuple[int, int, bytes]], flags: int) -> None:
        """The general path: hand the chunk and its fds to the connection, then serve its events."""
        fds: list[int] = []
        for level, kind, data in anc:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - len(data) % a.itemsize])
                fds.extend(a)
        assert self._conn is not None
        self._conn.receive_data(self._rview[:n], fds, (flags & _MSG_CTRUNC) != 0)
        self._process()

    def _process(self) -> None:
        conn = self._conn
        if conn is None:
            return
        next_event = conn.next_event
        handlers = self._handlers
        trace = self._trace
        while True:
            ev = next_event()
            if ev is NEED_DATA:
                break
            handler = handlers.get(type(ev))
            if handler is not None:
                if trace:
                    self._trace_request(ev)
                try:
                    handler(ev)
                except Exception as exc:
                    self._refuse(ev, exc)
            elif type(ev) is BadRequest:
                log.warning("protocol error: %s (%s id %d) -> %s%s", ev.reason, p.command_name(ev.command),
                            ev.msg_id, errno.errorcode.get(ev.errno, ev.errno),
                            " (no reply: NO_REPLY)" if ev.no_reply else "")
                self._send(conn.error_reply(ev, ev.errno))
            elif type(ev) is ClientReply:
                self._on_client_reply(ev)
            elif type(ev) is IgnoredReply:
                log.warning("protocol error: ignoring client reply: %s", ev.reason)
            elif type(ev) is Disconnect:
                self._drop_client(ev.reason)
                return
            if self._conn is not conn:  # dropped meanwhile (send failure)
                return
            if self._queued > MAX_QUEUED_OUTPUT:  # back-pressure: see MAX_QUEUED_OUTPUT
                self._flush()
                if self._conn is not conn:
                    return
                if self._queued > MAX_QUEUED_OUTPUT:
                    log.info("client is not reading its replies (%d bytes queued); pausing its requests",
                             self._queued)
                    self._paused = True
                    break
        self._flush()

    def _refuse(self, ev: Any, exc: Exception) -> None:
        """Answer a request whose handling raised ``exc`` with the error reply it calls for."""
        if isinstance(exc, VfioUserError):
            log.debug("%s refused: %s", type(ev).__name__, exc)
            err = exc.errno
        elif isinstance(exc, ProtocolError):
            log.warning("protocol error: %s", exc.reason)
            err = exc.errno
        else:
            log.error("device failed handling %s", type(ev).__name__, exc_info=exc)
            err = errno.EIO
        self._send(VfioUserConnection.error_reply(ev, err))

    def _serve_mmio(self, m: tuple[int, ...]) -> None:
        """Serve one request taken whole by ``VfioUserConnection.take_mmio`` (fields as it returns them).

        An access of 1, 2, 4 or 8 bytes inside a region whose BAR handler the device exposes
        (``region_access``) goes straight to the handler and its reply is sent at once; any other access,
        including every one the general path would refuse, becomes the request event and goes through the
        same handler as from ``_process``, so replies and errors are the general path's own.
        """
        self.mmio_fast_messages += 1
        if m[1] == _REGION_READ:
            msg_id, _command, _size, flags, _error, offset, region, count = m
            access = self._mmio_reads.get(region)
            shape = _READ_REPLIES.get(count)
            if access is None or shape is None or offset + count > access[0]:
                self._serve_event(p.RegionRead(msg_id, flags & _NO_REPLY != 0, region, offset, count))
                return
            try:
                value = access[1](offset, count)
            except Exception as exc:
                self._refuse(p.RegionRead(msg_id, flags & _NO_REPLY != 0, region, offset, count), exc)
                self._flush()
                return
            if flags & _NO_REPLY:
                out = None
            else:
                pack, mask = shape
                out = pack(msg_id, _REGION_READ, 32 + count, _TYPE_REPLY, 0, offset, region, count, value & mask)
        else:
            msg_id, _command, _size, flags, _error, offset, region, count, value = m
            access = self._mmio_writes.get(region)
            if access is None or offset + count > access[0]:
                self._serve_event(p.RegionWrite(msg_id, flags & _NO_REPLY != 0, region, offset,
                                                bytes(self._rview[32 : 32 + count])))
                return
            try:
                access[1](offset, count, value)
            except Exception as exc:
                self._refuse(p.RegionWrite(msg_id, flags & _NO_REPLY != 0, region, offset,
                                           bytes(self._rview[32 : 32 + count])), exc)
                self._flush()
                return
            out = None if flags & _NO_REPLY else _pack_write_reply(msg_id, _REGION_WRITE, 32, _TYPE_REPLY, 0,
                                                                   offset, region, count)
        if self._batch:  # the device queued messages meanwhile (DMA requests): they go first, as in _process
            if out is not None:
                self._send(out)
            self._flush()
            return
        if out is None:
            return
        try:
            sent = self._sock.send(out)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._drop_client(f"send failed: {exc}")
            return
        if sent < len(out):
            self._batch.append(out[sent:])
            self._queued += len(out) - sent
            self._flush()

    def _serve_event(self, ev: Any) -> None:
        """A request of the MMIO path that needs the general handler (see _serve_mmio)."""
        try:
            self._handlers[type(ev)](ev)
        except Exception as exc:
            self._refuse(ev, exc)
        self._flush()

    def _trace_request(self, ev: Any) -> None:
        if type(ev) is p.RegionWrite:  # never dump data
            log.debug("<- REGION_WRITE id %d region %d offset %#x len %d%s", ev.msg_id, ev.region, ev.offset,
                      len(ev.data), " posted" if ev.no_reply else "")
        elif type(ev) is p.RegionWriteMulti:
            log.debug("<- REGION_WRITE_MULTI id %d writes %d", ev.msg_id, len(ev.writes))
        else:
            log.debug("<- %r", ev)

    def _send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        if not data:
            return
        self._queued += len(data)
        if fds:
            if self._batch:
                self._out.append((b"".join(self._batch), ()))
                self._batch = []
            self._out.append((data, fds))
        else:
            self._batch.append(data)

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            self._batch = []
            self._queued = 0
            return
        batch = self._batch
        out = self._out
        if batch:
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            self._batch = []
            if not out:  # fast path: nothing queued, try to send right away
                try:
                    n = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as exc:
                    self._drop_client(f"send failed: {exc}")
                    return
                self._queued -= n
                if n == len(data):
                    if self._events != EVENT_READ:
                        self._update_events()
                    return
                data = data[n:]
            out.append((data, ()))
        while out:
            data, fds = out[0]
            try:
                if fds:
                    n = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    n = sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop_client(f"send failed: {exc}")
                return
            self._queued -= n
            if n < len(data):
                out[0] = (data[n:], ())  # fds went with the first byte
            else:
                out.popleft()
        self._update_events()

    def _update_events(self) -> None:
        """Poll for writability while output waits; for requests unless paused (back-pressure)."""
        if self._paused and self._queued <= RESUME_QUEUED_OUTPUT and not self._resume_scheduled:
            self._resume_scheduled = True
            self.call_soon(self._resume)
        events = (0 if self._paused else EVENT_READ) | (EVENT_WRITE if self._out else 0)
        if events != self._events and self._sock is not None:
            if events:
                if self._events:
                    self._sel.modify(self._sock, events, self._on_client_io)
                else:
                    self._sel.register(self._sock, events, self._on_client_io)
            else:  # paused with everything sent: _resume is scheduled
                self._sel.unregister(self._sock)
            self._events = events

    def _drop_client(self, reason: str) -> None:
        sock, conn, ctx = self._sock, self._conn, self._ctx
        if sock is None:
            return
        log.info("client disconnected: %s (%d DMA_READ/DMA_WRITE messages sent to it)", reason, self.dma_messages)
        self.dma_messages = 0
        self._sock = self._conn = self._ctx = None
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()
        if conn is not None:
            conn.close(reason)
        # The device learns of the detach first, so it can drop work that waits for these replies
        # instead of treating their failure as DMA faults.
        if ctx is not None:
            ctx.active = False
            self._guarded(self.device.detached, "detached()")
        ops = {id(op): op for op, *_ in self._dma_ops.values()}
        self._dma_ops.clear()
        for op in ops.values():
            self._finish_op(op, False, "client disconnected")
        self._dma.unmap_all()
        self._irqs.close_all()
        self._batch = []
        self._out.clear()
        self._queued = 0
        self._paused = False
        self._events = 0
        if self._listener is not None and not self._stopping:
            with contextlib.suppress(KeyError):  # still registered if the client was adopted
                self._sel.register(self._listener, EVENT_READ, self._on_accept)

    # ================================================================ request handlers

    def _on_version(self, m: p.Version) -> None:
        assert self._conn is not None
        dev = self.device
        # Ask the device first: if it fails, the error reply is the only reply and VERSION can
        # be retried (state unchanged).
        regions = [dev.region_info(i) for i in range(dev.num_regions)]
        irq_counts = [dev.irq_info(i).count for i in range(dev.num_irqs)]
        self._send(self._conn.accept_version(m))
        self._regions = [(info.size, info.readable, info.writable) for info in regions]
        self._read_limits = [size if r else 0 for size, r, _w in self._regions]
        self._write_limits = [size if w else 0 for size, _r, w in self._regions]
        self._irqs = IrqTable(irq_counts)
        access = getattr(dev, "region_access", None)
        self._mmio_reads, self._mmio_writes = {}, {}
        for index, (size, readable, writable) in enumerate(self._regions):
            fns = access(index) if access is not None and size else None
            if fns is not None:
                if readable:
                    self._mmio_reads[index] = (size, fns[0])
                if writable:
                    self._mmio_writes[index] = (size, fns[1])
        self._ctx = _ClientContext(self, self._dma, self._irqs)
        log.info("client negotiated vfio-user 0.0 (client offered %d.%d, max_data_xfer_size %d)",
                 m.major, m.minor, self._conn.client_max_data_xfer_size)
        self._guarded(dev.attached, "attached()", self._ctx)

    def _region_error(self, region: int, offset: int, count: int, write: bool) -> VfioUserError:
        if region >= len(self._regions):
            return VfioUserError(errno.EINVAL, f"region {region} does not exist")
        size, readable, writable = self._regions[region]
        if not (writable if write else readable):
            return VfioUserError(errno.EINVAL, f"region {region} is not {'writable' if write else 'readable'}")
        return VfioUserError(errno.EINVAL, f"region {region} access {offset:#x}+{count} beyond size {size:#x}")

    def _on_region_read(self, m: p.RegionRead) -> None:
        lim = self._read_limits  # size of each readable region, 0 if not readable
        if m.region >= len(lim) or m.offset + m.count > lim[m.region]:
            raise self._region_error(m.region, m.offset, m.count, False)
        data = self.device.region_read(m.region, m.offset, m.count)
        if len(data) != m.count:
            log.error("device returned %d bytes for a %d-byte read of region %d", len(data), m.count, m.region)
            raise VfioUserError(errno.EIO, "short region read")
        if not m.no_reply:
            r = p.build_region_read_reply(m.msg_id, m.region, m.offset, data)
            self._batch.append(r)
            self._queued += len(r)

    def _on_region_write(self, m: p.RegionWrite) -> None:
        data = m.data
        lim = self._write_limits
        if m.region >= len(lim) or m.offset + len(data) > lim[m.region]:
            raise self._region_error(m.region, m.offset, len(data), True)
        self.device.region_write(m.region, m.offset, data)
        if not m.no_reply:
            r = p.build_region_write_reply(m.msg_id, m.region, m.offset, len(data))
            self._batch.append(r)
            self._queued += len(r)

    def _on_region_write_multi(self, m: p.RegionWriteMulti) -> None:
        lim = self._write_limits
        for region, offset, data in m.writes:
            if region >= len(lim) or offset + len(data) > lim[region]:
                raise self._region_error(region, offset, len(data), True)
            self.device.region_write(region, offset, data)
        self._send(VfioUserConnection.reply(m, p.build_reply(m.msg_id, Command.REGION_WRITE_MULTI)))

    def _on_dma_map(self, m: p.DmaMap) -> None:
        self._dma.map(m.iova, m.size, fd=m.fd, offset=m.offset, readable=m.readable, writable=m.writable)
        self._send(VfioUserConnection.reply(m, p.build_reply(m.msg_id, Command.DMA_MAP)))

    def _on_dma_unmap(self, m: p.DmaUnmap) -> None:
        if m.unmap_all:
            self._dma.unmap_all()
        else:
            self._dma.unmap(m.iova, m.size)
        self._send(VfioUserConnection.reply(m, p.build_dma_unmap_reply(m)))

    def _on_device_info(self, m: p.GetDeviceInfo) -> None:
        dev = self.device
        flags = p.DEVICE_FLAGS_PCI | (p.DEVICE_FLAGS_RESET if dev.supports_reset else 0)
        self._send(VfioUserConnection.reply(m, p.build_device_info_reply(m.msg_id, flags, dev.num_regions, dev.num_irqs)))

    def _on_region_info(self, m: p.GetRegionInfo) -> None:
        if not 0 <= m.index < self.device.num_regions:
            raise VfioUserError(errno.EINVAL, f"region {m.index} does not exist")
        data, fds = p.build_region_info_reply(m.msg_id, m.argsz, m.index, self.device.region_info(m.index))
        if not m.no_reply:
            self._send(data, fds)

    def _on_region_io_fds(self, m: p.GetRegionIoFds) -> None:
        if not 0 <= m.index < self.device.num_regions:
            raise VfioUserError(errno.EINVAL, f"region {m.index} does not exist")
        self._send(VfioUserConnection.reply(m, p.build_region_io_fds_reply(m.msg_id, m.index)))

    def _on_irq_info(self, m: p.GetIrqInfo) -> None:
        if not 0 <= m.index < self.device.num_irqs:
            raise VfioUserError(errno.EINVAL, f"irq index {m.index} does not exist")
        self._send(VfioUserConnection.reply(m, p.build_irq_info_reply(m.msg_id, m.index, self.device.irq_info(m.index))))

    def _on_set_irqs(self, m: p.SetIrqs) -> None:
        unmasked = self._irqs.set_irqs(m.index, m.flags, m.start, m.count, m.fds, m.data)
        hook = getattr(self.device, "irq_unmasked", None)
        if hook is not None:
            for index, vector in unmasked:
                self.call_soon(lambda i=index, v=vector: hook(i, v))
        self._send(VfioUserConnection.reply(m, p.build_reply(m.msg_id, Command.DEVICE_SET_IRQS)))

    def _on_device_reset(self, m: p.DeviceReset) -> None:
        if not self.device.supports_reset:
            raise VfioUserError(errno.ENOTSUP, "device does not support reset")
        self.device.reset()
        self._send(VfioUserConnection.reply(m, p.build_reply(m.msg_id, Command.DEVICE_RESET)))

    def _on_device_feature(self, m: p.DeviceFeature) -> None:
        # No optional features (migration, dirty logging): the kernel answers ENOTTY here too.
        raise VfioUserError(errno.ENOTTY, "no device features supported")

    # ================================================================ message DMA

    def _dma_async(self, ctx: _ClientContext, write: bool, iova: int, payload: Any, done: Callable[[Any], None]) -> None:
        failed: Any = False if write else None
        conn = self._conn
        if not ctx.active or conn is None or ctx is not self._ctx:
            self.call_soon(lambda: done(failed))
            return
        length = len(payload) if write else int(payload)
        info = self._dma.mapped(iova, length) if length > 0 else None
        if length <= 0 or info is None or not (info.writable if write else info.readable):
            log.debug("message DMA %s of %d bytes at %#x refused: not inside one mapped %s range",
                      "write" if write else "read", length, iova, "writable" if write else "readable")
            self.call_soon(lambda: done(failed))
            return
        if info.fd_backed:  # no need for messages: the memory is mapped here
            if write:
                self._dma.write(iova, payload)
                self.call_soon(lambda: done(True))
            else:
                data = self._dma.read(iova, length)
                self.call_soon(lambda: done(data))
            return
        chunk = conn.max_dma_chunk
        pieces = -(-length // chunk)
        op = _DmaOp(write, iova, pieces, done)
        for k in range(pieces):
            off = k * chunk
            n = min(chunk, length - off)
            try:
                if write:
                    msg_id, out = conn.start_request(Command.DMA_WRITE, iova + off, bytes(payload[off : off + n]))
                else:
                    msg_id, out = conn.start_request(Command.DMA_READ, iova + off, n)
            except ProtocolError as exc:
                self.call_soon(lambda r=exc.reason: self._finish_op(op, False, r))
                return
            self._dma_ops[msg_id] = (op, k, iova + off, n)
            self.dma_messages += 1
            op.ids.append(msg_id)
            self._send(out)
        op.timer = self.call_later(self.dma_timeout, lambda: self._finish_op(op, False, "timed out"))
        if self._trace:
            log.debug("-> DMA_%s %#x len %d in %d message(s)", "WRITE" if write else "READ", iova, length, pieces)

    def _on_client_reply(self, ev: ClientReply) -> None:
        entry = self._dma_ops.pop(ev.msg_id, None)
        if entry is None:
            log.debug("reply id %d has no DMA operation (already failed)", ev.msg_id)
            return
        op, k, iova, n = entry
        if op.finished:
            return
        if ev.error:
            self._finish_op(op, False, f"client answered {errno.errorcode.get(ev.error, ev.error)}")
            return
        try:
            if op.write:
                p.check_dma_write_reply(ev.payload, iova, n)
            else:
                op.parts[k] = p.parse_dma_read_reply(ev.payload, iova, n)
        except ProtocolError as exc:
            log.warning("protocol error: %s", exc.reason)
            self._finish_op(op, False, exc.reason)
            return
        op.remaining -= 1
        if op.remaining == 0:
            self._finish_op(op, True, "")

    def _finish_op(self, op: _DmaOp, ok: bool, reason: str) -> None:
        if op.finished:
            return
        op.finished = True
        if op.timer is not None:
            op.timer.cancel()
        # Free the request slots of parts still unanswered (timeout, error in another part): else
        # after MAX_PENDING_REQUESTS timeouts every later DMA of the connection would fail.
        conn = self._conn
        for msg_id in op.ids:
            entry = self._dma_ops.get(msg_id)
            if entry is not None and entry[0] is op:
                del self._dma_ops[msg_id]
                if conn is not None:
                    conn.forget_request(msg_id)
        op.ids = []
        if not ok:
            log.warning("message DMA %s at %#x failed: %s", "write" if op.write else "read", op.iova, reason)
            result: Any = False if op.write else None
        else:
            result = True if op.write else b"".join(op.parts)
        self._guarded(op.done, "DMA completion", result)


def serve(socket_path: str, device: VfioUserDevice, *, ready_callback: Callable[[], None] | None = None) -> None:
    """Serve ``device`` on ``socket_path`` until SIGTERM/SIGINT (the socket file is removed)."""
    server = VfioUserServer(socket_path, device, ready_callback=ready_callback)
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda _s, _f: server.stop())
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
