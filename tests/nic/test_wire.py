"""Wire backends over real UNIX sockets, framed the way QEMU's -netdev dgram / stream frame them."""

from __future__ import annotations

import contextlib
import select
import socket
import struct

import pytest
from scapy.utils import rdpcap

from device.contract import regs
from device.contract.regs import RxWbFlags, TxFlags, TxStatus
from device.nic import wire
from tests.fakes import FakeContext

from .conftest import make_rig
from .test_datapath import udp_frame

EOP = int(TxFlags.EOP)


def pump(*ctxs: FakeContext, rounds: int = 10, timeout: float = 0.2) -> None:
    """Serve readable sockets like the device server's loop would, until quiet."""
    for _ in range(rounds):
        fds = {fd: ctx for ctx in ctxs for fd in ctx.readers}
        if not fds:
            return
        ready, _, _ = select.select(list(fds), [], [], timeout)
        if not ready:
            return
        for fd in ready:
            callback = fds[fd].readers.get(fd)
            if callback is not None:
                callback()
        for ctx in ctxs:
            ctx.run()


def start(rig_):
    d = rig_.drv
    d.bus_master()
    d.enable()
    d.setup_ring("tx", 0, 16)
    d.setup_ring("rx", 0, 16)
    return d


def test_dgram_one_frame_per_datagram(tmp_path):
    qemu_path, card_path = str(tmp_path / "qemu.sock"), str(tmp_path / "card.sock")
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # plays QEMU's local.path end
    qemu.bind(qemu_path)
    r = make_rig(wire={"type": "dgram", "path": card_path, "peer": qemu_path})
    try:
        drv = start(r)
        assert drv.r(regs.STATUS) & regs.Status.LINK_UP
        rx = drv.post_rx(2)
        frame = udp_frame(b"to qemu")
        drv.send(frame, flags=EOP)
        r.ctx.run()
        qemu.settimeout(2)
        assert qemu.recv(65536) == frame
        incoming = udp_frame(b"from qemu")
        qemu.sendto(incoming, card_path)
        pump(r.ctx)
        d, data = drv.rx(rx[0])
        assert d.wb_flags & RxWbFlags.DD and data == incoming
    finally:
        r.datapath.close()
        qemu.close()


def test_dgram_learns_the_peer_from_the_first_datagram(tmp_path):
    qemu_path, card_path = str(tmp_path / "q.sock"), str(tmp_path / "c.sock")
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    qemu.bind(qemu_path)
    r = make_rig(wire={"type": "dgram", "path": card_path})
    try:
        drv = start(r)
        assert not drv.r(regs.STATUS) & regs.Status.LINK_UP
        drv.post_rx(1)
        qemu.sendto(udp_frame(b"hello"), card_path)
        pump(r.ctx)
        assert drv.r(regs.STATUS) & regs.Status.LINK_UP
        assert drv.r(regs.ICR) & regs.Cause.LINK
        drv.send(udp_frame(b"answer"), flags=EOP)
        r.ctx.run()
        qemu.settimeout(2)
        assert qemu.recv(65536) == udp_frame(b"answer")
    finally:
        r.datapath.close()
        qemu.close()


def test_dgram_holds_a_burst_the_slow_peer_has_no_room_for(tmp_path):
    """A UNIX datagram receiver queues only net.unix.max_dgram_qlen datagrams (10 by default); a burst
    beyond that must wait for the peer (as QEMU under TCG drains slowly), not be dropped."""
    qemu_path, card_path = str(tmp_path / "qemu.sock"), str(tmp_path / "card.sock")
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    qemu.bind(qemu_path)
    r = make_rig(wire={"type": "dgram", "path": card_path, "peer": qemu_path})
    try:
        drv = start(r)
        frames = [udp_frame(bytes([n]) * 40) for n in range(15)]  # the 16-entry ring holds 15
        for f in frames:
            drv.send(f, flags=EOP)
        r.ctx.run()
        got = []
        qemu.setblocking(False)
        for _ in range(200):
            while True:
                try:
                    got.append(qemu.recv(65536))
                except BlockingIOError:
                    break
            if len(got) == len(frames):
                break
            r.ctx.advance(0.001)  # the card's retry timer
        assert got == frames  # every frame, in order
        assert r.wire.stats.tx_dropped == 0 and r.datapath.extra.tx_not_sent == 0
        assert drv.stat("TX_PACKETS") == len(frames)
    finally:
        r.datapath.close()
        qemu.close()


def test_dgram_peer_absent_is_counted_not_fatal(tmp_path):
    r = make_rig(wire={"type": "dgram", "path": str(tmp_path / "c.sock"), "peer": str(tmp_path / "gone.sock")})
    try:
        drv = start(r)
        i = drv.send(udp_frame(), flags=EOP)
        r.ctx.run()
        assert drv.tx_wb(i).wb_status == TxStatus.OK  # the card sent it; nobody listened
        assert r.wire.stats.tx_dropped == 1 and r.datapath.extra.tx_not_sent == 1
        assert drv.stat("TX_PACKETS") == 0
        assert not drv.r(regs.STATUS) & regs.Status.LINK_UP
    finally:
        r.datapath.close()


def test_dgram_refuses_to_replace_a_regular_file(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        wire.build_wire("dgram", str(path), None)
    assert path.read_text() == "keep me"


def test_stream_server_uses_4_byte_big_endian_lengths(tmp_path):
    path = str(tmp_path / "stream.sock")
    r = make_rig(wire={"type": "stream", "path": path})
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # plays QEMU -netdev stream,server=off
    try:
        drv = start(r)
        rx = drv.post_rx(4)
        client.connect(path)
        pump(r.ctx)
        assert drv.r(regs.STATUS) & regs.Status.LINK_UP
        f1, f2 = udp_frame(b"first"), udp_frame(b"second" * 20)
        data = struct.pack(">I", len(f1)) + f1 + struct.pack(">I", len(f2)) + f2
        client.sendall(data[:2])  # split inside a length prefix
        pump(r.ctx)
        client.sendall(data[2:50])
        pump(r.ctx)
        client.sendall(data[50:])
        pump(r.ctx)
        assert [drv.rx(i)[1] for i in rx[:2]] == [f1, f2]
        out = udp_frame(b"reply")
        drv.send(out, flags=EOP)
        r.ctx.run()
        client.settimeout(2)
        got = b""
        while len(got) < 4 + len(out):
            got += client.recv(65536)
        assert got == len(out).to_bytes(4, "big") + out
        # A length QEMU itself would refuse drops the connection (and the link).
        client.sendall(struct.pack(">I", wire.STREAM_MAX_FRAME + 1))
        pump(r.ctx)
        assert r.wire.stats.rx_errors == 1
        assert not drv.r(regs.STATUS) & regs.Status.LINK_UP
    finally:
        client.close()
        r.datapath.close()


def test_stream_client_retries_until_the_server_exists(tmp_path):
    path = str(tmp_path / "qemu-listens.sock")
    r = make_rig(wire={"type": "stream", "path": path, "mode": "client"})
    try:
        start(r)
        assert r.ctx.timers, "a retry is scheduled while nobody listens"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        r.ctx.advance(wire.STREAM_RETRY)
        conn, _ = server.accept()
        assert r.drv.r(regs.STATUS) & regs.Status.LINK_UP
        conn.close()
        server.close()
    finally:
        r.datapath.close()


def test_cable_between_two_cards(tmp_path):
    a_path, b_path = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    a = make_rig(wire={"type": "cable", "path": a_path, "peer": b_path})
    b = make_rig(wire={"type": "cable", "path": b_path, "peer": a_path},
                 nic={"mac": "02:49:50:4e:43:01"})
    try:
        da, db = start(a), start(b)
        rx = db.post_rx(1)
        frame = udp_frame(b"over the cable", dst="02:49:50:4e:43:01")
        da.send(frame, flags=EOP)
        a.ctx.run()
        pump(a.ctx, b.ctx)
        assert db.rx(rx[0])[1] == frame
        assert db.r(regs.STATUS) & regs.Status.LINK_UP
    finally:
        a.datapath.close()
        b.datapath.close()


def test_pcap_is_readable_by_scapy_while_the_card_runs(tmp_path):
    pcap = tmp_path / "wire.pcap"
    r = make_rig(wire={"type": "loopback", "pcap": str(pcap)})
    try:
        drv = start(r)
        drv.post_rx(4)
        frames = [udp_frame(bytes([n]) * (10 + n)) for n in range(3)]
        for f in frames:
            drv.send(f, flags=EOP)
        r.ctx.run()
        records = rdpcap(str(pcap))  # not closed yet: every record is already flushed
        assert [bytes(p) for p in records] == frames + frames  # one TX pass, then the loopback brings them back
        assert records[0].time > 0
    finally:
        r.datapath.close()


def test_loopback_and_none_link_state():
    up = make_rig(wire={"type": "loopback"})
    down = make_rig(wire={"type": "none"})
    assert up.drv.r(regs.STATUS) & regs.Status.LINK_UP
    assert not down.drv.r(regs.STATUS) & regs.Status.LINK_UP
    start(down)
    down.drv.send(udp_frame(), flags=EOP)
    down.ctx.run()
    assert down.wire.stats.tx_dropped == 1
    up.datapath.close()
    down.datapath.close()


def test_stream_backlog_still_flushes_after_the_client_reattaches(tmp_path):
    """Frames queued for a slow stream peer are not stranded when the vfio-user client (QEMU) detaches
    and attaches again: the wire keeps its connection, so the queue must keep draining."""
    path = str(tmp_path / "stream.sock")
    w = wire.StreamWire(path)
    ctx = FakeContext()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        w.attach(ctx, lambda frame: None, lambda up: None)
        peer.connect(path)
        pump(ctx)
        assert w.conn is not None
        frame = bytes(range(256)) * 200  # 51200 bytes
        sent = 0
        while not w._tx:  # fill the socket until the wire has to queue
            assert w.send(frame)
            sent += 1
        assert w.send(frame)  # one more, behind the queued bytes
        sent += 1
        w.detach()
        ctx = FakeContext()
        w.attach(ctx, lambda frame: None, lambda up: None)
        want = sent * (4 + len(frame))
        got = 0
        peer.settimeout(0.01)
        for _ in range(500):
            with contextlib.suppress(TimeoutError):
                got += len(peer.recv(1 << 20))
            ctx.advance(0.01)
            if got == want:
                break
        assert got == want
    finally:
        peer.close()
        w.close()
