"""One security association: its parameters, their one validation, and their encoding as admin commands.

``SaParams`` is the immutable description of one SA; key material never appears in its repr
(field(repr=False)) and no validation message quotes key bytes.

``validate_sa`` is the one place that decides whether an SA's parameters make sense, one check and one
message per reason, each carrying a typed ``RejectReason`` (``SaInvalid.reason``); the driver calls it
before it sends a command and the firmware before it commits one (validate, then commit, like Linux
netdevsim's ``nsim_ipsec_add_sa``). What a particular card has enabled is the firmware's own check.

The encoders turn SaParams into command payloads (device/contract/ndis.py formats):

* crypto offload (the NDIS contract): ``V2_ADD_SA_EX`` - one bundle, algorithms + keys + ESN high half;
  the host numbers and frames packets itself. ``V1_ADD_SA`` / ``V1_ADD_UDPESP_SA`` remain available for
  the v1 algorithms (3DES / NULL with HMAC-MD5/SHA1, IPv4 only).
* packet offload (beyond NDIS): ``ADD_SA_PACKET`` - the card numbers, pads, encapsulates and checks replay.

Key layout in the key buffer: encryption key first, then integrity key (offsets are explicit anyway).
AES-GCM and AES-GMAC keys include their 4-byte salt at the end (ndis.py decision 4).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from device.contract import ndis
from device.contract.algorithms import AUTH_INFO, ENC_INFO, AuthInfo, EncInfo
from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode, UdpEspEncapsulation
from device.contract.ndis import (
    AlgoInfoV1,
    AlgoInfoV2,
    RejectReason,
    SaV1,
    SaV2,
    V1ConfAlgo,
    V1IntegrityAlgo,
    V1Operation,
    V1SaFlags,
    V2AddFlags,
    V2Operation,
    V2SaFlags,
)

# RFC 4303 §2.1: SPI values 1..255 are reserved by IANA, 0 is local-use only and never sent.
MIN_SPI = 256
MAX_SPI = 0xFFFF_FFFF
MAX_REPLAY_WINDOW = 65536  # well above the ">= 4096" goal; the bitmap costs W/8 bytes


@lru_cache(maxsize=65536)
def parse_address(addr: str) -> tuple[int, bytes]:
    """(IP version, packed bytes) of an address string, exactly as `ipaddress.ip_address` reads it;
    raises ValueError (the ipaddress message) for anything it refuses.

    Adding SAs in bulk spent most of its time here, so: results are cached (a table repeats a few
    endpoints), and a string that inet_pton accepts *and* that inet_ntop prints back unchanged is in
    canonical form, which ipaddress reads the same way -- those skip ipaddress's pure-Python parser.
    Everything else (leading zeros, scope ids, upper case, non-strings, garbage) goes to ipaddress."""
    if isinstance(addr, str):
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            try:
                packed = socket.inet_pton(family, addr)
            except (OSError, ValueError):
                continue
            if socket.inet_ntop(family, packed) == addr:
                return version, packed
    ip = ipaddress.ip_address(addr)
    return ip.version, ip.packed


@dataclass(frozen=True)
class UdpEncap:
    """RFC 3948 UDP encapsulation ports (NDIS only allows 4500)."""

    sport: int = 4500
    dport: int = 4500


@dataclass(frozen=True)  # (no slots: callers rely on vars()/__dict__ of SaParams)
class SaParams:
    spi: int
    proto: IpProto
    direction: Direction
    mode: Mode
    src: str  # SA endpoints (outer addresses; tunnel endpoints in tunnel mode)
    dst: str
    enc_alg: EncAlg = EncAlg.NONE
    enc_key: bytes = field(default=b"", repr=False)  # AES-GCM/GMAC: key || 4-byte salt (RFC 4106 §8.1)
    auth_alg: AuthAlg = AuthAlg.NONE
    auth_key: bytes = field(default=b"", repr=False)  # AES-GMAC: key || 4-byte salt (RFC 4543 §8)
    icv_len: int = 16
    esn: bool = False
    seq: int = 0  # outbound: last sent (first packet uses seq+1); inbound: window start
    replay_window: int = 64  # inbound; 0 = no anti-replay
    encap: UdpEncap | None = None
    inner_src: str | None = None
    inner_dst: str | None = None
    soft_packets: int = 0
    hard_packets: int = 0
    soft_bytes: int = 0
    hard_bytes: int = 0
    # The rest of the traffic selector, in packet direction like inner_src/inner_dst: the v1 filter's
    # Protocol/SrcPort/DestPort, ADD_SA_PACKET sel_proto/sel_sport/sel_dport; 0 = any. An inbound SA
    # delivers only matching packets (datasheet §7.5/§7.6).
    sel_proto: int = 0
    sel_sport: int = 0
    sel_dport: int = 0

    @property
    def family(self) -> int:
        return parse_address(self.dst)[0]


class SaInvalid(ValueError):
    """The SA's parameters are refused; ``reason`` says why (each reason has a GET_STATS counter)."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnsupportedAlgorithm(SaInvalid):
    """The SA asks for an algorithm (or combination) that is refused."""

    def __init__(self, message: str) -> None:
        super().__init__(RejectReason.UNSUPPORTED_ALGORITHM, message)


def _address(text: object, what: str) -> int:
    try:
        return parse_address(text)[0]  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise SaInvalid(RejectReason.BAD_ADDRESS, f"bad {what}: {exc}") from None


def validate_sa(p: SaParams, enc_table: Mapping[EncAlg, EncInfo] = ENC_INFO,
                auth_table: Mapping[AuthAlg, AuthInfo] = AUTH_INFO) -> None:
    """Raise SaInvalid (or UnsupportedAlgorithm) with one reason and a one-line message unless ``p`` is a
    well-formed SA. ``enc_table``/``auth_table`` say which algorithms are available (the firmware passes
    what its crypto library can run)."""
    if not MIN_SPI <= p.spi <= MAX_SPI:
        raise SaInvalid(RejectReason.BAD_SPI, f"SPI {p.spi:#x} outside {MIN_SPI}..{MAX_SPI:#x} (RFC 4303 §2.1)")
    if _address(p.src, "SA endpoint address") != _address(p.dst, "SA endpoint address"):
        raise SaInvalid(RejectReason.BAD_ADDRESS, "SA src and dst must be the same IP family")
    for name in ("inner_src", "inner_dst"):
        if getattr(p, name) is not None:
            _address(getattr(p, name), name)
    if p.encap is not None:
        if p.proto != IpProto.ESP:
            raise SaInvalid(RejectReason.BAD_ENCAPSULATION, "UDP encapsulation applies to ESP only (RFC 3948)")
        for port in (p.encap.sport, p.encap.dport):
            if not 1 <= port <= 0xFFFF:
                raise SaInvalid(RejectReason.BAD_ENCAPSULATION, f"UDP encapsulation port {port} out of range")
    if not 0 <= p.seq < 1 << (64 if p.esn else 32):
        raise SaInvalid(RejectReason.BAD_PARAMETER,
                        f"initial sequence number {p.seq} does not fit {'64' if p.esn else '32'} bits")
    if not 0 <= p.replay_window <= MAX_REPLAY_WINDOW:
        raise SaInvalid(RejectReason.BAD_PARAMETER, f"replay window {p.replay_window} outside 0..{MAX_REPLAY_WINDOW}")
    if not 0 <= p.sel_proto <= 0xFF or not 0 <= p.sel_sport <= 0xFFFF or not 0 <= p.sel_dport <= 0xFFFF:
        raise SaInvalid(RejectReason.BAD_PARAMETER, "selector protocol must fit 8 bits and ports 16 bits")
    if (p.sel_sport or p.sel_dport) and p.sel_proto not in (6, 17):
        raise SaInvalid(RejectReason.BAD_PARAMETER, "selector ports need protocol tcp (6) or udp (17)")
    for name in ("soft_packets", "hard_packets", "soft_bytes", "hard_bytes"):
        if getattr(p, name) < 0:
            raise SaInvalid(RejectReason.BAD_PARAMETER, f"{name} must not be negative")
    _check_algorithms(p, enc_table, auth_table)


def available(table: Mapping, alg: int, what: str):
    """The table's facts for ``alg``, or UnsupportedAlgorithm when it is unknown or refused."""
    info = table.get(alg)
    if info is None:
        raise UnsupportedAlgorithm(f"unknown {what} algorithm {int(alg):#x}")
    if info.unavailable:
        raise UnsupportedAlgorithm(info.unavailable)
    return info


def _check_algorithms(p: SaParams, enc_table: Mapping[EncAlg, EncInfo],
                      auth_table: Mapping[AuthAlg, AuthInfo]) -> None:
    """The algorithm combination, key lengths and ICV length."""
    enc = available(enc_table, p.enc_alg, "encryption")
    auth = available(auth_table, p.auth_alg, "integrity")
    if p.proto == IpProto.AH:
        if p.enc_alg != EncAlg.NONE:
            raise UnsupportedAlgorithm("AH has no encryption (RFC 4302); enc_alg must be NONE")
        if auth.kind == "null":
            raise UnsupportedAlgorithm("AH needs an integrity algorithm")
        if auth.kind != "hmac":
            # Datasheet §12.1 decision 23: AH integrity is HMAC only. AES-GMAC in AH (RFC 4543 §3.2) has no
            # independent implementation to prove it against (Linux XFRM and scapy offer none for AH).
            raise UnsupportedAlgorithm(f"AH integrity must be an HMAC; {auth.name} is offered for ESP only")
    else:
        if enc.kind == "aead" and auth.kind != "null":
            raise UnsupportedAlgorithm(f"{enc.name} is a combined mode; auth_alg must be NONE (RFC 4106 §1)")
        if auth.kind == "gmac" and enc.kind != "null":
            raise UnsupportedAlgorithm("AES-GMAC is ENCR_NULL_AUTH_AES_GMAC: enc_alg must be NONE (RFC 4543 §3)")
        if enc.kind == "null" and auth.kind == "null":
            raise UnsupportedAlgorithm("ESP with neither encryption nor integrity is not allowed (RFC 4303 §3.2)")
    for what, alg_info, key in (("enc_key", enc, p.enc_key), ("auth_key", auth, p.auth_key)):
        if len(key) != alg_info.key_len + alg_info.salt_len:
            raise SaInvalid(RejectReason.BAD_KEY,
                            f"{alg_info.name} needs {alg_info.key_len + alg_info.salt_len}-byte {what}"
                            + (f" (key || {alg_info.salt_len}-byte salt)" if alg_info.salt_len else "")
                            + f", got {len(key)}")
    if enc.kind == "aead":
        if p.icv_len not in enc.icv_lens:
            raise SaInvalid(RejectReason.BAD_ICV_LENGTH, f"{enc.name} ICV must be one of {enc.icv_lens} bytes "
                            "(RFC 4106 §6)")
    elif auth.kind != "null" and p.icv_len != auth.icv_len:
        raise SaInvalid(RejectReason.BAD_ICV_LENGTH, f"{auth.name} ICV is {auth.icv_len} bytes, not {p.icv_len}")


def effective_icv_len(params: SaParams) -> int:
    """ICV bytes on the wire: the GCM choice, else the integrity algorithm's fixed truncation."""
    if ENC_INFO[params.enc_alg].kind == "aead":
        return params.icv_len
    return AUTH_INFO[params.auth_alg].icv_len


NAT_T_PORT = 4500  # RFC 3948 §2: the only UDP-ESP port NDIS offloads
_GCM = frozenset((EncAlg.AES_GCM_128, EncAlg.AES_GCM_192, EncAlg.AES_GCM_256))

# ---------------------------------------------------------------------------------------------
# Encoders: v2 (crypto offload) and packet offload


@dataclass(frozen=True)
class _Keys:
    data: bytes
    enc: AlgoInfoV2
    auth: AlgoInfoV2


def _v2_algorithms(p: SaParams) -> _Keys:
    """Algorithm records + key buffer for one SA (NDIS v2 IPSEC_OFFLOAD_V2_ALGORITHM_INFO)."""
    key = b""
    enc = AlgoInfoV2()
    auth = AlgoInfoV2()
    if p.proto == IpProto.ESP:
        # additional_info of AES-GCM is the ICV length in bytes (ndis.py decision 4).
        extra = p.icv_len if p.enc_alg in _GCM else 0
        enc = AlgoInfoV2(int(p.enc_alg), len(p.enc_key), 0, extra)
        key = p.enc_key
    if p.enc_alg not in _GCM:  # combined mode leaves the authentication record zero (NDIS)
        auth = AlgoInfoV2(int(p.auth_alg), len(p.auth_key), len(key) if p.auth_key else 0, 0)
        key += p.auth_key
    return _Keys(key, enc, auth)


def _v2_common(p: SaParams, *, allow_any_port: bool, ah: SaParams | None = None) -> dict:
    family = ipaddress.ip_address(p.dst).version
    flags = V2AddFlags(0)
    if p.direction == Direction.INBOUND:
        flags |= V2AddFlags.INBOUND
    if family == 6:
        flags |= V2AddFlags.IPV6
    encap = UdpEspEncapsulation.NONE
    if p.encap is not None:
        if not allow_any_port and (p.encap.sport, p.encap.dport) != (NAT_T_PORT, NAT_T_PORT):
            raise ValueError("crypto offload (NDIS) supports UDP-ESP on port 4500 only; use packet offload for "
                             "other ports")
        encap = UdpEspEncapsulation.TUNNEL if p.mode == Mode.TUNNEL else UdpEspEncapsulation.TRANSPORT
    keys = _v2_algorithms(p)
    second = SaV2()
    key_data = keys.data
    if ah is not None:
        # seed 001/003: one bundle = ESP followed by AH; the AH key follows the ESP keys in the buffer
        _check_bundle(p, ah)
        ah_keys = _v2_algorithms(ah)
        auth = AlgoInfoV2(ah_keys.auth.identifier, ah_keys.auth.key_length, len(key_data), 0)
        second = SaV2(flags=int(V2SaFlags.ESN_SA) if ah.esn else 0, operation=int(V2Operation.AH), spi=ah.spi,
                      authentication_algorithm=auth, encryption_algorithm=AlgoInfoV2(),
                      sequence_number_high_order=(ah.seq >> 32) if ah.esn else 0)
        key_data += ah.auth_key
    sa = SaV2(
        flags=int(V2SaFlags.ESN_SA) if p.esn else 0,
        operation=int(V2Operation.ESP if p.proto == IpProto.ESP else V2Operation.AH),
        spi=p.spi,
        authentication_algorithm=keys.auth,
        encryption_algorithm=keys.enc,
        sequence_number_high_order=(p.seq >> 32) if p.esn else 0,
    )
    return dict(num_ext_hdrs=1 if ah is None else 2, flags=int(flags), src_addr=ndis.addr16(p.src),
                dest_addr=ndis.addr16(p.dst), udp_esp_encapsulation=int(encap), sec_assoc=(sa, second),
                key_length=len(key_data), key_offset=0, key_data=key_data)


def _check_bundle(esp: SaParams, ah: SaParams) -> None:
    """An ESP-then-AH bundle: one ESP and one AH SA with the same direction and endpoints, no UDP-ESP."""
    validate_sa(ah)
    if esp.proto != IpProto.ESP or ah.proto != IpProto.AH:
        raise ValueError("a bundle is an ESP SA followed by an AH SA")
    if (esp.direction, esp.src, esp.dst) != (ah.direction, ah.src, ah.dst):
        raise ValueError("the bundle's ESP and AH SAs need the same direction and endpoints")
    if esp.encap is not None:
        raise ValueError("UDP encapsulation cannot carry AH (RFC 3948 covers ESP only)")


def v2_add_sa_ex(p: SaParams, ah: SaParams | None = None) -> bytes:
    """V2_ADD_SA_EX request for a crypto-offload SA (with ``ah``: an ESP-then-AH bundle)."""
    validate_sa(p)
    fields = _v2_common(p, allow_any_port=False, ah=ah)
    fields["key_offset"] = ndis.V2_ADD_SA_EX.size
    return ndis.V2AddSaEx(**fields).pack()


def v2_add_sa_list(ps: list[SaParams], ahs: list[SaParams | None] | None = None) -> bytes:
    """V2_ADD_SA request: one linked-list entry per crypto-offload SA or ESP-then-AH bundle (``ahs[i]``);
    NDIS reports each entry's result."""
    entries = []
    for p, ah in zip(ps, ahs or [None] * len(ps), strict=True):
        validate_sa(p)
        fields = _v2_common(p, allow_any_port=False, ah=ah)
        fields.pop("key_offset")  # a list entry's key data follows its fixed part
        entries.append(ndis.V2AddSa(**fields))
    return ndis.pack_v2_add_sa_list(entries)


def add_sa_packet(p: SaParams) -> bytes:
    """ADD_SA_PACKET request for a packet-offload SA (ESP only)."""
    validate_sa(p)
    if p.proto != IpProto.ESP:
        raise ValueError("packet offload takes ESP SAs only")
    fields = _v2_common(p, allow_any_port=True)
    fields["key_offset"] = ndis.ADD_SA_PACKET.size
    encap = p.encap or UdpEncap(0, 0)
    sel: dict = {}
    ports = dict(sel_proto=p.sel_proto, sel_sport=p.sel_sport, sel_dport=p.sel_dport)
    sel_src, sel_dst = p.inner_src, p.inner_dst
    if p.mode == Mode.TRANSPORT and p.sel_proto:
        # A transport SA's traffic is between its endpoints: a protocol/port selector narrows that, it does
        # not widen it to every address (datasheet §5.2: without a selector it matches its endpoints).
        sel_src, sel_dst = sel_src or p.src, sel_dst or p.dst
    if sel_src or sel_dst or p.sel_proto:
        inner = [ipaddress.ip_address(a) for a in (sel_src, sel_dst) if a]
        v6 = (inner[0].version if inner else p.family) == 6
        bits = 128 if v6 else 32
        sel = dict(
            sel_src=ndis.addr16(sel_src), sel_dst=ndis.addr16(sel_dst),
            sel_src_prefix=bits if sel_src else 0, sel_dst_prefix=bits if sel_dst else 0,
            sel_flags=ndis.SEL_PRESENT | (ndis.SEL_IPV6 if v6 else 0), **ports,
        )
    else:
        sel = dict(sel_src=bytes(16), sel_dst=bytes(16))
    req = ndis.AddSaPacket(
        **{k: v for k, v in fields.items() if k != "key_data"},
        source_switch_port_id=0, vlan_id=0, mode=int(p.mode),
        encap_sport=encap.sport, encap_dport=encap.dport, replay_window=p.replay_window, initial_seq=p.seq,
        soft_packets=p.soft_packets, hard_packets=p.hard_packets, soft_bytes=p.soft_bytes,
        hard_bytes=p.hard_bytes, key_data=fields["key_data"], **sel,
    )
    return req.pack()


def v2_update_sa(handle: int, p_or_spi: SaParams | int, seq_hi: int, proto: IpProto = IpProto.ESP) -> bytes:
    spi = p_or_spi.spi if isinstance(p_or_spi, SaParams) else p_or_spi
    if not 0 <= seq_hi <= 0xFFFF_FFFF:
        raise ValueError(f"ESN high half {seq_hi} does not fit 32 bits")
    op = V2Operation.ESP if proto == IpProto.ESP else V2Operation.AH
    return ndis.V2UpdateSa(handle, int(op), spi, seq_hi).pack()


def v2_delete(handles: list[int]) -> bytes:
    if not handles:
        raise ValueError("no SA handles to delete")
    return ndis.pack_v2_delete_sa_list(handles)


# ---------------------------------------------------------------------------------------------
# v1 (IPv4, 3DES/NULL + HMAC-MD5/SHA1)

_V1_CONF = {EncAlg.NONE: V1ConfAlgo.NONE, EncAlg.DES_CBC: V1ConfAlgo.DES, EncAlg.TDES_CBC: V1ConfAlgo.TRIPLE_DES}
_V1_INTEGRITY = {AuthAlg.MD5: V1IntegrityAlgo.MD5, AuthAlg.SHA1: V1IntegrityAlgo.SHA}
_FULL_MASK = b"\xff" * 4


def _v1_fields(p: SaParams, ah: SaParams | None = None) -> dict:
    if ipaddress.ip_address(p.dst).version != 4:
        raise ValueError("v1 commands carry IPv4 SAs only; use v2 for IPv6")
    if p.enc_alg not in _V1_CONF or p.auth_alg not in _V1_INTEGRITY:
        raise ValueError("v1 commands support 3DES/DES/NULL encryption with HMAC-MD5/HMAC-SHA1 only; use v2")
    if p.esn:
        raise ValueError("v1 commands have no extended sequence numbers; use v2")
    if p.proto == IpProto.ESP:
        op, conf = V1Operation.ENCRYPT, AlgoInfoV1(int(_V1_CONF[p.enc_alg]), len(p.enc_key))
        key = p.enc_key + p.auth_key
    else:
        op, conf, key = V1Operation.AUTHENTICATE, AlgoInfoV1(), p.auth_key
    sa = SaV1(int(op), p.spi, AlgoInfoV1(int(_V1_INTEGRITY[p.auth_alg]), len(p.auth_key)), conf)
    second = SaV1()
    if ah is not None:
        # seed 001: SecAssoc[0] ESP then SecAssoc[1] AH; KeyMat per entry, confidentiality then integrity
        _check_bundle(p, ah)
        if ah.auth_alg not in _V1_INTEGRITY:
            raise ValueError("v1 commands support HMAC-MD5/HMAC-SHA1 only; use v2")
        second = SaV1(int(V1Operation.AUTHENTICATE), ah.spi,
                      AlgoInfoV1(int(_V1_INTEGRITY[ah.auth_alg]), len(ah.auth_key)), AlgoInfoV1())
        key += ah.auth_key
    if p.mode == Mode.TUNNEL:
        addrs = dict(src_addr=ndis.addr4(p.inner_src), src_mask=_FULL_MASK if p.inner_src else bytes(4),
                     dest_addr=ndis.addr4(p.inner_dst), dest_mask=_FULL_MASK if p.inner_dst else bytes(4),
                     src_tunnel_addr=ndis.addr4(p.src), dest_tunnel_addr=ndis.addr4(p.dst))
    else:
        addrs = dict(src_addr=ndis.addr4(p.src), src_mask=_FULL_MASK, dest_addr=ndis.addr4(p.dst),
                     dest_mask=_FULL_MASK, src_tunnel_addr=bytes(4), dest_tunnel_addr=bytes(4))
    flags = V1SaFlags.INBOUND if p.direction == Direction.INBOUND else V1SaFlags.OUTBOUND
    return dict(**addrs, protocol=p.sel_proto, src_port=p.sel_sport, dest_port=p.sel_dport, flags=int(flags),
                num_sas=1 if ah is None else 2, sec_assoc=(sa, second, SaV1()), key_len=len(key), key_mat=key)


def v1_add_sa(p: SaParams, ah: SaParams | None = None) -> bytes:
    validate_sa(p)
    if p.encap is not None:
        raise ValueError("UDP-encapsulated SA: use V1_ADD_UDPESP_SA")
    return ndis.V1AddSa(**_v1_fields(p, ah)).pack()


def v1_add_udpesp_sa(p: SaParams, parser_entry: int = 0) -> bytes:
    validate_sa(p)
    if p.encap is None:
        raise ValueError("V1_ADD_UDPESP_SA needs a UDP-encapsulated SA (--encap)")
    fields = _v1_fields(p)
    key_len, key_mat = fields.pop("key_len"), fields.pop("key_mat")
    return ndis.V1AddUdpEspSa(**fields, udp_encap_type=int(ndis.UdpEncapType.OTHER),
                              dst_encap_port=p.encap.dport, encap_type_entry_offld_handle=parser_entry,
                              key_len=key_len, key_mat=key_mat).pack()


# ---------------------------------------------------------------------------------------------
# Decoders: command payloads -> SaParams (the firmware's side of the same formats)

_ENC_BY_ID = {int(a): a for a in EncAlg}
_AUTH_BY_ID = {int(a): a for a in AuthAlg if a}
_ENC_OF_V1 = {v1: alg for alg, v1 in _V1_CONF.items()}
_AUTH_OF_V1 = {V1IntegrityAlgo.NONE: AuthAlg.NONE, **{v1: alg for alg, v1 in _V1_INTEGRITY.items()}}
HMAC_96 = 12  # HMAC-MD5-96 / HMAC-SHA1-96 ICV bytes (RFC 2403/2404)



def _v1_host(addr: bytes, mask: bytes) -> str:
    """The endpoint a v1 transport filter address names: the address for a full or zero ("not used",
    seed 000) mask, the wildcard for a subnet."""
    if mask not in (_FULL_MASK, bytes(4)):
        return "0.0.0.0"
    return ndis.addr_text(addr, False) or "0.0.0.0"


def decode_v1(req: ndis.V1AddSa | ndis.V1AddUdpEspSa, key_mat: bytes) -> list[SaParams]:
    """The SAs of a V1_ADD_SA / V1_ADD_UDPESP_SA request (raises SaInvalid)."""
    flags = req.flags
    if flags not in (V1SaFlags.INBOUND, V1SaFlags.OUTBOUND):
        raise SaInvalid(RejectReason.BAD_PARAMETER, f"flags {flags:#x}: exactly one of inbound/outbound")
    direction = Direction.INBOUND if flags == V1SaFlags.INBOUND else Direction.OUTBOUND
    if req.num_sas not in (1, 2):
        raise SaInvalid(RejectReason.BAD_BUNDLE, f"num_sas {req.num_sas}: must be 1 or 2")
    tunnel = any(req.src_tunnel_addr) or any(req.dest_tunnel_addr)
    if tunnel:
        src = ndis.addr_text(req.src_tunnel_addr, False) or "0.0.0.0"
        dst = ndis.addr_text(req.dest_tunnel_addr, False) or "0.0.0.0"
    else:
        # A transport SA whose filter names a subnet (mask neither zero nor full) has no single endpoint:
        # it is filed under the wildcard address and the filter decides (datasheet §12.1)
        src = _v1_host(req.src_addr, req.src_mask)
        dst = _v1_host(req.dest_addr, req.dest_mask)
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
            raise SaInvalid(RejectReason.BAD_KEY, f"sec_assoc[{i}]: keys run past key_len {len(key_mat)}")
        if sa.operation == V1Operation.ENCRYPT:
            proto = IpProto.ESP
            if conf.algo_identifier not in _ENC_OF_V1:
                raise SaInvalid(RejectReason.UNSUPPORTED_ALGORITHM,
                                  f"sec_assoc[{i}]: confidentiality algorithm {conf.algo_identifier}")
            enc = _ENC_OF_V1[V1ConfAlgo(conf.algo_identifier)]
        elif sa.operation == V1Operation.AUTHENTICATE:
            proto = IpProto.AH
            if conf.algo_identifier or conf.algo_keylen:
                raise SaInvalid(RejectReason.BAD_BUNDLE, f"sec_assoc[{i}]: AH with a confidentiality algorithm")
            enc = EncAlg.NONE
        else:
            raise SaInvalid(RejectReason.BAD_BUNDLE, f"sec_assoc[{i}]: operation {sa.operation}")
        if integ.algo_identifier not in _AUTH_OF_V1:
            raise SaInvalid(RejectReason.UNSUPPORTED_ALGORITHM,
                              f"sec_assoc[{i}]: integrity algorithm {integ.algo_identifier}")
        auth = _AUTH_OF_V1[V1IntegrityAlgo(integ.algo_identifier)]
        out.append(SaParams(
            spi=sa.spi, proto=proto, direction=direction, mode=Mode.TUNNEL if tunnel else Mode.TRANSPORT,
            src=src, dst=dst, enc_alg=enc, enc_key=bytes(conf_key), auth_alg=auth, auth_key=bytes(integ_key),
            icv_len=HMAC_96, replay_window=0, inner_src=inner_src, inner_dst=inner_dst,
        ))
    if pos != len(key_mat):
        raise SaInvalid(RejectReason.BAD_KEY, f"key_len {len(key_mat)} but the algorithms use {pos} bytes")
    return out

def decode_v2(req: ndis.V2AddSa | ndis.V2AddSaEx | ndis.AddSaPacket, key: bytes, *, udp_esp_offered: int = 0xF,
              packet: ndis.AddSaPacket | None = None) -> list[SaParams]:
    """The SAs of one V2_ADD_SA entry, V2_ADD_SA_EX or (with ``packet``) ADD_SA_PACKET request (raises
    SaInvalid). ``udp_esp_offered``: the UdpEspEncapsulation kinds the card offers."""
    flags = req.flags
    if flags & ~(V2AddFlags.INBOUND | V2AddFlags.IPV6):
        raise SaInvalid(RejectReason.BAD_PARAMETER, f"unknown flags {flags:#x}")
    ipv6 = bool(flags & V2AddFlags.IPV6)
    direction = Direction.INBOUND if flags & V2AddFlags.INBOUND else Direction.OUTBOUND
    if not ipv6 and (any(req.src_addr[4:]) or any(req.dest_addr[4:])):
        raise SaInvalid(RejectReason.BAD_ADDRESS, "IPv4 address with non-zero bytes 4..15")
    any_addr = "::" if ipv6 else "0.0.0.0"
    src = ndis.addr_text(req.src_addr, ipv6) or any_addr
    dst = ndis.addr_text(req.dest_addr, ipv6) or any_addr
    if req.num_ext_hdrs not in (1, 2):
        raise SaInvalid(RejectReason.BAD_BUNDLE, f"num_ext_hdrs {req.num_ext_hdrs}: must be 1 or 2")
    encap_flags = req.udp_esp_encapsulation
    if encap_flags & ~0xF:
        raise SaInvalid(RejectReason.BAD_ENCAPSULATION, f"udp_esp_encapsulation {encap_flags:#x}")
    if encap_flags & ~udp_esp_offered:
        raise SaInvalid(RejectReason.UNSUPPORTED_FEATURE,
                          f"udp_esp_encapsulation {encap_flags:#x} not offered by this card")
    mode = Mode.TUNNEL if encap_flags & (UdpEspEncapsulation.TUNNEL | UdpEspEncapsulation.TRANSPORT_OVER_TUNNEL) \
        else Mode.TRANSPORT
    encap = UdpEncap(NAT_T_PORT, NAT_T_PORT) if encap_flags else None
    extra: dict = {"replay_window": 0}
    if packet is not None:
        if packet.mode not in (0, 1):
            raise SaInvalid(RejectReason.BAD_PARAMETER, f"mode {packet.mode}")
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
                raise SaInvalid(RejectReason.BAD_ADDRESS, "selector prefix longer than the address")
            if packet.sel_src_prefix == bits:
                extra["inner_src"] = ndis.addr_text(packet.sel_src, sel_v6)
            if packet.sel_dst_prefix == bits:
                extra["inner_dst"] = ndis.addr_text(packet.sel_dst, sel_v6)
    out = []
    for i, sa in enumerate(req.sec_assoc[: req.num_ext_hdrs]):
        esn = bool(sa.flags & V2SaFlags.ESN_SA)
        if sa.flags & ~V2SaFlags.ESN_SA:
            raise SaInvalid(RejectReason.BAD_PARAMETER, f"sec_assoc[{i}]: unknown flags {sa.flags:#x}")
        auth_info, enc_info = sa.authentication_algorithm, sa.encryption_algorithm
        icv = 16
        if sa.operation == V2Operation.ESP:
            proto = IpProto.ESP
            enc = _ENC_BY_ID.get(enc_info.identifier)
            if enc is None:
                raise SaInvalid(RejectReason.UNSUPPORTED_ALGORITHM,
                                  f"sec_assoc[{i}]: encryption identifier {enc_info.identifier:#x}")
            enc_key = _key_slice(key, enc_info, i, "encryption")
            if enc in _GCM:
                # combined mode: NDIS says only EncryptionAlgorithm is used
                if auth_info.identifier or auth_info.key_length:
                    raise SaInvalid(RejectReason.BAD_PARAMETER,
                                      f"sec_assoc[{i}]: AES-GCM must leave authentication_algorithm zero")
                auth, auth_key = AuthAlg.NONE, b""
                icv = enc_info.additional_info or 16
            else:
                auth, auth_key = _v2_auth(key, auth_info, i)
                if auth in (AuthAlg.MD5, AuthAlg.SHA1):
                    icv = HMAC_96
        elif sa.operation == V2Operation.AH:
            proto = IpProto.AH
            if any((enc_info.identifier, enc_info.key_length)):
                raise SaInvalid(RejectReason.BAD_BUNDLE, f"sec_assoc[{i}]: AH with an encryption algorithm")
            enc, enc_key = EncAlg.NONE, b""
            auth, auth_key = _v2_auth(key, auth_info, i)
            if auth in (AuthAlg.MD5, AuthAlg.SHA1):
                icv = HMAC_96
        else:
            raise SaInvalid(RejectReason.BAD_BUNDLE, f"sec_assoc[{i}]: operation {sa.operation}")
        p_extra = dict(extra)
        if esn and packet is None:
            p_extra["seq"] = sa.sequence_number_high_order << 32
        out.append(SaParams(
            spi=sa.spi, proto=proto, direction=direction, mode=mode, src=src, dst=dst, enc_alg=enc,
            enc_key=enc_key, auth_alg=auth, auth_key=auth_key, icv_len=icv, esn=esn,
            encap=encap if proto == IpProto.ESP else None, **p_extra,
        ))
    return out

def _v2_auth(key: bytes, info: ndis.AlgoInfoV2, i: int) -> tuple[AuthAlg, bytes]:
    if info.identifier == AuthAlg.NONE:
        if info.key_length:
            raise SaInvalid(RejectReason.BAD_KEY, f"sec_assoc[{i}]: key for authentication NONE")
        return AuthAlg.NONE, b""
    auth = _AUTH_BY_ID.get(info.identifier)
    if auth is None:
        raise SaInvalid(RejectReason.UNSUPPORTED_ALGORITHM,
                          f"sec_assoc[{i}]: authentication identifier {info.identifier:#x}")
    return auth, _key_slice(key, info, i, "authentication")



def _key_slice(key: bytes, info: ndis.AlgoInfoV2, i: int, what: str) -> bytes:
    start, length = info.key_offset_bytes, info.key_length
    if start + length > len(key):
        raise SaInvalid(RejectReason.BAD_KEY,
                        f"sec_assoc[{i}]: {what} key {start}+{length} outside the {len(key)}-byte key buffer")
    return bytes(key[start : start + length])
