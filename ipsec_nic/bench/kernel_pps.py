"""VM packets/s of 1400-byte UDP through the card's Linux driver: crypto offload against software XFRM
on the same card and against no IPsec, in one boot.

The test bed is ipsec_nic/topology.py with the kernel module: the card's netdev in the root netns, the
Linux peer (virtio-net, netns ``peer``) on the other end of its wire with software XFRM. For each slice
the card side gets one AES-GCM-128 transport SA pair (ipsec_nic/kernel_scenarios.py) in one of three
modes — ``offload`` (`ip xfrm state ... offload crypto dev DEV`), ``software`` (the same SA without
`offload`: the guest kernel encrypts) or ``plain`` (no SA) — and a sender in the guest sends 1400-byte
IPv4/UDP datagrams to the peer for a fixed time. What counts is what reached a UDP socket on the peer
(its Udp InDatagrams + RcvbufErrors in /proc/net/snmp: every datagram that arrived and, under IPsec,
decrypted and authenticated; the socket's buffer is kept full, so each arrival is a RcvbufErrors):
whatever the card or a queue dropped does not. Modes are interleaved
round by round so a neighbour's burst on the host hits all three alike; the median per mode is kept.

The card runs the default profile with the mirror BAR's mmap withheld (``nic.mirror_mmap: false``,
datasheet section 2), for all three modes alike. The Linux driver never reads the mirror, and while QEMU
10.1 maps any region of the device it stops posting BAR writes, so with the mirror offered every TAIL
doorbell and interrupt acknowledgment of the driver would be a round trip that the vCPU waits for
(docs/performance.md, *Kernel driver packets/s*, has the figures with the mirror mapped as well).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import statistics
from pathlib import Path

from .core import Progress, Row, at_least

MODES = ("offload", "software", "plain")
OFFLOAD_VS_SOFTWARE = at_least(3)  # issue 12: crypto offload ≥ 3× software XFRM
OFFLOAD_VS_PLAIN = at_least(0.7)  # issue 12: crypto offload ≥ 0.7× no IPsec
PACKET_BYTES = 1400  # the IPv4 packet; UDP payload = 1400 - 20 - 8
SINK_PORT = 9  # discard (RFC 863): a socket on the peer that nobody reads
SETTLE_S = 0.5  # after the sender stops: frames still in the card, QEMU and the peer's backlog land
SECTION = "@@kpps "
# The card profile of these rows: the default, without the mirror mmap the Linux driver does not use.
CARD_PROFILE_OVERRIDES = {"nic": {"mirror_mmap": False}}

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
SINK = (
    "import socket, sys, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)\n"  # the kernel's minimum: a few datagrams
    "s.bind(('0.0.0.0', int(sys.argv[1])))\n"
    "open(sys.argv[2], 'w').close()\n"
    "time.sleep(3600)\n"
)


@dataclasses.dataclass(frozen=True)
class Slice:
    """One mode's run: datagrams the sender handed to its socket, datagrams the peer's UDP received, and
    the sender's seconds."""

    mode: str
    sent: int
    received: int
    seconds: float
    card_offloaded: int  # the card's ipsec_tx_pkts moved by this much
    doorbells: int = 0  # the driver's tx_doorbells (TXQ TAIL writes) moved by this much
    irqs: int = 0  # the driver's queue_irqs (interrupts on the queue vector) moved by this much
    card_cpu: float = 0.0  # CPU seconds of the card server (host) during the slice's guest command
    qemu_cpu: float = 0.0  # CPU seconds of QEMU (the whole guest, TCG) during it

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


def cpu_per_packet(slices: list[Slice], mode: str) -> tuple[float, float]:
    """Median µs of card-server CPU and of QEMU CPU per received packet in ``mode``."""
    mine = [s for s in slices if s.mode == mode and s.received]
    if not mine:
        return 0.0, 0.0
    return (statistics.median(s.card_cpu / s.received * 1e6 for s in mine),
            statistics.median(s.qemu_cpu / s.received * 1e6 for s in mine))


def parse_udp_snmp(text: str) -> dict[str, int]:
    """The `Udp:` pair of lines of /proc/net/snmp (a header line of names, then a line of values)."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0], rows[1], strict=False)}


def peer_received(before: dict[str, int], after: dict[str, int]) -> int:
    """Datagrams that reached the sink socket: queued, or refused only because nobody reads it."""
    return sum(after.get(k, 0) - before.get(k, 0) for k in ("InDatagrams", "RcvbufErrors"))


def per_packet(slices: list[Slice], mode: str, field: str) -> float:
    """Median of a Slice counter per received packet in ``mode`` (0 when the driver has no such counter)."""
    mine = [s for s in slices if s.mode == mode and s.received]
    return statistics.median(getattr(s, field) / s.received for s in mine) if mine else 0.0


def parse_slice(mode: str, output: str) -> Slice:
    from ipsec_nic.kernel_scenarios import ETHTOOL_TX, parse_ethtool_stats, sections

    parts = sections(output, SECTION)
    sent_line = next((line.split() for line in parts.get("send", "").splitlines()
                      if line.startswith("KPPS-SENT ")), None)
    if sent_line is None:
        raise RuntimeError(f"{mode}: the guest sender printed no result:\n{output[-2000:]}")
    received = peer_received(parse_udp_snmp(parts.get("peer_before", "")), parse_udp_snmp(parts.get("peer_after", "")))
    after = parse_ethtool_stats(parts.get("card_after", ""))
    before = parse_ethtool_stats(parts.get("card_before", ""))

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    return Slice(mode, int(sent_line[1]), received, float(sent_line[3]), delta(ETHTOOL_TX),
                 doorbells=delta("tx_doorbells"), irqs=delta("queue_irqs"))


def kernel_rows(slices: list[Slice]) -> list[Row]:
    """The rows from the interleaved slices: the median packets/s per mode, offload against each reference."""
    per = {m: [s.pps for s in slices if s.mode == m] for m in MODES}
    missing = [m for m, v in per.items() if not v]
    if missing:
        raise ValueError(f"no slice for mode(s) {', '.join(missing)}")
    med = {m: statistics.median(v) for m, v in per.items()}
    sent = {m: sum(s.sent for s in slices if s.mode == m) for m in MODES}
    got = {m: sum(s.received for s in slices if s.mode == m) for m in MODES}
    lost = "; ".join(f"{m} {1 - got[m] / sent[m]:.0%}" for m in MODES if sent[m]) or "-"
    note = f"{len(per['offload'])} interleaved rounds; sent but not received: {lost}"
    cpu = {m: cpu_per_packet(slices, m) for m in MODES}

    def cpu_note(m: str) -> str:
        return (f"CPU per packet: card server {cpu[m][0]:.0f} µs, QEMU {cpu[m][1]:.0f} µs; per packet: "
                f"{per_packet(slices, m, 'doorbells'):.2f} TX doorbells, {per_packet(slices, m, 'irqs'):.2f} interrupts")

    return [
        Row("VM packets/s, kernel driver, crypto offload, 1400 B UDP", med["offload"], "pkt/s", med["software"],
            "pkt/s software XFRM, same SA, same card, mirror mmap off", OFFLOAD_VS_SOFTWARE, note=f"{note}; {cpu_note('offload')}"),
        Row("VM packets/s, kernel driver, crypto offload vs no IPsec, 1400 B UDP", med["offload"], "pkt/s",
            med["plain"], "pkt/s no IPsec, same card, mirror mmap off", OFFLOAD_VS_PLAIN),
        Row("VM packets/s, kernel driver, software XFRM, 1400 B UDP", med["software"], "pkt/s",
            note=cpu_note("software")),
        Row("VM packets/s, kernel driver, no IPsec, 1400 B UDP", med["plain"], "pkt/s", note=cpu_note("plain")),
    ]


def check_slice(s: Slice) -> None:
    """A slice whose mode did not do what it says is a bench failure, not a figure."""
    if s.received <= 0:
        raise RuntimeError(f"{s.mode}: the peer received nothing ({s.sent} sent)")
    if s.mode == "offload" and s.card_offloaded < s.received:
        raise RuntimeError(f"offload: the card encrypted {s.card_offloaded} packets, the peer received {s.received}")
    if s.mode != "offload" and s.card_offloaded:
        raise RuntimeError(f"{s.mode}: the card's offload counter moved by {s.card_offloaded}")


def slice_command(mode: str, dev: str, peer_addr: str, seconds: float, card_sa: str, peer_sa: str) -> str:
    from ipsec_nic.kernel_scenarios import FLUSH, NETNS

    def sec(name: str, cmd: str) -> str:
        return f"echo '{SECTION}{name}'; {cmd}"

    lines = [FLUSH.format(ns=NETNS)]
    if mode != "plain":
        lines += [f"{card_sa}[ $? = 0 ] || exit 1", f"{peer_sa}[ $? = 0 ] || exit 1"]
    snmp = f"ip netns exec {NETNS} cat /proc/net/snmp"
    lines += [
        sec("card_before", f"ethtool -S {dev}"), sec("peer_before", snmp),
        sec("send", f"python3 -c {shlex.quote(SENDER)} {peer_addr} {SINK_PORT} {seconds} {PACKET_BYTES}"),
        f"sleep {SETTLE_S}",
        sec("card_after", f"ethtool -S {dev}"), sec("peer_after", snmp),
        FLUSH.format(ns=NETNS),
    ]
    return "\n".join(lines) + "\n"


def kernel_pps(seconds_per_slice: float, rounds: int, say: Progress, logs: Path,
               profile_overrides: dict | None = None) -> list[Row]:
    """The rows; ``profile_overrides`` replaces CARD_PROFILE_OVERRIDES ({} = the default profile as is)."""
    from device.contract.sa_file import parse_sa_document
    from guest_tools.scenario import Spec, fill_keys, sa_document
    from guest_tools.xfrm_peer import peer_commands
    from ipsec_nic import kernel_scenarios as ks
    from ipsec_nic.runner import load_kernel_module, write_profile
    from ipsec_nic.topology import Topology
    from qemu import toolchain

    tc = toolchain.setup(progress=say)
    module = load_kernel_module(tc, progress=lambda line: say(f"kernel driver: {line}"))
    spec = Spec(name="kpps", alg="aes-gcm-128", mode="transport", family=4)
    sas = parse_sa_document(fill_keys(sa_document(spec)))
    _, peer_addr = ks.traffic_addresses(spec)
    logs.mkdir(parents=True, exist_ok=True)
    profile = write_profile(logs / "kernel-pps-card.yaml", None,
                            CARD_PROFILE_OVERRIDES if profile_overrides is None else profile_overrides)
    say("VM: booting with the card's kernel driver and the Linux peer")
    slices: list[Slice] = []
    with Topology(tc, logs / "kernel-pps", profile=str(profile), timeout_s=300, kernel_module=module) as topo:
        dev = topo.setup_info["IPSEC_NIC_DEV"]
        say(f"VM up in {topo.boot_seconds:.1f} s, driver + peer {topo.setup_seconds:.1f} s; "
            f"{rounds} rounds × {len(MODES)} modes × {seconds_per_slice:g} s")
        peer_sa = ks.batch(peer_commands(sas), ks.NETNS)
        card_sa = {"offload": ks.batch(ks.card_commands(sas, dev, "crypto")),
                   "software": ks.batch(ks.card_software_commands(sas))}
        sink = (f"ip netns exec {ks.NETNS} python3 -c {shlex.quote(SINK)} {SINK_PORT} /run/kpps-sink.ready "
                ">/run/kpps-sink.log 2>&1 </dev/null & echo $! >/run/kpps-sink.pid\n"
                "for i in $(seq 100); do [ -e /run/kpps-sink.ready ] && break; sleep 0.1; done\n"
                "[ -e /run/kpps-sink.ready ] || exit 1\n"
                # Resolve the peer's MAC first: until ARP answers, the neighbour queue holds only
                # unres_qlen_bytes of datagrams and drops the rest (ip-sysctl.rst), which is not the card.
                f"ping -c 1 -W 5 {peer_addr} >/dev/null || exit 1\n"
                # Fill the sink's receive buffer before the first slice: Linux counts Udp InDatagrams when
                # the application reads (net/ipv4/udp.c udp_recvmsg), so datagrams still queued in the
                # buffer count nowhere. Once it is full, every arrival is a RcvbufErrors, in every slice.
                f"python3 -c {shlex.quote(SENDER)} {peer_addr} {SINK_PORT} 0.5 {PACKET_BYTES} >/dev/null")
        r = topo.guest(sink, 60)
        if r.exit_code != 0:
            raise RuntimeError(f"the peer's UDP sink did not start:\n{r.output[-1000:]}")
        card_pid = topo.card.process.pid if topo.card and topo.card.process else None
        try:
            for rnd in range(rounds):
                for mode in MODES:
                    cpu0 = (cpu_seconds(card_pid), cpu_seconds(topo.vm.qemu_pid if topo.vm else None))
                    r = topo.guest(slice_command(mode, dev, peer_addr, seconds_per_slice,
                                                 card_sa.get(mode, ""), peer_sa), seconds_per_slice * 4 + 60)
                    if r.timed_out or r.exit_code != 0:
                        raise RuntimeError(f"{mode} slice failed (exit {r.exit_code}):\n{r.output[-2000:]}")
                    s = dataclasses.replace(
                        parse_slice(mode, r.output), card_cpu=cpu_seconds(card_pid) - cpu0[0],
                        qemu_cpu=cpu_seconds(topo.vm.qemu_pid if topo.vm else None) - cpu0[1])
                    check_slice(s)
                    slices.append(s)
                    say(f"round {rnd + 1}/{rounds} {mode}: {s.pps:,.0f} pkt/s ({s.received}/{s.sent} received)")
        finally:
            topo.guest("kill $(cat /run/kpps-sink.pid) 2>/dev/null; true", 30)
        card = topo.card
        if card is None or not card.alive():
            raise RuntimeError("the card server died during the kernel-driver run"
                               + (f":\n{card.log_tail()}" if card else ""))
    return kernel_rows(slices)
