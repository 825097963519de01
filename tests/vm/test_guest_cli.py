"""The guest command line as a user types it: one `python3 -m guest_tools.cli ...` process per command,
against the real card in a VM (loopback wire, so what the card sends comes back to it). The card keeps
its SAs between processes; every command's output and exit status is checked."""

from __future__ import annotations

import json
import re

import pytest

from .card_vm import card_vm

pytestmark = pytest.mark.vm

CLI = "python3 -m guest_tools.cli"
CARD_MAC = "02:49:50:4e:43:00"  # the default profile's MAC
# Outbound and inbound SA with the same SPI and keys: on a loopback wire the card decrypts its own output.
SA_FILE = """\
sas:
  - spi: 0x1001
    direction: outbound
    mode: transport
    src: 10.0.0.1
    dst: 10.0.0.2
    aead: {alg: aes-gcm-128, key: 00112233445566778899aabbccddeeff, salt: cafebabe, icv: 16}
  - spi: 0x1001
    direction: inbound
    mode: transport
    src: 10.0.0.1
    dst: 10.0.0.2
    aead: {alg: aes-gcm-128, key: 00112233445566778899aabbccddeeff, salt: cafebabe, icv: 16}
"""


@pytest.fixture(scope="module")
def vm(toolchain, tmp_path_factory):
    with card_vm(toolchain, tmp_path_factory.mktemp("guest-cli"), {"wire": {"type": "loopback"}},
                 timeout_s=300) as rig:
        rig.vm.run(f"cat > /tmp/sas.yaml <<'EOF'\n{SA_FILE}EOF", check=True)
        yield rig.vm


def cli(vm, args: str, expect: int = 0) -> str:
    result = vm.run(f"{CLI} {args}", timeout=60)
    assert result.exit_code == expect, f"{args}: exit {result.exit_code}\n{result.output}"
    return result.output


def test_reset_caps_and_sa_lifecycle_across_processes(vm):
    assert "all SAs cleared" in cli(vm, "reset")
    caps = cli(vm, "caps")
    assert "CRYPTO_OFFLOAD" in caps and "PACKET_OFFLOAD" in caps
    added = cli(vm, "sa add --sa /tmp/sas.yaml")
    handles = re.findall(r"^(0x[0-9a-f]{8}) spi 0x1001 (outbound|inbound)", added, re.M)
    assert [d for _, d in handles] == ["outbound", "inbound"], added
    out_handle, in_handle = (int(h, 16) for h, _ in handles)
    assert "2 SA(s)" in cli(vm, "sa list")

    sent = cli(vm, f"send --count 3 --size 100 --src 10.0.0.1 --dst 10.0.0.2 --dst-mac {CARD_MAC} "
                   f"--sa {out_handle:#x}")
    assert "sent 3 frame(s)" in sent and "OK=3" in sent
    lines = [json.loads(line) for line in cli(vm, "recv --count 3 --timeout 10 --json").splitlines()
             if line.startswith("{")]
    assert len(lines) == 3
    for pkt in lines:
        assert pkt["crypto_done"] and pkt["crypto_status"] == "SUCCESS" and pkt["handle"] == in_handle
        inner = bytes.fromhex(pkt["inner"])  # the frame with the ESP removed: Ethernet, IPv4, UDP, payload
        assert inner[14 + 9] == 17 and len(inner) == 14 + 20 + 8 + 100
        assert inner[14 + 12:14 + 20] == bytes([10, 0, 0, 1, 10, 0, 0, 2])
    stats = cli(vm, "stats")
    assert re.search(r"tx_crypto_ok: 3\b", stats, re.I) and re.search(r"rx_crypto_ok: 3\b", stats, re.I), stats

    # Errors come back as a clear message and exit status 1, and the card keeps serving.
    refused = vm.run(f"{CLI} sa update {out_handle:#x} --seq-hi 1", timeout=60)
    assert refused.exit_code == 1 and "error" in refused.output.lower()
    unknown = vm.run(f"{CLI} sa del 0x80000999", timeout=60)
    assert unknown.exit_code == 1 and "error" in unknown.output.lower()
    assert "deleted 2 SA bundle(s)" in cli(vm, "sa del --all")
    assert "0 SA(s)" in cli(vm, "sa list")
