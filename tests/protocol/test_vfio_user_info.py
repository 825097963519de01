"""DEVICE_GET_INFO, GET_REGION_INFO (argsz retry, sparse mmap, fd), GET_IRQ_INFO."""

from __future__ import annotations

import mmap
import os
import struct

from .client import GET_REGION_IO_FDS


def test_device_info(client):
    argsz, flags, num_regions, num_irqs = client.get_info()
    assert argsz == 16
    assert flags == 0b11  # RESET | PCI (linux/vfio.h VFIO_DEVICE_FLAGS_*)
    assert (num_regions, num_irqs) == (9, 5)


def test_region_info_plain_bar(client):
    m = client.get_region_info(0)
    assert len(m.payload) == 32 and not m.fds
    argsz, flags, index, cap_offset, size, offset = struct.unpack("<IIIIQQ", m.payload)
    assert (argsz, flags, index, cap_offset, size) == (32, 0b11, 0, 0, 4096)


def test_region_info_absent_bar_is_size_zero_not_error(client):
    for index in (1, 3, 4, 5, 6, 8):
        m = client.get_region_info(index)
        assert not m.is_error
        argsz, flags, idx, _cap, size, _off = struct.unpack("<IIIIQQ", m.payload)
        assert (flags, idx, size) == (0, index, 0)


def test_region_info_bad_index(client):
    m = client.get_region_info(9)
    assert m.is_error and m.error == 22


def test_region_info_sparse_mmap_argsz_retry_and_fd(client, device):
    # First ask with the bare struct size, as QEMU does.
    m = client.get_region_info(2, argsz=32)
    assert m.size <= 16 + 32, "reply must fit the client's argsz"
    argsz, flags, _idx, cap_offset, size, _off = struct.unpack("<IIIIQQ", m.payload)
    assert argsz == 32 + 16 + 16  # struct + sparse cap header + one area
    assert flags & 0x8 == 0 and cap_offset == 0, "no CAPS flag when the caps are not sent"
    assert not m.fds, "the fd only comes with the full answer"
    assert size == 8192

    m = client.get_region_info(2, argsz=argsz)
    assert m.size == 16 + argsz
    _argsz, flags, _idx, cap_offset, size, offset = struct.unpack_from("<IIIIQQ", m.payload)
    assert flags == 0b1111  # READ | WRITE | MMAP | CAPS
    assert cap_offset == 32
    cap_id, version, nxt, nr_areas, _res = struct.unpack_from("<HHIII", m.payload, cap_offset)
    assert (cap_id, version, nxt, nr_areas) == (1, 1, 0, 1)  # VFIO_REGION_INFO_CAP_SPARSE_MMAP
    assert struct.unpack_from("<QQ", m.payload, cap_offset + 16) == (0, 4096)
    assert len(m.fds) == 1
    fd = m.fds[0]
    try:
        # Through the passed fd we see what REGION_WRITE put into the BAR.
        client.region_write(2, 0x10, b"hello bar2")
        with mmap.mmap(fd, 4096, mmap.MAP_SHARED, offset=offset) as mm:
            assert mm[0x10:0x1A] == b"hello bar2"
            mm[0x20:0x24] = b"WXYZ"
        assert client.region_read(2, 0x20, 4) == b"WXYZ"
    finally:
        os.close(fd)


def test_region_io_fds_reports_none(client):
    m = client.request(GET_REGION_IO_FDS, struct.pack("<IIII", 16, 0, 0, 0))
    assert not m.is_error
    assert struct.unpack("<IIII", m.payload) == (16, 0, 0, 0)


def test_irq_info(client):
    expected = {0: (1, 0b11), 1: (0, 0b1), 2: (4, 0b1), 3: (1, 0b1), 4: (1, 0b1)}
    for index, (count, flags) in expected.items():
        m = client.get_irq_info(index)
        assert m.size == 32
        assert struct.unpack("<IIII", m.payload) == (16, flags, index, count)
    m = client.get_irq_info(5)
    assert m.is_error and m.error == 22
