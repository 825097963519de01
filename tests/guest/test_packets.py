"""Host-side ESP framing (crypto offload) and frame building, checked against scapy and the firmware engine."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.sa import SaParams
from firmware_model.engine import SaEngine
from firmware_model.esp import Verdict
from guest_tools import packets
from guest_tools.sa import esp_geometry

KEY = bytes(range(16))
SALT = bytes.fromhex("cafebabe")
HKEY = bytes(range(32, 64))


def _udp(v6: bool = False, size: int = 37) -> bytes:
    src, dst = ("2001:db8::1", "2001:db8::2") if v6 else ("192.0.2.1", "192.0.2.2")
    return packets.udp_packet(src, dst, 4000, 5000, packets.pattern_payload(size, 7))


def test_udp_packet_checksums_match_scapy():
    for v6 in (False, True):
        raw = _udp(v6)
        pkt = (IPv6 if v6 else IP)(raw)
        again = (IPv6 if v6 else IP)(raw)
        del again[UDP].chksum
        if not v6:
            del again[IP].chksum
        rebuilt = again.__class__(bytes(again))
        assert pkt[UDP].chksum == rebuilt[UDP].chksum
        if not v6:
            assert pkt[IP].chksum == rebuilt[IP].chksum


@pytest.mark.parametrize("payload_len", range(0, 9))
def test_trailer_follows_rfc4303_padding(payload_len):
    trailer = packets.esp_trailer(payload_len, 17, 4)
    pad = trailer[-2]
    assert (payload_len + len(trailer)) % 4 == 0 and pad < 4
    assert trailer[:pad] == bytes(range(1, pad + 1)) and trailer[-1] == 17


def test_null_framing_is_byte_identical_to_scapy():
    """With no IV/ICV the host framing must equal scapy's plaintext ESP (RFC 4303 §2)."""
    plain = _udp(size=33)
    sa = SecurityAssociation(ESP, spi=0x1001, crypt_algo="NULL", auth_algo="NULL")
    ref = bytes(sa.encrypt(IP(plain), seq_num=5))
    geo = packets.EspGeometry(0x1001, 0, 0, 4)
    ours = packets.build_esp(geo, plain, 5)
    assert ours.packet == ref
    assert ours.esp_offset == 20 and ours.next_header == 17


def _params(enc, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT, v6=False, **kw):
    src, dst = ("2001:db8::1", "2001:db8::2") if v6 else ("192.0.2.1", "192.0.2.2")
    if mode == Mode.TUNNEL:
        src, dst = ("2001:db8:1::a", "2001:db8:1::b") if v6 else ("198.51.100.1", "198.51.100.2")
    if enc == "gcm":
        algs = dict(enc_alg=EncAlg.AES_GCM_128, enc_key=KEY + SALT, icv_len=16)
    else:
        algs = dict(enc_alg=EncAlg.AES_CBC_128, enc_key=KEY, auth_alg=AuthAlg.SHA256, auth_key=HKEY, icv_len=16)
    return SaParams(spi=0x2002, proto=IpProto.ESP, direction=direction, mode=mode, src=src, dst=dst, **algs, **kw)


def _scapy_sa(enc, p):
    tunnel = None
    if p.mode == Mode.TUNNEL:
        tunnel = (IPv6 if ":" in p.dst else IP)(src=p.src, dst=p.dst)
    if enc == "gcm":
        return SecurityAssociation(ESP, spi=p.spi, crypt_algo="AES-GCM", crypt_key=p.enc_key, tunnel_header=tunnel)
    return SecurityAssociation(ESP, spi=p.spi, crypt_algo="AES-CBC", crypt_key=p.enc_key,
                               auth_algo="SHA2-256-128", auth_key=p.auth_key, tunnel_header=tunnel)


@pytest.mark.parametrize("enc", ["gcm", "cbc"])
@pytest.mark.parametrize("mode", [Mode.TRANSPORT, Mode.TUNNEL])
@pytest.mark.parametrize("v6", [False, True])
def test_driver_esp_encrypted_by_engine_decrypts_with_scapy(enc, mode, v6):
    p = _params(enc, mode=mode, v6=v6)
    plain = _udp(v6)
    frame = packets.build_esp(esp_geometry(p), plain, 42)
    buf = bytearray(frame.packet)
    assert SaEngine(p).crypto_encrypt(buf, 0) == Verdict.OK
    layer = IPv6 if v6 else IP
    decrypted = _scapy_sa(enc, p).decrypt(layer(bytes(buf)))
    assert bytes(decrypted[UDP]) == bytes(layer(plain)[UDP])
    assert layer(bytes(buf))[ESP].seq == 42


@pytest.mark.parametrize("enc", ["gcm", "cbc"])
@pytest.mark.parametrize("mode", [Mode.TRANSPORT, Mode.TUNNEL])
@pytest.mark.parametrize("v6", [False, True])
def test_strip_after_engine_decrypt_gives_scapy_plaintext(enc, mode, v6):
    p = _params(enc, direction=Direction.INBOUND, mode=mode, v6=v6, replay_window=0)
    plain = _udp(v6, size=50)
    layer = IPv6 if v6 else IP
    wire = bytearray(bytes(_scapy_sa(enc, p).encrypt(layer(plain), seq_num=9)))
    assert SaEngine(p).crypto_decrypt(wire, 0) == Verdict.OK
    out = packets.strip_esp(esp_geometry(p), bytes(wire))
    assert out.next_header == (17 if mode == Mode.TRANSPORT else (41 if v6 else 4))
    if mode == Mode.TUNNEL:
        assert out.packet == plain
    else:
        got = layer(out.packet)
        assert bytes(got[UDP]) == bytes(layer(plain)[UDP])
        if not v6:  # transport mode rewrote the header: checksum must be valid again
            assert packets.checksum(out.packet[:20]) == 0


def test_strip_refuses_undecrypted_garbage():
    geo = packets.EspGeometry(0x1, 8, 16, 4)
    junk = packets.ip_header("192.0.2.1", "192.0.2.2", 50, 40) + bytes(range(40))
    with pytest.raises(packets.FrameError):
        packets.strip_esp(geo, junk)


def test_udp_encap_framing():
    geo = packets.EspGeometry(0x3, 8, 16, 4, encap=(4500, 4500))
    out = packets.build_esp(geo, _udp(), 1)
    ip = IP(out.packet)
    assert ip.proto == 17 and ip[UDP].dport == 4500 and ip[UDP].chksum == 0
    assert out.esp_offset == 28 and out.packet[28:32] == (3).to_bytes(4, "big")


def test_mac_parsing():
    assert packets.parse_mac("02:49:50:4e:43:00") == bytes.fromhex("0249504e4300")
    with pytest.raises(packets.FrameError):
        packets.parse_mac("02:49")
