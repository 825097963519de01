"""Frames the guest tools send and receive: Ethernet/IPv4/IPv6/UDP building, and the host's share of
ESP under crypto offload (NDIS IPsec offload v2).

Crypto offload splits ESP between host and card: the host builds the packet - ESP header with SPI and
its own sequence number, room for the IV, the payload, padding (RFC 4303 §2.4: 1, 2, 3, ...), pad
length, next header and room for the ICV - and the card writes IV, ciphertext and ICV in place. On
receive the card decrypts in place and leaves the ESP header and trailer; :func:`strip_esp` removes them.

AH (RFC 4302) under crypto offload: the host inserts the AH header with SPI, sequence number and zeroed
room for the ICV (and IV, AES-GMAC); the card computes the ICV in place. ESP-then-AH bundles: ESP is built
first, AH then protects the result in transport mode (RFC 4301 §4.5); on receive AH is stripped first.

Pure functions on bytes; standard library only.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from device.contract.net import (
    ETH_HLEN,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_AH,
    IPPROTO_ESP,
    IPPROTO_IPV4,
    IPPROTO_IPV6,
    IPPROTO_NONE,
    IPPROTO_UDP,
)

DEFAULT_TTL = 64

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_ESP = struct.Struct("!II")
_PAD = bytes(range(1, 256))


class FrameError(ValueError):
    """A frame or packet cannot be built or parsed as asked."""


def parse_mac(text: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6:
        raise FrameError(f"bad MAC address {text!r}: expected six hex bytes like 02:00:00:00:00:01")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise FrameError(f"bad MAC address {text!r}") from None


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_header(src: str, dst: str, proto: int, payload_len: int, ttl: int = DEFAULT_TTL, ident: int = 0) -> bytes:
    total = 20 + payload_len
    if total > 0xFFFF:
        raise FrameError(f"IPv4 packet of {total} bytes exceeds 65535")
    hdr = bytearray(_IPV4.pack(0x45, 0, total, ident & 0xFFFF, 0x4000, ttl, proto, 0,
                               ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr)


def ipv6_header(src: str, dst: str, proto: int, payload_len: int, hop_limit: int = DEFAULT_TTL) -> bytes:
    if payload_len > 0xFFFF:
        raise FrameError(f"IPv6 payload of {payload_len} bytes needs a jumbogram")
    return _IPV6.pack(6 << 28, payload_len, proto, hop_limit,
                      ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)


def ip_header(src: str, dst: str, proto: int, payload_len: int) -> bytes:
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise FrameError(f"{src} and {dst} are different IP families")
    if ipaddress.ip_address(dst).version == 4:
        return ipv4_header(src, dst, proto, payload_len)
    return ipv6_header(src, dst, proto, payload_len)


def udp_checksum(src: str, dst: str, segment: bytes) -> int:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        pseudo = s + d + struct.pack("!BBH", 0, IPPROTO_UDP, len(segment))
    else:
        pseudo = s + d + struct.pack("!IxxxB", len(segment), IPPROTO_UDP)
    value = checksum(pseudo + segment)
    return value or 0xFFFF  # RFC 768: a computed 0 is sent as all ones


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A complete IPv4/IPv6 UDP packet with a correct UDP checksum."""
    length = 8 + len(payload)
    seg = bytearray(_UDP.pack(sport, dport, length, 0) + payload)
    struct.pack_into("!H", seg, 6, udp_checksum(src, dst, bytes(seg)))
    return ip_header(src, dst, IPPROTO_UDP, length) + bytes(seg)


def ethernet(dst_mac: bytes, src_mac: bytes, ip_packet: bytes) -> bytes:
    etype = ETH_P_IPV6 if ip_packet and ip_packet[0] >> 4 == 6 else ETH_P_IP
    return _ETH.pack(dst_mac, src_mac, etype) + ip_packet


def pattern_payload(size: int, counter: int) -> bytes:
    """``size`` bytes: an 8-byte counter, then a repeating pattern (so receivers can check content)."""
    head = struct.pack("!Q", counter)[:size]
    return head + bytes(i & 0xFF for i in range(size - len(head)))


# ---------------------------------------------------------------------------------------------
# crypto-offload ESP: host side


@dataclass(frozen=True)
class EspGeometry:
    """What the host needs to frame ESP for one SA (from device.contract.algorithms facts)."""

    spi: int
    iv_len: int
    icv_len: int
    align: int  # payload + trailer multiple of this (RFC 4303 §2.4: cipher block, at least 4)
    tunnel: bool = False
    encap: tuple[int, int] | None = None  # UDP (sport, dport), RFC 3948
    src: str = ""  # tunnel: outer endpoints
    dst: str = ""


@dataclass(frozen=True)
class EspFrame:
    packet: bytes  # the IP packet to hand to the card
    esp_offset: int  # ESP header offset inside packet
    pad_length: int
    next_header: int


def esp_trailer(payload_len: int, next_header: int, align: int) -> bytes:
    """Padding 1, 2, 3, ... + pad length + next header, least padding that aligns (RFC 4303 §2.4)."""
    pad = -(payload_len + 2) % align
    return _PAD[:pad] + bytes((pad, next_header))


def _ip_split(packet: bytes) -> tuple[int, int, int]:
    """(version, header length, protocol) of a plain IP packet (IPv6 without extension headers)."""
    if len(packet) < 20:
        raise FrameError("packet shorter than an IP header")
    ver = packet[0] >> 4
    if ver == 4:
        ihl = (packet[0] & 0xF) * 4
        if ihl < 20 or len(packet) < ihl:
            raise FrameError("bad IPv4 header length")
        return 4, ihl, packet[9]
    if ver == 6:
        if len(packet) < 40:
            raise FrameError("packet shorter than an IPv6 header")
        return 6, 40, packet[6]
    raise FrameError(f"not an IP packet (version {ver})")


def _rewrite_ip(header: bytes, proto: int, payload_len: int) -> bytes:
    """Same IP header with a new protocol/next header and length (IPv4 checksum recomputed)."""
    hdr = bytearray(header)
    if hdr[0] >> 4 == 4:
        struct.pack_into("!H", hdr, 2, len(hdr) + payload_len)
        hdr[9] = proto
        struct.pack_into("!H", hdr, 10, 0)
        struct.pack_into("!H", hdr, 10, checksum(hdr))
    else:
        struct.pack_into("!H", hdr, 4, payload_len)
        hdr[6] = proto
    return bytes(hdr)


def build_esp(geo: EspGeometry, packet: bytes, seq: int) -> EspFrame:
    """Wrap an IP packet for crypto offload: ESP with zeroed IV and ICV room for the card to fill.

    Transport mode keeps the packet's IP header (protocol -> ESP or UDP) and protects its payload;
    tunnel mode protects the whole packet under a new outer header between the SA endpoints.
    ``seq`` is the full sequence number (its low 32 bits go in the header, RFC 4304 §2).
    """
    ver, ihl, proto = _ip_split(packet)
    if geo.tunnel:
        inner, nh = packet, (IPPROTO_IPV4 if ver == 4 else IPPROTO_IPV6)
        outer_src, outer_dst = geo.src, geo.dst
        header = None
    else:
        inner, nh = packet[ihl:], proto
        header = packet[:ihl]
    trailer = esp_trailer(len(inner), nh, geo.align)
    body = (_ESP.pack(geo.spi, seq & 0xFFFF_FFFF) + bytes(geo.iv_len) + inner + trailer + bytes(geo.icv_len))
    if geo.encap is not None:
        # RFC 3948 §2.1: UDP checksum SHOULD be zero for ESP-in-UDP (the card changes the payload after us).
        body = _UDP.pack(geo.encap[0], geo.encap[1], 8 + len(body), 0) + body
    outer_proto = IPPROTO_UDP if geo.encap is not None else IPPROTO_ESP
    if header is None:
        header = ip_header(outer_src, outer_dst, outer_proto, len(body))
    else:
        header = _rewrite_ip(header, outer_proto, len(body))
    esp_at = len(header) + (8 if geo.encap is not None else 0)
    return EspFrame(header + body, esp_at, trailer[-2], nh)


@dataclass(frozen=True)
class Stripped:
    packet: bytes | None  # the inner IP packet; None for a dummy packet (next header 59)
    next_header: int
    pad_length: int


def strip_esp(geo: EspGeometry, packet: bytes) -> Stripped:
    """Undo :func:`build_esp` on a packet the card decrypted in place (header, IV, trailer, ICV go)."""
    ver, ihl, proto = _ip_split(packet)
    end = len(packet)
    if ver == 4:
        end = min(end, struct.unpack_from("!H", packet, 2)[0])
    else:
        end = min(end, 40 + struct.unpack_from("!H", packet, 4)[0])
    at = ihl
    if proto == IPPROTO_UDP:
        at += 8
    elif proto != IPPROTO_ESP:
        raise FrameError(f"IP protocol {proto} is not ESP")
    plain_start = at + _ESP.size + geo.iv_len
    plain_end = end - geo.icv_len
    if plain_end - plain_start < 2:
        raise FrameError("ESP packet too short for its IV and ICV")
    pad, nh = packet[plain_end - 2], packet[plain_end - 1]
    data_end = plain_end - 2 - pad
    if data_end < plain_start or packet[data_end:plain_end - 2] != _PAD[:pad]:
        raise FrameError("ESP padding is not 1, 2, 3, ... (RFC 4303 §2.4): not decrypted?")
    inner = packet[plain_start:data_end]
    if nh == IPPROTO_NONE:
        return Stripped(None, nh, pad)
    if nh in (IPPROTO_IPV4, IPPROTO_IPV6):
        return Stripped(inner, nh, pad)
    return Stripped(_rewrite_ip(packet[:ihl], nh, len(inner)) + inner, nh, pad)


@dataclass(frozen=True)
class AhGeometry:
    """What the host needs to frame AH for one SA."""

    spi: int
    iv_len: int  # 8 for AES-GMAC (RFC 4543 §3.2), else 0
    icv_len: int
    tunnel: bool = False
    src: str = ""  # tunnel: outer endpoints
    dst: str = ""


_AH = struct.Struct("!BBHII")  # next header, payload len (32-bit words - 2), reserved, SPI, sequence


def ah_length(iv_len: int, icv_len: int, version: int) -> int:
    """AH bytes incl. ICV padding: a multiple of 4 over IPv4, of 8 over IPv6 (RFC 4302 §3.3.3.2.1)."""
    raw = _AH.size + iv_len + icv_len
    return raw + (-raw % (8 if version == 6 else 4))


def build_ah(geo: AhGeometry, packet: bytes, seq: int) -> bytes:
    """Insert AH (zeroed IV/ICV room) after the IP header (transport) or under a new outer header (tunnel)."""
    ver, ihl, proto = _ip_split(packet)
    if geo.tunnel:
        nh, payload = (IPPROTO_IPV4 if ver == 4 else IPPROTO_IPV6), packet
        length = ah_length(geo.iv_len, geo.icv_len, ipaddress.ip_address(geo.dst).version)
    else:
        nh, payload = proto, packet[ihl:]
        length = ah_length(geo.iv_len, geo.icv_len, ver)
    ah = _AH.pack(nh, length // 4 - 2, 0, geo.spi, seq & 0xFFFF_FFFF) + bytes(length - _AH.size)
    if geo.tunnel:
        return ip_header(geo.src, geo.dst, IPPROTO_AH, len(ah) + len(payload)) + ah + payload
    return _rewrite_ip(packet[:ihl], IPPROTO_AH, len(ah) + len(payload)) + ah + payload


def strip_ah(packet: bytes) -> Stripped:
    """Remove the AH header the card verified: transport -> the packet with AH's next header restored;
    tunnel (next header IPv4/IPv6) -> the inner packet."""
    ver, ihl, proto = _ip_split(packet)
    if proto != IPPROTO_AH:
        raise FrameError(f"IP protocol {proto} is not AH")
    if len(packet) < ihl + _AH.size:
        raise FrameError("packet too short for AH")
    nh, words = packet[ihl], packet[ihl + 1]
    end = len(packet)
    if ver == 4:
        end = min(end, struct.unpack_from("!H", packet, 2)[0])
    else:
        end = min(end, 40 + struct.unpack_from("!H", packet, 4)[0])
    after = ihl + (words + 2) * 4
    if after > end:
        raise FrameError("AH length runs past the packet")
    payload = packet[after:end]
    if nh in (IPPROTO_IPV4, IPPROTO_IPV6):
        return Stripped(payload, nh, 0)
    return Stripped(_rewrite_ip(packet[:ihl], nh, len(payload)) + payload, nh, 0)


def outside_selector(packet: bytes, inner_src: str | None, inner_dst: str | None) -> str:
    """Why an inner IP packet falls outside a tunnel SA's selector ("" when it matches; None = any).

    RFC 4301 §5.2 step 4: after decapsulation the packet must match the SA's selectors, else it is
    discarded; crypto offload v2 gives the card no selector, so the host checks (and on send refuses)."""
    try:
        ver, _, _ = _ip_split(packet)
    except FrameError as exc:
        return str(exc)
    src, dst = (packet[12:16], packet[16:20]) if ver == 4 else (packet[8:24], packet[24:40])
    for name, want, got in (("source", inner_src, src), ("destination", inner_dst, dst)):
        if want is not None and ipaddress.ip_address(want).packed != got:
            return f"inner {name} {ipaddress.ip_address(got)} is not the SA's selector {want}"
    return ""


def l3_offset(frame: bytes) -> int:
    """Offset of the IP header in an Ethernet frame (one 802.1Q tag allowed), -1 if not IP."""
    if len(frame) < ETH_HLEN:
        return -1
    etype = struct.unpack_from("!H", frame, 12)[0]
    at = ETH_HLEN
    if etype == 0x8100 and len(frame) >= 18:
        etype, at = struct.unpack_from("!H", frame, 16)[0], 18
    return at if etype in (ETH_P_IP, ETH_P_IPV6) else -1
