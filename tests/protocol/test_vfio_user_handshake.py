"""VERSION negotiation (spec "Version"; QEMU proxy.c vfio_user_validate_version)."""

from __future__ import annotations

import json
import struct

from .client import GET_INFO, QEMU_CAPS, VERSION


def _caps(reply) -> dict:
    major, minor = struct.unpack_from("<HH", reply.payload)
    assert (major, minor) == (0, 0)
    text = reply.payload[4:]
    assert text.endswith(b"\0"), "QEMU rejects a reply without the NUL ('corrupt version reply')"
    return json.loads(text[:-1])


def test_version_reply_like_qemu_expects(connect):
    c = connect()
    request = json.dumps(QEMU_CAPS).encode() + b"\0"
    msg_id = c.send(VERSION, struct.pack("<HH", 0, 0) + request)
    reply = c.wait_reply(msg_id)
    assert reply.flags == 0x1 and reply.error == 0
    assert reply.size <= 16 + 4 + len(request), "QEMU sizes its reply buffer by the request"
    caps = _caps(reply)["capabilities"]
    # What QEMU's caps_check accepts.
    assert isinstance(caps["max_msg_fds"], int) and 1 <= caps["max_msg_fds"] <= 16
    assert 4096 <= caps["max_data_xfer_size"] <= 64 << 20
    assert caps.get("pgsizes", 4096) % 4096 == 0
    assert "twin_socket" not in caps


def test_version_reply_shrinks_to_fit_small_request(connect):
    c = connect()
    small = b'{"capabilities":{"max_msg_fds":8}}\0'
    reply = c.request(VERSION, struct.pack("<HH", 0, 0) + small)
    assert not reply.is_error
    assert reply.size <= 16 + 4 + len(small)
    _caps(reply)  # still a valid document
    # And the connection is usable.
    assert c.get_info()[2] == 9


def test_request_before_version_is_refused_then_version_works(connect):
    c = connect()
    m = c.request(GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
    assert m.flags == 0x21 and m.error == 22 and m.size == 16  # EINVAL, header-only error reply
    assert not c.negotiate().is_error
    assert c.get_info()[1] & 2  # PCI


def test_bad_major_version_gets_error_and_retry_succeeds(connect):
    c = connect()
    m = c.negotiate(major=1)
    assert m.is_error and m.flags == 0x21 and m.error > 0 and m.size == 16
    assert not c.negotiate().is_error


def test_second_version_is_refused(client):
    m = client.negotiate()
    assert m.is_error and m.error == 22


def test_bad_json_is_refused(connect):
    c = connect()
    for bad in (b"{not json\0", b"[1,2]\0", b'{"capabilities": 5}\0', b'{"capabilities":{"max_data_xfer_size":-1}}\0'):
        m = c.request(VERSION, struct.pack("<HH", 0, 0) + bad)
        assert m.is_error and m.error == 22, bad
    assert not c.negotiate().is_error


def test_version_without_json_is_accepted_with_defaults(connect):
    c = connect()
    # 16-byte header + 4 + 60 bytes of padding-free room; just a NUL-terminated empty object.
    text = b"{}" + b" " * 60 + b"\0"
    m = c.request(VERSION, struct.pack("<HH", 0, 0) + text)
    assert not m.is_error
    assert m.size <= 16 + 4 + len(text)


def test_version_request_too_small_for_any_reply(connect):
    c = connect()
    m = c.request(VERSION, struct.pack("<HH", 0, 0) + b"{}\0")  # 23 bytes: no valid reply fits
    assert m.is_error and m.size == 16
    assert not c.negotiate().is_error
