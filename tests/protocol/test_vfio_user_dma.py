"""DMA_MAP/DMA_UNMAP with a real memfd, device access through ctx.dma, message DMA."""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest

from device.vfio_user.device_api import DmaError
from device.vfio_user.dma import DmaTable

from .client import DMA_READ, DMA_WRITE, answer_dma
from .conftest import wait_for
from .fake_device import BUF, DMA_ADDR, DMA_CMD, DMA_LEN, DMA_STATUS
from .helpers import open_fds

RAM_IOVA = 0x100000
RAM_SIZE = 0x40000  # 256 KiB of "guest RAM"


@pytest.fixture
def ram():
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, RAM_SIZE + 0x3000)
    mm = mmap.mmap(fd, RAM_SIZE + 0x3000, mmap.MAP_SHARED)
    yield fd, mm
    mm.close()
    os.close(fd)


def _dma(client, cmd: int, addr: int, length: int) -> int:
    client.region_write(0, DMA_ADDR, struct.pack("<Q", addr))
    client.write32(0, DMA_LEN, length)
    client.write32(0, DMA_CMD, cmd)
    # The work runs after the reply (call_soon); poll status like a driver would.
    for _ in range(200):
        status = client.read32(0, DMA_STATUS)
        if status != 1:
            return status
    raise AssertionError("DMA did not complete")


def test_memfd_map_device_reads_and_writes_guest_memory(client, ram):
    fd, mm = ram
    # QEMU sends the section's offset within the memfd; use a non-zero, page-unaligned one.
    offset = 0x2010
    assert not client.dma_map(RAM_IOVA, RAM_SIZE, fd=fd, offset=offset).is_error
    mm[offset + 0x40 : offset + 0x50] = b"guest wrote this"
    assert _dma(client, 1, RAM_IOVA + 0x40, 16) == 0
    assert client.region_read(0, BUF, 16) == b"guest wrote this"

    client.region_write(0, BUF, b"device wrote it!")
    assert _dma(client, 2, RAM_IOVA + 0x1000, 16) == 0
    assert mm[offset + 0x1000 : offset + 0x1010] == b"device wrote it!"


def test_out_of_bounds_dma_is_refused(client, ram):
    fd, mm = ram
    assert not client.dma_map(RAM_IOVA, RAM_SIZE, fd=fd).is_error
    # Straddles the end of the mapping / lies before it / nothing mapped at all.
    for addr in (RAM_IOVA + RAM_SIZE - 8, RAM_IOVA - 8, 0x10):
        assert _dma(client, 1, addr, 16) == errno.EFAULT
        assert _dma(client, 2, addr, 16) == errno.EFAULT


def test_unmap_unknown_range_succeeds_and_unmap_really_unmaps(client, ram):
    fd, _mm = ram
    m = client.dma_unmap(0xDEAD0000, 0x1000)
    assert not m.is_error
    assert struct.unpack("<IIQQ", m.payload) == (24, 0, 0xDEAD0000, 0x1000)
    assert not client.dma_map(RAM_IOVA, RAM_SIZE, fd=fd).is_error
    assert _dma(client, 1, RAM_IOVA, 16) == 0
    assert not client.dma_unmap(RAM_IOVA, RAM_SIZE).is_error
    assert _dma(client, 1, RAM_IOVA, 16) == errno.EFAULT


def test_unmap_all_flag(client, ram):
    fd, _mm = ram
    assert not client.dma_map(RAM_IOVA, 0x1000, fd=fd).is_error
    assert not client.dma_map(RAM_IOVA + 0x10000, 0x1000, fd=fd, offset=0x1000).is_error
    assert not client.dma_unmap(0, 0, flags=2).is_error  # VFIO_DMA_UNMAP_FLAG_ALL
    assert _dma(client, 1, RAM_IOVA, 16) == errno.EFAULT
    assert _dma(client, 1, RAM_IOVA + 0x10000, 16) == errno.EFAULT
    m = client.dma_unmap(0x1000, 0x1000, flags=2)  # FLAG_ALL needs 0/0
    assert m.is_error and m.error == 22


def test_read_only_map_refuses_device_writes(client, ram):
    fd, mm = ram
    assert not client.dma_map(RAM_IOVA, 0x1000, fd=fd, flags=1).is_error  # READ only (ROM-like)
    mm[0:4] = b"ROM!"
    assert _dma(client, 1, RAM_IOVA, 4) == 0
    assert _dma(client, 2, RAM_IOVA, 4) == errno.EFAULT
    assert mm[0:4] == b"ROM!"


def test_map_with_fd_beyond_file_size_is_refused(client, ram):
    fd, _mm = ram
    m = client.dma_map(RAM_IOVA, 1 << 30, fd=fd)  # memfd is only ~268 KiB
    assert m.is_error and m.error == 22


@pytest.mark.parametrize("iova, size, offset", [
    (0, 1 << 63, 0),  # a length no mmap can take
    (RAM_IOVA, 0x1000, 1 << 63),  # a file offset beyond what mmap accepts
    (RAM_IOVA, 0x1000, (1 << 64) - 0x1000),
])
def test_map_with_absurd_size_or_offset_is_refused_with_einval(client, ram, caplog, iova, size, offset):
    fd, _mm = ram
    m = client.dma_map(iova, size, fd=fd, offset=offset)
    assert m.is_error and m.error == errno.EINVAL
    assert "device failed" not in caplog.text  # a refused request, not a crash in the handler
    assert not client.dma_map(RAM_IOVA, 0x1000, fd=fd).is_error  # and the connection still serves


def test_dma_map_fds_do_not_leak(client, ram):
    fd, _mm = ram
    before = open_fds()
    for i in range(20):
        assert not client.dma_map(RAM_IOVA + i * 0x1000, 0x1000, fd=fd, offset=i * 0x1000).is_error
    assert not client.dma_unmap(RAM_IOVA, 20 * 0x1000).is_error
    wait_for(lambda: open_fds() <= before)


def test_message_dma_read_and_write_round_trip(client):
    # Guest memory without an fd (plain -m RAM): only DMA_READ/DMA_WRITE messages reach it.
    guest = bytearray(os.urandom(0x2000))
    assert not client.dma_map(0x80000, len(guest)).is_error
    client.on_server_request = answer_dma({0x80000: guest})
    assert _dma(client, 3, 0x80010, 200) == 0
    assert client.region_read(0, BUF, 200) == bytes(guest[0x10:0xD8])

    client.region_write(0, BUF, b"written by message DMA")
    assert _dma(client, 4, 0x81000, 22) == 0
    assert guest[0x1000:0x1016] == b"written by message DMA"


def test_message_dma_layout_matches_spec(client):
    # Look at the raw request: u64 address, u64 count, data at byte 32 (spec; QEMU 11.1 too).
    assert not client.dma_map(0x80000, 0x1000).is_error
    client.region_write(0, BUF, b"ABCDEFGH")
    client.region_write(0, DMA_ADDR, struct.pack("<Q", 0x80100))
    client.write32(0, DMA_LEN, 8)
    client.write32(0, DMA_CMD, 4)
    req = client.recv()
    assert req.command == DMA_WRITE and req.flags == 0 and req.size == 32 + 8
    assert struct.unpack_from("<QQ", req.payload) == (0x80100, 8)
    assert req.payload[16:] == b"ABCDEFGH"
    # The spec-form reply (address, count) is accepted as well as QEMU's header-only one.
    client.send_raw(struct.pack("<HHIIIQQ", req.msg_id, DMA_WRITE, 32, 1, 0, 0x80100, 8))
    assert client.read32(0, DMA_STATUS) == 0


def test_message_dma_error_reply_and_unmapped_range(client):
    assert not client.dma_map(0x80000, 0x1000).is_error
    client.on_server_request = lambda m: struct.pack("<HHIII", m.msg_id, m.command, 16, 0x21, errno.EFAULT)
    assert _dma(client, 3, 0x80000, 16) == errno.EFAULT
    # Not mapped at all: refused without asking the client.
    client.on_server_request = None
    assert _dma(client, 3, 0x90000, 16) == errno.EFAULT
    assert not [m for m in client.server_requests if m.command in (DMA_READ, DMA_WRITE)]


def test_message_dma_to_fd_backed_range_uses_the_mapping(client, ram):
    fd, mm = ram
    assert not client.dma_map(RAM_IOVA, 0x1000, fd=fd).is_error
    mm[0:8] = b"fastpath"
    client.on_server_request = None
    assert _dma(client, 3, RAM_IOVA, 8) == 0
    assert client.region_read(0, BUF, 8) == b"fastpath"
    assert not client.server_requests


# ---------------------------------------------------------------- DmaTable on its own


def _table_with_ram(mm_fd: int) -> DmaTable:
    t = DmaTable()
    t.map(0x1000, 0x4000, fd=os.dup(mm_fd), offset=0)
    return t


def test_table_overlapping_map_replaces_and_splits(ram):
    fd, mm = ram
    mm[0 : 0x5000] = bytes(range(256)) * 0x50
    t = _table_with_ram(fd)
    # Remap the middle page without an fd: the fd-backed remainder is split in two.
    t.map(0x2000, 0x1000)
    assert [(m.iova, m.size, m.fd_backed) for m in t.mappings()] == [
        (0x1000, 0x1000, True), (0x2000, 0x1000, False), (0x3000, 0x2000, True)]
    assert t.read(0x3000, 4) == mm[0x2000:0x2004]  # right piece keeps its file offset
    with pytest.raises(DmaError):
        t.read(0x2000, 4)  # message range: no direct access
    with pytest.raises(DmaError, match="0x1ffe"):
        t.read(0x1FFE, 4)  # straddles two mappings
    t.unmap(0x1800, 0x2000)  # partial unmap of two neighbours
    assert [(m.iova, m.size) for m in t.mappings()] == [(0x1000, 0x800), (0x3800, 0x1800)]
    t.close()
    assert len(t) == 0


def test_table_view_and_bounds(ram):
    fd, mm = ram
    t = _table_with_ram(fd)
    v = t.view(0x1000, 16)
    v[0:4] = b"view"
    assert mm[0:4] == b"view"
    v.release()
    with pytest.raises(DmaError):
        t.view(0x4FF0, 0x20)
    with pytest.raises(DmaError):
        t.write(0x5000, b"x")
    with pytest.raises(DmaError):
        t.read(0x1000, -1)
    t.close()


def test_table_view_outliving_unmap_does_not_crash(ram):
    fd, _mm = ram
    t = _table_with_ram(fd)
    v = t.view(0x1000, 16)
    t.unmap(0x1000, 0x4000)  # the mapping stays alive until the view is released
    v[0:1] = b"x"
    v.release()
