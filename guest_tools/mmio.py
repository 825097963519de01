"""Register access to the card's BAR0: one small interface, several backends.

The driver only ever calls ``read32(offset)`` / ``write32(offset, value)`` (all registers are 32-bit,
little-endian, device/contract/regs.py). Backends:

* :class:`MappedMmio` - a mmap of BAR0 (sysfs ``resource0`` or a vfio region): each access is one
  fixed-width load/store through ctypes, so the CPU issues exactly one 32-bit MMIO (a Python slice of
  the mmap could be split or widened by memcpy);
* :class:`FileMmio` - pread/pwrite on a file descriptor at a base offset (a vfio region that cannot be
  mmapped); one 4-byte syscall = one 32-bit access;
* the test harness (tests/guest/harness.py) supplies its own backend that calls the device model.

Standard library only: this runs on the guest's python3.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
from typing import Protocol

_U32 = struct.Struct("<I")


class MmioError(OSError):
    """Register access failed (the mapping is gone, or the offset is outside BAR0)."""


class Mmio(Protocol):
    """32-bit register access to one BAR."""

    size: int

    def read32(self, offset: int) -> int: ...

    def write32(self, offset: int, value: int) -> None: ...

    def close(self) -> None: ...


def _check(offset: int, size: int) -> None:
    if offset % 4 or not 0 <= offset <= size - 4:
        raise MmioError(f"register offset {offset:#x} is not a 32-bit register inside the {size:#x}-byte BAR")


class MappedMmio:
    """BAR access through a shared mapping (sysfs resource file or vfio region)."""

    def __init__(self, fd: int, size: int, offset: int = 0, *, what: str = "BAR0") -> None:
        try:
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except OSError as exc:
            raise MmioError(exc.errno, f"cannot mmap {what} ({size:#x} bytes): {exc.strerror}; "
                            "is the device enabled (sysfs 'enable') and are you root?") from None
        self.size = size
        # One ctypes view per register, built lazily: reading .value is a single 32-bit load.
        self._cells: dict[int, ctypes.c_uint32] = {}

    def _cell(self, offset: int) -> ctypes.c_uint32:
        cell = self._cells.get(offset)
        if cell is None:
            _check(offset, self.size)
            cell = self._cells[offset] = ctypes.c_uint32.from_buffer(self._mm, offset)
        return cell

    def read32(self, offset: int) -> int:
        return self._cell(offset).value

    def write32(self, offset: int, value: int) -> None:
        self._cell(offset).value = value & 0xFFFF_FFFF

    def close(self) -> None:
        self._cells.clear()  # ctypes views pin the buffer; drop them before closing the map
        with contextlib.suppress(BufferError):  # a caller still holds a cell: the map goes at exit
            self._mm.close()


class FileMmio:
    """BAR access by pread/pwrite on ``fd`` at ``base`` (the vfio region offset)."""

    def __init__(self, fd: int, size: int, base: int = 0) -> None:
        self._fd = fd
        self.size = size
        self._base = base

    def read32(self, offset: int) -> int:
        _check(offset, self.size)
        data = os.pread(self._fd, 4, self._base + offset)
        if len(data) != 4:
            raise MmioError(f"short register read at {offset:#x}")
        return _U32.unpack(data)[0]

    def write32(self, offset: int, value: int) -> None:
        _check(offset, self.size)
        if os.pwrite(self._fd, _U32.pack(value & 0xFFFF_FFFF), self._base + offset) != 4:
            raise MmioError(f"short register write at {offset:#x}")

    def close(self) -> None:
        pass  # the fd belongs to whoever opened the device


def read64(mmio: Mmio, offset: int) -> int:
    """A 64-bit statistics counter: LO first (the card latches HI on the LO read), then HI."""
    lo = mmio.read32(offset)
    hi = mmio.read32(offset + 4)
    return (hi << 32) | lo


class CallbackMmio:
    """BAR access through two callables (test harnesses: the device model's region read/write)."""

    def __init__(self, read, write, size: int) -> None:
        self._read = read  # (offset, 4) -> bytes
        self._write = write  # (offset, bytes) -> None
        self.size = size

    def read32(self, offset: int) -> int:
        _check(offset, self.size)
        return _U32.unpack(self._read(offset, 4))[0]

    def write32(self, offset: int, value: int) -> None:
        _check(offset, self.size)
        self._write(offset, _U32.pack(value & 0xFFFF_FFFF))

    def close(self) -> None:
        pass
