"""ipsec_nic.kernel_scenarios, the pure parts: the card's `ip xfrm` commands with offload, and parsing
iproute2/ethtool output into the counters the kernel-path demo and VM tests compare."""

from __future__ import annotations

import pytest

from device.contract.sa_file import parse_sa_document
from guest_tools import xfrm_peer
from guest_tools.scenario import SPI_IN, SPI_OUT, Spec, fill_keys, sa_document
from ipsec_nic import kernel_scenarios as ks


def sas_for(spec: Spec):
    return parse_sa_document(fill_keys(sa_document(spec)))


def test_card_states_are_the_peers_with_the_direction_and_offload_of_the_card():
    spec = Spec(esn=True, seq=0xFFFF_FFF0)
    out_sa, in_sa = sas_for(spec)
    out_state = ks.card_state_add(out_sa, 1, "eth1", "crypto")
    in_state = ks.card_state_add(in_sa, 2, "eth1", "crypto")
    assert out_state[-6:] == ["offload", "crypto", "dev", "eth1", "dir", "out"]
    assert in_state[-6:] == ["offload", "crypto", "dev", "eth1", "dir", "in"]
    # The card sends from seq + 1 (its output counter) and receives with its window at seq.
    assert out_state[out_state.index("replay-oseq") + 1] == "0xfffffff0" and "replay-seq" not in out_state
    assert in_state[in_state.index("replay-seq") + 1] == "0xfffffff0" and "replay-oseq" not in in_state
    # Same SA parameters as the peer's state for that SA (which has no offload), but no replay window on
    # the output state (Linux refuses one once the SA has a direction).
    peer = xfrm_peer.state_add(out_sa, 1)
    assert out_state[out_state.index("replay-window") + 1] == "0"
    assert in_state[in_state.index("replay-window") + 1] == "128"
    for word in ("src", "dst", "spi", "mode", "aead"):
        assert out_state[out_state.index(word) + 1] == peer[peer.index(word) + 1]


def test_packet_offload_hands_the_policies_to_the_driver_before_the_template():
    spec = Spec(family=6, mode="tunnel", offload="packet", alg="aes-cbc-128+hmac-sha256-128")
    commands = ks.card_commands(sas_for(spec), "eth1", "packet")
    policies = [c for c in commands if c[:3] == ["xfrm", "policy", "add"]]
    assert [p[p.index("dir") + 1] for p in policies] == ["out", "in"]
    for p in policies:
        at = p.index("offload")
        assert p[at:at + 4] == ["offload", "packet", "dev", "eth1"] and p.index("tmpl") == at + 4
    crypto = ks.card_commands(sas_for(Spec()), "eth1", "crypto")
    assert not any("offload" in c for c in crypto if c[1] == "policy")
    with pytest.raises(ValueError):
        ks.card_state_add(sas_for(Spec())[0], 1, "eth1", "bogus")


def test_batch_keeps_keys_out_of_argv():
    commands = ks.card_commands(sas_for(Spec()), "eth1", "crypto")
    text = ks.batch(commands, "peer")
    assert text.startswith("ip -n peer -batch - <<'IPSEC_NIC_EOF'\n") and text.endswith("IPSEC_NIC_EOF\n")
    assert xfrm_peer.batch_text(commands) in text


STATE_LISTING = """src 10.0.0.1 dst 10.0.0.2
\tproto esp spi 0x00001010 reqid 1 mode transport
\treplay-window 0 flag esn
\tanti-replay esn context:
\t seq-hi 0x0, seq 0x0, oseq-hi 0x1, oseq 0x10
\t replay_window 128, bitmap-length 4
\t 00000000 00000000 00000000 00000000
\tcrypto offload parameters: dev eth1 dir out mode crypto
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\tlifetime current:
\t  2176(bytes), 32(packets)
\t  add 2026-12-02 11:40:00 use 2026-12-02 11:40:01
\tstats:
\t  replay-window 0 replay 0 failed 0
src 10.0.0.2 dst 10.0.0.1
\tproto esp spi 0x00002010 reqid 2 mode transport
\treplay-window 128 flag esn
\tcrypto offload parameters: dev eth1 dir in mode packet
\tlifetime current:
\t  2176(bytes), 31(packets)
\tstats:
\t  replay-window 0 replay 1 failed 0
"""


def test_state_listing_gives_counters_and_offload_per_spi():
    offload = ks.parse_state_offload(STATE_LISTING)
    assert offload == {0x1010: {"dev": "eth1", "dir": "out", "mode": "crypto"},
                       0x2010: {"dev": "eth1", "dir": "in", "mode": "packet"}}
    states = {s.spi: s for s in xfrm_peer.parse_state_stats(STATE_LISTING)}
    assert (states[0x1010].packets, states[0x1010].oseq_hi, states[0x1010].oseq) == (32, 1, 0x10)
    assert (states[0x2010].packets, states[0x2010].replay) == (31, 1)


def test_ethtool_ping_and_sections_parse():
    assert ks.parse_ethtool_stats("NIC statistics:\n     rx_packets: 12\n     ipsec_tx_pkts: 3\n") == \
        {"rx_packets": 12, "ipsec_tx_pkts": 3}
    assert ks.parse_ping("3 packets transmitted, 2 received, 33% packet loss, time 2003ms") == \
        {"sent": 3, "received": 2}
    assert ks.parse_ping("ping: connect: Network is unreachable") == {"sent": 0, "received": 0}
    out = "noise\n@@section a\n1\n2\n@@section b\n3\n"
    assert ks.sections(out) == {"a": "1\n2", "b": "3"}


def _passing_result(spec: Spec, dev: str = "eth1") -> dict:
    n = spec.count
    out_spi, in_spi = SPI_OUT + spec.spi_base, SPI_IN + spec.spi_base
    state = {"packets": n, "integrity_failed": 0, "replay": 0, "replay_window_errors": 0}
    return {
        "ping": {"sent": n, "received": n},
        "card_offload": {f"{out_spi:#x}": {"dev": dev, "dir": "out", "mode": spec.offload},
                         f"{in_spi:#x}": {"dev": dev, "dir": "in", "mode": spec.offload}},
        "card_states": [{"spi": out_spi, **state}, {"spi": in_spi, **state}],
        "peer_states": [{"spi": out_spi, **state}, {"spi": in_spi, **state}],
        "card_policy_offload": 2 if spec.offload == "packet" else 0,
        "ethtool_delta": {ks.ETHTOOL_TX: n, ks.ETHTOOL_RX: n},
        "card_xfrm_stat_delta": {}, "peer_xfrm_stat_delta": {},
        "after_flush": {"card_states": 0, "peer_states": 0, "card_sas": 0},
    }


def test_kernel_failures_names_each_disagreement():
    spec = Spec(count=8, spi_base=0x10)
    good = _passing_result(spec)
    assert ks.kernel_failures(spec, good, "eth1") == []
    bad = _passing_result(spec)
    bad["ping"]["received"] = 7
    bad["peer_states"][0]["packets"] = 7
    bad["ethtool_delta"][ks.ETHTOOL_RX] = 9
    bad["peer_xfrm_stat_delta"] = {"XfrmInStateProtoError": 1}
    bad["card_offload"].pop(f"{SPI_IN + 0x10:#x}")
    failures = "\n".join(ks.kernel_failures(spec, bad, "eth1"))
    for text in ("ping (transmitted, received): got (8, 7)", "peer state 0x1010 packets: got 7",
                 "ipsec_rx_pkts: got 9", "XfrmInStateProtoError", "card state 0x2010 offload"):
        assert text in failures
    assert ks.kernel_failures(spec, {"add_error": "Error: nope"}, "eth1") == ["adding the SAs failed: Error: nope"]


def test_kernel_failures_names_drop_and_refusal_counters_that_moved():
    """A frame the card refused fails the run even when the counts otherwise agree (TCP retransmits it)."""
    spec = Spec(count=8, spi_base=0x10)
    result = _passing_result(spec)
    result["ethtool_delta"].update(tx_drop_offload_failed=3, card_tx_offload_error=3, fw_tx_errors=3, tx_ok=16)
    failures = ks.kernel_failures(spec, result, "eth1")
    assert failures == ["card drop/error counters that moved: got {'tx_drop_offload_failed': 3, "
                        "'card_tx_offload_error': 3, 'fw_tx_errors': 3}, expected {}"]


def test_kernel_failures_checks_the_esn_positions_on_both_ends():
    spec = Spec(count=32, esn=True, seq=0xFFFF_FFF0, keep_sas=True)
    result = _passing_result(spec)
    assert any("output position" in f for f in ks.kernel_failures(spec, result, "eth1"))
    result["card_states"][0].update(oseq_hi=1, oseq=0x10)
    result["peer_states"][0].update(seq_hi=1, seq=0x10)
    assert any("peer output position" in f for f in ks.kernel_failures(spec, result, "eth1"))
    result["peer_states"][1].update(oseq_hi=1, oseq=0x10)
    assert ks.kernel_failures(spec, result, "eth1") == []
    # Packet offload: the card numbers the packets; its kernel states keep their initial context.
    packet = Spec(count=32, esn=True, seq=0xFFFF_FFF0, keep_sas=True, offload="packet")
    result = _passing_result(packet)
    result["peer_states"][0].update(seq_hi=1, seq=0x10)
    result["peer_states"][1].update(oseq_hi=1, oseq=0x10)
    assert ks.kernel_failures(packet, result, "eth1") == []


def test_sa_table_dump_parses():
    table = ks.parse_sa_table(
        "SA count=2 tx=3 rx=3\n"
        "sa[0] handle=0x80000000 tx spi=0x00001009 proto=0x32 mode=transport family=4 crypto\n"
        "sa[1] handle=0x80000001 rx spi=0x00001009 proto=0x32 mode=tunnel family=6 packet\n")
    assert (table["count"], table["tx"], table["rx"]) == (2, 3, 3)
    assert [(s["dir"], s["spi"], s["mode"], s["family"], s["offload"]) for s in table["sas"]] == \
        [("tx", 0x1009, "transport", 4, "crypto"), ("rx", 0x1009, "tunnel", 6, "packet")]
    assert ks.parse_sa_table("cat: /sys/kernel/debug/ipsec_nic/*/ipsec: No such file")["count"] is None
