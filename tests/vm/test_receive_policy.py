"""The card ENFORCES receive-side policy, shown from the guest against Linux XFRM (datasheet §12.1 rows 14-20,
§7.5/§7.6; guest side: guest_tools/checks/policy.py).

One VM boot (card + virtio-net peer in netns ``peer``), one guest process running every case; each test
below asserts one case. The peer's kernel builds every ESP packet (so what reaches the card is authentic
by construction), the wire is recorded to a pcap, and each figure is checked exactly: what the peer's
states sent, what crossed the wire, what the card indicated, dropped and counted.

* v1 filters (rows 14, 15, 18): a V1_ADD_SA SA whose filter names the peer's address, UDP and a port; the
  peer sends on that SPI from inside the filter, to another port, and from a second address. Inside ->
  CryptoDone SUCCESS; outside -> indicated unprocessed (CRYPTO_DONE clear, handle 0, POLICY_MISMATCH),
  counted in GET_STATS rx_policy_unprocessed; the bytes are exactly the peer's authentic ESP (the ICV is
  checked in the guest without the card). A v1 tunnel SA's filter is the inner connection (address and,
  from the SA file's ``selector``, UDP port).
* Tunnel inner selectors (row 19, RFC 4301 §5.2): packet offload drops a spoofed inner source (and UDP to
  a port outside its selector) and counts it in RX_POLICY_DROP; v2 crypto offload has no selector on the
  card, and the guest driver drops it.
* NAT-T transport checksum (row 20, RFC 3948 §3.1.2) through a real NAT: the sender sits in netns
  ``natin`` behind netns ``peer``, whose tc act_nat rewrites the outer source. The inner UDP checksum the
  sender computed is wrong for the post-NAT addresses; packet offload rewrites it (right for the post-NAT
  addresses), crypto offload flags L4_CSUM_OK.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from device.contract.regs import CryptoStatus
from guest_tools.checks.common import run_check
from ipsec_nic.topology import Topology

pytestmark = pytest.mark.vm

PEER, PEER2, CARD = "10.0.0.2", "10.0.0.3", "10.0.0.1"
INNER_PEER, INNER_SPOOF, INNER_CARD = "192.168.2.1", "192.168.2.9", "192.168.1.1"
NAT_PRIVATE = "172.16.0.2"
SUCCESS = int(CryptoStatus.SUCCESS)

# Distinct counts per kind of packet, so a figure cannot match by accident.
CASES: dict[str, dict[str, Any]] = {
    "v1_transport": {"check": "v1_transport", "spi": 0x7101, "dport": 5001, "inside": 4, "other_port": 3,
                     "other_source": 2},
    "v1_tunnel": {"check": "tunnel", "kind": "v1", "spi": 0x7201, "dport": 5011, "inside": 4, "spoofed": 3,
                  "other_port": 2},
    "packet_tunnel": {"check": "tunnel", "kind": "packet", "spi": 0x7301, "dport": 5021, "inside": 4, "spoofed": 3,
                      "other_port": 2},
    "v2_tunnel": {"check": "tunnel", "kind": "v2", "spi": 0x7401, "dport": 5031, "inside": 4, "spoofed": 3},
    "natt": {"check": "natt", "spi": 0x7501, "dport": 5041, "count": 3},
}


@pytest.fixture(scope="module")
def topo(toolchain, tmp_path_factory):
    logs = tmp_path_factory.mktemp("receive-policy")
    with Topology(toolchain, logs, pcap=logs / "wire.pcap", timeout_s=300) as t:
        print(f"\nVM up in {t.boot_seconds:.1f} s, peer set up in {t.setup_seconds:.1f} s, logs in {logs}")
        yield t


@pytest.fixture(scope="module")
def result(topo) -> dict[str, Any]:
    value = run_check(topo.vm, "policy", "all", {"cases": CASES}, timeout=240)
    (topo.log_dir / "policy-result.json").write_text(json.dumps(value, indent=1))  # what each test judged
    print(f"guest check: {value['_seconds']:.1f} s; " +
          ", ".join(f"{n} {value[n]['seconds']} s" for n in CASES))
    return value


@pytest.fixture(scope="module")
def wire(topo, result) -> list:
    """Every frame on the card's wire (the card server's pcap), read after the guest check finished."""
    assert result
    path = Path(topo.pcap)
    return list(rdpcap(str(path)))


def _esp_spi(frame) -> int | None:
    if ESP in frame:
        return frame[ESP].spi
    if UDP in frame and frame[UDP].dport == 4500 and len(bytes(frame[UDP].payload)) >= 8:
        return int.from_bytes(bytes(frame[UDP].payload)[:4], "big")
    return None


def _on_wire(wire: list, spi: int) -> Counter:
    """ESP frames on the wire for ``spi``, by outer source address."""
    return Counter(f[IP].src for f in wire if IP in f and _esp_spi(f) == spi)


def _state(states: list[dict], spi: int) -> dict:
    (state,) = [s for s in states if s["spi"] == spi]
    return state


def _ours(frames: list[dict], spi: int, handle: int = -1) -> list[dict]:
    """Frames the card indicated for this SPI: still ESP (crypto offload, or not processed) or decapsulated
    by the SA with ``handle`` (packet offload)."""
    return [f for f in frames if f.get("spi") == spi or (f["decapsulated"] and f["handle"] == handle)]


# --- v1 filters -------------------------------------------------------------------------------------------


def test_v1_transport_filter_delivers_only_its_source_protocol_and_port(result, wire):
    c, r = CASES["v1_transport"], result["v1_transport"]
    spi, handle = c["spi"], r["handle"]
    # Added by `sa add --v1 ... --sel-proto udp --sel-dport 5001` in its own process; found by the check's
    # process (which opened the card afterwards without a reset) with the v1 tunnel SA.
    assert r["cli"] == f"{handle:#010x} spi {spi:#x} inbound transport crypto selector udp sport any dport {c['dport']}"
    assert result["card_sas_at_open"] == 2
    # The packets really left the peer: its one state sealed all of them, the wire carried each from its source.
    assert _state(r["peer_states"], spi)["packets"] == c["inside"] + c["other_port"] + c["other_source"]
    assert _on_wire(wire, spi) == {PEER: c["inside"] + c["other_port"], PEER2: c["other_source"]}
    frames = _ours(r["frames"], spi)
    assert len(frames) == c["inside"] + c["other_port"] + c["other_source"]
    # Every one of them is the peer's authentic ESP (HMAC-SHA1-96 checked in the guest without the card).
    assert all(f["icv_ok_here"] for f in frames)
    by_kind: dict[tuple[str, int], list[dict]] = {}
    for f in frames:
        by_kind.setdefault((f["outer_src"], f["plain_udp"]["dport"]), []).append(f)
    inside = by_kind.pop((PEER, c["dport"]))
    other_port = by_kind.pop((PEER, c["dport"] + 1))
    other_source = by_kind.pop((PEER2, c["dport"]))
    assert not by_kind and (len(inside), len(other_port), len(other_source)) == (
        c["inside"], c["other_port"], c["other_source"])
    for f in inside:
        assert (f["crypto_done"], f["crypto_status"], f["handle"], f["policy_mismatch"]) == (True, SUCCESS, handle,
                                                                                             False)
        assert f["udp"]["dport"] == c["dport"] and f["udp"]["src"] == PEER  # the driver stripped ESP
    for f in other_port + other_source:
        assert (f["crypto_done"], f["crypto_status"], f["handle"], f["policy_mismatch"]) == (False, 0, 0, True)
        assert f["inner"] is None  # nothing for the host to take as protected traffic
    assert r["fw_stats"]["rx_policy_unprocessed"] == c["other_port"] + c["other_source"]
    assert r["card_stats"]["rx_crypto_ok"] == c["inside"]


def _inner_of_null_esp(frame_hex: str) -> IP:
    """The inner packet of a tunnel-mode ESP-NULL frame indicated as received (no IV: it follows the
    8-byte ESP header)."""
    return IP(bytes(IP(bytes.fromhex(frame_hex)[14:])[ESP])[8:])


def test_v1_tunnel_filter_is_the_inner_connection(result, wire):
    c, r = CASES["v1_tunnel"], result["v1_tunnel"]
    spi = c["spi"]
    outside = c["spoofed"] + c["other_port"]
    # `sa add --sa FILE --v1`, the file's selector: {proto: udp, dport: N}
    assert r["cli"] == f"{r['handle']:#010x} spi {spi:#x} inbound tunnel crypto selector udp sport any dport {c['dport']}"
    assert _state(r["peer_states"], spi)["packets"] == c["inside"] + outside
    assert _on_wire(wire, spi) == {PEER: c["inside"] + outside}  # one outer header for all of them
    frames = _ours(r["frames"], spi)
    ok = [f for f in frames if f["crypto_done"]]
    unprocessed = [f for f in frames if not f["crypto_done"]]
    assert len(ok) == c["inside"] and len(unprocessed) == outside
    assert all(f["crypto_status"] == SUCCESS and f["handle"] == r["handle"] for f in ok)
    assert {(f["udp"]["src"], f["udp"]["dport"]) for f in ok} == {(INNER_PEER, c["dport"])}
    assert all((f["policy_mismatch"], f["handle"], f["crypto_status"]) == (True, 0, 0) for f in unprocessed)
    # ESP-NULL: an unprocessed frame still shows what it carried - the spoofed source, or the other port
    inner = Counter((str(p.src), p[UDP].dport) for p in (_inner_of_null_esp(f["frame"]) for f in unprocessed))
    assert inner == {(INNER_SPOOF, c["dport"]): c["spoofed"], (INNER_PEER, c["dport"] + 1): c["other_port"]}
    assert r["fw_stats"]["rx_policy_unprocessed"] == outside


# --- tunnel inner selectors ---------------------------------------------------------------------------------


def test_packet_offload_drops_a_spoofed_inner_source_and_counts_it(result, wire):
    c, r = CASES["packet_tunnel"], result["packet_tunnel"]
    spi = c["spi"]
    outside = c["spoofed"] + c["other_port"]  # the SA's selector also names UDP to one port
    assert _state(r["peer_states"], spi)["packets"] == c["inside"] + outside
    assert _on_wire(wire, spi) == {PEER: c["inside"] + outside}
    delivered = _ours(r["frames"], spi, r["handle"])
    assert len(delivered) == c["inside"]  # nothing else: the others were not indicated at all
    for f in delivered:
        assert (f["decapsulated"], f["crypto_status"], f["handle"]) == (True, SUCCESS, r["handle"])
        assert (f["udp"]["src"], f["udp"]["dst"], f["udp"]["dport"]) == (INNER_PEER, INNER_CARD, c["dport"])
    assert not [f for f in r["frames"] if (f.get("udp") or {}).get("src") == INNER_SPOOF]
    assert r["card_stats"]["rx_policy_drop"] == outside  # the RX_POLICY_DROP register
    assert r["fw_stats"]["rx_policy_drops"] == outside
    assert r["card_stats"]["rx_crypto_ok"] == c["inside"]


def test_v2_crypto_offload_tunnel_selector_is_checked_by_the_guest_driver(result, wire):
    c, r = CASES["v2_tunnel"], result["v2_tunnel"]
    spi = c["spi"]
    assert _state(r["peer_states"], spi)["packets"] == c["inside"] + c["spoofed"]
    assert _on_wire(wire, spi) == {PEER: c["inside"] + c["spoofed"]}
    frames = _ours(r["frames"], spi)
    # V2_ADD_SA has no selector (row 8): the card verifies and decrypts all of them
    assert [(f["crypto_done"], f["crypto_status"], f["handle"]) for f in frames] == \
        [(True, SUCCESS, r["handle"])] * (c["inside"] + c["spoofed"])
    delivered = [f for f in frames if f["inner"] is not None]
    dropped = [f for f in frames if f["inner"] is None]
    assert {f["udp"]["src"] for f in delivered} == {INNER_PEER} and len(delivered) == c["inside"]
    assert [f["note"] for f in dropped] == [
        f"dropped by the host: inner source {INNER_SPOOF} is not the SA's selector {INNER_PEER} (RFC 4301 §5.2)"
    ] * c["spoofed"]
    assert "rx_policy_drop" not in r["card_stats"] and "rx_policy_unprocessed" not in r["fw_stats"]


# --- NAT-T transport checksum through a real NAT ------------------------------------------------------------


def _udp_checksum_ok(src: str, dst: str, udp: dict) -> bool:
    """Does the datagram's checksum hold for the pseudo-header (src, dst)? Computed by scapy."""
    pkt = IP(src=src, dst=dst) / UDP(sport=udp["sport"], dport=udp["dport"]) / bytes.fromhex(udp["data"])
    return IP(bytes(pkt))[UDP].chksum == udp["csum"]


def _nat_translations(tc_text: str) -> int:
    m = re.search(r"nat egress \S+ \S+.*?Sent \d+ bytes (\d+) pkt", tc_text, re.S)
    assert m, tc_text
    return int(m.group(1))


def test_natt_transport_checksum_through_a_real_nat(result, wire):
    c, r = CASES["natt"], result["natt"]
    rounds = r["rounds"]
    for kind in ("crypto", "packet"):
        spi = rounds[kind]["spi"]
        assert rounds[kind]["sent"] == c["count"]
        # The sender sealed them with its private address; the wire saw them from the public one.
        assert _state(r["natin_states"], spi)["packets"] == c["count"]
        assert _state(r["natin_states"], spi)["src"] == NAT_PRIVATE
        assert _on_wire(wire, spi) == {PEER: c["count"]}
    # act_nat rewrote exactly those (its filter matches the private source only)
    assert _nat_translations(r["tc_after"]) - _nat_translations(r["tc_before"]) == 2 * c["count"]

    crypto = _ours(r["frames"], rounds["crypto"]["spi"])
    assert len(crypto) == c["count"]
    for f in crypto:
        assert (f["crypto_done"], f["crypto_status"], f["handle"]) == (True, SUCCESS, rounds["crypto"]["handle"])
        assert f["l4_csum_ok"] and f["outer_src"] == PEER
        udp = f["udp"]
        assert (udp["src"], udp["dport"]) == (PEER, rounds["crypto"]["dport"])
        # Crypto offload leaves the bytes alone: the checksum is the sender's, computed before the NAT -
        # right for the private address, wrong for the addresses the host now sees. L4_CSUM_OK tells the
        # host not to check it (RFC 3948 §3.1.2).
        assert udp["csum"] != 0
        assert _udp_checksum_ok(NAT_PRIVATE, CARD, udp)
        assert not _udp_checksum_ok(PEER, CARD, udp)

    packet = _ours(r["frames"], rounds["packet"]["spi"], rounds["packet"]["handle"])
    assert len(packet) == c["count"]
    for f in packet:
        assert (f["crypto_status"], f["handle"], f["l4_csum_ok"]) == (SUCCESS, rounds["packet"]["handle"], True)
        udp = f["udp"]
        assert (udp["src"], udp["dst"], udp["dport"]) == (PEER, CARD, rounds["packet"]["dport"])
        # The card rewrote the checksum for the packet it delivers (post-NAT addresses).
        assert _udp_checksum_ok(PEER, CARD, udp)
        assert not _udp_checksum_ok(NAT_PRIVATE, CARD, udp)
    assert r["card_stats"]["rx_crypto_ok"] == 2 * c["count"]
    assert r["fw_stats"]["rx_l4_csum_ok"] == 2 * c["count"]
    assert r["card_sas_after"] == 0  # each case deleted its SAs: none left on the card


def test_the_pcap_is_the_cards_wire(wire):
    """The wire figures above come from real frames: Ethernet frames the card received from the peer."""
    assert wire and all(Ether in f for f in wire)
