"""DMA memory for the user-space driver: buffers the card can reach, as (view, iova) pairs.

A :class:`DmaBuffer` is ``view`` (what *this process* reads and writes) plus ``iova`` (the address
*the card* uses for the same bytes). Three sources of such memory:

* :class:`PagemapMemory` - no IOMMU: the card uses guest-physical addresses. Anonymous memory is locked
  (mlock) and its frame numbers are read from /proc/self/pagemap (needs root: without CAP_SYS_ADMIN
  the kernel reports frame 0). Physically contiguous only within one 4 KiB page, so no single buffer
  may cross a page. Caveat: mlock stops swapping, not page migration (compaction may move a locked
  page unless vm.compact_unevictable_allowed=0); fine for tests, as ixy notes for its own allocator.
* :class:`IovaMemory` - vfio with an IOMMU: one anonymous mapping handed to VFIO_IOMMU_MAP_DMA at a
  chosen IOVA; contiguous as far as the card is concerned, any size.
* :class:`ArrayMemory` - a bytearray standing in for guest memory (host-side tests), iova = offset + base.

All three hand out memory with a bump allocator: the driver allocates once at init and never frees.
Standard library only.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

PAGE_SIZE = 4096
_PAGEMAP_ENTRY = struct.Struct("<Q")
_PFN_MASK = (1 << 55) - 1  # bits 54:0 (Documentation/admin-guide/mm/pagemap.rst)
_PAGE_PRESENT = 1 << 63


class DmaMemoryError(OSError):
    """DMA memory could not be allocated or translated."""


@dataclass(frozen=True)
class DmaBuffer:
    """``view``: this process's window on the memory; ``iova``: the card's address of view[0]."""

    view: memoryview
    iova: int

    @property
    def size(self) -> int:
        return len(self.view)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class _Bump:
    """Carves aligned pieces out of one contiguous chunk (view + iova)."""

    def __init__(self, view: memoryview, iova: int) -> None:
        self.view = view
        self.iova = iova
        self.used = 0

    def take(self, size: int, align: int) -> DmaBuffer | None:
        # Align the *device* address: that is what the card checks (RING_ALIGN).
        start = _align(self.iova + self.used, align) - self.iova
        if start + size > len(self.view):
            return None
        self.used = start + size
        return DmaBuffer(self.view[start:start + size], self.iova + start)


class DmaMemory:
    """Base: ``alloc(size, align)`` -> DmaBuffer; subclasses supply chunks."""

    max_contiguous: int = 1 << 30
    kind = "dma"

    def __init__(self) -> None:
        self._chunk: _Bump | None = None

    def alloc(self, size: int, align: int = 64) -> DmaBuffer:
        if size <= 0:
            raise ValueError("DMA allocation size must be positive")
        if size > self.max_contiguous:
            raise DmaMemoryError(f"{size}-byte DMA buffer requested, but {self.kind} memory is contiguous "
                                 f"only within {self.max_contiguous} bytes (use vfio for larger buffers)")
        if self._chunk is not None:
            buf = self._chunk.take(size, align)
            if buf is not None:
                return buf
        self._chunk = self._new_chunk(size)
        buf = self._chunk.take(size, align)
        if buf is None:  # pragma: no cover - _new_chunk always returns enough
            raise DmaMemoryError(f"internal: fresh chunk too small for {size} bytes")
        return buf

    def _new_chunk(self, size: int) -> _Bump:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _address_of(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


class PagemapMemory(DmaMemory):
    """Guest-physical DMA memory (no IOMMU): locked pages, addresses from /proc/self/pagemap."""

    max_contiguous = PAGE_SIZE
    kind = "pagemap"

    def __init__(self, pages_per_mapping: int = 64, pagemap_path: str = "/proc/self/pagemap") -> None:
        super().__init__()
        self._pages_per_mapping = pages_per_mapping
        self._pagemap_path = pagemap_path
        self._free_pages: list[DmaBuffer] = []
        self._maps: list[mmap.mmap] = []

    def _new_chunk(self, size: int) -> _Bump:
        if not self._free_pages:
            self._map_more()
        page = self._free_pages.pop()
        return _Bump(page.view, page.iova)

    def _map_more(self) -> None:
        length = self._pages_per_mapping * PAGE_SIZE
        mm = mmap.mmap(-1, length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = _address_of(mm)
        if _libc().mlock(ctypes.c_void_p(addr), ctypes.c_size_t(length)) != 0:
            err = ctypes.get_errno()
            raise DmaMemoryError(err, f"no DMA memory: mlock of {length} bytes failed ({os.strerror(err)}); "
                                 "not root, or RLIMIT_MEMLOCK too small?")
        view = memoryview(mm)
        for off in range(0, length, PAGE_SIZE):
            view[off] = 0  # touch: the page must exist before pagemap reports its frame
        self._maps.append(mm)
        frames = self._frames(addr, self._pages_per_mapping)
        pages = [DmaBuffer(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], pfn * PAGE_SIZE) for i, pfn in enumerate(frames)]
        self._free_pages.extend(reversed(pages))  # pop() hands them out in address order

    def _frames(self, addr: int, count: int) -> list[int]:
        try:
            with open(self._pagemap_path, "rb") as f:
                f.seek(addr // PAGE_SIZE * _PAGEMAP_ENTRY.size)
                raw = f.read(count * _PAGEMAP_ENTRY.size)
        except OSError as exc:
            raise DmaMemoryError(exc.errno, f"no DMA memory: cannot read {self._pagemap_path}: {exc.strerror}; "
                                 "not root?") from None
        frames = []
        for (entry,) in _PAGEMAP_ENTRY.iter_unpack(raw):
            pfn = entry & _PFN_MASK
            if not entry & _PAGE_PRESENT:
                raise DmaMemoryError("no DMA memory: a locked page is not present in pagemap")
            if pfn == 0:
                raise DmaMemoryError("no DMA memory: pagemap reports frame 0 - not root (CAP_SYS_ADMIN)?")
            frames.append(pfn)
        return frames

    def close(self) -> None:
        self._free_pages.clear()
        self._chunk = None
        # Mappings stay until exit: memoryviews handed out may still reference them.


class IovaMemory(DmaMemory):
    """vfio DMA memory: anonymous mappings registered with the IOMMU through ``map_dma``."""

    kind = "vfio"

    def __init__(self, map_dma: Callable[[int, int, int], None], iova_base: int = 0x1000_0000,
                 chunk_size: int = 4 << 20) -> None:
        super().__init__()
        self._map_dma = map_dma  # (vaddr, iova, size) -> None; raises on failure
        self._next_iova = iova_base
        self._chunk_size = chunk_size
        self._maps: list[mmap.mmap] = []

    def _new_chunk(self, size: int) -> _Bump:
        length = _align(max(size, self._chunk_size), PAGE_SIZE)
        mm = mmap.mmap(-1, length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        iova = self._next_iova
        self._map_dma(_address_of(mm), iova, length)  # pins the pages itself
        self._next_iova += length
        self._maps.append(mm)
        return _Bump(memoryview(mm), iova)


class ArrayMemory(DmaMemory):
    """A bytearray as guest memory: buffers are views into it, iova = base + offset (tests)."""

    kind = "array"

    def __init__(self, size: int = 4 << 20, base: int = 0x1_0000_0000) -> None:
        super().__init__()
        self.memory = bytearray(size)
        self.base = base
        self._whole = _Bump(memoryview(self.memory), base)

    def _new_chunk(self, size: int) -> _Bump:
        raise DmaMemoryError(f"test guest memory of {len(self.memory)} bytes exhausted")

    def alloc(self, size: int, align: int = 64) -> DmaBuffer:
        buf = self._whole.take(size, align)
        if buf is None:
            raise DmaMemoryError(f"test guest memory of {len(self.memory)} bytes exhausted")
        return buf

    def offset_of(self, iova: int, length: int) -> int:
        """Offset in ``memory`` of [iova, iova+length); raises ValueError outside it."""
        off = iova - self.base
        if off < 0 or length < 0 or off + length > len(self.memory):
            raise ValueError(f"guest address {iova:#x}+{length} outside test memory")
        return off
