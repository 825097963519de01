"""The card firmware facade the NIC model calls: admin commands, transmit, receive, reset, stats.

Receive follows the NDIS IPsec offload v2 rules (receiving-network-data-with-ipsec-offload-version-2):
every frame is indicated, including the ones whose check failed; a frame is matched to an inbound SA by
SPI + destination address (+ protocol); an IPsec frame with no SA is indicated without IPsec metadata;
CryptoDone says a payload was checked, CryptoStatus how it went; SaDeleteReq asks the host to delete
the SA (and its paired outbound SA) and may be set on any frame of that SA.

Transmit (sending-network-data-with-ipsec-offload-version-2): handle 0 means no offload (the frame goes
out unchanged); an unknown handle fails the send (NDIS_STATUS_FAILURE, TxStatus.BAD_HANDLE).
Packet-offload transmit (beyond NDIS) takes a plain IP frame and finds its SA by handle or selector.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum

from firmware_model import ndis
from firmware_model.capabilities import Capabilities
from firmware_model.esp import UdpPayloadKind, Verdict, classify_udp_payload
from firmware_model.ndis import (
    AuthenticationId,
    EncryptionId,
    NdisStatus,
    Opcode,
    ParseError,
    RejectReason,
    SaListFlags,
    UdpEspEncapsulation,
    V1ConfAlgo,
    V1IntegrityAlgo,
    V1Operation,
    V1SaFlags,
    V2AddFlags,
    V2Operation,
    V2SaFlags,
)
from firmware_model.params import AuthAlg, Direction, EncAlg, IpProto, Mode, SaParams, UdpEncap
from firmware_model.sadb import Sadb, SadbEntry, SaRejected, Selector
from firmware_model.status import CryptoStatus, crypto_status_for

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
NAT_T_PORT = 4500  # RFC 3948; the only port NDIS v2 UDP-ESP uses
# SaDeleteReq when fewer than this many sequence numbers are left on a non-ESN SA: leaves the host
# time to rekey before RFC 4303 §3.3.3 forbids the counter to cycle.
SEQ_SOFT_MARGIN = 1 << 16
U32_MAX = 0xFFFF_FFFF
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")


class TxStatus(IntEnum):
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
    Verdict.OK: TxStatus.OK,
    Verdict.BAD_SYNTAX: TxStatus.BAD_SYNTAX,
    Verdict.WRONG_PROTOCOL: TxStatus.WRONG_PROTOCOL,
    Verdict.NOT_ESP: TxStatus.WRONG_PROTOCOL,
    Verdict.SEQ_OVERFLOW: TxStatus.SEQ_OVERFLOW,
    Verdict.HARD_LIMIT: TxStatus.HARD_LIMIT,
}


@dataclass(slots=True)  # one per frame: slots make it cheaper to build
class TxResult:
    status: int
    frame: bytes | None
    sa_delete_req: bool = False  # the SA's soft lifetime passed or its counter is nearly exhausted

    @property
    def ndis_status(self) -> NdisStatus:
        return NdisStatus.SUCCESS if self.status in (TxStatus.OK, TxStatus.NO_OFFLOAD) else NdisStatus.FAILURE


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


GlobalStats = ndis.GlobalStats

_V1_CONF = {V1ConfAlgo.NONE: EncAlg.NONE, V1ConfAlgo.DES: EncAlg.DES_CBC, V1ConfAlgo.TRIPLE_DES: EncAlg.TDES_CBC}
_V1_INTEGRITY = {V1IntegrityAlgo.NONE: AuthAlg.NONE, V1IntegrityAlgo.MD5: AuthAlg.MD5, V1IntegrityAlgo.SHA: AuthAlg.SHA1}
_ENC_BY_ID = {int(a): a for a in EncAlg}
_AUTH_BY_ID = {int(a): a for a in AuthAlg if a}
_GCM = {EncAlg.AES_GCM_128, EncAlg.AES_GCM_192, EncAlg.AES_GCM_256}
HMAC_96 = 12  # HMAC-MD5-96 / HMAC-SHA1-96 ICV bytes (RFC 2403/2404)

# Enum members read through their class cost ~0.3 us each on Python 3.11; the per-frame paths use these.
_TX_OK = TxStatus.OK
_TX_NO_OFFLOAD = TxStatus.NO_OFFLOAD
_OUTBOUND = Direction.OUTBOUND
_INBOUND = Direction.INBOUND
_AH = IpProto.AH
_V_OK = Verdict.OK
_V_DUMMY = Verdict.DUMMY
_V_NOT_ESP = Verdict.NOT_ESP
_V_AUTH_FAILED = Verdict.AUTH_FAILED
_AUTHENTIC = (Verdict.OK, Verdict.DUMMY)  # the ICV verified
_CS_SUCCESS = CryptoStatus.SUCCESS
_CS_SYNTAX = (CryptoStatus.INVALID_PACKET_SYNTAX, CryptoStatus.INVALID_PROTOCOL)
_CS_GENERIC = CryptoStatus.GENERIC_ERROR


def _rej(reason: RejectReason, message: str) -> SaRejected:
    return SaRejected(reason, message)


class Firmware:
    def __init__(self, caps: Capabilities) -> None:
        self.caps = caps
        self.sadb = Sadb(caps)
        self._stats = GlobalStats()
        self.last_error = ""
        self._handlers: dict[int, Callable[[bytes], tuple[int, bytes]]] = {
            Opcode.GET_CAPS: self._cmd_get_caps,
            Opcode.V1_ADD_SA: self._cmd_v1_add_sa,
            Opcode.V1_DELETE_SA: self._cmd_v1_delete_sa,
            Opcode.V1_ADD_UDPESP_SA: self._cmd_v1_add_udpesp_sa,
            Opcode.V1_DELETE_UDPESP_SA: self._cmd_v1_delete_udpesp_sa,
            Opcode.V2_ADD_SA: self._cmd_v2_add_sa,
            Opcode.V2_ADD_SA_EX: self._cmd_v2_add_sa_ex,
            Opcode.V2_DELETE_SA: self._cmd_v2_delete_sa,
            Opcode.V2_UPDATE_SA: self._cmd_v2_update_sa,
            Opcode.ADD_SA_PACKET: self._cmd_add_sa_packet,
            Opcode.GET_STATS: self._cmd_get_stats,
            Opcode.GET_SA_STATS: self._cmd_get_sa_stats,
            Opcode.LIST_SAS: self._cmd_list_sas,
        }

    # ---------------------------------------------------------------------------------------------
    # facade
    def reset(self) -> None:
        """Function reset: every SA and parser entry goes (NDIS: the miniport deletes SAs itself before
        the NIC is removed); counters restart."""
        self.sadb.reset()
        self.sadb.rejects = [0] * len(RejectReason)
        self._stats = GlobalStats()
        self.last_error = ""

    def stats(self) -> GlobalStats:
        st = replace(self._stats)
        st.sa_bundles = len(self.sadb)
        st.sa_capacity = self.sadb.capacity
        st.parser_entries = self.sadb.parser_count
        for reason in RejectReason:
            setattr(st, f"reject_{reason.name.lower()}", self.sadb.rejects[reason])
        return st

    def execute(self, opcode: int, request: bytes) -> tuple[int, bytes]:
        """Run one admin command; never raises. Returns (NdisStatus value, response payload)."""
        handler = self._handlers.get(opcode)
        if handler is None:
            status, response = NdisStatus.INVALID_OID, b""
            self.last_error = f"unknown opcode {opcode:#06x}"
        else:
            try:
                status, response = handler(bytes(request))
                if status == NdisStatus.SUCCESS:
                    self.last_error = ""
            except ParseError as exc:
                status, response = exc.status, b""
                self.last_error = str(exc)
            except SaRejected as exc:
                status, response = exc.status, b""
                self.last_error = str(exc)
            except Exception as exc:  # a firmware bug must not take the device down
                status, response = NdisStatus.FAILURE, b""
                self.last_error = f"internal error: {type(exc).__name__}: {exc}"
        if status == NdisStatus.SUCCESS:
            self._stats.cmd_ok += 1
        else:
            self._stats.cmd_failed += 1
        return int(status), response

    # Python-level add used by commands, sa_file/fwtool and tests
    def add_sa(self, params: list[SaParams] | tuple[SaParams, ...], *, packet_offload: bool = False,
               selector: Selector | None = None) -> int:
        """Add one bundle (raises SaRejected). Packet-offload transport SAs without a selector match
        traffic between their endpoints."""
        outbound = bool(params) and params[0].direction == Direction.OUTBOUND
        if not outbound:
            selector = None  # selectors pick SAs for transmit: an inbound SA must never encrypt traffic
        elif packet_offload and selector is None:
            selector = _default_selector(params[0])
        entry = self.sadb.add(params, packet_offload=packet_offload, selector=selector)
        return entry.handle

    # ---------------------------------------------------------------------------------------------
    # commands
    def _cmd_get_caps(self, req: bytes) -> tuple[int, bytes]:
        _expect_empty(req, "GET_CAPS")
        return NdisStatus.SUCCESS, self.caps.pack()

    def _cmd_get_stats(self, req: bytes) -> tuple[int, bytes]:
        _expect_empty(req, "GET_STATS")
        # counts this command as completed before it snapshots (so cmd_ok includes it)
        snap = self.stats()
        snap.cmd_ok += 1
        return NdisStatus.SUCCESS, snap.pack()

    # -- v1
    def _v1_params(self, req, key_mat: bytes) -> list[SaParams]:
        flags = req.flags
        if flags not in (V1SaFlags.INBOUND, V1SaFlags.OUTBOUND):
            raise self._count(RejectReason.BAD_PARAMETER, f"flags {flags:#x}: exactly one of inbound/outbound")
        direction = Direction.INBOUND if flags == V1SaFlags.INBOUND else Direction.OUTBOUND
        if req.num_sas not in (1, 2):
            raise self._count(RejectReason.BAD_BUNDLE, f"num_sas {req.num_sas}: must be 1 or 2")
        tunnel = any(req.src_tunnel_addr) or any(req.dest_tunnel_addr)
        if tunnel:
            src = ndis.addr_text(req.src_tunnel_addr, False) or "0.0.0.0"
            dst = ndis.addr_text(req.dest_tunnel_addr, False) or "0.0.0.0"
        else:
            src = ndis.addr_text(req.src_addr, False) or "0.0.0.0"
            dst = ndis.addr_text(req.dest_addr, False) or "0.0.0.0"
        inner_src = inner_dst = None
        if tunnel:  # full-mask filter addresses are the inner selector
            if req.src_mask == b"\xff" * 4 and any(req.src_addr):
                inner_src = ndis.addr_text(req.src_addr, False)
            if req.dest_mask == b"\xff" * 4 and any(req.dest_addr):
                inner_dst = ndis.addr_text(req.dest_addr, False)
        out = []
        pos = 0
        for i, sa in enumerate(req.sec_assoc[: req.num_sas]):
            conf, integ = sa.conf_algo, sa.integrity_algo
            # KeyMat order (datasheet decision 1): confidentiality key, then integrity key, per entry
            conf_key = key_mat[pos : pos + conf.algo_keylen]
            pos += conf.algo_keylen
            integ_key = key_mat[pos : pos + integ.algo_keylen]
            pos += integ.algo_keylen
            if pos > len(key_mat):
                raise self._count(RejectReason.BAD_KEY, f"sec_assoc[{i}]: keys run past key_len {len(key_mat)}")
            if sa.operation == V1Operation.ENCRYPT:
                proto = IpProto.ESP
                if conf.algo_identifier not in _V1_CONF:
                    raise self._count(RejectReason.UNSUPPORTED_ALGORITHM,
                                      f"sec_assoc[{i}]: confidentiality algorithm {conf.algo_identifier}")
                enc = _V1_CONF[V1ConfAlgo(conf.algo_identifier)]
            elif sa.operation == V1Operation.AUTHENTICATE:
                proto = IpProto.AH
                if conf.algo_identifier or conf.algo_keylen:
                    raise self._count(RejectReason.BAD_BUNDLE, f"sec_assoc[{i}]: AH with a confidentiality algorithm")
                enc = EncAlg.NONE
            else:
                raise self._count(RejectReason.BAD_BUNDLE, f"sec_assoc[{i}]: operation {sa.operation}")
            if integ.algo_identifier not in _V1_INTEGRITY:
                raise self._count(RejectReason.UNSUPPORTED_ALGORITHM,
                                  f"sec_assoc[{i}]: integrity algorithm {integ.algo_identifier}")
            auth = _V1_INTEGRITY[V1IntegrityAlgo(integ.algo_identifier)]
            out.append(SaParams(
                spi=sa.spi, proto=proto, direction=direction, mode=Mode.TUNNEL if tunnel else Mode.TRANSPORT,
                src=src, dst=dst, enc_alg=enc, enc_key=bytes(conf_key), auth_alg=auth, auth_key=bytes(integ_key),
                icv_len=HMAC_96, replay_window=0, inner_src=inner_src, inner_dst=inner_dst,
            ))
        if pos != len(key_mat):
            raise self._count(RejectReason.BAD_KEY, f"key_len {len(key_mat)} but the algorithms use {pos} bytes")
        return out

    def _count(self, reason: RejectReason, message: str) -> SaRejected:
        self.sadb.rejects[reason] += 1
        return SaRejected(reason, message)

    def _cmd_v1_add_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V1AddSa.unpack(req_bytes)
        params = self._v1_params(req, req.key_mat)
        entry = self.sadb.add(params, filters=_v1_filters(req))
        return NdisStatus.SUCCESS, ndis.HandleResponse(entry.handle).pack()

    def _cmd_v1_add_udpesp_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V1AddUdpEspSa.unpack(req_bytes)
        params = self._v1_params(req, req.key_mat)
        if any(p.proto != IpProto.ESP for p in params):
            raise self._count(RejectReason.BAD_ENCAPSULATION, "UDP-ESP SAs carry ESP only")
        if req.udp_encap_type != ndis.UdpEncapType.OTHER:
            raise self._count(RejectReason.UNSUPPORTED_FEATURE,
                              f"udp_encap_type {req.udp_encap_type}: only OTHER (1) is supported")
        inbound = params[0].direction == Direction.INBOUND
        entry = None
        port = NAT_T_PORT
        if inbound:
            port = req.dst_encap_port
            if port == 0:
                raise self._count(RejectReason.BAD_ENCAPSULATION, "dst_encap_port 0")
            if req.encap_type_entry_offld_handle:
                entry = self.sadb.parser_entry(req.encap_type_entry_offld_handle)
                if entry is None or (entry.encap_type, entry.port) != (req.udp_encap_type, port):
                    raise self._count(RejectReason.BAD_PARSER_ENTRY,
                                      f"parser entry {req.encap_type_entry_offld_handle:#x} unknown or for another port")
        params = [replace(p, encap=UdpEncap(sport=NAT_T_PORT, dport=port)) for p in params]
        # all or nothing: validate the SA before a parser entry is created
        self.sadb.check(params)
        created = False
        if inbound and entry is None:
            entry = self.sadb.find_parser(req.udp_encap_type, port)
            if entry is None:
                entry = self.sadb.create_parser(req.udp_encap_type, port)
                created = True
        try:
            sa = self.sadb.add(params, parser_entry=entry, filters=_v1_filters(req), checked=True)
        except Exception:
            if created:
                self.sadb.delete_parser(entry)
            raise
        return NdisStatus.SUCCESS, ndis.V1AddUdpEspResponse(sa.handle, entry.handle if entry else 0).pack()

    def _cmd_v1_delete_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V1DeleteSa.unpack(req_bytes)
        if self.sadb.remove(req.offload_handle) is None:
            raise ParseError(f"unknown handle {req.offload_handle:#x}", NdisStatus.INVALID_PARAMETER)
        return NdisStatus.SUCCESS, b""

    def _cmd_v1_delete_udpesp_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V1DeleteUdpEspSa.unpack(req_bytes)
        sa = self.sadb.get(req.offload_handle)
        if sa is None:
            raise ParseError(f"unknown handle {req.offload_handle:#x}", NdisStatus.INVALID_PARAMETER)
        entry = None
        if req.encap_type_entry_offld_handle:
            entry = self.sadb.parser_entry(req.encap_type_entry_offld_handle)
            if entry is None:
                raise ParseError(f"unknown parser entry {req.encap_type_entry_offld_handle:#x}",
                                 NdisStatus.INVALID_PARAMETER)
            others = entry.refs - (1 if sa.parser_entry is entry else 0)
            if others:
                raise ParseError(f"parser entry {entry.handle:#x} still used by {others} other SA(s)",
                                 NdisStatus.INVALID_PARAMETER)
        self.sadb.remove(sa.handle)
        if entry is not None:
            self.sadb.delete_parser(entry)
        return NdisStatus.SUCCESS, b""

    # -- v2
    def _v2_params(self, req, key: bytes, packet: ndis.AddSaPacket | None = None) -> list[SaParams]:
        flags = req.flags
        if flags & ~(V2AddFlags.INBOUND | V2AddFlags.IPV6):
            raise self._count(RejectReason.BAD_PARAMETER, f"unknown flags {flags:#x}")
        ipv6 = bool(flags & V2AddFlags.IPV6)
        direction = Direction.INBOUND if flags & V2AddFlags.INBOUND else Direction.OUTBOUND
        if not ipv6 and (any(req.src_addr[4:]) or any(req.dest_addr[4:])):
            raise self._count(RejectReason.BAD_ADDRESS, "IPv4 address with non-zero bytes 4..15")
        any_addr = "::" if ipv6 else "0.0.0.0"
        src = ndis.addr_text(req.src_addr, ipv6) or any_addr
        dst = ndis.addr_text(req.dest_addr, ipv6) or any_addr
        if req.num_ext_hdrs not in (1, 2):
            raise self._count(RejectReason.BAD_BUNDLE, f"num_ext_hdrs {req.num_ext_hdrs}: must be 1 or 2")
        encap_flags = req.udp_esp_encapsulation
        if encap_flags & ~0xF:
            raise self._count(RejectReason.BAD_ENCAPSULATION, f"udp_esp_encapsulation {encap_flags:#x}")
        if encap_flags & ~int(self.caps.udp_esp):
            raise self._count(RejectReason.UNSUPPORTED_FEATURE,
                              f"udp_esp_encapsulation {encap_flags:#x} not offered by this card")
        mode = Mode.TUNNEL if encap_flags & (UdpEspEncapsulation.TUNNEL | UdpEspEncapsulation.TRANSPORT_OVER_TUNNEL) \
            else Mode.TRANSPORT
        encap = UdpEncap(NAT_T_PORT, NAT_T_PORT) if encap_flags else None
        extra: dict = {"replay_window": 0}
        if packet is not None:
            if packet.mode not in (0, 1):
                raise self._count(RejectReason.BAD_PARAMETER, f"mode {packet.mode}")
            mode = Mode(packet.mode)
            if encap is not None:
                encap = UdpEncap(packet.encap_sport or NAT_T_PORT, packet.encap_dport or NAT_T_PORT)
            extra = {
                "replay_window": packet.replay_window, "seq": packet.initial_seq,
                "soft_packets": packet.soft_packets, "hard_packets": packet.hard_packets,
                "soft_bytes": packet.soft_bytes, "hard_bytes": packet.hard_bytes,
            }
            if packet.sel_flags & ndis.SEL_PRESENT:
                sel_v6 = bool(packet.sel_flags & ndis.SEL_IPV6)
                bits = 128 if sel_v6 else 32
                if packet.sel_src_prefix > bits or packet.sel_dst_prefix > bits:
                    raise self._count(RejectReason.BAD_ADDRESS, "selector prefix longer than the address")
                if packet.sel_src_prefix == bits:
                    extra["inner_src"] = ndis.addr_text(packet.sel_src, sel_v6)
                if packet.sel_dst_prefix == bits:
                    extra["inner_dst"] = ndis.addr_text(packet.sel_dst, sel_v6)
        out = []
        for i, sa in enumerate(req.sec_assoc[: req.num_ext_hdrs]):
            esn = bool(sa.flags & V2SaFlags.ESN_SA)
            if sa.flags & ~V2SaFlags.ESN_SA:
                raise self._count(RejectReason.BAD_PARAMETER, f"sec_assoc[{i}]: unknown flags {sa.flags:#x}")
            auth_info, enc_info = sa.authentication_algorithm, sa.encryption_algorithm
            icv = 16
            if sa.operation == V2Operation.ESP:
                proto = IpProto.ESP
                enc = _ENC_BY_ID.get(enc_info.identifier)
                if enc is None:
                    raise self._count(RejectReason.UNSUPPORTED_ALGORITHM,
                                      f"sec_assoc[{i}]: encryption identifier {enc_info.identifier:#x}")
                enc_key = _key_slice(key, enc_info, i, "encryption", self)
                if enc in _GCM:
                    # combined mode: NDIS says only EncryptionAlgorithm is used
                    if auth_info.identifier or auth_info.key_length:
                        raise self._count(RejectReason.BAD_PARAMETER,
                                          f"sec_assoc[{i}]: AES-GCM must leave authentication_algorithm zero")
                    auth, auth_key = AuthAlg.NONE, b""
                    icv = enc_info.additional_info or 16
                else:
                    auth, auth_key = self._v2_auth(key, auth_info, i)
                    if auth in (AuthAlg.MD5, AuthAlg.SHA1):
                        icv = HMAC_96
            elif sa.operation == V2Operation.AH:
                proto = IpProto.AH
                if any((enc_info.identifier, enc_info.key_length)):
                    raise self._count(RejectReason.BAD_BUNDLE, f"sec_assoc[{i}]: AH with an encryption algorithm")
                enc, enc_key = EncAlg.NONE, b""
                auth, auth_key = self._v2_auth(key, auth_info, i)
                if auth in (AuthAlg.MD5, AuthAlg.SHA1):
                    icv = HMAC_96
            else:
                raise self._count(RejectReason.BAD_BUNDLE, f"sec_assoc[{i}]: operation {sa.operation}")
            p_extra = dict(extra)
            if esn and packet is None:
                p_extra["seq"] = sa.sequence_number_high_order << 32
            out.append(SaParams(
                spi=sa.spi, proto=proto, direction=direction, mode=mode, src=src, dst=dst, enc_alg=enc,
                enc_key=enc_key, auth_alg=auth, auth_key=auth_key, icv_len=icv, esn=esn,
                encap=encap if proto == IpProto.ESP else None, **p_extra,
            ))
        return out

    def _v2_auth(self, key: bytes, info: ndis.AlgoInfoV2, i: int) -> tuple[AuthAlg, bytes]:
        if info.identifier == AuthenticationId.NONE:
            if info.key_length:
                raise self._count(RejectReason.BAD_KEY, f"sec_assoc[{i}]: key for authentication NONE")
            return AuthAlg.NONE, b""
        auth = _AUTH_BY_ID.get(info.identifier)
        if auth is None:
            raise self._count(RejectReason.UNSUPPORTED_ALGORITHM,
                              f"sec_assoc[{i}]: authentication identifier {info.identifier:#x}")
        return auth, _key_slice(key, info, i, "authentication", self)

    def _add_v2_entry(self, req, key: bytes) -> SadbEntry:
        return self.sadb.add(self._v2_params(req, key))

    def _cmd_v2_add_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        entries = ndis.unpack_v2_add_sa_list(req_bytes)  # a malformed list adds nothing
        results = []
        first_error: NdisStatus | None = None
        added = 0
        for entry in entries:
            try:
                sa = self._add_v2_entry(entry, entry.key_data)
                results.append(ndis.V2AddSaResult(sa.handle, NdisStatus.SUCCESS))
                added += 1
            except SaRejected as exc:  # partial success: this entry gets a NULL handle
                results.append(ndis.V2AddSaResult(0, exc.status))
                first_error = first_error or exc.status
                self.last_error = str(exc)
        status = NdisStatus.SUCCESS if added else (first_error or NdisStatus.FAILURE)
        return status, ndis.pack_counted(results)

    def _cmd_v2_add_sa_ex(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V2AddSaEx.unpack(req_bytes)
        sa = self._add_v2_entry(req, req.key_data)
        return NdisStatus.SUCCESS, ndis.HandleResponse(sa.handle).pack()

    def _cmd_add_sa_packet(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.AddSaPacket.unpack(req_bytes)
        if req.num_ext_hdrs != 1 or req.sec_assoc[0].operation != V2Operation.ESP:
            raise self._count(RejectReason.UNSUPPORTED_FEATURE, "packet offload takes exactly one ESP SA")
        params = self._v2_params(req, req.key_data, packet=req)
        selector = None
        if req.sel_flags & ndis.SEL_PRESENT:
            v6 = bool(req.sel_flags & ndis.SEL_IPV6)
            bits = 128 if v6 else 32
            src = int.from_bytes(req.sel_src[: bits // 8], "big")
            dst = int.from_bytes(req.sel_dst[: bits // 8], "big")
            full = (1 << bits) - 1
            smask = full ^ ((1 << (bits - req.sel_src_prefix)) - 1)
            dmask = full ^ ((1 << (bits - req.sel_dst_prefix)) - 1)
            selector = Selector(6 if v6 else 4, src & smask, req.sel_src_prefix, dst & dmask, req.sel_dst_prefix,
                                req.sel_proto, req.sel_sport, req.sel_dport)
        handle = self.add_sa(params, packet_offload=True, selector=selector)
        return NdisStatus.SUCCESS, ndis.HandleResponse(handle).pack()

    def _cmd_v2_delete_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        handles = ndis.unpack_v2_delete_sa_list(req_bytes)
        statuses = []
        seen: set[int] = set()
        ok = True
        for h in handles:
            good = h not in seen and self.sadb.get(h) is not None
            seen.add(h)
            statuses.append(ndis.StatusEntry(NdisStatus.SUCCESS if good else NdisStatus.INVALID_PARAMETER))
            ok &= good
        if not ok:  # validate-then-commit: nothing is deleted
            self.last_error = "V2_DELETE_SA: unknown or repeated handle"
            return NdisStatus.INVALID_PARAMETER, ndis.pack_counted(statuses)
        for h in handles:
            self.sadb.remove(h)
        return NdisStatus.SUCCESS, ndis.pack_counted(statuses)

    def _cmd_v2_update_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V2UpdateSa.unpack(req_bytes)
        bad = NdisStatus.INVALID_PARAMETER
        sa = self.sadb.get(req.offload_handle)
        if sa is None:
            raise ParseError(f"UPDATE_SA: unknown handle {req.offload_handle:#x}", bad)
        proto = {V2Operation.ESP: IpProto.ESP, V2Operation.AH: IpProto.AH}.get(req.operation)
        if proto is None:
            raise ParseError(f"UPDATE_SA: operation {req.operation}", bad)
        match = [p for p in sa.params if p.proto == proto and p.spi == req.spi]
        if not match:
            raise ParseError(f"UPDATE_SA: no {proto.name} SPI {req.spi:#x} in bundle {sa.handle:#x}", bad)
        if not match[0].esn or not self.caps.esn:
            raise ParseError(f"UPDATE_SA: SA {req.spi:#x} is not an ESN SA", bad)
        if sa.packet_offload:
            raise ParseError("UPDATE_SA: packet-offload SAs track their own ESN", bad)
        rt = sa.runtime()
        engines = sa.built_engines()
        target = engines[sa.params.index(match[0])] if len(engines) > 1 else rt
        target.set_seq_hi(req.sequence_number_high_order)
        return NdisStatus.SUCCESS, b""

    def _cmd_get_sa_stats(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.HandleRequest.unpack(req_bytes)
        sa = self.sadb.get(req.offload_handle)
        if sa is None:
            raise ParseError(f"GET_SA_STATS: unknown handle {req.offload_handle:#x}", NdisStatus.INVALID_PARAMETER)
        engines = sa.built_engines()
        entries = []
        for i, p in enumerate(sa.params):
            st = engines[i].stats if engines else None
            entries.append(ndis.SaStatsEntry(
                spi=p.spi, proto=int(p.proto), direction=int(p.direction),
                packets=st.packets if st else 0, bytes=st.bytes if st else 0,
                auth_failures=st.auth_failures if st else 0, replay_drops=st.replay_drops if st else 0,
                syntax_errors=st.syntax_errors if st else 0,
                other_errors=(st.seq_overflows + st.hard_limit_drops + st.wrong_protocol) if st else 0,
            ))
        return NdisStatus.SUCCESS, ndis.pack_sa_stats(sa.handle, entries)

    def _cmd_list_sas(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.ListSasRequest.unpack(req_bytes)
        # A page below one whole bundle could never make progress (next_index would not move).
        if not ndis.MIN_LIST_SAS_ENTRIES <= req.max_entries <= ndis.MAX_LIST_SAS_ENTRIES:
            raise ParseError(f"LIST_SAS: max_entries {req.max_entries} outside "
                             f"{ndis.MIN_LIST_SAS_ENTRIES}..{ndis.MAX_LIST_SAS_ENTRIES}", NdisStatus.INVALID_PARAMETER)
        rows: list[ndis.SaListEntry] = []
        next_index = 0xFFFF_FFFF
        for slot, sa in self.sadb.bundles(req.start_index):
            if len(rows) + len(sa.params) > req.max_entries:
                next_index = slot
                break
            flags = SaListFlags(0)
            if sa.params[0].esn:
                flags |= SaListFlags.ESN
            if sa.params[0].encap is not None:
                flags |= SaListFlags.UDP_ENCAP
            if sa.packet_offload:
                flags |= SaListFlags.PACKET_OFFLOAD
            if sa.delete_requested:
                flags |= SaListFlags.DELETE_REQUESTED
            if sa.paired is not None:
                flags |= SaListFlags.PAIRED
            for p in sa.params:
                rows.append(ndis.SaListEntry(sa.handle, p.spi, int(p.proto), int(p.direction), int(p.mode),
                                             sa.family, int(flags), sa.paired.handle if sa.paired else 0))
        head = ndis.ListSasResponse(len(self.sadb), next_index, len(rows))
        return NdisStatus.SUCCESS, ndis.pack_list_sas(head, rows)

    # ---------------------------------------------------------------------------------------------
    # datapath
    def transmit(self, frame: bytes, handle: int, packet_offload: bool, seq_hi: int | None = None) -> TxResult:
        """One TX frame. ``seq_hi``: crypto offload ESN high half carried by the descriptor (TxFlags.SEQ_HI),
        used instead of the SA's (UPDATE_SA) for this frame."""
        st = self._stats
        st.tx_packets += 1
        st.tx_bytes += len(frame)
        if handle == 0 and not packet_offload:
            st.tx_passthrough += 1
            return TxResult(_TX_NO_OFFLOAD, frame)
        l3, _ = _l3_offset(frame)
        if l3 < 0:
            st.tx_errors += 1
            return TxResult(TxStatus.BAD_SYNTAX, None)
        if packet_offload:
            return self._tx_packet(frame, l3, handle)
        sa = self.sadb.get(handle)
        if sa is None or sa.direction != _OUTBOUND or sa.packet_offload:
            st.tx_bad_handle += 1
            return TxResult(TxStatus.BAD_HANDLE, None)
        buf = bytearray(frame)
        rt = sa.runtime()
        verdict = rt.crypto_encrypt(buf, l3, seq_hi)
        if verdict:  # anything but Verdict.OK (0)
            st.tx_errors += 1
            return TxResult(_TX_FROM_VERDICT.get(verdict, TxStatus.ERROR), None)
        st.tx_crypto += 1
        if not sa.params[0].esn and self._seq_near_end(buf, l3, sa):
            self.sadb.request_delete(sa)
        return TxResult(_TX_OK, bytes(buf), self._check_lifetime(sa, rt))

    def _tx_packet(self, frame: bytes, l3: int, handle: int) -> TxResult:
        st = self._stats
        ip = frame[l3:]
        if handle:
            sa = self.sadb.get(handle)
            if sa is None or sa.direction != _OUTBOUND or not sa.packet_offload:
                st.tx_bad_handle += 1
                return TxResult(TxStatus.BAD_HANDLE, None)
        else:
            key = _selector_key(ip)
            sa = self.sadb.lookup_selector(*key) if key else None
            if sa is None:
                st.tx_errors += 1
                return TxResult(TxStatus.NO_SA, None)
        rt = sa.runtime()
        verdict, out = rt.encapsulate(ip)
        if verdict:  # anything but Verdict.OK (0)
            st.tx_errors += 1
            return TxResult(_TX_FROM_VERDICT.get(verdict, TxStatus.ERROR), None, self._check_lifetime(sa, rt))
        st.tx_packet_offload += 1
        return TxResult(_TX_OK, _reframe(frame, l3, out), self._check_lifetime(sa, rt))

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
        seq = _U32.unpack_from(buf, l3 + 24)[0] if fixed else _esp_seq(buf, l3)
        return seq is not None and seq > U32_MAX - SEQ_SOFT_MARGIN

    def receive(self, frame: bytes) -> RxResult:
        st = self._stats
        st.rx_packets += 1
        st.rx_bytes += len(frame)
        l3, ver = _l3_offset(frame)
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
        if sa.packet_offload:
            verdict, inner = rt.decapsulate(frame[l3:])
            if verdict == _V_NOT_ESP:
                st.rx_not_processed += 1
                return RxResult(frame, handle=sa.handle)
            out = _reframe(frame, l3, inner) if verdict == _V_OK else frame
        else:
            buf = bytearray(frame)
            verdict = rt.crypto_decrypt(buf, l3)
            if verdict == _V_NOT_ESP:
                st.rx_not_processed += 1
                return RxResult(frame, handle=sa.handle)
            authentic = verdict in _AUTHENTIC
            out = bytes(buf) if authentic else frame
            # only an authenticated sequence number may move SA state (a forged one must not ask for a rekey)
            if authentic and seq > U32_MAX - SEQ_SOFT_MARGIN and not sa.params[0].esn:
                self.sadb.request_delete(sa)
        if verdict == _V_OK:
            status = _CS_SUCCESS
            st.rx_crypto_ok += 1
        else:
            # an ESP+AH bundle says which of its layers failed; a single SA is its own protocol
            failed = getattr(rt, "failed_proto", None) or sa.params[index].proto
            status = crypto_status_for(verdict, tunnel=sa.tunnel, ah=verdict == _V_AUTH_FAILED and failed == _AH)
            if status == _CS_SUCCESS:
                st.rx_crypto_ok += 1
            elif status in _CS_SYNTAX:
                st.rx_syntax_errors += 1
            elif status == _CS_GENERIC:
                st.rx_other_errors += 1
            else:
                st.rx_auth_failed += 1
        st.rx_crypto_done += 1
        delete_req = self._check_lifetime(sa, rt)
        if delete_req:
            st.rx_sa_delete_req += 1
        # positional arguments in RxResult's field order: the keyword form costs more per frame
        return RxResult(out, True, False, int(status), delete_req, sa.handle, int(verdict),
                        sa.packet_offload and verdict == _V_DUMMY)

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
            proto, off = _ipv6_upper(frame, l3, n)
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


# ---------------------------------------------------------------------------------------------------
# helpers


def _expect_empty(req: bytes, name: str) -> None:
    if req:
        raise ParseError(f"{name} takes no payload, got {len(req)} bytes", NdisStatus.INVALID_LENGTH)


def _key_slice(key: bytes, info: ndis.AlgoInfoV2, i: int, what: str, fw: Firmware) -> bytes:
    start, length = info.key_offset_bytes, info.key_length
    if start + length > len(key):
        raise fw._count(RejectReason.BAD_KEY,
                        f"sec_assoc[{i}]: {what} key {start}+{length} outside the {len(key)}-byte key buffer")
    return bytes(key[start : start + length])


def _v1_filters(req) -> tuple:
    return (req.src_addr, req.src_mask, req.dest_addr, req.dest_mask, req.protocol, req.src_port, req.dest_port)


IPV6_FRAGMENT = 44
_IPV6_SKIPPED = (0, 43, 60)  # hop-by-hop, routing, destination options (RFC 8200 §4)


def _ipv6_upper(packet: bytes | bytearray, start: int, limit: int) -> tuple[int, int]:
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


def _l3_offset(frame: bytes) -> tuple[int, int]:
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


def _reframe(frame: bytes, l3: int, ip_packet: bytes) -> bytes:
    """Ethernet header of `frame` around a new IP packet (ethertype follows the IP version)."""
    etype = ETH_P_IPV6 if ip_packet and ip_packet[0] >> 4 == 6 else ETH_P_IP
    if frame[l3 - 2] == etype >> 8 and frame[l3 - 1] == etype & 0xFF:
        return b"".join((frame[:l3], ip_packet))  # the usual case: same IP version, header kept
    head = bytearray(frame[:l3])
    head[l3 - 2 : l3] = _U16.pack(etype)
    return bytes(head) + ip_packet


def _esp_seq(buf: bytes | bytearray, l3: int) -> int | None:
    if buf[l3] >> 4 == 4:
        ihl = (buf[l3] & 0x0F) * 4
        proto, off = buf[l3 + 9], l3 + ihl
    else:
        proto, off = _ipv6_upper(buf, l3, len(buf))
    if proto == 17:
        off += 8
    elif proto == 51:
        off += 4
    elif proto != 50:
        return None
    if off < 0 or len(buf) < off + 8:
        return None
    return _U32.unpack_from(buf, off + 4)[0]


def _selector_key(ip: bytes) -> tuple[int, int, int, int, int, int] | None:
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
        proto, off = _ipv6_upper(ip, 0, len(ip))
        family = 6
        if proto < 0:
            return None
    else:
        return None
    sport = dport = 0
    if proto in (6, 17, 132) and off >= 0 and len(ip) >= off + 4:
        sport, dport = struct.unpack_from("!HH", ip, off)
    return family, src, dst, proto, sport, dport


def _default_selector(p: SaParams) -> Selector | None:
    """Transport mode: the SA endpoints; tunnel mode: the inner addresses if given, else none."""
    if p.mode == Mode.TRANSPORT:
        return Selector.from_text(p.src, p.dst)
    if p.inner_src or p.inner_dst:
        any_addr = "::/0" if (p.inner_src or p.inner_dst or "").count(":") else "0.0.0.0/0"
        return Selector.from_text(p.inner_src or any_addr, p.inner_dst or any_addr)
    return None


__all__ = [
    "Firmware", "GlobalStats", "RxResult", "TxResult", "TxStatus", "EncryptionId", "AuthenticationId",
]
