"""`ipsec-nic bench --quick --json` as CI runs it: the command works and its rows are well formed.

This checks the command, not the targets: on a shared CI machine a quick run's figures are noise-prone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"name", "value", "unit", "reference", "ratio", "target", "met"}


def test_quick_bench_writes_well_formed_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "ipsec_nic.cli", "bench", "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[bench" in proc.stderr  # progress goes to stderr
    doc = json.loads(out.read_text())
    assert doc["meta"]["quick"] is True and not doc["meta"]["failures"]
    rows = doc["rows"]
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)), "row names must be unique"
    for group_marker in ("ESP engine encap AES-GCM-128 1400 B", "firmware transmit, packet offload 1400 B",
                         "firmware vs scapy encrypt 1400 B", "vfio-user REGION_READ: server CPU per message",
                         "datapath over vfio-user, TX packet offload 1400 B", "SA table 100 k: inbound lookups"):
        assert group_marker in names
    for r in rows:
        assert r.keys() >= FIELDS, r
        assert isinstance(r["unit"], str) and r["unit"]
        if r["value"] is not None and r["reference"]:
            assert math.isfinite(r["value"]) and r["value"] >= 0
            assert r["ratio"] == r["value"] / r["reference"]
            if r["target"] is not None:
                assert isinstance(r["met"], bool)
        else:
            assert r["ratio"] is None
    # Every row the table printed is in the JSON, in the same order.
    table = proc.stdout
    assert all(n in table for n in names)
    assert table.index(names[0]) < table.index(names[-1])
