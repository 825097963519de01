"""PCI helpers for the guest: find a device in sysfs, enable it, map a BAR (stdlib only, run as root).

BAR access goes through fixed-width ctypes views of the mmapped sysfs ``resourceN`` file
(``c_uint32.from_buffer``), so each register access is exactly one 32-bit MMIO load or store; a
plain slice of the mmap could be split or widened by the copy routine.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

SYSFS_PCI_DEVICES = Path("/sys/bus/pci/devices")
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4


class PciError(RuntimeError):
    """A PCI operation failed; the message says what was tried and what to check."""


@dataclass(frozen=True)
class PciDevice:
    bdf: str  # e.g. 0000:00:03.0
    path: Path
    vendor_id: int
    device_id: int
    class_code: int

    def describe(self) -> str:
        return f"{self.bdf} [{self.vendor_id:04x}:{self.device_id:04x}] class {self.class_code:06x}"


def _read_hex(path: Path) -> int:
    return int(path.read_text().strip(), 16)


def list_devices(root: Path = SYSFS_PCI_DEVICES) -> list[PciDevice]:
    if not root.is_dir():
        raise PciError(f"{root} does not exist: is sysfs mounted (mount -t sysfs sysfs /sys)?")
    devices = []
    for entry in sorted(root.iterdir()):
        try:
            devices.append(PciDevice(entry.name, entry, _read_hex(entry / "vendor"), _read_hex(entry / "device"),
                                     _read_hex(entry / "class")))
        except (OSError, ValueError):
            continue  # a device vanishing under us, or an odd entry: skip it
    return devices


def find_device(vendor_id: int, device_id: int, bdf: str | None = None,
                root: Path = SYSFS_PCI_DEVICES) -> PciDevice:
    """The device with these ids (and address, if given); the error lists what was found instead."""
    devices = list_devices(root)
    matches = [d for d in devices if d.vendor_id == vendor_id and d.device_id == device_id
               and (bdf is None or d.bdf == bdf or d.bdf.endswith(bdf))]
    if not matches:
        seen = "\n  ".join(d.describe() for d in devices) or "(none)"
        where = f" at {bdf}" if bdf else ""
        raise PciError(f"no PCI device {vendor_id:04x}:{device_id:04x}{where}; found:\n  {seen}\n"
                       "Check that QEMU was started with the card (-device vfio-user-pci,...).")
    return matches[0]


def require_root() -> None:
    if os.geteuid() != 0:
        raise PciError("this needs root (sysfs enable/config/resource files are root-only); run with sudo")


def read_config(dev: PciDevice, offset: int, size: int) -> int:
    with open(dev.path / "config", "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise PciError(f"{dev.bdf}: short config read at {offset:#x} (not root?)")
    return int.from_bytes(data, "little")


def write_config(dev: PciDevice, offset: int, size: int, value: int) -> None:
    with open(dev.path / "config", "r+b", buffering=0) as f:
        f.seek(offset)
        f.write(value.to_bytes(size, "little"))


def enable_device(dev: PciDevice, bus_master: bool = False) -> int:
    """``echo 1 > enable`` and make sure COMMAND has memory decoding (and bus mastering if asked).

    Returns the COMMAND value afterwards."""
    try:
        (dev.path / "enable").write_text("1")
    except OSError as exc:
        driver = dev.path / "driver"
        if driver.exists():
            # sysfs refuses `enable` while a kernel driver owns the function (EBUSY)
            name = os.path.basename(os.readlink(driver))
            raise PciError(f"{dev.bdf}: bound to the kernel driver {name!r}: unbind it first "
                           f"(echo {dev.bdf} > {driver}/unbind) or use that driver's interface") from None
        raise PciError(f"{dev.bdf}: cannot write {dev.path / 'enable'}: {exc.strerror} (root needed?)") from None
    command = read_config(dev, PCI_COMMAND, 2)
    want = command | PCI_COMMAND_MEMORY | (PCI_COMMAND_MASTER if bus_master else 0)
    if want != command:
        write_config(dev, PCI_COMMAND, 2, want)
        command = read_config(dev, PCI_COMMAND, 2)
    if not command & PCI_COMMAND_MEMORY:
        raise PciError(f"{dev.bdf}: COMMAND.MEMORY stays 0 after writing it (COMMAND={command:#06x})")
    return command


class Bar:
    """A memory BAR mapped from sysfs; 32/64-bit register access as single MMIO operations."""

    def __init__(self, dev: PciDevice, index: int = 0) -> None:
        path = dev.path / f"resource{index}"
        if not path.exists():
            raise PciError(f"{path} missing: BAR{index} is absent or not a memory BAR")
        try:
            fd = os.open(path, os.O_RDWR | os.O_SYNC)
        except OSError as exc:
            raise PciError(f"cannot open {path}: {exc.strerror} (root needed)") from None
        try:
            self.size = os.fstat(fd).st_size
            if self.size == 0:
                raise PciError(f"{path} has size 0: BAR{index} not assigned (check dmesg for BAR errors)")
            self._mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise PciError(f"cannot mmap {path}: {exc.strerror} (is COMMAND.MEMORY set? enable the device)") from None
        finally:
            os.close(fd)
        self.path = path

    def _check(self, offset: int, width: int) -> None:
        if offset < 0 or offset % width or offset + width > self.size:
            raise PciError(f"{self.path}: bad {width}-byte access at {offset:#x} (BAR is {self.size:#x} bytes)")

    def read32(self, offset: int) -> int:
        self._check(offset, 4)
        return ctypes.c_uint32.from_buffer(self._mm, offset).value

    def write32(self, offset: int, value: int) -> None:
        self._check(offset, 4)
        ctypes.c_uint32.from_buffer(self._mm, offset).value = value & 0xFFFF_FFFF

    def read64_pair(self, offset: int) -> int:
        """A LO/HI counter pair: LO first (the card latches HI when LO is read)."""
        low = self.read32(offset)
        return low | self.read32(offset + 4) << 32

    def close(self) -> None:
        self._mm.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

