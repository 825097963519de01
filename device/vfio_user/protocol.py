"""vfio-user wire format: constants, message types, pure parse and build functions.

Everything here is pure (bytes in, values or bytes out) so it can be fuzzed and tested without a
socket. Layouts follow the protocol spec (qemu docs/interop/vfio-user.rst) and what QEMU 11.1's
``vfio-user-pci`` client sends (see /work/shared/reference/vm-recon.md). All integers are little
endian: the protocol uses host byte order and both ends run on x86 here.

Parse functions raise :class:`ProtocolError` (and nothing else) for any malformed input; the error
carries the errno the reply should use. :class:`FramingError` marks damage the byte stream cannot
recover from (the next message boundary is unknown), which ends the connection.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, NamedTuple

from .device_api import IrqInfo, RegionInfo

# --------------------------------------------------------------------------------------------
# Header and commands (spec "Header", "Commands")


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11  # server -> client
    DMA_WRITE = 12  # server -> client
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # obsolete; only in QEMU's enum
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# Header flags: bits 0-3 message type, then NO_REPLY and ERROR.
FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
# An error reply must carry type=reply as well; with only the ERROR bit QEMU takes it for a
# command (rust-vmm/vfio#143).
FLAGS_ERROR_REPLY = TYPE_REPLY | FLAG_ERROR

HEADER = struct.Struct("<HHIII")  # id, command, size (incl. header), flags, error
HEADER_SIZE = HEADER.size  # 16

# --------------------------------------------------------------------------------------------
# Limits (what we advertise and enforce). Each one is a trade-off, so the reason is stated.

# Largest REGION_READ/WRITE and DMA_READ/WRITE payload. QEMU's default is 1 MiB and it accepts up
# to 64 MiB; it must be >= 4096 because QEMU reads the whole 4 KiB PCIe config space in one
# REGION_READ at realize. 1 MiB bounds the memory one message can make us buffer.
MAX_DATA_XFER_SIZE = 1 << 20
MIN_DATA_XFER_SIZE = 4096
# Client's assumed max_data_xfer_size when its VERSION omits it (spec default).
DEFAULT_CLIENT_DATA_XFER_SIZE = 1 << 20
# fds per message. QEMU's maximum is 16 (VFIO_USER_MAX_MAX_FDS) and it chunks SET_IRQS eventfd
# arrays to this value, so a larger MSI-X table costs fewer messages. We never send more than 1.
MAX_MSG_FDS = 16
# Fixed part of the largest legitimate message: header + 16 bytes of (offset, region, count) or
# (address, count) before the data. Anything larger is refused before it is buffered.
MAX_MESSAGE_SIZE = HEADER_SIZE + 16 + MAX_DATA_XFER_SIZE
# The capabilities JSON in VERSION is small (QEMU's is ~200 bytes); cap it so json.loads never
# sees megabytes of attacker input.
MAX_VERSION_JSON = 16 * 1024
# The spec's capabilities object nests three levels ({"capabilities": {"migration": {...}}}); a bound
# of our own keeps json.loads off deep input whatever the interpreter's recursion limit is.
MAX_VERSION_JSON_DEPTH = 16
# DMA page size we support; QEMU maps in 4 KiB granules.
PAGE_SIZE = 4096
# We implement protocol 0.0, which is what QEMU speaks (it refuses a reply with major != 0 or a
# minor above its own).
VERSION_MAJOR = 0
VERSION_MINOR = 0

# --------------------------------------------------------------------------------------------
# Payload layouts (spec per command; linux/vfio.h for the shared ioctl structs)

VERSION_HEAD = struct.Struct("<HH")  # major, minor, then NUL-terminated JSON
DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, address, size
DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
REGION_IO_FDS = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
SET_IRQS = struct.Struct("<IIIII")  # argsz, flags, index, start, count
REGION_RW = struct.Struct("<QII")  # offset, region, count (+ data)
DMA_RW = struct.Struct("<QQ")  # address, count (+ data at byte 32 of the message)
WRITE_MULTI_COUNT = struct.Struct("<Q")  # wr_cnt
WRITE_MULTI_ONE = struct.Struct("<QII8s")  # offset, region, count, data[8]
DEVICE_FEATURE = struct.Struct("<II")  # argsz, flags (+ data)
SPARSE_MMAP_CAP = struct.Struct("<HHIII")  # id, version, next, nr_areas, reserved
SPARSE_MMAP_AREA = struct.Struct("<QQ")  # offset, size

# Header + fixed part packed together: the REGION_READ/WRITE replies are built in one call.
HEADER_REGION_RW = struct.Struct("<HHIIIQII")
HEADER_DMA_RW = struct.Struct("<HHIIIQQ")
# The same with the data of a 1-, 2-, 4- or 8-byte access as one integer (a CPU's MMIO access sizes): a
# REGION_WRITE request or a REGION_READ reply of that size decodes or builds in one call.
HEADER_REGION_RW_VALUE = {n: struct.Struct("<HHIIIQII" + code) for n, code in ((1, "B"), (2, "H"), (4, "I"), (8, "Q"))}

# Field values (linux/vfio.h)
DMA_MAP_FLAG_READ = 1 << 0
DMA_MAP_FLAG_WRITE = 1 << 1
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_FLAG_ALL = 1 << 1

DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1

REGION_INFO_FLAG_READ = 1 << 0
REGION_INFO_FLAG_WRITE = 1 << 1
REGION_INFO_FLAG_MMAP = 1 << 2
REGION_INFO_FLAG_CAPS = 1 << 3
REGION_INFO_CAP_SPARSE_MMAP = 1

IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3


class IrqSetFlag(IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_MASK = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
IRQ_SET_ACTION_MASK = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER

# Commands a client may send with fds attached (spec: DMA_MAP carries the memory fd, SET_IRQS the
# eventfds). fds on anything else are closed and the request refused.
FD_COMMANDS = frozenset({Command.DMA_MAP, Command.DEVICE_SET_IRQS})


class ProtocolError(Exception):
    """A malformed or unacceptable message. ``errno`` goes into the error reply."""

    def __init__(self, reason: str, err: int = errno.EINVAL) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = err


class FramingError(ProtocolError):
    """The stream itself is broken (bad size or type): no way to find the next message."""


class Header(NamedTuple):
    msg_id: int
    command: int
    size: int
    flags: int
    error: int

    @property
    def is_reply(self) -> bool:
        return (self.flags & FLAG_TYPE_MASK) == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)


def parse_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    """Decode and sanity-check the 16-byte header at ``offset`` (FramingError if beyond repair)."""
    if len(buf) - offset < HEADER_SIZE:
        raise FramingError(f"truncated header: {len(buf) - offset} of {HEADER_SIZE} bytes")
    hdr = Header._make(HEADER.unpack_from(buf, offset))
    check_header(hdr)
    return hdr


def check_header(hdr: Header) -> None:
    if hdr.size < HEADER_SIZE:
        raise FramingError(f"message size {hdr.size} is smaller than the header")
    if hdr.size > MAX_MESSAGE_SIZE:
        raise FramingError(f"message size {hdr.size} exceeds the limit {MAX_MESSAGE_SIZE}")
    mtype = hdr.flags & FLAG_TYPE_MASK
    if mtype not in (TYPE_COMMAND, TYPE_REPLY):
        raise FramingError(f"unknown message type {mtype} (flags {hdr.flags:#x})")


# --------------------------------------------------------------------------------------------
# Request messages (client -> server). Each carries the header fields a reply needs.
# The REGION_READ/WRITE requests are NamedTuples, not frozen dataclasses: they are built once
# per MMIO access and a frozen dataclass costs ~1.8 us to construct against ~0.35 us here.


@dataclass(frozen=True, slots=True)
class Message:
    COMMAND: ClassVar[Command]
    msg_id: int
    no_reply: bool


@dataclass(frozen=True, slots=True)
class Version(Message):
    COMMAND: ClassVar[Command] = Command.VERSION
    major: int
    minor: int
    capabilities: Mapping[str, Any]
    request_size: int  # the reply must not be longer (QEMU sizes its buffer by the request)

    @property
    def client_max_data_xfer_size(self) -> int:
        return int(self.capabilities.get("max_data_xfer_size", DEFAULT_CLIENT_DATA_XFER_SIZE))

    @property
    def client_max_msg_fds(self) -> int:
        return int(self.capabilities.get("max_msg_fds", 1))  # spec: assume 1 if absent


@dataclass(frozen=True, slots=True)
class DmaMap(Message):
    COMMAND: ClassVar[Command] = Command.DMA_MAP
    flags: int
    offset: int
    iova: int
    size: int
    fd: int | None  # owned by whoever holds the message

    @property
    def readable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_WRITE)


@dataclass(frozen=True, slots=True)
class DmaUnmap(Message):
    COMMAND: ClassVar[Command] = Command.DMA_UNMAP
    argsz: int
    flags: int
    iova: int
    size: int

    @property
    def unmap_all(self) -> bool:
        return bool(self.flags & DMA_UNMAP_FLAG_ALL)


@dataclass(frozen=True, slots=True)
class GetDeviceInfo(Message):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    argsz: int


@dataclass(frozen=True, slots=True)
class GetRegionInfo(Message):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    argsz: int
    index: int


@dataclass(frozen=True, slots=True)
class GetRegionIoFds(Message):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    argsz: int
    index: int


@dataclass(frozen=True, slots=True)
class GetIrqInfo(Message):
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    argsz: int
    index: int


@dataclass(frozen=True, slots=True)
class SetIrqs(Message):
    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    argsz: int
    flags: int
    index: int
    start: int
    count: int
    fds: tuple[int, ...] = ()  # owned by whoever holds the message
    data: bytes = b""  # DATA_BOOL: one byte per vector


class RegionRead(NamedTuple):
    msg_id: int
    no_reply: bool
    region: int
    offset: int
    count: int

    COMMAND = Command.REGION_READ


class RegionWrite(NamedTuple):
    msg_id: int
    no_reply: bool
    region: int
    offset: int
    data: bytes

    COMMAND = Command.REGION_WRITE


@dataclass(frozen=True, slots=True)
class RegionWriteMulti(Message):
    """QEMU's batch of small posted writes (sent only after ``write_multiple: true``)."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI
    writes: tuple[tuple[int, int, bytes], ...]  # (region, offset, data)


@dataclass(frozen=True, slots=True)
class DeviceReset(Message):
    COMMAND: ClassVar[Command] = Command.DEVICE_RESET


@dataclass(frozen=True, slots=True)
class DeviceFeature(Message):
    COMMAND: ClassVar[Command] = Command.DEVICE_FEATURE
    argsz: int
    flags: int
    data: bytes = field(default=b"")


# --------------------------------------------------------------------------------------------
# Parsers: (header, payload, fds) -> message. They never close fds (the caller owns them).


def _need(payload: bytes, size: int, what: str, exact: bool = False) -> None:
    n = len(payload)
    if n < size or (exact and n != size):
        want = f"{size}" if exact else f"at least {size}"
        raise ProtocolError(f"{what}: payload is {n} bytes, expected {want}")


def _json_depth(text: bytes) -> int:
    """Deepest bracket nesting in JSON ``text``, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _parse_version(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> Version:
    _need(payload, VERSION_HEAD.size, "VERSION")
    major, minor = VERSION_HEAD.unpack_from(payload)
    raw = payload[VERSION_HEAD.size :]
    caps: Mapping[str, Any] = {}
    if raw:
        if len(raw) > MAX_VERSION_JSON:
            raise ProtocolError(f"VERSION: capabilities JSON of {len(raw)} bytes is too long")
        text = bytes(raw).split(b"\0", 1)[0]  # spec: NUL-terminated; tolerate a missing NUL
        if text.strip():
            if _json_depth(text) > MAX_VERSION_JSON_DEPTH:
                raise ProtocolError("VERSION: capabilities JSON is nested too deeply")
            try:
                doc = json.loads(text.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise ProtocolError(f"VERSION: capabilities are not valid JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise ProtocolError("VERSION: capabilities JSON is not an object")
            caps = doc.get("capabilities", {})
            if not isinstance(caps, dict):
                raise ProtocolError('VERSION: "capabilities" is not an object')
            for key in ("max_data_xfer_size", "max_msg_fds"):
                value = caps.get(key, 1)
                if type(value) is not int or value < 1:
                    raise ProtocolError(f"VERSION: capability {key} must be a positive integer")
    return Version(hdr.msg_id, hdr.no_reply, major, minor, caps, hdr.size)


def _parse_dma_map(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> DmaMap:
    _need(payload, DMA_MAP.size, "DMA_MAP", exact=True)
    argsz, flags, offset, iova, size = DMA_MAP.unpack(payload)
    if argsz < DMA_MAP.size:
        raise ProtocolError(f"DMA_MAP: argsz {argsz} < {DMA_MAP.size}")
    if flags & ~(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE):
        raise ProtocolError(f"DMA_MAP: unknown flags {flags:#x}")
    if size == 0 or iova + size > 1 << 64:
        raise ProtocolError(f"DMA_MAP: bad range iova={iova:#x} size={size:#x}")
    if len(fds) > 1:
        raise ProtocolError(f"DMA_MAP: {len(fds)} fds attached, at most 1 allowed")
    return DmaMap(hdr.msg_id, hdr.no_reply, flags, offset, iova, size, fds[0] if fds else None)


def _parse_dma_unmap(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> DmaUnmap:
    _need(payload, DMA_UNMAP.size, "DMA_UNMAP")
    argsz, flags, iova, size = DMA_UNMAP.unpack_from(payload)
    if flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
        # Dirty tracking is not offered (QEMU's vfio-user container returns ENOTSUP for it too).
        raise ProtocolError("DMA_UNMAP: dirty bitmaps are not supported", errno.ENOTSUP)
    if flags & ~DMA_UNMAP_FLAG_ALL:
        raise ProtocolError(f"DMA_UNMAP: unknown flags {flags:#x}")
    if len(payload) != DMA_UNMAP.size:
        raise ProtocolError(f"DMA_UNMAP: payload is {len(payload)} bytes, expected {DMA_UNMAP.size}")
    if flags & DMA_UNMAP_FLAG_ALL:
        if iova or size:
            raise ProtocolError("DMA_UNMAP: FLAG_ALL needs address and size 0")
    elif iova + size > 1 << 64:
        raise ProtocolError(f"DMA_UNMAP: bad range iova={iova:#x} size={size:#x}")
    return DmaUnmap(hdr.msg_id, hdr.no_reply, argsz, flags, iova, size)


def _parse_device_info(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> GetDeviceInfo:
    _need(payload, 4, "DEVICE_GET_INFO")
    (argsz,) = struct.unpack_from("<I", payload)
    if argsz < DEVICE_INFO.size:
        raise ProtocolError(f"DEVICE_GET_INFO: argsz {argsz} < {DEVICE_INFO.size}")
    return GetDeviceInfo(hdr.msg_id, hdr.no_reply, argsz)


def _parse_region_info(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> GetRegionInfo:
    _need(payload, REGION_INFO.size, "DEVICE_GET_REGION_INFO")
    argsz, _flags, index, _cap, _size, _off = REGION_INFO.unpack_from(payload)
    if argsz < REGION_INFO.size:
        raise ProtocolError(f"DEVICE_GET_REGION_INFO: argsz {argsz} < {REGION_INFO.size}")
    return GetRegionInfo(hdr.msg_id, hdr.no_reply, argsz, index)


def _parse_region_io_fds(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> GetRegionIoFds:
    _need(payload, REGION_IO_FDS.size, "DEVICE_GET_REGION_IO_FDS")
    argsz, _flags, index, _count = REGION_IO_FDS.unpack_from(payload)
    if argsz < REGION_IO_FDS.size:
        raise ProtocolError(f"DEVICE_GET_REGION_IO_FDS: argsz {argsz} < {REGION_IO_FDS.size}")
    return GetRegionIoFds(hdr.msg_id, hdr.no_reply, argsz, index)


def _parse_irq_info(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> GetIrqInfo:
    _need(payload, IRQ_INFO.size, "DEVICE_GET_IRQ_INFO")
    argsz, _flags, index, _count = IRQ_INFO.unpack_from(payload)
    if argsz < IRQ_INFO.size:
        raise ProtocolError(f"DEVICE_GET_IRQ_INFO: argsz {argsz} < {IRQ_INFO.size}")
    return GetIrqInfo(hdr.msg_id, hdr.no_reply, argsz, index)


def _parse_set_irqs(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> SetIrqs:
    _need(payload, SET_IRQS.size, "DEVICE_SET_IRQS")
    argsz, flags, index, start, count = SET_IRQS.unpack_from(payload)
    if argsz < SET_IRQS.size:
        raise ProtocolError(f"DEVICE_SET_IRQS: argsz {argsz} < {SET_IRQS.size}")
    data_type = flags & IRQ_SET_DATA_MASK
    action = flags & IRQ_SET_ACTION_MASK
    if flags & ~(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK):
        raise ProtocolError(f"DEVICE_SET_IRQS: unknown flags {flags:#x}")
    if data_type.bit_count() != 1 or action.bit_count() != 1:
        raise ProtocolError(f"DEVICE_SET_IRQS: flags {flags:#x} need one data type and one action")
    data = bytes(payload[SET_IRQS.size :])
    if data_type == IrqSetFlag.DATA_BOOL:
        if len(data) != count:
            raise ProtocolError(f"DEVICE_SET_IRQS: DATA_BOOL needs {count} bytes, got {len(data)}")
    elif data:
        raise ProtocolError(f"DEVICE_SET_IRQS: {len(data)} unexpected payload bytes")
    if fds and data_type != IrqSetFlag.DATA_EVENTFD:
        raise ProtocolError("DEVICE_SET_IRQS: fds attached without DATA_EVENTFD")
    if fds and len(fds) != count:
        raise ProtocolError(f"DEVICE_SET_IRQS: {len(fds)} fds for count {count}")
    return SetIrqs(hdr.msg_id, hdr.no_reply, argsz, flags, index, start, count, tuple(fds), data)


def _parse_region_read(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> RegionRead:
    _need(payload, REGION_RW.size, "REGION_READ", exact=True)
    offset, region, count = REGION_RW.unpack(payload)
    if count > MAX_DATA_XFER_SIZE:
        raise ProtocolError(f"REGION_READ: count {count} exceeds max_data_xfer_size")
    return RegionRead(hdr.msg_id, hdr.no_reply, region, offset, count)


def _parse_region_write(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> RegionWrite:
    _need(payload, REGION_RW.size, "REGION_WRITE")
    offset, region, count = REGION_RW.unpack_from(payload)
    if count != len(payload) - REGION_RW.size:
        raise ProtocolError(f"REGION_WRITE: count {count} but {len(payload) - REGION_RW.size} data bytes")
    return RegionWrite(hdr.msg_id, hdr.no_reply, region, offset, bytes(payload[REGION_RW.size :]))


def _parse_region_write_multi(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> RegionWriteMulti:
    _need(payload, WRITE_MULTI_COUNT.size, "REGION_WRITE_MULTI")
    (n,) = WRITE_MULTI_COUNT.unpack_from(payload)
    if len(payload) != WRITE_MULTI_COUNT.size + n * WRITE_MULTI_ONE.size:
        raise ProtocolError(f"REGION_WRITE_MULTI: {len(payload)} bytes do not hold {n} writes")
    writes = []
    for i in range(n):
        offset, region, count, data = WRITE_MULTI_ONE.unpack_from(
            payload, WRITE_MULTI_COUNT.size + i * WRITE_MULTI_ONE.size
        )
        if count > len(data):
            raise ProtocolError(f"REGION_WRITE_MULTI: write {i} count {count} > {len(data)}")
        writes.append((region, offset, data[:count]))
    return RegionWriteMulti(hdr.msg_id, hdr.no_reply, tuple(writes))


def _parse_device_reset(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> DeviceReset:
    if payload:
        raise ProtocolError(f"DEVICE_RESET: {len(payload)} unexpected payload bytes")
    return DeviceReset(hdr.msg_id, hdr.no_reply)


def _parse_device_feature(hdr: Header, payload: bytes, fds: tuple[int, ...]) -> DeviceFeature:
    _need(payload, DEVICE_FEATURE.size, "DEVICE_FEATURE")
    argsz, flags = DEVICE_FEATURE.unpack_from(payload)
    return DeviceFeature(hdr.msg_id, hdr.no_reply, argsz, flags, bytes(payload[DEVICE_FEATURE.size :]))


# Commands a server accepts from the client, and how to read them. Anything else -> ENOSYS.
REQUEST_PARSERS = {
    Command.VERSION: _parse_version,
    Command.DMA_MAP: _parse_dma_map,
    Command.DMA_UNMAP: _parse_dma_unmap,
    Command.DEVICE_GET_INFO: _parse_device_info,
    Command.DEVICE_GET_REGION_INFO: _parse_region_info,
    Command.DEVICE_GET_REGION_IO_FDS: _parse_region_io_fds,
    Command.DEVICE_GET_IRQ_INFO: _parse_irq_info,
    Command.DEVICE_SET_IRQS: _parse_set_irqs,
    Command.REGION_READ: _parse_region_read,
    Command.REGION_WRITE: _parse_region_write,
    Command.REGION_WRITE_MULTI: _parse_region_write_multi,
    Command.DEVICE_RESET: _parse_device_reset,
    Command.DEVICE_FEATURE: _parse_device_feature,
}


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


def parse_request(hdr: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Message | RegionRead | RegionWrite:
    """Decode a client request. Raises ProtocolError (ENOSYS for unknown commands)."""
    parser = REQUEST_PARSERS.get(hdr.command)  # type: ignore[call-overload]
    if parser is None:
        raise ProtocolError(f"unsupported {command_name(hdr.command)}", errno.ENOSYS)
    if fds and hdr.command not in FD_COMMANDS:
        raise ProtocolError(f"{command_name(hdr.command)} does not take fds ({len(fds)} attached)")
    if len(payload) != hdr.size - HEADER_SIZE:
        raise ProtocolError(f"payload is {len(payload)} bytes, header says {hdr.size - HEADER_SIZE}")
    return parser(hdr, payload, fds)


def parse_message(buf: bytes, fds: tuple[int, ...] = ()) -> Message | RegionRead | RegionWrite:
    """Decode one complete request message (header + payload); for tests and fuzzing."""
    hdr = parse_header(buf)
    if hdr.is_reply:
        raise ProtocolError("a reply, not a request")
    if len(buf) != hdr.size:
        raise ProtocolError(f"message is {len(buf)} bytes, header says {hdr.size}")
    return parse_request(hdr, buf[HEADER_SIZE:], fds)


# --------------------------------------------------------------------------------------------
# Builders (server -> client)


def build_message(msg_id: int, command: int, payload: bytes = b"", flags: int = TYPE_COMMAND, error: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + payload


def build_reply(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), TYPE_REPLY, 0) + payload


def build_error_reply(msg_id: int, command: int, err: int) -> bytes:
    """Header-only reply, flags type=reply|error, positive errno (spec "Error replies")."""
    return HEADER.pack(msg_id, command, HEADER_SIZE, FLAGS_ERROR_REPLY, max(1, abs(int(err))))


def server_capabilities() -> dict[str, Any]:
    """Our capabilities in priority order: the builder drops from the end if space is short."""
    return {"max_msg_fds": MAX_MSG_FDS, "max_data_xfer_size": MAX_DATA_XFER_SIZE, "pgsizes": PAGE_SIZE}


def build_version_reply(msg_id: int, max_size: int, capabilities: Mapping[str, Any] | None = None) -> bytes:
    """VERSION reply 0.0 with compact caps JSON, never longer than ``max_size`` bytes.

    QEMU allots the reply buffer by its request size (libvfio-user#368 shows what happens
    otherwise). Every capability we send is optional with a QEMU default we can live with, so
    trailing ones are dropped until the reply fits.
    """
    items = list((capabilities if capabilities is not None else server_capabilities()).items())
    while True:
        text = json.dumps({"capabilities": dict(items)}, separators=(",", ":")).encode() + b"\0"
        size = HEADER_SIZE + VERSION_HEAD.size + len(text)
        if size <= max_size:
            payload = VERSION_HEAD.pack(VERSION_MAJOR, VERSION_MINOR) + text
            return build_reply(msg_id, Command.VERSION, payload)
        if not items:
            raise ProtocolError(f"VERSION request of {max_size} bytes leaves no room for a reply")
        items.pop()


def build_device_info_reply(msg_id: int, flags: int, num_regions: int, num_irqs: int) -> bytes:
    payload = DEVICE_INFO.pack(DEVICE_INFO.size, flags, num_regions, num_irqs)
    return build_reply(msg_id, Command.DEVICE_GET_INFO, payload)


def region_info_flags(info: RegionInfo) -> int:
    if info.size == 0:
        return 0
    flags = 0
    if info.readable:
        flags |= REGION_INFO_FLAG_READ
    if info.writable:
        flags |= REGION_INFO_FLAG_WRITE
    if info.mmap_fd is not None:
        flags |= REGION_INFO_FLAG_MMAP
    return flags


def build_region_info_reply(msg_id: int, request_argsz: int, index: int, info: RegionInfo) -> tuple[bytes, tuple[int, ...]]:
    """GET_REGION_INFO reply and the fds to attach.

    argsz reports the full size needed; the sparse-mmap capability, the CAPS flag and the fd are
    included only when they fit in the client's argsz (QEMU asks with 32 first, then again with
    the larger argsz; hw/vfio/device.c, libvfio-user#185/#619). An absent region is size 0,
    flags 0 (an error would abort QEMU's realize).
    """
    flags = region_info_flags(info)
    caps = b""
    if info.size and info.mmap_fd is not None and info.sparse_areas:
        caps = SPARSE_MMAP_CAP.pack(REGION_INFO_CAP_SPARSE_MMAP, 1, 0, len(info.sparse_areas), 0) + b"".join(
            SPARSE_MMAP_AREA.pack(a.offset, a.size) for a in info.sparse_areas
        )
    full = REGION_INFO.size + len(caps)
    fits = request_argsz >= full
    cap_offset = 0
    if caps and fits:
        flags |= REGION_INFO_FLAG_CAPS
        cap_offset = REGION_INFO.size
    body = REGION_INFO.pack(full, flags, index, cap_offset, info.size, info.mmap_offset if info.size else 0)
    if fits:
        body += caps
    fds: tuple[int, ...] = ()
    if fits and info.size and info.mmap_fd is not None:
        fds = (info.mmap_fd,)
    return build_reply(msg_id, Command.DEVICE_GET_REGION_INFO, body), fds


def build_region_io_fds_reply(msg_id: int, index: int) -> bytes:
    """We offer no ioeventfds: count 0 (QEMU's client never asks)."""
    return build_reply(msg_id, Command.DEVICE_GET_REGION_IO_FDS, REGION_IO_FDS.pack(REGION_IO_FDS.size, 0, index, 0))


def irq_info_flags(info: IrqInfo) -> int:
    flags = 0
    if info.eventfd:
        flags |= IRQ_INFO_EVENTFD
    if info.maskable:
        flags |= IRQ_INFO_MASKABLE
    if info.automasked:
        flags |= IRQ_INFO_AUTOMASKED
    if info.noresize:
        flags |= IRQ_INFO_NORESIZE
    return flags


def build_irq_info_reply(msg_id: int, index: int, info: IrqInfo) -> bytes:
    payload = IRQ_INFO.pack(IRQ_INFO.size, irq_info_flags(info), index, info.count)
    return build_reply(msg_id, Command.DEVICE_GET_IRQ_INFO, payload)


def build_region_read_reply(msg_id: int, region: int, offset: int, data: bytes) -> bytes:
    n = len(data)
    return HEADER_REGION_RW.pack(msg_id, Command.REGION_READ, 32 + n, TYPE_REPLY, 0, offset, region, n) + data


def build_region_write_reply(msg_id: int, region: int, offset: int, count: int) -> bytes:
    return HEADER_REGION_RW.pack(msg_id, Command.REGION_WRITE, 32, TYPE_REPLY, 0, offset, region, count)


def build_dma_unmap_reply(msg: DmaUnmap) -> bytes:
    """Spec: the reply repeats the request's struct (QEMU accepts up to its request size)."""
    payload = DMA_UNMAP.pack(DMA_UNMAP.size, msg.flags, msg.iova, msg.size)
    return build_reply(msg.msg_id, Command.DMA_UNMAP, payload)


# Server -> client DMA requests: spec layout (u64 address, u64 count, data at byte 32); QEMU 11.1
# uses it too (observed, vm-recon.md).


def build_dma_read_request(msg_id: int, iova: int, count: int) -> bytes:
    return HEADER_DMA_RW.pack(msg_id, Command.DMA_READ, 32, TYPE_COMMAND, 0, iova, count)


def build_dma_write_request(msg_id: int, iova: int, data: bytes) -> bytes:
    n = len(data)
    return HEADER_DMA_RW.pack(msg_id, Command.DMA_WRITE, 32 + n, TYPE_COMMAND, 0, iova, n) + bytes(data)


def parse_dma_read_reply(payload: bytes, iova: int, count: int) -> bytes:
    """Data of a DMA_READ reply, checked against what we asked for."""
    if len(payload) != DMA_RW.size + count:
        raise ProtocolError(f"DMA_READ reply: {len(payload)} bytes, expected {DMA_RW.size + count}")
    address, n = DMA_RW.unpack_from(payload)
    if address != iova or n != count:
        raise ProtocolError(f"DMA_READ reply for {address:#x}+{n}, asked {iova:#x}+{count}")
    return bytes(payload[DMA_RW.size :])


def check_dma_write_reply(payload: bytes, iova: int, count: int) -> None:
    """A DMA_WRITE reply is header-only (QEMU) or repeats address and count (spec)."""
    if not payload:
        return
    if len(payload) != DMA_RW.size:
        raise ProtocolError(f"DMA_WRITE reply: {len(payload)} bytes, expected 0 or {DMA_RW.size}")
    address, n = DMA_RW.unpack_from(payload)
    if address != iova or n != count:
        raise ProtocolError(f"DMA_WRITE reply for {address:#x}+{n}, asked {iova:#x}+{count}")
