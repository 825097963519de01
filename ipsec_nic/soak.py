"""`ipsec-nic soak --minutes N`: SA churn mixed with traffic both ways, then a full accounting.

One VM with the card and a Linux XFRM peer (ipsec_nic.topology: the guest kernel on a virtio-net NIC whose
netdev is the card's wire). Until the time is up, rounds of guest_tools.scenario run back to back, each
with fresh SAs on both sides (ADD through the admin queue; ESN SAs start just below the 2^32 wrap, so the
driver pushes the new high half with V2_UPDATE_SA; DELETE at the end of the round), rotating algorithm,
family, mode, UDP encapsulation and crypto/packet offload, with datagrams card -> peer and peer -> card.

At the end every datagram sent is accounted for: delivered (decrypted by the other side, byte-exact by
digest), or dropped with a reason a counter names (TX completion status, the card's RX counters, the
peer's XFRM counters). Anything else is *lost* and fails the soak, as does an SA left on the card or the
peer after a round, or card server fd count / RSS that grow (measured from /proc after the first round).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Rounds rotate through these variations (each round gets fresh SPIs through spi_base).
VARIANTS: tuple[dict[str, Any], ...] = (
    {"alg": "aes-gcm-128"},
    {"alg": "aes-cbc-128+hmac-sha256-128", "family": 6},
    {"alg": "aes-gcm-256", "esn": True, "seq": 0xFFFF_FFF8},  # crosses 2^32: ESN update on the card
    {"alg": "aes-gcm-128", "mode": "tunnel", "offload": "packet"},
    {"alg": "aes-gcm-128", "encap": True},
    {"alg": "aes-cbc-256+hmac-sha256-128", "mode": "tunnel", "family": 6, "esn": True, "seq": 0xFFFF_FFF0},
)
COUNT = 40  # datagrams per direction per round (the card's RX ring holds 127)
RSS_GROWTH_LIMIT_KIB = 8 * 1024  # allocator noise over a soak; a leak per round exceeds it quickly


@dataclass
class Ledger:
    """Datagrams by direction: sent, delivered and dropped (by reason)."""

    sent: Counter[str] = field(default_factory=Counter)
    delivered: Counter[str] = field(default_factory=Counter)
    dropped: dict[str, Counter[str]] = field(default_factory=lambda: {"card-to-peer": Counter(),
                                                                      "peer-to-card": Counter()})

    def lost(self, direction: str) -> int:
        return self.sent[direction] - self.delivered[direction] - sum(self.dropped[direction].values())

    def add_round(self, result: dict[str, Any]) -> None:
        c2p, p2c = result.get("card_to_peer", {}), result.get("peer_to_card", {})
        stats = result.get("card_stats", {})
        peer: Counter[str] = Counter()  # what the peer's kernel refused of the card's packets
        out_peer: Counter[str] = Counter()  # what it could not send (XfrmOut*)
        for state in result.get("peer_states", []):
            for key in ("integrity_failed", "replay", "replay_window_errors"):
                peer[key] += int(state.get(key) or 0)
        for key, value in (result.get("xfrm_stat_delta") or {}).items():
            (out_peer if key.startswith("XfrmOut") else peer)[key] += int(value)
        d = "card-to-peer"
        self.sent[d] += int(c2p.get("sent", 0))
        self.delivered[d] += int(c2p.get("received", 0))
        for status, n in (c2p.get("tx_status") or {}).items():
            if status != "OK":
                self.dropped[d][f"card TX status {status}"] += n
        for key, n in peer.items():  # what the peer's kernel refused, by its own counters
            if n:
                self.dropped[d][f"peer XFRM {key}"] += n
        d = "peer-to-card"
        self.sent[d] += int(p2c.get("sent", 0))
        self.delivered[d] += int(p2c.get("received", 0))
        for key in ("rx_auth_fail", "rx_replay_drop", "rx_no_buffer", "dma_error"):
            if stats.get(key):
                self.dropped[d][f"card {key.upper()}"] += int(stats[key])
        for key, n in out_peer.items():
            if n:
                self.dropped[d][f"peer XFRM {key}"] += n

    def table(self) -> str:
        rows = [("direction", "sent", "delivered", "dropped (reason)", "lost")]
        for d in ("card-to-peer", "peer-to-card"):
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped[d].items())) or "0"
            rows.append((d, str(self.sent[d]), str(self.delivered[d]), reasons, str(self.lost(d))))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _proc_figures(pid: int) -> tuple[int, int]:
    """(open fds, anonymous RSS KiB) of the card server. Not VmRSS: that also counts the pages of guest RAM
    (the shared memfd) the card has touched, which grows as guest processes use fresh memory."""
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("RssAnon:"))
    return fds, rss


@dataclass
class SoakResult:
    rounds: int = 0
    ledger: Ledger = field(default_factory=Ledger)
    sa_leaks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    figures: list[tuple[int, int]] = field(default_factory=list)  # (fds, RSS KiB) after each round
    esn_updates: int = 0  # rounds whose outbound SA crossed 2^32 and got its new high half by V2_UPDATE_SA

    @property
    def ok(self) -> bool:
        return (self.rounds > 0 and not self.sa_leaks and not self.errors
                and all(self.ledger.lost(d) == 0 for d in ("card-to-peer", "peer-to-card"))
                and not self.resource_growth())

    def resource_growth(self) -> list[str]:
        if len(self.figures) < 2:
            return []
        (fd0, rss0), (fd1, rss1) = self.figures[0], self.figures[-1]
        out = []
        if fd1 != fd0:
            out.append(f"card server fds {fd0} -> {fd1}")
        if rss1 - rss0 > RSS_GROWTH_LIMIT_KIB:
            out.append(f"card server anonymous RSS {rss0} -> {rss1} KiB")
        return out

    def report(self) -> str:
        lines = [f"soak: {self.rounds} rounds (SA add, traffic both ways, ESN update where the round crosses "
                 "2^32, delete)", "", self.ledger.table(), ""]
        if self.figures:
            (fd0, rss0), (fd1, rss1) = self.figures[0], self.figures[-1]
            lines.append(f"card server: fds {fd0} -> {fd1}, anonymous RSS {rss0} -> {rss1} KiB (after round 1 -> "
                         "last)")
        lines.append(f"ESN high half updated on the card (V2_UPDATE_SA) in {self.esn_updates} round(s)")
        lines.append(f"SAs left after a round (card or peer): {', '.join(self.sa_leaks) or 'none'}")
        lines += [f"error: {e}" for e in self.errors + self.resource_growth()]
        lines.append("result: " + ("every datagram accounted for" if self.ok else "FAILED"))
        return "\n".join(lines)


def soak(topology: Any, seconds: float, say=print, min_rounds: int = 1) -> SoakResult:
    """Run rounds on a started ipsec_nic.topology.Topology until ``seconds`` have passed (and at least
    ``min_rounds`` ran)."""
    from guest_tools.scenario import Spec

    res = SoakResult()
    assert topology.card is not None and topology.card.process is not None
    pid = topology.card.process.pid
    end = time.monotonic() + seconds
    while res.rounds < min_rounds or time.monotonic() < end:
        variant = VARIANTS[res.rounds % len(VARIANTS)]
        spec = Spec(name=f"soak-{res.rounds}", count=COUNT, spi_base=res.rounds * 0x10, **variant)
        try:
            result = topology.run(spec)
        except Exception as exc:  # the round could not run: that is a failure, reported
            res.errors.append(f"round {res.rounds}: {exc}")
            break
        res.ledger.add_round(result)
        if spec.esn and spec.offload == "crypto":
            if result.get("esn_hi_pushed") != (spec.seq + spec.count) >> 32:
                res.errors.append(f"round {res.rounds}: ESN high half pushed {result.get('esn_hi_pushed')}, "
                                  f"expected {(spec.seq + spec.count) >> 32}")
            else:
                res.esn_updates += 1
        if result.get("card_sas_after_delete") or result.get("peer_states_after_flush"):
            res.sa_leaks.append(f"round {res.rounds}: card {result.get('card_sas_after_delete')}, "
                                f"peer {result.get('peer_states_after_flush')}")
        if result.get("deleted") != 2:
            res.sa_leaks.append(f"round {res.rounds}: deleted {result.get('deleted')} of 2 SAs")
        if not topology.card.alive():
            res.errors.append("the card server died")
            break
        res.figures.append(_proc_figures(pid))
        res.rounds += 1
        say(f"round {res.rounds}: {spec.alg} v{spec.family} {spec.mode}{' esn' if spec.esn else ''}"
            f"{' udp' if spec.encap else ''} {spec.offload}: lost so far "
            f"{res.ledger.lost('card-to-peer')}/{res.ledger.lost('peer-to-card')}; card server "
            f"{res.figures[-1][0]} fds, {res.figures[-1][1]} KiB")
    return res


def run(minutes: float, log_dir: Path | None = None, verbose: int = 0) -> int:
    """The `ipsec-nic soak` command: boot, soak, print the accounting table; exit 0 when all is accounted."""
    from ipsec_nic.topology import Topology
    from qemu import toolchain as vm_toolchain

    def say(message: str) -> None:
        print(f"[ipsec-nic] {message}", file=sys.stderr, flush=True)

    tc = vm_toolchain.setup()
    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="ipsec-nic-soak-"))
    say(f"soak for {minutes:g} min; logs in {logs}; booting the VM (TCG, about 15 s)")
    with Topology(tc, logs, verbose=verbose) as topo:
        res = soak(topo, minutes * 60.0, say=say)
    print(res.report())
    return 0 if res.ok else 1
