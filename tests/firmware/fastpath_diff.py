"""Differential check of the engine's IPv4 AES-GCM fast paths (not a benchmark; no pytest needed).

EspEngine takes straight-line code for option-less IPv4 + AES-GCM-16 + transport + no ESN/UDP-ESP and
leaves every other shape to its general code. This feeds the same random and mutated packets to an
engine with the fast path and to a twin with it switched off, and requires identical verdicts, output
bytes, in-place frame contents, counters, sequence numbers and replay windows.
tests/firmware/test_fastpath_diff.py runs it in the suite; for long runs:
    .venv/bin/python -m tests.firmware.fastpath_diff [iterations] [seed]
"""

from __future__ import annotations

import random
import struct
import sys
from collections import Counter
from dataclasses import astuple

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.sa import SaParams
from firmware_model.engine import SaEngine

KEY = bytes(range(16)) + b"salt"
# the SA shapes with a fast path: AES-GCM-16 (FastV4EspEngine), AES-CBC + HMAC (FastV4CbcEngine)
ALGS = [
    dict(enc_alg=EncAlg.AES_GCM_128, enc_key=KEY),
    dict(enc_alg=EncAlg.AES_CBC_128, enc_key=KEY[:16], auth_alg=AuthAlg.SHA256, auth_key=bytes(range(32)),
         icv_len=16),
    dict(enc_alg=EncAlg.AES_CBC_256, enc_key=bytes(32), auth_alg=AuthAlg.SHA1, auth_key=bytes(20), icv_len=12),
]


def ipv4(rng: random.Random, payload_len: int, proto: int = 17) -> bytes:
    total = 20 + payload_len
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, rng.randrange(256), total, rng.randrange(65536),
                                rng.choice((0, 0x4000)), rng.randrange(1, 256), proto, 0,
                                bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    s = sum(struct.unpack("!10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    if rng.random() < 0.8:  # sometimes leave a wrong checksum: it must not be carried over either way
        hdr[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(hdr) + rng.randbytes(payload_len)


def mutate(rng: random.Random, pkt: bytes) -> bytes:
    b = bytearray(pkt)
    for _ in range(rng.randrange(1, 3)):
        what = rng.randrange(8)
        if what == 0 and b:
            del b[rng.randrange(len(b)):]  # truncate
        elif what == 1 and len(b) > 3:
            b[2:4] = struct.pack("!H", rng.randrange(65536))  # total length
        elif what == 2 and len(b) > 9:
            b[9] = rng.choice((50, 51, 17, 6, 59))
        elif what == 3 and len(b) > 7:
            b[6] = rng.choice((0x20, 0x00, 0x40, 0x01))  # MF / fragment offset
        elif what == 4 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)  # bit flip anywhere (ICV, padding, SPI ...)
        elif what == 5 and b:
            b[0] = rng.choice((0x46, 0x44, 0x65, 0x45))
        elif what == 6:
            b += rng.randbytes(rng.randrange(1, 8))  # link-layer padding after the packet
        elif what == 7 and len(b) > 27:
            b[24:28] = struct.pack("!I", rng.choice((0, 1, 5, 0xFFFFFFFF)))  # ESP sequence number
    return bytes(b)


def host_built(rng: random.Random, spi: int) -> bytes:
    """A crypto-offload IPv4 ESP packet as a host builds it: ESP header, IV room, payload, RFC 4303
    trailer (sometimes next header 59 or bad padding), ICV room."""
    inner = rng.randbytes(rng.choice((0, 1, 5, 30, 500)))
    padlen = -(len(inner) + 2) % 4
    pad = bytes(range(1, padlen + 1)) if rng.random() < 0.9 else bytes(padlen)
    esp = (struct.pack("!II", spi, rng.randrange(1, 50)) + bytes(8) + inner + pad
           + bytes((padlen, rng.choice((17, 17, 59)))) + bytes(16))
    return ipv4(rng, 0, 50)[:20] + esp


def fix_total(pkt: bytes) -> bytes:
    return pkt[:2] + struct.pack("!H", len(pkt)) + pkt[4:]


def state(e) -> tuple:
    tr = e.transform
    cbc = (tr._enc_chain, tr._dec_chain, tr._iv_counter) if hasattr(tr, "_ivgen") else ()
    return (astuple(e.stats), e._seq, e._iv_last, e.window.top, tuple(e.window._bits), e.soft_expired,
            e.hard_expired, e.seq_nearly_exhausted, cbc)


def same_iv_generator(a, b) -> None:
    """AES-CBC IVs come from a per-SA random key (esp.CbcHmacTransform): give both twins the same one."""
    if hasattr(a.transform, "_ivgen"):
        key = bytes(range(100, 116))
        a.transform._ivgen = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        b.transform._ivgen = Cipher(algorithms.AES(key), modes.ECB()).encryptor()


def twins(params: SaParams):
    fast, slow = SaEngine(params), SaEngine(params)
    assert fast._v4_encrypt is not None, "the fast path should be on for these parameters"
    slow._v4_encrypt = slow._v4_decrypt = None
    same_iv_generator(fast, slow)
    return fast, slow


def compare(iterations: int, seed: int) -> tuple[int, Counter]:
    """Run both twins on the same random traffic; returns (operations checked, outcomes seen)."""
    rng = random.Random(seed)
    checked = 0
    seen: Counter = Counter()  # (operation, verdict): shows the mutations reach every outcome
    for round_ in range(iterations // 500):
        kw = dict(spi=0x1234, proto=IpProto.ESP, mode=Mode.TRANSPORT, src="10.0.0.1", dst="10.0.0.2",
                  **rng.choice(ALGS), replay_window=rng.choice((0, 32, 64, 1024)),
                  seq=rng.choice((0, 0, 0xFFFF_FF00, 0xFFFF_FFFE)),
                  soft_packets=rng.choice((0, 0, 50)), hard_packets=rng.choice((0, 0, 300)),
                  soft_bytes=rng.choice((0, 0, 20000)))
        tx_fast, tx_slow = twins(SaParams(direction=Direction.OUTBOUND, **kw))
        rx_fast, rx_slow = twins(SaParams(direction=Direction.INBOUND, **{**kw, "seq": 0}))
        sent = []
        for _ in range(500):
            pkt = ipv4(rng, rng.choice((0, 1, 2, 3, 8, 36, 100, 1380, rng.randrange(2000))),
                       rng.choice((17, 6, 59, 50)))
            if rng.random() < 0.3:
                pkt = mutate(rng, pkt)
            a, b = tx_fast.encapsulate(pkt), tx_slow.encapsulate(pkt)
            assert a == b and state(tx_fast) == state(tx_slow), (round_, "encapsulate", pkt.hex())
            seen["encap", a[0].name] += 1
            if a[1]:
                sent.append(a[1])
            wire = rng.choice(sent) if sent and rng.random() < 0.2 else (a[1] or pkt)  # replays too
            if rng.random() < 0.4:
                wire = mutate(rng, wire)
            a, b = rx_fast.decapsulate(wire), rx_slow.decapsulate(wire)
            assert a == b and state(rx_fast) == state(rx_slow), (round_, "decapsulate", wire.hex())
            seen["decap", a[0].name] += 1
            # crypto offload, in place in an Ethernet-sized buffer with the IP packet at offset 14
            if rng.random() < 0.5:
                wire = fix_total(host_built(rng, 0x1234 if rng.random() < 0.9 else 0x999))
                if rng.random() < 0.2:
                    wire = mutate(rng, wire)
            f1, f2 = bytearray(14) + bytearray(wire), bytearray(14) + bytearray(wire)
            a, b = tx_fast.crypto_encrypt(f1, 14), tx_slow.crypto_encrypt(f2, 14)
            assert a == b and f1 == f2 and state(tx_fast) == state(tx_slow), (round_, "crypto_encrypt", wire.hex())
            seen["crypto_encrypt", a.name] += 1
            if rng.random() < 0.3:
                f1 = bytearray(mutate(rng, bytes(f1[14:])))
                f1[:0] = bytes(14)
            f2 = bytearray(f1)
            a, b = rx_fast.crypto_decrypt(f1, 14), rx_slow.crypto_decrypt(f2, 14)
            assert a == b and f1 == f2 and state(rx_fast) == state(rx_slow), (round_, "crypto_decrypt", f1.hex())
            seen["crypto_decrypt", a.name] += 1
            checked += 4
    return checked, seen


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    checked, seen = compare(iterations, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(f"fast and general paths agree on {checked} operations")
    for (op, verdict), count in sorted(seen.items()):
        print(f"  {op:<15} {verdict:<15} {count}")


if __name__ == "__main__":
    main()
