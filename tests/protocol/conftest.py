from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from device.vfio_user.server import VfioUserServer

from .client import VfioUserClient
from .fake_device import FakeDevice


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@pytest.fixture
def device() -> Iterator[FakeDevice]:
    dev = FakeDevice()
    yield dev
    import os

    os.close(dev.bar2_fd)


@pytest.fixture
def server(tmp_path, device) -> Iterator[VfioUserServer]:
    srv = VfioUserServer(str(tmp_path / "vfio-user.sock"), device, dma_timeout=2.0)
    thread = srv.start_in_thread()
    yield srv
    srv.stop()
    thread.join(5)
    assert not thread.is_alive(), "server thread did not stop"


@pytest.fixture
def connect(server) -> Iterator[Callable[[], VfioUserClient]]:
    clients: list[VfioUserClient] = []

    def make() -> VfioUserClient:
        c = VfioUserClient(server.socket_path)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(connect) -> VfioUserClient:
    """A client that has negotiated VERSION like QEMU 11.1."""
    c = connect()
    reply = c.negotiate()
    assert reply.is_reply and not reply.is_error
    return c
