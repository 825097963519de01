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


# Issue 9: no silent drops, V2_ADD_SA lists with per-entry results, lifetimes, AH and ESP-then-AH bundles.
GCM_KEYS = "aead: {alg: aes-gcm-128, key: 00112233445566778899aabbccddeeff, salt: cafebabe}"
AH_KEY = "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
ISSUE9_FILES = {
    "bad.yaml": f"""sas:
  - {{spi: 0x2001, direction: outbound, src: 10.0.0.1, dst: 10.0.0.2, {GCM_KEYS}}}
  - {{spi: 0x2001, direction: inbound, src: 10.0.0.1, dst: 10.0.0.2, replay_window: 128, {GCM_KEYS}}}
""",
    "list.yaml": f"""sas:
  - {{spi: 0x3001, direction: inbound, src: 10.0.0.1, dst: 10.0.0.2, {GCM_KEYS}}}
  - {{spi: 0x3001, direction: inbound, src: 10.0.0.1, dst: 10.0.0.2, {GCM_KEYS}}}
  - {{spi: 0x3002, direction: inbound, src: 10.0.0.1, dst: 10.0.0.2, {GCM_KEYS}}}
""",
    "ah.yaml": f"""sas:
  - {{spi: 0x4001, direction: outbound, proto: ah, src: 10.0.0.1, dst: 10.0.0.2,
     integrity: {{alg: hmac-sha256-128, key: {AH_KEY}}}}}
  - {{spi: 0x4001, direction: inbound, proto: ah, src: 10.0.0.1, dst: 10.0.0.2,
     integrity: {{alg: hmac-sha256-128, key: {AH_KEY}}}}}
  - {{spi: 0x5001, direction: outbound, src: 10.0.0.1, dst: 10.0.0.2,
     cipher: {{alg: aes-cbc-128, key: 000102030405060708090a0b0c0d0e0f}},
     integrity: {{alg: hmac-sha1-96, key: 000102030405060708090a0b0c0d0e0f10111213}},
     ah: {{spi: 0x5002, integrity: {{alg: hmac-sha256-128, key: {AH_KEY}}}}}}}
  - {{spi: 0x5001, direction: inbound, src: 10.0.0.1, dst: 10.0.0.2,
     cipher: {{alg: aes-cbc-128, key: 000102030405060708090a0b0c0d0e0f}},
     integrity: {{alg: hmac-sha1-96, key: 000102030405060708090a0b0c0d0e0f10111213}},
     ah: {{spi: 0x5002, integrity: {{alg: hmac-sha256-128, key: {AH_KEY}}}}}}}
""",
}
# scapy in the guest (an implementation independent of the card) verifies the AH ICV of a received frame
SCAPY_AH_CHECK = f"""
import json, sys
from scapy.layers.inet import IP
from scapy.layers.ipsec import AH, SecurityAssociation
sa = SecurityAssociation(AH, spi=0x4001, auth_algo="SHA2-256-128", auth_key=bytes.fromhex("{AH_KEY}"))
for line in sys.stdin:
    frame = bytes.fromhex(json.loads(line)["frame"])
    sa.decrypt(IP(frame[14:]))  # raises IPSecIntegrityError on a wrong ICV
    print("ah-verified")
"""


def _write(vm, name: str, text: str) -> None:
    vm.run(f"cat > /tmp/{name} <<'EOF'\n{text}EOF", check=True)


def test_cli_refuses_fields_crypto_offload_cannot_honour(vm):
    _write(vm, "bad.yaml", ISSUE9_FILES["bad.yaml"])
    cli(vm, "reset")
    refused = vm.run(f"{CLI} sa add --sa /tmp/bad.yaml", timeout=60)
    assert refused.exit_code == 2, refused.output
    assert "/tmp/bad.yaml: sas[1].replay_window: crypto offload: no anti-replay on the card" in refused.output
    assert "0 SA(s)" in cli(vm, "sa list")  # nothing added, not even the valid first entry
    flags = vm.run(f"{CLI} sa add --spi 0x2001 --dir in --src 10.0.0.1 --dst 10.0.0.2 --aead "
                   "aes-gcm-128:00112233445566778899aabbccddeeff:cafebabe --seq 5", timeout=60)
    assert flags.exit_code == 2 and "--seq: crypto offload: " in flags.output, flags.output
    cli(vm, "sa add --sa /tmp/bad.yaml --offload packet")  # packet offload honours the window
    assert "2 SA(s)" in cli(vm, "sa list")


def test_v2_add_sa_list_shows_each_refused_entry(vm):
    _write(vm, "list.yaml", ISSUE9_FILES["list.yaml"])
    cli(vm, "reset")
    result = vm.run(f"{CLI} sa add --sa /tmp/list.yaml", timeout=60)
    assert result.exit_code == 1, result.output
    assert re.search(r"^0x[0-9a-f]{8} spi 0x3001 inbound", result.output, re.M), result.output
    assert re.search(r"^refused +spi 0x3001 inbound .*sas\[1\]\): INVALID_PARAMETER: ", result.output, re.M)
    assert re.search(r"^0x[0-9a-f]{8} spi 0x3002 inbound", result.output, re.M)
    assert "1 of 3 SA(s) refused by the card" in result.output
    assert "2 SA(s)" in cli(vm, "sa list")


def test_packet_offload_lifetime_from_the_cli(vm):
    cli(vm, "reset")
    added = cli(vm, "sa add --spi 0x6001 --dir out --src 10.0.0.1 --dst 10.0.0.2 --offload packet "
                    "--aead aes-gcm-128:00112233445566778899aabbccddeeff:cafebabe --lifetime soft_packets=2,hard_packets=3")
    handle = re.search(r"^(0x[0-9a-f]{8}) spi 0x6001", added, re.M).group(1)  # (stderr: a key-on-argv warning)
    sent = cli(vm, f"send --count 5 --src 10.0.0.1 --dst 10.0.0.2 --sa {handle} --mode packet", expect=1)
    assert "OK=3" in sent and "OFFLOAD_FAILED=2" in sent, sent
    assert "delete_req" in cli(vm, "sa list")


def test_ah_and_esp_then_ah_bundle_through_the_cli(vm):
    _write(vm, "ah.yaml", ISSUE9_FILES["ah.yaml"])
    _write(vm, "ahcheck.py", SCAPY_AH_CHECK)
    cli(vm, "reset")
    added = cli(vm, "sa add --sa /tmp/ah.yaml").splitlines()
    assert added[0].endswith(" ah") and added[2].endswith("esp+ah ah-spi 0x5002"), added
    handles = [line.split()[0] for line in added]
    for out_h, in_h in ((handles[0], handles[1]), (handles[2], handles[3])):
        sent = cli(vm, f"send --count 2 --size 60 --src 10.0.0.1 --dst 10.0.0.2 --dst-mac {CARD_MAC} "
                       f"--sa {out_h}")
        assert "OK=2" in sent, sent
        got = cli(vm, "recv --count 2 --timeout 10 --json > /tmp/rx.json; cat /tmp/rx.json")
        lines = [json.loads(line) for line in got.splitlines() if line.startswith("{")]
        assert len(lines) == 2
        for pkt in lines:
            assert pkt["crypto_status"] == "SUCCESS" and pkt["handle"] == int(in_h, 16) and not pkt["note"]
            inner = bytes.fromhex(pkt["inner"])
            assert inner[14 + 9] == 17 and len(inner) == 14 + 20 + 8 + 60
        if out_h == handles[0]:  # AH-only: the card leaves the frame as received; scapy checks its ICV
            check = vm.run("python3 /tmp/ahcheck.py < /tmp/rx.json", timeout=60)
            assert check.exit_code == 0 and check.output.count("ah-verified") == 2, check.output
