"""DEVICE_SET_IRQS with real eventfds (forms QEMU sends; linux/vfio.h semantics)."""

from __future__ import annotations

import os

from .client import (
    IRQ_ACTION_MASK,
    IRQ_ACTION_TRIGGER,
    IRQ_ACTION_UNMASK,
    IRQ_DATA_BOOL,
    IRQ_DATA_EVENTFD,
    IRQ_DATA_NONE,
)
from .conftest import wait_for
from .fake_device import IRQ
from .helpers import eventfd_value, open_fds

MSIX, INTX = 2, 0
EVENTFD_TRIGGER = IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER


def _raise(client, vector: int) -> bool:
    """Ask the fake device to raise MSI-X ``vector``; True if the library had an eventfd."""
    client.write32(0, IRQ, vector)
    return client.read32(0, IRQ) == 1


def test_assign_trigger_deassign_swap_disable(client):
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
    spare = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        assert not client.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 4, efds).is_error
        for v in range(4):
            assert _raise(client, v)
            assert [eventfd_value(fd) for fd in efds] == [int(i == v) for i in range(4)]

        # De-assign vector 1: count 1, no fds (QEMU's form for invalid slots).
        assert not client.set_irqs(MSIX, EVENTFD_TRIGGER, 1, 1).is_error
        assert not _raise(client, 1)
        assert eventfd_value(efds[1]) == 0

        # Swap vector 0 to another eventfd: only the new one fires.
        assert not client.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 1, [spare]).is_error
        assert _raise(client, 0)
        assert eventfd_value(spare) == 1 and eventfd_value(efds[0]) == 0

        # Disable all: DATA_NONE|TRIGGER, start 0, count 0.
        assert not client.set_irqs(MSIX, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 0).is_error
        for v in range(4):
            assert not _raise(client, v)
        assert [eventfd_value(fd) for fd in efds + [spare]] == [0] * 5
    finally:
        for fd in efds + [spare]:
            os.close(fd)


def test_enable_msix_with_no_vector(client):
    # vfio_enable_msix_no_vec: start 0 count 1 without fd.
    assert not client.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 1).is_error
    assert not _raise(client, 0)


def test_out_of_range_is_einval_and_fds_are_closed(client):
    before = open_fds()
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        m = client.set_irqs(MSIX, EVENTFD_TRIGGER, 3, 2, efds)  # vectors 3,4 of 4
        assert m.is_error and m.error == 22
        m = client.set_irqs(7, EVENTFD_TRIGGER, 0, 2, efds)  # no such index
        assert m.is_error and m.error == 22
        m = client.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 1, efds)  # 2 fds for count 1
        assert m.is_error and m.error == 22
        m = client.set_irqs(MSIX, IRQ_DATA_NONE | IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, 0, 1)
        assert m.is_error and m.error == 22
    finally:
        for fd in efds:
            os.close(fd)
    wait_for(lambda: open_fds() <= before)


def test_replaced_fds_are_closed(client):
    before = open_fds()
    for _ in range(5):
        fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
        assert not client.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 4, fds).is_error
        for fd in fds:
            os.close(fd)
    # Only the last 4 received dups may stay open in the server.
    assert len(open_fds() - before) == 4
    assert not client.set_irqs(MSIX, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 0).is_error
    assert len(open_fds() - before) == 0


def test_intx_mask_defers_trigger_until_unmask(client, device):
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert not client.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, [efd]).is_error
        assert not client.set_irqs(INTX, IRQ_DATA_NONE | IRQ_ACTION_MASK, 0, 1).is_error
        # DATA_NONE|TRIGGER with count 1 is the loopback trigger.
        assert not client.set_irqs(INTX, IRQ_DATA_NONE | IRQ_ACTION_TRIGGER, 0, 1).is_error
        assert eventfd_value(efd) == 0, "masked: must stay pending"
        assert not client.set_irqs(INTX, IRQ_DATA_NONE | IRQ_ACTION_UNMASK, 0, 1).is_error
        assert eventfd_value(efd) == 1, "pending interrupt delivered at unmask"
        wait_for(lambda: device.unmasked == [(INTX, 0)])
        # DATA_BOOL form: trigger where the byte is non-zero.
        assert not client.set_irqs(INTX, IRQ_DATA_BOOL | IRQ_ACTION_TRIGGER, 0, 1, data=b"\1").is_error
        assert eventfd_value(efd) == 1
    finally:
        os.close(efd)


def test_resample_eventfd_accepted(client):
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert not client.set_irqs(INTX, IRQ_DATA_EVENTFD | IRQ_ACTION_UNMASK, 0, 1, [efd]).is_error
    finally:
        os.close(efd)
