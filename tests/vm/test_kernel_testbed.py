"""`ipsec-nic vm run --kernel-driver --peer --script FILE`, end to end through the command line, with the
README's example script: one boot."""

from __future__ import annotations

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
