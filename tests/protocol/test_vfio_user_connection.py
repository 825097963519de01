"""The sans-I/O connection on its own: byte-level framing, fd association, state machine."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest

from device.vfio_user import protocol as p
from device.vfio_user.connection import (
    NEED_DATA,
    BadRequest,
    ClientReply,
    Disconnect,
    IgnoredReply,
    State,
    VfioUserConnection,
)

from .client import HDR, QEMU_CAPS


def _msg(msg_id: int, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HDR.pack(msg_id, command, 16 + len(payload), flags, 0) + payload


VERSION_MSG = _msg(1, 1, struct.pack("<HH", 0, 0) + json.dumps(QEMU_CAPS).encode() + b"\0")


def _ready() -> VfioUserConnection:
    conn = VfioUserConnection()
    conn.receive_data(VERSION_MSG)
    ev = conn.next_event()
    assert isinstance(ev, p.Version)
    reply = conn.accept_version(ev)
    assert len(reply) <= len(VERSION_MSG)
    assert conn.state is State.READY
    return conn


def test_byte_by_byte_and_batched_input_give_the_same_events():
    stream = b"".join(_msg(10 + i, 9, struct.pack("<QII", 4 * i, 0, 4)) for i in range(5))
    a = _ready()
    got_a = []
    for b in stream:
        a.receive_data(bytes([b]))
        ev = a.next_event()
        if ev is not NEED_DATA:
            got_a.append(ev)
    b_conn = _ready()
    b_conn.receive_data(stream)
    got_b = []
    while (ev := b_conn.next_event()) is not NEED_DATA:
        got_b.append(ev)
    assert got_a == got_b == [p.RegionRead(10 + i, False, 0, 4 * i, 4) for i in range(5)]


def test_fds_go_to_the_message_holding_the_chunk_end():
    conn = _ready()
    r, w = os.pipe()
    posted = _msg(2, 10, struct.pack("<QII", 0, 0, 4) + b"abcd", p.FLAG_NO_REPLY)
    dma_map = _msg(3, 2, struct.pack("<IIQQQ", 32, 3, 0, 0x1000, 0x1000))
    conn.receive_data(posted + dma_map, [r])  # like one recvmsg over two sendmsg()s
    first, second = conn.next_event(), conn.next_event()
    assert isinstance(first, p.RegionWrite) and first.no_reply
    assert isinstance(second, p.DmaMap) and second.fd == r
    os.close(r)
    os.close(w)


def test_fds_on_wrong_message_are_closed():
    conn = _ready()
    r, w = os.pipe()
    conn.receive_data(_msg(2, 4, struct.pack("<IIII", 16, 0, 0, 0)), [r])
    ev = conn.next_event()
    assert isinstance(ev, BadRequest) and ev.errno == errno.EINVAL
    with pytest.raises(OSError):
        os.fstat(r)  # closed by the connection
    os.close(w)


def test_version_first_state_table():
    conn = VfioUserConnection()
    conn.receive_data(_msg(5, 9, struct.pack("<QII", 0, 0, 4)))
    ev = conn.next_event()
    assert isinstance(ev, BadRequest) and ev.errno == errno.EINVAL and "VERSION must come first" in ev.reason
    assert conn.state is State.AWAIT_VERSION
    conn.receive_data(VERSION_MSG)
    conn.accept_version(conn.next_event())
    conn.receive_data(VERSION_MSG)
    ev = conn.next_event()
    assert isinstance(ev, BadRequest) and "already" in ev.reason


def test_eof_mid_message_and_closed_connection():
    conn = _ready()
    conn.receive_data(_msg(7, 9, struct.pack("<QII", 0, 0, 4))[:20])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, Disconnect) and "mid-message" in ev.reason
    assert conn.state is State.CLOSED
    with pytest.raises(p.ProtocolError):
        conn.next_event()
    with pytest.raises(p.ProtocolError):
        conn.receive_data(b"more")


def test_replies_are_matched_by_id():
    conn = _ready()
    msg_id, out = conn.start_request(p.Command.DMA_READ, 0x1000, 8)
    assert HDR.unpack_from(out) == (msg_id, 11, 32, 0, 0)
    assert struct.unpack_from("<QQ", out, 16) == (0x1000, 8)
    conn.receive_data(HDR.pack(msg_id + 1, 11, 16, 1, 0))
    assert isinstance(conn.next_event(), IgnoredReply)
    reply = HDR.pack(msg_id, 11, 40, 1, 0) + struct.pack("<QQ", 0x1000, 8) + b"12345678"
    conn.receive_data(reply)
    ev = conn.next_event()
    assert isinstance(ev, ClientReply) and ev.error == 0
    assert p.parse_dma_read_reply(ev.payload, 0x1000, 8) == b"12345678"
    assert conn.pending_requests == 0


def test_no_reply_requests_produce_no_reply_bytes():
    conn = _ready()
    conn.receive_data(_msg(9, 99, b"", p.FLAG_NO_REPLY))
    ev = conn.next_event()
    assert isinstance(ev, BadRequest) and ev.errno == errno.ENOSYS
    assert conn.error_reply(ev, ev.errno) == b""
    conn.receive_data(_msg(10, 99))
    ev = conn.next_event()
    assert conn.error_reply(ev, ev.errno) == HDR.pack(10, 99, 16, 0x21, errno.ENOSYS)


def test_error_reply_errno_is_positive():
    assert HDR.unpack(p.build_error_reply(1, 9, -errno.EFAULT)) == (1, 9, 16, 0x21, errno.EFAULT)
