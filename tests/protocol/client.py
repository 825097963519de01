"""A small vfio-user *client* that plays QEMU's part in tests.

It encodes the wire format on its own from the spec (docs/interop/vfio-user.rst) rather than
importing the server's protocol module, so a layout mistake on either side shows up as a test
failure instead of cancelling out.
"""

from __future__ import annotations

import array
import json
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HDR = struct.Struct("<HHIII")

VERSION, DMA_MAP, DMA_UNMAP, GET_INFO, GET_REGION_INFO, GET_REGION_IO_FDS = 1, 2, 3, 4, 5, 6
GET_IRQ_INFO, SET_IRQS, REGION_READ, REGION_WRITE, DMA_READ, DMA_WRITE = 7, 8, 9, 10, 11, 12
DEVICE_RESET, REGION_WRITE_MULTI, DEVICE_FEATURE = 13, 15, 16

F_REPLY, F_NO_REPLY, F_ERROR = 0x1, 0x10, 0x20

# SET_IRQS flags (linux/vfio.h)
IRQ_DATA_NONE, IRQ_DATA_BOOL, IRQ_DATA_EVENTFD = 1, 2, 4
IRQ_ACTION_MASK, IRQ_ACTION_UNMASK, IRQ_ACTION_TRIGGER = 8, 0x10, 0x20

# What QEMU 11.1 offers in VERSION (vm-recon.md).
QEMU_CAPS = {
    "capabilities": {
        "max_msg_fds": 16,
        "max_data_xfer_size": 1048576,
        "pgsizes": 4096,
        "max_dma_maps": 65535,
        "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
        "write_multiple": True,
    }
}


@dataclass
class Msg:
    msg_id: int
    command: int
    size: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.flags & 0xF == F_REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & F_ERROR)


class VfioUserClient:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.timeout = timeout
        self._buf = bytearray()
        self._fds: list[int] = []
        self._next_id = 0x100
        # Server requests (DMA_READ/WRITE) met while waiting for a reply go to this handler
        # (it returns the reply bytes) or are queued in ``server_requests``.
        self.on_server_request: Callable[[Msg], bytes | None] | None = None
        self.server_requests: list[Msg] = []

    # -------------------------------------------------------------- raw I/O

    def close(self) -> None:
        self.sock.close()
        for fd in self._fds:
            import os

            os.close(fd)
        self._fds.clear()

    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def send(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             flags: int = 0, msg_id: int | None = None) -> int:
        if msg_id is None:
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
        self.send_raw(HDR.pack(msg_id, command, 16 + len(payload), flags, 0) + payload, fds)
        return msg_id

    def _fill(self, n: int, deadline: float) -> None:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"waited for {n} bytes, have {len(self._buf)}")
            self.sock.settimeout(left)
            data, anc, _flags, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4))
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(blob[: len(blob) - len(blob) % 4])
                    self._fds.extend(a)
            if not data:
                raise ConnectionError("server closed the connection")
            self._buf += data

    def recv(self, timeout: float | None = None) -> Msg:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._fill(16, deadline)
        msg_id, command, size, flags, error = HDR.unpack_from(self._buf)
        assert size >= 16, f"server sent size {size}"
        self._fill(size, deadline)
        payload = bytes(self._buf[16:size])
        del self._buf[:size]
        fds, self._fds = self._fds, []
        return Msg(msg_id, command, size, flags, error, payload, fds)

    def expect_nothing(self, wait: float = 0.2) -> None:
        """Assert that the server sends nothing for ``wait`` seconds."""
        assert not self._buf, f"unexpected buffered bytes {bytes(self._buf)!r}"
        r, _, _ = select.select([self.sock], [], [], wait)
        if r:
            data = self.sock.recv(65536, socket.MSG_PEEK)
            raise AssertionError(f"server sent {data!r}")

    def expect_closed(self, wait: float = 2.0) -> None:
        """Assert the server closes the connection (EOF)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self._fill(len(self._buf) + 1, deadline)
            except ConnectionError:
                return
            except OSError as exc:  # ECONNRESET is also a close
                if isinstance(exc, TimeoutError):
                    raise AssertionError("server did not close the connection") from None
                return

    def request(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
                flags: int = 0) -> Msg:
        msg_id = self.send(command, payload, fds, flags)
        return self.wait_reply(msg_id)

    def wait_reply(self, msg_id: int) -> Msg:
        while True:
            m = self.recv()
            if m.is_reply and m.msg_id == msg_id:
                return m
            if m.is_reply:
                raise AssertionError(f"reply to unknown id {m.msg_id} (waiting for {msg_id})")
            self.handle_server_request(m)

    def handle_server_request(self, m: Msg) -> None:
        if self.on_server_request is not None:
            out = self.on_server_request(m)
            if out:
                self.send_raw(out)
        else:
            self.server_requests.append(m)

    # -------------------------------------------------------------- commands

    def negotiate(self, caps: dict | None = None, major: int = 0, minor: int = 0) -> Msg:
        text = json.dumps(QEMU_CAPS if caps is None else caps).encode() + b"\0"
        return self.request(VERSION, struct.pack("<HH", major, minor) + text)

    def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0, flags: int = 3) -> Msg:
        payload = struct.pack("<IIQQQ", 32, flags, offset, iova, size)
        return self.request(DMA_MAP, payload, [fd] if fd is not None else [])

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> Msg:
        return self.request(DMA_UNMAP, struct.pack("<IIQQ", 24, flags, iova, size))

    def get_info(self) -> tuple[int, int, int, int]:
        m = self.request(GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
        assert not m.is_error, m
        return struct.unpack("<IIII", m.payload)

    def get_region_info(self, index: int, argsz: int = 32) -> Msg:
        return self.request(GET_REGION_INFO, struct.pack("<IIIIQQ", argsz, 0, index, 0, 0, 0))

    def get_irq_info(self, index: int) -> Msg:
        return self.request(GET_IRQ_INFO, struct.pack("<IIII", 16, 0, index, 0))

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int] | tuple[int, ...] = (),
                 data: bytes = b"") -> Msg:
        return self.request(SET_IRQS, struct.pack("<IIIII", 20 + len(data), flags, index, start, count) + data, fds)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        m = self.request(REGION_READ, struct.pack("<QII", offset, region, count))
        if m.is_error:
            raise OSError(m.error, f"REGION_READ failed with errno {m.error}")
        off, reg, n = struct.unpack_from("<QII", m.payload)
        assert (off, reg, n) == (offset, region, count), (off, reg, n)
        assert len(m.payload) == 16 + count
        return m.payload[16:]

    def region_write(self, region: int, offset: int, data: bytes, posted: bool = False) -> Msg | None:
        payload = struct.pack("<QII", offset, region, len(data)) + data
        if posted:
            self.send(REGION_WRITE, payload, flags=F_NO_REPLY)
            return None
        m = self.request(REGION_WRITE, payload)
        if m.is_error:
            raise OSError(m.error, f"REGION_WRITE failed with errno {m.error}")
        return m

    def read32(self, region: int, offset: int) -> int:
        return struct.unpack("<I", self.region_read(region, offset, 4))[0]

    def write32(self, region: int, offset: int, value: int, posted: bool = False) -> None:
        self.region_write(region, offset, struct.pack("<I", value), posted)


def answer_dma(memory: dict[int, bytearray]) -> Callable[[Msg], bytes | None]:
    """A server-request handler serving DMA_READ/DMA_WRITE from ``{base: bytearray}`` like QEMU:
    spec layout (u64 address, u64 count, data at byte 32); the DMA_WRITE reply is header-only."""

    def find(addr: int, n: int) -> tuple[bytearray, int] | None:
        for base, mem in memory.items():
            if base <= addr and addr + n <= base + len(mem):
                return mem, addr - base
        return None

    def handler(m: Msg) -> bytes | None:
        addr, n = struct.unpack_from("<QQ", m.payload)
        hit = find(addr, n)
        if hit is None:
            return HDR.pack(m.msg_id, m.command, 16, F_REPLY | F_ERROR, 14)  # EFAULT
        mem, off = hit
        if m.command == DMA_READ:
            data = bytes(mem[off : off + n])
            return HDR.pack(m.msg_id, DMA_READ, 32 + n, F_REPLY, 0) + struct.pack("<QQ", addr, n) + data
        if m.command == DMA_WRITE:
            mem[off : off + n] = m.payload[16 : 16 + n]
            return HDR.pack(m.msg_id, DMA_WRITE, 16, F_REPLY, 0)
        return HDR.pack(m.msg_id, m.command, 16, F_REPLY | F_ERROR, 38)  # ENOSYS

    return handler
