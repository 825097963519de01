"""Issue 11, lowest layer: each bound the server keeps against a hostile client or guest, tested on the
part that enforces it (parser, connection, DMA table, irq table, server loop in a thread).

The same attacks over the real socket against a real `ipsec-nic serve` process are in
test_hostile_real_server.py. docs/robustness.md says what each test proves.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from device.vfio_user import protocol as p
from device.vfio_user.connection import MAX_HELD_FDS, Disconnect, VfioUserConnection
from device.vfio_user.device_api import DmaError, VfioUserError
from device.vfio_user.dma import DmaTable
from device.vfio_user.irq import IrqTable
from device.vfio_user.protocol import Command, IrqSetFlag, ProtocolError
from device.vfio_user.server import MAX_QUEUED_OUTPUT

from .conftest import wait_for
from .fake_device import DMA_ADDR, DMA_CMD, DMA_LEN, DMA_STATUS
from .helpers import open_fds

PAGE = 4096
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE  # an eventfd counter cannot go higher (eventfd(2))


def nested_version(depth: int = 5000) -> bytes:
    caps = b"[" * depth + b"]" * depth
    assert len(caps) < p.MAX_VERSION_JSON  # far under the size cap: only the depth is hostile
    return p.build_message(1, Command.VERSION, p.VERSION_HEAD.pack(0, 0) + caps + b"\0")


# ---------------------------------------------------------------- VERSION nested 5,000 deep


def test_deeply_nested_version_json_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="nested too deeply"):
        p.parse_message(nested_version())


def test_deeply_nested_version_json_gets_an_error_event_not_an_exception():
    conn = VfioUserConnection()
    conn.receive_data(nested_version())
    ev = conn.next_event()
    assert ev.errno == errno.EINVAL and "nested" in ev.reason
    # The connection is still usable: a proper VERSION is accepted next.
    conn.receive_data(p.build_message(2, Command.VERSION, p.VERSION_HEAD.pack(0, 0)))
    assert isinstance(conn.next_event(), p.Version)


# ---------------------------------------------------------------- fds on a message that never completes


def test_fds_on_a_never_completed_message_are_bounded_and_closed():
    conn = VfioUserConnection()
    before = len(open_fds())
    # A header that promises the largest message, then 400 sends of one byte with 16 fds each.
    conn.receive_data(p.HEADER.pack(1, Command.REGION_WRITE, p.MAX_MESSAGE_SIZE, 0, 0))
    for _ in range(400):
        fds = [os.eventfd(0) for _ in range(p.MAX_MSG_FDS)]
        conn.receive_data(b"\0", fds)
        assert len(open_fds()) - before <= MAX_HELD_FDS + p.MAX_MSG_FDS
    ev = conn.next_event()
    assert isinstance(ev, Disconnect) and "fds" in ev.reason
    assert len(open_fds()) == before  # every fd we were sent is closed again


# ---------------------------------------------------------------- DMA: shrinking guest RAM, fds per map


_SHRINK_SCRIPT = textwrap.dedent("""
    import os, sys
    from device.vfio_user.dma import DmaTable
    from device.vfio_user.device_api import DmaError
    fd = os.memfd_create("guest-ram", {flags})
    os.ftruncate(fd, 1 << 20)
    t = DmaTable()
    t.map(0x10000, 1 << 20, fd=os.dup(fd))
    t.write(0x10000 + 0x80000, b"before")
    try:
        os.ftruncate(fd, 4096)  # the client shrinks guest RAM under the mapping
        print("shrunk")
    except OSError as exc:
        print("refused", exc.errno)
    try:
        data = t.read(0x10000 + 0x80000, 6)
        print("read", data)
        t.write(0x10000 + 0x80000, b"after!")
        print("wrote")
    except DmaError as exc:
        print("dmaerror", exc)
    t.view(0x10000, 16).release()
    print("alive")
""")


def _run_isolated(script: str) -> subprocess.CompletedProcess[str]:
    # A regression would kill the process with SIGBUS: run it apart so the test reports it.
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_unsealable_guest_ram_that_shrinks_gives_dma_errors_not_sigbus():
    res = _run_isolated(_SHRINK_SCRIPT.format(flags=0))  # no MFD_ALLOW_SEALING: cannot be sealed
    assert res.returncode == 0, f"killed by signal {-res.returncode}" if res.returncode < 0 else res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "shrunk"
    assert lines[1].startswith("dmaerror") and "shrank" in lines[1]
    assert lines[-1] == "alive"


def test_sealable_guest_ram_is_sealed_against_shrinking():
    res = _run_isolated(_SHRINK_SCRIPT.format(flags="os.MFD_ALLOW_SEALING"))
    assert res.returncode == 0, f"killed by signal {-res.returncode}" if res.returncode < 0 else res.stderr
    assert res.stdout.splitlines() == [f"refused {errno.EPERM}", "read b'before'", "wrote", "alive"]


def test_map_beyond_the_end_of_the_file_is_refused():
    fd = os.memfd_create("small")
    os.ftruncate(fd, PAGE)
    t = DmaTable()
    with pytest.raises(DmaError, match="beyond the end") as exc:
        t.map(0, 2 * PAGE, fd=fd)
    assert exc.value.errno == errno.EINVAL


def test_many_maps_of_one_file_do_not_cost_one_fd_each():
    fd = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2000 * PAGE)
    t = DmaTable()
    before = len(open_fds())
    for i in range(2000):  # a vIOMMU guest maps page by page
        t.map(i * PAGE, PAGE, fd=os.dup(fd), offset=i * PAGE)
    assert len(t) == 2000
    assert len(open_fds()) - before <= 2  # one mmap for the file (+ the fd Python's mmap keeps)
    t.write(1999 * PAGE, b"last page")
    assert os.pread(fd, 9, 1999 * PAGE) == b"last page"
    t.close()
    assert len(open_fds()) == before
    os.close(fd)


def test_distinct_dma_files_are_bounded():
    t = DmaTable(max_files=4)
    fds = []
    for i in range(5):
        fd = os.memfd_create(f"f{i}")
        os.ftruncate(fd, PAGE)
        fds.append(fd)
    for i in range(4):
        t.map(i * PAGE, PAGE, fd=os.dup(fds[i]))
    before = len(open_fds())
    with pytest.raises(DmaError) as exc:
        t.map(10 * PAGE, PAGE, fd=os.dup(fds[4]))
    assert exc.value.errno == errno.ENOSPC
    assert len(open_fds()) == before  # the refused fd was closed
    t.close()
    for fd in fds:
        os.close(fd)


# ---------------------------------------------------------------- SET_IRQS with blocking fds


def _trigger_in_thread(table: IrqTable) -> bool:
    done = threading.Event()
    threading.Thread(target=lambda: (table.trigger(2, 0), done.set()), daemon=True).start()
    return done.wait(2.0)


def test_set_irqs_refuses_a_pipe():
    r, w = os.pipe()
    table = IrqTable([1, 0, 4])
    flags = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
    with pytest.raises(VfioUserError, match="not an eventfd") as exc:
        table.set_irqs(2, flags, 0, 1, [w])
    assert exc.value.errno == errno.EINVAL
    os.close(r)
    with pytest.raises(OSError):
        os.close(w)  # the table owned it and closed it


def test_full_blocking_eventfd_never_blocks_the_trigger():
    efd = os.eventfd(0)  # created blocking, as a hostile client may
    os.eventfd_write(efd, EVENTFD_MAX)  # full: one more write would block forever
    table = IrqTable([1, 0, 4])
    table.set_irqs(2, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 0, 1, [os.dup(efd)])
    assert _trigger_in_thread(table), "raising the interrupt blocked"
    assert fcntl.fcntl(efd, fcntl.F_GETFL) & os.O_NONBLOCK  # made non-blocking (the flag is shared)
    assert os.eventfd_read(efd) == EVENTFD_MAX  # the interrupt is still pending for the reader
    table.close_all()
    os.close(efd)


# ---------------------------------------------------------------- server loop: timeouts, back-pressure


def test_timed_out_dma_requests_free_their_slots(tmp_path, connect, server, device):
    server.dma_timeout = 0.05
    c = connect()
    assert not c.negotiate().is_error
    assert not c.dma_map(0x40000, 0x1000).is_error  # no fd: message-based DMA
    c.on_server_request = lambda m: None  # a client that never answers DMA_READ
    for _ in range(5):
        c.write32(0, DMA_ADDR, 0x40000)
        c.write32(0, DMA_ADDR + 4, 0)
        c.write32(0, DMA_LEN, 16)
        c.write32(0, DMA_CMD, 3)
        wait_for(lambda: c.read32(0, DMA_STATUS) != 1)
        assert c.read32(0, DMA_STATUS) == errno.EFAULT
    assert server._conn.pending_requests == 0  # else 1,024 timeouts end all DMA on the connection
    assert not server._dma_ops


def _region_read(msg_id: int, region: int, offset: int, count: int) -> bytes:
    return p.build_message(msg_id, Command.REGION_READ, p.REGION_RW.pack(offset, region, count))


def pipeline_unread(sock: socket.socket, requests: bytes, stall: float = 0.5) -> int:
    """Send ``requests`` without reading replies until the server stops taking them; bytes sent."""
    sock.setblocking(False)
    sent = 0
    last = time.monotonic()
    while sent < len(requests) and time.monotonic() - last < stall:
        try:
            n = sock.send(requests[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
            continue
        sent += n
        last = time.monotonic()
    sock.setblocking(True)
    return sent


def drain_replies(sock: socket.socket, want: int, timeout: float = 30.0) -> list[int]:
    """Read ``want`` replies; their ids in order."""
    sock.settimeout(timeout)
    buf = bytearray()
    ids: list[int] = []
    while len(ids) < want:
        chunk = sock.recv(1 << 20)
        assert chunk, f"server closed after {len(ids)} of {want} replies"
        buf += chunk
        while len(buf) >= p.HEADER_SIZE:
            msg_id, _cmd, size, flags, _err = p.HEADER.unpack_from(buf)
            if len(buf) < size:
                break
            assert flags & p.FLAG_TYPE_MASK == p.TYPE_REPLY and not flags & p.FLAG_ERROR
            ids.append(msg_id)
            del buf[:size]
    return ids


def test_client_that_never_reads_replies_cannot_grow_server_memory(connect, server):
    c = connect()
    assert not c.negotiate().is_error
    n = 30_000
    requests = b"".join(_region_read(i & 0xFFFF, 0, 0, 4096) for i in range(n))
    sent = pipeline_unread(c.sock, requests)
    queued = sum(len(d) for d, _ in server._out) + sum(map(len, server._batch))
    assert queued <= MAX_QUEUED_OUTPUT + 4096 + 64, f"{queued} reply bytes buffered for one client"
    # Nothing is lost: once the client reads, every request it sent is answered, in order.
    rest = threading.Thread(target=c.sock.sendall, args=(requests[sent:],), daemon=True)
    rest.start()
    ids = drain_replies(c.sock, n)
    rest.join(10)
    assert ids == [i & 0xFFFF for i in range(n)]


def test_server_keeps_serving_after_a_decoding_bug(connect, server, monkeypatch):
    def boom(*_a):
        raise RuntimeError("parser bug")

    monkeypatch.setitem(p.REQUEST_PARSERS, Command.DEVICE_GET_INFO, boom)
    c = connect()
    assert not c.negotiate().is_error
    m = c.request(Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
    assert m.is_error and m.error == errno.EINVAL
    monkeypatch.undo()
    assert c.get_info()[2] == 9  # same connection, next request served
