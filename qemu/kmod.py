"""Build the ipsec-nic Linux kernel driver (guest_tools/linux/) for the guest kernel, once per source hash.

The module is compiled INSIDE the toolchain's trixie tree (chroot), with the tree's gcc-14 against
/usr/lib/modules/<guest kernel>/build from linux-headers-amd64: the host's compiler and kernel never
matter (the host kernel differs, so nothing here uses `uname -r`). Results are cached:

    <cache>/kmod/<key>/ipsec_nic.ko     the module (key = hash of the sources + guest kernel version)
    <cache>/kmod/<key>/build.log        compiler output of that build
    <cache>/kmod/lock                   flock: one build at a time

How the guest sees it (no extra share needed): the guest's root file system IS the toolchain tree,
shared read-only over virtiofs, so the built module is also installed into the tree at
``/var/lib/ipsec-nic/kmod/<key>/ipsec_nic.ko`` (``KernelModule.guest_dir``), which the guest reads at
that same path. /var/lib is not one of the tmpfs mounts of qemu/guest_init.sh. ``ensure_module`` puts
the file back there if the tree was rebuilt since. ``KernelModule.load_command`` is the guest shell
snippet that loads the ESP offload modules (xfrm needs ``x->type_offload``) and then the driver.

    python -m qemu.kmod            build (or reuse) and print where the module is
    python -m qemu.kmod --force    rebuild even if cached
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qemu import toolchain as tc

Progress = Callable[[str], None]

SOURCE_DIR = Path(__file__).resolve().parents[1] / "guest_tools" / "linux"
MODULE_NAME = "ipsec_nic"
# Files that make up the module build (the generator and the Python package marker do not).
SOURCE_SUFFIXES = (".c", ".h")
SOURCE_NAMES = ("Kbuild", "Makefile")
GUEST_KMOD_DIR = "/var/lib/ipsec-nic/kmod"
BUILD_TIMEOUT_S = 900
LOG_TAIL_LINES = 40


class KmodError(RuntimeError):
    """The module cannot be built; the message carries the compiler's last lines."""


@dataclass(frozen=True)
class KernelModule:
    """A built ipsec_nic.ko for the toolchain's guest kernel."""

    ko_path: Path  # on the host (in the cache)
    guest_dir: str  # directory holding ipsec_nic.ko as the guest sees it (inside the read-only root)
    load_command: str  # guest shell: ESP offload modules, then insmod of the driver
    kernel_version: str
    key: str

    @property
    def guest_ko(self) -> str:
        return f"{self.guest_dir}/{MODULE_NAME}.ko"


def source_files(source_dir: Path = SOURCE_DIR) -> list[Path]:
    return sorted(
        p for p in source_dir.iterdir() if p.is_file() and (p.suffix in SOURCE_SUFFIXES or p.name in SOURCE_NAMES)
    )


def kernel_version(toolchain: tc.Toolchain) -> str:
    """The guest kernel's release string, from the kernel image the VM boots."""
    return toolchain.kernel.name.removeprefix("vmlinuz-")


def module_key(sources: list[Path], kver: str) -> str:
    digest = hashlib.sha256(kver.encode() + b"\0")
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def load_command(guest_dir: str) -> str:
    return f"modprobe esp4_offload && modprobe esp6_offload && insmod {guest_dir}/{MODULE_NAME}.ko"




def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:])


def _compile(toolchain: tc.Toolchain, kver: str, sources: list[Path], out_dir: Path, progress: Progress) -> None:
    root = toolchain.root
    kdir = f"/usr/lib/modules/{kver}/build"
    if not (root / kdir.lstrip("/")).exists():
        raise KmodError(
            f"no kernel headers for {kver} in the toolchain ({root}{kdir}): rebuild it with `ipsec-nic vm setup`"
        )
    if os.geteuid() != 0:
        raise KmodError("building the kernel module needs root (chroot into the toolchain tree)")
    # The build directory lives in the tree's /tmp (the guest mounts a tmpfs over it).
    build_rel = f"tmp/ipsec-nic-kmod-{os.getpid()}"
    build_dir = root / build_rel
    shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(parents=True)
    log_path = out_dir / "build.log"
    try:
        for path in sources:
            shutil.copy2(path, build_dir / path.name)
        argv = ["chroot", str(root), "make", "-C", kdir, f"M=/{build_rel}", "CC=x86_64-linux-gnu-gcc-14", "modules"]
        progress(f"building {MODULE_NAME}.ko for {kver} with the tree's gcc-14 (log: {log_path})")
        start = time.monotonic()
        try:
            result = subprocess.run(argv, capture_output=True, text=True, errors="replace", env=tc.APT_ENV,
                                    timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise KmodError(f"module build timed out after {BUILD_TIMEOUT_S} s") from exc
        log = f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}"
        log_path.write_text(log)
        if result.returncode != 0 or not (build_dir / f"{MODULE_NAME}.ko").is_file():
            raise KmodError(f"kernel module build failed (exit {result.returncode}); last lines of {log_path}:\n"
                            f"{_tail(log)}")
        shutil.copy2(build_dir / f"{MODULE_NAME}.ko", out_dir / f"{MODULE_NAME}.ko.tmp")
        os.replace(out_dir / f"{MODULE_NAME}.ko.tmp", out_dir / f"{MODULE_NAME}.ko")
        progress(f"built {MODULE_NAME}.ko in {time.monotonic() - start:.0f} s")
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def _install_in_tree(toolchain: tc.Toolchain, ko: Path, key: str) -> str:
    guest_dir = f"{GUEST_KMOD_DIR}/{key}"
    target = toolchain.root / guest_dir.lstrip("/") / ko.name
    if not target.is_file() or target.read_bytes() != ko.read_bytes():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ko, target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)
    return guest_dir


def ensure_module(toolchain: tc.Toolchain, progress: Progress = print, force: bool = False) -> KernelModule:
    """The driver built for the toolchain's guest kernel: from the cache, or compiled now."""
    sources = source_files()
    if not any(p.suffix == ".c" for p in sources):
        raise KmodError(f"no driver sources in {SOURCE_DIR}")
    kver = kernel_version(toolchain)
    key = module_key(sources, kver)
    base = toolchain.cache_dir / "kmod"
    out_dir = base / key
    ko = out_dir / f"{MODULE_NAME}.ko"
    with tc.locked(base / "lock", "kernel module build", progress):
        if force or not ko.is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            _compile(toolchain, kver, sources, out_dir, progress)
        guest_dir = _install_in_tree(toolchain, ko, key)
    return KernelModule(ko_path=ko, guest_dir=guest_dir, load_command=load_command(guest_dir),
                        kernel_version=kver, key=key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qemu.kmod", description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached module exists")
    args = parser.parse_args(argv)
    try:
        toolchain = tc.setup(progress=print)
        module = ensure_module(toolchain, force=args.force)
    except (tc.ToolchainError, KmodError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"module: {module.ko_path}\nguest:  {module.guest_ko}\nload:   {module.load_command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
