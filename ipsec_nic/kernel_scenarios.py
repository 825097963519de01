"""Scenarios through the card's Linux driver: plain `ip xfrm ... offload crypto|packet dev DEV` in the guest.

The kernel-path twin of guest_tools/scenario.py, for `ipsec-nic demo --kernel-driver` and tests/vm:
the same Spec and the same SAs (guest_tools.scenario.sa_document), but the card side is the guest
kernel's own XFRM stack in the root netns, handing its states (and, for packet offload, its
policies) to the card's driver; the peer in netns ``peer`` is software XFRM with the mirrored states
(guest_tools/xfrm_peer.py). Traffic is ping from the card's side: ``count`` echo requests go out on
the card's outbound SA and ``count`` replies come back on its inbound SA; optionally a TCP transfer
each way (socat), checked by SHA-256 at both ends.

The host builds every command and parses every answer; keys travel to the guest inside commands
and never come back: each `ip xfrm state` listing is filtered in the guest (KEY_FILTER) first.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import time
from typing import Any

from device.contract.enums import Direction
from device.contract.sa import SaParams
from device.contract.sa_file import parse_sa_document
from guest_tools import xfrm_peer
from guest_tools.scenario import SPI_IN, SPI_OUT, Spec, fill_keys, sa_document

NETNS = xfrm_peer.DEFAULT_NETNS
SECTION = "@@section "
# Drops the algorithm lines (they carry the keys) from `ip xfrm state` output, in the guest.
KEY_FILTER = "grep -v -E '^[[:space:]]+(aead|enc|auth|auth-trunc|comp) '"
PING_INTERVAL_S = 0.05
PING_WAIT_S = 5
# The card's counters in `ethtool -S` (mlx5's names for offloaded packets).
ETHTOOL_TX, ETHTOOL_RX = "ipsec_tx_pkts", "ipsec_rx_pkts"
# The card firmware's own TX counts per kind of offload (`fw_` + ndis.GlobalStats names): the driver's
# ipsec_tx_pkts counts crypto and packet offload alike, these tell which one the card did.
ETHTOOL_FW_TX_CRYPTO, ETHTOOL_FW_TX_PACKET = "fw_tx_crypto", "fw_tx_packet_offload"
# The driver's SA table dump (debugfs, one directory per card).
SA_TABLE_GLOB = "/sys/kernel/debug/ipsec_nic/*/ipsec"
# UDP-ESP (RFC 3948) needs a socket with UDP_ENCAP_ESPINUDP on port 4500 for the stack to decapsulate
# (net/ipv4/udp.c); an IKE daemon holds one. This holds one (with bypass policies, as IKE daemons do
# for their own socket: guest_tools.scenario.bypass_policy) until killed.
NATT_HOLDER = (
    "import socket, sys, time\n"
    "from guest_tools.scenario import (NAT_T_PORT, SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP, XFRM_POLICY_IN,\n"
    "    XFRM_POLICY_OUT, bypass_policy)\n"
    "family = int(sys.argv[1])\n"
    "s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)\n"
    "if family == 6:\n"
    "    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"
    "s.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)\n"
    "for d in (XFRM_POLICY_IN, XFRM_POLICY_OUT):\n"
    "    s.setsockopt(*bypass_policy(family, d))\n"
    "s.bind(('0.0.0.0' if family == 4 else '::', NAT_T_PORT))\n"
    "open(sys.argv[2], 'w').close()\n"
    "time.sleep(3600)\n"
)


class KernelScenarioError(RuntimeError):
    """A guest command of the scenario failed in a way that is not a result (message has its output)."""


# --- commands (pure) ------------------------------------------------------------------------------------


def _flipped(p: SaParams) -> SaParams:
    """The same SA seen from the other end. xfrm_peer.state_add/policy_add build the peer's view of a
    card SA; the card's own kernel state is the peer's view of the flipped SA (the card's outbound SA
    gets its output counter from ``seq``, its inbound one the receive window, its policy the own dir)."""
    other = Direction.INBOUND if p.direction == Direction.OUTBOUND else Direction.OUTBOUND
    return dataclasses.replace(p, direction=other)


def card_state_add(p: SaParams, reqid: int, dev: str, offload: str) -> list[str]:
    """argv (after `ip`) for the card's own state, handed to the driver (man ip-xfrm: offload ... dev ... dir)."""
    if offload not in ("crypto", "packet"):
        raise ValueError(f"offload must be crypto or packet, not {offload!r}")
    outbound = p.direction == Direction.OUTBOUND
    # iproute2 also sends the offload's `dir` as the SA's direction (XFRMA_SA_DIR), and Linux refuses an
    # output SA with a replay window (net/xfrm/xfrm_user.c verify_replay): none on the outbound state.
    state = xfrm_peer.state_add(_flipped(p), reqid, replay_window=0 if outbound else None)
    return [*state, "offload", offload, "dev", dev, "dir", "out" if outbound else "in"]


def card_policy_add(p: SaParams, reqid: int, dev: str, offload: str) -> list[str]:
    """argv for the card's policy; packet offload hands the policy to the driver too (before the template,
    which iproute2 parses up to the end of the line)."""
    argv = xfrm_peer.policy_add(_flipped(p), reqid)
    if offload == "packet":
        at = argv.index("tmpl")
        argv[at:at] = ["offload", "packet", "dev", dev]
    return argv


def card_commands(sas: list[SaParams], dev: str, offload: str, first_reqid: int = 1) -> list[list[str]]:
    out: list[list[str]] = []
    for i, p in enumerate(sas):
        out.append(card_state_add(p, first_reqid + i, dev, offload))
        out.append(card_policy_add(p, first_reqid + i, dev, offload))
    return out


def card_software_commands(sas: list[SaParams], first_reqid: int = 1) -> list[list[str]]:
    """The card's states and policies with no `offload`: the guest kernel's own software XFRM on the same
    card (the reference the offload is measured against, ipsec_nic/bench/kernel_pps.py)."""
    out: list[list[str]] = []
    for i, p in enumerate(sas):
        outbound = p.direction == Direction.OUTBOUND
        out.append(xfrm_peer.state_add(_flipped(p), first_reqid + i, replay_window=0 if outbound else None))
        out.append(xfrm_peer.policy_add(_flipped(p), first_reqid + i))
    return out


def batch(commands: list[list[str]], netns: str | None = None) -> str:
    """Guest shell: `ip -batch` over a here-document (keys stay out of argv, ps and error messages:
    iproute2 reports the failing line's number)."""
    ns = f"-n {netns} " if netns else ""
    return f"ip {ns}-batch - <<'IPSEC_NIC_EOF'\n{xfrm_peer.batch_text(commands)}IPSEC_NIC_EOF\n"


def sections(output: str, marker: str = SECTION) -> dict[str, str]:
    """Split a guest command's output at `<marker>NAME` lines (`@@section NAME` by default)."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(marker):
            current = out.setdefault(line[len(marker):].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in out.items()}


def section(name: str, command: str) -> str:
    return f"echo '{SECTION}{name}'; {command}"


def counters_command(dev: str) -> str:
    """Everything read before and after traffic, in one guest command (keys filtered out)."""
    return "\n".join([
        section("ethtool", f"ethtool -S {dev}"),
        section("card_states", f"ip -s xfrm state | {KEY_FILTER}"),
        section("peer_states", f"ip -n {NETNS} -s xfrm state | {KEY_FILTER}"),
        section("card_xfrm_stat", "cat /proc/net/xfrm_stat"),
        section("peer_xfrm_stat", f"ip netns exec {NETNS} cat /proc/net/xfrm_stat"),
        section("card_policies", "ip xfrm policy"),
    ])


FLUSH = "ip xfrm policy flush; ip xfrm state flush; ip -n {ns} xfrm policy flush; ip -n {ns} xfrm state flush"


# --- parsing (pure) -------------------------------------------------------------------------------------


def parse_ethtool_stats(text: str) -> dict[str, int]:
    """`ethtool -S DEV`: '     name: value' lines."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.strip().rpartition(":")
        if sep and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


_OFFLOAD = re.compile(r"(crypto|packet)? ?offload parameters: dev (\S+) dir (\S+)(?: mode (\S+))?")


def parse_state_offload(text: str) -> dict[int, dict[str, str]]:
    """SPI -> {dev, dir, mode} for the states of `ip xfrm state` that are offloaded (iproute2 ipxfrm.c
    prints 'crypto offload parameters: dev D dir in|out mode crypto|packet')."""
    out: dict[int, dict[str, str]] = {}
    spi: int | None = None
    for line in text.splitlines():
        m = re.search(r"\bproto esp spi (0x[0-9a-f]+)", line)
        if m:
            spi = int(m.group(1), 16)
            continue
        m = _OFFLOAD.search(line)
        if m and spi is not None:
            out[spi] = {"dev": m.group(2), "dir": m.group(3), "mode": m.group(4) or m.group(1) or ""}
    return out


def parse_ping(text: str) -> dict[str, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    return {"sent": int(m.group(1)), "received": int(m.group(2))} if m else {"sent": 0, "received": 0}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def read_counters(output: str) -> dict[str, Any]:
    parts = sections(output)
    return {
        "ethtool": parse_ethtool_stats(parts.get("ethtool", "")),
        "card_states": [s.as_dict() for s in xfrm_peer.parse_state_stats(parts.get("card_states", ""))],
        "card_offload": parse_state_offload(parts.get("card_states", "")),
        "peer_states": [s.as_dict() for s in xfrm_peer.parse_state_stats(parts.get("peer_states", ""))],
        "card_xfrm_stat": xfrm_peer.parse_xfrm_stat(parts.get("card_xfrm_stat", "")),
        "peer_xfrm_stat": xfrm_peer.parse_xfrm_stat(parts.get("peer_xfrm_stat", "")),
        "card_policy_offload": len(re.findall(r"offload parameters: dev", parts.get("card_policies", ""))),
    }


# --- one scenario in a running topology ---------------------------------------------------------------


def natt_holders(family: int) -> str:
    """Guest shell: start a NAT-T socket holder on each side (PIDs in /run/natt-*.pid), wait until both hold."""
    lines = ["rm -f /run/natt-card.ready /run/natt-peer.ready", f"NATT={shlex.quote(NATT_HOLDER)}"]
    for side, prefix in (("card", ""), ("peer", f"ip netns exec {NETNS} ")):
        lines.append(f'{prefix}python3 -c "$NATT" {family} /run/natt-{side}.ready >/run/natt-{side}.log 2>&1 '
                     f"</dev/null & echo $! >/run/natt-{side}.pid")
    lines.append("for i in $(seq 100); do [ -e /run/natt-card.ready ] && [ -e /run/natt-peer.ready ] && break; "
                 "sleep 0.1; done")
    return "\n".join(lines) + "\n"


def traffic_addresses(spec: Spec) -> tuple[str, str]:
    """(card, peer) addresses the ping uses: the endpoints, or the inner networks in tunnel mode."""
    return xfrm_peer.PeerNet().addrs(spec.family, tunnel=spec.tunnel)


def _state(states: list[dict[str, Any]], spi: int) -> dict[str, Any]:
    return next((s for s in states if s.get("spi") == spi), {})


BULK_PORT = 5201
BULK_TIMEOUT_S = 30


def bulk_command(spec: Spec, size: int) -> str:
    """Guest shell: ``size`` random bytes over TCP card -> peer, then the same file peer -> card (socat),
    with the SHA-256 of what was sent and of what each side received, in sections bulk_c2p / bulk_p2c."""
    card, peer = traffic_addresses(spec)
    fam = "TCP4" if spec.family == 4 else "TCP6"

    def target(addr: str) -> str:
        return f"{fam}:{addr if spec.family == 4 else f'[{addr}]'}:{BULK_PORT}"

    peer_ns = f"ip netns exec {NETNS} "
    lines = [f"head -c {size} /dev/urandom >/tmp/bulk.sent", "rm -f /tmp/bulk.at-peer /tmp/bulk.at-card"]
    for name, server, client, received, dst in (("bulk_c2p", peer_ns, "", "/tmp/bulk.at-peer", peer),
                                                ("bulk_p2c", "", peer_ns, "/tmp/bulk.at-card", card)):
        # timeout(1): a datapath that loses packets must fail the check, not hang the guest command.
        lines += [
            f"{server}timeout {BULK_TIMEOUT_S} socat -u {fam}-LISTEN:{BULK_PORT},reuseaddr CREATE:{received} & "
            "server=$!",
            f"{client}timeout {BULK_TIMEOUT_S} socat -u OPEN:/tmp/bulk.sent {target(dst)},retry=100,interval=0.1; "
            "echo \"client $?\"",
            "wait $server; echo \"server $?\"",
            section(name, f"sha256sum /tmp/bulk.sent {received}"),
        ]
    return "\n".join(lines) + "\n"


def parse_bulk(text: str) -> list[str]:
    """The hashes of a bulk section, sent first (a missing file gives fewer)."""
    return [line.split()[0] for line in text.splitlines() if re.match(r"^[0-9a-f]{64}\s", line)]


def run_scenario(topo: Any, spec: Spec, dev: str, timeout: float = 120.0, bulk_bytes: int = 0) -> dict[str, Any]:
    """Run one scenario through ``topo`` (ipsec_nic.topology.Topology with a kernel module); returns the
    result. A refused SA is a result (``add_error``), not an exception. ``bulk_bytes``: after the pings,
    a TCP transfer of that many bytes each way, checked by SHA-256 on both ends."""
    spec.check()
    t0 = time.monotonic()
    sas = parse_sa_document(fill_keys(sa_document(spec)))
    flush = FLUSH.format(ns=NETNS)
    result: dict[str, Any] = {"name": spec.name, "spec": dataclasses.asdict(spec)}

    def guest(command: str, what: str, check: bool = True):
        r = topo.guest(command, timeout)
        if r.timed_out or (check and r.exit_code != 0):
            raise KernelScenarioError(f"{spec.name}: {what} failed (exit {r.exit_code}):\n{r.output[-2000:]}")
        return r

    before = read_counters(guest(f"{flush}\n{counters_command(dev)}", "reading the counters").output)
    add = guest(f"{batch(card_commands(sas, dev, spec.offload))}[ $? = 0 ] || exit 1\n"
                + batch(xfrm_peer.peer_commands(sas), NETNS), "adding the SAs", check=False)
    if add.exit_code != 0:
        result["add_error"] = add.output.strip()[-1000:]
        guest(flush, "flushing")
        return result
    holders = natt_holders(spec.family) if spec.encap else ""
    _, peer_addr = traffic_addresses(spec)
    # -W without -w: exactly `count` requests, then up to PING_WAIT_S for the last replies.
    ping = f"ping -{spec.family} -c {spec.count} -s {spec.size} -i {PING_INTERVAL_S} -W {PING_WAIT_S} {peer_addr}"
    pinged = guest(f"{holders}{section('ping', ping)}", "the pings", check=False)
    result["ping"] = parse_ping(sections(pinged.output).get("ping", ""))
    result["ping_output"] = sections(pinged.output).get("ping", "")[-600:]
    # A datapath that answers no ping would only make the bulk transfer wait for its time-outs.
    if bulk_bytes and result["ping"]["received"]:
        parts = sections(guest(bulk_command(spec, bulk_bytes), "the TCP bulk transfer", check=False).output)
        result["bulk"] = {"bytes": bulk_bytes, "card_to_peer": parse_bulk(parts.get("bulk_c2p", "")),
                          "peer_to_card": parse_bulk(parts.get("bulk_p2c", ""))}
    elif bulk_bytes:
        result["bulk"] = {"bytes": bulk_bytes, "card_to_peer": [], "peer_to_card": []}
    stop = "\nkill $(cat /run/natt-card.pid /run/natt-peer.pid)" if spec.encap else ""
    after = read_counters(guest(counters_command(dev) + stop, "reading the counters", check=False).output)
    result["card_states"], result["peer_states"] = after["card_states"], after["peer_states"]
    result["card_offload"] = {f"{k:#x}": v for k, v in after["card_offload"].items()}
    result["card_policy_offload"] = after["card_policy_offload"]
    result["ethtool_delta"] = _delta(after["ethtool"], before["ethtool"])
    result["card_xfrm_stat_delta"] = _delta(after["card_xfrm_stat"], before["card_xfrm_stat"])
    result["peer_xfrm_stat_delta"] = _delta(after["peer_xfrm_stat"], before["peer_xfrm_stat"])
    if not spec.keep_sas:
        result["after_flush"] = flush_and_count(topo, dev)
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def sa_table_command() -> str:
    """Guest shell: the driver's dump of the card's SA table (read from the card with LIST_SAS), the
    counterpart of netdevsim's debugfs file that rtnetlink.sh kci_test_ipsec_offload reads."""
    return f"cat {SA_TABLE_GLOB}"


def parse_sa_table(text: str) -> dict[str, Any]:
    """'SA count=2 tx=3 rx=3' then one 'sa[i] handle=.. tx|rx spi=.. proto=.. mode=.. family=.. crypto|packet'
    line per SA -> {"count": 2, "tx": 3, "rx": 3, "sas": [{"dir": "tx", "spi": 0x1009, ...}]}."""
    out: dict[str, Any] = {"count": None, "sas": []}
    for line in text.splitlines():
        head = re.match(r"SA count=(\d+)((?: \w+=\d+)*)", line.strip())
        if head:
            out["count"] = int(head.group(1))
            out.update({k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", head.group(2))})
            continue
        sa = re.match(r"sa\[\d+\] handle=(\S+) (tx|rx) spi=(0x[0-9a-f]+) proto=(\S+) mode=(\S+) family=(\d+) (\S+)",
                      line.strip())
        if sa:
            out["sas"].append({"handle": sa.group(1), "dir": sa.group(2), "spi": int(sa.group(3), 16),
                               "proto": sa.group(4), "mode": sa.group(5), "family": int(sa.group(6)),
                               "offload": sa.group(7)})
    return out


def flush_and_count(topo: Any, dev: str) -> dict[str, Any]:
    """Flush both sides; what is left: states on each side and SAs on the card (its SA table)."""
    r = topo.guest(f"{FLUSH.format(ns=NETNS)}\n" + section("card", "ip xfrm state | grep -c '^src' || true")
                   + "; " + section("peer", f"ip -n {NETNS} xfrm state | grep -c '^src' || true")
                   + "; " + section("table", sa_table_command()))
    parts = sections(r.output)
    return {"card_states": int(parts.get("card", "-1").strip() or -1),
            "peer_states": int(parts.get("peer", "-1").strip() or -1),
            "card_sas": parse_sa_table(parts.get("table", "")).get("count")}


# ethtool -S counters of the card's driver that must stay still in a clean run (drops per reason, refusals).
DROP_COUNTERS = ("tx_drop_", "ipsec_tx_drop_", "ipsec_rx_drop_", "rx_drop_", "card_tx_offload_error",
                 "fw_tx_errors")


def kernel_failures(spec: Spec, result: dict[str, Any], dev: str) -> list[str]:
    """Everything wrong with a kernel-path scenario; [] when every ping came back, both sides counted
    exactly ``count`` packets on each SA, the card's counters say the same, and nothing moved an error counter."""
    bad: list[str] = []
    n = spec.count

    def expect(what: str, got: object, want: object) -> None:
        if got != want:
            bad.append(f"{what}: got {got!r}, expected {want!r}")

    if "add_error" in result:
        return [f"adding the SAs failed: {result['add_error']}"]
    expect("ping (transmitted, received)", (result["ping"]["sent"], result["ping"]["received"]), (n, n))
    out_spi, in_spi = SPI_OUT + spec.spi_base, SPI_IN + spec.spi_base
    bulk = result.get("bulk")
    delta = result["ethtool_delta"]
    for spi, way in ((out_spi, "out"), (in_spi, "in")):
        offload = result["card_offload"].get(f"{spi:#x}")
        expect(f"card state {spi:#x} offload (dev, dir)", (offload or {}).get("dev"), dev)
        expect(f"card state {spi:#x} offload dir", (offload or {}).get("dir"), way)
        card = _state(result["card_states"], spi)
        peer = _state(result["peer_states"], spi)
        if not bulk:
            expect(f"card state {spi:#x} packets", card.get("packets"), n)
            expect(f"peer state {spi:#x} packets", peer.get("packets"), n)
        for key in ("integrity_failed", "replay", "replay_window_errors"):
            expect(f"peer state {spi:#x} {key}", peer.get(key), 0)
            expect(f"card state {spi:#x} {key}", card.get(key), 0)
    if spec.offload == "packet":
        expect("card policies handed to the driver", result["card_policy_offload"], 2)
    peer_rx = _state(result["peer_states"], out_spi).get("packets")
    peer_tx = _state(result["peer_states"], in_spi).get("packets")
    if bulk:
        # Every packet the card encrypted is one the peer decrypted, and every packet the card decrypted
        # is one its stack accepted. Outbound states count what TCP handed down before GSO segmentation
        # (net/xfrm/xfrm_output.c), so the senders' own state counters are not per wire packet here; the
        # ping-only runs compare all four exactly, and no error counter may move on either side.
        card_rx = _state(result["card_states"], in_spi).get("packets")
        expect(f"card ethtool {ETHTOOL_TX} vs peer state {out_spi:#x} packets", delta.get(ETHTOOL_TX, 0), peer_rx)
        expect(f"card ethtool {ETHTOOL_RX} vs card state {in_spi:#x} packets", delta.get(ETHTOOL_RX, 0), card_rx)
        if not peer_rx or not peer_tx or not card_rx or min(peer_rx, peer_tx, card_rx) < n:
            bad.append(f"too few packets for a bulk transfer: peer decrypted {peer_rx} and sent {peer_tx}, "
                       f"card decrypted {card_rx}")
        for way in ("card_to_peer", "peer_to_card"):
            hashes = bulk.get(way, [])
            if len(hashes) != 2 or hashes[0] != hashes[1]:
                bad.append(f"TCP bulk {way.replace('_', ' ')}: {bulk['bytes']} bytes did not arrive intact "
                           f"(SHA-256 sent, received: {hashes})")
    else:
        expect(f"card ethtool {ETHTOOL_TX}", delta.get(ETHTOOL_TX, 0), n)
        expect(f"card ethtool {ETHTOOL_RX}", delta.get(ETHTOOL_RX, 0), n)
    if spec.esn:
        card_out, peer_in = _state(result["card_states"], out_spi), _state(result["peer_states"], out_spi)
        card_in, peer_out = _state(result["card_states"], in_spi), _state(result["peer_states"], in_spi)
        # Under packet offload the card numbers and checks the packets itself: the card side's kernel
        # states keep their initial replay context, so only the peer's positions tell (and the traffic,
        # which the card's own replay window let through across 2^32).
        card_side = spec.offload == "crypto"
        if bulk:
            # Past 2^32 on both SAs: the high halves moved on at both ends.
            want_hi = (spec.seq + n) >> 32
            expect("ESN high halves (peer in, peer out)", (peer_in.get("seq_hi"), peer_out.get("oseq_hi")),
                   (want_hi, want_hi))
            if card_side:
                expect("ESN high halves (card out, card in)", (card_out.get("oseq_hi"), card_in.get("seq_hi")),
                       (want_hi, want_hi))
        else:
            last = spec.seq + n
            want = (last >> 32, last & 0xFFFF_FFFF)
            expect("peer receive position (seq-hi, seq)", (peer_in.get("seq_hi"), peer_in.get("seq")), want)
            expect("peer output position (oseq-hi, oseq)", (peer_out.get("oseq_hi"), peer_out.get("oseq")), want)
            if card_side:
                expect("card output position (oseq-hi, oseq)", (card_out.get("oseq_hi"), card_out.get("oseq")),
                       want)
    # A frame the card refused (e.g. tx_drop_offload_failed) is a failure even when TCP retransmits it.
    moved = {k: v for k, v in delta.items() if v and k.startswith(DROP_COUNTERS)}
    expect("card drop/error counters that moved", moved, {})
    expect("card /proc/net/xfrm_stat counters that moved", result["card_xfrm_stat_delta"], {})
    expect("peer /proc/net/xfrm_stat counters that moved", result["peer_xfrm_stat_delta"], {})
    if not spec.keep_sas:
        left = result.get("after_flush", {})
        expect("states left after flush (card, peer)", (left.get("card_states"), left.get("peer_states")), (0, 0))
        expect("SAs left on the card after flush", left.get("card_sas"), 0)
    return bad
