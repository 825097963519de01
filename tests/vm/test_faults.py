"""Faults around a card in use by a real guest: the pcap's disk fills up, the wire peer goes away, the guest
resets the function (FLR) or the card (CTRL.RESET) while traffic runs. Nothing crashes, traffic that
can go on goes on, and counters say what was dropped and why.

One card server and one VM for the module. The card's wire is a stream socket (QEMU's ``-netdev stream``
framing) whose peer is this test, and its pcap is recorded on a 256 KiB tmpfs that the traffic fills.
The card server's exit report (``ipsec-nic serve: wire ...``) is checked when the module is done.
DMA_UNMAP under a busy queue is a client action, not a guest one: it is tested against a real server in
tests/protocol/test_hostile_real_server.py.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from guest_tools.checks.common import encode_spec
from ipsec_nic.runner import CardServer, run_dir, write_profile
from qemu.launch import VfioUserCard, Vm, VmConfig

pytestmark = pytest.mark.vm

CLI = "python3 -m guest_tools.cli"
CARD_MAC = "02:fa:01:00:00:01"
PCAP_FS = 256 * 1024
SEND = "send --plain --src 10.0.0.1 --dst 10.0.0.2 --dst-mac 02:fa:01:00:00:02"
FIND_BDF = "for d in /sys/bus/pci/devices/*; do [ $(cat $d/vendor) = 0xec5e ] && echo $d; done"


class Peer:
    """The far end of the card's stream wire: reads length-prefixed frames in a thread."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.frames = 0
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = bytearray()
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 4:
                n = struct.unpack_from("!I", buf)[0]
                if len(buf) < 4 + n:
                    break
                del buf[: 4 + n]
                self.frames += 1

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.frames < count:
            assert time.monotonic() < deadline, f"peer got {self.frames} of {count} frames"
            time.sleep(0.05)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(5)


class Rig:
    def __init__(self, vm: Vm, card: CardServer, wire: Path, pcap: Path) -> None:
        self.vm, self.card, self.wire, self.pcap = vm, card, wire, pcap

    def cli(self, args: str, expect: int = 0, timeout: float = 120) -> str:
        r = self.vm.run(f"{CLI} {args}", timeout=timeout)
        assert r.exit_code == expect, f"{args}: exit {r.exit_code}\n{r.output}"
        assert self.card.alive(), self.card.log_tail()
        return r.output

    def flood(self, seconds: int) -> None:
        """Guest traffic in the background (guest_tools.checks.robustness flood): plain frames, forever."""
        spec = {"plain": ("02fa01000002" + CARD_MAC.replace(":", "") + "0800").ljust(2 * 300, "0"),
                "sa": {"spi": 0x7001, "dir": "out", "src": "10.0.0.1", "dst": "10.0.0.2", "key": "11" * 20},
                "scratch": 0x5A5A, "seconds": seconds}
        self.vm.run(f"setsid python3 -m guest_tools.checks.robustness flood {encode_spec(spec)} "
                    "> /tmp/flood.log 2>&1 < /dev/null &", timeout=30)

    def stop_flood(self) -> None:
        self.vm.run("pkill -KILL -f 'checks.robustness flood'; sleep 0.5", timeout=30)


@pytest.fixture(scope="module")
def rig(toolchain, tmp_path_factory):
    logs = tmp_path_factory.mktemp("faults-logs")
    fs = tmp_path_factory.mktemp("pcapfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={PCAP_FS}", "tmpfs", str(fs)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs (needs root) for the disk-full case")
    try:
        with run_dir() as d:
            wire = d / "wire.sock"
            profile = write_profile(d / "card.yaml", overrides={
                "nic": {"mac": CARD_MAC}, "wire": {"type": "stream", "path": str(wire), "mode": "server",
                                                   "pcap": str(fs / "wire.pcap")}})
            card = CardServer(d / "card.sock", profile, logs / "card.log")
            with card:
                cfg = VmConfig(cards=(VfioUserCard(d / "card.sock"),), log_dir=logs / "vm", timeout_s=300)
                with Vm(cfg, toolchain) as vm:
                    yield Rig(vm, card, wire, fs / "wire.pcap")
                assert card.alive(), card.log_tail()
                assert card.stop() == 0
            log = (logs / "card.log").read_text()
            assert "Traceback" not in log, log[-4000:]
            # The counters the guest cannot see, in the server's exit report.
            report = re.search(r"ipsec-nic serve: wire .*: sent (\d+), dropped (\d+) .*pcap .*: (\d+) frames "
                               r"recorded, then stopped by a write error", log)
            assert report, log[-2000:]
            sent, dropped, recorded = map(int, report.groups())
            print(f"wire report: sent {sent}, dropped {dropped}, pcap {recorded} frames")
            assert dropped >= 50 and sent >= 400 + 10 + 5 and recorded > 0
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_disk_full_stops_the_pcap_not_the_traffic(rig):
    peer = Peer(rig.wire)
    try:
        out = rig.cli(f"{SEND} --count 400 --size 1000")
        assert "OK=400" in out
        peer.wait_for(400)  # every frame reached the wire although the recorder could not keep up
    finally:
        peer.close()
    assert rig.pcap.stat().st_size <= PCAP_FS
    log = Path(rig.card.log_path).read_text()
    assert log.count("recording stopped") == 1 and "No space left on device" in log


def test_wire_peer_gone_frames_are_counted_and_traffic_resumes(rig):
    peer = Peer(rig.wire)
    rig.cli(f"{SEND} --count 5")
    peer.wait_for(5)
    peer.close()  # the peer vanishes
    time.sleep(0.5)
    out = rig.cli(f"{SEND} --count 50")  # the card sends into the void: dropped at the wire, counted
    assert "sent 50 frame(s)" in out
    peer = Peer(rig.wire)  # a new peer plugs in
    try:
        time.sleep(0.5)
        rig.cli(f"{SEND} --count 10")
        peer.wait_for(10)
    finally:
        peer.close()


def _wait_flood(rig: Rig, frames: int = 200) -> None:
    deadline = time.monotonic() + 60
    while True:
        log = rig.vm.run("tail -n 1 /tmp/flood.log", timeout=30).output
        if "flood sent=" in log and int(log.split("sent=")[1].split()[0]) >= frames:
            return
        assert time.monotonic() < deadline, f"guest traffic did not start: {log}"
        time.sleep(0.5)


@pytest.mark.parametrize("how", ["flr", "ctrl-reset"])
def test_reset_during_traffic(rig, how):
    peer = Peer(rig.wire)
    try:
        rig.flood(seconds=60)
        _wait_flood(rig)
        if how == "flr":
            r = rig.vm.run(f"d=$({FIND_BDF}); echo 1 > $d/reset && echo reset $d", timeout=60)
            assert r.exit_code == 0 and "reset /sys/bus/pci/devices/" in r.output, r.output
        else:
            rig.cli("reset")
        time.sleep(1.0)
        assert rig.card.alive(), rig.card.log_tail()
        rig.stop_flood()
        # A reset function: no SAs, nothing counted since, and it works for the next process.
        assert rig.cli("sa list").splitlines()[0] == "0 SA(s)"
        before = peer.frames
        out = rig.cli(f"{SEND} --count 5")
        assert "OK=5" in out
        peer.wait_for(before + 5)
    finally:
        peer.close()
