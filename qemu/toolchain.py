"""The VM toolchain: a Debian trixie tree holding QEMU >= 10.1, a kernel, virtiofsd and python3.

Built once with debootstrap into a cache directory outside the checkout, verified, then reused:

    <cache>/trixie-root/         the tree; also the guest's read-only virtiofs root
    <cache>/trixie-root.ready    JSON stamp: recipe hash, QEMU version, build time
    <cache>/trixie-root.build/   a build in progress (renamed to trixie-root once verified)
    <cache>/build.log            debootstrap/apt output of the last build
    <cache>/lock                 flock: one build (or check) at a time
    <cache>/accel-probe.json     whether a KVM trial boot worked (qemu/launch.py)
    <cache>/vm-logs/             serial/QEMU/virtiofsd logs of the last boots (qemu/launch.py)

<cache> is $IPSEC_NIC_CACHE, else $XDG_CACHE_HOME/ipsec-nic, else ~/.cache/ipsec-nic.

The binaries in the tree run on the host WITHOUT chroot: the tree's own dynamic loader is started with
the tree's library directories, so the host's libc never matters and no mounts are left behind.
$IPSEC_NIC_QEMU may name another qemu-system-x86_64 (>= 10.1, with vfio-user-pci); the tree is still
built, because the guest boots its kernel and uses it as its root file system.
Building needs root (debootstrap, chroot) and the host's Debian mirror (read from its apt sources).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Progress = Callable[[str], None]

SUITE = "trixie"
MIN_QEMU_VERSION = (10, 1)
# Bump when the recipe changes in a way the lists below do not show.
RECIPE_VERSION = 1

# Installed from trixie itself, in ONE apt run: linux-headers-amd64 depends on the identically
# versioned image, and the archive drops old headers on each kernel update, so image and headers
# must be resolved together. --no-install-recommends keeps the tree near 1.5 GB.
GUEST_PACKAGES = (
    "linux-image-amd64",
    # Building the kernel driver (qemu/kmod.py) inside the tree: headers + the kernel's own gcc.
    "linux-headers-amd64",
    "gcc-14",
    "make",
    "initramfs-tools",
    "virtiofsd",
    "python3",
    "python3-cryptography",
    "python3-scapy",
    "python3-yaml",
    "pciutils",
    "iproute2",
    "busybox-static",
    "kmod",
    "procps",
    "tcpdump",
    # What a driver tester expects in the guest: link/counters, ping, an IKE daemon with the
    # kernel-netlink plugin (strongswan-libcharon) and swanctl, and a TCP bulk transfer.
    "ethtool",
    "iputils-ping",
    "strongswan-charon",
    "strongswan-swanctl",
    "socat",
    "iperf3",
)
# QEMU's vfio-user client first shipped in 10.1; trixie itself has 10.0.
BACKPORTS_PACKAGES = ("qemu-system-x86", "ipxe-qemu", "seabios")

# The guest mounts the project checkout here (an empty directory in the read-only tree).
GUEST_PROJECT_DIR = "/opt/ipsec-nic"
STAGE0_PATH = "/sbin/ipsec-nic-init"
# Stage 0 lives in the tree so that the real init (qemu/guest_init.sh) can live in the checkout and
# change without a rebuild: it only mounts the project share and hands over.
STAGE0_SCRIPT = f"""#!/bin/sh
# ipsec-nic stage-0 init: mount the project share, then run its guest init script.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
tag=ipsec-nic
script=qemu/guest_init.sh
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ipsec_nic.share=*) tag="${{arg#*=}}" ;;
        ipsec_nic.init=*) script="${{arg#*=}}" ;;
    esac
done
if mount -t virtiofs -o ro "$tag" {GUEST_PROJECT_DIR} && [ -r "{GUEST_PROJECT_DIR}/$script" ]; then
    exec /bin/sh "{GUEST_PROJECT_DIR}/$script"
fi
echo "ipsec-nic stage0: cannot mount share '$tag' or read $script; powering off"
echo o > /proc/sysrq-trigger
sleep 10
"""

# dpkg drops docs, man pages and translations: nothing in the guest reads them.
DPKG_NODOC = """path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
"""

APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "LC_ALL": "C.UTF-8",
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
}

LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
LOADER = "usr/lib64/ld-linux-x86-64.so.2"
QEMU_BIN = "usr/bin/qemu-system-x86_64"
VIRTIOFSD_BIN = "usr/libexec/virtiofsd"
# Firmware search path: /usr/share/qemu holds absolute symlinks into seabios/ipxe, which point at
# the host's /usr/share when QEMU runs outside the chroot, so the targets are listed too.
QEMU_DATA_DIRS = ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu")
QEMU_MODULE_DIR = "usr/lib/x86_64-linux-gnu/qemu"

GUEST_IMPORT_CHECK = "import cryptography.hazmat.primitives.ciphers.aead, scapy.all, yaml"
LOG_TAIL_LINES = 30
PROGRESS_INTERVAL_S = 3.0
HEARTBEAT_S = 15.0


class ToolchainError(RuntimeError):
    """The toolchain cannot be built or used; the message says why and what to do."""


@dataclass(frozen=True)
class Toolchain:
    """Paths and command prefixes for running the VM. Append arguments to the argv prefixes."""

    cache_dir: Path
    root: Path
    kernel: Path
    initrd: Path | None
    qemu_argv: tuple[str, ...]
    qemu_env: Mapping[str, str]
    qemu_version: tuple[int, int, int]
    qemu_source: str
    virtiofsd_argv: tuple[str, ...]
    virtiofsd_env: Mapping[str, str] = field(default_factory=dict)

    def qemu_env_for(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(self.qemu_env)
        return env


# --- locations -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    configured = os.environ.get("IPSEC_NIC_CACHE")
    if configured:
        return Path(configured).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return (base / "ipsec-nic").resolve()


def recipe_hash() -> str:
    recipe = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "guest": GUEST_PACKAGES,
        "backports": BACKPORTS_PACKAGES,
        "stage0": STAGE0_SCRIPT,
        "nodoc": DPKG_NODOC,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _root_dir(cache: Path) -> Path:
    return cache / f"{SUITE}-root"


def _stamp_path(cache: Path) -> Path:
    return cache / f"{SUITE}-root.ready"


# --- the host's Debian mirror ------------------------------------------------------------------------


def parse_apt_sources(text: str, deb822: bool) -> list[tuple[str, list[str]]]:
    """(uri, suites) for each 'deb' entry of a sources.list or a deb822 .sources file."""
    entries: list[tuple[str, list[str]]] = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                entries.append((uri, fields.get("suites", "").split()))
        return entries
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            entries.append((words[1], [words[2]]))
    return entries


def find_debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The main Debian archive URI this host's apt uses ($IPSEC_NIC_DEBIAN_MIRROR overrides)."""
    configured = os.environ.get("IPSEC_NIC_DEBIAN_MIRROR")
    if configured:
        return configured.rstrip("/")
    files = [apt_dir / "sources.list"]
    source_dir = apt_dir / "sources.list.d"
    if source_dir.is_dir():
        files += sorted(p for p in source_dir.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for uri, suites in parse_apt_sources(text, deb822=path.suffix == ".sources"):
            # The main archive is the one carrying plain release suites (not -security, not a
            # third-party repository with suites like "nodistro").
            if "security" in uri or not uri.startswith(("http://", "https://", "file:")):
                continue
            if uri.rstrip("/").endswith("/debian") and any(
                s and "security" not in s and "-" not in s for s in suites
            ):
                return uri.rstrip("/")
    raise ToolchainError(
        "could not find a Debian mirror in /etc/apt/sources.list(.d); "
        "set IPSEC_NIC_DEBIAN_MIRROR=http://<mirror>/debian"
    )


# --- QEMU version and checks ---------------------------------------------------------------------------


def parse_qemu_version(text: str) -> tuple[int, int, int]:
    match = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ToolchainError(f"cannot read a QEMU version from: {text.strip()[:200]!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def tree_runner(root: Path, binary: str) -> tuple[str, ...]:
    """argv prefix that runs <root>/<binary> through the tree's own loader and libraries."""
    library_path = ":".join(str(root / d) for d in LIB_DIRS)
    return (str(root / LOADER), "--library-path", library_path, str(root / binary))


def tree_qemu(root: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    argv = list(tree_runner(root, QEMU_BIN))
    for data_dir in QEMU_DATA_DIRS:
        argv += ["-L", str(root / data_dir)]
    return tuple(argv), {"QEMU_MODULE_DIR": str(root / QEMU_MODULE_DIR)}


def probe_qemu(argv: Sequence[str], env: Mapping[str, str]) -> tuple[int, int, int]:
    """Version of the QEMU at argv; raises unless it is new enough and has vfio-user-pci."""
    full_env = {**os.environ, **env}
    try:
        out = subprocess.run([*argv, "--version"], env=full_env, capture_output=True, text=True, timeout=60)
        version = parse_qemu_version(out.stdout + out.stderr)
        if version[:2] < MIN_QEMU_VERSION:
            raise ToolchainError(f"{argv[-1] if argv else 'qemu'}: QEMU {version} is older than 10.1")
        devices = subprocess.run(
            [*argv, "-device", "help"], env=full_env, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolchainError(f"cannot run QEMU ({' '.join(argv)}): {exc}") from exc
    if '"vfio-user-pci"' not in devices.stdout:
        raise ToolchainError(f"QEMU at {' '.join(argv)} does not list vfio-user-pci in -device help")
    return version


def _host_qemu_override() -> tuple[tuple[str, ...], str] | None:
    configured = os.environ.get("IPSEC_NIC_QEMU")
    if not configured:
        return None
    path = shutil.which(configured) or configured
    if not os.access(path, os.X_OK):
        raise ToolchainError(f"IPSEC_NIC_QEMU={configured} is not an executable")
    return (path,), f"host ({path}, from IPSEC_NIC_QEMU)"


def _kernel_files(root: Path) -> tuple[Path, Path | None]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ToolchainError(f"no kernel in {root / 'boot'}")
    kernel = kernels[-1]
    initrd = root / "boot" / ("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
    return kernel, initrd if initrd.is_file() else None


def _verify_tree(root: Path) -> tuple[int, int, int]:
    """Raise unless the tree can boot a guest and run the guest tools; return the QEMU version."""
    qemu_argv, qemu_env = tree_qemu(root)
    version = probe_qemu(qemu_argv, qemu_env)
    _kernel_files(root)
    virtiofsd = tree_runner(root, VIRTIOFSD_BIN)
    try:
        out = subprocess.run([*virtiofsd, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise ToolchainError(f"cannot run virtiofsd from the tree: {exc}") from exc
    if out.returncode != 0:
        raise ToolchainError(f"virtiofsd --version failed: {out.stderr.strip()[:300]}")
    with _chroot_mounts(root):
        check = subprocess.run(
            ["chroot", str(root), "python3", "-c", GUEST_IMPORT_CHECK],
            capture_output=True,
            text=True,
            env=APT_ENV,
            timeout=300,
        )
    if check.returncode != 0:
        raise ToolchainError(f"python3 in the tree cannot import the guest modules: {check.stderr[-500:]}")
    if not (root / STAGE0_PATH.lstrip("/")).is_file():
        raise ToolchainError("stage-0 init missing from the tree")
    return version


# --- loading a built toolchain ----------------------------------------------------------------------------


def _from_tree(cache: Path, root: Path, version: tuple[int, int, int]) -> Toolchain:
    kernel, initrd = _kernel_files(root)
    qemu_argv, qemu_env = tree_qemu(root)
    source = "tree (run via its ld.so)"
    override = _host_qemu_override()
    if override:
        qemu_argv, source = override
        qemu_env = {}
        version = probe_qemu(qemu_argv, qemu_env)
    return Toolchain(
        cache_dir=cache,
        root=root,
        kernel=kernel,
        initrd=initrd,
        qemu_argv=qemu_argv,
        qemu_env=qemu_env,
        qemu_version=version,
        qemu_source=source,
        virtiofsd_argv=tree_runner(root, VIRTIOFSD_BIN),
    )


def _read_stamp(cache: Path) -> dict | None:
    try:
        stamp = json.loads(_stamp_path(cache).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("recipe") != recipe_hash() or not _root_dir(cache).is_dir():
        return None
    return stamp


def load() -> Toolchain | None:
    """The built toolchain, or None when it is missing or was built from another recipe."""
    cache = cache_dir()
    stamp = _read_stamp(cache)
    if stamp is None:
        return None
    return _from_tree(cache, _root_dir(cache), tuple(stamp["qemu_version"]))


# --- building ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path, what: str, progress: Progress) -> Iterator[None]:
    """Hold the flock on ``path`` (one build of ``what`` at a time), saying so when another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another {what} ({path}) ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Builder:
    def __init__(self, cache: Path, progress: Progress) -> None:
        self.cache = cache
        self.progress = progress
        self.start = time.monotonic()
        self.log_path = cache / "build.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed by close()
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)

    def close(self) -> None:
        self.log.close()

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 60:d}:{seconds % 60:02d}"

    def step(self, message: str) -> None:
        self.progress(f"[{self.elapsed()}] {message}")
        self.log.write(f"=== {message}\n")
        self.log.flush()

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Run a command, its output to the log, with a short 'still alive' line now and then."""
        self.log.write(f"$ {' '.join(argv)}\n")
        self.log.flush()
        process = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            text=True,
            errors="replace",
        )
        assert process.stdout is not None
        # A thread reads, so that long silent steps (postinst scripts) still get a heartbeat.
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
        reader.start()
        last_report = time.monotonic()
        last_line = ""
        try:
            while True:
                try:
                    line = lines.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    self.progress(f"[{self.elapsed()}]   still working: {last_line[:90]}")
                    last_report = time.monotonic()
                    continue
                if line is None:
                    break
                self.log.write(line)
                last_line = line.strip()
                self.tail.append(line.rstrip("\n"))
                now = time.monotonic()
                if now - last_report >= PROGRESS_INTERVAL_S:
                    activity = _activity(line)
                    if activity:
                        self.progress(f"[{self.elapsed()}]   {activity}")
                        last_report = now
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(timeout=5)
            process.stdout.close()
            self.log.flush()
        if returncode != 0:
            raise ToolchainError(f"{argv[0]} exited with status {returncode}")

    def failure_report(self) -> str:
        lines = "\n".join(f"    {line}" for line in self.tail)
        return f"last {len(self.tail)} lines of {self.log_path}:\n{lines}"


def _pump(stream, lines: queue.Queue[str | None]) -> None:
    try:
        for line in stream:
            lines.put(line)
    finally:
        lines.put(None)


_ACTIVITY = re.compile(
    r"^(?:I: )?(Retrieving|Validating|Extracting|Unpacking|Setting up|Get:\d+|Configuring)\s+(\S+)"
)


def _activity(line: str) -> str | None:
    match = _ACTIVITY.match(line)
    if not match:
        return None
    if match[1].startswith("Get:"):
        # "Get:12 http://mirror/debian trixie/main amd64 libfoo amd64 1.2 [12 kB]"
        words = line.split()
        return f"downloading {words[4]}" if len(words) > 4 else None
    return f"{match[1].split(':')[0].lower()} {match[2]}"


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            target = line.split()[1].replace("\\040", " ")
            if target.startswith(prefix) or target == str(path):
                found.append(target)
    return found


def _unmount_all(path: Path) -> None:
    # Deepest first, so /dev/pts goes before /dev.
    for target in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    try:
        for source, target, opts in (
            ("proc", "proc", ["-t", "proc"]),
            ("sysfs", "sys", ["-t", "sysfs"]),
            ("/dev", "dev", ["--bind"]),
            ("/dev/pts", "dev/pts", ["--bind"]),
        ):
            (root / target).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *opts, source, str(root / target)], check=True, capture_output=True)
        yield
    finally:
        _unmount_all(root)


def _ensure_debootstrap(builder: _Builder) -> None:
    if shutil.which("debootstrap"):
        return
    if not shutil.which("apt-get"):
        raise ToolchainError("debootstrap is missing and there is no apt-get to install it")
    builder.step("installing debootstrap on the host")
    env = {**os.environ, **APT_ENV}
    builder.run(["apt-get", "update"], env)
    builder.run(["apt-get", "install", "-y", "--no-install-recommends", "debootstrap"], env)


def _debootstrap_script(suite: str) -> list[str]:
    # An older debootstrap may not know the suite yet; trixie uses the same script as sid.
    scripts = Path("/usr/share/debootstrap/scripts")
    if (scripts / suite).exists() or not (scripts / "sid").exists():
        return []
    return [str(scripts / "sid")]


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _build_tree(builder: _Builder, build_root: Path, mirror: str) -> None:
    builder.step(f"debootstrap --variant=minbase {SUITE} from {mirror} (log: {builder.log_path})")
    builder.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--components=main",
            SUITE,
            str(build_root),
            mirror,
            *_debootstrap_script(SUITE),
        ],
        {**os.environ, **APT_ENV},
    )
    _write(
        build_root / "etc/apt/sources.list.d/debian.sources",
        f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates {SUITE}-backports\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )
    (build_root / "etc/apt/sources.list").unlink(missing_ok=True)
    _write(build_root / "etc/dpkg/dpkg.cfg.d/01-ipsec-nic-nodoc", DPKG_NODOC)
    _write(build_root / "etc/apt/apt.conf.d/99-ipsec-nic", 'APT::Install-Recommends "false";\n')
    # No service may start inside the build chroot.
    _write(build_root / "usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
    apt = ["chroot", str(build_root), "apt-get", "-o", "Dpkg::Use-Pty=0"]
    with _chroot_mounts(build_root):
        builder.step("apt-get update (with trixie-backports)")
        builder.run([*apt, "update"], APT_ENV)
        builder.step(f"installing {len(GUEST_PACKAGES)} guest packages (kernel, virtiofsd, python3, ...)")
        builder.run([*apt, "install", "-y", *GUEST_PACKAGES], APT_ENV)
        builder.step("installing QEMU from trixie-backports")
        builder.run([*apt, "install", "-y", "-t", f"{SUITE}-backports", *BACKPORTS_PACKAGES], APT_ENV)
        builder.run([*apt, "clean"], APT_ENV)
    (build_root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
    shutil.rmtree(build_root / "var/lib/apt/lists", ignore_errors=True)
    (build_root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (build_root / GUEST_PROJECT_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    _write(build_root / STAGE0_PATH.lstrip("/"), STAGE0_SCRIPT, 0o755)


def _tree_size(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False)
    try:
        return int(out.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


def setup(force: bool = False, progress: Progress = print) -> Toolchain:
    """Build the toolchain unless a verified one from the same recipe exists; return it."""
    cache = cache_dir()
    if not force:
        existing = load()
        if existing is not None:
            return existing
    if os.geteuid() != 0:
        raise ToolchainError(
            "building the VM toolchain needs root (debootstrap and chroot); run `sudo ipsec-nic vm setup` "
            f"once (cache: {cache}; set IPSEC_NIC_CACHE to share it)"
        )
    with locked(cache / "lock", "ipsec-nic toolchain build", progress):
        if not force:
            existing = load()  # another process may have built it while we waited
            if existing is not None:
                return existing
        root = _root_dir(cache)
        build_root = cache / f"{SUITE}-root.build"
        builder = _Builder(cache, progress)
        try:
            builder.step(f"building the VM toolchain in {cache} (recipe {recipe_hash()})")
            _unmount_all(build_root)
            shutil.rmtree(build_root, ignore_errors=True)
            _ensure_debootstrap(builder)
            _build_tree(builder, build_root, find_debian_mirror())
            builder.step("verifying: QEMU version and vfio-user-pci, kernel, virtiofsd, guest python3")
            version = _verify_tree(build_root)
            _stamp_path(cache).unlink(missing_ok=True)
            if root.exists():
                _unmount_all(root)
                shutil.rmtree(root)
            build_root.rename(root)
            size = _tree_size(root)
            stamp = {
                "recipe": recipe_hash(),
                "qemu_version": list(version),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.monotonic() - builder.start, 1),
                "size_bytes": size,
            }
            _stamp_path(cache).write_text(json.dumps(stamp, indent=2) + "\n")
            builder.step(
                f"toolchain ready: QEMU {'.'.join(map(str, version))}, {size / 2**30:.2f} GiB in {root}"
            )
        except (ToolchainError, OSError, subprocess.SubprocessError) as exc:
            raise ToolchainError(f"VM toolchain build failed: {exc}\n{builder.failure_report()}") from exc
        finally:
            _unmount_all(build_root)
            builder.close()
    toolchain = load()
    if toolchain is None:
        raise ToolchainError(f"toolchain in {cache} was built but does not load")
    return toolchain
