"""The card's wire on QEMU's `-netdev stream` (length-prefixed frames over a UNIX stream socket) instead of
`-netdev dgram`: the same Linux XFRM peer on a virtio-net NIC must decrypt the card's traffic and the card
the peer's. One boot of its own (module scope), one scenario each way.
"""

from __future__ import annotations

import pytest

from ipsec_nic.topology import Topology

from .fixtures_interop import GCM, check, run_spec

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def stream_topology(toolchain, tmp_path_factory):
    logs = tmp_path_factory.mktemp("interop-stream")
    with Topology(toolchain, logs, pcap=logs / "wire.pcap", timeout_s=300, netdev="stream") as topo:
        yield topo


def test_stream_netdev_carries_ipsec_both_ways(stream_topology):
    spec, result = run_spec(stream_topology, name="stream-v4-transport-gcm", family=4, mode="transport", alg=GCM)
    check(spec, result)
    assert result["card_stats"]["tx_crypto_ok"] == spec.count
    assert result["card_stats"]["rx_crypto_ok"] == spec.count
