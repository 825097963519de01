"""DEVICE_RESET, client disconnect/reconnect, socket file handling, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from device.vfio_user.server import VfioUserServer

from .client import DEVICE_RESET, IRQ_ACTION_TRIGGER, IRQ_DATA_EVENTFD, VfioUserClient
from .conftest import wait_for
from .fake_device import SCRATCH, FakeDevice
from .helpers import open_fds


def test_device_reset(client, device):
    client.write32(0, SCRATCH, 5)
    m = client.request(DEVICE_RESET)
    assert m.flags == 1 and m.size == 16 and m.error == 0
    assert device.reset_count == 1
    assert client.read32(0, SCRATCH) == 0


def test_disconnect_drops_maps_and_irqs_but_keeps_device_state(server, connect, device):
    before = open_fds()
    c = connect()
    assert not c.negotiate().is_error
    wait_for(lambda: device.attach_count == 1)
    memfd = os.memfd_create("ram")
    os.ftruncate(memfd, 0x10000)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    assert not c.dma_map(0x10000, 0x10000, fd=memfd).is_error
    assert not c.set_irqs(2, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, 0, 1, [efd]).is_error
    c.write32(0, SCRATCH, 0xC0FFEE)
    os.close(memfd)
    os.close(efd)
    c.close()
    wait_for(lambda: device.detach_count == 1)
    wait_for(lambda: open_fds() <= before)  # mmaps' fds and eventfds all closed

    c2 = connect()
    assert not c2.negotiate().is_error
    assert c2.read32(0, SCRATCH) == 0xC0FFEE  # device state survived
    assert device.attach_count == 2


def test_second_client_waits_until_first_leaves(server, connect):
    a = connect()
    assert not a.negotiate().is_error
    b = connect()  # queued in the backlog
    msg_id = b.send(1, b"\0\0\0\0" + b'{"capabilities":{}}' + b" " * 40 + b"\0")
    with pytest.raises(TimeoutError):
        b.recv(timeout=0.3)
    a.close()
    assert not b.wait_reply(msg_id).is_error


def test_stale_socket_is_replaced_and_live_server_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # file remains, nobody listens
    dev = FakeDevice()
    srv = VfioUserServer(path, dev)
    t = srv.start_in_thread()
    try:
        with pytest.raises(RuntimeError, match="live server"):
            VfioUserServer(path, dev).listen()
        c = VfioUserClient(path)
        assert not c.negotiate().is_error
        c.close()
    finally:
        srv.stop()
        t.join(5)
        os.close(dev.bar2_fd)
    assert not os.path.exists(path), "socket file removed on shutdown"


def test_regular_file_at_socket_path_is_not_deleted(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    dev = FakeDevice()
    with pytest.raises(FileExistsError):
        VfioUserServer(str(path), dev).listen()
    assert path.read_text() == "keep me"
    os.close(dev.bar2_fd)


def test_serve_exits_cleanly_on_sigterm(tmp_path):
    path = str(tmp_path / "sig.sock")
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]);"
        "from device.vfio_user import serve; from tests.protocol.fake_device import FakeDevice;"
        "serve(sys.argv[1], FakeDevice(), ready_callback=lambda: print('ready', flush=True))"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", code, path, root], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        c = VfioUserClient(path)
        assert not c.negotiate().is_error
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(path)
    time.sleep(0)
