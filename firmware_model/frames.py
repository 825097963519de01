"""Ethernet and IP framing the firmware needs around its engines (pure functions on bytes).

Where the IP header starts (one 802.1Q tag allowed), which upper header follows IPv6 extension headers
(RFC 8200 §4), an ESP sequence number and trailer, a selector key, and a new IP packet back in its frame.
"""

from __future__ import annotations

import struct

from device.contract.net import (
    ETH_HLEN,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    IPV6_DSTOPTS,
    IPV6_HOPOPTS,
    IPV6_ROUTING,
)

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")


_IPV6_SKIPPED = (IPV6_HOPOPTS, IPV6_ROUTING, IPV6_DSTOPTS)  # the options headers (RFC 8200 §4)


def ipv6_upper(packet: bytes | bytearray, start: int, limit: int) -> tuple[int, int]:
    """(protocol, offset) of the first header after the IPv6 extension headers the card walks past;
    a fragment header is returned as such (fragments are never offloaded); (-1, -1) if truncated."""
    nh = packet[start + 6]
    off = start + 40
    for _ in range(9):  # bounded: up to 8 options headers, then the upper header (datasheet §7.5)
        if nh not in _IPV6_SKIPPED:
            return (nh, off) if off <= limit else (-1, -1)
        if off + 8 > limit:
            return -1, -1
        nh, off = packet[off], off + (packet[off + 1] + 1) * 8
    return -1, -1


def l3_offset(frame: bytes) -> tuple[int, int]:
    """(offset of the IP header, IP version) of an Ethernet frame (one 802.1Q tag allowed), or (-1, 0)."""
    if len(frame) < ETH_HLEN:
        return -1, 0
    etype = _U16.unpack_from(frame, 12)[0]
    l3 = ETH_HLEN
    if etype == ETH_P_8021Q:
        if len(frame) < 18:
            return -1, 0
        etype = _U16.unpack_from(frame, 16)[0]
        l3 = 18
    if etype == ETH_P_IP and len(frame) > l3 and frame[l3] >> 4 == 4:
        return l3, 4
    if etype == ETH_P_IPV6 and len(frame) > l3 and frame[l3] >> 4 == 6:
        return l3, 6
    return -1, 0


def reframe(frame: bytes, l3: int, ip_packet: bytes) -> bytes:
    """Ethernet header of `frame` around a new IP packet (ethertype follows the IP version)."""
    etype = ETH_P_IPV6 if ip_packet and ip_packet[0] >> 4 == 6 else ETH_P_IP
    if frame[l3 - 2] == etype >> 8 and frame[l3 - 1] == etype & 0xFF:
        return b"".join((frame[:l3], ip_packet))  # the usual case: same IP version, header kept
    head = bytearray(frame[:l3])
    head[l3 - 2 : l3] = _U16.pack(etype)
    return bytes(head) + ip_packet


def esp_seq(buf: bytes | bytearray, l3: int) -> int | None:
    if buf[l3] >> 4 == 4:
        ihl = (buf[l3] & 0x0F) * 4
        proto, off = buf[l3 + 9], l3 + ihl
    else:
        proto, off = ipv6_upper(buf, l3, len(buf))
    if proto == 17:
        off += 8
    elif proto == 51:
        off += 4
    elif proto != 50:
        return None
    if off < 0 or len(buf) < off + 8:
        return None
    return _U32.unpack_from(buf, off + 4)[0]


def selector_key(ip: bytes) -> tuple[int, int, int, int, int, int] | None:
    """(family, src, dst, proto, sport, dport) of a plain IP packet, for selector lookup."""
    if len(ip) < 20:
        return None
    if ip[0] >> 4 == 4:
        ihl = (ip[0] & 0x0F) * 4
        proto = ip[9]
        src, dst = int.from_bytes(ip[12:16], "big"), int.from_bytes(ip[16:20], "big")
        off, family = ihl, 4
        if _U16.unpack_from(ip, 6)[0] & 0x1FFF:
            off = -1  # non-first fragment: no ports
    elif ip[0] >> 4 == 6 and len(ip) >= 40:
        src, dst = int.from_bytes(ip[8:24], "big"), int.from_bytes(ip[24:40], "big")
        proto, off = ipv6_upper(ip, 0, len(ip))
        family = 6
        if proto < 0:
            return None
    else:
        return None
    sport = dport = 0
    if proto in (6, 17, 132) and off >= 0 and len(ip) >= off + 4:
        sport, dport = struct.unpack_from("!HH", ip, off)
    return family, src, dst, proto, sport, dport


def esp_trailer(frame: bytes, icv_len: int) -> tuple[int, int] | None:
    """(next header, pad length) of the ESP trailer at the end of the frame's IP packet (RFC 4303 §2:
    ... padding, pad length, next header, ICV). The IP length fields decide where the packet ends, so
    Ethernet padding after a short packet is not mistaken for the trailer."""
    if icv_len < 0:
        return None
    l3, ver = l3_offset(frame)
    if ver == 4 and len(frame) >= l3 + 20:
        end = l3 + _U16.unpack_from(frame, l3 + 2)[0]
    elif ver == 6 and len(frame) >= l3 + 40:
        end = l3 + 40 + _U16.unpack_from(frame, l3 + 4)[0]
    else:
        return None
    at = end - icv_len - 2
    if at < l3 or end > len(frame):
        return None
    return frame[at + 1], frame[at]
