"""Boot a VM from the toolchain tree: QEMU (q35, TCG unless KVM is proven to work) with a virtiofs root.

Two ways to use it:
- run_vm(cfg, toolchain): boot, run cfg.command once (passed on the kernel command line), power off.
- Vm(cfg, toolchain): boot once, then vm.run(cmd) many times through qemu/guest_agent.py on the
  second serial port; for test sessions that share one boot.

The guest: the toolchain tree is its read-only root (virtiofsd), the project checkout is shared
read-only at /opt/ipsec-nic, and /sbin/ipsec-nic-init in the tree hands over to qemu/guest_init.sh.
Every process started here runs in its own process group and is killed by PID when the VM ends,
whatever the reason (timeout, exception, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qemu.initrd_9p import initrd_path
from qemu.toolchain import STAGE0_PATH, Toolchain

PROJECT_DIR = Path(__file__).resolve().parent.parent
ROOT_TAG = "root"
PROJECT_TAG = "ipsec-nic"
AGENT_DEVICE = "/dev/ttyS1"
BEGIN_MARKER = "@@ipsec-nic-begin"
EXIT_MARKER = "@@ipsec-nic-exit"
# x86 Linux keeps 2048 bytes of command line; leave room for everything else on it.
MAX_INLINE_COMMAND_BYTES = 1024
KVM_PROBE_TIMEOUT_S = 60.0
KVM_FAILURE = "KVM internal error"
# How long QEMU and virtiofsd get to exit after SIGTERM before SIGKILL.
KILL_GRACE_S = 3.0
SOCKET_WAIT_S = 20.0
KEEP_VM_LOGS = 20

OutputCallback = Callable[[str], None]


class VmError(RuntimeError):
    """The VM could not boot or ended before answering; message carries the log tails."""


class VmTimeout(VmError):
    pass


class CommandTooLong(ValueError):
    """A run_vm command that does not fit on the kernel command line (message says what to do)."""


def check_inline_command(command: str) -> str:
    """The base64 form of ``command`` for ``ipsec_nic.cmd=``; CommandTooLong when it does not fit.

    The command travels on the kernel command line (x86: 2048 bytes in all), base64-encoded so that
    quoting survives; anything longer belongs in a file (`ipsec-nic vm run --script FILE`)."""
    encoded = base64.b64encode(command.encode()).decode("ascii")
    if len(encoded) > MAX_INLINE_COMMAND_BYTES:
        raise CommandTooLong(
            f"the guest command is too long for the kernel command line that carries it "
            f"({len(command.encode())} bytes, at most {MAX_INLINE_COMMAND_BYTES * 3 // 4}): put it in a file "
            "and run that with `ipsec-nic vm run --script FILE`"
        )
    return encoded


@dataclass(frozen=True)
class VfioUserCard:
    """One -device vfio-user-pci, connecting to a server listening on socket_path."""

    socket_path: Path
    msg_timeout_ms: int | None = None  # QEMU's x-msg-timeout (reply wait); None keeps QEMU's default
    properties: tuple[tuple[str, str | int | bool], ...] = ()  # e.g. (("addr", "0x5"),)


@dataclass(frozen=True)
class ShareDir:
    """A host directory shared with the guest at /mnt/<name> through its own virtiofsd."""

    host_path: Path
    name: str
    readonly: bool = True


@dataclass(frozen=True)
class VmConfig:
    command: str | None = None  # shell command for run_vm; the Vm class ignores it
    memory_mib: int = 1024
    cpus: int = 1
    cmdline_extra: tuple[str, ...] = ()
    cards: tuple[VfioUserCard, ...] = ()
    extra_args: tuple[str, ...] = ()  # e.g. ("-netdev", "dgram,...", "-device", "virtio-net-pci,...")
    shares: tuple[ShareDir, ...] = ()
    modules: tuple[str, ...] = ()  # guest modules to load at boot (virtio_net is added for virtio-net)
    project_dir: Path = PROJECT_DIR
    intel_iommu: bool = False
    accel: str = "auto"  # "auto" (trial-boot KVM once, cached), "kvm" or "tcg"
    timeout_s: float = 300.0
    log_dir: Path | None = None  # serial/QEMU/virtiofsd logs; default <cache>/vm-logs/<time>-<nonce>
    # "memfd": guest RAM in a shared memfd backend (virtiofs shares; vfio-user servers map RAM directly).
    # "private": plain -m, nothing shared: shares over virtio-9p (qemu/initrd_9p.py), and vfio-user
    # servers reach RAM only through DMA_READ/DMA_WRITE messages.
    guest_ram: str = "memfd"


@dataclass(frozen=True)
class VmRunPaths:
    """Where one boot keeps its sockets (short path: AF_UNIX limit) and logs, and its marker nonce."""

    socket_dir: Path
    log_dir: Path
    nonce: str

    @property
    def serial_log(self) -> Path:
        return self.log_dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.log_dir / "qemu.log"

    @property
    def agent_socket(self) -> Path:
        return self.socket_dir / "agent.sock"

    def virtiofs_socket(self, index: int) -> Path:
        return self.socket_dir / f"fs{index}.sock"


@dataclass(frozen=True)
class VmResult:
    exit_code: int
    output: str
    boot_seconds: float  # QEMU start → the guest command begins
    wall_seconds: float  # QEMU start → QEMU gone
    serial_log_path: Path


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    output: str
    seconds: float
    timed_out: bool = False


@dataclass(frozen=True)
class _Share:
    tag: str
    host_path: Path
    readonly: bool
    mount_name: str | None  # None: mounted by the init (root, project)
    # virtiofsd cache policy. "always" keeps file data in the guest page cache across opens; without
    # it every exec re-reads the binary and its libraries over virtiofs, which costs ~0.5 s per
    # process under TCG. Safe for the tree, which nothing changes while a VM runs.
    cache: str = "auto"


def _shares(cfg: VmConfig, toolchain: Toolchain) -> list[_Share]:
    shares = [
        _Share(ROOT_TAG, toolchain.root, True, None, cache="always"),
        _Share(PROJECT_TAG, cfg.project_dir, True, None),
    ]
    names = set()
    for share in cfg.shares:
        if (
            not share.name
            or "/" in share.name
            or "," in share.name
            or ":" in share.name
            or share.name in names
        ):
            raise ValueError(f"share name {share.name!r} must be unique and contain no '/', ',' or ':'")
        names.add(share.name)
        shares.append(_Share(f"share-{share.name}", share.host_path, share.readonly, share.name))
    return shares


# --- pure argv builders ----------------------------------------------------------------------------


def _private_ram(cfg: VmConfig) -> bool:
    if cfg.guest_ram not in ("memfd", "private"):
        raise ValueError(f"guest_ram must be 'memfd' or 'private', not {cfg.guest_ram!r}")
    return cfg.guest_ram == "private"


def kernel_cmdline(cfg: VmConfig, paths: VmRunPaths, *, agent: bool) -> str:
    if _private_ram(cfg):  # the 9p initramfs mounts root and project, then runs guest_init.sh
        root = ["rdinit=/init", "ipsec_nic.fs=9p"]
    else:
        root = [f"root={ROOT_TAG}", "rootfstype=virtiofs", "ro", f"init={STAGE0_PATH}"]
    args = [
        "console=ttyS0",
        *root,
        "panic=-1",
        "quiet",
        "mitigations=off",
        f"ipsec_nic.share={PROJECT_TAG}",
        f"ipsec_nic.nonce={paths.nonce}",
    ]
    if cfg.intel_iommu:
        args.append("intel_iommu=on")
    extra_shares = _shares_from_cfg(cfg)
    if extra_shares:
        args.append("ipsec_nic.shares=" + ",".join(extra_shares))
    modules = guest_modules(cfg)
    if modules:
        args.append("ipsec_nic.modules=" + ",".join(modules))
    if agent:
        args.append(f"ipsec_nic.agent={AGENT_DEVICE}")
    elif cfg.command is not None:
        args.append(f"ipsec_nic.cmd={check_inline_command(cfg.command)}")
    args.extend(cfg.cmdline_extra)
    return " ".join(args)


def guest_modules(cfg: VmConfig) -> list[str]:
    """Modules the guest init loads. Without udev nothing binds a NIC driver by itself; XFRM, ESP and
    crypto modules need no help (the kernel requests them on first use)."""
    modules = list(cfg.modules)
    if any("virtio-net" in arg for arg in cfg.extra_args) and "virtio_net" not in modules:
        modules.insert(0, "virtio_net")
    return modules


def _shares_from_cfg(cfg: VmConfig) -> list[str]:
    return [f"share-{s.name}:{s.name}" for s in cfg.shares]


def _card_device(card: VfioUserCard) -> str:
    device: dict[str, object] = {
        "driver": "vfio-user-pci",
        "socket": {"type": "unix", "path": str(card.socket_path)},
    }
    if card.msg_timeout_ms is not None:
        device["x-msg-timeout"] = card.msg_timeout_ms
    device.update(dict(card.properties))
    return json.dumps(device)


def virtiofsd_argv(toolchain: Toolchain, share: _Share, socket_path: Path) -> list[str]:
    argv = [
        *toolchain.virtiofsd_argv,
        f"--socket-path={socket_path}",
        f"--shared-dir={share.host_path}",
        "--sandbox=none",
        "--log-level=error",
        f"--cache={share.cache}",
    ]
    if share.readonly:
        argv.append("--readonly")
    return argv


def qemu_argv(
    cfg: VmConfig, toolchain: Toolchain, paths: VmRunPaths, *, accel: str = "tcg", agent: bool = False,
    initrd_9p: Path | None = None,
) -> list[str]:
    """The full QEMU command line for one boot. Pure: builds strings, touches nothing. A private-RAM
    boot needs ``initrd_9p`` (qemu/initrd_9p.py)."""
    if accel not in ("tcg", "kvm"):
        raise ValueError(f"accel must be 'tcg' or 'kvm', not {accel!r}")
    private = _private_ram(cfg)
    if private and initrd_9p is None:
        raise ValueError("a guest_ram='private' boot needs the 9p initramfs")
    memory = f"{cfg.memory_mib}M"
    # virtiofs needs shared guest RAM; vfio-user servers get the same memfd in DMA_MAP. Private RAM
    # has no fd: QEMU sends DMA_MAP without one and serves the servers' DMA_READ/DMA_WRITE itself.
    shared = [] if private else ["-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
                                 "-numa", "node,memdev=mem"]
    argv = [
        *toolchain.qemu_argv,
        "-machine",
        f"q35,accel={accel}",
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-smp",
        str(cfg.cpus),
        "-m",
        memory,
        *shared,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(toolchain.kernel),
    ]
    # No initrd for virtiofs: Debian's kernel has virtio-fs built in, and skipping the initramfs saves
    # seconds. 9p is a module there: a tiny initramfs loads it.
    if private:
        argv += ["-initrd", str(initrd_9p)]
    argv += ["-append", kernel_cmdline(cfg, paths, agent=agent)]
    # ttyS0: the console, to our stdout pipe and to a log file.
    argv += [
        "-chardev",
        f"stdio,id=console,signal=off,logfile={paths.serial_log}",
        "-serial",
        "chardev:console",
    ]
    if agent:
        argv += [
            "-chardev",
            f"socket,id=agent,path={paths.agent_socket},server=on,wait=off",
            "-serial",
            "chardev:agent",
        ]
    for index, share in enumerate(_shares(cfg, toolchain)):
        if private:
            argv += [
                "-fsdev",
                f"local,id=fs{index},path={share.host_path},security_model=none"
                + (",readonly=on" if share.readonly else ""),
                "-device",
                f"virtio-9p-pci,fsdev=fs{index},mount_tag={share.tag}",
            ]
            continue
        argv += [
            "-chardev",
            f"socket,id=fs{index},path={paths.virtiofs_socket(index)}",
            "-device",
            f"vhost-user-fs-pci,chardev=fs{index},tag={share.tag}",
        ]
    if cfg.intel_iommu:
        # Must come before the devices it translates for.
        argv += ["-device", "intel-iommu,caching-mode=on"]
    for card in cfg.cards:
        argv += ["-device", _card_device(card)]
    argv += list(cfg.extra_args)
    return argv


# --- processes ----------------------------------------------------------------------------------------


class _Terminated(BaseException):
    """SIGTERM arrived while a VM was up; unwinds like Ctrl-C so cleanup runs."""


class _Children:
    """Processes this module started, each in its own process group, killed by PID at the end."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        atexit.register(self.kill_all)

    def start(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def kill_all(self, close_streams: bool = True) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        for process in reversed(self.processes):
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if close_streams:
            self.close_streams()

    def close_streams(self) -> None:
        for process in self.processes:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self.processes.clear()
        atexit.unregister(self.kill_all)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except _Terminated:
        # Cleanup has run by now; leave like a process killed by SIGTERM would.
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait_for_socket(path: Path, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + SOCKET_WAIT_S
    while not path.exists():
        if process.poll() is not None:
            raise VmError(f"{what} exited with status {process.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            raise VmError(f"{what} did not create {path} within {SOCKET_WAIT_S:.0f} s")
        time.sleep(0.02)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class _Console:
    """Reads the guest console from QEMU's stdout on a thread: lines, markers, callback."""

    def __init__(self, stream, nonce: str, on_output: OutputCallback | None,
                 on_command_output: OutputCallback | None = None) -> None:
        self.stream = stream
        self.nonce = nonce
        self.on_output = on_output
        self.on_command_output = on_command_output  # the command's own lines only, as they arrive
        self.lines: list[str] = []
        self.command_output: list[str] = []
        self.begin_time: float | None = None
        self.exit_code: int | None = None
        self.agent_started = threading.Event()
        self.finished = threading.Event()  # exit marker seen or console closed
        self.closed = threading.Event()
        self._in_command = False
        self.thread = threading.Thread(target=self._read, name="vm-console", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(self.stream.fileno(), 65536)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    self._line(raw.decode("utf-8", "replace").rstrip("\r"))
            if pending:
                self._line(pending.decode("utf-8", "replace").rstrip("\r"))
        except (OSError, ValueError):
            pass
        finally:
            self.closed.set()
            self.finished.set()

    def _line(self, line: str) -> None:
        self.lines.append(line)
        begin = f"{BEGIN_MARKER} {self.nonce}@@"
        exit_prefix = f"{EXIT_MARKER} {self.nonce} "
        if line == begin:
            self.begin_time = time.monotonic()
            self._in_command = True
            return
        if line == f"@@ipsec-nic-agent {self.nonce}@@":
            self.begin_time = time.monotonic()
            self.agent_started.set()
        if self._in_command and exit_prefix in line:
            before, _, rest = line.partition(exit_prefix)
            if before:
                self._emit(before)
            with contextlib.suppress(ValueError):
                self.exit_code = int(rest.split("@@", 1)[0])
            self._in_command = False
            self.finished.set()
            return
        if self._in_command:
            self._emit(line)
        elif self.on_output is not None:
            self.on_output(line)

    def _emit(self, line: str) -> None:
        self.command_output.append(line)
        if self.on_command_output is not None:
            self.on_command_output(line)
        elif self.on_output is not None:
            self.on_output(line)


def _default_log_dir(toolchain: Toolchain, nonce: str) -> Path:
    """<cache>/vm-logs/<time>-<nonce>; only the newest KEEP_VM_LOGS boots are kept."""
    base = toolchain.cache_dir / "vm-logs"
    with contextlib.suppress(OSError):
        old = sorted(base.iterdir())
        for stale in old[: max(0, len(old) - KEEP_VM_LOGS + 1)]:
            shutil.rmtree(stale, ignore_errors=True)
    return base / f"{time.strftime('%Y%m%d-%H%M%S')}-{nonce}"


class _Boot:
    """Starts virtiofsd(s) and QEMU for one configuration; stop() undoes everything."""

    def __init__(
        self, cfg: VmConfig, toolchain: Toolchain, *, agent: bool, on_output: OutputCallback | None,
        on_command_output: OutputCallback | None = None,
    ) -> None:
        self.cfg = cfg
        self.toolchain = toolchain
        self.agent = agent
        self.on_output = on_output
        self.on_command_output = on_command_output
        self.children = _Children()
        nonce = secrets.token_hex(8)
        # Created in start(), so an object that never starts leaves nothing behind.
        socket_dir = Path(tempfile.gettempdir()) / f"ipsec-nic-vm-{nonce}"
        log_dir = cfg.log_dir or _default_log_dir(toolchain, nonce)
        self.paths = VmRunPaths(socket_dir, log_dir, nonce)
        self.console: _Console | None = None
        self.qemu: subprocess.Popen | None = None
        self.start_time = 0.0
        self.end_time: float | None = None
        self.accel = "tcg"

    def start(self) -> None:
        self.paths.socket_dir.mkdir(mode=0o700)
        self.paths.log_dir.mkdir(parents=True, exist_ok=True)
        self.accel = resolve_accel(self.cfg, self.toolchain)
        private = _private_ram(self.cfg)
        initrd = initrd_path(self.toolchain) if private else None
        argv = qemu_argv(self.cfg, self.toolchain, self.paths, accel=self.accel, agent=self.agent,
                         initrd_9p=initrd)
        for index, share in enumerate(_shares(self.cfg, self.toolchain)):
            if not share.host_path.is_dir():
                raise VmError(f"share {share.tag}: {share.host_path} is not a directory")
            if private:
                continue  # QEMU serves 9p itself
            socket_path = self.paths.virtiofs_socket(index)
            log = self.paths.log_dir / f"virtiofsd-{share.tag}.log"
            with open(log, "wb") as log_file:
                process = self.children.start(
                    virtiofsd_argv(self.toolchain, share, socket_path),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.toolchain.virtiofsd_env},
                )
            _wait_for_socket(socket_path, process, f"virtiofsd for {share.tag}", log)
        (self.paths.log_dir / "qemu.argv").write_text("\n".join(argv) + "\n")
        self.start_time = time.monotonic()
        with open(self.paths.qemu_log, "wb") as qemu_log:
            self.qemu = self.children.start(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=qemu_log,
                env=self.toolchain.qemu_env_for(),
            )
        self.console = _Console(self.qemu.stdout, self.paths.nonce, self.on_output, self.on_command_output)

    def failure(self, what: str) -> str:
        serial = "\n".join(self.console.lines[-30:]) if self.console else ""
        return (
            f"{what}\n--- QEMU stderr ({self.paths.qemu_log}):\n{_tail(self.paths.qemu_log)}\n"
            f"--- serial console ({self.paths.serial_log}), last lines:\n{serial}"
        )

    def wait_qemu_exit(self, timeout: float) -> bool:
        assert self.qemu is not None
        try:
            self.qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self.end_time = time.monotonic()
        return True

    def stop(self) -> None:
        self.children.kill_all(close_streams=False)
        if self.end_time is None:
            self.end_time = time.monotonic()
        # QEMU is gone, so its stdout is at EOF: let the reader finish before the pipe is closed.
        if self.console is not None:
            self.console.thread.join(timeout=5)
        self.children.close_streams()
        shutil.rmtree(self.paths.socket_dir, ignore_errors=True)


# --- accelerator choice ------------------------------------------------------------------------------------


def resolve_accel(cfg: VmConfig, toolchain: Toolchain) -> str:
    """'kvm' only when a trial boot with KVM worked on this host (result cached), else 'tcg'."""
    choice = os.environ.get("IPSEC_NIC_ACCEL", cfg.accel)
    if choice in ("kvm", "tcg"):
        return choice
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    key = f"{os.uname().release} qemu {'.'.join(map(str, toolchain.qemu_version))} {toolchain.qemu_source}"
    cache = toolchain.cache_dir / "accel-probe.json"
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(cache.read_text())
        if known.get("key") == key and known.get("accel") in ("kvm", "tcg"):
            return known["accel"]
    with tempfile.TemporaryDirectory(prefix="ipsec-nic-kvm-probe-") as log_dir:
        probe = replace(
            cfg,
            command="echo kvm-probe-ok",
            accel="kvm",
            cards=(),
            extra_args=(),
            shares=(),
            modules=(),
            intel_iommu=False,
            timeout_s=KVM_PROBE_TIMEOUT_S,
            log_dir=Path(log_dir),
        )
        try:
            result = run_vm(probe, toolchain)
            works = result.exit_code == 0 and "kvm-probe-ok" in result.output
        except VmError:
            works = False
    accel = "kvm" if works else "tcg"
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"key": key, "accel": accel}) + "\n")
    return accel


# --- one command per boot ---------------------------------------------------------------------------------------


def run_vm(cfg: VmConfig, toolchain: Toolchain, on_output: OutputCallback | None = None,
           on_command_output: OutputCallback | None = None) -> VmResult:
    """Boot, run cfg.command in the guest, power off. Raises VmError/VmTimeout if it never finishes.

    ``on_command_output`` sees the command's lines as they arrive, ``on_output`` every other console
    line (all of them when ``on_command_output`` is None); the result holds the command's lines too. A command too long for the kernel command line raises
    CommandTooLong before anything starts."""
    if cfg.command is None:
        raise ValueError("run_vm needs cfg.command")
    check_inline_command(cfg.command)
    boot = _Boot(cfg, toolchain, agent=False, on_output=on_output, on_command_output=on_command_output)
    with _sigterm_unwinds():
        try:
            boot.start()
            assert boot.console is not None
            deadline = boot.start_time + cfg.timeout_s
            console = boot.console
            while not console.finished.wait(0.25):
                if time.monotonic() > deadline:
                    raise VmTimeout(boot.failure(f"VM did not finish within {cfg.timeout_s:.0f} s"))
                if boot.accel == "kvm" and KVM_FAILURE in _tail(boot.paths.qemu_log, 200):
                    # QEMU stays up, with the guest stopped, after a KVM emulation failure.
                    raise VmError(boot.failure("KVM cannot run this guest"))
            if console.exit_code is None:
                boot.wait_qemu_exit(2)
                raise VmError(boot.failure("VM ended before the guest command finished"))
            # The guest powers off right after the exit marker.
            if not boot.wait_qemu_exit(max(1.0, min(30.0, deadline - time.monotonic()))):
                boot.end_time = time.monotonic()
            begin = console.begin_time if console.begin_time is not None else boot.start_time
            return VmResult(
                exit_code=console.exit_code,
                output="\n".join(console.command_output),
                boot_seconds=round(begin - boot.start_time, 3),
                wall_seconds=round((boot.end_time or time.monotonic()) - boot.start_time, 3),
                serial_log_path=boot.paths.serial_log,
            )
        finally:
            boot.stop()


# --- one boot, many commands ---------------------------------------------------------------------------------------


class Vm:
    """A VM that boots once and runs commands through the guest agent. Use as a context manager."""

    def __init__(self, cfg: VmConfig, toolchain: Toolchain, on_output: OutputCallback | None = None) -> None:
        self.cfg = cfg
        self._boot = _Boot(cfg, toolchain, agent=True, on_output=on_output)
        self._socket: socket.socket | None = None
        self._buffer = b""
        self._next_id = 1
        self._sigterm: contextlib.ExitStack | None = None
        self.boot_seconds: float | None = None

    @property
    def serial_log_path(self) -> Path:
        return self._boot.paths.serial_log

    @property
    def console_lines(self) -> list[str]:
        return list(self._boot.console.lines) if self._boot.console else []

    def __enter__(self) -> Vm:
        self._sigterm = contextlib.ExitStack()
        self._sigterm.enter_context(_sigterm_unwinds())
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def qemu_pid(self) -> int | None:
        """QEMU's process id while it runs (the benchmarks read its /proc maps)."""
        return self._boot.qemu.pid if self._boot.qemu is not None else None

    def start(self) -> None:
        boot = self._boot
        boot.start()
        deadline = boot.start_time + self.cfg.timeout_s
        self._socket = self._connect_agent(deadline)
        ready = self._read_message(deadline)
        if ready.get("event") != "ready" or ready.get("nonce") != boot.paths.nonce:
            raise VmError(boot.failure(f"guest agent sent {ready!r} instead of its ready message"))
        self.boot_seconds = round(time.monotonic() - boot.start_time, 3)

    def _connect_agent(self, deadline: float) -> socket.socket:
        boot = self._boot
        assert boot.qemu is not None
        while True:
            if boot.qemu.poll() is not None:
                raise VmError(boot.failure(f"QEMU exited with status {boot.qemu.returncode} while booting"))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(boot.paths.agent_socket))
                return sock
            except OSError:
                sock.close()
            if time.monotonic() > deadline:
                raise VmTimeout(boot.failure("QEMU never opened the agent socket"))
            time.sleep(0.05)

    def _read_message(self, deadline: float) -> dict:
        assert self._socket is not None
        boot = self._boot
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmTimeout(boot.failure("no answer from the guest agent in time"))
            if boot.console is not None and boot.console.closed.is_set():
                raise VmError(boot.failure("the VM stopped while waiting for the guest agent"))
            self._socket.settimeout(min(remaining, 0.5))
            try:
                chunk = self._socket.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise VmError(boot.failure("the guest agent's serial connection closed"))
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line.strip(b"\r\x00 "))
        except ValueError as exc:
            raise VmError(f"guest agent sent an unreadable line {line[:200]!r}: {exc}") from exc
        if not isinstance(message, dict):
            raise VmError(f"guest agent sent {message!r}")
        return message

    def _request(self, request: dict, timeout: float) -> dict:
        if self._socket is None:
            raise VmError("the VM is not running")
        ident = self._next_id
        self._next_id += 1
        self._socket.settimeout(None)
        self._socket.sendall(json.dumps({"id": ident, **request}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == ident:
                return reply
            if reply.get("error"):
                raise VmError(f"guest agent: {reply['error']}")

    def run(self, command: str, timeout: float = 300.0, check: bool = False) -> CommandResult:
        """Run a shell command in the guest (cwd /opt/ipsec-nic); output is stdout+stderr."""
        # The guest kills the command at `timeout`; the host waits a little longer for that reply.
        reply = self._request({"cmd": command, "timeout": timeout}, timeout + 30.0)
        if "error" in reply:
            raise VmError(f"guest agent: {reply['error']}")
        output = base64.b64decode(reply.get("output", "")).decode("utf-8", "replace")
        result = CommandResult(
            exit_code=int(reply["exit_code"]),
            output=output,
            seconds=float(reply.get("seconds", 0.0)),
            timed_out=bool(reply.get("timed_out")),
        )
        if check and result.exit_code != 0:
            raise VmError(f"guest command {command!r} exited with {result.exit_code}:\n{output[-2000:]}")
        return result

    def close(self) -> None:
        """Ask the guest to power off; whatever still runs after a short wait is killed."""
        boot = self._boot
        try:
            if self._socket is not None and boot.qemu is not None and boot.qemu.poll() is None:
                with contextlib.suppress(VmError, OSError):
                    self._request({"op": "exit"}, 10.0)
                boot.wait_qemu_exit(15.0)
        finally:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            boot.stop()
            if self._sigterm is not None:
                self._sigterm.close()
                self._sigterm = None
