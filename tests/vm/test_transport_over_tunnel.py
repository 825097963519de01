"""Transport over tunnel (NDIS TunnelHandle / NextCryptoDone; datasheet §7.3, §7.6, §12.1 row 22) against
Linux XFRM, in one VM boot.

The card serves device/profiles/transport-over-tunnel.yaml (the default profile plus
firmware.transport_tunnel_combined). The Linux peer in netns `peer` holds, per direction, a transport state
between the end hosts and a tunnel state between the gateways, and ONE policy with two templates, transport
then tunnel (guest_tools/xfrm_peer.py transport_over_tunnel_commands). The guest side is
guest_tools/checks/combined.py: the driver sends with the transport SA + TxDesc.tunnel_handle, the peer's
kernel opens both layers; the peer's kernel seals both layers and the card indicates NEXT_CRYPTO_DONE.
The layers use different algorithms (inner AES-CBC + HMAC-SHA256, outer AES-GCM), so each layer's framing
is its own. Payloads are recomputed here (guest_tools.scenario.payload) and compared by digest.

The default profile not advertising it, and the guest tools refusing --tunnel-sa there, is proven without a
VM in tests/guest/test_transport_over_tunnel.py (the same driver and device model, in one process).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from guest_tools.checks.combined import CLI_PAYLOAD, T_IN, T_OUT, U_IN, U_OUT
from guest_tools.checks.common import run_check
from guest_tools.packets import pattern_payload
from guest_tools.scenario import NET, parse_udp_frame, payload, payload_digest
from ipsec_nic.topology import Topology

pytestmark = pytest.mark.vm

PROFILE = Path(__file__).resolve().parents[2] / "device" / "profiles" / "transport-over-tunnel.yaml"
COUNT, SIZE = 6, 300
GOOD = {
    4: {"name": "tot-ok", "family": 4, "count": COUNT, "size": SIZE, "spi_base": 0, "timeout": 10.0, "cli": True},
    6: {"name": "tot6-ok", "family": 6, "count": COUNT, "size": SIZE, "spi_base": 0x20, "timeout": 10.0},
}
BAD = {"name": "tot-bad-inner", "count": 4, "size": 120, "spi_base": 0x10, "timeout": 4.0,
       "peer_inner_keys": "different"}
# one UDP-encapsulated layer (RFC 3948, port 4500): "a" = NDIS TRANSPORT_OVER_TUNNEL (the tunnel layer in UDP),
# "b" = UDP_ESP_TRANSPORT_OVER_TUNNEL (the transport layer in UDP); the peer's states carry encap espinudp
UDP_KINDS = {
    "a": {"name": "tot-udp-tunnel", "family": 4, "count": COUNT, "size": SIZE, "spi_base": 0x40, "timeout": 10.0,
          "udp": "tunnel"},
    "b": {"name": "tot-udp-transport", "family": 4, "count": COUNT, "size": SIZE, "spi_base": 0x60,
          "timeout": 10.0, "udp": "transport"},
    # kind b without the peer's tunnel-only policy for the encapsulated flow (evidence for why it is there)
    "b-no-flow-policy": {"name": "tot-udp-noflow", "family": 4, "count": 3, "size": 120, "spi_base": 0x80,
                         "timeout": 3.0, "udp": "transport", "peer_flow_policy": False},
}


@pytest.fixture(scope="module")
def topo(toolchain, tmp_path_factory):
    logs = Path(os.environ["IPSEC_NIC_TOT_LOGS"]) if os.environ.get("IPSEC_NIC_TOT_LOGS") \
        else tmp_path_factory.mktemp("transport-over-tunnel")
    with Topology(toolchain, logs, profile=str(PROFILE), pcap=logs / "wire.pcap", timeout_s=240) as t:
        print(f"\ntopology up: boot {t.boot_seconds:.1f} s, peer setup {t.setup_seconds:.1f} s, logs in {logs}")
        t.pcap_path = logs / "wire.pcap"
        yield t
        assert t.card is not None and t.card.alive(), "the card server died"


@pytest.fixture(scope="module")
def runs(topo) -> dict:
    """Each spec's guest result, run once (in the order the tests ask for them)."""
    cache: dict = {}

    def get(key) -> dict:
        if key not in cache:
            spec = BAD if key == "bad" else UDP_KINDS[key] if key in UDP_KINDS else GOOD[key]
            cache[key] = run_check(topo.vm, "combined", "roundtrip", spec, timeout=120)
            print(f"guest check {spec['name']}: {cache[key]['_seconds']:.1f} s")
        return cache[key]

    return get


def _state(result: dict, spi: int) -> dict:
    [state] = [s for s in result["peer_states"] if s["spi"] == spi]
    return state


def _expected(spec: dict, direction: str) -> str:
    return payload_digest([payload(spec["name"], direction, i, spec["size"]) for i in range(spec["count"])])


def test_the_card_advertises_it_and_the_peer_has_nested_policies(runs):
    good = runs(4)
    assert good["offers"] is True and "TRANSPORT_TUNNEL_COMBINED" in good["features"]
    assert good["caps_transport_tunnel_combined"] == 1
    assert good["peer_policies"] == 4  # two policies, two templates each


@pytest.mark.parametrize("family", [4, 6])
def test_card_to_peer_the_linux_stack_opens_both_layers(runs, family):
    spec, good = GOOD[family], runs(family)
    c2p = good["card_to_peer"]
    assert c2p["error"] == "" and c2p["tx_status"] == {"OK": COUNT}
    assert (c2p["received"], c2p["matched"]) == (COUNT, COUNT)
    assert c2p["digest"] == _expected(spec, "card-to-peer")
    # Linux counted every datagram on BOTH states: the tunnel state opened the outer ESP, the transport
    # state the inner one, and nothing failed
    for spi in (U_OUT, T_OUT):
        state = _state(good, spi + spec["spi_base"])
        assert (state["packets"], state["integrity_failed"]) == (COUNT, 0), state
    assert good["xfrm_stat_delta"] == {}
    assert good["host_next_seq"] == {"t_out": COUNT + 1, "u_out": COUNT + 1}
    assert good["firmware_stats"]["tx_crypto"] == COUNT


@pytest.mark.parametrize("family", [4, 6])
def test_peer_to_card_next_crypto_done_with_both_handles(runs, family):
    spec, good = GOOD[family], runs(family)
    p2c = good["peer_to_card"]
    h = good["handles"]
    assert len(p2c["frames"]) == COUNT
    for f in p2c["frames"]:
        assert (f["crypto_done"], f["next_crypto_done"]) == (True, True), f
        assert (f["handle"], f["next_handle"]) == (h["u_in"], h["t_in"]), f
        assert (f["crypto_status"], f["tunnel_status"], f["transport_status"]) == ("SUCCESS",) * 3, f
        assert f["valid"], f
    assert (p2c["delivered"], p2c["matched"]) == (COUNT, COUNT)
    assert p2c["digest"] == _expected(spec, "peer-to-card")
    for spi in (U_IN, T_IN):  # the peer sealed every datagram with both of its outbound states
        assert _state(good, spi + spec["spi_base"])["packets"] == COUNT
    assert good["firmware_stats"]["rx_crypto_ok"] == COUNT and good["firmware_stats"]["rx_auth_failed"] == 0


def test_the_command_line_sends_and_receives_through_both_layers(runs):
    """`send --sa T --tunnel-sa U` and `recv --json` (guest_tools/cli.py) against the same Linux peer."""
    good = runs(4)
    cli, h = good["cli"], good["handles"]
    assert cli["send_status"] == 0 and "OK=1" in cli["send_output"], cli
    assert cli["peer_got"] == pattern_payload(64, 0).hex()  # what `send` puts in datagram 0
    r = cli["recv"]
    assert r is not None, cli
    assert (r["next_crypto_done"], r["handle"], r["next_handle"]) == (True, h["u_in"], h["t_in"])
    assert (r["crypto_status"], r["tunnel_status"], r["transport_status"]) == ("SUCCESS",) * 3
    dgram = parse_udp_frame(bytes.fromhex(r["inner"]))
    assert dgram is not None and dgram.data == CLI_PAYLOAD


def test_the_wire_carries_only_the_tunnel_spis_outside(topo, runs):
    """On the wire (the card's pcap) every IPsec frame between the gateways is the tunnel SA's ESP; the
    transport SPIs never appear as the outer header, and no payload shows in clear."""
    runs(4), runs(6)
    frames = [Ether(bytes(p)) for p in rdpcap(str(topo.pcap_path))]
    outer = []
    for f in frames:
        ip = f.getlayer(IP) or f.getlayer(IPv6)
        if ip is not None and f.haslayer(ESP):
            outer.append((ip.src, ip.dst, f[ESP].spi))
    for family in (4, 6):
        base = GOOD[family]["spi_base"]
        card_gw, peer_gw = NET.addrs(family, tunnel=False)
        sent = COUNT + (1 if GOOD[family].get("cli") else 0)  # the command line's datagram each way too
        assert outer.count((card_gw, peer_gw, U_OUT + base)) == sent
        assert outer.count((peer_gw, card_gw, U_IN + base)) == sent
        assert not [o for o in outer if o[2] in (T_OUT + base, T_IN + base)]
    raw = b"".join(bytes(f) for f in frames)
    assert b"ipsec-nic tot" not in raw and CLI_PAYLOAD[:24] not in raw


def test_wrong_inner_key_is_an_inner_failure_and_nothing_is_delivered(runs):
    bad = runs("bad")
    count = BAD["count"]
    h = bad["handles"]
    # peer -> card: the outer layer verifies, the inner fails: NEXT_CRYPTO_DONE with the transport status
    # (datasheet §12.1 row 22), the frame as received, nothing the host could take for a datagram
    p2c = bad["peer_to_card"]
    assert len(p2c["frames"]) == count
    for f in p2c["frames"]:
        assert (f["crypto_done"], f["next_crypto_done"]) == (True, True), f
        assert (f["handle"], f["next_handle"]) == (h["u_in"], h["t_in"]), f
        assert (f["crypto_status"], f["tunnel_status"], f["transport_status"]) == \
            ("TRANSPORT_ESP_AUTH_FAILED", "SUCCESS", "TRANSPORT_ESP_AUTH_FAILED"), f
        assert (f["inner"], f["valid"]) == (False, False), f
    assert p2c["delivered"] == 0
    assert bad["firmware_stats"]["rx_auth_failed"] == count and bad["firmware_stats"]["rx_crypto_ok"] == 0
    # card -> peer: the card sealed both layers with its keys; Linux opens the tunnel, the inner ICV fails
    c2p = bad["card_to_peer"]
    assert c2p["tx_status"] == {"OK": count} and c2p["received"] == 0
    base = BAD["spi_base"]
    assert _state(bad, U_OUT + base)["packets"] == count
    assert _state(bad, T_OUT + base)["integrity_failed"] == count
    assert bad["xfrm_stat_delta"].get("XfrmInStateProtoError") == count


# --- one UDP-encapsulated layer ------------------------------------------------------------------------------


def _wire_ipsec(pcap) -> list[tuple[str, str, str, int, bytes]]:
    """(kind, src, dst, spi, IP packet) of every IPv4 IPsec frame captured: "udp" = ESP in UDP 4500 (RFC 3948
    §2.1, parsed here by hand: SPI = the first 4 bytes after the UDP header), "esp" = plain ESP."""
    out = []
    for p in rdpcap(str(pcap)):
        f = Ether(bytes(p))
        if not f.haslayer(IP):
            continue
        ip = f[IP]
        raw = bytes(ip)
        hl = ip.ihl * 4
        if ip.proto == 17 and int.from_bytes(raw[hl + 2:hl + 4], "big") == 4500 and len(raw) >= hl + 16:
            out.append(("udp", ip.src, ip.dst, int.from_bytes(raw[hl + 8:hl + 12], "big"), raw))
        elif ip.proto == 50:
            out.append(("esp", ip.src, ip.dst, int.from_bytes(raw[hl:hl + 4], "big"), raw))
    return out


def test_udp_kinds_are_advertised_in_the_udp_esp_register(runs):
    for kind in ("a", "b"):
        r = runs(kind)
        # UDP_ESP = TRANSPORT | TUNNEL | TRANSPORT_OVER_TUNNEL | UDP_ESP_TRANSPORT_OVER_TUNNEL (the profile)
        assert r["udp_esp_register"] == 0xF and r["offers"] is True
        # two policies of two templates; kind b adds the peer's policy for the encapsulated flow (one template)
        assert r["peer_policies"] == (4 if kind == "a" else 5)


@pytest.mark.parametrize("kind", ["a", "b"])
def test_udp_kind_card_to_peer_linux_opens_both_layers(runs, kind):
    spec, r = UDP_KINDS[kind], runs(kind)
    c2p = r["card_to_peer"]
    assert c2p["error"] == "" and c2p["tx_status"] == {"OK": COUNT}, c2p
    assert (c2p["received"], c2p["matched"]) == (COUNT, COUNT), r["xfrm_stat_delta"]
    assert c2p["digest"] == _expected(spec, "card-to-peer")
    for spi in (U_OUT, T_OUT):  # per layer: the peer's tunnel state and its transport state
        state = _state(r, spi + spec["spi_base"])
        assert (state["packets"], state["integrity_failed"]) == (COUNT, 0), state
    assert r["xfrm_stat_delta"] == {}
    assert r["firmware_stats"]["tx_crypto"] == COUNT and r["host_next_seq"] == {"t_out": COUNT + 1,
                                                                                "u_out": COUNT + 1}


@pytest.mark.parametrize("kind", ["a", "b"])
def test_udp_kind_peer_to_card_next_crypto_done(runs, kind):
    spec, r = UDP_KINDS[kind], runs(kind)
    p2c, h = r["peer_to_card"], r["handles"]
    assert len(p2c["frames"]) == COUNT
    for f in p2c["frames"]:
        assert (f["crypto_done"], f["next_crypto_done"]) == (True, True), f
        assert (f["handle"], f["next_handle"]) == (h["u_in"], h["t_in"]), f
        assert (f["crypto_status"], f["transport_status"]) == ("SUCCESS", "SUCCESS"), f
        assert f["valid"], f
        # RFC 3948 §3.1.2: the UDP-encapsulated transport layer vouches for the datagram's checksum
        assert f["l4_csum_ok"] is (kind == "b"), f
    assert (p2c["delivered"], p2c["matched"]) == (COUNT, COUNT)
    assert p2c["digest"] == _expected(spec, "peer-to-card")
    for spi in (U_IN, T_IN):  # the peer's kernel sealed every datagram with both of its states
        assert _state(r, spi + spec["spi_base"])["packets"] == COUNT
    fw = r["firmware_stats"]
    assert (fw["rx_crypto_ok"], fw["rx_auth_failed"]) == (COUNT, 0)
    assert fw["rx_l4_csum_ok"] == (COUNT if kind == "b" else 0)


@pytest.mark.parametrize("kind", ["a", "b"])
def test_udp_kind_on_the_wire(topo, runs, kind):
    """Kind a: between the gateways only ESP-in-UDP 4500 with the tunnel SPIs. Kind b: only plain ESP with
    the tunnel SPIs; opening the tunnel layer (scapy, this run's tunnel key) shows the inner packet as UDP
    4500 carrying the transport SPI - for the card's frames and for the ones Linux built."""
    spec, r = UDP_KINDS[kind], runs(kind)
    base = spec["spi_base"]
    card_gw, peer_gw = NET.addrs(4, tunnel=False)
    card_host, peer_host = NET.addrs(4, tunnel=True)
    wire = [w for w in _wire_ipsec(topo.pcap_path) if w[3] - base in (T_OUT, U_OUT, T_IN, U_IN)]
    outer = "udp" if kind == "a" else "esp"
    sent = [w for w in wire if w[:4] == (outer, card_gw, peer_gw, U_OUT + base)]
    received = [w for w in wire if w[:4] == (outer, peer_gw, card_gw, U_IN + base)]
    assert (len(sent), len(received)) == (COUNT, COUNT)
    assert len(wire) == 2 * COUNT  # nothing else with these SPIs: no transport SPI outside, no other shape
    for frames, key, src, dst in ((sent, "u_out", card_gw, peer_gw), (received, "u_in", peer_gw, card_gw)):
        sa = SecurityAssociation(ESP, spi=frames[0][3], crypt_algo="AES-GCM",
                                 crypt_key=bytes.fromhex(r["tunnel_keys"][key]), tunnel_header=IP(src=src, dst=dst),
                                 nat_t_header=UDP(sport=4500, dport=4500) if kind == "a" else None)
        t_spi = (T_OUT if key == "u_out" else T_IN) + base
        for w in frames:
            inner = bytes(sa.decrypt(IP(w[4])))
            hl = (inner[0] & 0x0F) * 4
            assert {IP(inner).src, IP(inner).dst} == {card_host, peer_host}
            if kind == "b":
                assert (inner[9], int.from_bytes(inner[hl + 2:hl + 4], "big")) == (17, 4500)
                assert int.from_bytes(inner[hl + 8:hl + 12], "big") == t_spi
            else:
                assert (inner[9], int.from_bytes(inner[hl:hl + 4], "big")) == (50, t_spi)


def test_linux_needs_a_policy_for_the_encapsulated_flow(runs):
    """Without the tunnel-only policy for UDP 4500 between the end hosts, Linux drops the card's kind-b
    datagrams at its encap socket's policy check, which runs before it opens ESP-in-UDP
    (net/ipv4/udp.c udp_queue_rcv_one_skb): the tunnel state opened every frame, the transport state none,
    and XfrmInTmplMismatch counts them. So the peer configuration, not the card, needs that policy."""
    spec = UDP_KINDS["b-no-flow-policy"]
    r = runs("b-no-flow-policy")
    count, base = spec["count"], spec["spi_base"]
    assert r["peer_policies"] == 4
    c2p = r["card_to_peer"]
    assert c2p["tx_status"] == {"OK": count} and c2p["received"] == 0
    assert _state(r, U_OUT + base)["packets"] == count and _state(r, T_OUT + base)["packets"] == 0
    assert r["xfrm_stat_delta"].get("XfrmInTmplMismatch") == count
    assert r["peer_to_card"]["delivered"] == count  # the other direction does not need it
