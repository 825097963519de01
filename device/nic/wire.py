"""Wire backends: where the card's Ethernet frames go and come from.

Chosen by the profile's ``wire:`` section (device/profile.py, WireProfile):

- ``none``: no cable plugged in; link down, every frame sent is counted as dropped.
- ``loopback``: every frame sent comes back as a received frame (on the next loop turn).
- ``dgram``: peer of QEMU ``-netdev dgram,local.type=unix,local.path=A,remote.type=unix,remote.path=B``:
  one Ethernet frame per datagram (QEMU net/dgram.c; reference/vm-recon.md). The card binds ``path``
  (= QEMU's remote.path B) and sends to ``peer`` (= QEMU's local.path A); without ``peer`` it learns the first
  sender and answers it from then on.
- ``stream``: QEMU ``-netdev stream,addr.type=unix,addr.path=P``: a stream socket where every frame is
  preceded by its length as a 4-byte big-endian integer (QEMU net/stream_data.c
  ``net_stream_data_receive`` sends ``htonl(size)`` then the frame; net/net.c ``net_fill_rstate``
  reassembles and refuses lengths above NET_BUFSIZE). The card listens on ``path`` (QEMU with
  ``server=off``); ``mode: client`` makes the card connect to a QEMU listening on ``path`` instead.
- ``cable``: two ipsec-nic cards back to back: each binds its own ``path`` and sends datagrams to
  the other's (``peer``); same framing as ``dgram``.

``pcap: FILE`` adds a recorder (device/nic/pcap.py) to any backend: every frame sent and received.

All sockets are non-blocking and served by the device server's single loop (``ctx.add_reader``).
A frame that cannot be sent (peer absent: ECONNREFUSED/ENOENT; socket full: EAGAIN/ENOBUFS) is counted
in ``stats.tx_dropped`` and never raises into the datapath.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device.nic.pcap import PcapWriter
from device.vfio_user.device_api import DeviceContext

log = logging.getLogger(__name__)

FrameSink = Callable[[bytes], None]
LinkSink = Callable[[bool], None]

MAX_FRAME = 65535  # largest frame accepted from any wire (the RX write-back length is a u16)
# QEMU net/net.h NET_BUFSIZE (4096 + 65536): net_fill_rstate refuses longer stream frames, so we do too.
STREAM_MAX_FRAME = 4096 + 65536
RX_BURST = 64  # datagrams read per readable callback: keeps one busy wire from starving the loop
LOOPBACK_QUEUE = 1024  # frames in flight on the loopback; more are dropped (counted)
STREAM_TX_BUFFER = 4 << 20  # bytes queued towards a slow stream peer before frames are dropped
STREAM_RETRY = 1.0  # seconds between connection attempts of a stream client
# A UNIX datagram receiver queues only net.unix.max_dgram_qlen (default 10) datagrams; QEMU under TCG
# drains its -netdev dgram socket slowly, so a burst gets EAGAIN. Hold such frames, in order, like a
# NIC's TX FIFO, and retry shortly; only when this queue is full are frames dropped (counted).
DGRAM_TX_QUEUE = 512
DGRAM_RETRY = 0.0005
SOCKET_BUFFER = 1 << 20
_PEER_ABSENT = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.EDESTADDRREQ)
_BE32 = struct.Struct("!I")


@dataclass
class WireStats:
    tx_frames: int = 0  # handed to the peer
    tx_bytes: int = 0
    tx_dropped: int = 0  # could not be handed over (no peer, no room, no link)
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0  # malformed input (oversized frames, broken stream framing)


class Wire:
    """Base backend. Subclasses implement ``_send`` and, if they have sockets, open/attach/detach."""

    kind = "none"

    def __init__(self) -> None:
        self.stats = WireStats()
        self.link_up = False
        self.ctx: DeviceContext | None = None
        self._on_frame: FrameSink | None = None
        self._on_link: LinkSink | None = None

    def attach(self, ctx: DeviceContext, on_frame: FrameSink, on_link: LinkSink) -> None:
        """Start delivering received frames to ``on_frame`` (and link changes to ``on_link``)."""
        self.ctx = ctx
        self._on_frame = on_frame
        self._on_link = on_link

    def detach(self) -> None:
        """Stop delivering (the client went away); sockets stay open so paths stay valid."""
        self.ctx = None
        self._on_frame = None
        self._on_link = None

    def close(self) -> None:
        self.detach()

    def send(self, frame: bytes) -> bool:
        """Hand one Ethernet frame to the wire. False (and counted) when it could not go out."""
        if self._send(frame):
            st = self.stats
            st.tx_frames += 1
            st.tx_bytes += len(frame)
            return True
        self.stats.tx_dropped += 1
        return False

    def _send(self, frame: bytes) -> bool:
        return False

    # ----- helpers for subclasses

    def _deliver(self, frame: bytes) -> None:
        st = self.stats
        if len(frame) > MAX_FRAME:
            st.rx_errors += 1
            return
        st.rx_frames += 1
        st.rx_bytes += len(frame)
        sink = self._on_frame
        if sink is not None:
            sink(frame)

    def _set_link(self, up: bool) -> None:
        if up != self.link_up:
            self.link_up = up
            log.info("wire %s: link %s", self.kind, "up" if up else "down")
            if self._on_link is not None:
                self._on_link(up)

    def describe(self) -> str:
        return self.kind


class NoWire(Wire):
    kind = "none"


class LoopbackWire(Wire):
    """TX comes back as RX, one loop turn later (never re-entering the TX engine)."""

    kind = "loopback"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[bytes] = deque()
        self._scheduled = False

    def attach(self, ctx: DeviceContext, on_frame: FrameSink, on_link: LinkSink) -> None:
        super().attach(ctx, on_frame, on_link)
        self._set_link(True)

    def detach(self) -> None:
        self._queue.clear()
        self._scheduled = False
        super().detach()
        self.link_up = False

    def _send(self, frame: bytes) -> bool:
        if self.ctx is None or len(self._queue) >= LOOPBACK_QUEUE:
            return False
        self._queue.append(frame)
        if not self._scheduled:
            self._scheduled = True
            self.ctx.call_soon(self._drain)
        return True

    def _drain(self) -> None:
        self._scheduled = False
        queue = self._queue
        # Only what was queued before this turn: frames the RX path answers with go next turn.
        for _ in range(len(queue)):
            self._deliver(queue.popleft())


def _prepare_path(path: str) -> None:
    """Remove a stale socket file left by an earlier run; refuse to clobber anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


class DatagramWire(Wire):
    """UNIX datagram socket, one frame per datagram (QEMU -netdev dgram, or another card's cable)."""

    kind = "dgram"

    def __init__(self, path: str, peer: str | None = None, kind: str = "dgram") -> None:
        super().__init__()
        self.kind = kind
        self.path = path
        self.peer = peer
        _prepare_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            sock.setblocking(False)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        self._held: deque[bytes] = deque()  # frames the peer had no room for yet (EAGAIN), oldest first
        self._retry_timer: Any = None

    def attach(self, ctx: DeviceContext, on_frame: FrameSink, on_link: LinkSink) -> None:
        super().attach(ctx, on_frame, on_link)
        if self.sock is not None:
            ctx.add_reader(self.sock.fileno(), self._readable)
        # The link counts as up while the peer's socket exists; sends and receives refine it.
        self._set_link(self.peer is not None and _is_socket(self.peer))

    def detach(self) -> None:
        if self.ctx is not None and self.sock is not None:
            self.ctx.remove_reader(self.sock.fileno())
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self.stats.tx_dropped += len(self._held)
        self._held.clear()
        super().detach()

    def close(self) -> None:
        self.detach()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(RX_BURST):
            try:
                frame, sender = sock.recvfrom(MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("wire %s: recv failed: %s", self.kind, exc)
                return
            if self.peer is None and isinstance(sender, str) and sender:
                self.peer = sender  # learn where to answer (QEMU binds its local.path)
            if self.peer is not None:
                self._set_link(True)
            self._deliver(frame)

    def _send(self, frame: bytes) -> bool:
        sock, peer = self.sock, self.peer
        if sock is None or peer is None:
            return False
        if self._held:  # keep the order: behind the frames already waiting
            if len(self._held) >= DGRAM_TX_QUEUE:
                return False
            self._held.append(frame)
            return True
        try:
            sock.sendto(frame, peer)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS) and self.ctx is not None:
                self._held.append(frame)
                self._retry_timer = self.ctx.call_later(DGRAM_RETRY, self._retry)
                return True
            if exc.errno in _PEER_ABSENT:
                self._set_link(False)
            elif exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EMSGSIZE):
                log.debug("wire %s: send failed: %s", self.kind, exc)
            return False
        if not self.link_up:
            self._set_link(True)
        return True

    def _retry(self) -> None:
        """Send held frames until the peer's queue is full again (then retry later) or all went."""
        self._retry_timer = None
        sock, peer, held = self.sock, self.peer, self._held
        while held and sock is not None and peer is not None:
            try:
                sock.sendto(held[0], peer)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ENOBUFS) and self.ctx is not None:
                    self._retry_timer = self.ctx.call_later(DGRAM_RETRY, self._retry)
                    return
                if exc.errno in _PEER_ABSENT:
                    self._set_link(False)
                self.stats.tx_dropped += len(held)  # the peer went away: what waited is lost
                held.clear()
                return
            held.popleft()

    def describe(self) -> str:
        return f"{self.kind} {self.path} -> {self.peer or '(learned)'}"


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class StreamWire(Wire):
    """UNIX stream socket with QEMU's 4-byte big-endian length prefix per frame.

    Server (default): listen on ``path``; the newest connection wins (a restarted QEMU reconnects).
    Client: connect to ``path``, retrying every STREAM_RETRY seconds while it is absent.
    """

    kind = "stream"

    def __init__(self, path: str, server: bool = True) -> None:
        super().__init__()
        self.path = path
        self.server = server
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self._rx = bytearray()
        self._tx = bytearray()
        self._flush_timer: Any = None
        self._retry_timer: Any = None
        if server:
            _prepare_path(path)
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                lsock.bind(path)
                lsock.listen(1)
                lsock.setblocking(False)
            except OSError:
                lsock.close()
                raise
            self.listener = lsock

    def attach(self, ctx: DeviceContext, on_frame: FrameSink, on_link: LinkSink) -> None:
        super().attach(ctx, on_frame, on_link)
        if self.listener is not None:
            ctx.add_reader(self.listener.fileno(), self._accept)
        if self.conn is not None:
            ctx.add_reader(self.conn.fileno(), self._readable)
            if self._tx:  # queued before a detach cancelled the flush timer: keep draining
                self._schedule_flush()
        elif not self.server:
            self._connect()

    def detach(self) -> None:
        ctx = self.ctx
        if ctx is not None:
            if self.listener is not None:
                ctx.remove_reader(self.listener.fileno())
            if self.conn is not None:
                ctx.remove_reader(self.conn.fileno())
        for timer in (self._flush_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        self._flush_timer = self._retry_timer = None
        super().detach()

    def close(self) -> None:
        self._drop_connection()
        self.detach()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # ----- connection management

    def _accept(self) -> None:
        if self.listener is None:
            return
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        if self.conn is not None:
            log.info("wire stream: new connection on %s replaces the old one", self.path)
            self._drop_connection()
        self._use(conn)

    def _connect(self) -> None:
        self._retry_timer = None
        if self.ctx is None or self.conn is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)  # UNIX connect completes (or fails) at once
        except OSError:
            sock.close()
            self._retry_timer = self.ctx.call_later(STREAM_RETRY, self._connect)
            return
        self._use(sock)

    def _use(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.conn = conn
        self._rx.clear()
        self._tx.clear()
        if self.ctx is not None:
            self.ctx.add_reader(conn.fileno(), self._readable)
        self._set_link(True)

    def _drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.ctx is not None:
            self.ctx.remove_reader(conn.fileno())
        conn.close()
        self._rx.clear()
        self._tx.clear()
        self._set_link(False)
        if not self.server and self.ctx is not None and self._retry_timer is None:
            self._retry_timer = self.ctx.call_later(STREAM_RETRY, self._connect)

    # ----- receive

    def _readable(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            data = conn.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("wire stream: connection error: %s", exc)
            self._drop_connection()
            return
        if not data:
            log.info("wire stream: peer closed the connection")
            self._drop_connection()
            return
        buf = self._rx
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            n = _BE32.unpack_from(buf, pos)[0]
            if n > STREAM_MAX_FRAME:
                self.stats.rx_errors += 1
                log.warning("wire stream: frame length %d exceeds %d; dropping the connection", n,
                            STREAM_MAX_FRAME)
                self._drop_connection()
                return
            if end - pos - 4 < n:
                break
            frame = bytes(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
            self._deliver(frame)
            if self.conn is not conn:  # the sink reset us
                return
        del buf[:pos]

    # ----- send

    def _send(self, frame: bytes) -> bool:
        conn = self.conn
        if conn is None:
            return False
        if self._tx:
            if len(self._tx) + 4 + len(frame) > STREAM_TX_BUFFER:
                return False  # whole frames only, so the framing stays intact
            self._tx += _BE32.pack(len(frame))
            self._tx += frame
            return True
        record = _BE32.pack(len(frame)) + frame
        try:
            sent = conn.send(record)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            log.info("wire stream: send failed: %s", exc)
            self._drop_connection()
            return False
        if sent < len(record):
            self._tx += record[sent:]
            self._schedule_flush()
        return True

    def _schedule_flush(self) -> None:
        if self._flush_timer is None and self.ctx is not None:
            # No writable callback in the device API: poll briefly until the peer drains.
            self._flush_timer = self.ctx.call_later(0.001, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        conn = self.conn
        if conn is None or not self._tx:
            return
        try:
            sent = conn.send(self._tx)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            log.info("wire stream: send failed: %s", exc)
            self._drop_connection()
            return
        del self._tx[:sent]
        if self._tx:
            self._schedule_flush()

    def describe(self) -> str:
        return f"stream {'listening on' if self.server else 'connecting to'} {self.path}"


class PcapTap(Wire):
    """Records every frame sent and received on ``inner`` to a pcap file."""

    def __init__(self, inner: Wire, pcap: PcapWriter) -> None:
        super().__init__()
        self.inner = inner
        self.pcap = pcap
        self.kind = inner.kind
        self.stats = inner.stats

    @property  # type: ignore[override]
    def link_up(self) -> bool:
        return self.inner.link_up

    @link_up.setter
    def link_up(self, value: bool) -> None:  # the base __init__ assigns it; the inner wire owns it
        pass

    def attach(self, ctx: DeviceContext, on_frame: FrameSink, on_link: LinkSink) -> None:
        self.ctx = ctx
        write = self.pcap.write

        def received(frame: bytes) -> None:
            write(frame)
            on_frame(frame)

        self.inner.attach(ctx, received, on_link)

    def detach(self) -> None:
        self.inner.detach()
        self.ctx = None

    def close(self) -> None:
        self.inner.close()
        self.pcap.close()

    def send(self, frame: bytes) -> bool:
        self.pcap.write(frame)
        return self.inner.send(frame)

    def describe(self) -> str:
        return f"{self.inner.describe()} + pcap {self.pcap.path}"


def build_wire(kind: str = "none", path: str | None = None, peer: str | None = None,
               pcap: str | None = None, mode: str | None = None) -> Wire:
    """The backend a profile's ``wire:`` section asks for. Raises ValueError/OSError with the path."""
    wire: Wire
    if kind == "none":
        wire = NoWire()
    elif kind == "loopback":
        wire = LoopbackWire()
    elif kind in ("dgram", "cable"):
        if not path:
            raise ValueError(f"wire.path: a {kind} wire needs a socket path")
        if kind == "cable" and not peer:
            raise ValueError("wire.peer: a cable needs the other card's socket path")
        wire = DatagramWire(path, peer, kind)
    elif kind == "stream":
        if not path:
            raise ValueError("wire.path: a stream wire needs a socket path")
        if mode not in (None, "server", "client"):
            raise ValueError(f"wire.mode: for a stream wire use 'server' or 'client', got {mode!r}")
        wire = StreamWire(path, server=mode != "client")
    else:
        raise ValueError(f"wire.type: unknown backend {kind!r}")
    if pcap:
        try:
            writer = PcapWriter(pcap)
        except OSError:
            wire.close()
            raise
        wire = PcapTap(wire, writer)
    return wire


def wire_from_profile(section: Any) -> Wire:
    """Build from a device.profile.WireProfile (or anything with type/path/peer/pcap/mode attributes)."""
    return build_wire(section.type, section.path, section.peer, section.pcap, getattr(section, "mode", None))
