"""ESP engine and firmware facade throughput (not a test).

Packets/s for AES-GCM-128 transport-mode IPv4 at 64/512/1400-byte IP packets, each shown as a ratio to a
bare `AESGCM.encrypt` / `decrypt` call (key object reused, 8-byte AAD, same packet size) measured in the
same run:

* engine: `EspEngine.encapsulate` / `decapsulate` (packet offload, bytes in / bytes out);
* facade: what the card calls per Ethernet frame -- `Firmware.transmit` with crypto offload (the host
  built the ESP framing) and with packet offload (by handle), and `Firmware.receive` for a crypto-offload
  and a packet-offload inbound SA.

The machines are shared (other helpers run QEMU), so every function is measured in short slices,
round-robin with the reference calls, timed in thread CPU time, and keeps its best slice (best-of-N).
Usage: .venv/bin/python tests/bench/bench_esp.py [seconds per function and size] [rounds]
"""

from __future__ import annotations

import os
import struct
import sys
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from device.contract.enums import Direction, EncAlg, IpProto, Mode
from device.contract.sa import SaParams
from device.contract.status import CryptoStatus
from firmware_model.capabilities import Capabilities
from firmware_model.engine import SaEngine
from firmware_model.firmware import Firmware, TxOutcome

ETH_HEAD = bytes.fromhex("020000000002" "020000000001" "0800")
SRC, DST = "10.0.0.1", "10.0.0.2"


def best_rates(fns, seconds: float, rounds: int = 12) -> list[float]:
    """Best calls/s of each (fn, arg) over `rounds` interleaved slices: the machines are shared and
    noisy, so the reference and the engine are measured alternately and each keeps its best slice.
    Rates are per second of this thread's CPU time, so time spent descheduled does not count."""
    best = [0.0] * len(fns)
    slice_s = seconds / rounds
    for _ in range(rounds):
        for i, (fn, arg) in enumerate(fns):
            n = 0
            cpu = time.thread_time()
            deadline = time.perf_counter() + slice_s
            while True:
                for _ in range(500):
                    fn(arg)
                n += 500
                if time.perf_counter() >= deadline:
                    break
            best[i] = max(best[i], n / (time.thread_time() - cpu))
    return best


def ipv4_header(total: int, proto: int) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0,
                                bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    s = sum(struct.unpack("!10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(hdr)


def ipv4_packet(size: int) -> bytes:
    payload = os.urandom(size - 28)
    udp = struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0)
    return ipv4_header(size, 17) + udp + payload


def host_built_esp(spi: int, seq: int, size: int) -> bytes:
    """A crypto-offload transmit frame as an NDIS host builds it: IPv4 | ESP header | zeroed IV room |
    UDP payload + trailer | zeroed ICV room (RFC 4303 §2)."""
    inner = ipv4_packet(size)[20:]
    padlen = -(len(inner) + 2) % 4
    esp = struct.pack("!II", spi, seq) + bytes(8) + inner + bytes(range(1, padlen + 1)) + bytes((padlen, 17)) + bytes(16)
    return ETH_HEAD + ipv4_header(20 + len(esp), 50) + esp


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.2  # per measured function and size
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    key = os.urandom(20)
    base = dict(proto=IpProto.ESP, mode=Mode.TRANSPORT, src=SRC, dst=DST,
                enc_alg=EncAlg.AES_GCM_128, enc_key=key, replay_window=0)
    aead = AESGCM(key[:16])
    nonce, aad = os.urandom(12), os.urandom(8)

    # facade: one card sending (crypto offload 0x2001, packet offload 0x2002) and one receiving
    tx_fw, rx_fw = Firmware(Capabilities()), Firmware(Capabilities())
    h_crypto = tx_fw.add_sa([SaParams(spi=0x2001, direction=Direction.OUTBOUND, **base)])
    h_packet = tx_fw.add_sa([SaParams(spi=0x2002, direction=Direction.OUTBOUND, **base)], packet_offload=True)
    rx_fw.add_sa([SaParams(spi=0x2001, direction=Direction.INBOUND, **base)])
    # replay window 0 (as for the engine): the same frame can be received again and again
    rx_fw.add_sa([SaParams(spi=0x2002, direction=Direction.INBOUND, **base)], packet_offload=True)

    engine_head = f"{'size':>5} {'raw enc/s':>10} {'encap/s':>9} {'ratio':>5} {'raw dec/s':>10} {'decap/s':>9} {'ratio':>5}"
    facade_head = (f"{'size':>5} {'tx-crypto/s':>11} {'ratio':>5} {'tx-packet/s':>11} {'ratio':>5} "
                   f"{'rx-crypto/s':>11} {'ratio':>5} {'rx-packet/s':>11} {'ratio':>5}")
    engine_rows, facade_rows = [], []
    for size in (64, 512, 1400):
        pkt = ipv4_packet(size)
        tx = SaEngine(SaParams(spi=0x1000, direction=Direction.OUTBOUND, **base))
        rx = SaEngine(SaParams(spi=0x1000, direction=Direction.INBOUND, **base))
        wire = tx.encapsulate(pkt)[1]
        assert rx.decapsulate(wire)[1] == pkt
        sealed = aead.encrypt(nonce, pkt, aad)

        crypto_frame = host_built_esp(0x2001, 7, size)
        plain_frame = ETH_HEAD + pkt
        crypto_wire = tx_fw.transmit(crypto_frame, h_crypto, False)
        packet_wire = tx_fw.transmit(plain_frame, h_packet, True)
        assert crypto_wire.status == packet_wire.status == TxOutcome.OK
        got = rx_fw.receive(crypto_wire.frame)
        assert got.crypto_status == CryptoStatus.SUCCESS and got.frame[50:30 + size] == crypto_frame[50:30 + size]
        assert rx_fw.receive(packet_wire.frame).frame == plain_frame

        def tx_crypto(f, _t=tx_fw.transmit, _h=h_crypto):
            return _t(f, _h, False)

        def tx_packet(f, _t=tx_fw.transmit, _h=h_packet):
            return _t(f, _h, True)

        (raw_enc, enc, raw_dec, dec, txc, txp, rxc, rxp) = best_rates([
            (lambda p: aead.encrypt(nonce, p, aad), pkt),
            (tx.encapsulate, pkt),
            (lambda c: aead.decrypt(nonce, c, aad), sealed),
            (rx.decapsulate, wire),  # replay window off: the same packet can be fed again
            (tx_crypto, crypto_frame),
            (tx_packet, plain_frame),
            (rx_fw.receive, crypto_wire.frame),
            (rx_fw.receive, packet_wire.frame),
        ], seconds, rounds)
        engine_rows.append(f"{size:>5} {raw_enc:>10,.0f} {enc:>9,.0f} {enc / raw_enc:>5.2f} "
                           f"{raw_dec:>10,.0f} {dec:>9,.0f} {dec / raw_dec:>5.2f}")
        facade_rows.append(f"{size:>5} {txc:>11,.0f} {txc / raw_enc:>5.2f} {txp:>11,.0f} {txp / raw_enc:>5.2f} "
                           f"{rxc:>11,.0f} {rxc / raw_dec:>5.2f} {rxp:>11,.0f} {rxp / raw_dec:>5.2f}")
        print(engine_rows[-1], "|", facade_rows[-1][5:], flush=True)
    print("\nengine (EspEngine, AES-GCM-128 transport IPv4), ratio = engine / raw AESGCM call:")
    print(engine_head, *engine_rows, sep="\n")
    print("\nfacade (Firmware.transmit / receive per Ethernet frame), tx ratio vs raw encrypt, rx vs raw decrypt:")
    print(facade_head, *facade_rows, sep="\n")


if __name__ == "__main__":
    main()
