"""Runtime SA objects: one engine per SA, built once (cipher/MAC contexts cached), pure bytes in/out.

`SaEngine(params)` returns an `EspEngine` or an `AhEngine` (both are SaEngine subclasses). `SaBundle`
chains an ESP engine with an outer AH engine (ESP first, then AH over the result, as in RFC 4301 §4.5
"transport adjacency"; NDIS v2 describes such bundles as one SA with several SecAssoc entries).

Two ways to use an engine:
* crypto offload (the NDIS contract): the host built every header; `crypto_encrypt` writes IV, ciphertext
  and ICV in place, `crypto_decrypt` verifies and decrypts in place. No anti-replay here (NDIS keeps
  replay detection in the host); with ESN the high half comes from `set_seq_hi` (UPDATE_SA), and a
  receive that fails with it is retried once with high+1 (the low half just wrapped).
* packet offload: `encapsulate` numbers, pads, encrypts and frames a plain IP packet (transport or
  tunnel, IPv4/IPv6, optional RFC 3948 UDP encapsulation); `decapsulate` undoes it with anti-replay
  (RFC 4303 §3.4.3) and ESN reconstruction (Appendix A2).

IV choice: AES-GCM/GMAC use the 64-bit sequence number as the 8-byte IV (RFC 4106 §3.1 only asks for
uniqueness), forced strictly increasing per SA so crypto-offload packets with a repeated or smaller
sequence number still never reuse a nonce. AES-CBC uses an unpredictable IV (see esp.CbcHmacTransform).
Keyword `iv=` on encapsulate/crypto_encrypt injects an IV for known-answer tests only.

Lifetime: `soft_expired` turns True once soft_packets/soft_bytes is reached; past hard_packets/hard_bytes
every call returns HARD_LIMIT. `seq_nearly_exhausted` turns True when an outbound SA's sequence number
passes SEQ_WARN_MARGIN (2^20) below its limit (2^32 - 1 without ESN, 2^64 - 1 with), leaving ~1 M packets
for the host to rekey. Bytes counted = plain IP packet bytes (before encapsulation / after decapsulation).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, replace

from device.contract.algorithms import esp_align
from device.contract.enums import IpProto, Mode
from device.contract.net import (
    IPPROTO_AH,
    IPPROTO_ESP,
    IPPROTO_IPV4,
    IPPROTO_IPV6,
    IPPROTO_NONE,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_FRAGMENT,
)
from device.contract.sa import SaParams, effective_icv_len
from firmware_model import fastpath
from firmware_model.ah import (
    AH_FIXED,
    AH_FIXED_LEN,
    ah_length,
    build_ah_transform,
    zero_mutable_ipv4,
    zero_mutable_ipv6,
)
from firmware_model.algorithms import check_sa
from firmware_model.esp import (
    _HDR_WORDS,
    ESP_HDR,
    ESP_HDR_LEN,
    U16,
    U64,
    UDP_HDR,
    CbcHmacTransform,
    GcmTransform,
    UdpPayloadKind,
    Verdict,
    build_esp_transform,
    classify_udp_payload,
    fold_checksum,
    ipv4_checksum,
    ipv6_find_header,
    ipv6_transport_split,
    strip_trailer,
    trailer_table,
)
from firmware_model.replay import REJECT, ReplayWindow

SEQ_WARN_MARGIN = 1 << 20
_U32_MASK = 0xFFFF_FFFF
_V4HDR = struct.Struct("!BBHHHBBH4s4s")
_V6HDR = struct.Struct("!IHBB16s16s")
_V4_WORDS = struct.Struct("!10H")
OUTER_TTL = 64  # tunnel-mode outer TTL / hop limit
_IP_MF_OFFSET_MASK = 0x3FFF  # IPv4 "more fragments" flag + fragment offset
_ESP_PACK = ESP_HDR.pack
_ESP_UNPACK_FROM = ESP_HDR.unpack_from
_UDP_PACK = UDP_HDR.pack
# Enum member lookups through the class cost ~0.3 us each on Python 3.11; the hot paths use these.
_OK = Verdict.OK
_AUTH_FAILED = Verdict.AUTH_FAILED
_REPLAY = Verdict.REPLAY
_BAD_SYNTAX = Verdict.BAD_SYNTAX
_WRONG_PROTOCOL = Verdict.WRONG_PROTOCOL
_SEQ_OVERFLOW = Verdict.SEQ_OVERFLOW
_HARD_LIMIT = Verdict.HARD_LIMIT
_DUMMY = Verdict.DUMMY


@dataclass(slots=True)
class SaStats:
    """Plain per-SA counters (no key material)."""

    packets: int = 0
    bytes: int = 0
    auth_failures: int = 0
    replay_drops: int = 0
    syntax_errors: int = 0
    wrong_protocol: int = 0
    not_esp: int = 0
    dummy_packets: int = 0
    seq_overflows: int = 0
    hard_limit_drops: int = 0


class SaEngine:
    """Factory base: SaEngine(params) builds an EspEngine or AhEngine (raises ValueError /
    UnsupportedAlgorithm for parameters the firmware refuses)."""

    # Slots, not a __dict__: an engine has ~40 attributes, past what CPython's shared-key instance dicts
    # serve quickly, and the per-packet paths read a dozen of them (slot reads are ~10 ns cheaper each).
    __slots__ = ("params", "stats", "soft_expired", "hard_expired", "seq_nearly_exhausted", "spi", "window",
                 "transform", "_esn", "_seq", "_seq_hi", "_seq_limit", "_seq_warn", "_soft_packets",
                 "_soft_bytes", "_hard_packets", "_hard_bytes", "_limited", "_family", "_tunnel", "_src",
                 "_dst", "_ident", "_iv_len", "_icv_len", "_iv_last")

    params: SaParams
    stats: SaStats
    soft_expired: bool
    hard_expired: bool
    seq_nearly_exhausted: bool

    def __new__(cls, params: SaParams):
        if cls is SaEngine:
            cls = AhEngine if params.proto == IpProto.AH else EspEngine
        return super().__new__(cls)

    def _init_common(self, params: SaParams) -> None:
        check_sa(params)
        self.params = params
        self.stats = SaStats()
        self.soft_expired = False
        self.hard_expired = False
        self.seq_nearly_exhausted = False
        self.spi = params.spi
        self._esn = params.esn
        self._seq = params.seq  # outbound: last number used
        self._seq_hi = params.seq >> 32  # crypto offload ESN high half
        self._seq_limit = (1 << 64) - 1 if params.esn else _U32_MASK
        self._seq_warn = self._seq_limit - SEQ_WARN_MARGIN
        self.window = ReplayWindow(params.replay_window, esn=params.esn, top=params.seq)
        self._soft_packets = params.soft_packets
        self._soft_bytes = params.soft_bytes
        self._hard_packets = params.hard_packets
        self._hard_bytes = params.hard_bytes
        self._limited = bool(params.soft_packets or params.soft_bytes or params.hard_packets or params.hard_bytes)
        family = params.family
        self._family = family
        self._tunnel = params.mode == Mode.TUNNEL
        self._src = ipaddress.ip_address(params.src).packed
        self._dst = ipaddress.ip_address(params.dst).packed
        self._ident = 0

    # ----- shared bookkeeping ---------------------------------------------------------------------
    def set_seq_hi(self, hi: int) -> None:
        """ESN high 32 bits for crypto offload (pushed by UPDATE_SA)."""
        if not 0 <= hi <= _U32_MASK:
            raise ValueError("ESN high half must fit 32 bits")
        self._seq_hi = hi

    def _over_hard_limit(self) -> bool:
        st = self.stats
        if (self._hard_packets and st.packets >= self._hard_packets) or (
            self._hard_bytes and st.bytes >= self._hard_bytes
        ):
            self.hard_expired = True
            st.hard_limit_drops += 1
            return True
        return False

    def _count(self, nbytes: int) -> None:
        st = self.stats
        st.packets += 1
        st.bytes += nbytes
        if self._limited and not self.soft_expired and (
            (self._soft_packets and st.packets >= self._soft_packets)
            or (self._soft_bytes and st.bytes >= self._soft_bytes)
            # RFC 4301 §4.4.2.1: a limit with no soft value before it still warns the host; the packet
            # that reaches the hard limit is the last one processed and it carries SaDeleteReq
            or (not self._soft_packets and self._hard_packets and st.packets >= self._hard_packets)
            or (not self._soft_bytes and self._hard_bytes and st.bytes >= self._hard_bytes)
        ):
            self.soft_expired = True

    def _next_seq(self) -> int:
        """Next outbound number, or -1 if it would cycle (RFC 4303 §3.3.3; ESN: RFC 4304 §2)."""
        seq = self._seq + 1
        if seq > self._seq_limit:
            self.stats.seq_overflows += 1
            return -1
        if seq >= self._seq_warn:
            self.seq_nearly_exhausted = True
        return seq

    def _next_counter_iv(self, seq: int) -> bytes:
        """AES-GCM/GMAC IV: the 64-bit sequence number, forced strictly increasing (module docstring)."""
        iv = seq if seq > self._iv_last else self._iv_last + 1
        self._iv_last = iv
        return U64.pack(iv & 0xFFFF_FFFF_FFFF_FFFF)

    def _outer_header(self, payload_len: int, proto: int, tos: int) -> bytes:
        """Tunnel-mode outer header from the SA endpoints (RFC 4303 §3.1.2); DSCP/ECN copied from the
        inner header (RFC 4301 §5.1.2.1, RFC 6040 normal mode)."""
        if self._family == 4:
            self._ident = (self._ident + 1) & 0xFFFF
            total = 20 + payload_len
            hdr = _V4HDR.pack(0x45, tos, total, self._ident, 0, OUTER_TTL, proto, 0, self._src, self._dst)
            return hdr[:10] + U16.pack(fold_checksum(sum(_V4_WORDS.unpack(hdr)))) + hdr[12:]
        return _V6HDR.pack(0x6000_0000 | (tos << 20), payload_len, proto, OUTER_TTL, self._src, self._dst)


def _inner_tos(packet: bytes) -> int:
    if packet[0] >> 4 == 4:
        return packet[1]
    return ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)


def _udp6_fill_checksum(packet: bytearray, l3: int, udp_at: int, end: int) -> None:
    """Write the UDP checksum of the datagram at ``udp_at`` in the IPv6 packet at ``l3``. RFC 3948 lets
    UDP-ESP over IPv4 send zero, but IPv6 requires a real one (RFC 8200 §8.1), and Linux drops
    zero-checksum IPv6 UDP-ESP (net/ipv6/esp6.c computes it: esp_output_encap_csum)."""
    packet[udp_at + 6:udp_at + 8] = b"\0\0"
    seg = bytes(packet[udp_at:end])
    if len(seg) % 2:
        seg += b"\0"
    total = sum(struct.unpack(f"!{len(seg) // 2}H", seg))
    total += sum(struct.unpack("!16H", packet[l3 + 8:l3 + 40])) + (end - udp_at) + 17  # pseudo-header
    csum = fold_checksum(total) or 0xFFFF  # RFC 768: a computed zero is sent as all ones
    packet[udp_at + 6:udp_at + 8] = U16.pack(csum)


def l4_checksum_recompute(packet: bytearray, hl: int, proto: int) -> None:
    """Rewrite the TCP/UDP checksum of the transport packet (IP header of ``hl`` bytes at 0) over its
    current pseudo-header (RFC 793 §3.1 / RFC 768 / RFC 8200 §8.1). An IPv4 UDP checksum of zero means
    "not computed" (RFC 768) and stays zero; a computed zero is sent as all ones (UDP)."""
    at = hl
    pseudo = bytes(packet[12:20]) if packet[0] >> 4 == 4 else bytes(packet[8:40])
    seg_len = len(packet) - at
    csum_at = at + (16 if proto == IPPROTO_TCP else 6)
    if csum_at + 2 > len(packet):
        return  # truncated: leave it for the host to refuse
    if proto == IPPROTO_UDP and packet[0] >> 4 == 4 and not (packet[csum_at] | packet[csum_at + 1]):
        return
    packet[csum_at:csum_at + 2] = b"\0\0"
    seg = bytes(packet[at:]) + (b"\0" if seg_len % 2 else b"")
    total = sum(struct.unpack(f"!{len(seg) // 2}H", seg)) + sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo))
    total += seg_len + proto
    csum = fold_checksum(total)
    if proto == IPPROTO_UDP and not csum:
        csum = 0xFFFF
    packet[csum_at:csum_at + 2] = U16.pack(csum)


def _ip_extent(packet: bytes | bytearray, l3: int) -> tuple[int, int, int]:
    """(version, header length for IPv4 / 40 for IPv6, end offset) of the IP packet at l3, or
    (0, 0, 0) if it is malformed or truncated. Bytes after `end` (Ethernet padding) are ignored."""
    n = len(packet) - l3
    if n < 20:
        return 0, 0, 0
    ver = packet[l3] >> 4
    if ver == 4:
        hl = (packet[l3] & 0x0F) << 2
        total = (packet[l3 + 2] << 8) | packet[l3 + 3]
        if hl < 20 or total < hl or total > n:
            return 0, 0, 0
        return 4, hl, l3 + total
    if ver == 6:
        if n < 40:
            return 0, 0, 0
        total = 40 + ((packet[l3 + 4] << 8) | packet[l3 + 5])
        if total > n:
            return 0, 0, 0
        return 6, 40, l3 + total
    return 0, 0, 0


class EspEngine(SaEngine):
    __slots__ = ("_seal", "_open", "_block", "_align", "_trailers", "_counter_iv", "_gcm_direct", "_gcm_salt",
                 "_v4_encrypt", "_v4_decrypt", "_min_body", "_encap", "_ip_proto", "_fast_seq_end", "_spi_hi")

    def __init__(self, params: SaParams) -> None:
        self._init_common(params)
        if params.proto != IpProto.ESP:
            raise ValueError("EspEngine needs an ESP SA")
        tr = build_esp_transform(params)
        self.transform = tr
        self._seal = tr.seal
        self._open = tr.open
        self._iv_len = tr.iv_len
        self._icv_len = effective_icv_len(params) if tr.icv_len else 0
        self._block = tr.block
        self._align = esp_align(tr.block)
        self._trailers = trailer_table(self._align)
        self._counter_iv = not isinstance(tr, CbcHmacTransform)
        # hot path: call AESGCM.encrypt directly when the transform would add nothing
        fast = isinstance(tr, GcmTransform) and tr.icv_len == 16 and not params.esn
        self._gcm_direct = tr._aead.encrypt if fast else None
        self._gcm_salt = tr._salt if fast else b""
        # The common case -- AES-GCM with a full tag, no ESN, transport mode, IPv4, no UDP encapsulation --
        # gets the straight-line code of firmware_model/fastpath.py: one struct call for all headers, the
        # AESGCM methods called directly. Any packet that is not a plain option-less IPv4 ESP packet falls
        # through to the general code here, which stays the reference for every verdict.
        fast_v4 = fast and params.mode == Mode.TRANSPORT and params.encap is None and self._family == 4
        self._v4_encrypt = tr._aead.encrypt if fast_v4 else None
        self._v4_decrypt = tr._aead.decrypt if fast_v4 else None
        self._iv_last = 0
        # fastpath.py: one compare decides whether the next outbound number needs any check (lifetimes,
        # the near-exhaustion warning, RFC 4303 §3.3.3's limit) -- only numbers below this one need none;
        # SPI || Seq, the AAD of RFC 4106 §5, is packed as one 64-bit field from SPI << 32
        self._fast_seq_end = 0 if self._limited else self._seq_warn
        self._spi_hi = self.spi << 32
        # smallest ESP payload (IV + ciphertext + ICV) a sender can produce
        self._min_body = self._iv_len + max(self._align, 4) + self._icv_len
        self._encap = params.encap
        self._ip_proto = IPPROTO_UDP if params.encap else IPPROTO_ESP
        if fast_v4:
            self.__class__ = FastV4EspEngine  # same slots; its methods enter fastpath.py directly
        elif (isinstance(tr, CbcHmacTransform) and tr.block == 16 and tr._mac is not None and not params.esn
              and params.mode == Mode.TRANSPORT and params.encap is None and self._family == 4):
            # AES-CBC + HMAC of the same shape: fastpath.encapsulate_v4_cbc / decapsulate_v4_cbc; clearing
            # these two turns them off (the differential tests' reference twin)
            self._v4_encrypt = tr._enc.update
            self._v4_decrypt = tr._dec.update
            self.__class__ = FastV4CbcEngine

    # ----- helpers ---------------------------------------------------------------------------------
    def _make_iv(self, seq: int) -> bytes:
        return self._next_counter_iv(seq) if self._counter_iv else self.transform.next_iv()

    def _locate_esp(self, frame: bytes | bytearray, l3: int) -> tuple[Verdict, int, int]:
        """Find the ESP header of the IP packet at l3 (through UDP-ESP and an outer AH of a bundle).
        Returns (verdict, esp offset, end of packet)."""
        ver, hl, end = _ip_extent(frame, l3)
        if not ver:
            return Verdict.BAD_SYNTAX, 0, 0
        if ver == 4:
            if ((frame[l3 + 6] << 8) | frame[l3 + 7]) & _IP_MF_OFFSET_MASK:
                return Verdict.BAD_SYNTAX, 0, 0  # fragments are reassembled first (RFC 4303 §3.4.1)
            proto = frame[l3 + 9]
            off = l3 + hl
        else:
            proto, off, _ = ipv6_find_header(frame, l3, end, (IPPROTO_ESP, IPPROTO_UDP, IPPROTO_AH))
            if proto < 0 or proto == IPV6_FRAGMENT:  # fragments are reassembled first (§3.4.1)
                return Verdict.BAD_SYNTAX, 0, 0
        if proto == IPPROTO_AH:  # ESP inside an AH bundle: skip the AH header
            if off + AH_FIXED_LEN > end:
                return Verdict.BAD_SYNTAX, 0, 0
            proto = frame[off]
            off += (frame[off + 1] + 2) * 4
        if proto == IPPROTO_UDP:
            if self._encap is None or off + 8 > end:
                return Verdict.NOT_ESP, 0, 0
            # RFC 3948 §2.2/§2.3: keepalives and IKE (non-ESP marker) share the port; not ours to touch
            if ((frame[off + 2] << 8) | frame[off + 3]) != self._encap.dport:
                return Verdict.NOT_ESP, 0, 0
            kind = classify_udp_payload(frame[off + 8:min(end, off + 16)])
            if kind != UdpPayloadKind.ESP:
                return (Verdict.BAD_SYNTAX if kind == UdpPayloadKind.TOO_SHORT else Verdict.NOT_ESP), 0, 0
            off += 8
        elif proto != IPPROTO_ESP:
            return Verdict.NOT_ESP, 0, 0
        elif self._encap is not None:
            return Verdict.WRONG_PROTOCOL, 0, 0  # plain ESP on a UDP-encapsulated SA
        if off + ESP_HDR_LEN > end:
            return Verdict.BAD_SYNTAX, 0, 0
        return Verdict.OK, off, end

    def _fail(self, verdict: Verdict) -> Verdict:
        st = self.stats
        if verdict == Verdict.BAD_SYNTAX:
            st.syntax_errors += 1
        elif verdict == Verdict.AUTH_FAILED:
            st.auth_failures += 1
        elif verdict == Verdict.REPLAY:
            st.replay_drops += 1
        elif verdict == Verdict.WRONG_PROTOCOL:
            st.wrong_protocol += 1
        elif verdict == Verdict.NOT_ESP:
            st.not_esp += 1
        return verdict

    def _body_ok(self, body_len: int) -> bool:
        ct_len = body_len - self._iv_len - self._icv_len
        if ct_len < 2:
            return False
        return ct_len % self._block == 0

    # ----- crypto offload --------------------------------------------------------------------------
    def crypto_encrypt(self, frame: bytearray, l3: int, seq_hi: int | None = None, *,
                       iv: bytes | None = None) -> Verdict:
        if self._limited and self._over_hard_limit():
            return Verdict.HARD_LIMIT
        verdict, e, end = self._locate_esp(frame, l3)
        if verdict:
            return self._fail(verdict)
        spi, seq_lo = ESP_HDR.unpack_from(frame, e)
        if spi != self.spi:
            return self._fail(Verdict.WRONG_PROTOCOL)
        if not self._body_ok(end - e - ESP_HDR_LEN):
            return self._fail(Verdict.BAD_SYNTAX)
        hi = (self._seq_hi if seq_hi is None else seq_hi) if self._esn else None
        if iv is None:
            iv = self._make_iv(((hi or 0) << 32) | seq_lo)
        a = e + ESP_HDR_LEN + self._iv_len
        b = end - self._icv_len
        sealed = self._seal(bytes(frame[e:e + ESP_HDR_LEN]), hi, iv, bytes(frame[a:b]))
        frame[e + ESP_HDR_LEN:a] = iv
        frame[a:end] = sealed
        if self._encap is not None and frame[l3] >> 4 == 6:
            _udp6_fill_checksum(frame, l3, e - 8, end)
        self._count(end - l3)
        return Verdict.OK

    def crypto_decrypt(self, frame: bytearray, l3: int) -> Verdict:
        if self._limited and self._over_hard_limit():
            return Verdict.HARD_LIMIT
        verdict, e, end = self._locate_esp(frame, l3)
        if verdict:
            return self._fail(verdict)
        spi = ESP_HDR.unpack_from(frame, e)[0]
        if spi != self.spi:
            return self._fail(Verdict.WRONG_PROTOCOL)
        if not self._body_ok(end - e - ESP_HDR_LEN):
            return self._fail(Verdict.BAD_SYNTAX)
        hdr = bytes(frame[e:e + ESP_HDR_LEN])
        a = e + ESP_HDR_LEN + self._iv_len
        iv = bytes(frame[e + ESP_HDR_LEN:a])
        body = bytes(frame[a:end])
        hi = self._seq_hi if self._esn else None
        plain = self._open(hdr, hi, iv, body)
        if plain is None and self._esn and self._seq_hi < _U32_MASK:
            plain = self._open(hdr, self._seq_hi + 1, iv, body)  # low half wrapped before UPDATE_SA
            if plain is not None:
                self._seq_hi += 1
        if plain is None:
            return self._fail(Verdict.AUTH_FAILED)
        frame[a:a + len(plain)] = plain
        payload_len, nh = strip_trailer(plain)
        if payload_len < 0:
            return self._fail(Verdict.BAD_SYNTAX)
        self._count(end - l3)
        if nh == IPPROTO_NONE:
            self.stats.dummy_packets += 1
            return Verdict.DUMMY
        return Verdict.OK

    def inner_packet_at(self, frame: bytes | bytearray, l3: int) -> tuple[int, int] | None:
        """Crypto offload, before crypto_encrypt of a host-built frame: (offset of the payload, next header
        in the plaintext trailer). Transport over tunnel puts the inner (transport) packet there."""
        verdict, e, end = self._locate_esp(frame, l3)
        if verdict:
            return None
        start = e + ESP_HDR_LEN + self._iv_len
        at = end - self._icv_len - 2
        return (start, frame[at + 1]) if start < at else None

    def payload_span(self, frame: bytes | bytearray, l3: int) -> tuple[int, int, int] | None:
        """After a successful crypto_decrypt: (next header, start, end) of the plaintext payload the ESP
        carried (RFC 4303 §2: IV, payload, padding, pad length, next header, ICV), for the filter check."""
        verdict, e, end = self._locate_esp(frame, l3)
        if verdict:
            return None
        at = end - self._icv_len - 2
        start = e + ESP_HDR_LEN + self._iv_len
        stop = at - frame[at]
        return (frame[at + 1], start, stop) if start <= stop else None

    # ----- packet offload --------------------------------------------------------------------------
    def encapsulate(self, ip_packet: bytes, *, iv: bytes | None = None) -> tuple[Verdict, bytes]:
        """Protect a plain IP packet; numbers it with the SA's next sequence number."""
        if self._limited and self._over_hard_limit():
            return _HARD_LIMIT, b""
        n = len(ip_packet)
        if n < 20:
            return self._fail(_BAD_SYNTAX), b""
        ver = ip_packet[0] >> 4
        if ver == 4:
            hl = (ip_packet[0] & 0x0F) << 2
            end = (ip_packet[2] << 8) | ip_packet[3]
            if hl < 20 or end < hl or end > n:
                return self._fail(_BAD_SYNTAX), b""
        elif ver == 6 and n >= 40:
            hl = 40
            end = 40 + ((ip_packet[4] << 8) | ip_packet[5])
            if end > n:
                return self._fail(_BAD_SYNTAX), b""
        else:
            return self._fail(_BAD_SYNTAX), b""
        if not self._tunnel and ver != self._family:
            return self._fail(_BAD_SYNTAX), b""
        seq = self._seq + 1  # RFC 4303 §3.3.3: never cycle without ESN (ESN: RFC 4304 §2)
        if seq > self._seq_limit:
            self.stats.seq_overflows += 1
            return _SEQ_OVERFLOW, b""
        if seq >= self._seq_warn:
            self.seq_nearly_exhausted = True
        if end != n:
            ip_packet = ip_packet[:end]
        if self._tunnel:
            nh = IPPROTO_IPV4 if ver == 4 else IPPROTO_IPV6
            payload = ip_packet
        elif ver == 4:
            # RFC 4303 §3.1.1: transport mode protects whole datagrams only, never a fragment
            if ip_packet[6] & 0x3F or ip_packet[7]:
                return self._fail(_BAD_SYNTAX), b""
            nh = ip_packet[9]
            payload = ip_packet[hl:]
        else:
            nh_at, hl = ipv6_transport_split(ip_packet, end)
            if hl < 0:
                return self._fail(_BAD_SYNTAX), b""
            nh = ip_packet[nh_at]
            payload = ip_packet[hl:]
        # RFC 4303 §2.4: minimal padding 1, 2, 3, ... to lcm(block, 4), then pad length, next header
        plaintext = payload + self._trailers[nh][len(payload) % self._align]
        if iv is None:
            iv = self._make_iv(seq)
        esp_hdr = _ESP_PACK(self.spi, seq & _U32_MASK)
        if self._gcm_direct is not None:  # AES-GCM, 16-byte ICV, no ESN: RFC 4106 AAD = SPI || Seq
            sealed = self._gcm_direct(self._gcm_salt + iv, plaintext, esp_hdr)
        else:
            sealed = self._seal(esp_hdr, seq >> 32 if self._esn else None, iv, plaintext)
        esp_len = 8 + len(iv) + len(sealed)
        encap = self._encap
        # the result's IPv4 total length / IPv6 payload length must fit its 16 bits
        if self._tunnel:  # noqa: SIM108 -- two cases read better than a nested ternary
            fixed = 20 if self._family == 4 else 0
        else:
            fixed = hl if ver == 4 else hl - 40
        if fixed + esp_len + (8 if encap is not None else 0) > 0xFFFF:
            return self._fail(_BAD_SYNTAX), b""
        if encap is not None:
            # RFC 3948 §2.1: UDP header in front of ESP, checksum sent as zero
            udp = _UDP_PACK(encap.sport, encap.dport, 8 + esp_len, 0)
            esp_len += 8
        else:
            udp = b""
        if self._tunnel:
            header = self._outer_header(esp_len, self._ip_proto, _inner_tos(ip_packet))
        elif ver == 4:
            header = _ipv4_rewrite(ip_packet, hl, hl + esp_len, self._ip_proto)
        else:
            header = bytearray(ip_packet[:hl])
            header[nh_at] = self._ip_proto
            U16.pack_into(header, 4, hl - 40 + esp_len)
        self._seq = seq
        self._count(end)
        if udp and header[0] >> 4 == 6:
            out = bytearray(b"".join((header, udp, esp_hdr, iv, sealed)))
            _udp6_fill_checksum(out, 0, len(header), len(out))
            return _OK, bytes(out)
        return _OK, b"".join((header, udp, esp_hdr, iv, sealed))

    def _after_icv(self, window: ReplayWindow, seq: int, plain: bytes) -> tuple[Verdict, int, int]:
        """Packet offload, once the ICV verified: move the replay window, check the trailer, drop a dummy
        packet. (OK, payload length, next header), or (the verdict, -1, 0)."""
        if not window.accept(seq):  # only authenticated packets move the window (RFC 4303 §3.4.3)
            return self._fail(_REPLAY), -1, 0
        payload_len, nh = strip_trailer(plain)  # RFC 4303 §2.4: pad length and the 1, 2, 3, ... padding
        if payload_len < 0:
            return self._fail(_BAD_SYNTAX), -1, 0
        if nh == IPPROTO_NONE:  # RFC 4303 §2.6: dummy packet, discard silently
            self.stats.dummy_packets += 1
            self._count(0)
            return _DUMMY, -1, 0
        return _OK, payload_len, nh

    def decapsulate(self, ip_packet: bytes) -> tuple[Verdict, bytes]:
        """Verify, replay-check and strip ESP; returns the inner IP packet (tunnel) or the rebuilt
        original packet (transport). DUMMY packets return b"" and must be dropped."""
        if self._limited and self._over_hard_limit():
            return _HARD_LIMIT, b""
        verdict, e, end = self._locate_esp(ip_packet, 0)
        if verdict:
            return self._fail(verdict), b""
        body_len = end - e - 8
        if body_len < self._min_body or (
            self._block > 1 and (body_len - self._iv_len - self._icv_len) % self._block
        ):
            return self._fail(_BAD_SYNTAX), b""
        spi, seq_lo = _ESP_UNPACK_FROM(ip_packet, e)
        if spi != self.spi:
            return self._fail(_WRONG_PROTOCOL), b""
        window = self.window
        seq = window.check(seq_lo)  # RFC 4303 §3.4.3: early reject before the ICV work
        if seq == REJECT:
            return self._fail(_REPLAY), b""
        a = e + 8 + self._iv_len
        plain = self._open(ip_packet[e:e + 8], seq >> 32 if self._esn else None,
                           ip_packet[e + 8:a], ip_packet[a:end])
        if plain is None:
            return self._fail(_AUTH_FAILED), b""
        verdict, payload_len, nh = self._after_icv(window, seq, plain)
        if verdict:
            return verdict, b""
        if self._tunnel:
            if nh != IPPROTO_IPV4 and nh != IPPROTO_IPV6:
                return self._fail(_BAD_SYNTAX), b""
            inner = plain[:payload_len]
            ver, _, inner_end = _ip_extent(inner, 0)
            if ver != (4 if nh == IPPROTO_IPV4 else 6):
                return self._fail(_BAD_SYNTAX), b""
            if inner_end != payload_len:  # TFC padding (RFC 4303 §2.7) after the inner packet
                inner = inner[:inner_end]
            self._count(inner_end)
            return _OK, inner
        payload = plain[:payload_len]
        if ip_packet[0] >> 4 == 4:
            hl = (ip_packet[0] & 0x0F) << 2
            header = _ipv4_rewrite(ip_packet, hl, hl + payload_len, nh)
        else:
            # everything in front of the ESP (or UDP) header stays
            _, hl, nh_at = ipv6_find_header(ip_packet, 0, end, (IPPROTO_ESP, IPPROTO_UDP))
            header = bytearray(ip_packet[:hl])
            header[nh_at] = nh
            U16.pack_into(header, 4, hl - 40 + payload_len)
        self._count(hl + payload_len)
        packet = header + payload
        if self._encap is not None and (nh in (IPPROTO_TCP, IPPROTO_UDP)):
            # RFC 3948 §3.1.2: after a NAT the received addresses are not those the sender's checksum
            # covered; the ICV vouched for the data, so the checksum is recomputed over what is delivered
            # (the card knows no NAT-OA, so the incremental fix is not available, datasheet §12.1 row 20)
            l4_checksum_recompute(packet, hl, nh)
        return _OK, bytes(packet)


class FastV4EspEngine(EspEngine):
    """An EspEngine whose SA takes the fast paths (see EspEngine.__init__ and firmware_model/fastpath.py)."""

    __slots__ = ()
    encapsulate = fastpath.encapsulate_v4
    decapsulate = fastpath.decapsulate_v4
    crypto_encrypt = fastpath.crypto_encrypt_v4
    crypto_decrypt = fastpath.crypto_decrypt_v4
    # where the fast code sends whatever it does not take
    _general_encapsulate = EspEngine.encapsulate
    _general_decapsulate = EspEngine.decapsulate
    _general_crypto_encrypt = EspEngine.crypto_encrypt
    _general_crypto_decrypt = EspEngine.crypto_decrypt


class FastV4CbcEngine(EspEngine):
    """An EspEngine with an AES-CBC + HMAC SA of the fast shape (fastpath.encapsulate_v4_cbc)."""

    __slots__ = ()
    encapsulate = fastpath.encapsulate_v4_cbc
    decapsulate = fastpath.decapsulate_v4_cbc
    _general_encapsulate = EspEngine.encapsulate
    _general_decapsulate = EspEngine.decapsulate


def _ipv4_rewrite(packet: bytes, hl: int, total: int, proto: int) -> bytearray:
    """Copy of the IPv4 header with a new total length and protocol and a recomputed checksum (a full
    recompute, not RFC 1624 incremental: a bad checksum from the host must not be carried over)."""
    h = bytearray(packet[:hl])
    h[2] = total >> 8
    h[3] = total & 0xFF
    h[9] = proto
    h[10] = h[11] = 0
    csum = sum(_HDR_WORDS[hl >> 2].unpack(h))
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    h[10] = csum >> 8
    h[11] = csum & 0xFF
    return h


class AhEngine(SaEngine):
    """AH (RFC 4302) packet and crypto offload."""

    __slots__ = ()

    def __init__(self, params: SaParams) -> None:
        self._init_common(params)
        if params.proto != IpProto.AH:
            raise ValueError("AhEngine needs an AH SA")
        self.transform = build_ah_transform(params)
        self._iv_len = self.transform.iv_len
        self._icv_len = self.transform.icv_len
        self._iv_last = 0

    def _make_iv(self, seq: int) -> bytes:
        return self._next_counter_iv(seq) if self._iv_len else b""

    def _fail(self, verdict: Verdict) -> Verdict:
        return EspEngine._fail(self, verdict)  # same counters

    def _icv_input(self, packet: bytes | bytearray, l3: int, end: int, ah_at: int) -> bytearray | None:
        """Copy of the packet with mutable fields and the ICV field zeroed (RFC 4302 §3.3.3.1)."""
        buf = bytearray(packet[l3:end])
        at = ah_at - l3
        icv_at = at + AH_FIXED_LEN + self._iv_len
        buf[icv_at:icv_at + self._icv_len] = bytes(self._icv_len)
        if buf[0] >> 4 == 4:
            hl = (buf[0] & 0x0F) << 2
            head = buf[:hl]
            if not zero_mutable_ipv4(head):
                return None
            buf[:hl] = head
        elif not zero_mutable_ipv6(buf, at):
            return None
        return buf

    def _locate_ah(self, frame: bytes | bytearray, l3: int) -> tuple[Verdict, int, int]:
        ver, hl, end = _ip_extent(frame, l3)
        if not ver:
            return Verdict.BAD_SYNTAX, 0, 0
        if ver == 4:
            if ((frame[l3 + 6] << 8) | frame[l3 + 7]) & _IP_MF_OFFSET_MASK:
                return Verdict.BAD_SYNTAX, 0, 0
            proto, off = frame[l3 + 9], l3 + hl
        else:
            proto, off, _ = ipv6_find_header(frame, l3, end, (IPPROTO_AH, IPPROTO_ESP))
            if proto < 0:
                return Verdict.BAD_SYNTAX, 0, 0
        if proto == IPPROTO_ESP:
            return Verdict.WRONG_PROTOCOL, 0, 0
        if proto != IPPROTO_AH:
            return Verdict.NOT_ESP, 0, 0
        need = ah_length(self._iv_len, self._icv_len, 4)  # minimum; IPv6 may add 4 bytes of padding
        if off + need > end:
            return Verdict.BAD_SYNTAX, 0, 0
        ah_len = (frame[off + 1] + 2) * 4
        if ah_len < AH_FIXED_LEN + self._iv_len + self._icv_len or off + ah_len > end:
            return Verdict.BAD_SYNTAX, 0, 0
        return Verdict.OK, off, end

    def payload_span(self, frame: bytes | bytearray, l3: int) -> tuple[int, int, int] | None:
        """(next header, start, end) of what the AH header protects (AH leaves it in clear)."""
        verdict, off, end = self._locate_ah(frame, l3)
        if verdict:
            return None
        return frame[off], off + (frame[off + 1] + 2) * 4, end

    # ----- crypto offload --------------------------------------------------------------------------
    def crypto_encrypt(self, frame: bytearray, l3: int, seq_hi: int | None = None, *,
                       iv: bytes | None = None) -> Verdict:
        """The host built the AH header with zeroed room for IV/ICV; write IV and ICV."""
        if self._limited and self._over_hard_limit():
            return Verdict.HARD_LIMIT
        verdict, at, end = self._locate_ah(frame, l3)
        if verdict:
            return self._fail(verdict)
        _, _, _, spi, seq_lo = AH_FIXED.unpack_from(frame, at)
        if spi != self.spi:
            return self._fail(Verdict.WRONG_PROTOCOL)
        hi = (self._seq_hi if seq_hi is None else seq_hi) if self._esn else None
        if self._iv_len:
            if iv is None:
                iv = self._make_iv(((hi or 0) << 32) | seq_lo)
            frame[at + AH_FIXED_LEN:at + AH_FIXED_LEN + self._iv_len] = iv
        else:
            iv = b""
        data = self._icv_input(frame, l3, end, at)
        if data is None:
            return self._fail(Verdict.BAD_SYNTAX)
        icv_at = at + AH_FIXED_LEN + self._iv_len
        frame[icv_at:icv_at + self._icv_len] = self.transform.compute(data, hi, iv)
        self._count(end - l3)
        return Verdict.OK

    def crypto_decrypt(self, frame: bytearray, l3: int) -> Verdict:
        """Verify the AH ICV (the host strips AH itself)."""
        if self._limited and self._over_hard_limit():
            return Verdict.HARD_LIMIT
        verdict, at, end = self._locate_ah(frame, l3)
        if verdict:
            return self._fail(verdict)
        if AH_FIXED.unpack_from(frame, at)[3] != self.spi:
            return self._fail(Verdict.WRONG_PROTOCOL)
        ok = self._verify(frame, l3, end, at, self._seq_hi if self._esn else None)
        if ok is None:
            return self._fail(Verdict.BAD_SYNTAX)
        if not ok and self._esn and self._seq_hi < _U32_MASK and self._verify(frame, l3, end, at, self._seq_hi + 1):
            self._seq_hi += 1
            ok = True
        if not ok:
            return self._fail(Verdict.AUTH_FAILED)
        self._count(end - l3)
        return Verdict.OK

    def _verify(self, frame, l3: int, end: int, at: int, seq_hi: int | None) -> bool | None:
        data = self._icv_input(frame, l3, end, at)
        if data is None:
            return None
        iv_at = at + AH_FIXED_LEN
        icv_at = iv_at + self._iv_len
        return self.transform.verify(data, seq_hi, bytes(frame[iv_at:icv_at]),
                                     bytes(frame[icv_at:icv_at + self._icv_len]))

    # ----- packet offload --------------------------------------------------------------------------
    def encapsulate(self, ip_packet: bytes, *, iv: bytes | None = None) -> tuple[Verdict, bytes]:
        if self._limited and self._over_hard_limit():
            return Verdict.HARD_LIMIT, b""
        ver, hl, end = _ip_extent(ip_packet, 0)
        if not ver:
            return self._fail(Verdict.BAD_SYNTAX), b""
        seq = self._next_seq()
        if seq < 0:
            return Verdict.SEQ_OVERFLOW, b""
        ip_packet = ip_packet[:end]
        family = self._family if self._tunnel else ver
        if not self._tunnel and ver != self._family:
            return self._fail(Verdict.BAD_SYNTAX), b""
        ah_len = ah_length(self._iv_len, self._icv_len, family)
        if iv is None:
            iv = self._make_iv(seq)
        if self._tunnel:
            nh = IPPROTO_IPV4 if ver == 4 else IPPROTO_IPV6
            payload = ip_packet
            header = bytearray(self._outer_header(ah_len + len(payload), IPPROTO_AH, _inner_tos(ip_packet)))
            nh_at = 9 if family == 4 else 6
        elif ver == 4:
            nh = ip_packet[9]
            payload = ip_packet[hl:]
            header = bytearray(ip_packet[:hl])
            header[2:4] = U16.pack(hl + ah_len + len(payload))
            nh_at = 9
        else:
            nh_at, hl = ipv6_transport_split(ip_packet, end)
            if hl < 0:
                return self._fail(Verdict.BAD_SYNTAX), b""
            nh = ip_packet[nh_at]
            payload = ip_packet[hl:]
            header = bytearray(ip_packet[:hl])
            header[4:6] = U16.pack(hl - 40 + ah_len + len(payload))
        header[nh_at] = IPPROTO_AH
        ah = bytearray(ah_len)
        AH_FIXED.pack_into(ah, 0, nh, ah_len // 4 - 2, 0, self.spi, seq & _U32_MASK)
        ah[AH_FIXED_LEN:AH_FIXED_LEN + self._iv_len] = iv
        packet = header + ah + payload
        if family == 4:
            packet[10] = packet[11] = 0
            hlen = (packet[0] & 0x0F) << 2
            packet[10:12] = U16.pack(ipv4_checksum(packet[:hlen]))
        data = self._icv_input(packet, 0, len(packet), len(header))
        if data is None:
            return self._fail(Verdict.BAD_SYNTAX), b""
        icv_at = len(header) + AH_FIXED_LEN + self._iv_len
        packet[icv_at:icv_at + self._icv_len] = self.transform.compute(data, seq >> 32 if self._esn else None, iv)
        self._seq = seq
        self._count(end)
        return Verdict.OK, bytes(packet)

    def decapsulate(self, ip_packet: bytes) -> tuple[Verdict, bytes]:
        if self._limited and self._over_hard_limit():
            return Verdict.HARD_LIMIT, b""
        verdict, at, end = self._locate_ah(ip_packet, 0)
        if verdict:
            return self._fail(verdict), b""
        nh, _, _, spi, seq_lo = AH_FIXED.unpack_from(ip_packet, at)
        if spi != self.spi:
            return self._fail(Verdict.WRONG_PROTOCOL), b""
        seq = self.window.check(seq_lo)
        if seq == REJECT:
            return self._fail(Verdict.REPLAY), b""
        ok = self._verify(ip_packet, 0, end, at, seq >> 32 if self._esn else None)
        if ok is None:
            return self._fail(Verdict.BAD_SYNTAX), b""
        if not ok:
            return self._fail(Verdict.AUTH_FAILED), b""
        if not self.window.accept(seq):
            return self._fail(Verdict.REPLAY), b""
        ah_len = (ip_packet[at + 1] + 2) * 4
        payload = ip_packet[at + ah_len:end]
        if self._tunnel:
            if nh not in (IPPROTO_IPV4, IPPROTO_IPV6):
                return self._fail(Verdict.BAD_SYNTAX), b""
            ver, _, inner_end = _ip_extent(payload, 0)
            if ver != (4 if nh == IPPROTO_IPV4 else 6):
                return self._fail(Verdict.BAD_SYNTAX), b""
            self._count(inner_end)
            return Verdict.OK, payload[:inner_end]
        if nh == IPPROTO_NONE:
            self.stats.dummy_packets += 1
            return Verdict.DUMMY, b""
        header = bytearray(ip_packet[:at])
        if ip_packet[0] >> 4 == 4:
            header[2:4] = U16.pack(at + len(payload))
            header[9] = nh
            header[10] = header[11] = 0
            header[10:12] = U16.pack(ipv4_checksum(header))
        else:
            _, _, nh_at = ipv6_find_header(ip_packet, 0, end, (IPPROTO_AH,))
            header[nh_at] = nh
            header[4:6] = U16.pack(at - 40 + len(payload))
        self._count(at + len(payload))
        return Verdict.OK, bytes(header) + payload


class SaBundle:
    """ESP protected by an outer AH ("ESP then AH", RFC 4301 §4.5 transport adjacency). The ESP SA
    decides transport vs tunnel; the AH SA is always applied in transport mode over whatever ESP
    produced (its own mode is overridden). Outbound: ESP, then AH. Inbound: AH, then ESP."""

    def __init__(self, esp: SaParams, ah: SaParams) -> None:
        if esp.proto != IpProto.ESP or ah.proto != IpProto.AH:
            raise ValueError("a bundle needs one ESP SA and one AH SA")
        if esp.direction != ah.direction:
            raise ValueError("bundle SAs must have the same direction")
        if esp.encap is not None:
            raise ValueError("UDP encapsulation cannot be combined with AH (RFC 3948 covers ESP only)")
        self.esp = EspEngine(esp)
        self.ah = AhEngine(replace(ah, mode=Mode.TRANSPORT))
        # Which layer the last inbound failure came from: NDIS reports AH and ESP ICV failures with
        # different CryptoStatus values, and the outer header (AH) alone cannot tell.
        self.failed_proto: IpProto | None = None

    def encapsulate(self, ip_packet: bytes) -> tuple[Verdict, bytes]:
        verdict, packet = self.esp.encapsulate(ip_packet)
        if verdict:
            return verdict, b""
        return self.ah.encapsulate(packet)

    def decapsulate(self, ip_packet: bytes) -> tuple[Verdict, bytes]:
        verdict, packet = self.ah.decapsulate(ip_packet)
        if verdict:
            self.failed_proto = IpProto.AH
            return verdict, b""
        verdict, packet = self.esp.decapsulate(packet)
        self.failed_proto = IpProto.ESP if verdict else None
        return verdict, packet

    def crypto_encrypt(self, frame: bytearray, l3: int, seq_hi: int | None = None) -> Verdict:
        verdict = self.esp.crypto_encrypt(frame, l3, seq_hi)
        if verdict:
            return verdict
        return self.ah.crypto_encrypt(frame, l3, seq_hi)

    def crypto_decrypt(self, frame: bytearray, l3: int) -> Verdict:
        verdict = self.ah.crypto_decrypt(frame, l3)
        if verdict:
            self.failed_proto = IpProto.AH
            return verdict
        verdict = self.esp.crypto_decrypt(frame, l3)
        self.failed_proto = IpProto.ESP if verdict else None
        return verdict

    def payload_span(self, frame: bytes | bytearray, l3: int) -> tuple[int, int, int] | None:
        return self.esp.payload_span(frame, l3)  # ESP sits inside the AH (transport adjacency)

    def set_seq_hi(self, hi: int) -> None:
        self.esp.set_seq_hi(hi)
        self.ah.set_seq_hi(hi)

    # lifetime flags of the bundle = those of either SA (the facade asks the bundle, not each engine)
    @property
    def soft_expired(self) -> bool:
        return self.esp.soft_expired or self.ah.soft_expired

    @property
    def seq_nearly_exhausted(self) -> bool:
        return self.esp.seq_nearly_exhausted or self.ah.seq_nearly_exhausted
