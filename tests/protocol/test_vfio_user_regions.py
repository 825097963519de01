"""REGION_READ / REGION_WRITE, including posted writes that must never be answered."""

from __future__ import annotations

import struct

from .client import F_NO_REPLY, REGION_READ, REGION_WRITE, REGION_WRITE_MULTI
from .fake_device import SCRATCH


def test_scratch_register_round_trip(client):
    client.write32(0, SCRATCH, 0xDEADBEEF)
    assert client.read32(0, SCRATCH) == 0xDEADBEEF


def test_write_reply_echoes_offset_region_count(client):
    m = client.region_write(0, SCRATCH, b"\x01\x02\x03\x04")
    assert m.size == 32 and struct.unpack("<QII", m.payload) == (SCRATCH, 0, 4)


def test_posted_writes_get_no_reply(client, device):
    for i in range(50):
        client.write32(0, SCRATCH, i, posted=True)
    client.expect_nothing(0.3)
    assert client.read32(0, SCRATCH) == 49  # processed, in order
    assert [w[1:] for w in device.writes[-50:]] == [(SCRATCH, struct.pack("<I", i)) for i in range(50)]


def test_config_space_read_whole(client):
    data = client.region_read(7, 0, 256)
    assert struct.unpack_from("<HH", data) == (0x1AF4, 0x10FF)


def test_out_of_range_accesses_are_einval(client):
    for region, offset, count in ((0, 4094, 4), (0, 4096, 1), (1, 0, 4), (9, 0, 4), (7, 0, 257)):
        m = client.request(REGION_READ, struct.pack("<QII", offset, region, count))
        assert m.is_error and m.error == 22 and m.size == 16, (region, offset, count)
    m = client.request(REGION_WRITE, struct.pack("<QII", 4094, 0, 4) + b"abcd")
    assert m.is_error and m.error == 22


def test_posted_bad_write_is_silent_and_connection_survives(client):
    client.send(REGION_WRITE, struct.pack("<QII", 1 << 40, 0, 4) + b"abcd", flags=F_NO_REPLY)
    client.expect_nothing(0.2)
    assert client.read32(0, SCRATCH) == 0


def test_count_larger_than_max_data_xfer_is_einval(client):
    m = client.request(REGION_READ, struct.pack("<QII", 0, 0, (1 << 20) + 1))
    assert m.is_error and m.error == 22


def test_write_multi(client):
    # QEMU's VFIOUserWRMulti: u64 wr_cnt, then {u64 offset, u32 region, u32 count, u8 data[8]}.
    entries = [(SCRATCH, 0, 4, struct.pack("<I", 7) + bytes(4)), (0x20, 0, 2, b"\xaa\xbb" + bytes(6))]
    payload = struct.pack("<Q", len(entries)) + b"".join(struct.pack("<QII8s", *e) for e in entries)
    client.send(REGION_WRITE_MULTI, payload, flags=F_NO_REPLY)
    client.expect_nothing(0.2)
    assert client.read32(0, SCRATCH) == 7
    assert client.region_read(0, 0x20, 2) == b"\xaa\xbb"


def test_pipelined_requests_answered_in_order(client):
    ids = [client.send(REGION_READ, struct.pack("<QII", SCRATCH, 0, 4)) for _ in range(20)]
    got = [client.recv().msg_id for _ in ids]
    assert got == ids
