"""The card's Linux driver under the guest kernel's own IPsec stack: `ip xfrm ... offload crypto|packet dev`.

One boot for the module: the card (vfio-user) with its kernel driver loaded and a netdev in the root netns,
and the Linux peer (virtio-net in netns `peer`, software XFRM) on the other end of the card's wire
(ipsec_nic/topology.py with a kernel module, qemu/guest_testbed.sh). The peer's kernel is the independent
party: it decrypts what the card encrypted and the other way round, and its counters are compared with
the card's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from guest_tools.scenario import SPI_IN, Spec
from ipsec_nic import kernel_scenarios as ks
from ipsec_nic.runner import load_kernel_module
from ipsec_nic.topology import Topology

pytestmark = pytest.mark.vm

GCM = "aes-gcm-128"
CBC = "aes-cbc-128+hmac-sha256-128"
BULK_BYTES = 2 * 1024 * 1024
ESN_START = 0xFFFF_FFF8  # the pings cross 2^32 half-way
# Kernel log lines that mean a driver or stack bug (include/asm-generic/bug.h, arch/x86/mm/fault.c, ...).
DMESG_PROBLEMS = re.compile(r"WARNING:|BUG:|Oops|general protection|Call Trace|kernel BUG|refcount_t:")


@dataclass
class KernelBed:
    topo: Topology
    dev: str

    def sh(self, command: str, timeout: float = 120.0, check: bool = True) -> str:
        result = self.topo.guest(command, timeout)
        # Name the command by its first line only: `ip -batch` input (with keys) follows on the next ones.
        what = command.splitlines()[0][:120]
        assert not result.timed_out, f"timed out: {what}\n{result.output[-2000:]}"
        if check:
            assert result.exit_code == 0, f"`{what}` exited {result.exit_code}:\n{result.output[-2000:]}"
        return result.output

    def table(self) -> dict:
        return ks.parse_sa_table(self.sh(ks.sa_table_command()))

    def ethtool(self) -> dict[str, int]:
        return ks.parse_ethtool_stats(self.sh(f"ethtool -S {self.dev}"))

    def xfrm_stat(self) -> dict[str, int]:
        from guest_tools.xfrm_peer import parse_xfrm_stat

        return parse_xfrm_stat(self.sh("cat /proc/net/xfrm_stat"))

    def dmesg_problems(self) -> list[str]:
        return [line for line in self.sh("dmesg").splitlines() if DMESG_PROBLEMS.search(line)]


_SPI_BASES = iter(range(0x100, 0x10000, 0x10))


@pytest.fixture(scope="module")
def kbed(toolchain, tmp_path_factory) -> Iterator[KernelBed]:
    logs = tmp_path_factory.mktemp("kernel-offload")
    module = load_kernel_module(toolchain, progress=lambda line: print(line, flush=True))
    with Topology(toolchain, logs, timeout_s=300, kernel_module=module) as topo:
        dev = topo.setup_info["IPSEC_NIC_DEV"]
        print(f"\nkernel test bed up: boot {topo.boot_seconds:.1f} s, driver + peer {topo.setup_seconds:.1f} s, "
              f"card netdev {dev}, logs in {logs}")
        bed = KernelBed(topo, dev)
        yield bed
        problems = bed.dmesg_problems()
        card = topo.card
        assert card is not None and card.alive(), card.log_tail() if card else "no card"
        assert "Traceback" not in (logs / "card.log").read_text(), card.log_tail(60)
    assert not problems, "\n".join(problems)


def _flush(bed: KernelBed) -> None:
    bed.sh(ks.FLUSH.format(ns=ks.NETNS))


# --- tools/testing/selftests/net/rtnetlink.sh kci_test_ipsec_offload, against the card -----------------------

# The selftest's key: "1234567890123456" + salt "dcba" (rtnetlink.sh: algo="aead rfc4106(gcm(aes)) 0x3132...6261 128").
KCI_ALGO = "aead 'rfc4106(gcm(aes))' 0x3132333435363738393031323334353664636261 128"
# The selftest uses SPI 9; the card refuses 1..255 (reserved, RFC 4303 §2.1), so the same SPI a bit higher.
KCI_SPI = "0x1009"


def test_kci_ipsec_offload_sequence(kbed):
    """rtnetlink.sh's sequence: flush, policies in/out, two SAs with `offload dev DEV dir out|in`, both listed
    with crypto offload parameters, three pings, the driver's SA table read back, flush, table empty. The peer
    gets the same SAs in software, so the pings come back (the selftest only checked TX)."""
    src, dst, dev, ns = "10.0.0.1", "10.0.0.2", kbed.dev, ks.NETNS
    _flush(kbed)
    before = kbed.table()
    sa = f"proto esp spi {KCI_SPI} mode transport reqid 42 {KCI_ALGO}"
    kbed.sh("\n".join([
        f"ip x p add dir out src {src}/24 dst {dst}/24 tmpl proto esp src {src} dst {dst} spi {KCI_SPI} mode transport reqid 42",
        f"ip x p add dir in src {dst}/24 dst {src}/24 tmpl proto esp src {dst} dst {src} spi {KCI_SPI} mode transport reqid 42",
        f"ip x s add src {src} dst {dst} {sa} sel src {src}/24 dst {dst}/24 offload dev {dev} dir out",
        f"ip x s add src {dst} dst {src} {sa} sel src {dst}/24 dst {src}/24 offload dev {dev} dir in",
        # The peer: the mirror image, in software.
        f"ip -n {ns} x p add dir in src {src}/24 dst {dst}/24 tmpl proto esp src {src} dst {dst} spi {KCI_SPI} mode transport reqid 42",
        f"ip -n {ns} x p add dir out src {dst}/24 dst {src}/24 tmpl proto esp src {dst} dst {src} spi {KCI_SPI} mode transport reqid 42",
        f"ip -n {ns} x s add src {src} dst {dst} {sa} sel src {src}/24 dst {dst}/24",
        f"ip -n {ns} x s add src {dst} dst {src} {sa} sel src {dst}/24 dst {src}/24",
    ]))
    listing = kbed.sh("ip x s list")
    assert len(re.findall(rf"crypto offload parameters: dev {dev} dir", listing)) == 2
    ping = kbed.sh(f"ping -I {dev} -c 3 -W 1 -i 0 {dst}", check=False)
    assert ks.parse_ping(ping) == {"sent": 3, "received": 3}, ping
    table = kbed.table()
    assert table["count"] == 2
    assert table["tx"] - before.get("tx", 0) == 3 and table["rx"] - before.get("rx", 0) == 3
    assert sorted((s["dir"], s["spi"], s["proto"], s["mode"], s["family"], s["offload"]) for s in table["sas"]) == [
        ("rx", 0x1009, "0x32", "transport", 4, "crypto"), ("tx", 0x1009, "0x32", "transport", 4, "crypto")]
    _flush(kbed)
    assert kbed.table()["count"] == 0


# --- crypto and packet offload x transport and tunnel x IPv4 and IPv6: pings and a TCP bulk transfer -------------

MATRIX = [(offload, mode, family) for offload in ("crypto", "packet") for mode in ("transport", "tunnel")
          for family in (4, 6)]


def _check(spec: Spec, result: dict, dev: str) -> None:
    failures = ks.kernel_failures(spec, result, dev)
    assert not failures, f"{spec.name}:\n" + "\n".join(failures) + f"\nping: {result.get('ping_output', '')}"


@pytest.mark.parametrize("offload, mode, family", MATRIX, ids=[f"{o}-{m}-v{f}" for o, m, f in MATRIX])
def test_offload_ping_and_tcp_bulk(kbed, offload, mode, family):
    spec = Spec(name=f"{offload}-{mode}-v{family}", family=family, mode=mode, offload=offload,
                alg=GCM if family == 4 else CBC, count=8, spi_base=next(_SPI_BASES))
    result = ks.run_scenario(kbed.topo, spec, kbed.dev, bulk_bytes=BULK_BYTES)
    _check(spec, result, kbed.dev)
    # The headline facts: every ping answered, and the bytes arrived intact both ways.
    assert result["ping"] == {"sent": 8, "received": 8}
    assert len(set(result["bulk"]["card_to_peer"] + result["bulk"]["peer_to_card"])) == 1


def test_packet_offload_ipv6_tunnel_pings(kbed):
    """Packet offload, IPv6 tunnel, AES-CBC + HMAC-SHA-256: every ping answered, and the card's, its stack's
    and the peer's counters agree packet for packet."""
    spec = Spec(name="packet-tunnel-v6-ping", family=6, mode="tunnel", offload="packet", alg=CBC, count=16,
                spi_base=next(_SPI_BASES))
    _check(spec, ks.run_scenario(kbed.topo, spec, kbed.dev), kbed.dev)


ESN_CASES = [("crypto", "transport", 4), ("crypto", "tunnel", 6), ("packet", "tunnel", 4), ("packet", "transport", 6)]


@pytest.mark.parametrize("offload, mode, family", ESN_CASES, ids=[f"{o}-{m}-v{f}" for o, m, f in ESN_CASES])
def test_esn_crosses_2_32_both_ways(kbed, offload, mode, family):
    """ESN (RFC 4304): numbering starts 8 below 2^32 on both SAs; pings and a TCP transfer cross it, and both
    ends agree on the new high half (crypto offload: the driver's advance_esn; packet offload: the card's)."""
    spec = Spec(name=f"esn-{offload}-{mode}-v{family}", family=family, mode=mode, offload=offload, esn=True,
                seq=ESN_START, alg=GCM, count=16, spi_base=next(_SPI_BASES))
    result = ks.run_scenario(kbed.topo, spec, kbed.dev, bulk_bytes=BULK_BYTES // 4)
    _check(spec, result, kbed.dev)


@pytest.mark.parametrize("family", [4, 6])
def test_udp_esp_packet_offload(kbed, family):
    """UDP-encapsulated ESP (RFC 3948). Linux 6.12 offloads encapsulated states in packet mode only."""
    spec = Spec(name=f"natt-v{family}", family=family, encap=True, offload="packet", count=8,
                spi_base=next(_SPI_BASES))
    result = ks.run_scenario(kbed.topo, spec, kbed.dev, bulk_bytes=BULK_BYTES // 4)
    _check(spec, result, kbed.dev)


# --- negatives --------------------------------------------------------------------------------------------


def _install(kbed: KernelBed, spec: Spec, peer_sas=None) -> list:
    """The scenario's SAs on both sides (peer_sas: other SAs for the peer, e.g. with other keys)."""
    from device.contract.sa_file import parse_sa_document
    from guest_tools import xfrm_peer
    from guest_tools.scenario import fill_keys, sa_document

    sas = parse_sa_document(fill_keys(sa_document(spec)))
    _flush(kbed)
    kbed.sh(ks.batch(ks.card_commands(sas, kbed.dev, spec.offload))
            + ks.batch(xfrm_peer.peer_commands(peer_sas or sas), ks.NETNS))
    return sas


def _card_state(kbed: KernelBed, spi: int) -> dict:
    from guest_tools.xfrm_peer import parse_state_stats

    states = parse_state_stats(kbed.sh(f"ip -s xfrm state | {ks.KEY_FILTER}"))
    return next(s.as_dict() for s in states if s.spi == spi)


def _peer_pings(kbed: KernelBed, count: int) -> str:
    return kbed.sh(f"ip netns exec {ks.NETNS} ping -c {count} -i 0.05 -W 2 10.0.0.1", check=False)


def test_icv_failures_from_the_peer_are_counted_by_the_stack(kbed):
    """The peer encrypts with another integrity key: the card reports the ICV failure (CryptoStatus) and the
    card's stack counts it exactly as software ESP would: the state's `failed` counter and
    XfrmInStateProtoError (net/xfrm/xfrm_input.c), one per packet; nothing reaches the card's sockets."""
    from device.contract.sa_file import parse_sa_document
    from guest_tools.scenario import fill_keys, sa_document
    from guest_tools.xfrm_peer import peer_commands

    spec = Spec(name="icv", count=6, spi_base=next(_SPI_BASES))
    card_sas = parse_sa_document(fill_keys(sa_document(spec)))
    wrong = parse_sa_document(fill_keys(sa_document(spec)))
    peer_sas = [card_sas[0], wrong[1]]  # the peer's outbound SA (the card's inbound) has other keys
    _flush(kbed)
    kbed.sh(ks.batch(ks.card_commands(card_sas, kbed.dev, "crypto")) + ks.batch(peer_commands(peer_sas), ks.NETNS))
    stat_before = kbed.xfrm_stat()
    ping = _peer_pings(kbed, spec.count)
    assert ks.parse_ping(ping)["received"] == 0, ping
    state = _card_state(kbed, SPI_IN + spec.spi_base)
    assert state["integrity_failed"] == spec.count
    assert state["packets"] == 0
    delta = {k: v - stat_before.get(k, 0) for k, v in kbed.xfrm_stat().items() if v != stat_before.get(k, 0)}
    assert delta == {"XfrmInStateProtoError": spec.count}
    _flush(kbed)


def test_replayed_packets_from_the_peer_are_counted_by_the_stack(kbed):
    """The peer's outbound state is deleted and added again with the same keys: its numbering restarts at 1,
    which the card's inbound SA has already seen. The stack's replay check (still the stack's job under
    crypto offload) drops each one: the state's `replay` counter and XfrmInStateSeqError."""
    from guest_tools import xfrm_peer

    spec = Spec(name="replay", count=6, spi_base=next(_SPI_BASES))
    card_out, card_in = _install(kbed, spec)
    first = _peer_pings(kbed, spec.count)
    assert ks.parse_ping(first)["received"] == spec.count, first
    kbed.sh(f"ip -n {ks.NETNS} xfrm state delete src {card_in.src} dst {card_in.dst} proto esp spi {card_in.spi:#x}\n"
            + ks.batch([xfrm_peer.state_add(card_in, 2)], ks.NETNS))
    stat_before = kbed.xfrm_stat()
    replayed = _peer_pings(kbed, spec.count)
    assert ks.parse_ping(replayed)["received"] == 0, replayed
    state = _card_state(kbed, card_in.spi)
    assert state["replay"] == spec.count
    assert state["packets"] == spec.count  # only the first, fresh round
    delta = {k: v - stat_before.get(k, 0) for k, v in kbed.xfrm_stat().items() if v != stat_before.get(k, 0)}
    assert delta == {"XfrmInStateSeqError": spec.count}
    _flush(kbed)


SOFT_PACKETS, HARD_PACKETS = 10, 20


def _expire_events(monitor: str, spi: int) -> list[int]:
    """The `hard` flag of each `ip xfrm monitor expire` event for ``spi``, in order (0 = soft, 1 = hard)."""
    events = []
    for block in monitor.split("Expired ")[1:]:
        flag = re.search(r"\bhard (\d)", block)
        if re.search(rf"\bspi {spi:#010x}\b", block) and flag:
            events.append(int(flag.group(1)))
    return events


def test_packet_offload_lifetimes_reach_the_stack_as_expire_events(kbed):
    """Packet offload: the card numbers and counts, so it also keeps the SA's lifetime (RFC 4301 §4.4.2.1). An
    outbound state with `limit packet-soft 10 limit packet-hard 20`: the stack sees a soft expire, then a
    hard one (`ip xfrm monitor`), the hard one deletes the state, the card sends exactly 20 packets (the
    peer's state counts them) and refuses the rest, and the driver counts the refused frames as drops, not
    as ipsec_tx_pkts."""
    from device.contract.enums import Direction
    from device.contract.sa_file import parse_sa_document
    from guest_tools import xfrm_peer
    from guest_tools.scenario import fill_keys, sa_document

    spec = Spec(name="lifetimes", offload="packet", count=HARD_PACKETS + 10, spi_base=next(_SPI_BASES))
    sas = parse_sa_document(fill_keys(sa_document(spec)))
    out = next(p for p in sas if p.direction == Direction.OUTBOUND)
    commands = ks.card_commands(sas, kbed.dev, "packet")
    state = next(argv for argv in commands if argv[:2] == ["xfrm", "state"] and f"{out.spi:#x}" in argv)
    at = state.index("offload")
    state[at:at] = ["limit", "packet-soft", str(SOFT_PACKETS), "limit", "packet-hard", str(HARD_PACKETS)]
    _flush(kbed)
    kbed.sh(ks.batch(commands) + ks.batch(xfrm_peer.peer_commands(sas), ks.NETNS))
    assert len(re.findall(rf"offload parameters: dev {kbed.dev} dir (?:out|in) mode packet",
                          kbed.sh("ip xfrm state list"))) == 2
    before = kbed.ethtool()
    # One guest command: the monitor runs while the pings go out and the driver's stats work (every 2 s)
    # and the xfrm timer act on the counts.
    output = kbed.sh(
        "ip xfrm monitor expire > /tmp/lifetimes.mon 2>&1 & mon=$!; sleep 0.5; "
        f"ping -c {spec.count} -i 0.05 -W 1 {out.dst} > /tmp/lifetimes.ping 2>&1; sleep 6; "
        "kill $mon; wait $mon 2>/dev/null; cat /tmp/lifetimes.ping; echo @@monitor; cat /tmp/lifetimes.mon",
        check=False)
    ping, monitor = output.split("@@monitor", 1)
    assert ks.parse_ping(ping)["received"] == HARD_PACKETS, ping
    assert _expire_events(monitor, out.spi) == [0, 1], monitor
    assert f"spi {out.spi:#010x}" not in kbed.sh("ip xfrm state list"), "the hard expire did not delete the state"
    after = kbed.ethtool()
    delta = {k: after[k] - before.get(k, 0) for k in ("ipsec_tx_pkts", "tx_drop_offload_failed",
                                                     "card_tx_offload_error")}
    # Pings past the 20th reach the card (and are refused by it) only until the driver's next stats poll
    # hands the count to the stack, whose hard expire then stops them before the driver: 0..10 refusals.
    refused = delta["tx_drop_offload_failed"]
    assert delta["ipsec_tx_pkts"] == HARD_PACKETS and 0 <= refused <= spec.count - HARD_PACKETS, delta
    assert delta["card_tx_offload_error"] == refused, delta
    # The independent count: the peer's software state decrypted exactly what the card sent.
    peer = next(st for st in xfrm_peer.parse_state_stats(kbed.sh(f"ip -n {ks.NETNS} -s xfrm state | {ks.KEY_FILTER}"))
                if st.spi == out.spi)
    assert peer.as_dict()["packets"] == HARD_PACKETS
    # Past the hard expire the stack has no state for the flow: nothing leaves, nothing is answered.
    again = kbed.sh(f"ping -c 3 -i 0.2 -W 1 {out.dst}", check=False)
    assert ks.parse_ping(again)["received"] == 0, again
    assert kbed.ethtool()["ipsec_tx_pkts"] == after["ipsec_tx_pkts"]
    _flush(kbed)


@pytest.mark.parametrize("offload", ["crypto", "packet"])
def test_an_algorithm_the_card_lacks_is_refused_with_an_extack_message(kbed, offload):
    """ChaCha20-Poly1305 (RFC 7634) exists in the guest kernel but not on the card: the driver refuses the
    state in xdo_dev_state_add with a message that says so, instead of a silent software fallback."""
    key = "0x" + "11" * 36
    output = kbed.sh(f"modprobe -q chacha20poly1305; ip xfrm state add src 10.0.0.1 dst 10.0.0.2 proto esp "
                     f"spi 0x7001 mode transport aead 'rfc7539esp(chacha20,poly1305)' {key} 128 "
                     f"offload {offload} dev {kbed.dev} dir out", check=False)
    assert "Error:" in output and "ipsec_nic" in output, output
    assert "0x7001" not in kbed.sh("ip xfrm state") and kbed.table()["count"] == 0


# --- an IKE daemon on both sides: strongSwan's charon, hardware offload on the card's side -------------------

# One charon per side, each with its own strongswan.conf (STRONGSWAN_CONF), vici socket and log; the peer's
# runs in netns `peer` with a private /run (charon's pid file is /run/charon.pid in both).
IKE_STRONGSWAN_CONF = """charon {{
  load_modular = no
  load = random nonce openssl pem pkcs1 x509 pubkey kernel-netlink socket-default vici
  install_routes = no
  retransmit_tries = 3
  plugins {{
    vici {{
      socket = unix://{vici}
    }}
  }}
  filelog {{
    log {{
      path = {log}
      default = 1
      ike = 2
      knl = 2
    }}
  }}
}}
"""
IKE_SWANCTL_CONF = """connections {{
  offload {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = aes128-sha256-x25519
    local {{
      auth = psk
      id = {local_id}
    }}
    remote {{
      auth = psk
      id = {remote_id}
    }}
    children {{
      net {{
        mode = transport
        local_ts = {local}/32
        remote_ts = {remote}/32
        esp_proposals = aes128gcm16-esn
        hw_offload = {hw_offload}
        rekey_time = 0
        start_action = none
      }}
    }}
  }}
}}
secrets {{
  ike-offload {{
    id-1 = card
    id-2 = peer
    secret = "ipsec-nic test bed pre-shared key"
  }}
}}
"""


def _ike_side(side: str, local: str, remote: str, hw_offload: str) -> str:
    """Guest shell: write one side's configuration and start its charon in the background (PID file)."""
    vici, log = f"/tmp/ike-{side}.vici", f"/tmp/ike-{side}.log"
    conf = IKE_STRONGSWAN_CONF.format(vici=vici, log=log)
    swanctl = IKE_SWANCTL_CONF.format(local=local, remote=remote, local_id=side,
                                      remote_id="peer" if side == "card" else "card", hw_offload=hw_offload)
    start = "/usr/lib/ipsec/charon"
    if side == "peer":
        start = f"ip netns exec {ks.NETNS} sh -c 'mount -t tmpfs tmpfs /run && exec /usr/lib/ipsec/charon'"
    return "\n".join([
        f"cat >/tmp/ike-{side}.strongswan.conf <<'IKE_EOF'\n{conf}IKE_EOF",
        f"cat >/tmp/ike-{side}.swanctl.conf <<'IKE_EOF'\n{swanctl}IKE_EOF",
        f"rm -f {vici} {log}",
        f"STRONGSWAN_CONF=/tmp/ike-{side}.strongswan.conf {start} >/tmp/ike-{side}.out 2>&1 </dev/null &",
        f"echo $! >/tmp/ike-{side}.pid",
        f"for i in $(seq 100); do [ -S {vici} ] && break; sleep 0.1; done",
        f"swanctl --load-all --file /tmp/ike-{side}.swanctl.conf --uri unix://{vici}",
    ])


def _ike_states(kbed: KernelBed) -> tuple[dict[int, dict[str, str]], dict[int, dict[str, str]]]:
    """SPI -> offload parameters on the card's side, and the peer's SPIs (no offload there)."""
    card = ks.parse_state_offload(kbed.sh(f"ip xfrm state | {ks.KEY_FILTER}"))
    peer_text = kbed.sh(f"ip -n {ks.NETNS} xfrm state | {ks.KEY_FILTER}")
    peer = {int(m, 16): {} for m in re.findall(r"proto esp spi (0x[0-9a-f]+)", peer_text)}
    return card, peer


@pytest.mark.parametrize("hw_offload", ["yes", "packet"])
def test_ike_negotiates_offloaded_sas_and_rekeys_without_loss(kbed, hw_offload):
    """strongSwan on both sides (PSK, IKEv2, ESP AES-GCM-128 with ESN, transport): the card's side with
    hw_offload = yes (crypto offload) or packet installs its CHILD_SA on the card; traffic flows; a rekey
    during a ping run replaces both SAs on the card (new SPIs, old ones gone) and loses no ping."""
    card_uri, peer_uri = "unix:///tmp/ike-card.vici", "unix:///tmp/ike-peer.vici"
    _flush(kbed)
    before = kbed.table()["count"]
    try:
        kbed.sh(_ike_side("card", "10.0.0.1", "10.0.0.2", hw_offload))
        kbed.sh(_ike_side("peer", "10.0.0.2", "10.0.0.1", "no"))
        up = kbed.sh(f"swanctl --initiate --child net --uri {card_uri} --timeout 60", timeout=90, check=False)
        assert "initiate completed successfully" in up, up + kbed.sh("tail -40 /tmp/ike-card.log", check=False)
        card, peer = _ike_states(kbed)
        assert len(card) == 2 and set(card) == set(peer), (card, peer)
        assert sorted(o["dir"] for o in card.values()) == ["in", "out"]
        assert all(o["dev"] == kbed.dev for o in card.values())
        mode = "crypto" if hw_offload == "yes" else "packet"
        assert all(o["mode"] == mode for o in card.values()), card
        table = kbed.table()
        assert table["count"] == before + 2 and {s["spi"] for s in table["sas"]} == set(card)
        assert {s["offload"] for s in table["sas"]} == {mode}
        assert ks.parse_ping(kbed.sh("ping -c 5 -i 0.1 -W 2 10.0.0.2", check=False))["received"] == 5

        # Rekey in the middle of a ping run (initiated from the peer's side, so the card's side installs the
        # new inbound SA on a request it did not start): no ping lost.
        run = kbed.sh(f"ping -c 60 -i 0.05 -W 2 10.0.0.2 >/tmp/ike-ping.out 2>&1 & pid=$!\n"
                      f"sleep 1; swanctl --rekey --child net --uri {peer_uri}; "
                      "for i in $(seq 100); do [ $(ip xfrm state | grep -c '^src') = 2 ] && break; sleep 0.1; done\n"
                      "wait $pid; cat /tmp/ike-ping.out", timeout=120, check=False)
        assert ks.parse_ping(run) == {"sent": 60, "received": 60}, run
        card_after, peer_after = _ike_states(kbed)
        assert len(card_after) == 2 and set(card_after) == set(peer_after), (card_after, peer_after)
        assert not set(card_after) & set(card), "the rekey kept an old SPI"
        table = kbed.table()
        assert table["count"] == before + 2 and {s["spi"] for s in table["sas"]} == set(card_after)
        assert ks.parse_ping(kbed.sh("ping -c 3 -i 0.1 -W 2 10.0.0.2", check=False))["received"] == 3
    finally:
        kbed.sh(f"swanctl --terminate --ike offload --uri {card_uri} --timeout 10 >/dev/null 2>&1; "
                "kill $(cat /tmp/ike-card.pid /tmp/ike-peer.pid) 2>/dev/null; sleep 0.5", check=False)
        _flush(kbed)
    assert kbed.table()["count"] == before


ITR_TEST_US = 5000  # long enough that a TCG guest sends many frames per gap


def test_coalesce_sets_the_cards_itr_and_a_udp_stream_is_reaped_in_batches(kbed):
    """ethtool -c/-C are the card's ITR (datasheet section 8; TX0 and RX0 share a vector, so rx-usecs and
    tx-usecs are one value). Under a stream of datagrams the queue vector fires at most once per ITR gap,
    and the driver writes TAIL at most once per frame (netdev_xmit_more bursts write it once)."""
    dev = kbed.dev
    usecs = re.compile(r"^(rx|tx)-usecs:\s+(\d+)", re.M)
    assert dict(usecs.findall(kbed.sh(f"ethtool -c {dev}"))) == {"rx": "250", "tx": "250"}
    try:
        kbed.sh(f"ethtool -C {dev} tx-usecs 100")
        assert dict(usecs.findall(kbed.sh(f"ethtool -c {dev}"))) == {"rx": "100", "tx": "100"}
        refused = kbed.sh(f"ethtool -C {dev} rx-usecs 10 tx-usecs 20 2>&1; echo rc=$?", check=False)
        assert "rc=0" not in refused and "share one ITR" in refused, refused
        assert "rc=0" not in kbed.sh(f"ethtool -C {dev} rx-usecs 70000 2>&1; echo rc=$?", check=False)
        kbed.sh(f"ethtool -C {dev} rx-usecs {ITR_TEST_US}")
        _flush(kbed)
        frames = 2000
        out = kbed.sh(
            f"ethtool -S {dev}; date +T0=%s.%N; python3 -c \"import socket\n"
            f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range({frames}): s.sendto(bytes(1372), ('10.0.0.2', 9))\"; sleep 0.2; "
            f"date +T1=%s.%N; echo @@after; ethtool -S {dev}")
        before_text, after_text = out.split("@@after")
        before, after = ks.parse_ethtool_stats(before_text), ks.parse_ethtool_stats(after_text)
        elapsed = float(re.search(r"T1=([\d.]+)", out).group(1)) - float(re.search(r"T0=([\d.]+)", out).group(1))

        def delta(name: str) -> int:
            return after[name] - before[name]

        assert delta("card_tx_packets") >= frames
        assert 0 < delta("tx_doorbells") <= delta("card_tx_packets")
        # At most one message per gap (plus the one that opens the first gap); without ITR the vector
        # fires about once per reaped burst, several times as often at these rates.
        assert delta("queue_irqs") <= elapsed / (ITR_TEST_US * 1e-6) + 1, (delta("queue_irqs"), elapsed)
    finally:
        kbed.sh(f"ethtool -C {dev} rx-usecs 250")


def test_removing_the_module_with_sas_installed_frees_them_on_the_card(kbed):
    """rmmod with offloaded SAs: the stack flushes the device's states (NETDEV_UNREGISTER) and the driver
    deletes them on the card; the user-space driver then finds the card empty. Reloading works."""
    spec = Spec(name="rmmod", count=4, spi_base=next(_SPI_BASES))
    _install(kbed, spec)
    assert kbed.table()["count"] == 2
    kbed.sh("rmmod ipsec_nic")
    assert "0x" not in kbed.sh("ip xfrm state | grep '^src' || true")
    listing = kbed.sh("python3 -m guest_tools.cli sa list")
    assert listing.splitlines()[0] == "0 SA(s)", listing
    kbed.topo.kernel_setup("card")
    _flush(kbed)
    assert kbed.table()["count"] == 0
    assert ks.parse_ping(kbed.sh("ping -c 2 -W 2 10.0.0.2", check=False))["received"] == 2


def test_dmesg_has_no_warning_bug_or_oops(kbed):
    assert kbed.dmesg_problems() == []
