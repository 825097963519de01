"""vfio-user REGION_READ round trip: the card server's CPU per message over a real AF_UNIX socket, against
a minimal Python echo of the same message over the same kind of socket, interleaved in the same run.

QEMU's vCPU waits for each trapped read, so the client sends one REGION_READ and waits for its reply
(ping-pong). CPU is read from each server process's /proc entry around a burst of messages, so the
client's own cost is not counted; the median over the rounds is reported.

Client and both servers are pinned to one CPU. Unpinned, the scheduler sometimes keeps a ping-pong pair
on one CPU (a direct switch) and sometimes splits it (each message then pays a cross-CPU wakeup, which
the woken process is charged for): on 2-CPU machines that flips a run's figure by 4x at random. Pinned,
both servers are charged the same kind of switch and the ratio compares their own work.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
from pathlib import Path

from .core import Progress, Row, at_most
from .servers import Child, card_server, echo_server, floor_server, last_cpu, pinned

TARGET = at_most(1.1)


def _burst(sock: socket.socket, msg: bytes, n: int, buf: bytearray) -> None:
    send, recv_into = sock.sendall, sock.recv_into
    for _ in range(n):
        send(msg)
        got = 0
        while got < 36:  # header 16 + offset/region/count 16 + 4 data bytes
            got += recv_into(memoryview(buf)[got:])


def round_trip(run_dir: Path, messages: int, rounds: int, say: Progress) -> list[Row]:
    from device.contract import regs
    from device.vfio_user import protocol as p

    from .vfio_client import VfioUserLink

    say(f"vfio-user REGION_READ round trip: {rounds} rounds of {messages:,} messages, card vs echo")
    msg = p.HEADER_REGION_RW.pack(7, p.Command.REGION_READ, 32, 0, 0, regs.reg("SCRATCH"), 0, 4)
    buf = bytearray(64)
    cpu = last_cpu()
    with Child(run_dir / "rtt-card.sock", card_server(), cpu) as card, \
            Child(run_dir / "rtt-echo.sock", echo_server, cpu) as echo, \
            Child(run_dir / "rtt-floor.sock", floor_server(False), cpu) as floor, \
            Child(run_dir / "rtt-floor-epoll.sock", floor_server(True), cpu) as floor_ep, pinned(cpu):
        link = VfioUserLink(str(card.socket_path))
        link.negotiate()
        socks = []
        for child in (echo, floor, floor_ep):
            socks.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            socks[-1].connect(str(child.socket_path))
        targets = (("card", card, link.sock), ("echo", echo, socks[0]), ("floor", floor, socks[1]),
                   ("floor-epoll", floor_ep, socks[2]))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _c, _s in targets}
        try:
            for r in range(rounds + 1):
                for name, child, sock in targets:
                    c0, t0 = child.cpu(), time.perf_counter()
                    _burst(sock, msg, messages if r else messages // 4, buf)
                    if r:  # round 0 warms all up
                        results[name].append(((child.cpu() - c0) / messages, (time.perf_counter() - t0) / messages))
        finally:
            link.close()
            for sock in socks:
                sock.close()
        say("vfio-user posted REGION_WRITE stream (doorbell-like), card server CPU per message")
        posted = _posted_stream(card, messages, rounds)
    say("vfio-user REGION_READ without a socket (the server's sans-I/O path, in this process)")
    sans_io = _sans_io(run_dir, messages, rounds)
    card_cpu = statistics.median(c for c, _ in results["card"]) * 1e6
    echo_cpu = statistics.median(c for c, _ in results["echo"]) * 1e6
    floor_cpu = statistics.median(c for c, _ in results["floor"]) * 1e6
    floor_ep_cpu = statistics.median(c for c, _ in results["floor-epoll"]) * 1e6
    card_rtt = statistics.median(w for _, w in results["card"]) * 1e6
    echo_rtt = statistics.median(w for _, w in results["echo"]) * 1e6
    return [
        Row("vfio-user REGION_READ: server CPU per message", card_cpu, "µs", echo_cpu,
            "µs minimal Python echo", TARGET),
        Row("vfio-user REGION_READ: round trip (wall)", card_rtt, "µs", echo_rtt, "µs minimal Python echo"),
        # The floors: no protocol, only the calls a server that takes fds (and, second, watches other fds too)
        # cannot skip. Their ratio to the echo is what the card server's ratio cannot go below.
        Row("vfio-user floor: recvmsg_into + send, no protocol: server CPU per message", floor_cpu, "µs",
            echo_cpu, "µs minimal Python echo"),
        Row("vfio-user floor: epoll + recvmsg_into + send, no protocol: server CPU per message", floor_ep_cpu,
            "µs", echo_cpu, "µs minimal Python echo"),
        Row("vfio-user REGION_READ: server CPU per message without the socket", sans_io, "µs",
            note="receive -> connection -> card -> reply, no syscall" if sans_io is not None
            else "n/a: the server's internals changed (bench/vfio_rtt.py _sans_io)"),
        Row("vfio-user posted REGION_WRITE (SCRATCH): server CPU per message", posted, "µs",
            note="stream of 256 posted writes, then one read"),
    ]


def _posted_stream(card: Child, messages: int, rounds: int) -> float:
    """Server CPU per posted 4-byte REGION_WRITE (no reply, like QEMU's posted MMIO writes and doorbells),
    sent in streams of 256 and closed by one REGION_READ so all were handled. Median over the rounds."""
    from device.contract import regs
    from device.vfio_user import protocol as p

    from .vfio_client import VfioUserLink

    scratch = regs.reg("SCRATCH")
    stream = b"".join(p.HEADER_REGION_RW.pack(i, p.Command.REGION_WRITE, 36, p.FLAG_NO_REPLY, 0, scratch, 0, 4)
                      + i.to_bytes(4, "little") for i in range(256))
    link = VfioUserLink(str(card.socket_path))
    per = []
    try:
        link.negotiate()
        bursts = max(1, messages // 256)
        for r in range(rounds + 1):
            c0 = card.cpu()
            for _ in range(bursts):
                link.sock.sendall(stream)
            link.region_read(0, scratch, 4)
            if r:
                per.append((card.cpu() - c0) / (bursts * 256 + 1))
    finally:
        link.close()
    return statistics.median(per) * 1e6


class _Sink:
    """Stands in for the client socket: every receive delivers ``msg`` whole, every reply is taken whole."""

    def __init__(self, msg: bytes) -> None:
        self.msg = msg

    def recvmsg_into(self, buffers, ancbufsize: int = 0, flags: int = 0):
        n = len(self.msg)
        buffers[0][:n] = self.msg
        return n, [], 0, None

    def send(self, data) -> int:
        return len(data)


def _sans_io(run_dir: Path, messages: int, rounds: int) -> float | None:
    """CPU per REGION_READ through the server's own receive -> process -> reply path with the socket
    replaced by a sink that delivers the request and takes the reply: what a message costs the server
    before any syscall (the loop's poll and callback excluded). Reaches into the server's private loop (no
    public sans-I/O entry point exists); None if that has changed."""
    from device.contract import regs
    from device.vfio_user import protocol as p
    from device.vfio_user.server import VfioUserServer

    from .servers import card_function
    from .vfio_client import version_payload

    function = card_function("discard")
    server = VfioUserServer(str(run_dir / "sans-io.sock"), function)
    a, b = socket.socketpair()
    try:
        server.adopt_client(a)
        body = version_payload()
        b.sendall(p.HEADER.pack(1, p.Command.VERSION, p.HEADER_SIZE + len(body), 0, 0) + body)
        server._receive()  # negotiate through the real path
        b.recv(65536)
        msg = p.HEADER_REGION_RW.pack(7, p.Command.REGION_READ, 32, 0, 0, regs.reg("SCRATCH"), 0, 4)
        server._sock = _Sink(msg)  # type: ignore[assignment]
        receive = server._receive
        per = []
        for r in range(rounds + 1):
            n = messages if r else messages // 4
            c0 = time.thread_time()
            for _ in range(n):
                receive()
            if r:
                per.append((time.thread_time() - c0) / n)
        return statistics.median(per) * 1e6
    except (AttributeError, TypeError):
        return None
    finally:
        server._sock = a
        with contextlib.suppress(Exception):
            server.close()
        a.close()
        b.close()
        if function.card.datapath is not None:
            function.card.datapath.close()
