"""Session fixture for the interop suites: one VM with the card and a Linux XFRM peer (ipsec_nic/topology.py).

Imported by tests/vm/conftest.py. The topology boots once per test session; every scenario resets the
card (CTRL.RESET), flushes the peer's states and policies, and deletes its SAs again at the end.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_tools.scenario import Spec, expected_digest
from ipsec_nic.topology import Topology, interop_failures

# The default profile plus 3DES-CBC and HMAC-MD5-96 (tests/vm/test_interop_algorithms.py proves them); it
# changes nothing else, so the other interop suites see the default card.
LEGACY_PROFILE = Path(__file__).resolve().parents[2] / "device" / "profiles" / "legacy-algorithms.yaml"


@pytest.fixture(scope="session")
def interop(toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """Card server + VM with the card and a virtio-net peer in netns `peer`; wire recorded to a pcap.

    The card serves LEGACY_PROFILE. Logs (card server, serial console, QEMU) and wire.pcap stay in the pytest temp dir, or in
    $IPSEC_NIC_INTEROP_LOGS if set."""
    logs = Path(os.environ["IPSEC_NIC_INTEROP_LOGS"]) if os.environ.get("IPSEC_NIC_INTEROP_LOGS") \
        else tmp_path_factory.mktemp("interop")
    with Topology(toolchain, logs, profile=str(LEGACY_PROFILE), pcap=logs / "wire.pcap", timeout_s=300) as topo:
        print(f"\ninterop topology up: boot {topo.boot_seconds:.1f} s, peer setup {topo.setup_seconds:.1f} s, "
              f"logs in {logs}")
        yield topo


GCM = "aes-gcm-128"
CBC = "aes-cbc-128+hmac-sha256-128"
_spi = itertools.count(1)


def run_spec(interop, **fields) -> tuple[Spec, dict]:
    spec = Spec(spi_base=next(_spi) * 16, **fields)
    t0 = time.monotonic()
    result = interop.run(spec)
    print(f"{spec.name}: {time.monotonic() - t0:.1f} s (guest {result['timings']['total']:.1f} s)")
    return spec, result


def check(spec: Spec, result: dict) -> None:
    failures = interop_failures(spec, result)
    assert not failures, "\n".join(failures)
    # The headline facts, spelled out: each side decrypted all of the other's datagrams, byte for byte.
    assert result["card_to_peer"]["matched"] == spec.count
    assert result["card_to_peer"]["digest"] == expected_digest(spec, "card-to-peer")
    assert result["peer_to_card"]["crypto_status"] == {"SUCCESS": spec.count}
    assert result["peer_to_card"]["digest"] == expected_digest(spec, "peer-to-card")
