"""The firmware's traffic path: transmit (crypto or packet offload) and receive (match, check, decide).

Receive follows the NDIS IPsec offload v2 rules (receiving-network-data-with-ipsec-offload-version-2):
every frame is indicated, including the ones whose check failed; a frame is matched to an inbound SA by
SPI + destination address (+ protocol); an IPsec frame with no SA is indicated without IPsec metadata;
CryptoDone says a payload was checked, CryptoStatus how it went; SaDeleteReq asks the host to delete
the SA (and its paired outbound SA) and may be set on any frame of that SA.

Transmit (sending-network-data-with-ipsec-offload-version-2): handle 0 means no offload (the frame goes
out unchanged); an unknown handle fails the send (NDIS_STATUS_FAILURE, TxOutcome.BAD_HANDLE).
Packet-offload transmit (beyond NDIS) takes a plain IP frame and finds its SA by handle or selector.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from device.contract import ndis
from device.contract.enums import Direction, IpProto, UdpEspEncapsulation
from device.contract.net import IPV6_FRAGMENT
from device.contract.sa import NAT_T_PORT
from device.contract.status import CryptoStatus, NdisStatus
from firmware_model.capabilities import Capabilities
from firmware_model.esp import UdpPayloadKind, Verdict, classify_udp_payload, crypto_status_for
from firmware_model.frames import esp_seq, esp_trailer, ipv6_upper, l3_offset, reframe, selector_key
from firmware_model.sadb import Sadb, SadbEntry
from firmware_model.traffic_filter import PacketView, TrafficFilter, outer_addrs, ports_at, view_ip

# SaDeleteReq when fewer than this many sequence numbers are left on a non-ESN SA: leaves the host
# time to rekey before RFC 4303 §3.3.3 forbids the counter to cycle.
SEQ_SOFT_MARGIN = 1 << 16
U32_MAX = 0xFFFF_FFFF
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")


class TxOutcome(IntEnum):
    OK = 0
    NO_OFFLOAD = 1  # handle 0: passed through unchanged
    BAD_HANDLE = 2  # unknown/stale handle, inbound SA, or offload type mismatch -> NDIS_STATUS_FAILURE
    BAD_SYNTAX = 3  # not an IP frame, or no room for what the engine has to write
    WRONG_PROTOCOL = 4  # the frame's IPsec header is not the SA's
    SEQ_OVERFLOW = 5  # packet offload, non-ESN counter would cycle
    HARD_LIMIT = 6  # SA lifetime exhausted
    NO_SA = 7  # packet offload, handle 0 and no selector matched: dropped rather than sent in clear
    ERROR = 8


_TX_FROM_VERDICT = {
    Verdict.OK: TxOutcome.OK,
    Verdict.BAD_SYNTAX: TxOutcome.BAD_SYNTAX,
    Verdict.WRONG_PROTOCOL: TxOutcome.WRONG_PROTOCOL,
    Verdict.NOT_ESP: TxOutcome.WRONG_PROTOCOL,
    Verdict.SEQ_OVERFLOW: TxOutcome.SEQ_OVERFLOW,
    Verdict.HARD_LIMIT: TxOutcome.HARD_LIMIT,
}


@dataclass(slots=True)  # one per frame: slots make it cheaper to build
class TxResult:
    status: int
    frame: bytes | None
    sa_delete_req: bool = False  # the SA's soft lifetime passed or its counter is nearly exhausted

    @property
    def ndis_status(self) -> NdisStatus:
        return NdisStatus.SUCCESS if self.status in (TxOutcome.OK, TxOutcome.NO_OFFLOAD) else NdisStatus.FAILURE


@dataclass(slots=True)  # one per frame: slots make it cheaper to build
class RxResult:
    frame: bytes
    crypto_done: bool = False
    next_crypto_done: bool = False
    crypto_status: int = CryptoStatus.SUCCESS
    sa_delete_req: bool = False
    handle: int = 0  # inbound SA bundle that matched (0 = none)
    verdict: int = -1  # engine Verdict, -1 when not processed (beyond NDIS, for diagnostics)
    discard: bool = False  # packet offload: dummy packet (RFC 4303 §2.6), not to be indicated
    # The decisions the NIC writes back, so it never parses ESP nor looks into the SADB:
    replay_drop: bool = False  # packet offload: refused by the anti-replay window, not to be indicated
    decapsulated: bool = False  # packet offload removed the ESP (and tunnel / UDP) headers
    next_header: int = -1  # crypto offload, check passed: the decrypted ESP trailer (-1 = not found)
    pad_length: int = 0
    # crypto offload: authentic but outside the SA's filter -> indicated unprocessed (RxWbFlags.POLICY_MISMATCH)
    policy_mismatch: bool = False
    # packet offload: decapsulated packet outside the SA's selector -> dropped (RX_POLICY_DROP)
    policy_drop: bool = False
    l4_csum_ok: bool = False  # transport UDP-ESP: inner TCP/UDP checksum needs no check (RFC 3948 §3.1.2)
    next_handle: int = 0  # transport over tunnel: the inner (transport) SA, with next_crypto_done


# Enum members read through their class cost ~0.3 us each on Python 3.11; the per-frame paths use these.
_TX_OK = TxOutcome.OK
_TX_NO_OFFLOAD = TxOutcome.NO_OFFLOAD
_OUTBOUND = Direction.OUTBOUND
_INBOUND = Direction.INBOUND
_AH = IpProto.AH
_V_OK = Verdict.OK
_V_DUMMY = Verdict.DUMMY
_V_NOT_ESP = Verdict.NOT_ESP
_V_REPLAY = Verdict.REPLAY
_V_AUTH_FAILED = Verdict.AUTH_FAILED
_AUTHENTIC = (Verdict.OK, Verdict.DUMMY)  # the ICV verified
_CS_SUCCESS = CryptoStatus.SUCCESS
_CS_SYNTAX = (CryptoStatus.INVALID_PACKET_SYNTAX, CryptoStatus.INVALID_PROTOCOL)
_CS_GENERIC = CryptoStatus.GENERIC_ERROR
_L4_PROTOS = (6, 17)


def _combinable(sa: SadbEntry | None, outer: bool) -> bool:
    """One layer of transport over tunnel: an outbound crypto-offload ESP SA; the inner one in transport
    mode. (A v2 SA carries no mode, so the outer one is known as a tunnel by the IP packet it carries.)"""
    return (sa is not None and sa.direction == _OUTBOUND and not sa.packet_offload and (outer or not sa.tunnel)
            and len(sa.params) == 1 and sa.params[0].proto == IpProto.ESP)


def _udp_layers_offered(caps: Capabilities, inner: SadbEntry, outer: SadbEntry) -> bool:
    """May these two SAs be the layers of one transport-over-tunnel packet, as far as UDP encapsulation
    goes? Plain ESP both: yes. A UDP-encapsulated tunnel around a plain transport ESP is NDIS "transport
    over UDP-encapsulated tunnel" (UdpEsp TRANSPORT_OVER_TUNNEL), a UDP-encapsulated transport ESP inside
    a plain tunnel "UDP-encapsulated transport over tunnel" (UDP_ESP_TRANSPORT_OVER_TUNNEL): each only when
    the card advertises it. Both UDP-encapsulated is none of the NDIS kinds (the v1 UDP-ESP encapsulation
    types rule it out), so never. The SA's own add-time kind (UdpEsp TUNNEL or TRANSPORT_OVER_TUNNEL for a
    UDP-ESP tunnel, TRANSPORT or UDP_ESP_TRANSPORT_OVER_TUNNEL for a UDP-ESP transport SA, or a v1
    V1_ADD_UDPESP_SA) is not kept: the pair in the descriptor / on the wire decides."""
    inner_udp, outer_udp = inner.params[0].encap is not None, outer.params[0].encap is not None
    if inner_udp and outer_udp:
        return False
    if outer_udp:
        return bool(caps.udp_esp & UdpEspEncapsulation.TRANSPORT_OVER_TUNNEL)
    if inner_udp:
        return bool(caps.udp_esp & UdpEspEncapsulation.UDP_ESP_TRANSPORT_OVER_TUNNEL)
    return True


def _count_status(st: ndis.GlobalStats, status: int) -> None:
    """The receive counter a CryptoStatus belongs to."""
    if status == _CS_SUCCESS:
        st.rx_crypto_ok += 1
    elif status in _CS_SYNTAX:
        st.rx_syntax_errors += 1
    elif status == _CS_GENERIC:
        st.rx_other_errors += 1
    else:
        st.rx_auth_failed += 1


class TrafficPath:
    """Transmit and receive of Firmware (a part of it: they share its SADB, capabilities and counters)."""

    caps: Capabilities
    sadb: Sadb
    _stats: ndis.GlobalStats

    def transmit(self, frame: bytes, handle: int, packet_offload: bool, seq_hi: int | None = None,
                 tunnel_handle: int = 0) -> TxResult:
        """One TX frame. ``seq_hi``: crypto offload ESN high half carried by the descriptor (TxFlags.SEQ_HI),
        used instead of the SA's (UPDATE_SA) for this frame (with ``tunnel_handle``: for the transport SA).
        ``tunnel_handle``: transport over tunnel, the outer (tunnel) SA; ``handle`` is the inner one."""
        if tunnel_handle:
            return self._tx_combined(frame, handle, tunnel_handle, packet_offload, seq_hi)
        st = self._stats
        st.tx_packets += 1
        st.tx_bytes += len(frame)
        if handle == 0 and not packet_offload:
            st.tx_passthrough += 1
            return TxResult(_TX_NO_OFFLOAD, frame)
        l3, _ = l3_offset(frame)
        if l3 < 0:
            st.tx_errors += 1
            return TxResult(TxOutcome.BAD_SYNTAX, None)
        if packet_offload:
            return self._tx_packet(frame, l3, handle)
        sa = self.sadb.get(handle)
        if sa is None or sa.direction != _OUTBOUND or sa.packet_offload:
            st.tx_bad_handle += 1
            return TxResult(TxOutcome.BAD_HANDLE, None)
        buf = bytearray(frame)
        rt = sa.runtime()
        verdict = rt.crypto_encrypt(buf, l3, seq_hi)
        if verdict:  # anything but Verdict.OK (0)
            st.tx_errors += 1
            # a refusal after the hard limit still asks for the delete (datasheet §7.9)
            return TxResult(_TX_FROM_VERDICT.get(verdict, TxOutcome.ERROR), None, self._check_lifetime(sa, rt))
        st.tx_crypto += 1
        if not sa.params[0].esn and self._seq_near_end(buf, l3, sa):
            self.sadb.request_delete(sa)
        return TxResult(_TX_OK, bytes(buf), self._check_lifetime(sa, rt))

    def _tx_combined(self, frame: bytes, handle: int, tunnel_handle: int, packet_offload: bool,
                     seq_hi: int | None) -> TxResult:
        """Transport over tunnel, crypto offload (NDIS TunnelHandle / v1 NextOffloadHandle): the host built
        both layers; the card seals the inner (transport) ESP first, then the outer (tunnel) ESP around it
        (iterated tunnelling, RFC 4301 §4.5). Either SA unusable -> BAD_HANDLE; an outer trailer that does
        not carry an IP packet (RFC 4303 §2.6: next header 4 or 41) -> WRONG_PROTOCOL. Either layer may be
        UDP-encapsulated (RFC 3948) when the card advertises that kind (_udp_layers_offered): the host built
        the UDP header in front of that layer's ESP, as for a single UDP-ESP SA; each engine finds its ESP
        behind it (and fills an IPv6 UDP checksum after sealing, the inner one before the outer seals it)."""
        st = self._stats
        st.tx_packets += 1
        st.tx_bytes += len(frame)
        inner = self.sadb.get(handle)
        outer = self.sadb.get(tunnel_handle)
        if (packet_offload or not self.caps.transport_tunnel_combined or not _combinable(inner, False)
                or not _combinable(outer, True) or not _udp_layers_offered(self.caps, inner, outer)):
            st.tx_bad_handle += 1
            return TxResult(TxOutcome.BAD_HANDLE, None)
        l3, _ = l3_offset(frame)
        if l3 < 0:
            st.tx_errors += 1
            return TxResult(TxOutcome.BAD_SYNTAX, None)
        buf = bytearray(frame)
        ort, irt = outer.runtime(), inner.runtime()
        found = ort.inner_packet_at(buf, l3)
        if found is None or found[1] not in (4, 41):
            st.tx_errors += 1
            return TxResult(TxOutcome.WRONG_PROTOCOL, None)
        verdict = irt.crypto_encrypt(buf, found[0], seq_hi) or ort.crypto_encrypt(buf, l3, None)
        if verdict:
            st.tx_errors += 1
            return TxResult(_TX_FROM_VERDICT.get(verdict, TxOutcome.ERROR), None,
                            self._check_lifetime(inner, irt) | self._check_lifetime(outer, ort))
        st.tx_crypto += 1
        return TxResult(_TX_OK, bytes(buf), self._check_lifetime(inner, irt) | self._check_lifetime(outer, ort))

    def _tx_packet(self, frame: bytes, l3: int, handle: int) -> TxResult:
        st = self._stats
        ip = frame[l3:]
        if handle:
            sa = self.sadb.get(handle)
            if sa is None or sa.direction != _OUTBOUND or not sa.packet_offload:
                st.tx_bad_handle += 1
                return TxResult(TxOutcome.BAD_HANDLE, None)
        else:
            key = selector_key(ip)
            sa = self.sadb.lookup_selector(*key) if key else None
            if sa is None:
                st.tx_errors += 1
                return TxResult(TxOutcome.NO_SA, None)
        rt = sa.runtime()
        verdict, out = rt.encapsulate(ip)
        if verdict:  # anything but Verdict.OK (0)
            st.tx_errors += 1
            return TxResult(_TX_FROM_VERDICT.get(verdict, TxOutcome.ERROR), None, self._check_lifetime(sa, rt))
        st.tx_packet_offload += 1
        return TxResult(_TX_OK, reframe(frame, l3, out), self._check_lifetime(sa, rt))

    def _check_lifetime(self, sa: SadbEntry, rt) -> bool:
        """SaDeleteReq once the SA's soft lifetime passed or its counter nears the end; `rt` is
        sa.runtime() (an engine, or an engine.SaBundle, which answers for both of its engines)."""
        if rt.soft_expired or rt.seq_nearly_exhausted:
            self.sadb.request_delete(sa)
        return sa.delete_requested

    @staticmethod
    def _seq_near_end(buf: bytes | bytearray, l3: int, sa: SadbEntry) -> bool:
        # ESP in option-less IPv4 (the usual frame): Seq at a fixed offset, no header walk
        fixed = buf[l3] == 0x45 and buf[l3 + 9] == 50
        seq = _U32.unpack_from(buf, l3 + 24)[0] if fixed else esp_seq(buf, l3)
        return seq is not None and seq > U32_MAX - SEQ_SOFT_MARGIN

    def receive(self, frame: bytes) -> RxResult:
        st = self._stats
        st.rx_packets += 1
        st.rx_bytes += len(frame)
        l3, ver = l3_offset(frame)
        if l3 < 0:
            st.rx_not_processed += 1
            return RxResult(frame)
        found = self._rx_classify(frame, l3, ver)
        if found is None:
            st.rx_not_processed += 1
            return RxResult(frame)
        if found is False:
            st.rx_no_sa += 1
            return RxResult(frame)
        sa, index, seq = found
        rt = sa.runtime()
        flt = sa.rx_filter
        l4_ok = False
        if sa.packet_offload:
            verdict, inner = rt.decapsulate(frame[l3:])
            if verdict == _V_NOT_ESP:
                st.rx_not_processed += 1
                return RxResult(frame, handle=sa.handle)
            if verdict == _V_OK:
                view = view_ip(inner) if flt is not None else None
                if flt is not None and (view is None or not flt.matches(view)):
                    # RFC 4301 §5.2 step 4: outside the SA's selector -> discarded and counted, never
                    # delivered (the window already moved: the packet was authentic, as in Linux)
                    st.rx_policy_drops += 1
                    return RxResult(frame, handle=sa.handle, verdict=int(verdict), policy_drop=True)
                l4_ok = self._transport_udp_esp(sa) and self._l4_proto(inner)
                out = reframe(frame, l3, inner)
            else:
                out = frame
        else:
            if flt is not None and not sa.tunnel and not flt.matches_addrs(*outer_addrs(frame, l3)):
                # transport: the outer addresses are the connection's; known before any decryption
                return self._policy_unprocessed(frame)
            buf = bytearray(frame)
            verdict = rt.crypto_decrypt(buf, l3)
            if verdict == _V_NOT_ESP:
                st.rx_not_processed += 1
                return RxResult(frame, handle=sa.handle)
            authentic = verdict in _AUTHENTIC
            if verdict == _V_OK and flt is not None and not self._crypto_in_filter(buf, l3, sa, rt, flt):
                # only an authentic packet is judged (RFC 4303 §3.4.4: ICV first); seed 000: the SA does
                # not apply to it, so it is indicated as if no SA matched (datasheet §12.1)
                return self._policy_unprocessed(frame)
            if verdict == _V_OK and self.caps.transport_tunnel_combined and len(sa.params) == 1:
                nested = self._rx_nested(frame, buf, l3, sa, rt)
                if nested is not None:
                    return nested
            out = bytes(buf) if authentic else frame
            # only an authenticated sequence number may move SA state (a forged one must not ask for a rekey)
            if authentic and seq > U32_MAX - SEQ_SOFT_MARGIN and not sa.params[0].esn:
                self.sadb.request_delete(sa)
            # RFC 3948 §3.1.2 option 3 (Linux esp_input_done2: CHECKSUM_UNNECESSARY for encap+transport)
            l4_ok = verdict == _V_OK and self._transport_udp_esp(sa)
        if verdict == _V_OK:
            status = _CS_SUCCESS
        else:
            # an ESP+AH bundle says which of its layers failed; a single SA is its own protocol
            failed = getattr(rt, "failed_proto", None) or sa.params[index].proto
            status = crypto_status_for(verdict, tunnel=sa.tunnel, ah=verdict == _V_AUTH_FAILED and failed == _AH)
        _count_status(st, status)
        st.rx_crypto_done += 1
        delete_req = self._check_lifetime(sa, rt)
        if delete_req:
            st.rx_sa_delete_req += 1
        po = sa.packet_offload
        # positional arguments in RxResult's field order: the keyword form costs more per frame
        result = RxResult(out, True, False, int(status), delete_req, sa.handle, int(verdict),
                          po and verdict == _V_DUMMY, po and verdict == _V_REPLAY, po and status == _CS_SUCCESS)
        if not po and status == _CS_SUCCESS:
            # crypto offload leaves the decrypted trailer in place: tell the host what it says
            trailer = esp_trailer(out, sa.esp_icv_len)
            if trailer is not None:
                result.next_header, result.pad_length = trailer
                # only a TCP/UDP payload has a checksum to vouch for
                l4_ok = l4_ok and trailer[0] in _L4_PROTOS
            else:
                l4_ok = False
        if l4_ok:
            result.l4_csum_ok = True
            st.rx_l4_csum_ok += 1
        return result

    def _rx_nested(self, frame: bytes, buf: bytearray, l3: int, sa: SadbEntry, rt) -> RxResult | None:
        """Transport over tunnel, crypto offload: the outer (tunnel) ESP verified and carries an IP packet
        (next header 4/41) whose ESP matches an inbound transport SA -> check that one too. NDIS sets
        NextCryptoDone only when both payloads were checked (CryptoDone then set too); crypto_status is the
        inner result, the frame as received if it failed. None = no second layer (one-layer rules apply).
        UDP-encapsulated layers (either one, not both) take part only when the card advertises that kind
        (_udp_layers_offered); otherwise the outer layer is indicated alone. RFC 3948 §3.1.2 (datasheet
        §12.1 row 20): an authentic UDP-encapsulated transport layer carrying TCP/UDP gets L4_CSUM_OK, as
        a single transport UDP-ESP SA does."""
        span = rt.payload_span(buf, l3)
        if span is None or span[0] not in (4, 41):
            return None
        start = span[1]
        found = self._rx_classify(bytes(buf), start, 4 if span[0] == 4 else 6)
        if not found:
            return None
        isa = found[0]
        if isa.packet_offload or isa.tunnel or len(isa.params) != 1 or isa.params[0].proto != IpProto.ESP:
            return None
        if not _udp_layers_offered(self.caps, isa, sa):
            return None
        irt = isa.runtime()
        verdict = irt.crypto_decrypt(buf, start)
        if verdict == _V_NOT_ESP:
            return None
        flt = isa.rx_filter
        if verdict == _V_OK and flt is not None and not self._crypto_in_filter(buf, start, isa, irt, flt):
            return self._policy_unprocessed(frame)
        st = self._stats
        st.rx_crypto_done += 1
        status = _CS_SUCCESS if verdict == _V_OK else crypto_status_for(verdict, tunnel=False, ah=False)
        _count_status(st, status)
        out = bytes(buf) if verdict in _AUTHENTIC else frame
        delete_req = self._check_lifetime(sa, rt) | self._check_lifetime(isa, irt)
        if delete_req:
            st.rx_sa_delete_req += 1
        result = RxResult(out, True, True, int(status), delete_req, sa.handle, int(verdict), next_handle=isa.handle)
        if status == _CS_SUCCESS:
            trailer = esp_trailer(out, sa.esp_icv_len)  # HEADER_INFO describes the outer ESP
            if trailer is not None:
                result.next_header, result.pad_length = trailer
            if self._transport_udp_esp(isa):
                inner_span = irt.payload_span(buf, start)  # the transport layer's own trailer
                if inner_span is not None and inner_span[0] in _L4_PROTOS:
                    result.l4_csum_ok = True
                    st.rx_l4_csum_ok += 1
        return result

    def _policy_unprocessed(self, frame: bytes) -> RxResult:
        """Crypto offload: the frame exactly as received, no IPsec metadata (CRYPTO_DONE clear, handle 0),
        flagged so the host can tell why; the host's own SPD then drops it (RFC 4301 §5.2)."""
        self._stats.rx_policy_unprocessed += 1
        return RxResult(frame, policy_mismatch=True)

    @staticmethod
    def _transport_udp_esp(sa: SadbEntry) -> bool:
        return not sa.tunnel and sa.params[0].encap is not None

    @staticmethod
    def _l4_proto(ip: bytes) -> bool:
        if ip[0] >> 4 == 4:
            return ip[9] in _L4_PROTOS
        return ipv6_upper(ip, 0, len(ip))[0] in _L4_PROTOS

    @staticmethod
    def _crypto_in_filter(buf: bytearray, l3: int, sa: SadbEntry, rt, flt: TrafficFilter) -> bool:
        """Does the decrypted packet fall inside the SA's filter? Transport: outer addresses + the payload's
        protocol and ports; tunnel: the inner packet (seed 000: the filter is the end-to-end connection)."""
        span = rt.payload_span(buf, l3)
        if span is None:
            return False
        nh, start, end = span
        if sa.tunnel:
            view = view_ip(buf, start, end)
            return view is not None and flt.matches(view)
        src, dst = outer_addrs(buf, l3)
        return flt.matches(PacketView(src, dst, nh, ports_at(buf, nh, start, end)))

    def _rx_classify(self, frame: bytes, l3: int, ver: int):
        """None = not an IPsec frame we inspect; False = IPsec but no SA; else (entry, element, seq)."""
        n = len(frame)
        if ver == 4:
            if n < l3 + 20:
                return None
            ihl = (frame[l3] & 0x0F) * 4
            if ihl < 20 or n < l3 + ihl:
                return None
            if ihl > 20 and not self.caps.ipv4_options:
                return None  # NDIS: shapes the card does not support are indicated unprocessed
            if _U16.unpack_from(frame, l3 + 6)[0] & 0x3FFF:
                return None  # fragment: never offloaded
            proto = frame[l3 + 9]
            dst = frame[l3 + 16 : l3 + 20]
            off = l3 + ihl
        else:
            if n < l3 + 40 or not self.caps.ipv6:
                return None
            proto, off = ipv6_upper(frame, l3, n)
            if proto < 0 or proto == IPV6_FRAGMENT:
                return None
            dst = frame[l3 + 24 : l3 + 40]
        if proto == 50:
            if n < off + 8:
                return None
            spi, seq = _U32X2.unpack_from(frame, off)
            hit = self.sadb.lookup_inbound(spi, dst, 50)
        elif proto == 51:
            if n < off + 12:
                return None
            spi, seq = _U32X2.unpack_from(frame, off + 4)
            hit = self.sadb.lookup_inbound(spi, dst, 51)
        elif proto == 17:
            if n < off + 8:
                return None
            dport = _U16.unpack_from(frame, off + 2)[0]
            if not (self.sadb.parser_for_port(dport) or (dport == NAT_T_PORT and self.sadb.udp_sa_count)):
                return None
            # the payload ends with the IP packet, not the frame: Ethernet pads a 1-byte NAT-keepalive
            # (RFC 3948 §2.3) to 60 bytes, and that padding must not read as an SPI
            ip_end = l3 + (_U16.unpack_from(frame, l3 + 2)[0] if ver == 4 else 40 + _U16.unpack_from(frame, l3 + 4)[0])
            if classify_udp_payload(frame[off + 8 : min(ip_end, off + 16)]) != UdpPayloadKind.ESP:
                return None  # IKE (non-ESP marker) or keepalive: the host's business (RFC 3948 §2.2/2.3)
            spi, seq = _U32X2.unpack_from(frame, off + 8)
            hit = self.sadb.lookup_inbound(spi, dst, 50)
            if hit is not None and hit[0].params[hit[1]].encap is None:
                hit = None
        else:
            return None
        if hit is None or hit[0].direction != _INBOUND:
            return False
        return hit[0], hit[1], seq
