"""Receive-side policy: v1 filters, tunnel inner selectors (RFC 4301 §5.2), NAT-T transport checksums
(RFC 3948 §3.1.2), hard-only lifetimes and the reasons of a partly refused V2_ADD_SA list.

Frames are built and checked by scapy (the independent oracle); the card is driven through its admin
commands as a driver would."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from device.contract import ndis
from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.ndis import NdisStatus, Opcode, RejectReason
from device.contract.sa import SaParams, UdpEncap, add_sa_packet, v2_add_sa_ex
from device.contract.status import CryptoStatus
from firmware_model.capabilities import Capabilities, ProfileError
from firmware_model.firmware import Firmware
from firmware_model.traffic import TxOutcome
from firmware_model.traffic_filter import TrafficFilter, view_ip

from .fw_builders import v2_entry

AUTH_KEY = bytes(range(100, 120))
OK = NdisStatus.SUCCESS
PEER, ME = "10.0.0.5", "10.0.0.1"


def _v1(spi: int, *, src="10.0.0.0", smask="255.255.255.0", dst=ME, dmask="255.255.255.255", proto=17,
        sport=0, dport=5000, tsrc="0.0.0.0", tdst="0.0.0.0", udpesp: bool = False) -> bytes:
    """An inbound v1 ESP (NULL + HMAC-SHA1-96) SA with the given filter."""
    sa = ndis.SaV1(ndis.V1Operation.ENCRYPT, spi, ndis.AlgoInfoV1(ndis.V1IntegrityAlgo.SHA, len(AUTH_KEY)),
                   ndis.AlgoInfoV1(ndis.V1ConfAlgo.NONE, 0))
    a4 = ndis.addr4
    filt = (a4(src), a4(smask), a4(dst), a4(dmask), proto, sport, dport, a4(tsrc), a4(tdst),
            ndis.V1SaFlags.INBOUND, 1, (sa, ndis.SaV1(), ndis.SaV1()))
    if udpesp:
        return ndis.V1AddUdpEspSa(*filt, ndis.UdpEncapType.OTHER, 4500, 0, len(AUTH_KEY), AUTH_KEY).pack()
    return ndis.V1AddSa(*filt, len(AUTH_KEY), AUTH_KEY).pack()


def _sender(spi: int, **kw) -> SecurityAssociation:
    return SecurityAssociation(ESP, spi=spi, crypt_algo="NULL", auth_algo="HMAC-SHA1-96", auth_key=AUTH_KEY, **kw)


def _frame(sa: SecurityAssociation, pkt, seq: int = 1) -> bytes:
    return bytes(Ether() / sa.encrypt(pkt, seq_num=seq))


def _fw(*requests: tuple[int, bytes]) -> Firmware:
    fw = Firmware(Capabilities())
    for opcode, req in requests:
        assert fw.execute(opcode, req)[0] == OK, fw.last_error
    return fw


def _outside(fw: Firmware, frame: bytes) -> None:
    """Indicated as if no SA applied: no CryptoDone, no handle, the bytes exactly as received."""
    rx = fw.receive(frame)
    assert (rx.crypto_done, rx.handle, rx.policy_mismatch) == (False, 0, True)
    assert rx.frame == frame


# ---- v1 filters (seed 000/001) -------------------------------------------------------------------

def test_v1_transport_filter_decides_which_authentic_packets_succeed():
    fw = _fw((Opcode.V1_ADD_SA, _v1(0x100)))
    tx = _sender(0x100)
    good = _frame(tx, IP(src=PEER, dst=ME) / UDP(sport=1, dport=5000) / Raw(b"in"), 1)
    rx = fw.receive(good)
    assert rx.crypto_done and rx.crypto_status == CryptoStatus.SUCCESS and rx.handle
    _outside(fw, _frame(tx, IP(src="10.0.1.5", dst=ME) / UDP(sport=1, dport=5000) / Raw(b"src"), 2))
    _outside(fw, _frame(tx, IP(src=PEER, dst=ME) / TCP(sport=1, dport=5000) / Raw(b"tcp"), 3))
    _outside(fw, _frame(tx, IP(src=PEER, dst=ME) / UDP(sport=1, dport=6000) / Raw(b"port"), 4))
    assert fw.stats().rx_policy_unprocessed == 3
    # a forged packet stays an ICV failure whatever it claims to carry (ICV first, RFC 4303 §3.4.4)
    forged = bytearray(_frame(tx, IP(src=PEER, dst=ME) / UDP(sport=1, dport=6000) / Raw(b"forged"), 5))
    forged[-1] ^= 1
    rx = fw.receive(bytes(forged))
    assert rx.crypto_done and rx.crypto_status == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED
    assert fw.stats().rx_policy_unprocessed == 3


def test_v1_zero_fields_are_not_used_and_zero_mask_means_exact_host():
    fw = _fw((Opcode.V1_ADD_SA, _v1(0x101, src="0.0.0.0", smask="0.0.0.0", dst="0.0.0.0", dmask="0.0.0.0",
                                    proto=0, dport=0)))
    tx = _sender(0x101)
    for seq, pkt in enumerate((IP(src="1.2.3.4", dst=ME) / TCP(dport=80), IP(src=PEER, dst=ME) / UDP(dport=9)), 1):
        assert fw.receive(_frame(tx, pkt, seq)).crypto_status == CryptoStatus.SUCCESS
    assert fw.stats().rx_policy_unprocessed == 0
    # a host address with a zero mask: the mask is "not used", the address is -> that host only
    fw = _fw((Opcode.V1_ADD_SA, _v1(0x102, src=PEER, smask="0.0.0.0", proto=0, dport=0)))
    tx = _sender(0x102)
    assert fw.receive(_frame(tx, IP(src=PEER, dst=ME) / UDP(dport=9), 1)).crypto_status == CryptoStatus.SUCCESS
    _outside(fw, _frame(tx, IP(src="10.0.0.6", dst=ME) / UDP(dport=9), 2))


def test_v1_subnet_destination_is_filed_under_the_wildcard_and_filtered():
    fw = _fw((Opcode.V1_ADD_SA, _v1(0x103, dst="10.0.0.0", dmask="255.255.255.0", proto=0, dport=0)))
    tx = _sender(0x103)
    assert fw.receive(_frame(tx, IP(src=PEER, dst="10.0.0.9") / UDP(), 1)).crypto_status == CryptoStatus.SUCCESS
    _outside(fw, _frame(tx, IP(src=PEER, dst="10.9.0.9") / UDP(), 2))


def test_v1_udpesp_protocol_17_names_the_encapsulation_not_the_inner_protocol():
    fw = _fw((Opcode.V1_ADD_UDPESP_SA, _v1(0x104, proto=17, dport=0, udpesp=True)))
    tx = _sender(0x104, nat_t_header=UDP(sport=4500, dport=4500))
    rx = fw.receive(_frame(tx, IP(src=PEER, dst=ME) / TCP(sport=7, dport=80) / Raw(b"tcp in udp-esp")))
    assert rx.crypto_status == CryptoStatus.SUCCESS and rx.crypto_done
    # transport UDP-ESP whose ICV verified: the inner checksum needs no check (RFC 3948 §3.1.2, option 3)
    assert rx.l4_csum_ok and fw.stats().rx_l4_csum_ok == 1


def test_v1_tunnel_filter_is_the_inner_connection():
    fw = _fw((Opcode.V1_ADD_SA, _v1(0x105, src="192.168.2.1", smask="255.255.255.255", dst="192.168.1.1",
                                    proto=0, dport=0, tsrc="10.0.0.2", tdst=ME)))
    tx = _sender(0x105, tunnel_header=IP(src="10.0.0.2", dst=ME))
    rx = fw.receive(_frame(tx, IP(src="192.168.2.1", dst="192.168.1.1") / UDP() / Raw(b"legit"), 1))
    assert rx.crypto_status == CryptoStatus.SUCCESS and not rx.l4_csum_ok  # tunnel: checksums stay the host's
    _outside(fw, _frame(tx, IP(src="192.168.9.9", dst="192.168.1.1") / UDP() / Raw(b"spoofed"), 2))


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 2**32 - 1))
def test_v1_address_match_equals_ipaddress(net: int, mask_seed: int, prefix: int, addr: int) -> None:
    mask = int(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
    req = ndis.V1AddSa(net.to_bytes(4, "big"), mask.to_bytes(4, "big"), bytes(4), bytes(4), 0, 0, 0)
    flt = TrafficFilter.from_v1(req, udpesp=False)
    if net == 0:
        expected = True  # a zero address is not used
    elif mask == 0:
        expected = addr == net  # mask not used: exact host
    else:
        expected = ipaddress.IPv4Address(addr) in ipaddress.IPv4Network((net & mask, prefix))
    assert flt.matches_addrs(addr, 0) == expected


# ---- packet offload: inner selector after decapsulation (RFC 4301 §5.2) ----------------------------

GCM = bytes(range(16)) + b"salt"


def _tunnel_in(spi: int, **kw) -> SaParams:
    return SaParams(spi=spi, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TUNNEL, src="10.0.0.2",
                    dst=ME, enc_alg=EncAlg.AES_GCM_128, enc_key=GCM, icv_len=16, **kw)


def test_packet_offload_drops_a_spoofed_inner_source_and_counts_it():
    fw = _fw((Opcode.ADD_SA_PACKET, add_sa_packet(_tunnel_in(0x200, inner_src="192.168.2.1",
                                                             inner_dst="192.168.1.1"))))
    tx = SecurityAssociation(ESP, spi=0x200, crypt_algo="AES-GCM", crypt_key=GCM,
                             tunnel_header=IP(src="10.0.0.2", dst=ME))
    spoofed = fw.receive(_frame(tx, IP(src="192.168.9.9", dst="192.168.1.1") / UDP() / Raw(b"spoof"), 1))
    assert spoofed.policy_drop and not spoofed.decapsulated
    assert fw.stats().rx_policy_drops == 1
    legit = fw.receive(_frame(tx, IP(src="192.168.2.1", dst="192.168.1.1") / UDP() / Raw(b"ok"), 2))
    assert legit.decapsulated and legit.crypto_status == CryptoStatus.SUCCESS and not legit.policy_drop
    assert bytes(IP(legit.frame[14:])[Raw].load) == b"ok"
    # without a selector the same spoofed packet is delivered: the drop above is the selector's doing
    fw = _fw((Opcode.ADD_SA_PACKET, add_sa_packet(_tunnel_in(0x200))))
    assert fw.receive(_frame(tx, IP(src="192.168.9.9", dst="192.168.1.1") / UDP(), 3)).decapsulated


# ---- NAT-T transport mode (RFC 3948 §3.1.2) -------------------------------------------------------

def _natt_in(spi: int) -> SaParams:
    return SaParams(spi=spi, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT,
                    src="10.0.0.2", dst=ME, enc_alg=EncAlg.AES_GCM_128, enc_key=GCM, icv_len=16,
                    encap=UdpEncap(4500, 4500))


def _natted(sa: SecurityAssociation, inner, seq: int) -> bytes:
    """The peer (10.0.0.3) protects ``inner``; a NAT on the way rewrites the outer source to 10.0.0.2
    and leaves the ESP payload alone."""
    esp = sa.encrypt(inner, seq_num=seq)
    esp[IP].src = "10.0.0.2"
    del esp[IP].chksum
    return bytes(Ether() / esp)


def _checksum_verifies(ip_bytes: bytes, layer) -> tuple[int, int]:
    """(the checksum delivered, the one scapy computes for the delivered addresses)."""
    got = IP(ip_bytes)
    delivered = got[layer].chksum
    del got[layer].chksum
    return delivered, IP(bytes(got))[layer].chksum


def test_natt_transport_packet_offload_recomputes_the_inner_checksum():
    fw = _fw((Opcode.ADD_SA_PACKET, add_sa_packet(_natt_in(0x300))))
    tx = SecurityAssociation(ESP, spi=0x300, crypt_algo="AES-GCM", crypt_key=GCM,
                             nat_t_header=UDP(sport=4500, dport=4500))
    for seq, (inner, layer) in enumerate((
            (IP(src="10.0.0.3", dst=ME) / UDP(sport=53, dport=5000) / Raw(b"udp through NAT"), UDP),
            (IP(src="10.0.0.3", dst=ME) / TCP(sport=80, dport=5001, flags="PA") / Raw(b"tcp through NAT"), TCP)), 1):
        sent = IP(bytes(inner))[layer].chksum
        frame = _natted(tx, inner, seq)
        rx = fw.receive(frame)
        assert rx.decapsulated and rx.l4_csum_ok
        delivered, expected = _checksum_verifies(rx.frame[14:], layer)
        assert delivered == expected != sent  # fixed for 10.0.0.2; the sender's was for 10.0.0.3
    # RFC 768: a UDP/IPv4 checksum of zero means "none" and is left so
    zero = IP(src="10.0.0.3", dst=ME) / UDP(sport=53, dport=5000, chksum=0) / Raw(b"no checksum")
    rx = fw.receive(_natted(tx, zero, 3))
    assert IP(rx.frame[14:])[UDP].chksum == 0
    assert fw.stats().rx_l4_csum_ok == 3


def test_natt_crypto_offload_flags_transport_udp_esp_only():
    inbound = SaParams(spi=0x301, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT,
                       src="10.0.0.2", dst=ME, enc_alg=EncAlg.AES_GCM_128, enc_key=GCM, icv_len=16,
                       encap=UdpEncap(4500, 4500))
    fw = _fw((Opcode.V2_ADD_SA_EX, v2_add_sa_ex(inbound)))
    tx = SecurityAssociation(ESP, spi=0x301, crypt_algo="AES-GCM", crypt_key=GCM,
                             nat_t_header=UDP(sport=4500, dport=4500))
    frame = _natted(tx, IP(src="10.0.0.3", dst=ME) / UDP(sport=1, dport=2) / Raw(b"x" * 20), 1)
    rx = fw.receive(frame)
    assert rx.crypto_status == CryptoStatus.SUCCESS and rx.l4_csum_ok
    # the host strips ESP itself: the card changes no byte of the payload
    assert view_ip(rx.frame, 14) is not None and rx.frame[:34] == frame[:34]


# ---- lifetimes: hard-only still asks for the delete (RFC 4301 §4.4.2.1) ----------------------------

def test_hard_only_lifetime_raises_sa_delete_req_on_the_last_packet_and_after():
    out = SaParams(spi=0x400, proto=IpProto.ESP, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT, src=ME,
                   dst=PEER, enc_alg=EncAlg.AES_GCM_128, enc_key=GCM, icv_len=16, hard_packets=3)
    fw = Firmware(Capabilities())
    handle = fw.add_sa([out], packet_offload=True)
    plain = bytes(Ether() / IP(src=ME, dst=PEER) / UDP() / Raw(b"life"))
    results = [fw.transmit(plain, handle, True) for _ in range(4)]
    assert [r.status for r in results] == [TxOutcome.OK] * 3 + [TxOutcome.HARD_LIMIT]
    assert [r.sa_delete_req for r in results] == [False, False, True, True]
    # receive: the same rule (bytes variant)
    inbound = SaParams(spi=0x401, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT, src=PEER,
                       dst=ME, enc_alg=EncAlg.AES_GCM_128, enc_key=GCM, icv_len=16, hard_bytes=1)
    fw.add_sa([inbound], packet_offload=True)
    tx = SecurityAssociation(ESP, spi=0x401, crypt_algo="AES-GCM", crypt_key=GCM)
    rx = [fw.receive(_frame(tx, IP(src=PEER, dst=ME) / UDP() / Raw(b"b"), seq)) for seq in (1, 2)]
    assert [r.crypto_status for r in rx] == [CryptoStatus.SUCCESS, CryptoStatus.GENERIC_ERROR]
    assert [r.sa_delete_req for r in rx] == [True, True]


# ---- v2 partial success keeps each refusal's reason -----------------------------------------------

def test_v2_add_sa_list_results_carry_status_and_reason():
    fw = Firmware(Capabilities())
    status, resp = fw.execute(Opcode.V2_ADD_SA, ndis.pack_v2_add_sa_list([
        v2_entry(0x500, inbound=True),
        v2_entry(0x501, inbound=True, enc_id=EncAlg.DES_CBC, key=bytes(8)),  # DES is refused
        v2_entry(0x500, inbound=True),  # the first entry's SPI again
    ]))
    assert status == OK  # seed 003: the request succeeds if any SA was offloaded
    results = ndis.unpack_counted(resp, ndis.V2_ADD_SA_RESULT)
    assert results[0].offload_handle and results[0].status == OK
    assert (results[1].offload_handle, results[1].status, results[1].reason) == \
        (0, NdisStatus.NOT_SUPPORTED, RejectReason.UNSUPPORTED_ALGORITHM)
    assert (results[2].offload_handle, results[2].status, results[2].reason) == \
        (0, NdisStatus.INVALID_PARAMETER, RejectReason.DUPLICATE_SPI)


# ---- never advertise what is not implemented --------------------------------------------------------

def test_profile_refuses_udp_esp_transport_over_tunnel_and_lso():
    for section in ({"lso": True}, {"udp_esp": ["transport", "transport-over-tunnel"]},
                    {"udp_esp": ["udp-transport-over-tunnel"]}):
        with pytest.raises(ProfileError, match="refused"):
            Capabilities.from_profile(section)
    wire = Capabilities.from_profile({"lso": False}).to_wire()
    assert (wire.transport_tunnel_combined, wire.lso_supported, wire.udp_esp) == (0, 0, 0x3)
    # plain transport over tunnel is implemented (test_combined.py): a profile may offer it
    assert Capabilities.from_profile({"transport_tunnel_combined": True}).to_wire().transport_tunnel_combined == 1

def test_v1_udpesp_ike_encapsulation_is_refused():
    req = ndis.V1AddUdpEspSa.unpack(_v1(0x700, udpesp=True))
    ike = ndis.V1AddUdpEspSa(**{**req.__dict__, "udp_encap_type": ndis.UdpEncapType.IKE}).pack()
    fw = Firmware(Capabilities())
    assert fw.execute(Opcode.V1_ADD_UDPESP_SA, ike)[0] == NdisStatus.NOT_SUPPORTED
    assert len(fw.sadb) == 0 and fw.stats().reject_unsupported_feature == 1


def test_sa_params_selector_ports_reach_the_card_filters():
    """The encoders the guest tools use carry SaParams.sel_proto/sel_sport/sel_dport into the v1 filter
    and the ADD_SA_PACKET selector."""
    from device.contract.sa import v1_add_sa

    v1 = SaParams(spi=0x800, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT, src=PEER,
                  dst=ME, enc_alg=EncAlg.NONE, auth_alg=AuthAlg.SHA1, auth_key=AUTH_KEY, icv_len=12,
                  replay_window=0, sel_proto=17, sel_dport=5000)
    req = ndis.V1AddSa.unpack(v1_add_sa(v1))
    assert (req.protocol, req.src_port, req.dest_port) == (17, 0, 5000)
    fw = _fw((Opcode.V1_ADD_SA, v1_add_sa(v1)))
    tx = _sender(0x800)
    assert fw.receive(_frame(tx, IP(src=PEER, dst=ME) / UDP(dport=5000), 1)).crypto_status == CryptoStatus.SUCCESS
    _outside(fw, _frame(tx, IP(src=PEER, dst=ME) / UDP(dport=5001), 2))
    packet = SaParams(spi=0x801, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT, src=PEER,
                      dst=ME, enc_alg=EncAlg.AES_GCM_128, enc_key=GCM, icv_len=16, sel_proto=6, sel_dport=443)
    req = ndis.AddSaPacket.unpack(add_sa_packet(packet))
    # a transport SA's protocol/port selector stays between its endpoints (/32), it does not widen to any address
    assert req.sel_flags & ndis.SEL_PRESENT and (req.sel_proto, req.sel_dport, req.sel_src_prefix) == (6, 443, 32)
    assert (req.sel_src[:4], req.sel_dst[:4], req.sel_dst_prefix) == (ndis.addr4(PEER), ndis.addr4(ME), 32)
    fw = _fw((Opcode.ADD_SA_PACKET, add_sa_packet(packet)))
    gcm = SecurityAssociation(ESP, spi=0x801, crypt_algo="AES-GCM", crypt_key=GCM)
    assert fw.receive(_frame(gcm, IP(src=PEER, dst=ME) / TCP(dport=443), 1)).decapsulated
    assert fw.receive(_frame(gcm, IP(src=PEER, dst=ME) / TCP(dport=80), 2)).policy_drop
    with pytest.raises(ValueError, match="ports need protocol"):
        add_sa_packet(replace(packet, sel_proto=0))
