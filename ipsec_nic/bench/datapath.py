"""The card's datapath without a VM, and how many register accesses cost a vfio-user message.

A host-side driver (guest_tools' Card, the same code the guest runs) drives the real card behind the
real vfio-user server in a child process. Guest RAM is a memfd handed over with DMA_MAP, as QEMU does,
so descriptors and buffers are shared memory and only register accesses travel over the socket; a
register inside an area the server lets the client mmap costs no message at all (vfio_client.py).

* TX: 1400-byte IPv4/UDP packets pushed TX -> firmware -> wire (a wire that drops every frame with the
  link up), packet offload and crypto offload; frames/s of wall time (client and server unpinned, as
  QEMU and the card run) against ``Firmware.transmit`` alone on the same frames, in alternating bursts;
  also frames per second of server CPU against the firmware's frames per second of CPU.
* share: accesses and messages counted per frame on the TX and RX hot paths (RX through the loopback
  wire).
"""

from __future__ import annotations

import mmap
import os
import statistics
import time
from pathlib import Path

from .core import Progress, Row, at_least
from .esp import ETH_HEAD, FirmwareRig, ipv4_packet
from .servers import Child, card_server
from .vfio_client import AccessCounts

IOVA = 0x1_0000_0000
RAM = 16 << 20
RING = 256
SIZE = 1400
BURST = 32  # frames queued behind one TX doorbell (the driver's tx_burst)
DATAPATH_TARGET = at_least(0.5)
SHARE_TARGET = at_least(0.9)
PEER_MAC = bytes.fromhex("020000000002")


def _memfd_memory(size: int):
    """guest_tools' ArrayMemory over a memfd instead of a bytearray (the fd goes to DMA_MAP)."""
    from guest_tools.dma import ArrayMemory, DmaMemory, _Bump

    class MemfdMemory(ArrayMemory):
        kind = "memfd"

        def __init__(self) -> None:
            DmaMemory.__init__(self)
            # sealable, as QEMU's memory-backend-memfd (seal=on): the server seals it against shrinking and
            # then touches it through its mapping, not with fstat + pread/pwrite per access (vfio_user/dma.py)
            self.fd = os.memfd_create("ipsec-nic-bench-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.fd, size)
            self.memory = mmap.mmap(self.fd, size)
            self.base = IOVA
            self._whole = _Bump(memoryview(self.memory), IOVA)

    return MemfdMemory()


class HostRig:
    """Card server child + link + guest_tools Card over it."""

    def __init__(self, sock: Path, wire: str, receive: bool) -> None:
        from device.contract import regs
        from device.pci.config_space import COMMAND, Command
        from device.vfio_user.device_api import REGION_BAR0, REGION_CONFIG
        from guest_tools.driver import Card

        from .vfio_client import LinkMmio, VfioUserLink

        self.child = Child(sock, card_server(wire))
        try:
            self.memory = _memfd_memory(RAM)
            self.link = VfioUserLink(str(sock))
            self.link.negotiate()
            self.link.dma_map(IOVA, RAM, self.memory.fd)
            self.link.region_write_posted(REGION_CONFIG, COMMAND,
                                          int(Command.MEMORY | Command.BUS_MASTER).to_bytes(2, "little"))
            self.link.region_read(REGION_CONFIG, COMMAND, 2)  # the posted write has landed
            self.mmio = LinkMmio(self.link, REGION_BAR0, regs.BAR0_SIZE)
            # the mirror BAR, mmapped where the server allows it (as QEMU does); its reads count too
            self.mirror = LinkMmio(self.link, regs.MIRROR_BAR, regs.MIRROR_BAR_SIZE)
            self.card = Card(self.mmio, self.memory, ring_size=RING, receive=receive,
                             mirror=self.mirror).init(reset=True)
        except BaseException:
            self.child.stop()
            raise

    def close(self) -> None:
        try:
            self.card.close()
            self.mmio.close()
            self.link.close()
        finally:
            self.child.stop()


def _sa(direction, spi: int):
    from device.contract.sa import Direction, EncAlg, IpProto, Mode, SaParams

    src, dst = ("10.0.0.1", "10.0.0.2") if direction == Direction.OUTBOUND else ("10.0.0.2", "10.0.0.1")
    return SaParams(spi=spi, proto=IpProto.ESP, direction=direction, mode=Mode.TRANSPORT, src=src, dst=dst,
                    enc_alg=EncAlg.AES_GCM_128, enc_key=os.urandom(20), icv_len=16)


def _push(rig: HostRig, frame: bytes, n: int, handle: int, mode: str) -> tuple[float, float]:
    """Send n frames and wait for all completions: (wall seconds, server CPU seconds)."""
    card = rig.card
    c0, t0 = rig.child.cpu(), time.perf_counter()
    for first in range(0, n, BURST):
        with card.tx_burst():  # one TAIL doorbell per BURST frames, as a NIC driver batches (xmit_more)
            for _ in range(min(BURST, n - first)):
                card.send(frame, handle, mode)
    done = card.flush_tx()
    wall, cpu = time.perf_counter() - t0, rig.child.cpu() - c0
    bad = [c for c in done if c.status != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(done)} frames failed on TX: first status {bad[0].status_name}")
    return wall, cpu


def _reference_burst(fn, frame: bytes, n: int) -> tuple[float, float]:
    """n calls of the firmware alone: (wall seconds, this thread's CPU seconds)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(n):
        fn(frame)
    return time.perf_counter() - t0, time.thread_time() - c0


def host_datapath(run_dir: Path, frames: int, say: Progress, rounds: int) -> list[Row]:
    """Rounds alternate a datapath burst and a burst of the firmware alone on the same frames, so the wall
    clock of both sees the same machine load (a neighbour's burst slows both); medians over the rounds."""
    from device.contract.enums import Direction

    from .esp import host_built_esp

    say(f"datapath over vfio-user (host-side driver, memfd rings) vs the firmware alone: "
        f"{frames:,} frames per mode")
    fw = FirmwareRig.build(os.urandom(20))
    ref_fn = {"packet": (fw.transmit_packet, ETH_HEAD + ipv4_packet(SIZE)),
              "crypto": (fw.transmit_crypto, host_built_esp(0x2001, 7, SIZE))}
    rig = HostRig(run_dir / "dp-card.sock", "discard", receive=False)
    results = {}
    try:
        card = rig.card
        # send() takes the destination MAC from the frame: make it the peer's, the source ours.
        frame = PEER_MAC + card.ident.mac + ETH_HEAD[12:] + ipv4_packet(SIZE)
        handles = {"packet": card.add_sa(_sa(Direction.OUTBOUND, 0x3001), offload="packet"),
                   "crypto": card.add_sa(_sa(Direction.OUTBOUND, 0x3002), offload="crypto")}
        per = max(1, frames // rounds)
        for mode, handle in handles.items():
            fn, ref_frame = ref_fn[mode]
            _push(rig, frame, min(500, per), handle, mode)  # warm-up
            _reference_burst(fn, ref_frame, min(500, per))
            before = rig.link.counts.snapshot()
            walls, cpus, ref_walls, ref_cpus = [], [], [], []
            for _ in range(rounds):
                wall, cpu = _push(rig, frame, per, handle, mode)
                ref_wall, ref_cpu = _reference_burst(fn, ref_frame, per)
                walls.append(per / wall)
                cpus.append(per / cpu)
                ref_walls.append(per / ref_wall)
                ref_cpus.append(per / ref_cpu)
            results[mode] = ([statistics.median(x) for x in (walls, cpus, ref_walls, ref_cpus)],
                             rig.link.counts.since(before))
        frames = per * rounds
    finally:
        rig.close()
    rows: list[Row] = []
    for mode in ("packet", "crypto"):
        (wall_rate, cpu_rate, ref_wall, ref_cpu), _ = results[mode]
        rows.append(Row(f"datapath over vfio-user, TX {mode} offload {SIZE} B", wall_rate, "frame/s", ref_wall,
                        f"Firmware.transmit ({mode} offload)/s, wall", DATAPATH_TARGET))
        rows.append(Row(f"datapath over vfio-user, TX {mode} offload {SIZE} B, per server CPU second",
                        cpu_rate, "frame/s", ref_cpu, f"Firmware.transmit ({mode} offload)/s, CPU"))
    counts = results["packet"][1] + results["crypto"][1]
    rows.append(Row("datapath TX: vfio-user messages per frame", counts.messages / (2 * frames), "msg/frame",
                    note=f"{counts.accesses / (2 * frames):.2f} register accesses per frame"))
    rows += _share_rows(run_dir, min(frames, 2000), say, counts)
    return rows


def _share_rows(run_dir: Path, frames: int, say: Progress, tx: AccessCounts) -> list[Row]:
    """Share of hot-path register accesses that cost no vfio-user message: TX from the run above, RX
    through the loopback wire (counted inside recv() only, which reads descriptors from RAM and writes
    the RX tail doorbell)."""
    say(f"hot-path register accesses: RX through the loopback wire, {frames:,} frames")
    rig = HostRig(run_dir / "dp-loop.sock", "loopback", receive=True)
    rx = AccessCounts()
    got = 0
    try:
        card = rig.card
        # The loopback wire hands our own frame back: addressed to the card, or its MAC filter drops it.
        frame = card.ident.mac + PEER_MAC + ETH_HEAD[12:] + ipv4_packet(SIZE)
        deadline = time.monotonic() + 60
        while got < frames and time.monotonic() < deadline:
            with card.tx_burst():
                for _ in range(min(BURST, frames - got)):
                    card.send(frame)
            card.flush_tx()
            before = rig.link.counts.snapshot()
            got += len(card.recv(timeout=1.0, limit=64))
            rx = rx + rig.link.counts.since(before)
    finally:
        rig.close()
    if not got:
        raise RuntimeError("no frame came back through the loopback wire")
    rows = []
    for label, c in (("TX", tx), ("RX", rx), ("TX+RX", tx + rx)):
        free = c.accesses - c.messages
        rows.append(Row(f"hot path {label}: register accesses that cost no message",
                        100.0 * free / c.accesses if c.accesses else 0.0, "%",
                        note=f"{c.accesses:,} accesses, {c.messages:,} messages"))
    both = tx + rx
    rows.append(Row("hot path TX+RX: register reads served from mmapped pages",
                    100.0 * both.mapped_reads / both.reads if both.reads else 0.0, "%", 100.0,
                    f"% = all {both.reads:,} hot-path reads", SHARE_TARGET))
    return rows
