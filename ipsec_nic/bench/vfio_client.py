"""A lean vfio-user client for the benchmarks: plays QEMU's part (VERSION, DMA_MAP of a memfd, region
access) with as little Python per message as possible, so the server's cost dominates what is measured.

Message layouts come from the server's protocol module (declared once); correctness is the protocol
tests' job (tests/protocol/client.py encodes independently), this client only has to be cheap.

Region access follows QEMU's rule (hw/vfio/region.c): an access inside an area the server let us mmap
(REGION_INFO_FLAG_MMAP, optionally narrowed by the sparse-mmap capability) is a plain load or store on
the shared mapping and costs no message; any other access is a REGION_READ / REGION_WRITE. Writes
outside the mapping are posted (no reply), as QEMU posts MMIO writes. Counters record both, so the share
of accesses that cost no message is measured, not assumed.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import mmap
import os
import socket
import struct
from dataclasses import dataclass

from device.vfio_user import protocol as p

_U32 = struct.Struct("<I")
_CAPS = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096,
                          "max_dma_maps": 65535, "write_multiple": True}}


def version_payload() -> bytes:
    """VERSION request body: major, minor, NUL-terminated JSON capabilities (what QEMU offers)."""
    return p.VERSION_HEAD.pack(p.VERSION_MAJOR, p.VERSION_MINOR) + json.dumps(_CAPS).encode() + b"\0"


class ClientError(RuntimeError):
    pass


@dataclass
class AccessCounts:
    reads: int = 0
    writes: int = 0
    mapped_reads: int = 0  # served from the shared mapping: no message
    mapped_writes: int = 0

    @property
    def accesses(self) -> int:
        return self.reads + self.writes

    @property
    def messages(self) -> int:
        """Socket messages the accesses cost (a read is a round trip, a write is posted)."""
        return self.reads - self.mapped_reads + self.writes - self.mapped_writes

    def snapshot(self) -> AccessCounts:
        return AccessCounts(self.reads, self.writes, self.mapped_reads, self.mapped_writes)

    def since(self, before: AccessCounts) -> AccessCounts:
        return AccessCounts(self.reads - before.reads, self.writes - before.writes,
                            self.mapped_reads - before.mapped_reads, self.mapped_writes - before.mapped_writes)

    def __add__(self, other: AccessCounts) -> AccessCounts:
        return AccessCounts(self.reads + other.reads, self.writes + other.writes,
                            self.mapped_reads + other.mapped_reads, self.mapped_writes + other.mapped_writes)


class VfioUserLink:
    """One connection to a vfio-user server."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)
        self._id = 0
        self.counts = AccessCounts()
        self._maps: list[mmap.mmap] = []

    def close(self) -> None:
        self.sock.close()
        for m in self._maps:
            with contextlib.suppress(BufferError):  # a ctypes view still pins it: it goes with the process
                m.close()

    # ------------------------------------------------------------------ messages

    def _next(self) -> int:
        self._id = (self._id + 1) & 0xFFFF
        return self._id

    def _recv_reply(self, msg_id: int) -> tuple[bytes, list[int]]:
        """Read one whole reply (header + payload) and any fds that came with it."""
        fds: list[int] = []
        got = 0
        need = p.HEADER_SIZE
        while got < need:
            n, anc, _flags, _ = self.sock.recvmsg_into([self._view[got:]], socket.CMSG_SPACE(16 * 4))
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(blob[: len(blob) - len(blob) % 4])
                    fds.extend(a)
            if not n:
                raise ClientError("server closed the connection")
            got += n
            if got >= p.HEADER_SIZE:
                need = p.HEADER.unpack_from(self._buf)[2]
        rid, _cmd, size, flags, error = p.HEADER.unpack_from(self._buf)
        if rid != msg_id:
            raise ClientError(f"reply to message {rid}, expected {msg_id}")
        if flags & p.FLAG_ERROR:
            raise ClientError(f"server error {error} ({os.strerror(error)})")
        return bytes(self._buf[p.HEADER_SIZE:size]), fds

    def request(self, command: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> tuple[bytes, list[int]]:
        msg_id = self._next()
        data = p.HEADER.pack(msg_id, command, p.HEADER_SIZE + len(payload), 0, 0) + payload
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)
        return self._recv_reply(msg_id)

    def negotiate(self) -> None:
        self.request(p.Command.VERSION, version_payload())

    def dma_map(self, iova: int, size: int, fd: int) -> None:
        flags = p.DMA_MAP_FLAG_READ | p.DMA_MAP_FLAG_WRITE
        self.request(p.Command.DMA_MAP, p.DMA_MAP.pack(p.DMA_MAP.size, flags, 0, iova, size), (fd,))

    def mappable_areas(self, region: int) -> tuple[mmap.mmap | None, list[tuple[int, int]]]:
        """mmap what the server offers of ``region``: (mapping or None, [(offset, size), ...])."""
        argsz = 4096
        body, fds = self.request(p.Command.DEVICE_GET_REGION_INFO,
                                 p.REGION_INFO.pack(argsz, 0, region, 0, 0, 0))
        _argsz, flags, _index, cap_offset, size, offset = p.REGION_INFO.unpack_from(body)
        if not flags & p.REGION_INFO_FLAG_MMAP or not fds:
            for fd in fds:
                os.close(fd)
            return None, []
        areas = [(0, size)]
        if flags & p.REGION_INFO_FLAG_CAPS and cap_offset:
            cap_id, _ver, _next, nr, _res = p.SPARSE_MMAP_CAP.unpack_from(body, cap_offset)
            if cap_id == p.REGION_INFO_CAP_SPARSE_MMAP:
                at = cap_offset + p.SPARSE_MMAP_CAP.size
                areas = [p.SPARSE_MMAP_AREA.unpack_from(body, at + i * p.SPARSE_MMAP_AREA.size) for i in range(nr)]
        try:
            mm = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        finally:
            for fd in fds:
                os.close(fd)
        self._maps.append(mm)
        return mm, areas

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        msg_id = self._next()
        self.sock.sendall(p.HEADER_REGION_RW.pack(msg_id, p.Command.REGION_READ, 32, 0, 0, offset, region, count))
        body, _fds = self._recv_reply(msg_id)
        return body[16:16 + count]

    def region_write_posted(self, region: int, offset: int, data: bytes) -> None:
        msg_id = self._next()
        self.sock.sendall(p.HEADER_REGION_RW.pack(msg_id, p.Command.REGION_WRITE, 32 + len(data),
                                                  p.FLAG_NO_REPLY, 0, offset, region, len(data)) + data)


class LinkMmio:
    """guest_tools' Mmio interface over a VfioUserLink region, served from the mmap where allowed."""

    def __init__(self, link: VfioUserLink, region: int, size: int) -> None:
        self.link = link
        self.region = region
        self.size = size
        self.mm, areas = link.mappable_areas(region)
        self._mapped = frozenset(off for a_off, a_size in areas for off in range(a_off, a_off + a_size, 4))
        self._cells: dict[int, ctypes.c_uint32] = {}

    def _cell(self, offset: int) -> ctypes.c_uint32 | None:
        if offset not in self._mapped:
            return None
        cell = self._cells.get(offset)
        if cell is None:
            cell = self._cells[offset] = ctypes.c_uint32.from_buffer(self.mm, offset)
        return cell

    def read32(self, offset: int) -> int:
        c = self.link.counts
        c.reads += 1
        cell = self._cell(offset)
        if cell is not None:
            c.mapped_reads += 1
            return cell.value
        return _U32.unpack(self.link.region_read(self.region, offset, 4))[0]

    def write32(self, offset: int, value: int) -> None:
        c = self.link.counts
        c.writes += 1
        cell = self._cell(offset)
        if cell is not None:
            c.mapped_writes += 1
            cell.value = value & 0xFFFF_FFFF
            return
        self.link.region_write_posted(self.region, offset, _U32.pack(value & 0xFFFF_FFFF))

    def close(self) -> None:
        self._cells.clear()
