"""ESP engine throughput (not a test): packets/s for AES-GCM-128 transport-mode IPv4 encap/decap at
64/512/1400-byte packets, and the ratio to a bare `AESGCM.encrypt` / `decrypt` call (key object reused,
8-byte AAD) measured in the same run. Usage: .venv/bin/python tests/bench/bench_esp.py [seconds]"""

from __future__ import annotations

import os
import struct
import sys
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from firmware_model.engine import SaEngine
from firmware_model.params import Direction, EncAlg, IpProto, Mode, SaParams


def best_rates(fns, seconds: float, rounds: int = 12) -> list[float]:
    """Best calls/s of each (fn, arg) over `rounds` interleaved slices: the machines are shared and
    noisy, so the reference and the engine are measured alternately and each keeps its best slice."""
    best = [0.0] * len(fns)
    slice_s = seconds / rounds
    for _ in range(rounds):
        for i, (fn, arg) in enumerate(fns):
            n = 0
            start = time.perf_counter()
            deadline = start + slice_s
            while True:
                for _ in range(500):
                    fn(arg)
                n += 500
                now = time.perf_counter()
                if now >= deadline:
                    break
            best[i] = max(best[i], n / (now - start))
    return best


def ipv4_packet(size: int) -> bytes:
    payload = os.urandom(size - 28)
    udp = struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0, 64, 17, 0,
                                bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    words = struct.unpack("!10H", hdr)
    s = sum(words)
    s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(hdr) + udp + payload


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.2  # per measured function and size
    key = os.urandom(20)
    base = dict(spi=0x1000, proto=IpProto.ESP, mode=Mode.TRANSPORT, src="10.0.0.1", dst="10.0.0.2",
                enc_alg=EncAlg.AES_GCM_128, enc_key=key, replay_window=0)
    aead = AESGCM(key[:16])
    nonce, aad = os.urandom(12), os.urandom(8)
    print(f"{'size':>6} {'raw enc/s':>11} {'encap/s':>10} {'ratio':>6} {'raw dec/s':>11} {'decap/s':>10} {'ratio':>6}")
    for size in (64, 512, 1400):
        pkt = ipv4_packet(size)
        tx = SaEngine(SaParams(direction=Direction.OUTBOUND, **base))
        rx = SaEngine(SaParams(direction=Direction.INBOUND, **base))
        wire = tx.encapsulate(pkt)[1]
        assert rx.decapsulate(wire)[1] == pkt
        sealed = aead.encrypt(nonce, pkt, aad)
        raw_enc, enc, raw_dec, dec = best_rates([
            (lambda p: aead.encrypt(nonce, p, aad), pkt),
            (tx.encapsulate, pkt),
            (lambda c: aead.decrypt(nonce, c, aad), sealed),
            (rx.decapsulate, wire),  # replay window off: the same packet can be fed again
        ], seconds)
        print(f"{size:>6} {raw_enc:>11,.0f} {enc:>10,.0f} {enc / raw_enc:>6.2f} "
              f"{raw_dec:>11,.0f} {dec:>10,.0f} {dec / raw_dec:>6.2f}")


if __name__ == "__main__":
    main()
