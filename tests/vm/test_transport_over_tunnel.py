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
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP
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
            spec = BAD if key == "bad" else GOOD[key]
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
