"""SaParams -> admin-command payloads (firmware_model/ndis.py formats), and firmware status -> message.

Pure functions (no device access), so the encodings are unit-tested against the firmware's own decoder.
Which command carries an SA:

* crypto offload (the NDIS contract): ``V2_ADD_SA_EX`` - one bundle, algorithms + keys + ESN high half;
  the host numbers and frames packets itself. ``V1_ADD_SA`` / ``V1_ADD_UDPESP_SA`` remain available for
  the v1 algorithms (3DES / NULL with HMAC-MD5/SHA1, IPv4 only).
* packet offload (beyond NDIS): ``ADD_SA_PACKET`` - the card numbers, pads, encapsulates and checks replay.

Key layout in the key buffer: encryption key first, then integrity key (offsets are explicit anyway).
AES-GCM and AES-GMAC keys include their 4-byte salt at the end (ndis.py decision 4).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from firmware_model import ndis
from firmware_model.ndis import (
    AlgoInfoV1,
    AlgoInfoV2,
    SaV1,
    SaV2,
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
from firmware_model.status import NdisStatus

NAT_T_PORT = 4500  # RFC 3948 §2: the only UDP-ESP port NDIS offloads
_GCM = (EncAlg.AES_GCM_128, EncAlg.AES_GCM_192, EncAlg.AES_GCM_256)

# What each firmware status means for a user, and what to check.
STATUS_HELP: dict[int, str] = {
    NdisStatus.SUCCESS: "success",
    NdisStatus.NOT_ACCEPTED: "firmware is resetting: retry after the card reports READY",
    NdisStatus.FAILURE: "the firmware refused the command (see 'stats' reject counters for the reason)",
    NdisStatus.INVALID_PARAMETER: "invalid parameter: unknown or stale SA handle, wrong SPI/operation, "
    "or a field the card does not accept",
    NdisStatus.RESOURCES: "SA table full: delete SAs first ('sa list', 'sa del')",
    NdisStatus.NOT_SUPPORTED: "not supported by this card: check 'caps' (algorithms, ESN, UDP-ESP, IPv6, tunnel)",
    NdisStatus.REQUEST_ABORTED: "command aborted (card reset while it ran)",
    NdisStatus.INVALID_LENGTH: "payload length does not match the command layout (driver/firmware version "
    "mismatch?)",
    NdisStatus.INVALID_DATA: "a field holds an impossible value (bad key length, algorithm, address or flags)",
    NdisStatus.BUFFER_TOO_SHORT: "response buffer too short",
    NdisStatus.INVALID_OID: "unknown command opcode (firmware too old for this tool?)",
}


def status_name(status: int) -> str:
    try:
        return NdisStatus(status).name
    except ValueError:
        return f"{status:#010x}"


def status_message(status: int) -> str:
    return f"{status_name(status)}: {STATUS_HELP.get(status, 'unknown NDIS status')}"


# ---------------------------------------------------------------------------------------------
# v2 (crypto offload) and packet offload


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


def _v2_common(p: SaParams, *, allow_any_port: bool) -> dict:
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
    sa = SaV2(
        flags=int(V2SaFlags.ESN_SA) if p.esn else 0,
        operation=int(V2Operation.ESP if p.proto == IpProto.ESP else V2Operation.AH),
        spi=p.spi,
        authentication_algorithm=keys.auth,
        encryption_algorithm=keys.enc,
        sequence_number_high_order=(p.seq >> 32) if p.esn else 0,
    )
    return dict(num_ext_hdrs=1, flags=int(flags), src_addr=ndis.addr16(p.src), dest_addr=ndis.addr16(p.dst),
                udp_esp_encapsulation=int(encap), sec_assoc=(sa, SaV2()), key_length=len(keys.data),
                key_offset=0, key_data=keys.data)


def v2_add_sa_ex(p: SaParams) -> bytes:
    """V2_ADD_SA_EX request for a crypto-offload SA."""
    p.validate()
    fields = _v2_common(p, allow_any_port=False)
    fields["key_offset"] = ndis.V2_ADD_SA_EX.size
    return ndis.V2AddSaEx(**fields).pack()


def add_sa_packet(p: SaParams) -> bytes:
    """ADD_SA_PACKET request for a packet-offload SA (ESP only)."""
    p.validate()
    if p.proto != IpProto.ESP:
        raise ValueError("packet offload takes ESP SAs only")
    fields = _v2_common(p, allow_any_port=True)
    fields["key_offset"] = ndis.ADD_SA_PACKET.size
    encap = p.encap or UdpEncap(0, 0)
    sel: dict = {}
    if p.inner_src or p.inner_dst:
        inner = [ipaddress.ip_address(a) for a in (p.inner_src, p.inner_dst) if a]
        v6 = inner[0].version == 6
        bits = 128 if v6 else 32
        sel = dict(
            sel_src=ndis.addr16(p.inner_src), sel_dst=ndis.addr16(p.inner_dst),
            sel_src_prefix=bits if p.inner_src else 0, sel_dst_prefix=bits if p.inner_dst else 0,
            sel_flags=ndis.SEL_PRESENT | (ndis.SEL_IPV6 if v6 else 0),
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


def _v1_fields(p: SaParams) -> dict:
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
    if p.mode == Mode.TUNNEL:
        addrs = dict(src_addr=ndis.addr4(p.inner_src), src_mask=_FULL_MASK if p.inner_src else bytes(4),
                     dest_addr=ndis.addr4(p.inner_dst), dest_mask=_FULL_MASK if p.inner_dst else bytes(4),
                     src_tunnel_addr=ndis.addr4(p.src), dest_tunnel_addr=ndis.addr4(p.dst))
    else:
        addrs = dict(src_addr=ndis.addr4(p.src), src_mask=_FULL_MASK, dest_addr=ndis.addr4(p.dst),
                     dest_mask=_FULL_MASK, src_tunnel_addr=bytes(4), dest_tunnel_addr=bytes(4))
    flags = V1SaFlags.INBOUND if p.direction == Direction.INBOUND else V1SaFlags.OUTBOUND
    return dict(**addrs, protocol=0, src_port=0, dest_port=0, flags=int(flags), num_sas=1,
                sec_assoc=(sa, SaV1(), SaV1()), key_len=len(key), key_mat=key)


def v1_add_sa(p: SaParams) -> bytes:
    p.validate()
    if p.encap is not None:
        raise ValueError("UDP-encapsulated SA: use V1_ADD_UDPESP_SA")
    return ndis.V1AddSa(**_v1_fields(p)).pack()


def v1_add_udpesp_sa(p: SaParams, parser_entry: int = 0) -> bytes:
    p.validate()
    if p.encap is None:
        raise ValueError("V1_ADD_UDPESP_SA needs a UDP-encapsulated SA (--encap)")
    fields = _v1_fields(p)
    key_len, key_mat = fields.pop("key_len"), fields.pop("key_mat")
    return ndis.V1AddUdpEspSa(**fields, udp_encap_type=int(ndis.UdpEncapType.OTHER),
                              dst_encap_port=p.encap.dport, encap_type_entry_offld_handle=parser_entry,
                              key_len=key_len, key_mat=key_mat).pack()


def esp_geometry(p: SaParams):
    """IV/ICV/alignment facts the host needs to frame crypto-offload ESP for ``p``."""
    from firmware_model.algorithms import AUTH_INFO, ENC_INFO, effective_icv_len  # imports cryptography
    from firmware_model.esp import esp_align
    from guest_tools.packets import EspGeometry

    if p.proto != IpProto.ESP:
        raise ValueError("the host ESP framing applies to ESP SAs only")
    enc = ENC_INFO[p.enc_alg]
    iv = enc.iv_len
    if p.enc_alg == EncAlg.NONE and AUTH_INFO[p.auth_alg].kind == "gmac":
        iv = 8  # ENCR_NULL_AUTH_AES_GMAC carries an 8-byte IV (RFC 4543 §3.1); NULL + HMAC has none
    encap = (p.encap.sport, p.encap.dport) if p.encap is not None else None
    return EspGeometry(p.spi, iv, effective_icv_len(p), esp_align(enc.block), p.mode == Mode.TUNNEL, encap, p.src, p.dst)
