"""Micro-benchmark of the vfio-user server hot path (REGION_READ / posted REGION_WRITE).

Run: .venv/bin/python tests/bench/bench_vfio_user.py [N]
1. sans-I/O: bytes -> VfioUserConnection -> server handlers -> device -> reply bytes, no socket
   (the server's own _process() with a sink instead of a socket);
2. socketpair: the server loop in a forked child, the client here; server CPU per message from
   the child's rusage (so the client's cost is not counted), plus round-trip latency.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from device.vfio_user.device_api import IrqInfo, RegionInfo  # noqa: E402
from device.vfio_user.server import VfioUserServer  # noqa: E402

HDR = struct.Struct("<HHIII")
RW = struct.Struct("<HHIIIQII")


class BenchDevice:
    num_regions = 9
    num_irqs = 5
    supports_reset = True

    def __init__(self) -> None:
        self.bar0 = bytearray(4096)

    def region_info(self, index: int) -> RegionInfo:
        return RegionInfo(size=4096 if index in (0, 7) else 0)

    def irq_info(self, index: int) -> IrqInfo:
        return IrqInfo(count=1)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return bytes(self.bar0[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.bar0[offset : offset + len(data)] = data

    def reset(self) -> None: ...

    def attached(self, ctx) -> None: ...

    def detached(self) -> None: ...


def version_msg() -> bytes:
    text = json.dumps({"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}}).encode() + b"\0" * 40
    return HDR.pack(1, 1, 16 + 4 + len(text), 0, 0) + struct.pack("<HH", 0, 0) + text


def read_msg(i: int) -> bytes:
    return RW.pack(i & 0xFFFF, 9, 32, 0, 0, 0x10, 0, 4)


def posted_write_msg(i: int) -> bytes:
    return RW.pack(i & 0xFFFF, 10, 36, 0x10, 0, 0x10, 0, 4) + struct.pack("<I", i & 0xFFFFFFFF)


class Sink:
    """Stands in for the client socket in the sans-I/O run."""

    def __init__(self) -> None:
        self.bytes = 0

    def send(self, data: bytes) -> int:
        self.bytes += len(data)
        return len(data)


def bench_sans_io(n: int, batch: int) -> None:
    server = VfioUserServer("/nonexistent/bench.sock", BenchDevice())
    a, b = socket.socketpair()
    server.adopt_client(a)
    b.sendall(version_msg())
    server._receive()  # negotiate through the real path
    b.recv(4096)
    sink = Sink()
    server._sock = sink  # type: ignore[assignment]
    conn = server._conn
    for name, make in (("REGION_READ", read_msg), ("posted REGION_WRITE", posted_write_msg)):
        chunks = [b"".join(make(i + j) for j in range(batch)) for i in range(0, n, batch)]
        t0 = time.perf_counter()
        c0 = time.process_time()
        for chunk in chunks:
            conn.receive_data(chunk)
            server._process()
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        print(f"sans-I/O  {name:20s} batch {batch:3d}: {dt / n * 1e6:6.2f} us/msg wall, {dc / n * 1e6:6.2f} us/msg CPU")
    server._sock = a
    a.close()
    b.close()


def _serve_child() -> tuple[int, socket.socket]:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # child: the server loop
        b.close()
        server = VfioUserServer("/nonexistent/bench.sock", BenchDevice())
        server.adopt_client(a)
        try:
            while server._sock is not None:
                server._run_once()
        finally:
            os._exit(0)
    a.close()
    b.sendall(version_msg())
    b.recv(4096)
    return pid, b


def _recv_exact(sock: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        got += len(sock.recv(n - got))


def _child_cpu(pid: int, sock: socket.socket) -> float:
    sock.close()
    _, _status, usage = os.wait4(pid, 0)
    return usage.ru_utime + usage.ru_stime


def bench_socketpair(n: int) -> None:
    # Ping-pong REGION_READ: QEMU's vCPU waits for each one.
    pid, b = _serve_child()
    msg = read_msg(7)
    t0 = time.perf_counter()
    for _ in range(n):
        b.sendall(msg)
        _recv_exact(b, 36)
    rtt = (time.perf_counter() - t0) / n
    cpu = _child_cpu(pid, b) / n
    print(f"socketpair REGION_READ ping-pong:   {rtt * 1e6:6.2f} us round trip wall, server CPU {cpu * 1e6:6.2f} us/msg")
    # Posted writes: a fire-and-forget stream, then one read to know all were handled.
    pid, b = _serve_child()
    stream = b"".join(posted_write_msg(i) for i in range(256))
    rounds = max(1, n // 256)
    t0 = time.perf_counter()
    for _ in range(rounds):
        b.sendall(stream)
    b.sendall(read_msg(8))
    _recv_exact(b, 36)
    per = (time.perf_counter() - t0) / (rounds * 256)
    cpu = _child_cpu(pid, b) / (rounds * 256)
    print(f"socketpair posted REGION_WRITE stream: {per * 1e6:6.2f} us/msg wall, server CPU {cpu * 1e6:6.2f} us/msg")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
    bench_sans_io(n, 1)
    bench_sans_io(n, 64)
    bench_socketpair(n)


if __name__ == "__main__":
    main()
