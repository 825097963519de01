"""Which packets an inbound SA may deliver: the v1 ADD_SA filter and the packet-offload selector (pure).

v1 (OID_TCP_TASK_IPSEC_ADD_SA, OFFLOAD_IPSEC_ADD_SA): SrcAddr/SrcMask, DestAddr/DestMask, Protocol,
SrcPort, DestPort "constitute a filter that specifies the source and destination, as well as the IP
protocols, to which the SAs apply"; "if a filter parameter is set to zero, that parameter is not used";
for a tunnel SA the filter is the end-to-end (inner) connection and SrcTunnelAddr/DestTunnelAddr are the
outer endpoints. Packet offload: ADD_SA_PACKET's sel_* prefixes, checked after decapsulation as RFC 4301
§5.2 step 4 requires ("match the packet against the inbound selectors identified by the SAD entry").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from firmware_model.frames import ipv6_upper

_U16 = struct.Struct("!H")
_PORTED = (6, 17)  # seed 001: SrcPort/DestPort are "TCP or UDP" ports
_V4_FULL = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class PacketView:
    """What a filter looks at: addresses, upper protocol and ports (None when the packet has none: not
    TCP/UDP, or a non-first fragment, RFC 4301 §4.4.1.1 OPAQUE)."""

    src: int
    dst: int
    proto: int
    ports: tuple[int, int] | None


@dataclass(frozen=True, slots=True)
class TrafficFilter:
    """src/dst match when ``addr & mask == value``; a zero mask matches everything. proto 0 = any;
    port 0 = any."""

    src: int
    src_mask: int
    dst: int
    dst_mask: int
    proto: int = 0
    sport: int = 0
    dport: int = 0

    @classmethod
    def from_v1(cls, req, *, udpesp: bool) -> TrafficFilter:
        """The filter of a V1_ADD_SA / V1_ADD_UDPESP_SA request (IPv4: v1 carries 4-byte addresses)."""
        src = int.from_bytes(req.src_addr, "big")
        dst = int.from_bytes(req.dest_addr, "big")
        # Seed 000: a zero parameter is not used. A zero address is "any"; a non-zero address with a zero
        # mask keeps the address and drops only the mask, so it matches that host exactly.
        smask = (int.from_bytes(req.src_mask, "big") or _V4_FULL) if src else 0
        dmask = (int.from_bytes(req.dest_mask, "big") or _V4_FULL) if dst else 0
        proto = req.protocol
        if udpesp and proto == 17:
            # OFFLOAD_IPSEC_ADD_UDPESP_SA: Protocol "should be 11 (hexadecimal), which specifies UDP" -
            # the encapsulation, not a limit on the inner protocol (datasheet §12.1)
            proto = 0
        return cls(src & smask, smask, dst & dmask, dmask, proto, req.src_port, req.dest_port)

    @classmethod
    def from_prefixes(cls, bits: int, src: int, src_prefix: int, dst: int, dst_prefix: int,
                      proto: int = 0, sport: int = 0, dport: int = 0) -> TrafficFilter:
        full = (1 << bits) - 1
        smask = full ^ ((1 << (bits - src_prefix)) - 1)
        dmask = full ^ ((1 << (bits - dst_prefix)) - 1)
        return cls(src & smask, smask, dst & dmask, dmask, proto, sport, dport)

    @property
    def is_any(self) -> bool:
        return not (self.src_mask or self.dst_mask or self.proto or self.sport or self.dport)

    def matches_addrs(self, src: int, dst: int) -> bool:
        return (src & self.src_mask) == self.src and (dst & self.dst_mask) == self.dst

    def matches(self, view: PacketView) -> bool:
        if not self.matches_addrs(view.src, view.dst):
            return False
        if self.proto and view.proto != self.proto:
            return False
        if self.sport or self.dport:
            if view.proto not in _PORTED or view.ports is None:
                return False
            sport, dport = view.ports
            if (self.sport and sport != self.sport) or (self.dport and dport != self.dport):
                return False
        return True


def ports_at(buf: bytes | bytearray, proto: int, at: int, end: int) -> tuple[int, int] | None:
    """TCP/UDP (source, destination) port at ``at``, or None."""
    if proto not in _PORTED or at < 0 or at + 4 > end:
        return None
    return _U16.unpack_from(buf, at)[0], _U16.unpack_from(buf, at + 2)[0]


def view_ip(buf: bytes | bytearray, start: int = 0, end: int | None = None) -> PacketView | None:
    """The view of the plain IP packet at ``buf[start:end]`` (None if it is not one)."""
    end = len(buf) if end is None else end
    if end - start < 20:
        return None
    ver = buf[start] >> 4
    if ver == 4:
        ihl = (buf[start] & 0x0F) * 4
        proto = buf[start + 9]
        src = int.from_bytes(buf[start + 12:start + 16], "big")
        dst = int.from_bytes(buf[start + 16:start + 20], "big")
        first = not _U16.unpack_from(buf, start + 6)[0] & 0x1FFF
        return PacketView(src, dst, proto, ports_at(buf, proto, start + ihl, end) if first else None)
    if ver == 6 and end - start >= 40:
        src = int.from_bytes(buf[start + 8:start + 24], "big")
        dst = int.from_bytes(buf[start + 24:start + 40], "big")
        proto, off = ipv6_upper(buf, start, end)
        return PacketView(src, dst, proto, ports_at(buf, proto, off, end))
    return None


def outer_addrs(buf: bytes | bytearray, l3: int) -> tuple[int, int]:
    """(src, dst) of the IP header at ``l3`` as integers."""
    if buf[l3] >> 4 == 4:
        return int.from_bytes(buf[l3 + 12:l3 + 16], "big"), int.from_bytes(buf[l3 + 16:l3 + 20], "big")
    return int.from_bytes(buf[l3 + 8:l3 + 24], "big"), int.from_bytes(buf[l3 + 24:l3 + 40], "big")
