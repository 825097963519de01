"""The foundation end to end: the real QEMU attaches the card over vfio-user, the guest kernel
enumerates it (lspci), and the guest probe reads BAR0 and reports what the card profile says.

A non-default profile is used so that every checked value provably comes from the profile.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipsec_nic.runner import CardServer, run_dir, write_profile
from qemu.launch import VfioUserCard, VmConfig, run_vm

pytestmark = pytest.mark.vm

PROFILE = {
    "pci": {"vendor_id": 0xEC5E, "device_id": 0x0002, "subsystem_id": 0x1234, "revision": 0x07},
    "nic": {"mac": "02:aa:bb:cc:dd:01", "tx_queues": 2, "rx_queues": 3, "msix_vectors": 4, "mtu": 1400},
    "firmware": {
        "sa_capacity": 2048,
        "encryption": ["aes-gcm-128", "aes-gcm-256", "aes-cbc-128"],
        "integrity": ["hmac-sha256-128"],
        "max_replay_window": 1024,
    },
}

GUEST = r"""
set -e
echo '--- lspci'
lspci -n -d ec5e:
echo '--- lspci-v'
lspci -vv -d ec5e:
echo '--- probe'
python3 -m guest_tools.probe --json --device 0x0002
echo '--- mirror'
python3 -m guest_tools.checks.mirror 0x0002
"""


def _section(output: str, name: str) -> str:
    part = output.split(f"--- {name}\n", 1)[1]
    return part.split("\n--- ", 1)[0]


@pytest.fixture(scope="module")
def probe_run(toolchain, tmp_path_factory):
    logs = tmp_path_factory.mktemp("probe-logs")
    with run_dir() as d:
        profile = write_profile(d / "card.yaml", overrides=PROFILE)
        with CardServer(d / "card.sock", profile, logs / "card.log") as card:
            cfg = VmConfig(command=GUEST, cards=(VfioUserCard(d / "card.sock"),), timeout_s=240, log_dir=logs)
            result = run_vm(cfg, toolchain)
            assert card.alive(), f"card server died:\n{card.log_tail()}"
            server_log = card.log_tail(200)
    print(f"time to guest command {result.boot_seconds:.1f} s, VM wall {result.wall_seconds:.1f} s")
    assert result.exit_code == 0, f"{result.output}\n--- card server log\n{server_log}"
    return result, Path(logs)


def test_guest_kernel_enumerates_the_card(probe_run):
    result, _ = probe_run
    line = _section(result.output, "lspci").strip()
    # e.g. "00:03.0 0200: ec5e:0002 (rev 07)": class Ethernet controller, ids from the profile
    assert " 0200: ec5e:0002 (rev 07)" in line, line
    verbose = _section(result.output, "lspci-v")
    assert "Subsystem: Device ec5e:1234" in verbose
    assert "MSI-X: Enable- Count=4" in verbose
    assert "Express (v2)" in verbose
    assert "Power Management version 3" in verbose
    assert "Region 0: Memory at" in verbose and "size=16K" in verbose


def test_probe_reads_identity_and_capabilities_from_bar0(probe_run):
    result, _ = probe_run
    report = json.loads(_section(result.output, "probe"))
    assert report["id_ok"] is True and report["magic"] == "IPNC"
    assert report["mac"] == "02:aa:bb:cc:dd:01"
    assert (report["tx_queues"], report["rx_queues"], report["msix_vectors"]) == (2, 3, 4)
    assert report["mtu"] == 1400
    assert report["sa_capacity"] == 2048
    assert report["max_replay_window"] == 1024
    assert sorted(report["encryption"]) == ["AES_CBC_128", "AES_GCM_128", "AES_GCM_256"]
    assert report["integrity"] == ["SHA256"]
    assert "READY" in report["status"] and report["error"] == "NONE"
    assert {"CRYPTO_OFFLOAD", "ESP", "MSIX"} <= set(report["features"])


def test_mirror_bar_follows_bar0(probe_run):
    """The guest maps BAR4 and reads the same STATUS / ERR_CODE there as in BAR0, before and after the card
    changes state (CTRL.ENABLE toggled). A write into the mapped mirror does not reach the card (BAR0 is
    unchanged), and the card's next update of that mirror overwrites it (datasheet §2)."""
    from device.contract import regs

    result, _ = probe_run
    report = json.loads(_section(result.output, "mirror"))
    assert report["bar4_size"] == regs.MIRROR_BAR_SIZE
    for name in ("before", "toggled", "restored"):
        snap = report[name]
        assert snap["m_status"] == snap["status"] and snap["m_err"] == snap["err"], (name, snap)
    enabled = int(regs.Status.ENABLED)
    assert report["before"]["status"] & enabled != report["toggled"]["status"] & enabled, report
    assert report["after_write"]["status"] == report["toggled"]["status"], report
    assert report["restored"]["status"] == report["before"]["status"], report
