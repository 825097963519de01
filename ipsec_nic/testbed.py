"""The test bed for anyone's script: `ipsec-nic vm run [--kernel-driver] [--peer] --script FILE`.

One VM with the card and, with ``--peer``, a virtio-net NIC on the other end of the card's wire that
qemu/guest_testbed.sh moves into netns ``peer`` (the demo's topology, ipsec_nic/topology.py). With
``--kernel-driver`` the card's Linux driver (qemu/kmod.py builds it) is loaded and the card is a netdev
in the root namespace, addressed and checked reachable from the peer over IPv4 and IPv6.

The user's script is copied from the host into a directory shared read-only with the guest, copied
again to /tmp there, and run with ``sh`` after the set-up, with IPSEC_NIC_* variables describing the
test bed (SCRIPT_VARIABLES). Everything here is pure text; runner.py and topology.py do the running.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.contract import regs
from guest_tools.scenario import PEER_MODULES
from guest_tools.xfrm_peer import PeerNet

PEER_MAC = "52:54:00:49:50:02"  # the virtio-net NIC (locally administered QEMU range)
PEER_NETDEV = "peer0"


NETDEV_KINDS = ("dgram", "stream")


def netdev_args(card_wire: Path, qemu_wire: Path, mac: str = PEER_MAC, kind: str = "dgram") -> tuple[str, ...]:
    """QEMU arguments for the peer NIC whose netdev is the other end of the card's wire.

    dgram: QEMU binds ``qemu_wire`` and sends to ``card_wire``. stream: QEMU connects (server=off) to the
    card listening on ``card_wire``, frames carry a 4-byte length (QEMU net/stream.c)."""
    if kind == "stream":
        netdev = f"stream,id={PEER_NETDEV},server=off,addr.type=unix,addr.path={card_wire}"
    else:
        netdev = (f"dgram,id={PEER_NETDEV},local.type=unix,local.path={qemu_wire},"
                  f"remote.type=unix,remote.path={card_wire}")
    return ("-netdev", netdev, "-device", f"virtio-net-pci,netdev={PEER_NETDEV},mac={mac}")


def wire_overrides(card_wire: Path, qemu_wire: Path, pcap: Path | None, kind: str = "dgram") -> dict[str, Any]:
    if kind == "stream":
        return {"wire": {"type": "stream", "path": str(card_wire), "mode": "server", "peer": None,
                         "pcap": str(pcap) if pcap else None}}
    return {"wire": {"type": "dgram", "path": str(card_wire), "peer": str(qemu_wire),
                     "pcap": str(pcap) if pcap else None}}


RUN_SHARE = "ipsec-nic-run"  # the host's run directory, mounted at /mnt/ipsec-nic-run
RUN_FILE = "run.sh"
SCRIPT_FILE = "script.sh"


@dataclass(frozen=True)
class GuestPaths:
    """Where things are in the guest (a unit test points them at a host directory to run run.sh)."""

    setup_script: str = "/opt/ipsec-nic/qemu/guest_testbed.sh"
    env_file: str = "/run/ipsec-nic-testbed.env"
    run_share: str = f"/mnt/{RUN_SHARE}"
    script_copy: str = "/tmp/ipsec-nic-script.sh"
    workdir: str = "/tmp"


# guest_testbed.sh exits with this when the set-up failed (the user's script never ran); like env(1)'s
# 125-127, it is a status a script is unlikely to choose for itself.
SETUP_FAILED = 125
PREFIX_V4, PREFIX_V6 = 24, 64

# What the user's script gets: name -> meaning (README and --help print this table).
SCRIPT_VARIABLES: dict[str, str] = {
    "IPSEC_NIC_DEV": "the card's netdev in the root netns (--kernel-driver; empty without it)",
    "IPSEC_NIC_ADDR": "the card's IPv4 address",
    "IPSEC_NIC_ADDR6": "the card's IPv6 address",
    "IPSEC_NIC_PEER_ADDR": "the Linux peer's IPv4 address (--peer)",
    "IPSEC_NIC_PEER_ADDR6": "the Linux peer's IPv6 address (--peer)",
    "IPSEC_NIC_PEER_NS": "the peer's network namespace: ip -n \"$IPSEC_NIC_PEER_NS\" ... (--peer)",
    "IPSEC_NIC_PEER_DEV": "the peer's NIC inside that namespace (--peer)",
}


@dataclass(frozen=True)
class Testbed:
    """What to set up in the guest. ``load_command`` (qemu/kmod.py) loads the kernel driver; empty: none."""

    peer: bool = False
    load_command: str = ""
    pci_id: tuple[int, int] = (regs.VENDOR_ID, regs.DEVICE_ID)
    net: PeerNet = PeerNet()
    paths: GuestPaths = GuestPaths()

    @property
    def kernel_driver(self) -> bool:
        return bool(self.load_command)

    def environment(self) -> dict[str, str]:
        """The parameters guest_testbed.sh reads."""
        net = self.net
        return {
            "TB_LOAD": self.load_command,
            "TB_PCI": f"{self.pci_id[0]:04x}:{self.pci_id[1]:04x}",
            "TB_PEER": "1" if self.peer else "0",
            "TB_NETNS": net.netns,
            "TB_CARD4": net.card_v4, "TB_PEER4": net.peer_v4, "TB_PREFIX4": str(PREFIX_V4),
            "TB_CARD6": net.card_v6, "TB_PEER6": net.peer_v6, "TB_PREFIX6": str(PREFIX_V6),
            "TB_CARD_IN4": net.card_inner_v4, "TB_PEER_IN4": net.peer_inner_v4,
            "TB_CARD_IN6": net.card_inner_v6, "TB_PEER_IN6": net.peer_inner_v6,
            "TB_MODULES": " ".join(PEER_MODULES),
            "TB_ENV_FILE": self.paths.env_file,
        }

    def setup_command(self, action: str = "setup") -> str:
        """Guest shell command: set the test bed up (``setup``) or (re)load and configure the card (``card``)."""
        if action not in ("setup", "card"):
            raise ValueError(f"action must be setup or card, not {action!r}")
        assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in self.environment().items())
        return f"{assignments} sh {self.paths.setup_script} {action}"

    def run_script(self, script_name: str = SCRIPT_FILE) -> str:
        """The guest's run.sh: set up, copy the user's script out of the share, run it with ``sh``."""
        paths = self.paths
        return "\n".join([
            "#!/bin/sh",
            "# Written by ipsec-nic vm run: set up the test bed, then run the user's script.",
            self.setup_command("setup") + " || exit $?",
            f". {paths.env_file}",
            f"cp {shlex.quote(f'{paths.run_share}/{script_name}')} {paths.script_copy} || exit {SETUP_FAILED}",
            f"cd {paths.workdir}",
            f"exec sh {paths.script_copy}",
            "",
        ])


def default_command(testbed: Testbed) -> str:
    """What `vm run --kernel-driver/--peer` runs without --script/--command: the test bed's state."""
    lines = ["env | grep '^IPSEC_NIC_' | sort"]
    if testbed.kernel_driver:
        lines += ['ip -c=never -br addr show dev "$IPSEC_NIC_DEV"', 'ethtool -i "$IPSEC_NIC_DEV"',
                  "ethtool -k \"$IPSEC_NIC_DEV\" | grep -E '^esp-'"]
    if testbed.peer:
        lines += ['ip -c=never -n "$IPSEC_NIC_PEER_NS" -br addr show dev "$IPSEC_NIC_PEER_DEV"']
    if testbed.peer and testbed.kernel_driver:
        lines += ['ping -c 2 -W 2 "$IPSEC_NIC_PEER_ADDR"', 'ping -6 -c 2 -W 2 "$IPSEC_NIC_PEER_ADDR6"']
    return "\n".join(lines) + "\n"


def prepare_run_dir(run_dir: Path, testbed: Testbed, script: Path | None, command: str | None) -> Path:
    """Fill ``run_dir`` (shared with the guest) with run.sh and the user's script; returns run.sh.

    ``script`` is a host file, ``command`` a shell string; with neither, default_command()."""
    if script is not None and command is not None:
        raise ValueError("give a script or a command, not both")
    if script is not None:
        try:
            text = script.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the script {script}: {exc.strerror or exc}") from None
    else:
        text = (command if command is not None else default_command(testbed)).encode()
    (run_dir / SCRIPT_FILE).write_bytes(text)
    run = run_dir / RUN_FILE
    run.write_text(testbed.run_script(SCRIPT_FILE))
    return run


def guest_run_command(paths: GuestPaths = GuestPaths()) -> str:
    """The short command that goes on the kernel command line: run.sh from the share."""
    return f"sh {paths.run_share}/{RUN_FILE}"
