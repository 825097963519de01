"""A classic pcap recorder for the card's wire (every frame sent and received).

Format: the original libpcap file format (tcpdump.org "pcap-savefile", draft-ietf-opsawg-pcap §4-§5):
a 24-byte global header (magic 0xA1B2C3D4 = microsecond timestamps, version 2.4, snaplen,
LINKTYPE_ETHERNET = 1) followed by a 16-byte record header and the frame bytes per packet. Written in
little-endian host order, which readers detect from the magic.

Every record is flushed as it is written, so a run that is killed still leaves a readable file
(at worst the last record is cut short, which readers report as a truncated capture).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

PCAP_MAGIC_US = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535  # larger than any frame the card sends (MAX_MTU 9216 + headers)
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


def global_header(snaplen: int = SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    return _GLOBAL.pack(PCAP_MAGIC_US, 2, 4, 0, 0, snaplen, linktype)


class PcapWriter:
    """Append Ethernet frames to a pcap file. Write errors are logged once and stop the recording;
    they never reach the datapath."""

    def __init__(self, path: str | Path, clock=time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self.frames = 0
        self.failed = False
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - lives until close()
        self._file.write(global_header())
        self._file.flush()

    def write(self, frame: bytes | bytearray | memoryview) -> None:
        f = self._file
        if f is None:
            return
        now = self._clock()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        n = len(frame)
        caplen = min(n, SNAPLEN)
        try:
            f.write(_RECORD.pack(sec, usec, caplen, n))
            f.write(frame[:caplen] if caplen < n else frame)
            f.flush()
        except OSError as exc:
            log.warning("pcap %s: write failed (%s); recording stopped", self.path, exc.strerror or exc)
            self.failed = True
            self.close()
            return
        self.frames += 1

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
