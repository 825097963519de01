"""Figures that need the VM: boot time, guest register access rates against a device QEMU emulates
itself (`edu`) in the same VM, packets/s through the Python guest tools, and the demo's wall time.

One VM boot serves the register and packet figures: the card (default profile, its wire a datagram
socket this process drains, so TX completes with the link up) plus `-device edu`. The kernel driver's
packets/s (offload against software XFRM and no IPsec) need the Linux peer and take a second boot:
ipsec_nic/bench/kernel_pps.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .core import Progress, Row, at_least

MMIO_TARGET = at_least(0.5)


class _Drain:
    """The far end of the card's wire: a datagram socket whose frames are counted and dropped."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.frames = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(16384)
        with contextlib.suppress(OSError):
            while self.sock.recv_into(buf):
                self.frames += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(2)


def _guest_json(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("BENCH-JSON "):
            return json.loads(line[len("BENCH-JSON "):])
    raise RuntimeError(f"guest loop printed no result:\n{output[-2000:]}")


MIRROR_MEMFD = "memfd:ipsec-nic-mirror"  # device/nic/card.py MIRROR_MEMFD_NAME (the mirror BAR's file)


def qemu_maps_mirror(pid: int | None) -> bool:
    """Did QEMU mmap the card's mirror BAR? Its /proc maps then list the card's memfd."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
            return any(MIRROR_MEMFD in line for line in f)
    except OSError:
        return False


def vm_figures(seconds: float, say: Progress, logs: Path) -> list[Row]:
    from ipsec_nic.runner import CardServer, run_dir, write_profile
    from qemu import toolchain
    from qemu.launch import VfioUserCard, Vm, VmConfig

    tc = toolchain.setup(progress=say)
    rows: list[Row] = []
    with run_dir("ipsec-nic-bench-") as d:
        drain = _Drain(d / "peer.sock")
        try:
            wire = {"type": "dgram", "path": str(d / "card-wire.sock"), "peer": str(d / "peer.sock")}
            profile = write_profile(d / "card.yaml", overrides={"wire": wire})
            with CardServer(d / "card.sock", profile, logs / "card.log", verbose=0) as card:
                say("VM: booting with the card and QEMU's edu device")
                cfg = VmConfig(cards=(VfioUserCard(d / "card.sock"),), extra_args=("-device", "edu"),
                               log_dir=logs / "vm")
                with Vm(cfg, tc) as vm:
                    rows.append(Row("boot to guest command (VM with the card)", vm.boot_seconds, "s"))
                    say(f"VM up in {vm.boot_seconds:.1f} s; guest register loops, {seconds:.0f} s")
                    mm = _guest_json(vm.run(f"python3 -m ipsec_nic.bench.guest_loop mmio {seconds}",
                                            timeout=seconds * 4 + 60, check=True).output)
                    mapped = qemu_maps_mirror(vm.qemu_pid)
                    say(f"guest packets/s through the Python guest tools, {seconds:.0f} s")
                    pp = _guest_json(vm.run(f"python3 -m ipsec_nic.bench.guest_loop pps {seconds}",
                                            timeout=seconds * 4 + 120, check=True).output)
                if not card.alive():
                    raise RuntimeError(f"the card server died during the VM run:\n{card.log_tail()}")
        finally:
            drain.close()
    rows += [
        Row("guest register reads/s, card M_ICR (the hot-path read, mirror BAR)", mm["card_read"], "read/s",
            mm["edu_read"], "read/s on QEMU's edu BAR", MMIO_TARGET,
            note="QEMU mmapped the mirror BAR (memfd in its /proc maps)" if mapped
            else "QEMU did NOT mmap the mirror BAR: every read is trapped"),
        Row("QEMU mmapped the card's mirror BAR (its memfd in QEMU's /proc/PID/maps)", 1.0 if mapped else 0.0,
            "1 = yes", note="sparse mmap taken: M_* reads are RAM loads" if mapped
            else "not mapped: every M_* read is trapped"),
        Row("guest register reads/s, card ICR (trapped: a vfio-user round trip)", mm["card_read_trapped"],
            "read/s", mm["edu_read"], "read/s on QEMU's edu BAR"),
        Row("guest doorbells/s, card TX tail", mm["card_doorbell"], "write/s", mm["edu_write"],
            "write/s on QEMU's edu BAR"),
        Row("guest Python loop on plain memory (interpreter floor)", mm["python_floor"], "access/s"),
    ]
    failed = {k: v for k, v in pp.items() if k.endswith("_failed")}
    if failed:
        raise RuntimeError(f"guest TX completions failed: {failed}")
    for mode in ("crypto", "packet"):
        rows.append(Row(f"VM packets/s, Python guest tools, 1400 B, {mode} offload", pp[mode], "pkt/s",
                        pp["plain"], "pkt/s same guest tools, no IPsec"))
    rows.append(Row("wire frames the host saw during the VM run", float(drain.frames), "frame",
                    note=f"card counted {pp['tx_packets']:,} TX packets"))
    return rows


def demo_wall_time(say: Progress, out: Path) -> Row:
    """`ipsec-nic demo` as a user runs it, in a subprocess; its wall time."""
    say("demo: running `ipsec-nic demo` (one VM boot, end to end)")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ipsec_nic.cli", "demo", "--out", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        return Row("demo wall time", None, "s", note=f"demo failed (exit {proc.returncode}); see {out}")
    return Row("demo wall time", wall, "s")


def toolchain_build() -> Row:
    """The first toolchain build, from the cache's stamp (the build is not repeated for a benchmark)."""
    from qemu import toolchain

    try:
        stamp = json.loads(toolchain._stamp_path(toolchain.cache_dir()).read_text())
    except (OSError, ValueError):
        stamp = None
    if not stamp or "build_seconds" not in stamp:
        return Row("first VM toolchain build", None, "s", note="no build stamp in the cache (run `ipsec-nic vm setup`)")
    return Row("first VM toolchain build", float(stamp["build_seconds"]), "s",
               note=f"from the cache stamp, built {stamp.get('built_at', '?')}")
