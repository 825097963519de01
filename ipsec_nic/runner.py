"""Host-side orchestration: the card's server process and VMs that use it.

`serve` runs the card in this process (what `ipsec-nic serve` does). `CardServer` starts that same
command as a child process, waits until its socket listens, and stops it by PID whatever happens:
the card then lives in its own process, like a real device, and a crash of either side is visible.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("ipsec_nic")

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0


def _say(message: str) -> None:
    print(f"[ipsec-nic] {message}", file=sys.stderr, flush=True)


# --- the card in this process ------------------------------------------------------------------------------


def serve(socket_path: str, profile: str | None = None, ready_file: str | None = None) -> int:
    """Serve the card a profile describes on ``socket_path`` until SIGTERM/SIGINT."""
    from device.nic.assembly import build_card
    from device.profile import ProfileError, load_profile
    from device.vfio_user.server import serve as serve_socket

    try:
        card = build_card(load_profile(profile))
    except (ProfileError, ValueError, OSError) as exc:
        print(f"ipsec-nic serve: {exc}", file=sys.stderr)
        return 2

    def ready() -> None:
        log.info("card listening on %s", socket_path)
        if ready_file:
            Path(ready_file).write_text(f"{os.getpid()}\n")
        else:
            _say(f"card listening on {socket_path} (Ctrl-C to stop)")

    try:
        serve_socket(socket_path, card, ready_callback=ready)
    except (OSError, RuntimeError) as exc:  # the socket path is taken, not a socket, or unreachable
        log.debug("serving failed", exc_info=True)
        print(f"ipsec-nic serve: cannot serve on {socket_path}: {exc}", file=sys.stderr)
        return 1
    finally:
        # Flush and close the wire (pcap file, socket files) however the server ended.
        if card.card.datapath is not None:
            print(f"ipsec-nic serve: {wire_report(card.card.datapath.wire)}", file=sys.stderr, flush=True)
            card.card.datapath.close()
    return 0


def wire_report(wire: Any) -> str:
    """One line: what the wire carried and what it could not (the guest sees none of these counters)."""
    s = wire.stats
    line = (f"wire {wire.describe()}: sent {s.tx_frames}, dropped {s.tx_dropped} (no peer, no link or no room), "
            f"received {s.rx_frames}, malformed {s.rx_errors}")
    pcap = getattr(wire, "pcap", None)
    if pcap is not None:
        line += f"; pcap {pcap.path}: {pcap.frames} frames recorded"
        if pcap.failed:
            line += ", then stopped by a write error (logged)"
    return line


# --- profiles with per-run overrides -----------------------------------------------------------------------


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_profile(path: Path, base: str | None = None, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write ``base`` (default: the default profile) with ``overrides`` merged in, e.g. a run's wire."""
    from device.profile import default_profile_path, load_profile

    source = Path(base) if base else default_profile_path()
    load_profile(source)  # a bad base profile fails here, naming its own file
    data = yaml.safe_load(source.read_text()) or {}
    path.write_text(yaml.safe_dump(_merge(data, overrides or {}), sort_keys=False))
    return path


# --- the card as a child process ---------------------------------------------------------------------------


class CardServer:
    """`ipsec-nic serve` in a child process of its own group; a context manager."""

    def __init__(self, socket_path: Path, profile: Path, log_path: Path, verbose: int = 1) -> None:
        self.socket_path = socket_path
        self.profile = profile
        self.log_path = log_path
        self.verbose = verbose
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ready = self.socket_path.with_suffix(".ready")
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        argv = [sys.executable, "-m", "ipsec_nic.cli", *(["-v"] * self.verbose), "serve",
                "--socket", str(self.socket_path), "--profile", str(self.profile), "--ready-file", str(ready)]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while not ready.exists():
                if self.process.poll() is not None:
                    raise RuntimeError(f"the card server exited with status {self.process.returncode}:\n"
                                       f"{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the card server did not listen within {READY_TIMEOUT_S:.0f} s:\n"
                                       f"{self.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            # Timeout or Ctrl-C: __exit__ will not run for a failed __enter__, and the child sits in its
            # own session (a terminal's SIGINT never reaches it), so stop it here.
            self.stop()
            raise

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a grace period; returns the exit status."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def __enter__(self) -> CardServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def run_dir(prefix: str = "ipsec-nic-") -> Iterator[Path]:
    """A short temporary directory for sockets (AF_UNIX paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir="/tmp") as d:
        yield Path(d)


# --- `ipsec-nic vm run` ------------------------------------------------------------------------------------


PROBE_COMMAND = "python3 -m guest_tools.probe"


class RunError(RuntimeError):
    """A `vm run` request that cannot work as given (message says why and what to do instead)."""


def _check_run_options(guest_command: str | None, script: str | None, as_json: bool, testbed: bool) -> None:
    from qemu.launch import CommandTooLong, check_inline_command

    if guest_command is not None and script is not None:
        raise RunError("--command and --script are alternatives: give one of them")
    if as_json and (guest_command is not None or script is not None or testbed):
        raise RunError("--json formats the probe's report; it does not apply with --command, --script, "
                       "--kernel-driver or --peer")
    if script is not None and not Path(script).is_file():
        raise RunError(f"--script {script}: no such file")
    if guest_command is not None and not testbed and script is None:
        try:
            check_inline_command(guest_command)
        except CommandTooLong as exc:
            raise RunError(str(exc)) from None


def load_kernel_module(toolchain, progress: Callable[[str], None] | None = None):
    """The card's kernel driver for this toolchain, built once per source hash (qemu/kmod.py)."""
    from qemu import kmod

    return kmod.ensure_module(toolchain, progress=progress or (lambda line: _say(f"kernel driver: {line}")))


def module_shares(module: Any) -> tuple[Any, ...]:
    """The ShareDir a kernel module needs when its files live outside the tree and the checkout."""
    from qemu.launch import ShareDir

    share = getattr(module, "share", None)
    if share is None:
        return ()
    return (ShareDir(Path(share), getattr(module, "share_name", None) or "ipsec-nic-kmod"),)


def vm_run(profile: str | None = None, guest_command: str | None = None, as_json: bool = False,
           timeout: float = 300.0, verbose: int = 0, script: str | None = None, kernel_driver: bool = False,
           peer: bool = False, pcap: str | None = None) -> int:
    """Start the card, boot a VM with it, run the guest command (default: the probe), shut down.

    With ``kernel_driver``/``peer``/``script`` the guest first sets up the test bed (ipsec_nic/testbed.py)
    and the command or script runs with its IPSEC_NIC_* variables. The command's output streams as it
    comes; the return value is its exit status."""
    from device.profile import load_profile
    from ipsec_nic import testbed as tb
    from qemu import toolchain as vm_toolchain
    from qemu.launch import ShareDir, VfioUserCard, VmConfig, VmError, run_vm

    testbed_mode = kernel_driver or peer or script is not None
    try:
        _check_run_options(guest_command, script, as_json, testbed_mode)
    except RunError as exc:
        print(f"ipsec-nic vm run: {exc}", file=sys.stderr)
        return 2
    tc = vm_toolchain.setup()
    module = None
    if kernel_driver:
        try:
            module = load_kernel_module(tc)
        except Exception as exc:  # the build explains itself (log path, what failed)
            _say(f"the kernel driver is not usable: {exc}")
            return 1
    t0 = time.monotonic()
    with run_dir() as d:
        overrides: dict[str, Any] = {}
        extra_args: tuple[str, ...] = ()
        if peer:
            card_wire, qemu_wire = d / "wire-card.sock", d / "wire-qemu.sock"
            overrides = tb.wire_overrides(card_wire, qemu_wire, Path(pcap).resolve() if pcap else None)
            extra_args = tb.netdev_args(card_wire, qemu_wire)
        elif pcap:
            overrides = {"wire": {"pcap": str(Path(pcap).resolve())}}
        try:
            prof = write_profile(d / "card.yaml", profile, overrides)
            pci = load_profile(prof).pci
        except (ValueError, OSError) as exc:
            print(f"ipsec-nic vm run: {exc}", file=sys.stderr)
            return 2
        shares: tuple[ShareDir, ...] = ()
        if testbed_mode:
            bed = tb.Testbed(peer=peer, load_command=module.load_command if module else "",
                             pci_id=(pci.vendor_id, pci.device_id))
            share_dir = d / "run"
            share_dir.mkdir()
            try:
                tb.prepare_run_dir(share_dir, bed, Path(script) if script else None, guest_command)
            except ValueError as exc:
                print(f"ipsec-nic vm run: {exc}", file=sys.stderr)
                return 2
            command = tb.guest_run_command()
            shares = (ShareDir(share_dir, tb.RUN_SHARE), *module_shares(module))
        else:
            command = guest_command or (PROBE_COMMAND + (" --json" if as_json else ""))
        log_dir = Path(tempfile.mkdtemp(prefix="ipsec-nic-logs-"))
        with CardServer(d / "card.sock", prof, log_dir / "card.log", verbose=1) as card:
            what = " and a Linux peer" if peer else ""
            _say(f"card server up (pid {card.process.pid if card.process else '?'}); booting the VM{what} "
                 "(TCG, about 15 s)")
            cfg = VmConfig(command=command, cards=(VfioUserCard(d / "card.sock"),), extra_args=extra_args,
                           shares=shares, timeout_s=timeout, log_dir=log_dir)
            console = (lambda line: _say(f"console: {line}")) if verbose else None
            try:
                result = run_vm(cfg, tc, on_output=console, on_command_output=lambda line: print(line, flush=True))
            except VmError as exc:
                _say(f"VM failed: {exc}")
                _say(f"card server log ({log_dir / 'card.log'}):\n{card.log_tail()}")
                return 1
            if not card.alive():
                _say(f"the card server died during the run:\n{card.log_tail()}")
                return 1
    if testbed_mode and result.exit_code == tb.SETUP_FAILED and "ipsec-nic test bed:" in result.output:
        _say(f"the test bed could not be set up, so the script did not run; logs in {log_dir}")
    _say(f"guest command exited with {result.exit_code}; time to guest command {result.boot_seconds:.1f} s, "
         f"VM wall time {result.wall_seconds:.1f} s, total {time.monotonic() - t0:.1f} s; logs in {log_dir}")
    return result.exit_code
