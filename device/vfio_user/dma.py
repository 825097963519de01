"""Guest memory shared by the client (DMA_MAP/DMA_UNMAP) and bounds-checked access to it.

A DMA_MAP with an fd (QEMU's memfd for guest RAM) is mmapped MAP_SHARED at the given file offset;
one without an fd is remembered as a range reachable only through DMA_READ/DMA_WRITE messages.
The table is forgiving because QEMU is: it maps over existing ranges while the firmware shadows
ROMs and unmaps ranges it never mapped (libvfio-user#463, #544; vm-recon.md). Overlaps replace the
old bytes (splitting older mappings), unknown unmaps succeed.

Every access must lie wholly inside one mapping; anything else raises DmaError naming the
address, so a guest-supplied address can never reach memory outside what the client shared.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from bisect import bisect_right
from typing import NamedTuple

from .device_api import DmaError

log = logging.getLogger(__name__)

ADDRESS_LIMIT = 1 << 64
PAGE = mmap.ALLOCATIONGRANULARITY
# hugetlbfs-backed guest RAM can only be mapped at huge-page-aligned offsets; tried when the
# page-aligned mmap fails with EINVAL (libvfio-user docs/memory-mapping.md).
HUGE_PAGE = 2 << 20
# Bound on table size: QEMU's max_dma_maps default is 65535; overlaps can add splits.
MAX_DMA_SEGMENTS = 65536


class MappingInfo(NamedTuple):
    iova: int
    size: int
    fd_backed: bool
    readable: bool
    writable: bool


class _MappedFile:
    """One mmap shared by the segments split from a single DMA_MAP."""

    __slots__ = ("mm", "view", "refs")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.view = memoryview(mm)
        self.refs = 1

    def release(self) -> None:
        self.refs -= 1
        if self.refs:
            return
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            # A device still holds a view; the mapping goes away when the last view does.
            log.debug("DMA mapping still referenced by a view; unmapped when released")


class _Segment:
    __slots__ = ("start", "end", "mf", "base", "readable", "writable")

    def __init__(self, start: int, end: int, mf: _MappedFile | None, base: int, readable: bool, writable: bool) -> None:
        self.start = start
        self.end = end
        self.mf = mf  # None: message-based range (no fd)
        self.base = base  # offset in mf.mm that corresponds to ``start``
        self.readable = readable
        self.writable = writable

    def piece(self, start: int, end: int) -> _Segment:
        if self.mf is not None:
            self.mf.refs += 1
        return _Segment(start, end, self.mf, self.base + (start - self.start), self.readable, self.writable)


def _mmap_fd(fd: int, offset: int, size: int, writable: bool) -> tuple[mmap.mmap, int]:
    """mmap ``size`` bytes of ``fd`` from ``offset``; returns (mapping, offset of byte 0 in it)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    last_error: Exception | None = None
    for align in (PAGE, HUGE_PAGE):
        aligned = offset - offset % align
        delta = offset - aligned
        length = size + delta
        if align != PAGE:
            length = -(-length // align) * align
        try:
            return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=aligned), delta
        except (ValueError, OverflowError) as exc:  # Python's own checks: file too short, size/offset too big
            raise DmaError(f"cannot map fd at offset {offset:#x} size {size:#x}: {exc}", errno.EINVAL) from None
        except OSError as exc:
            last_error = exc
            if exc.errno != errno.EINVAL:
                break
    raise DmaError(f"cannot mmap fd at offset {offset:#x} size {size:#x}: {last_error}", errno.EINVAL)


class DmaTable:
    """The DMA map table of one client. Implements device_api.DmaAccess."""

    def __init__(self, max_segments: int = MAX_DMA_SEGMENTS) -> None:
        self._starts: list[int] = []
        self._segs: list[_Segment] = []
        self._last: _Segment | None = None  # lookup cache: consecutive accesses hit the same map
        self.max_segments = max_segments

    # ------------------------------------------------------------- map / unmap

    def map(self, iova: int, size: int, *, fd: int | None = None, offset: int = 0,
            readable: bool = True, writable: bool = True) -> None:
        """Add a mapping. Takes ownership of ``fd`` (always closed: the mmap keeps what it needs)."""
        try:
            if size <= 0 or iova < 0 or iova + size > ADDRESS_LIMIT:
                raise DmaError(f"bad DMA range {iova:#x}+{size:#x}", errno.EINVAL)
            if len(self._segs) + 2 > self.max_segments:
                raise DmaError(f"too many DMA mappings ({len(self._segs)})", errno.ENOSPC)
            mf = None
            base = 0
            if fd is not None:
                if offset < 0:
                    raise DmaError(f"bad DMA file offset {offset:#x}", errno.EINVAL)
                mm, base = _mmap_fd(fd, offset, size, writable)
                mf = _MappedFile(mm)
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        i = self._carve(iova, iova + size)
        self._segs.insert(i, _Segment(iova, iova + size, mf, base, readable, writable))
        self._starts.insert(i, iova)

    def unmap(self, iova: int, size: int) -> None:
        """Drop whatever is mapped in [iova, iova+size); ranges never mapped are fine."""
        if size <= 0 or iova < 0:
            return
        self._carve(iova, min(iova + size, ADDRESS_LIMIT))

    def unmap_all(self) -> None:
        segs, self._segs, self._starts, self._last = self._segs, [], [], None
        for seg in segs:
            if seg.mf is not None:
                seg.mf.release()

    close = unmap_all

    def _carve(self, start: int, end: int) -> int:
        """Remove [start, end) from the table (splitting partial overlaps); return insert index."""
        segs = self._segs
        i = bisect_right(self._starts, start) - 1
        if i < 0 or segs[i].end <= start:
            i += 1
        j = i
        pieces: list[_Segment] = []
        while j < len(segs) and segs[j].start < end:
            seg = segs[j]
            if seg.start < start:
                pieces.append(seg.piece(seg.start, start))
            if seg.end > end:
                pieces.append(seg.piece(end, seg.end))
            if seg.mf is not None:
                seg.mf.release()
            j += 1
        if j == i:
            return i
        segs[i:j] = pieces
        self._starts[i:j] = [s.start for s in pieces]
        self._last = None
        # The hole sits after a left remnant, if any.
        return i + (1 if pieces and pieces[0].start < start else 0)

    # ------------------------------------------------------------- lookup

    def _find(self, iova: int, length: int) -> _Segment:
        seg = self._last
        if seg is not None and seg.start <= iova and iova + length <= seg.end and length >= 0:
            return seg
        i = bisect_right(self._starts, iova) - 1
        if i >= 0 and length >= 0:
            seg = self._segs[i]
            if iova + length <= seg.end and iova < seg.end:
                self._last = seg
                return seg
        raise DmaError(f"DMA of {length} bytes at {iova:#x} is not inside one mapped guest range")

    def mapped(self, iova: int, length: int) -> MappingInfo | None:
        """The mapping that wholly contains [iova, iova+length), or None."""
        try:
            seg = self._find(iova, length)
        except DmaError:
            return None
        return MappingInfo(seg.start, seg.end - seg.start, seg.mf is not None, seg.readable, seg.writable)

    def mappings(self) -> list[MappingInfo]:
        return [MappingInfo(s.start, s.end - s.start, s.mf is not None, s.readable, s.writable) for s in self._segs]

    def __len__(self) -> int:
        return len(self._segs)

    # ------------------------------------------------------------- access

    def read(self, iova: int, length: int) -> bytes:
        seg = self._find(iova, length)
        if seg.mf is None:
            raise DmaError(f"guest range at {iova:#x} has no fd; use ctx.dma_read_async")
        if not seg.readable:
            raise DmaError(f"guest range at {iova:#x} is not readable")
        o = seg.base + (iova - seg.start)
        return seg.mf.mm[o : o + length]

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        seg = self._find(iova, n)
        if seg.mf is None:
            raise DmaError(f"guest range at {iova:#x} has no fd; use ctx.dma_write_async")
        if not seg.writable:
            raise DmaError(f"guest range at {iova:#x} is mapped read-only")
        o = seg.base + (iova - seg.start)
        seg.mf.mm[o : o + n] = data

    def view(self, iova: int, length: int) -> memoryview:
        """Zero-copy view; read-only mappings give a read-only view. Do not keep it past the
        current handler: the client may unmap the range at the next message."""
        seg = self._find(iova, length)
        if seg.mf is None:
            raise DmaError(f"guest range at {iova:#x} has no fd; no direct view possible")
        o = seg.base + (iova - seg.start)
        v = seg.mf.view[o : o + length]
        return v if seg.writable else v.toreadonly()
