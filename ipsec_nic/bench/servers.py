"""Child processes the benchmarks talk to: the real card behind the real vfio-user server, and a minimal
Python echo of a REGION_READ reply. Each runs in its own forked process (as the card does behind QEMU),
so its CPU time can be read from /proc without counting the client's.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

_RW = struct.Struct("<HHIIIQII")  # vfio-user header + REGION_READ/WRITE head (offset, region, count)
_REPLY = 0x1


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) ``pid`` has used so far, in seconds.

    /proc/<pid>/schedstat gives nanoseconds for the main thread (both servers are single-threaded);
    /proc/<pid>/stat's clock ticks (10 ms) are the fallback."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def pinned(cpu: int):
    """Run this process on ``cpu`` only for the duration (the previous affinity comes back after)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def last_cpu() -> int:
    return max(os.sched_getaffinity(0))


_SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags": the socket is listening (linux/net.h __SO_ACCEPTCON)


def _listening(path: Path) -> bool:
    """Whether a UNIX socket at ``path`` accepts connections. The file appears at bind(), before listen():
    a connect in between is refused, so existence alone is not enough."""
    try:
        table = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return path.exists()
    name = str(path)
    for line in table:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == name and int(fields[3], 16) & _SO_ACCEPTCON:
            return True
    return False


class Child:
    """A forked child running ``body(socket_path)``; stopped by SIGTERM then SIGKILL."""

    def __init__(self, socket_path: Path, body: Callable[[str], None], cpu: int | None = None) -> None:
        self.socket_path = socket_path
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops us
                if cpu is not None:
                    os.sched_setaffinity(0, {cpu})
                body(str(socket_path))
            except BaseException:  # noqa: BLE001 - report and leave without running the parent's cleanup
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        self.pid = pid
        deadline = time.monotonic() + 30
        while not _listening(socket_path):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                raise RuntimeError(f"benchmark server for {socket_path.name} exited before listening")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"benchmark server for {socket_path.name} did not listen within 30 s")
            time.sleep(0.01)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.pid <= 0:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.01)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.pid = 0

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def card_function(wire: str = "discard"):
    """The card (default profile) as a PCI function. ``wire``: "discard" takes every frame the card sends
    and drops it with the link up (TX completes as on a cable nobody answers); "loopback" is the
    profile's loopback wire (TX comes back as RX)."""
    from device.nic.assembly import build_card
    from device.nic.wire import Wire
    from device.profile import profile_from_dict

    class DiscardWire(Wire):
        kind = "discard"

        def attach(self, ctx, on_frame, on_link) -> None:
            super().attach(ctx, on_frame, on_link)
            self._set_link(True)

        def _send(self, frame: bytes) -> bool:
            return True

    function = build_card(profile_from_dict({"wire": {"type": "loopback" if wire == "loopback" else "none"}}))
    datapath = function.card.datapath
    if wire == "discard":
        datapath.wire.close()
        datapath.wire = DiscardWire()
    return function


def card_server(wire: str = "discard") -> Callable[[str], None]:
    """A child body serving :func:`card_function` with VfioUserServer until SIGTERM."""

    def body(path: str) -> None:
        from device.vfio_user.server import serve

        function = card_function(wire)
        try:
            serve(path, function)
        finally:
            function.card.datapath.close()

    return body


def echo_server(path: str) -> None:
    """A minimal Python answer to REGION_READ over the same kind of socket (AF_UNIX stream): receive
    into a preallocated buffer, unpack the header, send header + 4 data bytes. The floor a Python
    vfio-user server cannot go below with one message per access."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    data = bytes(range(256)) * 16
    buf = bytearray(4096)
    while True:
        conn, _ = lsock.accept()
        recv_into, sendall = conn.recv_into, conn.sendall
        while True:
            n = recv_into(buf)
            if not n:
                break
            msg_id, cmd, _size, _flags, _err, offset, region, count = _RW.unpack_from(buf)
            sendall(_RW.pack(msg_id, cmd, 32 + count, _REPLY, 0, offset, region, count) + data[offset:offset + count])
        conn.close()


def floor_server(event_loop: bool) -> Callable[[str], None]:
    """A child body that does only what any vfio-user server must do per message, no protocol at all: receive
    with room for fds (``recvmsg_into``; a vfio-user client passes fds with DMA_MAP and SET_IRQS) and send a
    reply of the REGION_READ reply's length. With ``event_loop`` it first waits in ``epoll`` like a server that
    also watches other fds (the card's wire, timers, a wake-up pipe). The floor under the card server's
    figure: whatever protocol and device work a server adds comes on top of it."""

    def body(path: str) -> None:
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        views = [memoryview(bytearray(4096))]
        anc_size = socket.CMSG_SPACE(16 * array.array("i").itemsize)
        reply = bytes(36)  # header 16 + offset/region/count 16 + 4 data bytes
        while True:
            conn, _ = lsock.accept()
            recvmsg_into, send = conn.recvmsg_into, conn.send
            if event_loop:
                conn.setblocking(False)
                ep = select.epoll()
                ep.register(conn.fileno(), select.EPOLLIN)
                poll = ep.poll
                while True:
                    poll()
                    if not recvmsg_into(views, anc_size)[0]:
                        break
                    send(reply)
                ep.close()
            else:
                while recvmsg_into(views, anc_size)[0]:
                    send(reply)
            conn.close()

    return body
