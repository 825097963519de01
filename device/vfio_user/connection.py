"""Sans-I/O vfio-user server connection: bytes and fds in, events out, reply bytes back.

Shaped after h11: :meth:`VfioUserConnection.receive_data` buffers what the socket delivered,
:meth:`VfioUserConnection.next_event` returns one event at a time (a request message from
``protocol``, a :class:`ClientReply`, a :class:`BadRequest` that must be answered with an error,
a :class:`Disconnect`, or :data:`NEED_DATA`). Nothing here touches a socket, so every malformed
input can be tested with plain bytes.

State machine (spec "Version"): the first request must be VERSION; until the server accepts it
(:meth:`accept_version`) only VERSION is legal. A framing error or EOF closes the connection for
good; later calls raise ProtocolError.

fd ownership: fds passed to receive_data are owned by the connection until an event hands them on
(DmaMap.fd, SetIrqs.fds); fds that arrive with any other message are closed here.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import protocol as p
from .protocol import Command, ProtocolError


class State(Enum):
    AWAIT_VERSION = "await-version"
    READY = "ready"
    CLOSED = "closed"


class Transition(Enum):
    VERSION_ACCEPTED = "version accepted"
    CLOSE = "close"


# Which requests each state accepts (anything else known -> EINVAL, unknown -> ENOSYS) and how
# the state moves. VERSION once, first (spec "Version": "the first message ... must be VERSION").
ALLOWED_REQUESTS: dict[State, frozenset[int]] = {
    State.AWAIT_VERSION: frozenset({Command.VERSION}),
    State.READY: frozenset(p.REQUEST_PARSERS) - {Command.VERSION},
    State.CLOSED: frozenset(),
}
TRANSITIONS: dict[State, dict[Transition, State]] = {
    State.AWAIT_VERSION: {Transition.VERSION_ACCEPTED: State.READY, Transition.CLOSE: State.CLOSED},
    State.READY: {Transition.CLOSE: State.CLOSED},
    State.CLOSED: {},
}

# Server->client requests in flight at once (message DMA). QEMU answers them in order from its
# main loop; a bound keeps a runaway device from queueing unbounded memory.
MAX_PENDING_REQUESTS = 1024
# fds held for messages that have not fully arrived. A sender writes each message with its fds in
# one sendmsg and Linux ends a recvmsg after the segment that carries fds, so legitimately only the
# one message still arriving holds fds (<= MAX_MSG_FDS). The slack covers a few chunks received
# before they are parsed; a client that keeps sending fds on a message it never completes is
# disconnected at this bound instead of filling our fd table (up to RLIMIT_NOFILE).
MAX_HELD_FDS = 4 * p.MAX_MSG_FDS


class NeedData(Enum):
    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA

_HOT = p.HEADER_REGION_RW
# take_mmio: the layout a chunk of this many bytes has if it is one REGION_READ (32) or one REGION_WRITE of
# 1, 2, 4 or 8 bytes (header + offset/region/count + the data as an integer).
_MMIO_LAYOUTS = {p.HEADER_REGION_RW.size: p.HEADER_REGION_RW,
                 **{s.size: s for s in p.HEADER_REGION_RW_VALUE.values()}}
_REGION_READ = int(Command.REGION_READ)
_REGION_WRITE = int(Command.REGION_WRITE)
_TYPE_MASK, _TYPE_COMMAND, _MAX_XFER = p.FLAG_TYPE_MASK, p.TYPE_COMMAND, p.MAX_DATA_XFER_SIZE
# Drop consumed bytes once this much has been read from a pipelined backlog (posted writes).
_COMPACT_AT = 1 << 20


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request that must be refused with ``errno`` (no reply if ``no_reply``)."""

    msg_id: int
    command: int
    no_reply: bool
    errno: int
    reason: str


@dataclass(frozen=True, slots=True)
class ClientReply:
    """The client's answer to one of our requests. ``error`` is 0 or a positive errno."""

    msg_id: int
    command: int
    error: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class IgnoredReply:
    """A reply that matches nothing we sent; it is dropped (logged by the server)."""

    msg_id: int
    command: int
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The stream is over (EOF or broken beyond repair): drop the client."""

    reason: str


def _close_fds(fds: Any) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class VfioUserConnection:
    """The server side of one vfio-user client connection, without I/O."""

    def __init__(self) -> None:
        self.state = State.AWAIT_VERSION
        self._hot = False  # READY: the MMIO fast path in next_event applies
        self._buf = bytearray()
        self._pos = 0  # start of the next unread message in _buf
        self._base = 0  # stream offset of _buf[0]
        self._received = 0  # stream offset just past the last byte received
        self._eof = False
        # (stream offset where the delivering chunk ended, fds, truncated). Linux ends a
        # recvmsg() right after a segment that carries fds, and a sender writes each message
        # with its fds in one sendmsg (QEMU: one writev), so fds belong to the message holding
        # the last byte of the chunk they came with.
        self._fd_marks: deque[tuple[int, tuple[int, ...], bool]] = deque()
        self._held_fds = 0  # fds in _fd_marks (bounded by MAX_HELD_FDS)
        self._overflow: str | None = None  # set when a bound was exceeded: next_event disconnects
        self._pending: dict[int, int] = {}  # our request id -> command
        self._next_id = 0
        self.closed_reason: str | None = None
        # Negotiated at VERSION.
        self.client_max_data_xfer_size = p.DEFAULT_CLIENT_DATA_XFER_SIZE
        self.client_max_msg_fds = 1
        self.client_capabilities: dict[str, Any] = {}

    # ---------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Any = (), fds_truncated: bool = False) -> None:
        """Feed bytes (and the fds received with them). ``b""`` means EOF."""
        if self.state is State.CLOSED:
            _close_fds(fds)
            raise ProtocolError(f"connection is closed ({self.closed_reason})")
        if not data:
            _close_fds(fds)
            self._eof = True
            return
        if self._overflow is not None:
            _close_fds(fds)
            return
        self._buf += data
        self._received += len(data)
        if fds or fds_truncated:
            fds = tuple(fds)
            if self._held_fds + len(fds) > MAX_HELD_FDS:
                _close_fds(fds)
                self._overflow = (f"more than {MAX_HELD_FDS} fds sent on messages that have not arrived "
                                  "completely")
                self._hot = False  # next_event's general path reports the overflow
                return
            self._held_fds += len(fds)
            self._fd_marks.append((self._received, fds, fds_truncated))

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_event(self) -> Any:
        """Return the next event, or NEED_DATA. Raises ProtocolError once closed."""
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if not self._hot:
            if self.state is State.CLOSED:
                raise ProtocolError(f"connection is closed ({self.closed_reason})")
            if self._overflow is not None:
                return self._disconnect(self._overflow)
        elif avail == 0 and not self._eof:
            return NEED_DATA
        # Hot path: MMIO reads and posted/plain writes once negotiated. One unpack covers header
        # and (offset, region, count); no fds, exact layouts, else the general path decides.
        if self._hot and avail >= 32 and not self._fd_marks:
            msg_id, command, size, flags, _err, offset, region, count = _HOT.unpack_from(buf, pos)
            ev: Any = None
            if flags & 0xF == p.TYPE_COMMAND and count <= p.MAX_DATA_XFER_SIZE:
                if command == 9 and size == 32:
                    ev = p.RegionRead(msg_id, flags & p.FLAG_NO_REPLY != 0, region, offset, count)
                elif command == 10 and size == 32 + count and size <= avail:
                    ev = p.RegionWrite(msg_id, flags & p.FLAG_NO_REPLY != 0, region, offset,
                                       bytes(buf[pos + 32 : pos + size]))
            if ev is not None:
                self._consume(pos + size)
                return ev
        if avail < p.HEADER_SIZE:
            if self._eof:
                return self._disconnect(
                    "client closed the connection" + (f" mid-header ({avail} bytes)" if avail else "")
                )
            return NEED_DATA
        msg_id, command, size, flags, error = p.HEADER.unpack_from(buf, pos)
        mtype = flags & p.FLAG_TYPE_MASK
        if size < p.HEADER_SIZE or size > p.MAX_MESSAGE_SIZE or mtype > p.TYPE_REPLY:
            try:
                p.check_header(p.Header(msg_id, command, size, flags, error))
            except ProtocolError as exc:
                return self._disconnect(f"framing error: {exc.reason}")
        if avail < size:
            if self._eof:
                return self._disconnect(f"client closed the connection mid-message ({avail} of {size} bytes)")
            return NEED_DATA
        stream_start = self._base + pos
        end = pos + size
        body = bytes(buf[pos + p.HEADER_SIZE : end]) if size > p.HEADER_SIZE else b""
        self._consume(end)
        fds: tuple[int, ...] = ()
        truncated = False
        if self._fd_marks:
            fds, truncated = self._take_fds(stream_start, stream_start + size)
        no_reply = bool(flags & p.FLAG_NO_REPLY)

        if mtype == p.TYPE_REPLY:
            _close_fds(fds)
            return self._on_reply(msg_id, command, flags, error, body)

        if truncated:
            _close_fds(fds)
            return BadRequest(msg_id, command, no_reply, errno.EINVAL,
                              f"more than {p.MAX_MSG_FDS} fds attached (ancillary data truncated)")
        if command not in p.REQUEST_PARSERS:
            _close_fds(fds)
            return BadRequest(msg_id, command, no_reply, errno.ENOSYS, f"unsupported {p.command_name(command)}")
        if command not in ALLOWED_REQUESTS[self.state]:
            _close_fds(fds)
            why = "VERSION must come first" if self.state is State.AWAIT_VERSION else "VERSION was already negotiated"
            return BadRequest(msg_id, command, no_reply, errno.EINVAL,
                              f"{p.command_name(command)} not allowed in state {self.state.value}: {why}")
        hdr = p.Header(msg_id, command, size, flags, error)
        try:
            msg = p.parse_request(hdr, body, fds)
        except ProtocolError as exc:
            _close_fds(fds)
            return BadRequest(msg_id, command, no_reply, exc.errno, exc.reason)
        except Exception as exc:  # a parser bug: refuse this message, keep the connection
            _close_fds(fds)
            return BadRequest(msg_id, command, no_reply, errno.EINVAL,
                              f"cannot decode {p.command_name(command)}: {type(exc).__name__}")
        if command == Command.VERSION and msg.major != p.VERSION_MAJOR:
            return BadRequest(msg_id, command, no_reply, errno.ENOTSUP,
                              f"unsupported protocol version {msg.major}.{msg.minor} (we speak 0.0)")
        return msg

    def take_mmio(self, buf: bytes | bytearray | memoryview, n: int) -> tuple[int, ...] | None:
        """The server loop's entry for the commonest chunk: ``buf[:n]`` arrived in one receive, without fds.

        If it is exactly one REGION_READ, or one REGION_WRITE of 1, 2, 4 or 8 bytes, and ``next_event`` would
        hand it out now as that request (READY, nothing buffered before it, no fds pending, no EOF), the chunk
        counts as received and consumed and its fields come back as one tuple: ``(msg_id, command, size,
        flags, error, offset, region, count)``, plus the data as a little-endian integer for a write. The
        acceptance rules are those of ``next_event``'s hot path, so a message is the same request whichever
        entry reads it. Anything else returns None with nothing changed: the caller then feeds the chunk to
        ``receive_data`` and the general path decides (errors, framing, fds, partial or several messages).
        Whether the region and offset are valid is the caller's check, as for the events.
        """
        layout = _MMIO_LAYOUTS.get(n)
        if layout is None or not self._hot or self._buf or self._fd_marks or self._eof:
            return None
        m = layout.unpack_from(buf)
        # m[1] command, m[2] size, m[3] flags, m[7] count
        if m[2] != n or m[3] & _TYPE_MASK != _TYPE_COMMAND:
            return None
        if n == 32:
            if m[1] != _REGION_READ or m[7] > _MAX_XFER:
                return None
        elif m[1] != _REGION_WRITE or m[7] != n - 32:
            return None
        self._received += n
        self._base += n
        return m

    def _consume(self, end: int) -> None:
        """``_buf[:end]`` has been read: advance past it, recycling the buffer when possible."""
        buf = self._buf
        if end == len(buf):  # common case: everything consumed
            buf.clear()
            self._base += end
            self._pos = 0
        elif end > _COMPACT_AT:  # a long pipelined backlog: drop what was read
            del buf[:end]
            self._base += end
            self._pos = 0
        else:
            self._pos = end

    def _take_fds(self, stream_start: int, stream_end: int) -> tuple[tuple[int, ...], bool]:
        """fds of the chunks whose last byte lies in the message [stream_start, stream_end)."""
        fds: list[int] = []
        truncated = False
        marks = self._fd_marks
        while marks and marks[0][0] <= stream_end:
            chunk_end, chunk_fds, chunk_trunc = marks.popleft()
            self._held_fds -= len(chunk_fds)
            if chunk_end > stream_start:
                fds.extend(chunk_fds)
                truncated = truncated or chunk_trunc
            else:  # cannot happen with in-order parsing; never leak
                _close_fds(chunk_fds)
        if len(fds) > p.MAX_MSG_FDS:  # several chunks of one message each brought fds
            truncated = True
        return tuple(fds), truncated

    def _on_reply(self, msg_id: int, command: int, flags: int, error: int, body: bytes) -> Any:
        expected = self._pending.get(msg_id)
        if expected is None:
            return IgnoredReply(msg_id, command, f"reply to unknown request id {msg_id}")
        if expected != command:
            return IgnoredReply(msg_id, command,
                                f"reply for {p.command_name(command)} to our {p.command_name(expected)} id {msg_id}")
        del self._pending[msg_id]
        err = (error or errno.EIO) if flags & p.FLAG_ERROR else 0
        return ClientReply(msg_id, command, err, body)

    # ---------------------------------------------------------------- transitions

    def _transition(self, what: Transition) -> None:
        nxt = TRANSITIONS[self.state].get(what)
        if nxt is None:
            raise ProtocolError(f"{what.value} is not allowed in state {self.state.value}")
        self.state = nxt
        self._hot = nxt is State.READY

    def _disconnect(self, reason: str) -> Disconnect:
        self.close(reason)
        return Disconnect(reason)

    def close(self, reason: str = "closed by server") -> None:
        """Release everything the connection still owns (buffered fds)."""
        if self.state is not State.CLOSED:
            self._transition(Transition.CLOSE)
            self.closed_reason = reason
        while self._fd_marks:
            _close_fds(self._fd_marks.popleft()[1])
        self._held_fds = 0
        self._buf = bytearray()
        self._pos = 0
        self._pending.clear()

    # ---------------------------------------------------------------- output

    def accept_version(self, msg: p.Version) -> bytes:
        """Accept the client's VERSION and return our reply (never longer than the request)."""
        if self.state is not State.AWAIT_VERSION:
            raise ProtocolError(f"VERSION is not expected in state {self.state.value}")
        reply = p.build_version_reply(msg.msg_id, msg.request_size)  # may raise: state unchanged
        self.client_capabilities = dict(msg.capabilities)
        self.client_max_data_xfer_size = msg.client_max_data_xfer_size
        self.client_max_msg_fds = msg.client_max_msg_fds
        self._transition(Transition.VERSION_ACCEPTED)
        return b"" if msg.no_reply else reply

    @staticmethod
    def reply(msg: Any, data: bytes) -> bytes:
        """``data`` unless the request was NO_REPLY: such messages are never answered."""
        return b"" if msg.no_reply else data

    @staticmethod
    def error_reply(msg: Any, err: int) -> bytes:
        """Header-only error reply to a request or BadRequest (nothing if it was NO_REPLY)."""
        if msg.no_reply:
            return b""
        command = msg.command if isinstance(msg, BadRequest) else msg.COMMAND
        return p.build_error_reply(msg.msg_id, command, err)

    @property
    def max_dma_chunk(self) -> int:
        """Largest data size of one DMA_READ/DMA_WRITE we may send."""
        return max(1, min(self.client_max_data_xfer_size, p.MAX_DATA_XFER_SIZE))

    def start_request(self, command: Command, iova: int, data_or_count: bytes | int) -> tuple[int, bytes]:
        """Allocate an id and build a server->client DMA_READ/DMA_WRITE request."""
        if self.state is not State.READY:
            raise ProtocolError(f"cannot send requests in state {self.state.value}", errno.ENOTCONN)
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            raise ProtocolError("too many requests in flight", errno.EAGAIN)
        msg_id = self._next_id
        while msg_id in self._pending:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_id = (msg_id + 1) & 0xFFFF
        if command == Command.DMA_READ:
            assert isinstance(data_or_count, int)
            out = p.build_dma_read_request(msg_id, iova, data_or_count)
        elif command == Command.DMA_WRITE:
            assert not isinstance(data_or_count, int)
            out = p.build_dma_write_request(msg_id, iova, data_or_count)
        else:
            raise ProtocolError(f"server cannot send {p.command_name(command)}", errno.EINVAL)
        self._pending[msg_id] = command
        return msg_id, out

    def forget_request(self, msg_id: int) -> None:
        """Give up on one of our requests (timed out): its slot is free again, and a late reply is
        ignored. Ids advance through all 65,536 values before one is reused, so a late reply cannot
        be taken for the answer to a newer request unless 64 Ki requests were sent in between."""
        self._pending.pop(msg_id, None)
