"""VM packets/s of 1400-byte UDP through the card's Linux driver: crypto offload and packet offload against
software XFRM on the same card and against no IPsec, in one boot.

The test bed is ipsec_nic/topology.py with the kernel module and a ``wire_sink``: the card's netdev in the
guest's root netns, and the other end of the card's wire a host process (ipsec_nic/bench/wire_sink.py),
not a Linux peer in the guest. The guest's single TCG vCPU therefore does the sender's work only; with
the peer in the guest it also did the peer's software decryption, and the ratios measured the vCPU, not
the card (docs/performance.md, *Kernel driver packets/s*). The guest reaches the sink's address through a
permanent neighbour entry (SINK_MAC): nothing answers ARP on the wire.

For each slice the card side gets one AES-GCM-128 transport SA pair (ipsec_nic/kernel_scenarios.py) in
one of four modes — ``offload`` (crypto offload: `ip xfrm state ... offload crypto dev DEV`; the guest
kernel still builds each ESP packet, the card seals it), ``packet`` (packet offload: the states and the
policies with `offload packet dev DEV`; the guest hands the card the plain datagram and the card builds
the whole ESP packet, its sequence number and IV included), ``software`` (the same SA without `offload`:
the guest kernel encrypts) or ``plain`` (no SA) — and a sender in the guest sends 1400-byte IPv4/UDP
datagrams to the sink's address for a fixed time. What counts is what the sink
received and checked (wire_sink.py): under IPsec, ESP on the SA's SPI that authenticates and decrypts
with the keys the bench set up, to the sender's datagram; without, that datagram in clear. Whatever the
card or a queue dropped does not count, and one frame of the flow that fails a check fails the bench.
The sink's count is compared with the card's own `card_tx_packets` (frames its wire took): a difference
is reported in the rows' notes. Modes are interleaved round by round so a neighbour's burst on the host
hits all four alike; the median per mode is kept. The card's firmware counts what it sealed per kind
(`fw_tx_crypto`, `fw_tx_packet_offload`): each offload mode must have moved its own counter by at least
the datagrams the sink checked and the other one not at all, and neither may move without an offload.
The issue's targets (≥ 3× software XFRM, ≥ 0.7× no IPsec) are on crypto offload; packet offload is
reported beside it.

The sending time of a round is the caller's ``seconds_per_slice`` × BUDGET_MODES, shared by the modes:
adding packet offload did not lengthen the sending, each slice got shorter (the fixed cost per slice
did add up: see BUDGET_MODES).

The card runs the default profile with the mirror BAR's mmap withheld (``nic.mirror_mmap: false``,
datasheet section 2), for all four modes alike. The Linux driver never reads the mirror, and while
QEMU maps any region of the device it stops posting BAR writes (measured on QEMU 10.1 and 11.1), so with
the mirror offered every TAIL doorbell and interrupt acknowledgment of the driver would be a round trip
that the vCPU waits for (docs/performance.md, *Kernel driver packets/s*).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .core import Progress, Row, at_least

MODES = ("offload", "packet", "software", "plain")
# Mode -> the firmware counter of frames it must make the card seal (ethtool -S, kernel_scenarios).
OFFLOAD_KIND = {"offload": "crypto", "packet": "packet"}
# The runner's seconds per slice were set for three modes (crypto offload, software, plain); the four
# modes share that round's sending time. Each slice's fixed cost (SA set-up, the sender's python3
# start-up under TCG, settle, counters, the sink's checks: ~2.5 s) still comes once more per round.
BUDGET_MODES = 3
OFFLOAD_VS_SOFTWARE = at_least(3)  # issue 12: crypto offload ≥ 3× software XFRM
OFFLOAD_VS_PLAIN = at_least(0.7)  # issue 12: crypto offload ≥ 0.7× no IPsec
PACKET_BYTES = 1400  # the IPv4 packet; UDP payload = 1400 - 20 - 8
SINK_PORT = 9  # discard (RFC 863)
# The sink's MAC in the guest's permanent neighbour entry (locally administered, like QEMU's NICs).
SINK_MAC = "52:54:00:49:50:09"
SETTLE_S = 0.5  # after the sender stops: frames still in the card and its wire land
SECTION = "@@kpps "
# The card profile of these rows: the default, without the mirror mmap the Linux driver does not use.
CARD_PROFILE_OVERRIDES = {"nic": {"mirror_mmap": False}}
ETHTOOL_WIRE_TX = "card_tx_packets"  # frames the card's wire took (the card's TX_PACKETS register)

# The sender: unconnected sendto (an ICMP error then never fails a send), blocking, so the socket's
# send buffer paces it to what the driver takes; prints packets sent and the seconds it sent for.
SENDER = (
    "import socket, sys, time\n"
    "dst, port, secs, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "buf = bytes(size - 28)\n"
    "addr = (dst, port)\n"
    "send = s.sendto\n"
    "n = err = 0\n"
    "t0 = time.monotonic()\n"
    "end = t0 + secs\n"
    "while time.monotonic() < end:\n"
    "    for _ in range(32):\n"
    "        try:\n"
    "            send(buf, addr)\n"
    "            n += 1\n"
    "        except OSError:\n"
    "            err += 1\n"
    "print('KPPS-SENT', n, err, time.monotonic() - t0)\n"
)


@dataclasses.dataclass(frozen=True)
class Slice:
    """One mode's run: datagrams the sender handed to its socket, datagrams the sink received and checked,
    and the sender's seconds."""

    mode: str
    sent: int
    received: int
    seconds: float
    card_offloaded: int  # the driver's ipsec_tx_pkts moved by this much (crypto and packet offload alike)
    fw_crypto: int = 0  # the card firmware's tx_crypto (frames it sealed under crypto offload) moved by this much
    fw_packet: int = 0  # its tx_packet_offload (frames it encapsulated under packet offload) moved by this much
    doorbells: int = 0  # the driver's tx_doorbells (TXQ TAIL writes) moved by this much
    irqs: int = 0  # the driver's queue_irqs (interrupts on the queue vector) moved by this much
    card_cpu: float = 0.0  # CPU seconds of the card server (host) while the sender ran (CpuSampler)
    qemu_cpu: float = 0.0  # CPU seconds of QEMU (the whole guest, TCG) meanwhile
    sink_cpu: float = 0.0  # CPU seconds of the wire sink (host) during it (receiving only; checks come after)
    card_wait: float = 0.0  # seconds the card server's threads waited for a host CPU meanwhile
    qemu_wait: float = 0.0  # the same for QEMU's threads (vCPU, I/O)
    qdisc_drops: int = 0  # datagrams the guest's qdisc on the card's netdev dropped (root qdisc, tc -s)
    card_wire_tx: int = 0  # the card's card_tx_packets moved by this much (frames its wire took)
    wire_frames: int = 0  # frames the sink received, of any kind
    wire_refused: int = 0  # frames the card completed (driver tx_ok) but its wire did not take (sink queue full)
    refused: int = 0  # frames of the flow the sink refused (bad, replayed, or the other mode's kind)
    refusals: str = ""  # why, for the error message
    seq_gaps: int = 0  # ESP sequence numbers the sink never saw inside the range it saw

    @property
    def pps(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (proc(5) /proc/PID/stat fields 14 and 15), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """CPU seconds of some processes, then the seconds they waited for a CPU (run_delay_seconds), in the same
    order, sampled every ``period`` s in a thread while a guest command runs, so
    that the CPU of the sending itself can be cut out of a command that also starts python3 in the guest
    (about a second under TCG): ``window(seconds)`` is what each process used in the last ``seconds`` before
    stop(), which ends within a few hundred ms of the sender (the guest agent's reply)."""

    def __init__(self, pids: tuple[int | None, ...], period: float = 0.05) -> None:
        import threading

        self.pids = pids
        self.period = period
        self.samples: list[tuple[float, tuple[float, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import time

        self.samples.append((time.monotonic(), tuple(cpu_seconds(p) for p in self.pids)
                             + tuple(run_delay_seconds(p) for p in self.pids)))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def window(self, seconds: float) -> tuple[float, ...]:
        """CPU seconds per process between the last sample at least ``seconds`` before the end and the end."""
        return cpu_window(self.samples, seconds)


def cpu_window(samples: list[tuple[float, tuple[float, ...]]], seconds: float) -> tuple[float, ...]:
    end_t, end = samples[-1]
    start = next((v for t, v in reversed(samples) if t <= end_t - seconds), samples[0][1])
    return tuple(b - a for a, b in zip(start, end, strict=True))


def run_delay_seconds(pid: int | None) -> float:
    """Seconds the threads of a process waited on a run queue for a CPU (/proc/PID/task/*/schedstat, second
    field, ns; Documentation/scheduler/sched-stats.rst), 0 when unknown: how much a busy host held it back."""
    if pid is None:
        return 0.0
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


def cpu_per_packet(slices: list[Slice], mode: str) -> tuple[float, float]:
    """Median µs of card-server CPU and of QEMU CPU per received packet in ``mode``."""
    mine = [s for s in slices if s.mode == mode and s.received]
    if not mine:
        return 0.0, 0.0
    return (statistics.median(s.card_cpu / s.received * 1e6 for s in mine),
            statistics.median(s.qemu_cpu / s.received * 1e6 for s in mine))


def per_packet(slices: list[Slice], mode: str, field: str) -> float:
    """Median of a Slice counter per received packet in ``mode`` (0 when the driver has no such counter)."""
    mine = [s for s in slices if s.mode == mode and s.received]
    return statistics.median(getattr(s, field) / s.received for s in mine) if mine else 0.0


def sink_counts(mode: str, tally) -> tuple[int, int, str]:
    """(received, refused, why) of a wire_sink.Tally for ``mode``: under IPsec the ESP datagrams count and a
    clear one of the flow is refused (it leaked past the SA); without IPsec the other way round."""
    ipsec = mode != "plain"
    received, wrong = (tally.esp, tally.plain) if ipsec else (tally.plain, tally.esp)
    reasons = dict(tally.reasons)
    if wrong:
        reasons["clear UDP under IPsec" if ipsec else "ESP without an SA"] = wrong
    if tally.replayed:
        reasons["ESP sequence number seen twice"] = tally.replayed
    if tally.iv_reused:
        reasons["ESP IV used twice under one key"] = tally.iv_reused
    why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
    return received, tally.bad + wrong + tally.replayed + tally.iv_reused, why


def parse_qdisc_drops(text: str) -> int:
    """`dropped` of the root qdisc in `tc -s qdisc show dev DEV` (the first ` Sent ... (dropped N, ...` line;
    a root mq's own line already sums its children)."""
    m = re.search(r"^\s*Sent \d+ bytes \d+ pkt \(dropped (\d+),", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def parse_slice(mode: str, output: str, tally) -> Slice:
    """The slice from the guest command's output and the sink's wire_sink.Tally of the same slice."""
    from ipsec_nic.kernel_scenarios import (
        ETHTOOL_FW_TX_CRYPTO,
        ETHTOOL_FW_TX_PACKET,
        ETHTOOL_TX,
        parse_ethtool_stats,
        sections,
    )

    parts = sections(output, SECTION)
    sent_line = next((line.split() for line in parts.get("send", "").splitlines()
                      if line.startswith("KPPS-SENT ")), None)
    if sent_line is None:
        raise RuntimeError(f"{mode}: the guest sender printed no result:\n{output[-2000:]}")
    after = parse_ethtool_stats(parts.get("card_after", ""))
    before = parse_ethtool_stats(parts.get("card_before", ""))

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    received, refused, why = sink_counts(mode, tally)
    return Slice(mode, int(sent_line[1]), received, float(sent_line[3]), delta(ETHTOOL_TX),
                 fw_crypto=delta(ETHTOOL_FW_TX_CRYPTO), fw_packet=delta(ETHTOOL_FW_TX_PACKET), doorbells=delta("tx_doorbells"), irqs=delta("queue_irqs"), card_wire_tx=delta(ETHTOOL_WIRE_TX),
                 wire_refused=max(0, delta("tx_ok") - delta(ETHTOOL_WIRE_TX)),
                 wire_frames=tally.frames, refused=refused, refusals=why,
                 seq_gaps=tally.seq_gaps if mode != "plain" else 0,
                 qdisc_drops=parse_qdisc_drops(parts.get("qdisc_after", ""))
                 - parse_qdisc_drops(parts.get("qdisc_before", "")))


def busy(slices: list[Slice], mode: str, field: str) -> float:
    """Median share of one CPU a process used while the sender ran (CPU seconds / sending seconds)."""
    mine = [s for s in slices if s.mode == mode and s.seconds > 0]
    return statistics.median(getattr(s, field) / s.seconds for s in mine) if mine else 0.0


def kernel_rows(slices: list[Slice]) -> list[Row]:
    """The rows from the interleaved slices: the median packets/s per mode, each offload mode against each
    reference (targets on crypto offload only, issue 12; packet offload is reported)."""
    per = {m: [s.pps for s in slices if s.mode == m] for m in MODES}
    missing = [m for m, v in per.items() if not v]
    if missing:
        raise ValueError(f"no slice for mode(s) {', '.join(missing)}")
    med = {m: statistics.median(v) for m, v in per.items()}
    sent = {m: sum(s.sent for s in slices if s.mode == m) for m in MODES}
    got = {m: sum(s.received for s in slices if s.mode == m) for m in MODES}
    qdisc = {m: sum(s.qdisc_drops for s in slices if s.mode == m) for m in MODES}
    lost = "; ".join(f"{m} {1 - got[m] / sent[m]:.0%} (guest qdisc dropped {qdisc[m]})"
                     for m in MODES if sent[m]) or "-"
    # The sink's exactness, across all slices: frames the card's wire took that the sink never read.
    wire_lost = sum(max(0, s.card_wire_tx - s.wire_frames) for s in slices)
    refused = sum(s.wire_refused for s in slices)
    note = (f"{len(per['offload'])} interleaved rounds; receiver: host-side wire sink, every frame checked; "
            f"sent but not received: {lost}; frames the card completed but its wire did not take (the sink's "
            f"queue full): {refused}; frames the card's wire took and the sink did not read: {wire_lost}")
    cpu = {m: cpu_per_packet(slices, m) for m in MODES}

    def cpu_note(m: str) -> str:
        sink = per_packet(slices, m, "sink_cpu") * 1e6
        return (f"CPU per packet: card server {cpu[m][0]:.0f} µs, QEMU {cpu[m][1]:.0f} µs, sink {sink:.0f} µs; "
                f"per packet: {per_packet(slices, m, 'doorbells'):.2f} TX doorbells, "
                f"{per_packet(slices, m, 'irqs'):.2f} interrupts; busy while sending: card server "
                f"{busy(slices, m, 'card_cpu'):.0%}, QEMU {busy(slices, m, 'qemu_cpu'):.0%} of a CPU; waiting for a "
                f"host CPU meanwhile: card server {busy(slices, m, 'card_wait'):.0%}, QEMU {busy(slices, m, 'qemu_wait'):.0%}")

    return [
        Row("VM packets/s, kernel driver, crypto offload, 1400 B UDP", med["offload"], "pkt/s", med["software"],
            "pkt/s software XFRM, same SA, same card, mirror mmap off", OFFLOAD_VS_SOFTWARE, note=f"{note}; {cpu_note('offload')}"),
        Row("VM packets/s, kernel driver, crypto offload vs no IPsec, 1400 B UDP", med["offload"], "pkt/s",
            med["plain"], "pkt/s no IPsec, same card, mirror mmap off", OFFLOAD_VS_PLAIN),
        Row("VM packets/s, kernel driver, packet offload, 1400 B UDP", med["packet"], "pkt/s", med["software"],
            "pkt/s software XFRM, same SA, same card, mirror mmap off", note=cpu_note("packet")),
        Row("VM packets/s, kernel driver, packet offload vs no IPsec, 1400 B UDP", med["packet"], "pkt/s",
            med["plain"], "pkt/s no IPsec, same card, mirror mmap off"),
        Row("VM packets/s, kernel driver, software XFRM, 1400 B UDP", med["software"], "pkt/s",
            note=cpu_note("software")),
        Row("VM packets/s, kernel driver, no IPsec, 1400 B UDP", med["plain"], "pkt/s", note=cpu_note("plain")),
    ]


def check_slice(s: Slice) -> None:
    """A slice whose mode did not do what it says, or whose wire carried a frame of the flow that fails the
    sink's checks, is a bench failure, not a figure."""
    if s.refused:
        raise RuntimeError(f"{s.mode}: the sink refused {s.refused} frame(s) of the flow ({s.refusals})")
    if s.received <= 0:
        raise RuntimeError(f"{s.mode}: the sink received nothing ({s.sent} sent)")
    kind = OFFLOAD_KIND.get(s.mode)
    sealed = {"crypto": s.fw_crypto, "packet": s.fw_packet}
    if kind is None:
        if s.card_offloaded or any(sealed.values()):
            raise RuntimeError(f"{s.mode}: the card's offload counters moved (driver {s.card_offloaded}, firmware "
                               f"crypto {s.fw_crypto}, packet {s.fw_packet})")
        return
    if s.card_offloaded < s.received:
        raise RuntimeError(f"{s.mode}: the driver counted {s.card_offloaded} offloaded packets, the sink "
                           f"received {s.received}")
    if sealed[kind] < s.received:
        raise RuntimeError(f"{s.mode}: the card's firmware counted {sealed[kind]} {kind}-offload frames, the sink "
                           f"received {s.received}")
    other = next(k for k in sealed if k != kind)
    if sealed[other]:
        raise RuntimeError(f"{s.mode}: the card's firmware counted {sealed[other]} {other}-offload frames")


def sink_neighbour(dev: str, sink_addr: str) -> str:
    """Guest shell: the sink's address on the card's link, resolved without ARP (no host answers it)."""
    return f"ip neigh replace {sink_addr} lladdr {SINK_MAC} dev {dev} nud permanent"


FLUSH = "ip xfrm policy flush; ip xfrm state flush"  # the guest's own SAs (there is no peer netns here)


def slice_commands(mode: str, dev: str, sink_addr: str, seconds: float, card_sa: str) -> tuple[str, str, str]:
    """Guest shell for one slice, in three commands so that the host can read CPU times around the sending
    alone: (SAs + counters before, the sender, settle + counters after + flush)."""
    def sec(name: str, cmd: str) -> str:
        return f"echo '{SECTION}{name}'; {cmd}"

    prepare = [FLUSH]
    if mode != "plain":
        prepare += [f"{card_sa}[ $? = 0 ] || exit 1"]
    prepare += [sec("card_before", f"ethtool -S {dev}"), sec("qdisc_before", f"tc -s qdisc show dev {dev}")]
    # -S: no site module (the sender needs the standard library only); its start-up is TCG time per slice.
    send = sec("send", f"python3 -S -c {shlex.quote(SENDER)} {sink_addr} {SINK_PORT} {seconds} {PACKET_BYTES}")
    finish = [f"sleep {SETTLE_S}", sec("card_after", f"ethtool -S {dev}"),
              sec("qdisc_after", f"tc -s qdisc show dev {dev}"), FLUSH]
    return "\n".join(prepare) + "\n", send + "\n", "\n".join(finish) + "\n"


def sink_flow(sas: list, sink_addr: str):
    """The wire_sink.FlowSpec of the bench's datagrams, with the card's outbound SA (AES-GCM: the last 4 bytes
    of the key are the salt, RFC 4106 §8.1)."""
    from device.contract.enums import Direction
    from ipsec_nic.bench.wire_sink import EspKey, FlowSpec

    out = next(p for p in sas if p.direction == Direction.OUTBOUND)
    return FlowSpec(out.src, sink_addr, SINK_PORT, PACKET_BYTES - 28, bytes.fromhex(SINK_MAC.replace(":", "")),
                    EspKey(out.spi, out.enc_key[:-4], out.enc_key[-4:]))


def card_sa_batches(sas: list, dev: str) -> dict[str, str]:
    """Mode -> guest shell adding the card side's SAs: crypto offload hands the states to the driver, packet
    offload the states and the policies (ipsec_nic/kernel_scenarios.py), software XFRM neither."""
    from ipsec_nic import kernel_scenarios as ks

    return {"offload": ks.batch(ks.card_commands(sas, dev, "crypto")),
            "packet": ks.batch(ks.card_commands(sas, dev, "packet")),
            "software": ks.batch(ks.card_software_commands(sas))}


def slice_seconds(seconds_per_slice: float) -> float:
    """Each mode's sending time: the runner's per-slice seconds were set for BUDGET_MODES modes, and a round's
    sending time (seconds_per_slice × BUDGET_MODES) is now shared by all MODES."""
    return seconds_per_slice * BUDGET_MODES / len(MODES)


@dataclasses.dataclass
class Bed:
    """A running kernel test bed whose card's wire ends in the sink (kernel_bed)."""

    topo: Any  # ipsec_nic.topology.Topology
    sink: Any  # ipsec_nic.bench.wire_sink.WireSink
    dev: str
    sink_addr: str
    sas: list
    card_sa: dict[str, str]  # mode -> guest shell adding the card's SAs

    def pids(self) -> tuple[int | None, ...]:
        """(card server, QEMU, sink)."""
        topo = self.topo
        return (topo.card.process.pid if topo.card and topo.card.process else None,
                topo.vm.qemu_pid if topo.vm else None, self.sink.pid)


@contextlib.contextmanager
def kernel_bed(say: Progress, logs: Path, profile_overrides: dict | None = None) -> Iterator[Bed]:
    """Boot the VM with the card's kernel driver and the card's wire to a WireSink that expects the bench's
    flow; ``profile_overrides`` replaces CARD_PROFILE_OVERRIDES ({} = the default profile as is)."""
    from device.contract.sa_file import parse_sa_document
    from guest_tools.scenario import Spec, fill_keys, sa_document
    from ipsec_nic import kernel_scenarios as ks
    from ipsec_nic.bench.wire_sink import WireSink
    from ipsec_nic.runner import load_kernel_module, write_profile
    from ipsec_nic.topology import Topology
    from qemu import toolchain

    tc = toolchain.setup(progress=say)
    module = load_kernel_module(tc, progress=lambda line: say(f"kernel driver: {line}"))
    spec = Spec(name="kpps", alg="aes-gcm-128", mode="transport", family=4)
    sas = parse_sa_document(fill_keys(sa_document(spec)))
    _, sink_addr = ks.traffic_addresses(spec)
    logs.mkdir(parents=True, exist_ok=True)
    profile = write_profile(logs / "kernel-pps-card.yaml", None,
                            CARD_PROFILE_OVERRIDES if profile_overrides is None else profile_overrides)
    say("VM: booting with the card's kernel driver; the card's wire goes to a host-side sink")
    with Topology(tc, logs / "kernel-pps", profile=str(profile), timeout_s=300, kernel_module=module,
                  wire_sink=lambda path: WireSink(path, logs / "kernel-pps-sink.log")) as topo:
        sink: WireSink = topo.sink
        sink.expect(sink_flow(sas, sink_addr))
        dev = topo.setup_info["IPSEC_NIC_DEV"]
        say(f"VM up in {topo.boot_seconds:.1f} s, driver {topo.setup_seconds:.1f} s")
        r = topo.guest(sink_neighbour(dev, sink_addr), 60)
        if r.exit_code != 0:
            raise RuntimeError(f"the sink's neighbour entry was refused:\n{r.output[-1000:]}")
        sink.take()  # whatever the card sent while the guest came up (IPv6 neighbour discovery, ...)
        yield Bed(topo, sink, dev, sink_addr, sas, card_sa_batches(sas, dev))
        card = topo.card
        if card is None or not card.alive():
            raise RuntimeError("the card server died during the kernel-driver run"
                               + (f":\n{card.log_tail()}" if card else ""))


def run_slice(bed: Bed, mode: str, seconds: float) -> Slice:
    """One mode's slice, not yet checked (check_slice)."""
    def run(command: str, what: str, timeout: float = 60.0) -> str:
        r = bed.topo.guest(command, timeout)
        if r.timed_out or r.exit_code != 0:
            raise RuntimeError(f"{mode} slice: {what} failed (exit {r.exit_code}):\n{r.output[-2000:]}")
        return r.output

    prepare, send, finish = slice_commands(mode, bed.dev, bed.sink_addr, seconds, bed.card_sa.get(mode, ""))
    output = run(prepare, "adding the SAs and reading the counters")
    # CPU of the sending only: the sampler's last `seconds` before the guest command returned, not the
    # python3 start-up before it (about a second under TCG) nor the SA set-up.
    with CpuSampler(bed.pids()) as cpu:
        output += run(send, "the sender", seconds * 4 + 60)
    output += run(finish, "reading the counters")
    s = parse_slice(mode, output, bed.sink.take())
    card_cpu, qemu_cpu, sink_cpu, card_wait, qemu_wait, _ = cpu.window(s.seconds)
    return dataclasses.replace(s, card_cpu=card_cpu, qemu_cpu=qemu_cpu, sink_cpu=sink_cpu, card_wait=card_wait,
                               qemu_wait=qemu_wait)


def kernel_pps(seconds_per_slice: float, rounds: int, say: Progress, logs: Path,
               profile_overrides: dict | None = None) -> list[Row]:
    """The rows; ``seconds_per_slice`` × BUDGET_MODES is a round's sending time, shared by MODES;
    ``profile_overrides`` replaces CARD_PROFILE_OVERRIDES ({} = the default profile as is)."""
    slices: list[Slice] = []
    seconds = slice_seconds(seconds_per_slice)
    with kernel_bed(say, logs, profile_overrides) as bed:
        say(f"{rounds} rounds × {len(MODES)} modes × {seconds:g} s")
        for rnd in range(rounds):
            for mode in MODES:
                s = run_slice(bed, mode, seconds)
                check_slice(s)
                slices.append(s)
                gaps = f", {s.seq_gaps} ESP sequence gaps" if s.seq_gaps else ""
                say(f"round {rnd + 1}/{rounds} {mode}: {s.pps:,.0f} pkt/s ({s.received}/{s.sent} received and "
                    f"checked; guest qdisc dropped {s.qdisc_drops}; card wire took {s.card_wire_tx}, refused "
                    f"{s.wire_refused}; sink "
                    f"{s.wire_frames} frames{gaps}; in {s.seconds:.1f} s sending, CPU: card {s.card_cpu:.2f} s, "
                    f"QEMU {s.qemu_cpu:.2f} s, sink {s.sink_cpu:.2f} s; waiting for a CPU: card "
                    f"{s.card_wait:.2f} s, QEMU {s.qemu_wait:.2f} s)")
    return kernel_rows(slices)
