"""Interrupt eventfds handed over by DEVICE_SET_IRQS, and raising them.

Semantics follow the VFIO_DEVICE_SET_IRQS ioctl (linux/vfio.h, drivers/vfio/pci/vfio_pci_intrs.c)
as the vfio-user spec adopts it, plus the forms QEMU's client really sends
(shared/reference/vfio-user-notes.md §2.2):

* DATA_NONE|TRIGGER, count 0: disable every vector of the index (close its eventfds);
* DATA_EVENTFD|TRIGGER with fds: assign fds to vectors start..start+count-1 (closing replaced fds);
* DATA_EVENTFD|TRIGGER without fds (or an fd of -1): de-assign those vectors;
* DATA_NONE|TRIGGER count > 0 / DATA_BOOL|TRIGGER: fire those vectors (loopback test);
* DATA_NONE|MASK / UNMASK (and DATA_BOOL): mask state; a trigger while masked is remembered and
  delivered on unmask (INTx level semantics);
* DATA_EVENTFD|UNMASK: the INTx resample eventfd (kept, closed on replace);
* start + count beyond the index's vector count: EINVAL.

Raising a vector writes 1 to its eventfd (spec "VFIO_USER_DEVICE_SET_IRQS"; os.eventfd_write).
The single server loop must never block on that write, so SET_IRQS accepts only eventfds (a pipe
would fill up) and makes each one non-blocking (O_NONBLOCK is shared with the client's copy of the
fd; QEMU creates them with EFD_NONBLOCK anyway). A counter at its maximum then gives EAGAIN: the
interrupt is still pending for the reader, nothing is lost and nothing waits.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence

from .device_api import VfioUserError
from .protocol import IrqSetFlag

F = IrqSetFlag


def _check_eventfd(fd: int) -> None:
    """Refuse anything but an eventfd; make it non-blocking (see the module docstring)."""
    if fd < 0:
        return
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target == "anon_inode:[eventfd]":
            os.set_blocking(fd, False)
            return
    except OSError as exc:
        raise VfioUserError(errno.EINVAL, f"SET_IRQS: unusable fd: {exc.strerror}") from None
    raise VfioUserError(errno.EINVAL, f"SET_IRQS: fd is not an eventfd ({target.split(':')[0]})")


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class IrqTable:
    """Per-index vectors: trigger eventfd, resample (unmask) eventfd, mask and pending bits."""

    def __init__(self, counts: Sequence[int]) -> None:
        self.counts = list(counts)
        self._fds: list[list[int]] = [[-1] * n for n in self.counts]
        self._unmask_fds: list[list[int]] = [[-1] * n for n in self.counts]
        self._masked: list[list[bool]] = [[False] * n for n in self.counts]
        self._pending: list[list[bool]] = [[False] * n for n in self.counts]

    # ------------------------------------------------------------- SET_IRQS

    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 fds: Sequence[int] = (), data: bytes = b"") -> list[tuple[int, int]]:
        """Apply one SET_IRQS. Takes ownership of ``fds`` (closed on error).

        Returns the (index, vector) pairs that were unmasked, so the device can re-raise a level
        interrupt that is still asserted.
        """
        try:
            return self._set_irqs(index, flags, start, count, list(fds), data)
        except BaseException:
            for fd in fds:
                _close(fd)
            raise

    def _set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int], data: bytes) -> list[tuple[int, int]]:
        if not 0 <= index < len(self.counts):
            raise VfioUserError(errno.EINVAL, f"SET_IRQS: irq index {index} does not exist")
        n = self.counts[index]
        data_type = flags & (F.DATA_NONE | F.DATA_BOOL | F.DATA_EVENTFD)
        action = flags & (F.ACTION_MASK | F.ACTION_UNMASK | F.ACTION_TRIGGER)
        if bin(data_type).count("1") != 1 or bin(action).count("1") != 1:
            raise VfioUserError(errno.EINVAL, f"SET_IRQS: flags {flags:#x} need one data type and one action")
        if start < 0 or count < 0 or start + count > n:
            raise VfioUserError(errno.EINVAL, f"SET_IRQS: vectors {start}+{count} exceed the {n} of index {index}")
        if data_type == F.DATA_BOOL and len(data) != count:
            raise VfioUserError(errno.EINVAL, f"SET_IRQS: DATA_BOOL needs {count} bytes")
        if fds and (data_type != F.DATA_EVENTFD or len(fds) != count):
            raise VfioUserError(errno.EINVAL, f"SET_IRQS: {len(fds)} fds do not match count {count}")
        for fd in fds:
            _check_eventfd(fd)
        vectors = range(start, start + count)

        if action == F.ACTION_TRIGGER:
            if data_type == F.DATA_EVENTFD:
                table = self._fds[index]
                for k, v in enumerate(vectors):
                    _close(table[v])
                    table[v] = fds[k] if fds else -1
            elif data_type == F.DATA_NONE and count == 0:
                self._disable(index)
            else:
                for k, v in enumerate(vectors):
                    if data_type == F.DATA_NONE or data[k]:
                        self.trigger(index, v)
            return []

        if data_type == F.DATA_EVENTFD:
            if action == F.ACTION_MASK:
                raise VfioUserError(errno.EINVAL, "SET_IRQS: a mask eventfd is not supported")
            table = self._unmask_fds[index]
            for k, v in enumerate(vectors):
                _close(table[v])
                table[v] = fds[k] if fds else -1
            return []

        masked = action == F.ACTION_MASK
        unmasked: list[tuple[int, int]] = []
        for k, v in enumerate(vectors):
            if data_type == F.DATA_BOOL and not data[k]:
                continue
            was = self._masked[index][v]
            self._masked[index][v] = masked
            if was and not masked:
                unmasked.append((index, v))
                if self._pending[index][v]:
                    self._pending[index][v] = False
                    self._signal(self._fds[index][v])
        return unmasked

    def _disable(self, index: int) -> None:
        for table in (self._fds[index], self._unmask_fds[index]):
            for v, fd in enumerate(table):
                _close(fd)
                table[v] = -1
        n = self.counts[index]
        self._masked[index] = [False] * n
        self._pending[index] = [False] * n

    # ------------------------------------------------------------- use

    def configured(self, index: int, vector: int = 0) -> bool:
        try:
            return self._fds[index][vector] >= 0
        except IndexError:
            return False

    def eventfd(self, index: int, vector: int = 0) -> int:
        """The trigger eventfd of (index, vector), or -1."""
        try:
            return self._fds[index][vector]
        except IndexError:
            return -1

    def masked(self, index: int, vector: int = 0) -> bool:
        try:
            return self._masked[index][vector]
        except IndexError:
            return False

    def trigger(self, index: int, vector: int = 0) -> bool:
        """Raise (index, vector). False if the client gave no eventfd for it."""
        try:
            fd = self._fds[index][vector]
        except IndexError:
            return False
        if fd < 0:
            return False
        if self._masked[index][vector]:
            self._pending[index][vector] = True
            return True
        return self._signal(fd)

    @staticmethod
    def _signal(fd: int) -> bool:
        if fd < 0:
            return False
        try:
            os.eventfd_write(fd, 1)
        except OSError:  # EAGAIN (counter would overflow: still pending) or a bad fd
            return False
        return True

    def close_all(self) -> None:
        """Client gone: close every eventfd, clear masks (spec "Client Disconnection")."""
        for index in range(len(self.counts)):
            self._disable(index)
