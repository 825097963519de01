"""Capture files as people have them: classic pcap and pcapng, read and written through scapy.

Formats: classic pcap (draft-ietf-opsawg-pcap §4-5: µs or ns magic, either byte order) and pcapng
(draft-ietf-opsawg-pcapng §4.2 Interface Description Block = per-interface link type, §4.3 Enhanced Packet
Block). Link types (tcpdump.org "Link-layer header types"): ETHERNET 1, RAW 101 (and the BSD values 12/14
for raw IP), IPV4 228 and IPV6 229 (what scapy's wrpcap writes for IP packets).

Parsing is scapy's RawPcapReader / RawPcapNgReader (a maintained reader; as fast as the hand-written one it
replaced). Scapy reports malformed input only through log warnings or by ending the iteration early, so this
module turns both into one-line CaptureError messages naming the record. The card's own wire recorder
(device/nic/pcap.py) stays hand-written: it is on the datapath's hot path and writes Ethernet only.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from pathlib import Path

from scapy.config import conf
from scapy.error import Scapy_Exception, log_runtime
from scapy.utils import RawPcapNgReader, RawPcapNgWriter, RawPcapReader, RawPcapWriter

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
_RAW_ALIASES = frozenset({12, 14})  # DLT_RAW on some BSDs (tcpdump.org: map to LINKTYPE_RAW)
SUPPORTED_LINKTYPES = frozenset({LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6}) | _RAW_ALIASES
MAX_RECORD = 256 * 1024  # larger than any jumbo frame; a bigger record means a corrupt file
_MAGICS = {  # classic µs / ns in both byte orders, pcapng SHB block type, gzip (scapy reads gzipped captures)
    b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d", b"\x0a\x0d\x0d\x0a",
}
_FAKE_ETH = bytes(6) + b"\x02\x00\x00\x00\x00\x01"  # dst, src (locally administered)
_ETH_IPV4 = b"\x08\x00"
_ETH_IPV6 = b"\x86\xdd"


class CaptureError(ValueError):
    """Malformed or unsupported capture file (one line)."""


class CaptureFormat(Enum):
    PCAP = "pcap"
    PCAPNG = "pcapng"


@dataclass(frozen=True)
class CaptureRecord:
    data: bytes
    linktype: int
    ts_ticks: int  # timestamp in units of 1/ts_resolution seconds
    ts_resolution: int


@dataclass(frozen=True)
class Capture:
    fmt: CaptureFormat
    records: list[CaptureRecord]
    endian: str = "<"  # classic pcap only: written back in the input's byte order and resolution
    nano: bool = False
    snaplen: int = MAX_RECORD


class _ScapyComplaints(logging.Handler):
    """Collects scapy's runtime warnings, which are its only report of a malformed capture."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _scapy_warnings() -> Iterator[_ScapyComplaints]:
    # scapy rate-limits repeated warnings (conf.warning_threshold) and prints them; here every warning must
    # reach us and none may reach the terminal, so both are switched off for the duration of one read.
    handler = _ScapyComplaints()
    saved = (conf.warning_threshold, log_runtime.propagate)
    conf.warning_threshold = 0
    log_runtime.propagate = False
    log_runtime.addHandler(handler)
    try:
        yield handler
    finally:
        log_runtime.removeHandler(handler)
        conf.warning_threshold, log_runtime.propagate = saved


def read_capture(path: str | Path) -> Capture:
    name = str(path)
    try:
        size = os.stat(name).st_size
        with open(name, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CaptureError(f"{name}: cannot read: {exc.strerror or exc}") from None
    if len(magic) < 4:
        raise CaptureError(f"{name}: too short for a capture file ({size} bytes)")
    if magic not in _MAGICS and magic[:2] != b"\x1f\x8b":
        raise CaptureError(f"{name}: not a pcap or pcapng file (magic {magic.hex()})")
    with _scapy_warnings() as complaints:
        try:
            reader = RawPcapReader(name)  # scapy's metaclass returns a RawPcapNgReader for pcapng
        except Scapy_Exception as exc:
            detail = complaints.messages[0] if complaints.messages else str(exc)
            kind = "pcapng" if magic == b"\x0a\x0d\x0d\x0a" else "pcap"
            raise CaptureError(f"{name}: malformed {kind} file header: {detail}") from None
        with reader:
            return _read_all(reader, name, size, complaints)


def _read_all(reader: RawPcapReader, name: str, size: int, complaints: _ScapyComplaints) -> Capture:
    ng = isinstance(reader, RawPcapNgReader)
    records: list[CaptureRecord] = []
    if not ng:
        _check_linktype(reader.linktype & 0x0FFF_FFFF, name, "the file header")  # upper bits: FCS info
    end_of_last = reader.f.tell()
    while True:
        index = len(records)
        try:
            data, meta = reader._read_packet(size=MAX_RECORD)
        except EOFError as exc:
            if complaints.messages or exc.args:
                reason = complaints.messages[0] if complaints.messages else str(exc.args[0])
                raise CaptureError(f"{name}: record {index}: {reason}") from None
            break
        if ng:
            linktype = meta.linktype
            ticks, resolution = (meta.tshigh << 32) | meta.tslow, meta.tsresol
            caplen = len(data)
        else:
            linktype = reader.linktype & 0x0FFF_FFFF
            resolution = 1_000_000_000 if reader.nano else 1_000_000
            ticks, caplen = meta.sec * resolution + meta.usec, meta.caplen
            if caplen != len(data):
                raise CaptureError(f"{name}: record {index} truncated ({caplen} bytes announced, {len(data)} present)")
        if complaints.messages:
            raise CaptureError(f"{name}: record {index}: {complaints.messages[0]}")
        if caplen > MAX_RECORD:
            raise CaptureError(f"{name}: record {index} claims {caplen} bytes (corrupt file?)")
        if meta.wirelen > caplen:
            raise CaptureError(f"{name}: record {index} was captured cut short ({caplen} of {meta.wirelen} bytes); "
                               "capture again with a larger snaplen")
        _check_linktype(linktype, name, f"record {index}")
        records.append(CaptureRecord(data, linktype, ticks, resolution))
        end_of_last += 16 + caplen  # classic record header + data (tell() per record would cost a third)
    # scapy ends silently on a cut-off record header or block; a clean end consumed the whole file
    if not isinstance(reader.f, gzip.GzipFile):
        consumed = reader.f.tell() if ng else end_of_last
        if consumed != size or (ng and size % 4):
            raise CaptureError(f"{name}: record {len(records)} truncated at byte {consumed} of {size}")
    if ng:
        return Capture(CaptureFormat.PCAPNG, records)
    return Capture(CaptureFormat.PCAP, records, endian=reader.endian, nano=reader.nano,
                   snaplen=max(reader.snaplen, MAX_RECORD))


def _check_linktype(linktype: int, name: str, where: str) -> None:
    if linktype not in SUPPORTED_LINKTYPES:
        raise CaptureError(f"{name}: {where}: link type {linktype} not supported "
                           "(Ethernet 1, raw IP 101, IPv4 228, IPv6 229)")


def to_frame(data: bytes, linktype: int) -> bytes | None:
    """The Ethernet frame the firmware sees for one record (None for an empty record)."""
    if linktype == LINKTYPE_ETHERNET:
        return data
    if not data:
        return None
    version = data[0] >> 4
    if linktype == LINKTYPE_IPV4 and version != 4 or linktype == LINKTYPE_IPV6 and version != 6:
        return None  # not the family its link type promises: counted, never guessed
    return _FAKE_ETH + (_ETH_IPV6 if version == 6 else _ETH_IPV4) + data


def from_frame(frame: bytes, linktype: int) -> tuple[bytes, int]:
    """(record data, link type) for an output frame; the link type changes only when an IP-family link
    type cannot carry the frame (IPv4 inner in an IPv6 tunnel and the like)."""
    if linktype == LINKTYPE_ETHERNET:
        return frame, linktype
    ip = frame[14:]
    if linktype in (LINKTYPE_IPV4, LINKTYPE_IPV6):
        fits = LINKTYPE_IPV6 if frame[12:14] == _ETH_IPV6 else LINKTYPE_IPV4
        return ip, fits
    return ip, linktype


def write_capture(path: str | Path, template: Capture, records: list[CaptureRecord]) -> None:
    """Write `records` in the input's format: classic pcap keeps byte order and resolution and has one link
    type (raw IP 101 when IPv4 and IPv6 records mix under 228/229); pcapng gets one interface per link type."""
    name = str(path)
    if template.fmt is CaptureFormat.PCAPNG:
        _write_pcapng(name, records)
        return
    linktypes = {r.linktype for r in records}
    if len(linktypes) > 1:
        linktype = LINKTYPE_RAW  # only 228/229 mix: both are raw IP
    elif linktypes:
        linktype = linktypes.pop()
    else:
        linktype = LINKTYPE_ETHERNET
    unit = 1_000_000_000 if template.nano else 1_000_000
    with RawPcapWriter(name, linktype=linktype, endianness=template.endian, nano=template.nano,
                       snaplen=template.snaplen) as w:
        w.write_header(None)
        for r in records:
            sec, frac = divmod(r.ts_ticks * unit // r.ts_resolution, unit)
            w.write_packet(r.data, sec=sec, usec=frac)


def _write_pcapng(name: str, records: list[CaptureRecord]) -> None:
    w = RawPcapNgWriter(name)
    # scapy numbers interfaces by name: the first link type is interface 0 (name None), later ones get a name
    first = records[0].linktype if records else LINKTYPE_ETHERNET
    w.linktype = first
    try:
        w.write_header(None)
        for r in records:
            ifname = None if r.linktype == first else f"linktype-{r.linktype}".encode()
            # scapy writes µs resolution (no if_tsresol option); Decimal keeps the integer division exact
            w._write_packet(r.data, r.linktype, sec=Decimal(r.ts_ticks) / Decimal(r.ts_resolution), ifname=ifname)
    finally:
        w.close()
