from __future__ import annotations

import os


def open_fds() -> set[int]:
    """This process's open fds (the server runs in a thread of this process)."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


def eventfd_value(fd: int) -> int:
    """Read and reset an eventfd created with EFD_NONBLOCK; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
