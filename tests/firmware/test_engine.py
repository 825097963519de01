"""Engine behaviour: negative cases, limits, sequence overflow, dummy packets, NAT-T classification,
crypto offload in place, parameter validation. Wire correctness itself is covered by test_vectors.py
(published vectors) and test_scapy_interop.py (scapy)."""

from __future__ import annotations

import os
import struct
from dataclasses import replace

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw, raw

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.sa import SaParams, UdpEncap, UnsupportedAlgorithm
from firmware_model.engine import SEQ_WARN_MARGIN, AhEngine, EspEngine, SaBundle, SaEngine
from firmware_model.esp import UdpPayloadKind, Verdict, classify_udp_payload

SRC, DST = "198.51.100.1", "198.51.100.2"


def gcm(direction=Direction.OUTBOUND, **kw) -> SaParams:
    base = dict(spi=0x5000, proto=IpProto.ESP, direction=direction, mode=Mode.TRANSPORT, src=SRC, dst=DST,
                enc_alg=EncAlg.AES_GCM_128, enc_key=bytes(range(20)))
    base.update(kw)
    return SaParams(**base)


def cbc(direction=Direction.OUTBOUND, **kw) -> SaParams:
    base = dict(spi=0x5001, proto=IpProto.ESP, direction=direction, mode=Mode.TUNNEL, src=SRC, dst=DST,
                enc_alg=EncAlg.AES_CBC_128, enc_key=bytes(16), auth_alg=AuthAlg.SHA256, auth_key=bytes(32))
    base.update(kw)
    return SaParams(**base)


def packet(size: int = 60) -> bytes:
    return raw(IP(src=SRC, dst=DST) / UDP(sport=5, dport=6) / Raw(bytes(range(size % 256)) * (size // 256 + 1)))


def pair(make, **kw):
    return SaEngine(make(Direction.OUTBOUND, **kw)), SaEngine(make(Direction.INBOUND, **kw))


def test_factory_returns_subclasses() -> None:
    assert isinstance(SaEngine(gcm()), EspEngine)
    ah = SaParams(spi=0x600, proto=IpProto.AH, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT, src=SRC,
                  dst=DST, auth_alg=AuthAlg.SHA1, auth_key=bytes(20), icv_len=12)
    assert isinstance(SaEngine(ah), AhEngine)


@pytest.mark.parametrize("make", [gcm, cbc], ids=["gcm", "cbc-hmac"])
def test_tampering_each_region_fails_auth(make) -> None:
    tx, rx = pair(make, replay_window=0)
    _, wire = tx.encapsulate(packet(80))
    esp_at = 20
    for pos in (esp_at, esp_at + 5, esp_at + 9, len(wire) // 2, len(wire) - 20, len(wire) - 1):
        bad = bytearray(wire)
        bad[pos] ^= 0x04
        verdict, out = rx.decapsulate(bytes(bad))
        # SPI change = not this SA; anything else = ICV failure
        assert verdict == (Verdict.WRONG_PROTOCOL if pos < esp_at + 4 else Verdict.AUTH_FAILED), pos
        assert out == b""
    assert rx.decapsulate(wire)[0] == Verdict.OK
    assert rx.stats.auth_failures == 5 and rx.stats.wrong_protocol == 1


def test_failed_icv_does_not_move_window() -> None:
    tx, rx = pair(gcm)
    wires = [tx.encapsulate(packet())[1] for _ in range(3)]
    forged = bytearray(wires[2])
    forged[-1] ^= 1
    assert rx.decapsulate(bytes(forged))[0] == Verdict.AUTH_FAILED
    assert rx.window.top == 0
    assert [rx.decapsulate(w)[0] for w in wires] == [Verdict.OK] * 3
    assert rx.decapsulate(wires[1])[0] == Verdict.REPLAY


def test_truncated_and_bad_lengths_are_syntax_errors() -> None:
    tx, rx = pair(cbc)
    _, wire = tx.encapsulate(packet(100))
    assert rx.decapsulate(wire[:-3])[0] == Verdict.BAD_SYNTAX  # IP total length beyond the data
    short = bytearray(wire[:-5])
    short[2:4] = struct.pack("!H", len(short))
    short[10:12] = b"\0\0"
    assert rx.decapsulate(bytes(short))[0] == Verdict.BAD_SYNTAX  # ciphertext not a block multiple
    assert rx.decapsulate(wire[:10])[0] == Verdict.BAD_SYNTAX
    assert rx.decapsulate(b"")[0] == Verdict.BAD_SYNTAX
    tiny = raw(IP(src=SRC, dst=DST, proto=50) / Raw(b"\x00\x00\x50\x01\x00\x00\x00\x01"))
    assert rx.decapsulate(tiny)[0] == Verdict.BAD_SYNTAX
    frag = raw(IP(src=SRC, dst=DST, proto=50, flags="MF") / Raw(wire[20:]))
    assert rx.decapsulate(frag)[0] == Verdict.BAD_SYNTAX
    assert rx.stats.syntax_errors == 6


def test_bad_padding_is_syntax_error() -> None:
    """A correctly authenticated packet whose padding is not 1, 2, 3, ... (RFC 4303 §2.4)."""
    key = os.urandom(16)
    auth = os.urandom(20)
    rx = SaEngine(cbc(Direction.INBOUND, mode=Mode.TRANSPORT, enc_key=key, auth_alg=AuthAlg.SHA1, auth_key=auth,
                      icv_len=12))
    sa = SecurityAssociation(ESP, spi=0x5001, crypt_algo="AES-CBC", crypt_key=key, auth_algo="HMAC-SHA1-96",
                             auth_key=auth)
    original = IP(src=SRC, dst=DST) / UDP() / Raw(b"abc")
    from scapy.layers.ipsec import CRYPT_ALGOS

    algo = CRYPT_ALGOS["AES-CBC"]
    real_pad = algo.pad

    def bad_pad(esp):
        esp = real_pad(esp)
        esp.padding = b"\xaa" * esp.padlen  # wrong content, right length
        return esp

    algo.pad = bad_pad
    try:
        wire = raw(sa.encrypt(original))
    finally:
        algo.pad = real_pad
    assert rx.decapsulate(wire)[0] == Verdict.BAD_SYNTAX
    assert rx.window.top == 1  # authentic, so the window moved (§3.4.3), but the packet is dropped


def test_dummy_packet_next_header_59() -> None:
    key = os.urandom(20)
    rx = SaEngine(gcm(Direction.INBOUND, enc_key=key))
    sa = SecurityAssociation(ESP, spi=0x5000, crypt_algo="AES-GCM", crypt_key=key)
    dummy = IP(src=SRC, dst=DST, proto=59) / Raw(os.urandom(12))
    assert rx.decapsulate(raw(sa.encrypt(dummy))) == (Verdict.DUMMY, b"")
    assert rx.stats.dummy_packets == 1


def test_sequence_overflow_without_esn() -> None:
    tx = SaEngine(gcm(seq=0xFFFFFFFE))
    assert tx.encapsulate(packet())[0] == Verdict.OK  # 0xFFFFFFFF is the last usable number
    assert tx.seq_nearly_exhausted
    assert tx.encapsulate(packet()) == (Verdict.SEQ_OVERFLOW, b"")
    assert tx.stats.seq_overflows == 1
    warn = SaEngine(gcm(seq=0xFFFFFFFF - SEQ_WARN_MARGIN - 2))
    warn.encapsulate(packet())
    assert not warn.seq_nearly_exhausted
    warn.encapsulate(packet())
    assert warn.seq_nearly_exhausted
    esn = SaEngine(gcm(seq=0xFFFFFFFF, esn=True))
    verdict, wire = esn.encapsulate(packet())
    assert verdict == Verdict.OK and wire[24:28] == b"\0\0\0\0" and not esn.seq_nearly_exhausted


@pytest.mark.parametrize("make", [gcm, cbc])
def test_transport_mode_refuses_ipv4_fragments(make) -> None:
    """RFC 4303 §3.1.1: transport mode applies to whole datagrams; tunnel mode carries fragments as they are."""
    whole = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP() / Raw(b"x" * 40))
    first = bytes(IP(src="192.0.2.1", dst="192.0.2.2", flags="MF") / UDP() / Raw(b"x" * 40))
    later = bytes(IP(src="192.0.2.1", dst="192.0.2.2", frag=3, proto=17) / Raw(b"x" * 40))
    tx = SaEngine(make(mode=Mode.TRANSPORT))
    assert tx.encapsulate(first) == (Verdict.BAD_SYNTAX, b"")
    assert tx.encapsulate(later) == (Verdict.BAD_SYNTAX, b"")
    verdict, wire = tx.encapsulate(whole)
    assert verdict == Verdict.OK and struct.unpack_from("!I", wire, 24)[0] == 1  # refusals used no number
    tunnel = SaEngine(make(mode=Mode.TUNNEL))
    assert tunnel.encapsulate(first)[0] == Verdict.OK


def test_soft_and_hard_limits() -> None:
    tx = SaEngine(gcm(soft_packets=2, hard_packets=3))
    assert tx.encapsulate(packet())[0] == Verdict.OK and not tx.soft_expired
    assert tx.encapsulate(packet())[0] == Verdict.OK and tx.soft_expired
    assert tx.encapsulate(packet())[0] == Verdict.OK
    assert tx.encapsulate(packet()) == (Verdict.HARD_LIMIT, b"")
    assert tx.hard_expired and tx.stats.hard_limit_drops == 1
    size = len(packet())
    by_bytes = SaEngine(gcm(soft_bytes=size + 1, hard_bytes=2 * size))
    by_bytes.encapsulate(packet())
    assert not by_bytes.soft_expired
    by_bytes.encapsulate(packet())
    assert by_bytes.soft_expired
    assert by_bytes.encapsulate(packet())[0] == Verdict.HARD_LIMIT


def test_nat_t_classification_and_receive() -> None:
    assert classify_udp_payload(b"\xff") == UdpPayloadKind.KEEPALIVE
    assert classify_udp_payload(b"\0\0\0\0" + b"ike") == UdpPayloadKind.NON_ESP
    assert classify_udp_payload(b"\0\0\1\0\0\0\0\1") == UdpPayloadKind.ESP
    assert classify_udp_payload(b"\0\0\1") == UdpPayloadKind.TOO_SHORT
    tx, rx = pair(gcm, encap=UdpEncap())
    verdict, wire = tx.encapsulate(packet())
    assert verdict == Verdict.OK and IP(wire)[UDP].chksum == 0 and IP(wire)[UDP].len == len(wire) - 20
    keepalive = raw(IP(src=SRC, dst=DST) / UDP(sport=4500, dport=4500) / Raw(b"\xff"))
    ike = raw(IP(src=SRC, dst=DST) / UDP(sport=4500, dport=4500) / Raw(b"\0\0\0\0" + os.urandom(40)))
    other_port = raw(IP(src=SRC, dst=DST) / UDP(sport=4500, dport=53) / Raw(wire[28:]))
    assert rx.decapsulate(keepalive) == (Verdict.NOT_ESP, b"")
    assert rx.decapsulate(ike) == (Verdict.NOT_ESP, b"")
    assert rx.decapsulate(other_port) == (Verdict.NOT_ESP, b"")
    assert rx.decapsulate(wire) == (Verdict.OK, packet())
    plain_esp = raw(IP(src=SRC, dst=DST, proto=50) / Raw(wire[28:]))
    assert rx.decapsulate(plain_esp)[0] == Verdict.WRONG_PROTOCOL
    # a non-encap SA sees UDP as "not ESP"
    assert SaEngine(gcm(Direction.INBOUND)).decapsulate(wire)[0] == Verdict.NOT_ESP


def _host_built_frame(params: SaParams, payload: bytes, nh: int, seq: int, iv_len: int, icv_len: int,
                      align: int) -> bytearray:
    """What an NDIS host stack hands the NIC: Ethernet + IPv4 + ESP header + IV room + padded plaintext
    + ICV room."""
    padlen = -(len(payload) + 2) % align
    plain = payload + bytes(range(1, padlen + 1)) + bytes((padlen, nh))
    esp = struct.pack("!II", params.spi, seq & 0xFFFFFFFF) + bytes(iv_len) + plain + bytes(icv_len)
    ip = bytearray(raw(IP(src=SRC, dst=DST, proto=50) / Raw(esp)))
    return bytearray(b"\xaa" * 14) + ip


@pytest.mark.parametrize("make,iv_len,icv_len,align", [(gcm, 8, 16, 4), (cbc, 16, 16, 16)], ids=["gcm", "cbc"])
def test_crypto_offload_in_place_matches_scapy(make, iv_len, icv_len, align) -> None:
    tx, rx = pair(make, mode=Mode.TRANSPORT)
    inner = raw(UDP(sport=1, dport=2) / Raw(b"crypto offload payload"))
    frame = _host_built_frame(tx.params, inner, 17, 7, iv_len, icv_len, align)
    before = bytes(frame)
    assert tx.crypto_encrypt(frame, 14) == Verdict.OK
    assert len(frame) == len(before) and frame[:14 + 28] == before[:14 + 28]
    p = tx.params
    sa = SecurityAssociation(ESP, spi=p.spi, crypt_algo="AES-GCM" if make is gcm else "AES-CBC",
                             crypt_key=p.enc_key, auth_algo=None if make is gcm else "SHA2-256-128",
                             auth_key=p.auth_key or None)
    assert raw(sa.decrypt(IP(bytes(frame[14:])))[UDP]) == inner
    assert rx.crypto_decrypt(frame, 14) == Verdict.OK
    start = 14 + 20 + 8 + iv_len
    assert bytes(frame[start:start + len(inner)]) == inner
    frame[-1] ^= 1
    assert rx.crypto_decrypt(frame, 14) == Verdict.AUTH_FAILED


def test_crypto_offload_gcm_iv_never_repeats() -> None:
    tx = SaEngine(gcm())
    ivs = set()
    for _ in range(3):  # the host reuses sequence number 5: the nonce must still be fresh
        frame = _host_built_frame(tx.params, b"x" * 20, 17, 5, 8, 16, 4)
        assert tx.crypto_encrypt(frame, 14) == Verdict.OK
        ivs.add(bytes(frame[14 + 28:14 + 36]))
    assert len(ivs) == 3


def test_crypto_offload_esn_high_half() -> None:
    tx, rx = pair(gcm, esn=True)
    frame = _host_built_frame(tx.params, b"y" * 30, 17, 0x10, 8, 16, 4)
    assert tx.crypto_encrypt(frame, 14, seq_hi=7) == Verdict.OK
    rx.set_seq_hi(6)  # UPDATE_SA not yet seen: the receiver retries with high + 1 and moves on
    assert rx.crypto_decrypt(bytearray(frame), 14) == Verdict.OK
    assert rx._seq_hi == 7
    rx.set_seq_hi(3)
    assert rx.crypto_decrypt(bytearray(frame), 14) == Verdict.AUTH_FAILED
    with pytest.raises(ValueError):
        rx.set_seq_hi(1 << 32)


def test_crypto_offload_rejects_foreign_spi_and_short_frames() -> None:
    tx = SaEngine(gcm())
    frame = _host_built_frame(replace(tx.params, spi=0x9999), b"z" * 8, 17, 1, 8, 16, 4)
    assert tx.crypto_encrypt(frame, 14) == Verdict.WRONG_PROTOCOL
    assert tx.crypto_encrypt(bytearray(b"\0" * 30), 14) == Verdict.BAD_SYNTAX
    frame = _host_built_frame(tx.params, b"z" * 8, 17, 1, 8, 16, 4)
    assert tx.crypto_encrypt(frame, 15) == Verdict.BAD_SYNTAX


def test_bundle_crypto_offload_round_trip() -> None:
    esp = cbc(mode=Mode.TRANSPORT)
    ah = SaParams(spi=0x700, proto=IpProto.AH, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT, src=SRC,
                  dst=DST, auth_alg=AuthAlg.SHA256, auth_key=os.urandom(32), icv_len=16)
    tx = SaBundle(esp, ah)
    rx = SaBundle(replace(esp, direction=Direction.INBOUND), replace(ah, direction=Direction.INBOUND))
    verdict, wire = tx.encapsulate(packet(64))
    assert verdict == Verdict.OK
    assert rx.decapsulate(wire) == (Verdict.OK, packet(64))


def test_ah_takes_hmac_only() -> None:
    """AES-GMAC in AH is refused (datasheet §12.1 decision 23); the same SA with an HMAC runs."""
    base = dict(spi=0x800, proto=IpProto.AH, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT, src=SRC, dst=DST)
    with pytest.raises(UnsupportedAlgorithm, match="AH integrity must be an HMAC; aes-gmac-128"):
        SaEngine(SaParams(auth_alg=AuthAlg.AES_GMAC_128, auth_key=os.urandom(20), icv_len=16, **base))
    verdict, wire = SaEngine(SaParams(auth_alg=AuthAlg.SHA1, auth_key=os.urandom(20), icv_len=12,
                                      **base)).encapsulate(packet())
    assert verdict == Verdict.OK and len(wire) == len(packet()) + 24


def test_validation_messages_and_refusals() -> None:
    with pytest.raises(UnsupportedAlgorithm, match="DES-CBC is refused"):
        SaEngine(cbc(enc_alg=EncAlg.DES_CBC, enc_key=bytes(8)))
    with pytest.raises(ValueError, match="needs 20-byte enc_key"):
        SaEngine(gcm(enc_key=bytes(16)))
    with pytest.raises(ValueError, match="ICV must be one of"):
        SaEngine(gcm(icv_len=10))
    with pytest.raises(ValueError, match="ICV is 12 bytes"):
        SaEngine(cbc(auth_alg=AuthAlg.SHA1, auth_key=bytes(20), icv_len=16))
    with pytest.raises(UnsupportedAlgorithm, match="combined mode"):
        SaEngine(gcm(auth_alg=AuthAlg.SHA256, auth_key=bytes(32)))
    with pytest.raises(UnsupportedAlgorithm, match="neither encryption nor integrity"):
        SaEngine(gcm(enc_alg=EncAlg.NONE, enc_key=b""))
    with pytest.raises(ValueError, match="SPI"):
        SaEngine(gcm(spi=5))
    with pytest.raises(ValueError, match="same IP family"):
        SaEngine(gcm(dst="2001:db8::1"))
    secret = bytes.fromhex("deadbeefcafef00d1122334455667788aabbccdd")
    assert "deadbeef" not in repr(gcm(enc_key=secret)) and "enc_key" not in repr(gcm(enc_key=secret))
    assert gcm().family == 4 and gcm(src="::1", dst="::2").family == 6
