"""Transport over tunnel in crypto offload (NDIS TunnelHandle / NextCryptoDone): two SAs, the inner
(transport) ESP inside the outer (tunnel) ESP. scapy seals and opens both layers (the oracle)."""

from __future__ import annotations

import struct

from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from device.contract.enums import Direction, EncAlg, IpProto, Mode
from device.contract.status import CryptoStatus
from firmware_model.capabilities import Capabilities
from firmware_model.firmware import Firmware
from firmware_model.traffic import TxOutcome

OUTER_KEY = bytes(range(16)) + b"OUT!"
INNER_KEY = bytes(range(16, 32)) + b"INN!"
T_SRC, T_DST = "10.0.0.2", "10.0.0.1"  # tunnel endpoints
H_SRC, H_DST = "192.168.2.1", "192.168.1.1"  # end hosts
PAYLOAD = b"transport over tunnel"


def _sa(spi: int, key: bytes, *, inbound: bool, tunnel: bool) -> list:
    from device.contract.sa import SaParams

    src, dst = (T_SRC, T_DST) if tunnel else (H_SRC, H_DST)
    if not inbound:
        src, dst = dst, src
    return [SaParams(spi=spi, proto=IpProto.ESP, direction=Direction.INBOUND if inbound else Direction.OUTBOUND,
                     mode=Mode.TUNNEL if tunnel else Mode.TRANSPORT, src=src, dst=dst, enc_alg=EncAlg.AES_GCM_128,
                     enc_key=key, icv_len=16)]


def _card(combined: bool = True) -> Firmware:
    return Firmware(Capabilities(transport_tunnel_combined=combined))


def _scapy(spi: int, key: bytes, tunnel: bool, outbound_card: bool) -> SecurityAssociation:
    hdr = None
    if tunnel:
        hdr = IP(src=T_DST, dst=T_SRC) if outbound_card else IP(src=T_SRC, dst=T_DST)
    return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key, tunnel_header=hdr)


def _host_esp(spi: int, seq: int, body: bytes, next_header: int) -> bytes:
    """What a crypto-offload host hands the card for one layer: ESP header, IV room, payload, RFC 4303
    §2.4 padding to 4 bytes, pad length, next header, ICV room (RFC 4106: 8-byte IV, 16-byte ICV)."""
    pad = (-(len(body) + 2)) % 4
    return struct.pack("!II", spi, seq) + bytes(8) + body + bytes(range(1, pad + 1)) + bytes([pad, next_header]) \
        + bytes(16)


def _host_frame(seq: int = 1) -> bytes:
    udp = bytes(UDP(sport=1000, dport=2000) / Raw(PAYLOAD))
    inner_esp = _host_esp(0x1111, seq, udp, 17)
    inner_ip = bytes(IP(src=H_DST, dst=H_SRC, proto=50) / Raw(inner_esp))
    outer_esp = _host_esp(0x2222, seq, inner_ip, 4)
    return bytes(Ether() / IP(src=T_DST, dst=T_SRC, proto=50) / Raw(outer_esp))


def test_transmit_seals_inner_then_outer_and_scapy_opens_both():
    fw = _card()
    inner = fw.add_sa(_sa(0x1111, INNER_KEY, inbound=False, tunnel=False))
    outer = fw.add_sa(_sa(0x2222, OUTER_KEY, inbound=False, tunnel=True))
    tx = fw.transmit(_host_frame(), inner, False, tunnel_handle=outer)
    assert tx.status == TxOutcome.OK, tx
    wire = Ether(tx.frame)[IP]
    assert wire[ESP].spi == 0x2222
    inner_packet = _scapy(0x2222, OUTER_KEY, True, True).decrypt(wire)
    assert inner_packet[IP].src == H_DST and inner_packet[ESP].spi == 0x1111
    plain = _scapy(0x1111, INNER_KEY, False, True).decrypt(inner_packet)
    assert bytes(plain[UDP].payload) == PAYLOAD


def test_transmit_refusals():
    fw = _card()
    inner = fw.add_sa(_sa(0x1111, INNER_KEY, inbound=False, tunnel=False))
    outer = fw.add_sa(_sa(0x2222, OUTER_KEY, inbound=False, tunnel=True))
    inbound = fw.add_sa(_sa(0x3333, OUTER_KEY, inbound=True, tunnel=True))
    frame = _host_frame()
    assert fw.transmit(frame, inner, False, tunnel_handle=inbound).status == TxOutcome.BAD_HANDLE
    assert fw.transmit(frame, outer, False, tunnel_handle=inner).status == TxOutcome.BAD_HANDLE  # roles swapped
    assert fw.transmit(frame, inner, True, tunnel_handle=outer).status == TxOutcome.BAD_HANDLE  # packet offload
    # the outer trailer must announce an IP packet (RFC 4303 §2.6: 4 or 41)
    bad = bytearray(frame)
    bad[-17] = 17
    assert fw.transmit(bytes(bad), inner, False, tunnel_handle=outer).status == TxOutcome.WRONG_PROTOCOL
    # a card whose profile does not offer it refuses the tunnel handle
    off = _card(False)
    i2 = off.add_sa(_sa(0x1111, INNER_KEY, inbound=False, tunnel=False))
    o2 = off.add_sa(_sa(0x2222, OUTER_KEY, inbound=False, tunnel=True))
    assert off.transmit(frame, i2, False, tunnel_handle=o2).status == TxOutcome.BAD_HANDLE
    assert off.caps.to_wire().transport_tunnel_combined == 0 and fw.caps.to_wire().transport_tunnel_combined == 1


def _nested(seq: int = 1, *, tamper_inner: bool = False, tamper_outer: bool = False, inner_spi: int = 0x1111) -> bytes:
    inner = _scapy(inner_spi, INNER_KEY, False, False).encrypt(
        IP(src=H_SRC, dst=H_DST) / UDP(sport=1000, dport=2000) / Raw(PAYLOAD), seq_num=seq)
    if tamper_inner:
        raw = bytearray(bytes(inner))
        raw[20 + 16 + 3] ^= 1  # an inner ciphertext byte
        inner = IP(bytes(raw))
    outer = _scapy(0x2222, OUTER_KEY, True, False).encrypt(inner, seq_num=seq)
    frame = bytearray(bytes(Ether() / outer))
    if tamper_outer:
        frame[14 + 20 + 16 + 3] ^= 1
    return bytes(frame)


def _rx_card(combined: bool = True) -> tuple[Firmware, int, int]:
    fw = _card(combined)
    outer = fw.add_sa(_sa(0x2222, OUTER_KEY, inbound=True, tunnel=True))
    inner = fw.add_sa(_sa(0x1111, INNER_KEY, inbound=True, tunnel=False))
    return fw, outer, inner


def test_receive_checks_both_layers_and_sets_next_crypto_done():
    fw, outer, inner = _rx_card()
    rx = fw.receive(_nested())
    assert (rx.crypto_done, rx.next_crypto_done, rx.crypto_status) == (True, True, CryptoStatus.SUCCESS)
    assert (rx.handle, rx.next_handle) == (outer, inner)
    # both layers are plaintext in place: outer ESP at 34, inner IP at 50, inner ESP at 70, UDP at 86
    assert rx.frame[86 + 8:86 + 8 + len(PAYLOAD)] == PAYLOAD
    assert rx.next_header == 4  # HEADER_INFO describes the outer ESP


def test_receive_failures_per_layer():
    fw, outer, inner = _rx_card()
    bad_inner = _nested(2, tamper_inner=True)
    rx = fw.receive(bad_inner)
    assert (rx.next_crypto_done, rx.crypto_status, rx.next_handle) == \
        (True, CryptoStatus.TRANSPORT_ESP_AUTH_FAILED, inner)
    assert rx.frame == bad_inner  # a failed check: indicated as received
    bad_outer = _nested(3, tamper_outer=True)
    rx = fw.receive(bad_outer)
    assert (rx.crypto_done, rx.next_crypto_done, rx.crypto_status) == \
        (True, False, CryptoStatus.TUNNEL_ESP_AUTH_FAILED)
    # an inner SPI the card does not know: only the outer layer was checked
    rx = fw.receive(_nested(4, inner_spi=0x9999))
    assert (rx.crypto_done, rx.next_crypto_done, rx.crypto_status, rx.next_handle) == \
        (True, False, CryptoStatus.SUCCESS, 0)
    # without the capability the card checks one layer only
    off, _, _ = _rx_card(False)
    rx = off.receive(_nested(5))
    assert (rx.crypto_done, rx.next_crypto_done, rx.next_handle) == (True, False, 0)
