"""AH wire format and ICV computation (RFC 4302).

AH header (RFC 4302 §2): Next Header(1) | Payload Len(1) = AH length in 32-bit words - 2 | Reserved(2) |
SPI(4) | Seq(4) | ICV | padding to 4 bytes (IPv4) / 8 bytes (IPv6). Integrity is HMAC only: AES-GMAC in AH
(RFC 4543 §3.2, with an 8-byte IV) is refused when the SA is added (datasheet §12.1 decision 23).

The ICV covers the whole IP packet with mutable fields zeroed (RFC 4302 §3.3.3.1) and the ICV field
zeroed; with ESN the high 32 bits of the sequence number are appended after the end of the packet for
the computation only (RFC 4302 §2.5.1, §3.3.3.2.2 / §3.4.4).

Handled: IPv4 with or without options (RFC 4302 App. A.1: the listed immutable options are kept, every
other option is zeroed entirely), IPv6 with hop-by-hop / destination options (option data zeroed when the
option type has the "may change en route" bit 0x20, RFC 8200 §4.2). Not handled: IPv6 routing headers in
front of AH (their ICV needs the final-destination reordering of RFC 4302 §3.3.3.1.2.2) -> BAD_SYNTAX.
"""

from __future__ import annotations

import hmac as _hmac_cmp
import struct

from device.contract.net import IPV6_DSTOPTS, IPV6_FRAGMENT, IPV6_HOPOPTS, IPV6_ROUTING
from device.contract.sa import SaParams
from firmware_model.algorithms import auth_info
from firmware_model.esp import U32, hmac_base

AH_FIXED = struct.Struct("!BBHII")  # next header, payload len, reserved, SPI, Seq
AH_FIXED_LEN = 12

# RFC 4302 Appendix A.1 immutable IPv4 options, by option number (type & 0x1f), as scapy does.
IMMUTABLE_V4_OPTIONS = frozenset((0, 1, 2, 5, 6, 20, 21))


def ah_length(iv_len: int, icv_len: int, family: int) -> int:
    """Total AH length incl. ICV padding: a multiple of 4 bytes over IPv4, of 8 over IPv6 (RFC 4302 §3.3.3.2.1)."""
    raw = AH_FIXED_LEN + iv_len + icv_len
    align = 8 if family == 6 else 4
    return raw + (-raw % align)


def zero_mutable_ipv4(header: bytearray) -> bool:
    """Zero TOS, flags+fragment offset, TTL and checksum (RFC 4302 §3.3.3.1.1.1) and mutable options
    (§3.3.3.1.1.2). `header` is the IPv4 header only. False if the options are malformed."""
    header[1] = 0
    header[6] = header[7] = 0
    header[8] = 0
    header[10] = header[11] = 0
    i = 20
    end = len(header)
    while i < end:
        kind = header[i]
        if kind == 0:  # end of option list: the rest is padding
            break
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= end:
            return False
        length = header[i + 1]
        if length < 2 or i + length > end:
            return False
        if (kind & 0x1F) not in IMMUTABLE_V4_OPTIONS:
            header[i:i + length] = bytes(length)
        i += length
    return True


def zero_mutable_ipv6(packet: bytearray, ah_at: int) -> bool:
    """Zero traffic class, flow label and hop limit (RFC 4302 §3.3.3.1.2.1) and the data of options
    marked mutable in hop-by-hop / destination options headers in front of AH. False for a routing
    header or a malformed chain."""
    packet[0] &= 0xF0
    packet[1] = packet[2] = packet[3] = 0
    packet[7] = 0
    nh = packet[6]
    off = 40
    while off < ah_at:
        if nh in (IPV6_ROUTING, IPV6_FRAGMENT):
            return False
        if nh not in (IPV6_HOPOPTS, IPV6_DSTOPTS):
            return False
        end = off + (packet[off + 1] + 1) * 8
        if end > ah_at:
            return False
        i = off + 2
        while i < end:
            opt = packet[i]
            if opt == 0:  # Pad1
                i += 1
                continue
            if i + 1 >= end:
                return False
            olen = packet[i + 1]
            if i + 2 + olen > end:
                return False
            if opt & 0x20:
                packet[i + 2:i + 2 + olen] = bytes(olen)
            i += 2 + olen
        nh = packet[off]
        off = end
    return off == ah_at


class AhHmac:
    """HMAC-SHA1-96 (RFC 2404), HMAC-SHA-256-128 (RFC 4868), HMAC-MD5-96 (RFC 2403) for AH."""

    __slots__ = ("_mac", "icv_len", "iv_len")

    def __init__(self, hash_name: str, key: bytes, icv_len: int) -> None:
        self._mac = hmac_base(hash_name, key)
        self.icv_len = icv_len
        self.iv_len = 0

    def compute(self, data: bytes | bytearray, seq_hi: int | None, iv: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(data)
        if seq_hi is not None:
            mac.update(U32.pack(seq_hi))
        return mac.finalize()[:self.icv_len]

    def verify(self, data: bytes | bytearray, seq_hi: int | None, iv: bytes, icv: bytes) -> bool:
        return _hmac_cmp.compare_digest(self.compute(data, seq_hi, iv), icv)


AhTransform = AhHmac


def build_ah_transform(params: SaParams) -> AhTransform:
    auth = auth_info(params.auth_alg)
    return AhHmac(auth.hash_name, params.auth_key, auth.icv_len)
