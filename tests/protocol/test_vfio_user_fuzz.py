"""Property tests: no input makes the parser raise anything but its own ProtocolError."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.vfio_user import protocol as p
from device.vfio_user.connection import NEED_DATA, Disconnect, VfioUserConnection

from .client import HDR

COMMANDS = st.sampled_from([int(c) for c in p.Command] + [0, 19, 0xFFFF])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_parse_message_random_bytes(data):
    with contextlib.suppress(p.ProtocolError):
        p.parse_message(data)


@settings(max_examples=600, deadline=None)
@given(COMMANDS, st.integers(0, 0x3F), st.binary(max_size=120))
def test_parse_message_valid_header_random_payload(command, flags, payload):
    data = HDR.pack(7, command, 16 + len(payload), flags & ~0x1, 0) + payload
    try:
        msg = p.parse_message(data)
    except p.ProtocolError as exc:
        assert exc.errno > 0 and exc.reason
    else:
        assert command == msg.COMMAND


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=0, max_size=64), max_size=12), st.booleans())
def test_connection_random_chunks_only_yield_events(chunks, negotiate):
    conn = VfioUserConnection()
    if negotiate:
        conn.receive_data(HDR.pack(1, 1, 16 + 4 + 3, 0, 0) + struct.pack("<HH", 0, 0) + b"{}\0")
        ev = conn.next_event()
        if isinstance(ev, p.Version):
            with contextlib.suppress(p.ProtocolError):
                conn.accept_version(ev)
    for chunk in chunks + [b""]:
        conn.receive_data(chunk)
        for _ in range(100):
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, Disconnect):
                return


@settings(max_examples=300, deadline=None)
@given(COMMANDS, st.binary(max_size=80), st.integers(0, 3))
def test_connection_ready_random_requests(command, payload, nfds):
    conn = VfioUserConnection()
    conn.receive_data(HDR.pack(1, 1, 16 + 4 + 60, 0, 0) + struct.pack("<HH", 0, 0) + b"{}" + b" " * 57 + b"\0")
    conn.accept_version(conn.next_event())
    import os

    fds = [os.eventfd(0) for _ in range(nfds)]
    conn.receive_data(HDR.pack(2, command, 16 + len(payload), 0, 0) + payload, fds)
    ev = conn.next_event()
    assert ev is not NEED_DATA
    # Whatever happened, no fd may stay open unless the event now owns it.
    owned = set()
    if isinstance(ev, p.DmaMap) and ev.fd is not None:
        owned = {ev.fd}
    elif isinstance(ev, p.SetIrqs):
        owned = set(ev.fds)
    for fd in fds:
        if fd in owned:
            os.close(fd)
        else:
            try:
                os.fstat(fd)
            except OSError:
                continue
            raise AssertionError(f"fd {fd} leaked for {ev!r}")
