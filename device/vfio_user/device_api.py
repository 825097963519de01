"""The contract between the vfio-user server library and a device built on it.

The library (protocol, connection, server loop) knows nothing about PCI or NICs; a device knows
nothing about sockets. A device implements :class:`VfioUserDevice`; the library hands it a
:class:`DeviceContext` when a client attaches, through which the device reaches guest memory (DMA),
raises interrupts and schedules its own work on the server's event loop.

Rules a device must follow (they keep QEMU happy, see docs/architecture.md):
- handlers return quickly and never wait for the client: QEMU holds its big lock while it waits for
  our reply, so any heavy work goes to ``ctx.call_soon`` and runs after the reply is sent;
- errors are reported by raising :class:`VfioUserError` with an errno; the library turns it into an
  error reply and keeps serving.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

# Standard vfio region and irq indices for a PCI device (linux/vfio.h).
REGION_BAR0, REGION_BAR1, REGION_BAR2, REGION_BAR3, REGION_BAR4, REGION_BAR5 = range(6)
REGION_ROM = 6
REGION_CONFIG = 7
REGION_VGA = 8
NUM_PCI_REGIONS = 9

IRQ_INTX, IRQ_MSI, IRQ_MSIX, IRQ_ERR, IRQ_REQ = range(5)
NUM_PCI_IRQS = 5


class VfioUserError(Exception):
    """Raised by a device (or the library) to answer a request with an errno error reply."""

    def __init__(self, err: int = errno.EINVAL, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


class DmaError(VfioUserError):
    """A guest address that is not (fully) inside a mapped DMA region, or not accessible that way."""

    def __init__(self, message: str, err: int = errno.EFAULT) -> None:
        super().__init__(err, message)


@dataclass(frozen=True)
class MmapArea:
    """A sparse-mmap area of a region: [offset, offset+size) relative to the region start."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    """What GET_REGION_INFO reports for one region. ``size == 0`` means the region is absent."""

    size: int = 0
    readable: bool = True
    writable: bool = True
    # When set, the client may mmap the region from this fd at ``mmap_offset``; with ``sparse_areas``
    # only those parts (the rest still goes through REGION_READ/WRITE).
    mmap_fd: int | None = None
    mmap_offset: int = 0
    sparse_areas: tuple[MmapArea, ...] = ()


@dataclass(frozen=True)
class IrqInfo:
    """What GET_IRQ_INFO reports for one irq index."""

    count: int = 0
    eventfd: bool = True
    maskable: bool = False
    automasked: bool = False
    noresize: bool = False


class MappingInfo(NamedTuple):
    """One DMA_MAP'd range; ``fd_backed`` False means reachable only through DMA_READ/DMA_WRITE messages."""

    iova: int
    size: int
    fd_backed: bool
    readable: bool
    writable: bool


class DmaAccess(Protocol):
    """Guest memory as the client shared it (DMA_MAP). Every access is bounds-checked."""

    def read(self, iova: int, length: int) -> bytes:
        """Copy ``length`` bytes at guest address ``iova``; raises DmaError if not fully mapped."""
        ...

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest address ``iova``; raises DmaError if not fully mapped writable."""
        ...

    def view(self, iova: int, length: int) -> memoryview:
        """A zero-copy view of fd-backed guest memory; raises DmaError if not possible."""
        ...

    def mapped(self, iova: int, length: int) -> MappingInfo | None:
        """The mapping wholly containing [iova, iova+length), or None (no DMA possible there)."""
        ...


class DeviceContext(Protocol):
    """What the library offers an attached device."""

    dma: DmaAccess

    def trigger_irq(self, index: int, vector: int = 0) -> bool:
        """Signal the eventfd of (index, vector). False if the client has no eventfd there."""
        ...

    def irq_configured(self, index: int, vector: int = 0) -> bool:
        """True if the client has assigned an eventfd to (index, vector)."""
        ...

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the server loop after the current message has been answered."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        """Run ``callback`` after ``delay`` seconds; returns a handle with ``cancel()``."""
        ...

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable (wire sockets, timers)."""
        ...

    def remove_reader(self, fd: int) -> None: ...

    def dma_read_async(self, iova: int, length: int, done: Callable[[bytes | None], None]) -> None:
        """Message-based DMA_READ for ranges without an fd; ``done(None)`` on failure. ``done`` runs later
        from the loop, never inside this call (device/nic/dma_pass.py runs ring passes on it)."""
        ...

    def dma_write_async(self, iova: int, data: bytes, done: Callable[[bool], None]) -> None:
        """Message-based DMA_WRITE for ranges without an fd."""
        ...


class VfioUserDevice(Protocol):
    """A device served over vfio-user."""

    num_regions: int
    num_irqs: int
    supports_reset: bool

    def region_info(self, index: int) -> RegionInfo: ...

    def irq_info(self, index: int) -> IrqInfo: ...

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Return exactly ``count`` bytes; raise VfioUserError for a bad index/range."""
        ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def reset(self) -> None:
        """DEVICE_RESET from the client (QEMU's system reset)."""
        ...

    def attached(self, ctx: DeviceContext) -> None:
        """A client connected (after VERSION); the device may keep ``ctx`` until detached()."""
        ...

    def detached(self) -> None:
        """The client went away: drop DMA references and irq use; keep device state."""
        ...


@dataclass
class DeviceInfo:
    """DEVICE_GET_INFO fields, derived from a device."""

    num_regions: int = NUM_PCI_REGIONS
    num_irqs: int = NUM_PCI_IRQS
    supports_reset: bool = True
    extra_flags: int = field(default=0)
