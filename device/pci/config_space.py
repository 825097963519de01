"""A PCI Express function's 4 KiB configuration space, as data.

Every byte has a reset value, a writable mask and a write-1-to-clear mask; a write becomes
``new = (old & ~wmask) | (value & wmask)`` and then ``new &= ~(value & w1cmask)``. BAR sizing falls
out of the masks: a BAR's low address bits below its size and its type bits are not writable, so
writing all-ones reads back ``~(size - 1) | type bits`` (PCI Local Bus 3.0 §6.2.5.1). The ROM BAR
is not writable at all, so sizing it reads back 0: "no expansion ROM".

Pure and fast: no I/O; behaviour that is more than masks (FLR, MSI-X enable, INTx disable) is
handled by the owner (device/pci/function.py) through write hooks registered on byte ranges.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

CONFIG_SPACE_SIZE = 4096
LEGACY_CONFIG_SIZE = 256  # capabilities live in 0x40..0xFF; extended capabilities from 0x100

# Type-0 header offsets (PCI Local Bus 3.0 §6.1)
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG_IF = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F
FIRST_CAPABILITY = 0x40
FIRST_EXTENDED_CAPABILITY = 0x100


class Command(enum.IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY_ERROR_RESPONSE = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


# What the device lets software change in COMMAND. IO can be set although the card has no I/O
# BAR (QEMU and Linux write it harmlessly); the rest are hard-wired 0 as PCIe allows.
COMMAND_WRITABLE = (
    Command.IO | Command.MEMORY | Command.BUS_MASTER | Command.PARITY_ERROR_RESPONSE | Command.SERR
    | Command.INTX_DISABLE
)


class StatusBits(enum.IntFlag):
    INTERRUPT = 1 << 3  # maintained by the device: its INTx is pending (PCI 3.0 §6.2.3)
    CAPABILITIES_LIST = 1 << 4
    MASTER_DATA_PARITY_ERROR = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


STATUS_W1C = (
    StatusBits.MASTER_DATA_PARITY_ERROR | StatusBits.SIGNALED_TARGET_ABORT | StatusBits.RECEIVED_TARGET_ABORT
    | StatusBits.RECEIVED_MASTER_ABORT | StatusBits.SIGNALED_SYSTEM_ERROR | StatusBits.DETECTED_PARITY_ERROR
)


class BarType(enum.Enum):
    """Memory BAR encodings (bits 3:0 of the BAR register)."""

    MEM32 = 0x0
    MEM32_PREFETCH = 0x8
    MEM64 = 0x4
    MEM64_PREFETCH = 0xC

    @property
    def is_64bit(self) -> bool:
        return bool(self.value & 0x4)


@dataclass(frozen=True)
class BarLayout:
    index: int  # 0..5; a 64-bit BAR also occupies index+1
    size: int  # power of two >= 16 (PCI 3.0 §6.2.5.1); 4096 recommended for memory BARs
    bar_type: BarType = BarType.MEM32

    def __post_init__(self) -> None:
        if self.size < 16 or self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index}: size {self.size:#x} is not a power of two >= 16")
        last = self.index + (1 if self.bar_type.is_64bit else 0)
        if not 0 <= self.index <= last <= 5:
            raise ValueError(f"BAR{self.index}: index out of range for a {self.bar_type.name} BAR")
        if not self.bar_type.is_64bit and self.size > 1 << 31:
            raise ValueError(f"BAR{self.index}: {self.size:#x} bytes do not fit a 32-bit BAR")


class CapabilityId(enum.IntEnum):
    POWER_MANAGEMENT = 0x01
    MSI = 0x05
    PCI_EXPRESS = 0x10
    MSIX = 0x11


class ExtCapabilityId(enum.IntEnum):
    DEVICE_SERIAL_NUMBER = 0x0003


@dataclass(frozen=True)
class Capability:
    """A capability body as data. ``data`` starts with the ID byte (legacy) or the 4-byte header
    (extended); the next pointer is filled in when the capability is placed."""

    cap_id: int
    data: bytes
    wmask: bytes
    w1cmask: bytes
    extended: bool = False
    version: int = 1  # extended capabilities only

    def __post_init__(self) -> None:
        if not len(self.data) == len(self.wmask) == len(self.w1cmask):
            raise ValueError(f"capability {self.cap_id:#x}: data and masks differ in length")


WriteHook = Callable[[int, bytes, bytes], None]  # (offset of range start, old bytes, new bytes)


class ConfigSpace:
    """4 KiB of config space with per-byte reset values, writable and write-1-to-clear masks."""

    def __init__(self, size: int = CONFIG_SPACE_SIZE) -> None:
        if size not in (LEGACY_CONFIG_SIZE, CONFIG_SPACE_SIZE):
            raise ValueError("config space is 256 or 4096 bytes")
        self.size = size
        self.data = bytearray(size)
        self.reset_image = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self.capabilities: dict[int, int] = {}  # cap id -> offset
        self.extended_capabilities: dict[int, int] = {}
        self._hooks: list[tuple[int, int, WriteHook]] = []
        self._next_cap = FIRST_CAPABILITY
        self._last_cap_ptr = CAPABILITIES_POINTER
        self._next_ext = FIRST_EXTENDED_CAPABILITY
        self._last_ext: int | None = None

    # ----- building (sets the reset image; call reset() or finish() afterwards) -----

    def define(self, offset: int, width: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        """Set a field's reset value and masks (little-endian, ``width`` bytes)."""
        end = offset + width
        if offset < 0 or end > self.size:
            raise ValueError(f"field {offset:#x}+{width} outside config space")
        self.reset_image[offset:end] = value.to_bytes(width, "little")
        self.wmask[offset:end] = wmask.to_bytes(width, "little")
        self.w1cmask[offset:end] = w1c.to_bytes(width, "little")
        self.data[offset:end] = self.reset_image[offset:end]

    def define_header(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
        interrupt_pin: int = 1,
    ) -> None:
        self.define(VENDOR_ID, 2, vendor_id)
        self.define(DEVICE_ID, 2, device_id)
        self.define(COMMAND, 2, 0, wmask=COMMAND_WRITABLE)
        self.define(STATUS, 2, 0, w1c=STATUS_W1C)
        self.define(REVISION_ID, 1, revision)
        self.define(CLASS_PROG_IF, 3, class_code)
        self.define(CACHE_LINE_SIZE, 1, 0, wmask=0xFF)  # PCIe: RW, no effect (PCIe 4.0 §7.5.1.3)
        self.define(HEADER_TYPE, 1, 0)  # type 0, single function
        self.define(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.define(SUBSYSTEM_ID, 2, subsystem_id)
        self.define(ROM_ADDRESS, 4, 0)  # no expansion ROM: sizing reads back 0
        self.define(INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self.define(INTERRUPT_PIN, 1, interrupt_pin)

    def define_bar(self, bar: BarLayout) -> None:
        offset = BAR0 + 4 * bar.index
        address_mask = ~(bar.size - 1) & 0xFFFF_FFFF & ~0xF
        self.define(offset, 4, bar.bar_type.value, wmask=address_mask)
        if bar.bar_type.is_64bit:
            self.define(offset + 4, 4, 0, wmask=(~(bar.size - 1) >> 32) & 0xFFFF_FFFF)

    def add_capability(self, cap: Capability) -> int:
        """Append a capability to the list (legacy or extended); returns its offset."""
        if cap.extended:
            return self._add_extended(cap)
        offset = self._next_cap
        end = offset + len(cap.data)
        if end > LEGACY_CONFIG_SIZE:
            raise ValueError("legacy capability area (0x40..0xFF) is full")
        self._place(offset, cap)
        self.reset_image[offset] = cap.cap_id
        self.reset_image[offset + 1] = 0  # next pointer: end of list until another is added
        self.reset_image[self._last_cap_ptr] = offset
        self.wmask[offset : offset + 2] = b"\0\0"
        self._last_cap_ptr = offset + 1
        self.capabilities[cap.cap_id] = offset
        status = int.from_bytes(self.reset_image[STATUS : STATUS + 2], "little") | StatusBits.CAPABILITIES_LIST
        self.reset_image[STATUS : STATUS + 2] = status.to_bytes(2, "little")
        self._next_cap = (end + 3) & ~3  # capabilities are dword aligned (PCI 3.0 §6.7)
        self.data[:] = self.reset_image
        return offset

    def _add_extended(self, cap: Capability) -> int:
        if self.size < CONFIG_SPACE_SIZE:
            raise ValueError("extended capabilities need a 4 KiB config space")
        offset = self._next_ext
        end = offset + len(cap.data)
        if end > self.size:
            raise ValueError("extended capability area is full")
        self._place(offset, cap)
        header = (cap.cap_id & 0xFFFF) | (cap.version & 0xF) << 16  # next = 0 for now (PCIe §7.6.3)
        self.reset_image[offset : offset + 4] = header.to_bytes(4, "little")
        self.wmask[offset : offset + 4] = bytes(4)
        if self._last_ext is not None:
            prev = int.from_bytes(self.reset_image[self._last_ext : self._last_ext + 4], "little")
            prev = (prev & 0x000F_FFFF) | (offset << 20)
            self.reset_image[self._last_ext : self._last_ext + 4] = prev.to_bytes(4, "little")
        self._last_ext = offset
        self.extended_capabilities[cap.cap_id] = offset
        self._next_ext = (end + 3) & ~3
        self.data[:] = self.reset_image
        return offset

    def _place(self, offset: int, cap: Capability) -> None:
        end = offset + len(cap.data)
        self.reset_image[offset:end] = cap.data
        self.wmask[offset:end] = cap.wmask
        self.w1cmask[offset:end] = cap.w1cmask

    def add_write_hook(self, offset: int, length: int, hook: WriteHook) -> None:
        """Call ``hook(offset, old, new)`` after any write that touches [offset, offset+length)."""
        self._hooks.append((offset, offset + length, hook))

    # ----- runtime -----

    def reset(self) -> None:
        self.data[:] = self.reset_image

    def read(self, offset: int, count: int) -> bytes:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise ValueError(f"config read {offset:#x}+{count} outside {self.size} bytes")
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, value: bytes) -> None:
        """Apply a write through the masks, then run the hooks whose range it touched."""
        end = offset + len(value)
        if offset < 0 or end > self.size:
            raise ValueError(f"config write {offset:#x}+{len(value)} outside {self.size} bytes")
        touched = [(lo, hi, hook) for lo, hi, hook in self._hooks if lo < end and offset < hi]
        olds = [bytes(self.data[lo:hi]) for lo, hi, _ in touched]
        data, wmask, w1c = self.data, self.wmask, self.w1cmask
        for i, byte in enumerate(value):
            at = offset + i
            new = (data[at] & ~wmask[at]) | (byte & wmask[at])
            data[at] = new & ~(byte & w1c[at]) & 0xFF
        for (lo, hi, hook), old in zip(touched, olds, strict=True):
            hook(lo, old, bytes(self.data[lo:hi]))

    # Typed accessors for the device's own use (never masked: the device owns these bits).

    def u16(self, offset: int) -> int:
        return _U16.unpack_from(self.data, offset)[0]

    def u32(self, offset: int) -> int:
        return _U32.unpack_from(self.data, offset)[0]

    def set_u16(self, offset: int, value: int) -> None:
        _U16.pack_into(self.data, offset, value & 0xFFFF)

    def set_bits16(self, offset: int, bits: int, on: bool) -> None:
        value = self.u16(offset)
        self.set_u16(offset, value | bits if on else value & ~bits)

    def bar_address(self, index: int) -> int:
        """The address software programmed into a BAR (type bits stripped; 64-bit BARs combined)."""
        low = self.u32(BAR0 + 4 * index)
        address = low & ~0xF
        if low & 0x4 and index < 5:
            address |= self.u32(BAR0 + 4 * index + 4) << 32
        return address

    def walk_capabilities(self) -> list[tuple[int, int]]:
        """(cap id, offset) along the legacy list, guarding against loops."""
        out: list[tuple[int, int]] = []
        if not self.u16(STATUS) & StatusBits.CAPABILITIES_LIST:
            return out
        pointer = self.data[CAPABILITIES_POINTER] & ~3
        while pointer and len(out) < 48:
            out.append((self.data[pointer], pointer))
            pointer = self.data[pointer + 1] & ~3
        return out

    def walk_extended_capabilities(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        if self.size < CONFIG_SPACE_SIZE:
            return out
        pointer = FIRST_EXTENDED_CAPABILITY
        while pointer and len(out) < 960:
            header = self.u32(pointer)
            if header == 0:
                break
            out.append((header & 0xFFFF, pointer))
            pointer = (header >> 20) & 0xFFC
        return out


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
