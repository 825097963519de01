"""`ipsec-nic demo`: the card against a Linux IPsec peer, end to end, in one VM boot.

Boots a VM with the card (vfio-user) and a virtio-net NIC on the other end of the card's wire, puts
that NIC in a Linux XFRM peer netns (ipsec_nic/topology.py, guest_tools/scenario.py), then:

1. adds SAs on the card in both directions (and the mirrored states/policies on the peer) and sends
   UDP traffic both ways: IPv4 transport AES-GCM (crypto offload), IPv6 tunnel AES-CBC+HMAC-SHA-256
   (packet offload), IPv4 UDP-ESP / NAT-T (crypto offload);
2. crosses the ESN 2^32 boundary both ways (the driver pushes the new high half with UPDATE_SA);
3. deletes every SA on the card and flushes the peer;

and prints what each side decrypted, the card's CryptoStatus counts and statistics, and the peer's
error counters. The wire is recorded to OUT/wire.pcap; logs go to OUT/. Exit status 0 only if every
check passed.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from guest_tools.scenario import Spec
from ipsec_nic.topology import Topology, TopologyError, interop_failures

ESN_START = 0xFFFF_FFF0

SCENARIOS: tuple[tuple[str, Spec], ...] = (
    ("IPv4 transport, AES-GCM-128, crypto offload",
     Spec(name="v4-transport-gcm-crypto", family=4, mode="transport", alg="aes-gcm-128", count=16)),
    ("IPv6 tunnel, AES-CBC-128 + HMAC-SHA-256-128, packet offload",
     Spec(name="v6-tunnel-cbc-packet", family=6, mode="tunnel", alg="aes-cbc-128+hmac-sha256-128",
          offload="packet", count=16, spi_base=0x10)),
    ("IPv4 UDP-ESP (NAT-T, RFC 3948), AES-GCM-128, crypto offload",
     Spec(name="v4-natt-gcm-crypto", family=4, encap=True, count=16, spi_base=0x20)),
    ("ESN across 2^32 (RFC 4304), IPv4, AES-GCM-128, crypto offload with UPDATE_SA",
     Spec(name="v4-esn-wrap-crypto", family=4, esn=True, seq=ESN_START, count=32, spi_base=0x30,
          keep_sas=True)),
)


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def pcap_frame_count(path: Path) -> int:
    """Records in a classic pcap file (24-byte global header, 16-byte record headers)."""
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    at, count = 24, 0
    while at + 16 <= len(data):
        incl = struct.unpack_from("<I", data, at + 8)[0]
        at += 16 + incl
        count += 1
    return count


def _describe(spec: Spec, result: dict[str, Any]) -> list[str]:
    c2p, p2c = result.get("card_to_peer", {}), result.get("peer_to_card", {})
    stats = result.get("card_stats", {})
    n = spec.count
    lines = [
        f"card -> peer: Linux decrypted {c2p.get('matched', 0)}/{n} datagrams, payload bytes as sent"
        + (f"; card TX completions {c2p.get('tx_status')}" if c2p.get("tx_status") != {"OK": n} else ""),
        f"peer -> card: card decrypted {p2c.get('matched', 0)}/{n}, CryptoStatus "
        + ", ".join(f"{k} x{v}" for k, v in sorted(p2c.get("crypto_status", {}).items())),
        "card stats: " + ", ".join(f"{k}={v}" for k, v in stats.items() if v),
        "peer XFRM errors: " + (", ".join(f"{k}={v}" for k, v in result.get("xfrm_stat_delta", {}).items())
                                or "none (/proc/net/xfrm_stat unchanged)"),
    ]
    if spec.esn:
        states = {s["spi"]: s for s in result.get("peer_states", [])}
        out = next((s for s in states.values() if s["dst"] != s["src"] and s.get("seq_hi")), None)
        lines.append(f"ESN: started at {spec.seq + 1:#x}, card pushed high half {result.get('esn_hi_pushed')} "
                     f"with UPDATE_SA; peer's receive position now seq-hi {out['seq_hi'] if out else '?'}, "
                     f"seq {out['seq'] if out else 0:#x}")
    return lines


@dataclass
class _Path:
    """What differs between the two demos: the Python user-space driver, or the card's Linux driver."""

    scenarios: tuple[tuple[str, Spec], ...]
    step_text: Callable[[Spec], str]  # what one scenario does, for the progress line
    run_one: Callable[[Topology, Spec], dict[str, Any]]
    failures: Callable[[Topology, Spec, dict[str, Any]], list[str]]
    describe: Callable[[Spec, dict[str, Any]], list[str]]
    teardown: Callable[[Topology], tuple[bool, dict[str, Any], str]]  # ok, summary["delete"], message
    print_rows: Callable[[dict[str, Any]], None]  # the summary table
    module: Any = None  # the kernel driver to load (qemu.kmod.KernelModule)


def run(profile: str | None = None, out_dir: Path = Path("out"), timeout: float = 600.0, verbose: int = 0,
        kernel_driver: bool = False) -> int:
    from qemu import toolchain as vm_toolchain

    t0 = time.monotonic()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    pcap = out_dir / "wire.pcap"
    _say("checking the VM toolchain" + (" and the card's kernel driver" if kernel_driver else ""))
    try:
        tc = vm_toolchain.setup(progress=lambda line: _say(f"toolchain: {line}"))
        path = _kernel_path(tc) if kernel_driver else _python_path()
    except Exception as exc:  # the toolchain and the module build explain themselves (log paths, what to do)
        _say(f"the VM toolchain{' or the kernel driver' if kernel_driver else ''} is not usable: {exc}")
        return 1
    summary: dict[str, Any] = {"scenarios": [], "out_dir": str(out_dir)}
    if kernel_driver:
        summary["kernel_driver"] = True
    failed = 0
    _say("starting the card server and booting a VM with the card"
         + ("'s Linux driver" if kernel_driver else "") + " and a Linux IPsec peer (TCG, ~15 s)")
    console = (lambda line: print(f"  console: {line}", flush=True)) if verbose else None
    try:
        with Topology(tc, out_dir, profile=profile, pcap=pcap, timeout_s=timeout, verbose=verbose,
                      on_console=console, kernel_module=path.module) as topo:
            _say(f"VM up in {topo.boot_seconds:.1f} s; test bed ready in {topo.setup_seconds:.1f} s: "
                 + _describe_setup(topo.setup_info))
            total_steps = len(path.scenarios) + 1
            for step, (title, spec) in enumerate(path.scenarios, 1):
                _say(f"{step}/{total_steps} {title}: {path.step_text(spec)}")
                t1 = time.monotonic()
                try:
                    result = path.run_one(topo, spec)
                except Exception as exc:  # a scenario that failed outright: report it, go on with the next
                    failed += 1
                    _say(f"    FAILED: {exc}")
                    summary["scenarios"].append({"title": title, "error": str(exc)})
                    continue
                failures = path.failures(topo, spec, result)
                for line in path.describe(spec, result):
                    print(f"      {line}", flush=True)
                _say(f"    {'ok' if not failures else 'FAILED'} ({time.monotonic() - t1:.1f} s)")
                for failure in failures:
                    print(f"      ! {failure}", flush=True)
                failed += bool(failures)
                summary["scenarios"].append({"title": title, "failures": failures, "result": result})
            _say(f"{total_steps}/{total_steps} deleting every SA on both sides")
            ok, summary["delete"], message = path.teardown(topo)
            failed += not ok
            _say(f"    {'ok' if ok else 'FAILED'}: {message}")
            summary["boot_seconds"] = round(topo.boot_seconds, 1)
    except TopologyError as exc:
        _say(f"the topology failed: {exc}")
        _say(f"logs: {out_dir}")
        return 1
    except Exception as exc:  # VM errors carry their log tails
        _say(f"the VM failed: {exc}")
        _say(f"logs: {out_dir}")
        return 1
    wall = time.monotonic() - t0
    summary.update(wall_seconds=round(wall, 1), failed_checks=failed, pcap_frames=pcap_frame_count(pcap))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(flush=True)
    print("Summary" + (" (kernel driver: ip xfrm ... offload dev)" if kernel_driver else ""), flush=True)
    path.print_rows(summary)
    print(f"  wire capture: {pcap} ({summary['pcap_frames']} frames); logs and summary.json in {out_dir}", flush=True)
    print(f"  wall time {wall:.1f} s", flush=True)
    if failed:
        print(f"demo FAILED: {failed} check(s) did not pass", file=sys.stderr, flush=True)
        return 1
    print("demo passed: every check succeeded", flush=True)
    return 0


def _describe_setup(info: dict[str, Any]) -> str:
    if info.get("IPSEC_NIC_DEV"):
        return (f"card {info['IPSEC_NIC_DEV']} {info.get('IPSEC_NIC_ADDR')} / {info.get('IPSEC_NIC_ADDR6')} <-> "
                f"Linux peer {info.get('IPSEC_NIC_PEER_DEV')} {info.get('IPSEC_NIC_PEER_ADDR')} / "
                f"{info.get('IPSEC_NIC_PEER_ADDR6')} in netns {info.get('IPSEC_NIC_PEER_NS')}")
    return (f"card {info.get('card_bdf')} MAC {info.get('card_mac')} <-> Linux peer {info.get('iface')} MAC "
            f"{info.get('peer_mac')}")


# --- `ipsec-nic demo`: the Python user-space driver in the guest ----------------------------------------------


def _python_teardown(topo: Topology) -> tuple[bool, dict[str, Any], str]:
    try:
        deleted = topo.delete_all()
    except TopologyError as exc:
        deleted = {"error": str(exc)}
    ok = deleted.get("deleted", 0) >= 2 and deleted.get("card_sas_after") == 0 and \
        deleted.get("peer_states_after") == 0
    return ok, deleted, (f"card had {deleted.get('card_sas_before')} SA(s), deleted {deleted.get('deleted')} "
                         f"bundle(s), {deleted.get('card_sas_after')} left; peer states left: "
                         f"{deleted.get('peer_states_after')}")


def _python_rows(summary: dict[str, Any]) -> None:
    width = max(len(title) for title, _ in SCENARIOS)
    print(f"  {'scenario':<{width}}  {'peer decrypted':>14}  {'card decrypted':>14}  {'card CryptoStatus':<20} result",
          flush=True)
    for entry, (title, spec) in zip(summary["scenarios"], SCENARIOS, strict=False):
        result = entry.get("result", {})
        got_peer = result.get("card_to_peer", {}).get("matched", 0)
        got_card = result.get("peer_to_card", {}).get("matched", 0)
        status = ", ".join(f"{k} x{v}" for k, v in sorted(result.get("peer_to_card", {}).get("crypto_status",
                                                                                             {}).items())) or "-"
        state = "ok" if not entry.get("failures") and "error" not in entry else "FAILED"
        print(f"  {title:<{width}}  {f'{got_peer}/{spec.count}':>14}  {f'{got_card}/{spec.count}':>14}  "
              f"{status:<20} {state}", flush=True)
    delete = summary.get("delete", {})
    print(f"  SAs deleted at the end: {delete.get('deleted')} on the card ({delete.get('card_sas_after')} left), "
          f"peer states left {delete.get('peer_states_after')}", flush=True)


def _python_path() -> _Path:
    return _Path(scenarios=SCENARIOS,
                 step_text=lambda spec: f"add SAs both ways, {spec.count} datagrams each way",
                 run_one=lambda topo, spec: topo.run(spec),
                 failures=lambda topo, spec, result: interop_failures(spec, result), describe=_describe,
                 teardown=_python_teardown, print_rows=_python_rows)


# --- `ipsec-nic demo --kernel-driver`: the same scenarios through the card's Linux driver -----------------


def kernel_scenarios() -> tuple[tuple[str, Spec], ...]:
    """SCENARIOS for the kernel path. Linux 6.12 offloads a UDP-encapsulated state only in packet mode
    (net/xfrm/xfrm_device.c xfrm_dev_state_add refuses encap for crypto offload), so UDP-ESP runs there."""
    out = []
    for title, spec in SCENARIOS:
        if spec.encap:
            spec = replace(spec, offload="packet")
            title = title.replace("crypto offload", "packet offload")
        out.append((title.replace(" with UPDATE_SA", ""), spec))
    return tuple(out)


def _describe_kernel(spec: Spec, result: dict[str, Any]) -> list[str]:
    from guest_tools.scenario import SPI_IN, SPI_OUT
    from ipsec_nic.kernel_scenarios import ETHTOOL_RX, ETHTOOL_TX

    out_spi, in_spi = SPI_OUT + spec.spi_base, SPI_IN + spec.spi_base

    def packets(side: str, spi: int) -> object:
        return next((s.get("packets") for s in result.get(side, []) if s.get("spi") == spi), "-")

    offload = result.get("card_offload", {}).get(f"{out_spi:#x}", {})
    ping = result.get("ping", {})
    delta = result.get("ethtool_delta", {})
    lines = [
        f"ip xfrm: {offload.get('mode') or spec.offload} offload on dev {offload.get('dev', '?')} "
        f"(SPI {out_spi:#x} out, {in_spi:#x} in)",
        f"ping: {ping.get('sent', 0)} echo requests card -> peer, {ping.get('received', 0)} replies peer -> card",
        f"card -> peer: card's state counted {packets('card_states', out_spi)}, peer's {packets('peer_states', out_spi)}; "
        f"peer -> card: peer's state counted {packets('peer_states', in_spi)}, card's {packets('card_states', in_spi)}",
        f"card ethtool -S: {ETHTOOL_TX} +{delta.get(ETHTOOL_TX, 0)}, {ETHTOOL_RX} +{delta.get(ETHTOOL_RX, 0)}",
        "XFRM errors (/proc/net/xfrm_stat): card "
        + (", ".join(f"{k}={v}" for k, v in result.get("card_xfrm_stat_delta", {}).items()) or "none")
        + ", peer " + (", ".join(f"{k}={v}" for k, v in result.get("peer_xfrm_stat_delta", {}).items()) or "none"),
    ]
    if spec.esn:
        out = next((s for s in result.get("peer_states", []) if s.get("spi") == out_spi), {})
        lines.append(f"ESN: started at {spec.seq + 1:#x}; peer's receive position now seq-hi {out.get('seq_hi')}, "
                     f"seq {out.get('seq') or 0:#x}")
    return lines


def _kernel_row(spec: Spec, result: dict[str, Any]) -> tuple[str, str, str, str]:
    """Summary cells: pings answered, card's state packets out/in, peer's out/in, card's ethtool tx/rx."""
    from guest_tools.scenario import SPI_IN, SPI_OUT
    from ipsec_nic.kernel_scenarios import ETHTOOL_RX, ETHTOOL_TX

    spis = (SPI_OUT + spec.spi_base, SPI_IN + spec.spi_base)

    def packets(side: str) -> str:
        found = {s.get("spi"): s.get("packets") for s in result.get(side, [])}
        return "/".join(str(found.get(spi, "-")) for spi in spis)

    delta = result.get("ethtool_delta", {})
    return (f"{result.get('ping', {}).get('received', 0)}/{spec.count}", packets("card_states"),
            packets("peer_states"), f"{delta.get(ETHTOOL_TX, 0)}/{delta.get(ETHTOOL_RX, 0)}")


def _kernel_teardown(topo: Topology) -> tuple[bool, dict[str, Any], str]:
    from ipsec_nic.kernel_scenarios import flush_and_count

    dev = topo.setup_info.get("IPSEC_NIC_DEV", "")
    left = flush_and_count(topo, dev)
    ok = left.get("card_states") == 0 and left.get("peer_states") == 0 and left.get("card_sas") == 0
    message = (f"states left on the card's side {left.get('card_states')}, SAs left on the card "
               f"{left.get('card_sas')}, peer states left {left.get('peer_states')}")
    dmesg = topo.guest("dmesg | grep -E 'WARNING|BUG|Oops|Call Trace' || true").output.strip()
    left["dmesg_problems"] = dmesg
    if dmesg:
        ok = False
        message += f"; the guest kernel logged problems:\n{dmesg[-2000:]}"
    return ok, left, message


def _kernel_rows(summary: dict[str, Any]) -> None:
    scenarios = kernel_scenarios()
    width = max(len(title) for title, _ in scenarios)
    print(f"  {'scenario':<{width}}  {'pings':>7}  {'card out/in':>11}  {'peer in/out':>11}  "
          f"{'ethtool tx/rx':>13}  result", flush=True)
    for entry, (title, spec) in zip(summary["scenarios"], scenarios, strict=False):
        cells = _kernel_row(spec, entry.get("result", {}))
        state = "ok" if not entry.get("failures") and "error" not in entry else "FAILED"
        print(f"  {title:<{width}}  {cells[0]:>7}  {cells[1]:>11}  {cells[2]:>11}  {cells[3]:>13}  {state}",
              flush=True)
    delete = summary.get("delete", {})
    print(f"  flushed at the end: {delete.get('card_states')} states left on the card's side, "
          f"{delete.get('card_sas')} SAs on the card, {delete.get('peer_states')} peer states", flush=True)


def _kernel_path(tc: Any) -> _Path:
    """The demo's scenarios with the card's Linux driver doing the offload (`ip xfrm ... offload dev`)."""
    from ipsec_nic.kernel_scenarios import kernel_failures, run_scenario
    from ipsec_nic.runner import load_kernel_module

    module = load_kernel_module(tc, progress=lambda line: _say(f"kernel driver: {line}"))

    def dev(topo: Topology) -> str:
        return topo.setup_info.get("IPSEC_NIC_DEV", "")

    def describe(spec: Spec, result: dict[str, Any]) -> list[str]:
        return [] if "add_error" in result else _describe_kernel(spec, result)

    return _Path(scenarios=kernel_scenarios(),
                 step_text=lambda spec: f"ip xfrm states and policies on both sides, {spec.count} pings",
                 run_one=lambda topo, spec: run_scenario(topo, spec, dev(topo)),
                 failures=lambda topo, spec, result: kernel_failures(spec, result, dev(topo)),
                 describe=describe, teardown=_kernel_teardown, print_rows=_kernel_rows, module=module)
