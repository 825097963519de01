"""Malformed input over a real socket: error reply or clean disconnect, then keep serving."""

from __future__ import annotations

import os
import struct

import pytest

from .client import (
    DEVICE_RESET,
    DMA_MAP,
    F_NO_REPLY,
    GET_INFO,
    HDR,
    REGION_READ,
    VfioUserClient,
)
from .conftest import wait_for
from .fake_device import SCRATCH
from .helpers import open_fds


def _still_serving(connect) -> None:
    c = connect()
    assert not c.negotiate().is_error
    assert c.get_info()[2] == 9


@pytest.mark.parametrize(
    "raw",
    [
        HDR.pack(1, GET_INFO, 8, 0, 0),  # size smaller than the header
        HDR.pack(1, GET_INFO, 0xFFFFFFFF, 0, 0),  # size beyond any limit
        HDR.pack(1, GET_INFO, 32, 0x5, 0) + bytes(16),  # message type 5
        b"\xff" * 64,  # garbage
    ],
    ids=["size-too-small", "size-too-big", "bad-type", "garbage"],
)
def test_framing_errors_disconnect_cleanly(client, connect, device, raw):
    client.send_raw(raw)
    client.expect_closed()
    wait_for(lambda: device.detach_count == 1)
    _still_serving(connect)


def test_truncated_header_then_close(connect, device):
    c = connect()
    assert not c.negotiate().is_error
    c.send_raw(HDR.pack(1, GET_INFO, 32, 0, 0)[:10])
    c.close()
    wait_for(lambda: device.detach_count == 1)
    _still_serving(connect)


def test_size_lie_then_close_mid_message(connect, device):
    c = connect()
    assert not c.negotiate().is_error
    c.send_raw(HDR.pack(1, REGION_READ, 32, 0, 0) + b"\0" * 4)  # promises 16 more bytes, sends 4
    c.close()
    wait_for(lambda: device.detach_count == 1)
    _still_serving(connect)


def test_unknown_command_is_enosys(client):
    for command in (0, 14, 99, 0xFFFF, 11):  # 11 = DMA_READ is server->client only
        m = client.request(command, b"12345678")
        assert m.is_error and m.error == 38 and m.flags == 0x21, command  # ENOSYS
    assert client.read32(0, SCRATCH) == 0


def test_unknown_command_with_no_reply_is_silent(client):
    client.send(99, b"x", flags=F_NO_REPLY)
    client.expect_nothing(0.2)
    assert client.read32(0, SCRATCH) == 0


@pytest.mark.parametrize(
    "command,payload",
    [
        (REGION_READ, struct.pack("<QII", 0, 0, 4)[:12]),  # short
        (REGION_READ, struct.pack("<QII", 0, 0, 4) + b"x"),  # long
        (10, struct.pack("<QII", 0, 0, 8) + b"abcd"),  # REGION_WRITE count lies
        (GET_INFO, b"\x01"),  # shorter than argsz
        (GET_INFO, struct.pack("<IIII", 8, 0, 0, 0)),  # argsz too small
        (DMA_MAP, struct.pack("<IIQQQ", 32, 0x80, 0, 0x1000, 0x1000)),  # unknown flag
        (DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x1000, 0)),  # size 0
        (3, struct.pack("<IIQQ", 24, 1, 0, 0x1000)),  # DMA_UNMAP dirty bitmap
        (8, struct.pack("<IIIII", 20, 0x24, 2, 0, 1) + b"x"),  # SET_IRQS trailing bytes
        (DEVICE_RESET, b"junk"),
        (16, struct.pack("<II", 12, 0)),  # DEVICE_FEATURE: nothing supported
    ],
)
def test_bad_payloads_get_error_replies(client, command, payload):
    m = client.request(command, payload)
    assert m.is_error and m.flags == 0x21 and m.size == 16 and m.error > 0
    assert client.read32(0, SCRATCH) == 0  # still in sync


def test_fds_on_commands_that_take_none_are_closed(client):
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(3)]
    try:
        m = client.request(REGION_READ, struct.pack("<QII", 0, 0, 4), fds)
        assert m.is_error and m.error == 22
        m = client.request(DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x1000, 0x1000), fds[:2])  # 2 fds
        assert m.is_error and m.error == 22
    finally:
        for fd in fds:
            os.close(fd)
    wait_for(lambda: open_fds() <= before)
    assert client.read32(0, SCRATCH) == 0


def test_too_many_fds_is_refused(client):
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(20)]  # more than max_msg_fds (16): MSG_CTRUNC
    try:
        m = client.request(8, struct.pack("<IIIII", 20, 0x24, 2, 0, 20), fds)
        assert m.is_error and m.error == 22
    finally:
        for fd in fds:
            os.close(fd)
    wait_for(lambda: open_fds() <= before)
    assert client.read32(0, SCRATCH) == 0


def test_stray_reply_is_ignored(client):
    client.send_raw(HDR.pack(0x4242, 11, 16, 0x1, 0))  # reply to a DMA_READ we never sent
    assert client.read32(0, SCRATCH) == 0


def test_garbage_after_version_then_new_client(client, connect, device):
    client.send_raw(os.urandom(3) + b"\xff" * 61)
    with pytest.raises((ConnectionError, OSError, AssertionError)):
        # Either an error reply then close, or a close: it must not hang or answer normally.
        while True:
            m = client.recv(timeout=2)
            assert m.is_error
    wait_for(lambda: device.detach_count == 1)
    c2 = VfioUserClient(client.sock.getpeername())
    try:
        assert not c2.negotiate().is_error
    finally:
        c2.close()
