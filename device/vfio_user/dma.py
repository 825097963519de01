"""Guest memory shared by the client (DMA_MAP/DMA_UNMAP) and bounds-checked access to it.

A DMA_MAP with an fd (QEMU's memfd for guest RAM) is served from one MAP_SHARED mapping of the
whole file, shared by every map of that file (so maps do not each cost a file descriptor);
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
import fcntl
import logging
import mmap
import os
import stat
from bisect import bisect_right

from .device_api import DmaError, MappingInfo

log = logging.getLogger(__name__)

ADDRESS_LIMIT = 1 << 64
# Bound on table size: QEMU's max_dma_maps default is 65535; overlaps can add splits. This is the
# real limit on DMA_MAPs, fd-backed or not: maps of the same file share one mmap (and the one fd
# Python's mmap object keeps), so the fd table does not bound them (see MAX_FILE_MAPPINGS).
MAX_DMA_SEGMENTS = 65536
# Distinct file mappings alive at once. Each holds a duplicate fd (Python's mmap keeps one) and, for
# files we cannot seal, the client's fd as well. QEMU shares one memfd for guest RAM (a few more
# for ROMs); a new one is needed only for another file, or when a file grew past what is mapped.
MAX_FILE_MAPPINGS = 256


class _MappedFile:
    """One mmap of a whole file, shared by every segment that DMA_MAPs part of it.

    Guest RAM that shrinks under a MAP_SHARED mapping raises SIGBUS on the next access, which would
    kill the server. So at map time we add F_SEAL_SHRINK (memfd_create(2), fcntl(2) "File Sealing")
    where the file allows it; QEMU's memory-backend-memfd is sealed already (seal=on). A file that
    cannot be sealed (tmpfs/hugetlbfs files, memfds without MFD_ALLOW_SEALING) is never touched
    through the mapping: reads and writes go through pread/pwrite on the client's fd after a size
    check, so a shrunk file gives a short transfer, i.e. a DmaError, never a signal.
    """

    __slots__ = ("mm", "view", "refs", "key", "length", "writable", "sealed", "fd")

    def __init__(self, mm: mmap.mmap, key: tuple[int, int], length: int, writable: bool, sealed: bool,
                 fd: int) -> None:
        self.mm = mm
        self.view = memoryview(mm)
        self.refs = 1
        self.key = key
        self.length = length
        self.writable = writable
        self.sealed = sealed
        self.fd = fd  # -1 when sealed: the mapping is safe to touch directly

    def release(self) -> bool:
        """Drop one reference; True when this was the last one (the mapping is gone)."""
        self.refs -= 1
        if self.refs:
            return False
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            # A device still holds a view; the mapping goes away when the last view does.
            log.debug("DMA mapping still referenced by a view; unmapped when released")
        return True

    def check(self, offset: int, length: int) -> None:
        """Unsealed files: the bytes must still exist (the client may have truncated the file)."""
        if offset + length > os.fstat(self.fd).st_size:
            raise DmaError(f"guest memory file shrank under a DMA mapping ({length} bytes at file offset "
                           f"{offset:#x} are gone)")

    def pread(self, offset: int, length: int) -> bytes:
        self.check(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise DmaError(f"guest memory file shrank under a DMA mapping (read at file offset {offset:#x})")
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.check(offset, n)  # pwrite past the end would grow the file: refuse instead
        if os.pwrite(self.fd, data, offset) != n:
            raise DmaError(f"short write to guest memory at file offset {offset:#x}")


class _Segment:
    __slots__ = ("start", "end", "mf", "base", "readable", "writable")

    def __init__(self, start: int, end: int, mf: _MappedFile | None, base: int, readable: bool, writable: bool) -> None:
        self.start = start
        self.end = end
        self.mf = mf  # None: message-based range (no fd)
        self.base = base  # offset in mf.mm (the file offset) that corresponds to ``start``
        self.readable = readable
        self.writable = writable

    def piece(self, start: int, end: int) -> _Segment:
        if self.mf is not None:
            self.mf.refs += 1
        return _Segment(start, end, self.mf, self.base + (start - self.start), self.readable, self.writable)


def _seal_shrink(fd: int) -> bool:
    """Forbid shrinking the file (F_SEAL_SHRINK); True if it is (now) sealed against it."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:  # not a memfd/shmem file: sealing is not supported
        return False


def _mmap_file(fd: int, length: int, writable: bool) -> mmap.mmap:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=0)
    except (ValueError, OverflowError, OSError) as exc:
        raise DmaError(f"cannot mmap the DMA file ({length:#x} bytes): {exc}", errno.EINVAL) from None


class DmaTable:
    """The DMA map table of one client. Implements device_api.DmaAccess."""

    def __init__(self, max_segments: int = MAX_DMA_SEGMENTS, max_files: int = MAX_FILE_MAPPINGS) -> None:
        self._starts: list[int] = []
        self._segs: list[_Segment] = []
        self._last: _Segment | None = None  # lookup cache: consecutive accesses hit the same map
        self.max_segments = max_segments
        self.max_files = max_files
        self._files: dict[tuple[int, int], _MappedFile] = {}  # newest mapping of each file
        self._live_files = 0  # _MappedFile objects alive (also those replaced in _files)

    # ------------------------------------------------------------- map / unmap

    def map(self, iova: int, size: int, *, fd: int | None = None, offset: int = 0,
            readable: bool = True, writable: bool = True) -> None:
        """Add a mapping. Takes ownership of ``fd`` (closed, or kept by the mapping)."""
        mf = None
        try:
            if size <= 0 or iova < 0 or iova + size > ADDRESS_LIMIT:
                raise DmaError(f"bad DMA range {iova:#x}+{size:#x}", errno.EINVAL)
            if len(self._segs) + 2 > self.max_segments:
                raise DmaError(f"too many DMA mappings ({len(self._segs)})", errno.ENOSPC)
            if fd is not None:
                mf = self._file_mapping(fd, offset, size, writable)
                if mf.fd == fd:
                    fd = None  # kept by the mapping
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        i = self._carve(iova, iova + size)
        self._segs.insert(i, _Segment(iova, iova + size, mf, offset if mf is not None else 0, readable, writable))
        self._starts.insert(i, iova)

    def _file_mapping(self, fd: int, offset: int, size: int, writable: bool) -> _MappedFile:
        """A referenced mapping of the file behind ``fd`` that covers [offset, offset+size)."""
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise DmaError(f"DMA_MAP fd: {exc.strerror}", errno.EINVAL) from None
        if not stat.S_ISREG(st.st_mode):
            raise DmaError("DMA_MAP fd is not a regular file (memfd, tmpfs or hugetlbfs)", errno.EINVAL)
        if offset < 0 or offset + size > st.st_size:
            raise DmaError(f"DMA_MAP range {offset:#x}+{size:#x} lies beyond the end of its file "
                           f"({st.st_size:#x} bytes)", errno.EINVAL)
        key = (st.st_dev, st.st_ino)
        mf = self._files.get(key)
        if mf is not None and offset + size <= mf.length and (mf.writable or not writable):
            mf.refs += 1
            return mf
        if self._live_files >= self.max_files:
            raise DmaError(f"too many distinct DMA files mapped ({self._live_files})", errno.ENOSPC)
        sealed = _seal_shrink(fd)
        mm = _mmap_file(fd, st.st_size, writable)
        mf = _MappedFile(mm, key, st.st_size, writable, sealed, -1 if sealed else fd)
        self._files[key] = mf
        self._live_files += 1
        return mf

    def _release(self, mf: _MappedFile) -> None:
        if mf.release():
            self._live_files -= 1
            if self._files.get(mf.key) is mf:
                del self._files[mf.key]

    def unmap(self, iova: int, size: int) -> None:
        """Drop whatever is mapped in [iova, iova+size); ranges never mapped are fine."""
        if size <= 0 or iova < 0:
            return
        self._carve(iova, min(iova + size, ADDRESS_LIMIT))

    def unmap_all(self) -> None:
        segs, self._segs, self._starts, self._last = self._segs, [], [], None
        for seg in segs:
            if seg.mf is not None:
                self._release(seg.mf)

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
                self._release(seg.mf)
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
        mf = seg.mf
        if not mf.sealed:
            return mf.pread(o, length)
        return mf.mm[o : o + length]

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        seg = self._find(iova, n)
        if seg.mf is None:
            raise DmaError(f"guest range at {iova:#x} has no fd; use ctx.dma_write_async")
        if not seg.writable:
            raise DmaError(f"guest range at {iova:#x} is mapped read-only")
        o = seg.base + (iova - seg.start)
        mf = seg.mf
        if not mf.sealed:
            mf.pwrite(o, data)
            return
        mf.mm[o : o + n] = data

    def view(self, iova: int, length: int) -> memoryview:
        """Zero-copy view; read-only mappings give a read-only view. Do not keep it past the
        current handler: the client may unmap the range at the next message."""
        seg = self._find(iova, length)
        if seg.mf is None:
            raise DmaError(f"guest range at {iova:#x} has no fd; no direct view possible")
        o = seg.base + (iova - seg.start)
        if not seg.mf.sealed:  # the view is only safe while the file keeps its size
            seg.mf.check(o, length)
        v = seg.mf.view[o : o + length]
        return v if seg.writable else v.toreadonly()
