"""vfio-pci from Python: container, group, device, regions, DMA mapping and MSI-X eventfds.

Only the calls the ipsec-nic driver needs, straight from linux/vfio.h (uapi), with explicit structs:

  container = open /dev/vfio/vfio; check VFIO_API_VERSION and the type-1 IOMMU extension
  group     = open /dev/vfio/<iommu group>; must be VIABLE (every device of the group bound to vfio-pci)
  attach    = GROUP_SET_CONTAINER, then SET_IOMMU(TYPE1v2) on the container
  device    = GROUP_GET_DEVICE_FD("<bdf>")   (a string argument: done through ctypes)
  regions   = DEVICE_GET_REGION_INFO -> mmap (or pread/pwrite) at the region offset
  DMA       = IOMMU_MAP_DMA(vaddr, iova, size): the card then reaches our memory at iova
  MSI-X     = DEVICE_SET_IRQS(MSIX, DATA_EVENTFD | ACTION_TRIGGER, fds): each vector signals an eventfd

In the ipsec-nic VM this needs QEMU's virtual IOMMU (`-device intel-iommu,caching-mode=on` placed before
the vfio-user device, guest kernel `intel_iommu=on`): Debian's kernel has no vfio no-IOMMU mode.
Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import struct
from dataclasses import dataclass

from guest_tools.mmio import FileMmio, MappedMmio, Mmio

# ioctl numbers: _IO(VFIO_TYPE=';', VFIO_BASE=100 + n) (linux/vfio.h)
_VFIO = ord(";") << 8
VFIO_GET_API_VERSION = _VFIO | 100
VFIO_CHECK_EXTENSION = _VFIO | 101
VFIO_SET_IOMMU = _VFIO | 102
VFIO_GROUP_GET_STATUS = _VFIO | 103
VFIO_GROUP_SET_CONTAINER = _VFIO | 104
VFIO_GROUP_GET_DEVICE_FD = _VFIO | 106
VFIO_DEVICE_GET_INFO = _VFIO | 107
VFIO_DEVICE_GET_REGION_INFO = _VFIO | 108
VFIO_DEVICE_GET_IRQ_INFO = _VFIO | 109
VFIO_DEVICE_SET_IRQS = _VFIO | 110
VFIO_DEVICE_RESET = _VFIO | 111
VFIO_IOMMU_MAP_DMA = _VFIO | 113

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_MSIX_IRQ_INDEX = 2

_GROUP_STATUS = struct.Struct("<II")  # argsz, flags
_DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
_REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
_IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
_IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count (+ data)
_DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, vaddr, iova, size

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4


class VfioError(OSError):
    """A vfio step failed; the message names the step and what to check."""


def _ioctl(fd: int, request: int, arg, step: str, hint: str = ""):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise VfioError(exc.errno, f"vfio: {step} failed: {exc.strerror}" + (f"; {hint}" if hint else "")) from None


@dataclass(frozen=True)
class Region:
    index: int
    flags: int
    size: int
    offset: int

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_MMAP)


def iommu_group_of(bdf: str, sysfs: str = "/sys/bus/pci/devices") -> int:
    link = os.path.join(sysfs, bdf, "iommu_group")
    try:
        return int(os.path.basename(os.readlink(link)))
    except OSError:
        raise VfioError(errno.ENODEV, f"vfio: {bdf} has no IOMMU group; boot QEMU with "
                        "'-device intel-iommu,caching-mode=on' before the card and the guest with "
                        "intel_iommu=on") from None


def bind_to_vfio(bdf: str, sysfs: str = "/sys/bus/pci") -> None:
    """Bind ``bdf`` to vfio-pci (driver_override), unbinding any current driver. Needs root and the
    vfio-pci module (``modprobe vfio-pci``)."""
    dev = os.path.join(sysfs, "devices", bdf)
    driver = os.path.join(dev, "driver")
    if os.path.exists(driver) and os.path.basename(os.readlink(driver)) == "vfio-pci":
        return
    try:
        with open(os.path.join(dev, "driver_override"), "w") as f:
            f.write("vfio-pci")
        if os.path.exists(driver):
            with open(os.path.join(driver, "unbind"), "w") as f:
                f.write(bdf)
        with open(os.path.join(sysfs, "drivers_probe"), "w") as f:
            f.write(bdf)
    except OSError as exc:
        raise VfioError(exc.errno, f"vfio: cannot bind {bdf} to vfio-pci: {exc.strerror}; root? "
                        "'modprobe vfio-pci' done?") from None
    if not os.path.exists(driver) or os.path.basename(os.readlink(driver)) != "vfio-pci":
        raise VfioError(errno.ENODEV, f"vfio: {bdf} did not bind to vfio-pci; 'modprobe vfio-pci' and an IOMMU "
                        "(intel_iommu=on) are needed")


class VfioDevice:
    """One PCI function opened through vfio (container + group + device fd)."""

    def __init__(self, bdf: str, dev_vfio: str = "/dev/vfio") -> None:
        self.bdf = bdf
        self.container = self.group = self.fd = -1
        self._eventfds: list[int] = []
        try:
            self._open(bdf, dev_vfio)
        except BaseException:
            self.close()
            raise

    def _open(self, bdf: str, dev_vfio: str) -> None:
        try:
            self.container = os.open(os.path.join(dev_vfio, "vfio"), os.O_RDWR)
        except OSError as exc:
            raise VfioError(exc.errno, f"vfio: cannot open {dev_vfio}/vfio: {exc.strerror}; "
                            "'modprobe vfio-pci' done? root?") from None
        version = _ioctl(self.container, VFIO_GET_API_VERSION, 0, "GET_API_VERSION")
        if version != VFIO_API_VERSION:
            raise VfioError(errno.EPROTO, f"vfio: kernel API version {version}, expected {VFIO_API_VERSION}")
        if not _ioctl(self.container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU, "CHECK_EXTENSION"):
            raise VfioError(errno.ENOTSUP, "vfio: no type-1 v2 IOMMU; boot the guest with intel_iommu=on")
        group = iommu_group_of(bdf)
        try:
            self.group = os.open(os.path.join(dev_vfio, str(group)), os.O_RDWR)
        except OSError as exc:
            raise VfioError(exc.errno, f"vfio: cannot open {dev_vfio}/{group}: {exc.strerror}; is {bdf} bound "
                            "to vfio-pci?") from None
        status = _ioctl(self.group, VFIO_GROUP_GET_STATUS, _GROUP_STATUS.pack(_GROUP_STATUS.size, 0),
                        "GROUP_GET_STATUS")
        if not _GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
            raise VfioError(errno.EBUSY, f"vfio: IOMMU group {group} is not viable: bind every device of the "
                            "group to vfio-pci")
        _ioctl(self.group, VFIO_GROUP_SET_CONTAINER, struct.pack("<i", self.container), "GROUP_SET_CONTAINER")
        _ioctl(self.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU, "SET_IOMMU")
        # GET_DEVICE_FD takes a char * and returns the fd: fcntl.ioctl cannot express that.
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.ioctl(self.group, ctypes.c_ulong(VFIO_GROUP_GET_DEVICE_FD), ctypes.c_char_p(bdf.encode()))
        if fd < 0:
            err = ctypes.get_errno()
            raise VfioError(err, f"vfio: GROUP_GET_DEVICE_FD({bdf}) failed: {os.strerror(err)}")
        self.fd = fd
        info = _ioctl(self.fd, VFIO_DEVICE_GET_INFO, _DEVICE_INFO.pack(_DEVICE_INFO.size, 0, 0, 0), "DEVICE_GET_INFO")
        _, self.flags, self.num_regions, self.num_irqs = _DEVICE_INFO.unpack(info)

    # -- regions ------------------------------------------------------------------------------------
    def region(self, index: int) -> Region:
        raw = _ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, _REGION_INFO.pack(_REGION_INFO.size, 0, index, 0, 0, 0),
                     f"GET_REGION_INFO({index})")
        _, flags, _, _, size, offset = _REGION_INFO.unpack(raw)
        return Region(index, flags, size, offset)

    def bar0(self, size: int) -> Mmio:
        """BAR0 register access: mmap when vfio allows it, else pread/pwrite on the device fd."""
        reg = self.region(VFIO_PCI_BAR0_REGION_INDEX)
        if reg.size < size:
            raise VfioError(errno.EINVAL, f"vfio: BAR0 is {reg.size:#x} bytes, the card needs {size:#x}")
        if reg.mmappable:
            try:
                return MappedMmio(self.fd, size, reg.offset, what="vfio BAR0")
            except OSError:
                pass  # fall back to syscalls: slower, same semantics
        return FileMmio(self.fd, size, reg.offset)

    def config_read(self, offset: int, size: int) -> bytes:
        reg = self.region(VFIO_PCI_CONFIG_REGION_INDEX)
        return os.pread(self.fd, size, reg.offset + offset)

    def config_write(self, offset: int, data: bytes) -> None:
        reg = self.region(VFIO_PCI_CONFIG_REGION_INDEX)
        os.pwrite(self.fd, data, reg.offset + offset)

    def enable_bus_master(self) -> None:
        """COMMAND.MEMORY | BUS_MASTER: without bus mastering the card's DMA and MSI-X are dropped."""
        cmd = struct.unpack("<H", self.config_read(PCI_COMMAND, 2))[0]
        self.config_write(PCI_COMMAND, struct.pack("<H", cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER))

    def reset(self) -> None:
        _ioctl(self.fd, VFIO_DEVICE_RESET, 0, "DEVICE_RESET")

    # -- DMA ----------------------------------------------------------------------------------------
    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        arg = _DMA_MAP.pack(_DMA_MAP.size, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE, vaddr, iova, size)
        _ioctl(self.container, VFIO_IOMMU_MAP_DMA, arg, f"IOMMU_MAP_DMA(iova {iova:#x}, {size} bytes)",
               "RLIMIT_MEMLOCK too small, or the IOVA range is reserved?")

    # -- MSI-X --------------------------------------------------------------------------------------
    def msix_count(self) -> int:
        raw = _ioctl(self.fd, VFIO_DEVICE_GET_IRQ_INFO, _IRQ_INFO.pack(_IRQ_INFO.size, 0, VFIO_PCI_MSIX_IRQ_INDEX, 0),
                     "GET_IRQ_INFO(MSI-X)")
        return _IRQ_INFO.unpack(raw)[3]

    def enable_msix(self, vectors: int) -> list[int]:
        """Give each of ``vectors`` MSI-X vectors an eventfd; returns the fds (index = vector)."""
        available = self.msix_count()
        if vectors > available:
            raise VfioError(errno.EINVAL, f"vfio: {vectors} MSI-X vectors wanted, the device has {available}")
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        arg = _IRQ_SET.pack(_IRQ_SET.size + 4 * vectors, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                            VFIO_PCI_MSIX_IRQ_INDEX, 0, vectors) + struct.pack(f"<{vectors}i", *fds)
        try:
            _ioctl(self.fd, VFIO_DEVICE_SET_IRQS, arg, "SET_IRQS(MSI-X)")
        except VfioError:
            for fd in fds:
                os.close(fd)
            raise
        self._eventfds = fds
        return fds

    def disable_msix(self) -> None:
        if self._eventfds and self.fd >= 0:
            arg = _IRQ_SET.pack(_IRQ_SET.size, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                VFIO_PCI_MSIX_IRQ_INDEX, 0, 0)
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, VFIO_DEVICE_SET_IRQS, arg)
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []

    def close(self) -> None:
        self.disable_msix()
        for name in ("fd", "group", "container"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def wait_eventfds(fds: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for any eventfd; returns the indexes that fired (counters drained)."""
    if not fds:
        return []
    ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
    fired = []
    for fd in ready:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            continue
        fired.append(fds.index(fd))
    return fired
