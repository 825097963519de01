"""Transport over tunnel with one UDP-encapsulated layer (RFC 3948), crypto offload. NDIS names two kinds
(UdpEsp flags, datasheet §7.3):

* kind "a", TRANSPORT_OVER_TUNNEL ("transport over UDP-encapsulated tunnel"):
  outer IP | UDP 4500 | ESP (tunnel SA) | inner IP | ESP (transport SA) | payload
* kind "b", UDP_ESP_TRANSPORT_OVER_TUNNEL ("UDP-encapsulated transport over tunnel"):
  outer IP | ESP (tunnel SA) | inner IP | UDP 4500 | ESP (transport SA) | payload

scapy is the oracle. Its SecurityAssociation (``nat_t_header`` for the UDP layer, ``tunnel_header`` for the
tunnel) seals the expected frames with the card's IV rule (AES-GCM IV = the 64-bit sequence number,
datasheet §7.3), so what the card transmits must equal scapy's frame byte for byte; received frames are
scapy's, and what the card leaves in place (both layers plaintext, IVs and ICVs kept) must equal the frame
the host would have built, with those IVs and ICVs, byte for byte. The v1 commands (V1_ADD_SA,
V1_ADD_UDPESP_SA) are used as the two layers too (NULL + HMAC-SHA1-96: the only v1 transforms scapy and
the card both run)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from device.contract import ndis
from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode, UdpEspEncapsulation
from device.contract.ndis import NdisStatus, Opcode, V1UdpEspParseFlags
from device.contract.sa import SaParams, UdpEncap, v1_add_sa, v1_add_udpesp_sa, v2_add_sa_ex
from device.contract.status import CryptoStatus
from firmware_model.capabilities import Capabilities, ProfileError
from firmware_model.firmware import Firmware
from firmware_model.traffic import TxOutcome

CARD_GW, PEER_GW = "10.0.0.1", "10.0.0.2"  # tunnel endpoints
CARD_HOST, PEER_HOST = "192.168.1.1", "192.168.2.1"  # end hosts (the transport SAs)
CARD_GW6, PEER_GW6 = "2001:db8::1", "2001:db8::2"
CARD_HOST6, PEER_HOST6 = "2001:db8:1::1", "2001:db8:2::1"
T_KEY = bytes(range(16, 32)) + b"TRN!"  # transport (inner) SA, AES-GCM-128 key || salt
U_KEY = bytes(range(16)) + b"TUN!"  # tunnel (outer) SA
T_OUT, U_OUT, T_IN, U_IN = 0x1111, 0x2222, 0x3333, 0x4444
PAYLOAD = b"transport over tunnel, one layer in UDP 4500"
KA, KB = UdpEspEncapsulation.TRANSPORT_OVER_TUNNEL, UdpEspEncapsulation.UDP_ESP_TRANSPORT_OVER_TUNNEL
LAYERS = {"a": (False, True), "b": (True, False)}  # kind -> (transport layer in UDP, tunnel layer in UDP)
MAC_CARD, MAC_PEER = "02:00:00:00:00:01", "02:00:00:00:00:02"


def _caps(*kinds: UdpEspEncapsulation, combined: bool = True) -> Capabilities:
    udp = UdpEspEncapsulation.TRANSPORT | UdpEspEncapsulation.TUNNEL
    for k in kinds:
        udp |= k
    return Capabilities(transport_tunnel_combined=combined, udp_esp=udp)


def _addrs(family: int, tunnel: bool, outbound: bool) -> tuple[str, str]:
    if family == 4:
        mine, theirs = (CARD_GW, PEER_GW) if tunnel else (CARD_HOST, PEER_HOST)
    else:
        mine, theirs = (CARD_GW6, PEER_GW6) if tunnel else (CARD_HOST6, PEER_HOST6)
    return (mine, theirs) if outbound else (theirs, mine)


def _params(kind: str, *, outbound: bool, tunnel: bool, family: int = 4) -> SaParams:
    udp = LAYERS[kind][1 if tunnel else 0]
    spi = {(True, False): T_OUT, (True, True): U_OUT, (False, False): T_IN, (False, True): U_IN}[(outbound, tunnel)]
    src, dst = _addrs(family, tunnel, outbound)
    hsrc, hdst = _addrs(family, False, outbound)
    return SaParams(spi=spi, proto=IpProto.ESP, direction=Direction.OUTBOUND if outbound else Direction.INBOUND,
                    mode=Mode.TUNNEL if tunnel else Mode.TRANSPORT, src=src, dst=dst, enc_alg=EncAlg.AES_GCM_128,
                    enc_key=U_KEY if tunnel else T_KEY, icv_len=16, encap=UdpEncap() if udp else None,
                    inner_src=hsrc if tunnel else None, inner_dst=hdst if tunnel else None)


def _card(kind: str, caps: Capabilities | None = None, family: int = 4) -> tuple[Firmware, dict[str, int]]:
    """A card holding the four SAs of ``kind`` (added through V2_ADD_SA_EX, as a driver does)."""
    fw = Firmware(caps or _caps(KA if kind == "a" else KB))
    handles = {}
    for name, outbound, tunnel in (("t_out", True, False), ("u_out", True, True), ("t_in", False, False),
                                   ("u_in", False, True)):
        status, resp = fw.execute(Opcode.V2_ADD_SA_EX, v2_add_sa_ex(_params(kind, outbound=outbound, tunnel=tunnel,
                                                                             family=family)))
        assert status == NdisStatus.SUCCESS, fw.last_error
        handles[name] = ndis.HandleResponse.unpack(resp).offload_handle
    return fw, handles


def _ip(src: str, dst: str, **kw):
    return IP(src=src, dst=dst, **kw) if ":" not in src else IPv6(src=src, dst=dst, **kw)


def _plain(outbound: bool, family: int = 4):
    src, dst = _addrs(family, False, outbound)
    return _ip(src, dst) / UDP(sport=1000, dport=2000) / Raw(PAYLOAD)


def _iv(seq: int) -> bytes:
    return seq.to_bytes(8, "big")  # the card's AES-GCM IV on a fresh SA (datasheet §7.3)


def _scapy_sas(kind: str, outbound: bool, family: int = 4) -> tuple[SecurityAssociation, SecurityAssociation]:
    inner_udp, outer_udp = LAYERS[kind]
    gsrc, gdst = _addrs(family, True, outbound)
    nat_t = UDP(sport=4500, dport=4500)
    inner = SecurityAssociation(ESP, spi=T_OUT if outbound else T_IN, crypt_algo="AES-GCM", crypt_key=T_KEY,
                                nat_t_header=nat_t if inner_udp else None)
    outer = SecurityAssociation(ESP, spi=U_OUT if outbound else U_IN, crypt_algo="AES-GCM", crypt_key=U_KEY,
                                tunnel_header=_ip(gsrc, gdst), nat_t_header=nat_t if outer_udp else None)
    return inner, outer


def _sealed(kind: str, seq: int, outbound: bool, family: int = 4) -> tuple[bytes, bytes]:
    """scapy's (inner IP packet after the transport layer, Ethernet frame after both layers)."""
    inner_sa, outer_sa = _scapy_sas(kind, outbound, family)
    inner = inner_sa.encrypt(_plain(outbound, family), seq_num=seq, iv=_iv(seq))
    outer = outer_sa.encrypt(inner, seq_num=seq, iv=_iv(seq))
    src, dst = (MAC_CARD, MAC_PEER) if outbound else (MAC_PEER, MAC_CARD)
    return bytes(inner), bytes(Ether(src=src, dst=dst) / outer)


def _esp(spi: int, seq: int, body: bytes, nh: int, iv: bytes = bytes(8), icv: bytes = bytes(16)) -> bytes:
    """One ESP layer as a crypto-offload host hands it over (RFC 4303 §2.4 padding to 4 bytes, 1, 2, 3 ...),
    with the IV and ICV given (zero: room for the card)."""
    pad = (-(len(body) + 2)) % 4
    return struct.pack("!II", spi, seq) + iv + body + bytes(range(1, pad + 1)) + bytes([pad, nh]) + icv


def _udp_esp(esp: bytes) -> bytes:
    return struct.pack("!HHHH", 4500, 4500, 8 + len(esp), 0) + esp  # RFC 3948 §2.1: checksum 0


def _host_frame(kind: str, seq: int, outbound: bool, *, ivs: tuple[bytes, bytes] = (bytes(8), bytes(8)),
                icvs: tuple[bytes, bytes] = (bytes(16), bytes(16))) -> bytes:
    """Both layers in the clear, built by hand (IPv4): what the driver posts (zero IV and ICV room), or,
    with the IVs and ICVs of a received frame, what the card must leave in place after checking both."""
    inner_udp, outer_udp = LAYERS[kind]
    hsrc, hdst = _addrs(4, False, outbound)
    gsrc, gdst = _addrs(4, True, outbound)
    transport = bytes(_plain(outbound))[20:]  # UDP header (checksum over the end hosts) + payload
    t_esp = _esp(T_OUT if outbound else T_IN, seq, transport, 17, ivs[0], icvs[0])
    inner_ip = bytes(IP(src=hsrc, dst=hdst, proto=17 if inner_udp else 50)
                     / Raw(_udp_esp(t_esp) if inner_udp else t_esp))
    u_esp = _esp(U_OUT if outbound else U_IN, seq, inner_ip, 4, ivs[1], icvs[1])
    outer_ip = IP(src=gsrc, dst=gdst, proto=17 if outer_udp else 50) / Raw(_udp_esp(u_esp) if outer_udp else u_esp)
    src, dst = (MAC_CARD, MAC_PEER) if outbound else (MAC_PEER, MAC_CARD)
    return bytes(Ether(src=src, dst=dst) / outer_ip)


@pytest.mark.parametrize("kind", ["a", "b"])
def test_transmit_is_byte_exact_against_scapy(kind):
    fw, h = _card(kind)
    for seq in (1, 2, 3):
        tx = fw.transmit(_host_frame(kind, seq, True), h["t_out"], False, tunnel_handle=h["u_out"])
        _, expected = _sealed(kind, seq, True)
        assert tx.status == TxOutcome.OK, tx
        assert tx.frame == expected, f"seq {seq}: card {tx.frame.hex()}\nscapy {expected.hex()}"
    # and scapy opens what the card sent, layer by layer
    inner_sa, outer_sa = _scapy_sas(kind, True)
    wire = Ether(tx.frame)
    assert wire[IP].proto == (17 if kind == "a" else 50)
    inner = outer_sa.decrypt(wire[IP])
    assert inner[IP].src == CARD_HOST and inner[IP].proto == (17 if kind == "b" else 50)
    plain = inner_sa.decrypt(inner)
    assert bytes(plain[UDP].payload) == PAYLOAD
    st = fw.stats()
    assert (st.tx_crypto, st.tx_errors, st.tx_bad_handle) == (3, 0, 0)


@pytest.mark.parametrize("kind", ["a", "b"])
def test_transmit_ipv6_scapy_opens_both_layers_and_the_udp_checksum_is_filled(kind):
    """IPv6: the card writes the UDP checksum of the UDP-encapsulated layer after sealing it (RFC 8200
    §8.1 forbids 0; datasheet §7.3) - the transport one before the tunnel layer seals it."""
    fw, h = _card(kind, family=6)
    inner_sa, outer_sa = _scapy_sas(kind, True, 6)
    # the host's frame: scapy's expected frame with IVs/ICVs zeroed and the ciphertext replaced by hand is
    # what _host_frame does for IPv4; for IPv6 build it from the parts the same way
    transport = bytes(_plain(True, 6))[40:]
    inner_udp, outer_udp = LAYERS[kind]
    t_esp = _esp(T_OUT, 1, transport, 17)
    inner_ip = bytes(IPv6(src=CARD_HOST6, dst=PEER_HOST6, nh=17 if inner_udp else 50)
                     / Raw(_udp_esp(t_esp) if inner_udp else t_esp))
    u_esp = _esp(U_OUT, 1, inner_ip, 41)
    frame = bytes(Ether() / IPv6(src=CARD_GW6, dst=PEER_GW6, nh=17 if outer_udp else 50)
                  / Raw(_udp_esp(u_esp) if outer_udp else u_esp))
    tx = fw.transmit(frame, h["t_out"], False, tunnel_handle=h["u_out"])
    assert tx.status == TxOutcome.OK, tx
    wire = Ether(tx.frame)[IPv6]
    if outer_udp:
        sent = wire[UDP].chksum
        wire[UDP].chksum = None
        assert sent != 0 and sent == IPv6(bytes(wire))[UDP].chksum
        wire = IPv6(tx.frame[14:])
    inner = outer_sa.decrypt(wire)
    if inner_udp:
        sent = inner[UDP].chksum
        again = inner.copy()
        again[UDP].chksum = None
        assert sent != 0 and sent == IPv6(bytes(again))[UDP].chksum
    plain = inner_sa.decrypt(inner)
    assert bytes(plain[UDP].payload) == PAYLOAD and plain[IPv6].src == CARD_HOST6


@pytest.mark.parametrize("kind", ["a", "b"])
def test_receive_is_byte_exact_and_sets_next_crypto_done(kind):
    fw, h = _card(kind)
    for seq in (1, 2):
        inner, wire = _sealed(kind, seq, False)
        rx = fw.receive(wire)
        assert (rx.crypto_done, rx.next_crypto_done, rx.crypto_status) == (True, True, CryptoStatus.SUCCESS), rx
        assert (rx.handle, rx.next_handle) == (h["u_in"], h["t_in"])
        # in place: both layers plaintext, every IV and ICV as received
        outer_iv_at = 14 + 20 + (8 if kind == "a" else 0) + 8
        expected = _host_frame(kind, seq, False, ivs=(_iv(seq), wire[outer_iv_at:outer_iv_at + 8]),
                               icvs=(inner[-16:], wire[-16:]))
        assert rx.frame == expected
        assert (rx.next_header, rx.pad_length) == (4, (-(len(inner) + 2)) % 4)  # HEADER_INFO: the outer ESP
        # RFC 3948 §3.1.2 (datasheet §12.1 row 20): the UDP-encapsulated *transport* layer vouches for the
        # inner UDP checksum; a UDP-encapsulated tunnel does not (its payload is not the end host's)
        assert rx.l4_csum_ok == (kind == "b")
    st = fw.stats()
    assert (st.rx_crypto_done, st.rx_crypto_ok, st.rx_auth_failed, st.rx_no_sa) == (2, 2, 0, 0)
    assert st.rx_l4_csum_ok == (2 if kind == "b" else 0)


def _tamper(frame: bytes, at: int) -> bytes:
    raw = bytearray(frame)
    raw[at] ^= 1
    return bytes(raw)


@pytest.mark.parametrize("kind", ["a", "b"])
def test_receive_failures_per_layer(kind):
    fw, h = _card(kind)
    inner_sa, outer_sa = _scapy_sas(kind, False)
    # the transport layer's ciphertext changed before the tunnel layer sealed it: the tunnel verifies, the
    # transport layer fails -> NEXT_CRYPTO_DONE with the transport status, the frame as received
    inner = inner_sa.encrypt(_plain(False), seq_num=1, iv=_iv(1))
    esp_at = 20 + (8 if kind == "b" else 0)
    bad_inner = inner.__class__(_tamper(bytes(inner), esp_at + 16 + 3))
    wire = bytes(Ether() / outer_sa.encrypt(bad_inner, seq_num=1, iv=_iv(1)))
    rx = fw.receive(wire)
    assert (rx.crypto_done, rx.next_crypto_done, rx.crypto_status) == \
        (True, True, CryptoStatus.TRANSPORT_ESP_AUTH_FAILED)
    assert (rx.handle, rx.next_handle, rx.frame, rx.l4_csum_ok) == (h["u_in"], h["t_in"], wire, False)
    # the tunnel layer fails: one layer checked, nothing said about the inner one. A v2 SA carries no mode
    # (datasheet §12.1 row 9): the UDP-ESP tunnel of kind a was added with UdpEsp TUNNEL and reports
    # TUNNEL_*, the plain tunnel SA of kind b was added with NONE and reports TRANSPORT_*
    _, good = _sealed(kind, 2, False)
    bad_outer = _tamper(good, 14 + 20 + (8 if kind == "a" else 0) + 16 + 3)
    rx = fw.receive(bad_outer)
    outer_failed = CryptoStatus.TUNNEL_ESP_AUTH_FAILED if kind == "a" else CryptoStatus.TRANSPORT_ESP_AUTH_FAILED
    assert (rx.crypto_done, rx.next_crypto_done, rx.crypto_status, rx.next_handle) == \
        (True, False, outer_failed, 0)
    assert rx.frame == bad_outer
    st = fw.stats()
    assert (st.rx_crypto_done, st.rx_auth_failed, st.rx_crypto_ok, st.rx_l4_csum_ok) == (2, 2, 0, 0)


def test_a_card_offering_one_kind_does_not_do_the_other():
    """Kind "a" advertised, kind "b" not (and the other way round): the unadvertised kind is BAD_HANDLE on
    transmit and one layer on receive; a UDP-encapsulated layer inside a UDP-encapsulated tunnel is no NDIS
    kind and is never combined."""
    for offered, other in (("a", "b"), ("b", "a")):
        caps = _caps(KA if offered == "a" else KB)
        # the other kind's SAs are added as plain UDP-ESP SAs (TRANSPORT / TUNNEL are offered)
        fw, h = _card(other, caps)
        tx = fw.transmit(_host_frame(other, 1, True), h["t_out"], False, tunnel_handle=h["u_out"])
        assert (tx.status, tx.frame) == (TxOutcome.BAD_HANDLE, None)
        rx = fw.receive(_sealed(other, 1, False)[1])
        assert (rx.crypto_done, rx.next_crypto_done, rx.crypto_status, rx.next_handle) == \
            (True, False, CryptoStatus.SUCCESS, 0)
        assert fw.stats().tx_bad_handle == 1
        # the offered kind works on the same card
        fw, h = _card(offered, caps)
        tx = fw.transmit(_host_frame(offered, 1, True), h["t_out"], False, tunnel_handle=h["u_out"])
        assert tx.status == TxOutcome.OK and tx.frame == _sealed(offered, 1, True)[1]
    # both layers UDP-encapsulated, with both kinds offered: refused
    fw = Firmware(_caps(KA, KB))
    inner = fw.add_sa([replace(_params("b", outbound=True, tunnel=False))])
    outer = fw.add_sa([replace(_params("a", outbound=True, tunnel=True))])
    frame = _host_frame("a", 1, True)
    assert fw.transmit(frame, inner, False, tunnel_handle=outer).status == TxOutcome.BAD_HANDLE
    # the plain-layer pair still works on it
    plain_inner = fw.add_sa([replace(_params("a", outbound=True, tunnel=False), spi=0x5555)])
    assert fw.transmit(frame.replace(struct.pack("!I", T_OUT), struct.pack("!I", 0x5555)), plain_inner, False,
                       tunnel_handle=outer).status == TxOutcome.OK


def test_v2_add_takes_the_combined_kinds_only_when_offered():
    """udp_esp_encapsulation TRANSPORT_OVER_TUNNEL (0x4) adds a UDP-ESP tunnel SA, UDP_ESP_TRANSPORT_OVER_TUNNEL
    (0x8) a UDP-ESP transport SA (datasheet §12.1 row 9); a card that does not offer the kind refuses it."""
    def req(kind: str, tunnel: bool, flag: UdpEspEncapsulation) -> bytes:
        r = ndis.V2AddSaEx.unpack(v2_add_sa_ex(_params(kind, outbound=True, tunnel=tunnel)))
        return ndis.V2AddSaEx(**{**r.__dict__, "udp_esp_encapsulation": int(flag)}).pack()

    plain = Firmware(_caps(combined=True))
    assert plain.execute(Opcode.V2_ADD_SA_EX, req("a", True, KA))[0] == NdisStatus.NOT_SUPPORTED
    assert plain.execute(Opcode.V2_ADD_SA_EX, req("b", False, KB))[0] == NdisStatus.NOT_SUPPORTED
    fw = Firmware(_caps(KA, KB))
    handles = {}
    for kind, tunnel, flag in (("a", True, KA), ("b", False, KB)):
        status, resp = fw.execute(Opcode.V2_ADD_SA_EX, req(kind, tunnel, flag))
        assert status == NdisStatus.SUCCESS, fw.last_error
        handles[kind] = ndis.HandleResponse.unpack(resp).offload_handle
        sa = fw.sadb.get(handles[kind])
        assert (sa.tunnel, sa.params[0].encap) == (tunnel, UdpEncap())
    # each works as its layer: kind a's tunnel SA around a plain transport SA, kind b's transport SA in a
    # plain tunnel SA
    t_plain = fw.add_sa([_params("a", outbound=True, tunnel=False)])
    u_plain = fw.add_sa([_params("b", outbound=True, tunnel=True)])
    tx = fw.transmit(_host_frame("a", 1, True), t_plain, False, tunnel_handle=handles["a"])
    assert tx.frame == _sealed("a", 1, True)[1]
    tx = fw.transmit(_host_frame("b", 1, True), handles["b"], False, tunnel_handle=u_plain)
    assert tx.frame == _sealed("b", 1, True)[1]


def test_profile_offers_the_kinds_only_with_transport_tunnel_combined():
    for kinds in (["transport-over-tunnel"], ["udp-transport-over-tunnel"], ["transport", "transport-over-tunnel"]):
        with pytest.raises(ProfileError, match="transport_tunnel_combined"):
            Capabilities.from_profile({"udp_esp": kinds})
        with pytest.raises(ProfileError, match="transport_tunnel_combined"):
            Capabilities.from_profile({"udp_esp": kinds, "transport_tunnel_combined": False})
    with pytest.raises(ProfileError):
        Capabilities(udp_esp=KA)  # guards code that builds Capabilities directly
    caps = Capabilities.from_profile({"transport_tunnel_combined": True, "udp_esp": [
        "transport", "tunnel", "transport-over-tunnel", "udp-transport-over-tunnel"]})
    wire = caps.to_wire()
    assert (wire.udp_esp, wire.transport_tunnel_combined) == (0xF, 1)
    # v1's UDP-ESP parse flags follow (NDIS_IPSEC_OFFLOAD_V1 Supported.Flags, the OTHER encapsulation type)
    assert V1UdpEspParseFlags(wire.v1_udp_esp_flags) == (
        V1UdpEspParseFlags.TPT_OTHER | V1UdpEspParseFlags.TUN_OTHER | V1UdpEspParseFlags.TPTOVERTUN_OTHER
        | V1UdpEspParseFlags.TPT_OVER_PURE_TUN_OTHER)
    one = Capabilities.from_profile({"transport_tunnel_combined": True, "udp_esp": ["tunnel", "transport-over-tunnel"]})
    assert (one.to_wire().udp_esp, V1UdpEspParseFlags(one.to_wire().v1_udp_esp_flags)) == \
        (0x6, V1UdpEspParseFlags.TUN_OTHER | V1UdpEspParseFlags.TPTOVERTUN_OTHER)
    default = Capabilities.from_profile({}).to_wire()
    assert (default.udp_esp, default.v1_udp_esp_flags) == (0x3, 0x30)


# --- v1 SAs as the two layers ------------------------------------------------------------------------------

AUTH_T, AUTH_U = bytes(range(40, 60)), bytes(range(60, 80))


def _v1_params(kind: str, *, outbound: bool, tunnel: bool) -> SaParams:
    p = _params(kind, outbound=outbound, tunnel=tunnel)
    # v1 transforms: NULL + HMAC-SHA1-96; the filter is the end-to-end connection (seed 001: the tunnel SA
    # names the end hosts, SrcTunnelAddr/DestTunnelAddr the gateways), any protocol
    return replace(p, enc_alg=EncAlg.NONE, enc_key=b"", auth_alg=AuthAlg.SHA1, auth_key=AUTH_U if tunnel else AUTH_T,
                   icv_len=12)


def _v1_card(kind: str) -> tuple[Firmware, dict[str, int]]:
    fw = Firmware(_caps(KA if kind == "a" else KB))
    handles = {}
    for name, outbound, tunnel in (("t_out", True, False), ("u_out", True, True), ("t_in", False, False),
                                   ("u_in", False, True)):
        p = _v1_params(kind, outbound=outbound, tunnel=tunnel)
        if p.encap is not None:
            status, resp = fw.execute(Opcode.V1_ADD_UDPESP_SA, v1_add_udpesp_sa(p))
            handles[name] = ndis.V1AddUdpEspResponse.unpack(resp).offload_handle if status == 0 else 0
        else:
            status, resp = fw.execute(Opcode.V1_ADD_SA, v1_add_sa(p))
            handles[name] = ndis.HandleResponse.unpack(resp).offload_handle if status == 0 else 0
        assert status == NdisStatus.SUCCESS, fw.last_error
    return fw, handles


def _v1_scapy(kind: str, outbound: bool) -> tuple[SecurityAssociation, SecurityAssociation]:
    inner_udp, outer_udp = LAYERS[kind]
    gsrc, gdst = _addrs(4, True, outbound)
    nat_t = UDP(sport=4500, dport=4500)
    inner = SecurityAssociation(ESP, spi=T_OUT if outbound else T_IN, crypt_algo="NULL", auth_algo="HMAC-SHA1-96",
                                auth_key=AUTH_T, nat_t_header=nat_t if inner_udp else None)
    outer = SecurityAssociation(ESP, spi=U_OUT if outbound else U_IN, crypt_algo="NULL", auth_algo="HMAC-SHA1-96",
                                auth_key=AUTH_U, tunnel_header=IP(src=gsrc, dst=gdst),
                                nat_t_header=nat_t if outer_udp else None)
    return inner, outer


@pytest.mark.parametrize("kind", ["a", "b"])
def test_v1_sas_are_the_two_layers_both_directions(kind):
    """V1_ADD_SA / V1_ADD_UDPESP_SA: the SA with SrcTunnelAddr/DestTunnelAddr is the tunnel layer, the one
    without the transport layer; the UDP-encapsulated one of the pair comes from V1_ADD_UDPESP_SA."""
    fw, h = _v1_card(kind)
    inner_sa, outer_sa = _v1_scapy(kind, True)
    inner_udp, outer_udp = LAYERS[kind]
    expected = bytes(Ether(src=MAC_CARD, dst=MAC_PEER) / outer_sa.encrypt(
        inner_sa.encrypt(_plain(True), seq_num=7), seq_num=9))
    # the host's frame is scapy's with the ICV room zeroed (NULL encryption: no IV, the rest is plaintext)
    host = bytearray(expected)
    host[-12:] = bytes(12)
    inner_len = len(bytes(inner_sa.encrypt(_plain(True), seq_num=7)))
    inner_at = 14 + 20 + (8 if outer_udp else 0) + 8
    host[inner_at + inner_len - 12:inner_at + inner_len] = bytes(12)
    tx = fw.transmit(bytes(host), h["t_out"], False, tunnel_handle=h["u_out"])
    assert tx.status == TxOutcome.OK and tx.frame == expected
    # receive: the peer's frame, both layers checked
    inner_sa, outer_sa = _v1_scapy(kind, False)
    wire = bytes(Ether() / outer_sa.encrypt(inner_sa.encrypt(_plain(False), seq_num=3), seq_num=4))
    rx = fw.receive(wire)
    assert (rx.crypto_done, rx.next_crypto_done, rx.crypto_status) == (True, True, CryptoStatus.SUCCESS), rx
    assert (rx.handle, rx.next_handle, rx.frame, rx.l4_csum_ok) == (h["u_in"], h["t_in"], wire, kind == "b")
    # a wrong transport ICV (changed before the tunnel layer sealed it): NEXT_CRYPTO_DONE, the transport
    # layer's failure; a wrong tunnel ICV: one layer, the v1 tunnel SA's TUNNEL_ESP_AUTH_FAILED
    inner = inner_sa.encrypt(_plain(False), seq_num=5)
    bad_inner = IP(_tamper(bytes(inner), len(inner) - 3))
    rx = fw.receive(bytes(Ether() / outer_sa.encrypt(bad_inner, seq_num=6)))
    assert (rx.next_crypto_done, rx.crypto_status, rx.next_handle) == \
        (True, CryptoStatus.TRANSPORT_ESP_AUTH_FAILED, h["t_in"])
    rx = fw.receive(_tamper(wire, len(wire) - 3))
    assert (rx.crypto_done, rx.next_crypto_done, rx.crypto_status) == \
        (True, False, CryptoStatus.TUNNEL_ESP_AUTH_FAILED)
    st = fw.stats()
    assert (st.tx_crypto, st.rx_crypto_ok, st.rx_auth_failed, st.rx_crypto_done) == (1, 1, 2, 3)


@pytest.mark.parametrize("kind", ["a", "b"])
def test_v1_tunnel_filter_sees_the_transport_layer(kind):
    """A v1 tunnel SA's filter is matched against the packet the tunnel carries, which in transport over
    tunnel is the transport layer's ESP (in UDP 4500 for kind b): its end hosts pass, a port of the end-to-end
    flow does not (the frame is indicated as if no SA applied; datasheet §7.3)."""
    results = {}
    for dport in (0, 2000):
        fw = Firmware(_caps(KA if kind == "a" else KB))
        for tunnel in (False, True):
            p = _v1_params(kind, outbound=False, tunnel=tunnel)
            if tunnel:
                p = replace(p, sel_proto=17, sel_dport=dport)
            opcode, req = (Opcode.V1_ADD_UDPESP_SA, v1_add_udpesp_sa(p)) if p.encap else (Opcode.V1_ADD_SA,
                                                                                          v1_add_sa(p))
            assert fw.execute(opcode, req)[0] == NdisStatus.SUCCESS, fw.last_error
        inner_sa, outer_sa = _v1_scapy(kind, False)
        rx = fw.receive(bytes(Ether() / outer_sa.encrypt(inner_sa.encrypt(_plain(False), seq_num=1), seq_num=1)))
        results[dport] = (rx.crypto_done, rx.next_crypto_done, rx.policy_mismatch)
    assert results == {0: (True, True, False), 2000: (False, False, True)}
