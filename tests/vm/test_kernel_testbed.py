"""`ipsec-nic vm run --kernel-driver --peer --script FILE`, end to end through the command line, with the
README's example script: one boot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ipsec_nic.testbed import SCRIPT_VARIABLES

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_MARKER = "<!-- example-kernel-script:"


def readme_example() -> str:
    """The shell block that follows the example marker in README.md."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(EXAMPLE_MARKER):]
    match = re.search(r"```sh\n(.*?)```", after, re.S)
    assert match, "README.md: no ```sh block after the example marker"
    return match.group(1)


def test_script_runs_with_the_test_bed_variables_and_its_exit_status_is_the_commands(toolchain, tmp_path):
    example = readme_example()
    script = tmp_path / "bed.sh"
    # The README example runs as its own script; then this script reports its variables and exits with a
    # status of its own choosing, which must come back as the command's.
    script.write_text(
        "cat >/tmp/example.sh <<'IPSEC_NIC_EXAMPLE'\n" + example + "IPSEC_NIC_EXAMPLE\n"
        "sh /tmp/example.sh; echo \"example exit $?\"\n"
        "env | grep '^IPSEC_NIC_' | sort\n"
        "echo \"cwd $(pwd)\"\n"
        "exit 7\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ipsec_nic.cli", "vm", "run", "--kernel-driver", "--peer", "--script", str(script),
         "--pcap", str(tmp_path / "wire.pcap")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout
    assert proc.returncode == 7, f"exit {proc.returncode}\n--- stdout\n{out[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert "example exit 0" in out, out
    assert re.search(r"5 packets transmitted, 5 received", out), out
    assert len(re.findall(r"crypto offload parameters: dev eth\d+ dir (?:in|out)", out)) == 2, out
    counters = dict(re.findall(r"(ipsec_(?:tx|rx)_pkts): (\d+)", out))
    assert counters == {"ipsec_tx_pkts": "5", "ipsec_rx_pkts": "5"}, out
    env = dict(re.findall(r"^(IPSEC_NIC_[A-Z0-9_]+)=(.*)$", out, re.M))
    assert set(env) == set(SCRIPT_VARIABLES)
    assert env["IPSEC_NIC_ADDR"] == "10.0.0.1" and env["IPSEC_NIC_PEER_ADDR6"] == "fd00::2"
    assert env["IPSEC_NIC_PEER_NS"] == "peer" and re.fullmatch(r"eth\d+", env["IPSEC_NIC_DEV"])
    assert "cwd /tmp" in out
    assert "guest command exited with 7" in proc.stderr
    assert (tmp_path / "wire.pcap").stat().st_size > 24  # the wire was recorded (ESP and the set-up's pings)


def _vm_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipsec_nic.cli", "vm", "run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_kernel_driver_alone_reports_the_cards_netdev(toolchain):
    """--kernel-driver without --peer or a script: the default report of the card's netdev."""
    proc = _vm_run("--kernel-driver")
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-2000:]}\n{proc.stderr[-2000:]}"
    env = dict(re.findall(r"^(IPSEC_NIC_[A-Z0-9_]+)=(.*)$", out, re.M))
    assert set(env) == {"IPSEC_NIC_DEV", "IPSEC_NIC_ADDR", "IPSEC_NIC_ADDR6"}
    assert "driver: ipsec_nic" in out and "esp-hw-offload: on" in out
    assert re.search(rf"^{env['IPSEC_NIC_DEV']}\s+\S+\s+10\.0\.0\.1/24 fd00::1/64", out, re.M), out


def test_peer_alone_is_the_demo_topology_for_the_python_tools(toolchain):
    """--peer without the kernel driver: the peer netns as the demo has it, the card left to the Python tools."""
    proc = _vm_run("--peer", "--command",
                   'echo "dev=[$IPSEC_NIC_DEV] ns=$IPSEC_NIC_PEER_NS peer=$IPSEC_NIC_PEER_ADDR"; '
                   'ip -c=never -n "$IPSEC_NIC_PEER_NS" -br addr show dev "$IPSEC_NIC_PEER_DEV"; '
                   "python3 -m guest_tools.probe --json")
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-2000:]}\n{proc.stderr[-2000:]}"
    assert "dev=[] ns=peer peer=10.0.0.2" in out
    assert re.search(r"\S+\s+UP\s+10\.0\.0\.2/24 fd00::2/64", out), out
    report = json.loads(out[out.index("{"):])
    assert "02:49:50:4e:43:00" in json.dumps(report)  # the default profile's MAC, read from the card's registers
