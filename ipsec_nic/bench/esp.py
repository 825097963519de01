"""ESP engine, firmware per-frame and scapy figures, each against a bare crypto call in the same run.

* engine: ``EspEngine.encapsulate`` / ``decapsulate`` (transport IPv4, bytes in, bytes out) against the
  bare primitive on a packet of the same size: ``AESGCM.encrypt`` / ``decrypt`` (key object reused,
  8-byte AAD) for AES-GCM-128; a persistent AES-CBC context plus a pre-keyed HMAC-SHA-256 ``copy()`` for
  AES-CBC-128 + HMAC-SHA-256-128 (RFC 4868) — what a Python ESP implementation cannot avoid calling;
* firmware: what the card calls per Ethernet frame, ``Firmware.transmit`` / ``receive`` with crypto
  offload (the host built the ESP framing, RFC 4303 §2) and packet offload (the card builds it);
* scapy: ``SecurityAssociation.encrypt`` / ``decrypt`` on the same packets, against which the firmware's
  packet-offload figure is compared.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from hmac import compare_digest

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .core import Progress, Row, at_least, rates

ETH_HEAD = bytes.fromhex("020000000002" "020000000001" "0800")
SRC, DST = "10.0.0.1", "10.0.0.2"
SIZES = (64, 512, 1400)

# Targets: ratios to the bare primitive in the same run (README, Performance).
GCM_TARGET = {64: at_least(0.35), 1400: at_least(0.45)}
CBC_TARGET = {1400: at_least(0.45)}
FIRMWARE_TARGET = {1400: at_least(0.35)}
SCAPY_TARGET = at_least(200)


@dataclass(frozen=True)
class Budget:
    seconds: float  # per measured function and size
    rounds: int


def ipv4_header(total: int, proto: int) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0,
                                bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    s = sum(struct.unpack("!10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(hdr)


def ipv4_packet(size: int) -> bytes:
    """An IPv4/UDP packet of ``size`` bytes in all."""
    payload = os.urandom(size - 28)
    return ipv4_header(size, 17) + struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload


def host_built_esp(spi: int, seq: int, size: int) -> bytes:
    """A crypto-offload transmit frame as an NDIS host builds it: IPv4 | ESP header | zeroed IV room |
    UDP payload + trailer | zeroed ICV room (RFC 4303 §2)."""
    inner = ipv4_packet(size)[20:]
    padlen = -(len(inner) + 2) % 4
    esp = (struct.pack("!II", spi, seq) + bytes(8) + inner + bytes(range(1, padlen + 1))
           + bytes((padlen, 17)) + bytes(16))
    return ETH_HEAD + ipv4_header(20 + len(esp), 50) + esp


def _sa(spi: int, direction, **kw):
    from device.contract.sa import EncAlg, IpProto, Mode, SaParams

    base = dict(proto=IpProto.ESP, mode=Mode.TRANSPORT, src=SRC, dst=DST, enc_alg=EncAlg.AES_GCM_128,
                replay_window=0)  # no anti-replay: the same packet is fed again and again
    base.update(kw)
    return SaParams(spi=spi, direction=direction, **base)


def engine_gcm(budget: Budget, say: Progress) -> list[Row]:
    from device.contract.enums import Direction
    from firmware_model.engine import SaEngine

    key = os.urandom(20)  # AES-128 key || 4-byte salt (RFC 4106 §8.1)
    aead = AESGCM(key[:16])
    nonce, aad = os.urandom(12), os.urandom(8)
    rows = []
    for size in SIZES:
        say(f"ESP engine AES-GCM-128, {size} B")
        pkt = ipv4_packet(size)
        tx = SaEngine(_sa(0x1000, Direction.OUTBOUND, enc_key=key))
        rx = SaEngine(_sa(0x1000, Direction.INBOUND, enc_key=key))
        wire = tx.encapsulate(pkt)[1]
        assert rx.decapsulate(wire)[1] == pkt, "engine round trip failed"
        sealed = aead.encrypt(nonce, pkt, aad)
        raw_enc, enc, raw_dec, dec = rates([
            (lambda p: aead.encrypt(nonce, p, aad), pkt),
            (tx.encapsulate, pkt),
            (lambda c: aead.decrypt(nonce, c, aad), sealed),
            (rx.decapsulate, wire),
        ], budget.seconds, budget.rounds)
        rows.append(Row(f"ESP engine encap AES-GCM-128 {size} B", enc, "pkt/s", raw_enc,
                        "AESGCM.encrypt/s", GCM_TARGET.get(size)))
        rows.append(Row(f"ESP engine decap AES-GCM-128 {size} B", dec, "pkt/s", raw_dec,
                        "AESGCM.decrypt/s", GCM_TARGET.get(size)))
    return rows


def engine_cbc(budget: Budget, say: Progress) -> list[Row]:
    from device.contract.enums import AuthAlg, Direction, EncAlg
    from firmware_model.engine import SaEngine

    enc_key, auth_key = os.urandom(16), os.urandom(32)
    kw = dict(enc_alg=EncAlg.AES_CBC_128, enc_key=enc_key, auth_alg=AuthAlg.SHA256, auth_key=auth_key,
              icv_len=16)
    # The ceiling: one persistent CBC context and a pre-keyed HMAC copied per packet (the cheapest way
    # to call these primitives from Python), over as many bytes as the ESP payload.
    encryptor = Cipher(algorithms.AES(enc_key), modes.CBC(bytes(16))).encryptor()
    decryptor = Cipher(algorithms.AES(enc_key), modes.CBC(bytes(16))).decryptor()
    mac_base = hmac.HMAC(auth_key, hashes.SHA256())

    def seal(p: bytes) -> bytes:
        c = encryptor.update(p)
        m = mac_base.copy()
        m.update(c)
        return c + m.finalize()[:16]

    def open_(c: bytes) -> bytes:
        m = mac_base.copy()
        m.update(c[:-16])
        if not compare_digest(m.finalize()[:16], c[-16:]):
            raise ValueError("ICV mismatch")
        return decryptor.update(c[:-16])

    rows = []
    for size in SIZES:
        say(f"ESP engine AES-CBC-128 + HMAC-SHA-256-128, {size} B")
        pkt = ipv4_packet(size)
        tx = SaEngine(_sa(0x1100, Direction.OUTBOUND, **kw))
        rx = SaEngine(_sa(0x1100, Direction.INBOUND, **kw))
        wire = tx.encapsulate(pkt)[1]
        assert rx.decapsulate(wire)[1] == pkt, "engine round trip failed"
        block = pkt[20:] + bytes(-(size - 20) % 16)  # the same number of cipher blocks as the packet
        sealed = seal(block)
        raw_enc, enc, raw_dec, dec = rates([
            (seal, block), (tx.encapsulate, pkt), (open_, sealed), (rx.decapsulate, wire),
        ], budget.seconds, budget.rounds)
        rows.append(Row(f"ESP engine encap AES-CBC-128+HMAC-SHA-256-128 {size} B", enc, "pkt/s", raw_enc,
                        "CBC+HMAC/s", CBC_TARGET.get(size)))
        rows.append(Row(f"ESP engine decap AES-CBC-128+HMAC-SHA-256-128 {size} B", dec, "pkt/s", raw_dec,
                        "HMAC+CBC/s", CBC_TARGET.get(size)))
    return rows


@dataclass
class FirmwareRig:
    """One card sending (crypto offload 0x2001, packet offload 0x2002) and one receiving."""

    transmit_crypto: Callable[[bytes], object]
    transmit_packet: Callable[[bytes], object]
    receive: Callable[[bytes], object]

    @classmethod
    def build(cls, key: bytes) -> FirmwareRig:
        from device.contract.enums import Direction
        from firmware_model.capabilities import Capabilities
        from firmware_model.firmware import Firmware

        tx_fw, rx_fw = Firmware(Capabilities()), Firmware(Capabilities())
        h_crypto = tx_fw.add_sa([_sa(0x2001, Direction.OUTBOUND, enc_key=key)])
        h_packet = tx_fw.add_sa([_sa(0x2002, Direction.OUTBOUND, enc_key=key)], packet_offload=True)
        rx_fw.add_sa([_sa(0x2001, Direction.INBOUND, enc_key=key)])
        rx_fw.add_sa([_sa(0x2002, Direction.INBOUND, enc_key=key)], packet_offload=True)
        t = tx_fw.transmit
        return cls(lambda f: t(f, h_crypto, False), lambda f: t(f, h_packet, True), rx_fw.receive)


def firmware_frames(budget: Budget, say: Progress, sizes=SIZES) -> tuple[list[Row], dict[int, float]]:
    """Rows, and the packet-offload transmit rate per size (the datapath figure's reference)."""
    from device.contract.status import CryptoStatus
    from firmware_model.firmware import TxOutcome

    key = os.urandom(20)
    aead = AESGCM(key[:16])
    nonce, aad = os.urandom(12), os.urandom(8)
    rig = FirmwareRig.build(key)
    rows: list[Row] = []
    tx_packet_rate: dict[int, float] = {}
    for size in sizes:
        say(f"firmware per frame (transmit/receive, crypto and packet offload), {size} B")
        pkt = ipv4_packet(size)
        crypto_frame = host_built_esp(0x2001, 7, size)
        plain_frame = ETH_HEAD + pkt
        crypto_wire = rig.transmit_crypto(crypto_frame)
        packet_wire = rig.transmit_packet(plain_frame)
        assert crypto_wire.status == packet_wire.status == TxOutcome.OK, "firmware refused the frame"
        got = rig.receive(crypto_wire.frame)
        assert got.crypto_status == CryptoStatus.SUCCESS, "firmware did not decrypt its own frame"
        assert rig.receive(packet_wire.frame).frame == plain_frame, "packet offload round trip failed"
        sealed = aead.encrypt(nonce, pkt, aad)
        raw_enc, raw_dec, txc, txp, rxc, rxp = rates([
            (lambda p: aead.encrypt(nonce, p, aad), pkt),
            (lambda c: aead.decrypt(nonce, c, aad), sealed),
            (rig.transmit_crypto, crypto_frame),
            (rig.transmit_packet, plain_frame),
            (rig.receive, crypto_wire.frame),
            (rig.receive, packet_wire.frame),
        ], budget.seconds, budget.rounds)
        tx_packet_rate[size] = txp
        tgt = FIRMWARE_TARGET.get(size)
        rows += [
            Row(f"firmware transmit, crypto offload {size} B", txc, "frame/s", raw_enc, "AESGCM.encrypt/s", tgt),
            Row(f"firmware transmit, packet offload {size} B", txp, "frame/s", raw_enc, "AESGCM.encrypt/s", tgt),
            Row(f"firmware receive, crypto offload {size} B", rxc, "frame/s", raw_dec, "AESGCM.decrypt/s", tgt),
            Row(f"firmware receive, packet offload {size} B", rxp, "frame/s", raw_dec, "AESGCM.decrypt/s", tgt),
        ]
    return rows, tx_packet_rate


def scapy_esp(budget: Budget, say: Progress, sizes=(64, 1400)) -> list[Row]:
    """scapy's ESP on the same packets; the firmware (packet offload, per frame) must be ≥ 200× it."""
    from scapy.layers.inet import IP
    from scapy.layers.ipsec import ESP, SecurityAssociation

    key = os.urandom(20)
    rig = FirmwareRig.build(key)
    rows = []
    for size in sizes:
        say(f"scapy ESP against the firmware, {size} B")
        pkt = ipv4_packet(size)
        plain_frame = ETH_HEAD + pkt
        wire = rig.transmit_packet(plain_frame).frame
        sa = SecurityAssociation(ESP, spi=0x2002, crypt_algo="AES-GCM", crypt_key=key)
        # Bytes in, bytes out, as the firmware is measured (scapy's decrypt also edits its argument).
        def s_encrypt(b: bytes, sa=sa) -> bytes:
            return bytes(sa.encrypt(IP(b)))

        def s_decrypt(b: bytes, sa=sa) -> bytes:
            return bytes(sa.decrypt(IP(b)))

        assert s_decrypt(s_encrypt(pkt)) == pkt, "scapy round trip failed"
        assert s_decrypt(wire[14:]) == pkt, "scapy cannot read the firmware's ESP"
        # scapy is ~1000x slower: small batches so it gets as many slices as the firmware.
        s_enc, s_dec = rates([(s_encrypt, pkt), (s_decrypt, wire[14:])], budget.seconds, budget.rounds,
                             batch=2)
        fw_tx, fw_rx = rates([(rig.transmit_packet, plain_frame), (rig.receive, wire)],
                             budget.seconds, budget.rounds)
        rows.append(Row(f"firmware vs scapy encrypt {size} B", fw_tx, "frame/s", s_enc,
                        "scapy encrypt/s", SCAPY_TARGET))
        rows.append(Row(f"firmware vs scapy decrypt {size} B", fw_rx, "frame/s", s_dec,
                        "scapy decrypt/s", SCAPY_TARGET))
    return rows
