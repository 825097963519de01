"""Guest-side loops for `ipsec-nic bench` (runs on the VM's python3; standard library + guest_tools only).

    python3 -m ipsec_nic.bench.guest_loop mmio SECONDS   register reads/s and writes/s: the card vs edu
    python3 -m ipsec_nic.bench.guest_loop pps SECONDS    1400-byte frames/s through the Python guest tools

Each prints one line ``BENCH-JSON {...}`` for the host to parse.

mmio: the same Python loop (a ctypes cell on the sysfs BAR mapping: one 32-bit load or store per
iteration) on the card's BAR0 and on BAR0 of QEMU's own `edu` device (a device QEMU emulates itself,
no socket behind it). Card registers: M_ICR (BAR4 0x04), the register the driver reads while it waits
on the hot path, in the mirror BAR the card offers for mmap (a RAM load if QEMU mapped it); ICR (0x200),
its trapped source (every read a vfio-user round trip); the TX queue 0 TAIL doorbell (the queue is
disabled, so the card only stores it, but QEMU forwards the write exactly as a live doorbell). edu:
the identification register (0x00) and the liveness register (0x04, a plain store).
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import time

EDU_VENDOR, EDU_DEVICE = 0x1234, 0x11E8


def _bar_cell(dev, offset: int, bar: int = 0):
    import mmap

    path = dev.path / f"resource{bar}"
    fd = os.open(path, os.O_RDWR | os.O_SYNC)
    try:
        mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return mm, ctypes.c_uint32.from_buffer(mm, offset)


def _reads(cell, n: int) -> None:
    for _ in range(n):
        cell.value  # noqa: B018 - the load is the point


def _writes(cell, n: int) -> None:
    for _ in range(n):
        cell.value = 0


def mmio(seconds: float) -> dict:
    from device.contract import regs
    from guest_tools import pci

    card = pci.find_device(regs.VENDOR_ID, regs.DEVICE_ID)
    edu = pci.find_device(EDU_VENDOR, EDU_DEVICE)
    for dev in (card, edu):
        pci.enable_device(dev)
    maps = []
    loops = {}
    for name, dev, bar, offset, fn in (
        ("card_read", card, regs.MIRROR_BAR, regs.M_ICR, _reads),
        ("card_read_trapped", card, 0, regs.ICR, _reads),
        ("edu_read", edu, 0, 0x00, _reads),
        ("card_doorbell", card, 0, regs.txq_reg(0, regs.QREG_TAIL), _writes),
        ("edu_write", edu, 0, 0x04, _writes),
    ):
        mm, cell = _bar_cell(dev, offset, bar)
        maps.append((mm, cell))
        loops[name] = (fn, cell)
    # Interpreter floor: the same loop on ordinary memory (what Python costs without any MMIO).
    loops["python_floor"] = (_reads, ctypes.c_uint32(0))
    rounds = 5
    per: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (fn, cell) in loops.items():
            n = 0
            t0 = time.perf_counter()
            deadline = t0 + seconds / rounds / len(loops)
            while time.perf_counter() < deadline:
                fn(cell, 100)
                n += 100
            if r:
                per[name].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in per.items()}


def pps(seconds: float) -> dict:
    from device.contract.sa import Direction, EncAlg, IpProto, Mode, SaParams
    from guest_tools import packets
    from guest_tools.driver import open_card

    card = open_card(irq="poll", reset=True, ring_size=256, receive=False)
    try:
        peer_mac = bytes.fromhex("020000000002")
        ip = packets.udp_packet("192.0.2.1", "192.0.2.2", 4000, 5000, bytes(1400 - 28))
        frame = packets.ethernet(peer_mac, card.ident.mac, ip)

        def sa(spi: int) -> SaParams:
            return SaParams(spi=spi, proto=IpProto.ESP, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT,
                            src="192.0.2.1", dst="192.0.2.2", enc_alg=EncAlg.AES_GCM_128,
                            enc_key=os.urandom(20), icv_len=16)

        modes = {"plain": 0, "crypto": card.add_sa(sa(0x4001), "crypto"),
                 "packet": card.add_sa(sa(0x4002), "packet")}
        out: dict[str, float] = {}
        per: dict[str, list[float]] = {mode: [] for mode in modes}
        failed = dict.fromkeys(modes, 0)
        rounds = 5
        for r in range(rounds + 1):  # interleaved, so a neighbour's burst hits every mode alike; 0 warms up
            for mode, handle in modes.items():
                n = 0
                t0 = time.perf_counter()
                deadline = t0 + seconds / rounds / len(modes)
                while time.perf_counter() < deadline:
                    with card.tx_burst():  # one TAIL doorbell per 32 frames
                        for _ in range(32):
                            card.send(frame, handle, mode)
                    n += 32
                failed[mode] += sum(1 for c in card.flush_tx() if c.status != 0)
                if r:
                    per[mode].append(n / (time.perf_counter() - t0))
        for mode in modes:
            out[mode] = statistics.median(per[mode])
            if failed[mode]:
                out[mode + "_failed"] = failed[mode]
        out["tx_packets"] = card.stats()["tx_packets"]
        return out
    finally:
        card.close()


def main(argv: list[str]) -> int:
    what, seconds = argv[0], float(argv[1])
    result = {"mmio": mmio, "pps": pps}[what](seconds)
    print("BENCH-JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
