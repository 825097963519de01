"""A tiny initramfs that mounts the guest's root and the project over virtio-9p, for boots whose guest RAM
is not shared (``VmConfig.guest_ram = "private"``).

virtiofs (vhost-user-fs) needs every byte of guest RAM shared with virtiofsd, i.e. a memfd backend; a
plain ``-m`` guest has no such memory, so its root comes over virtio-9p, which QEMU serves itself. Debian's
kernel has 9p only as modules (9p, 9pnet, 9pnet_virtio, netfs), so they load from this initramfs: the tree's
static busybox, the modules decompressed (busybox insmod does not read .ko.xz), and /init (below), which
mounts both 9p tags read-only, moves /proc and switch_roots into the tree's root running the project's
qemu/guest_init.sh, as the tree's stage-0 init does on a virtiofs boot.

Written in the SVR4 "newc" cpio format the kernel unpacks (Linux Documentation/driver-api/early-userspace/
buffer-format.rst). Built once per kernel and recipe into the toolchain cache (about 1 MB, well under a
second).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import stat
from pathlib import Path

from qemu.toolchain import GUEST_PROJECT_DIR, Toolchain

ROOT_TAG_9P = "root"
PROJECT_TAG_9P = "ipsec-nic"
# Load order = dependency order (modules.dep: 9p -> 9pnet -> netfs; 9pnet_virtio -> 9pnet).
MODULES = ("kernel/fs/netfs/netfs.ko", "kernel/net/9p/9pnet.ko", "kernel/net/9p/9pnet_virtio.ko",
           "kernel/fs/9p/9p.ko")
# cache=loose: the tree and the checkout do not change while a VM runs, and without it every exec
# re-reads its binary over 9p (the same reason the virtiofs root uses cache=always). msize: fewer round trips.
MOUNT_OPTIONS = "ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000"

INIT_SCRIPT = f"""#!/bin/sh
# ipsec-nic 9p initramfs (qemu/initrd_9p.py): the root and the project over virtio-9p, then guest_init.sh.
export PATH=/bin
mount -t proc proc /proc
for m in /modules/*.ko; do insmod "$m" || echo "ipsec-nic initrd: cannot load $m"; done
mkdir -p /newroot
if mount -t 9p -o {MOUNT_OPTIONS} {ROOT_TAG_9P} /newroot &&
   mount -t 9p -o {MOUNT_OPTIONS} {PROJECT_TAG_9P} /newroot{GUEST_PROJECT_DIR}; then
    mount --move /proc /newroot/proc
    exec switch_root /newroot /bin/sh {GUEST_PROJECT_DIR}/qemu/guest_init.sh
fi
echo "ipsec-nic initrd: cannot mount the 9p root; powering off"
echo o > /proc/sysrq-trigger
sleep 10
"""


def _entry(name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: tuple[int, int] = (0, 0)) -> bytes:
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name.encode() + b"\0"
    out += bytes(-len(out) % 4) + data
    return out + bytes(-len(out) % 4)


def build_cpio(busybox: bytes, modules: dict[str, bytes], init: str = INIT_SCRIPT) -> bytes:
    """The initramfs image: /init, /bin/busybox (+ the applets /init uses), /modules/NN-name.ko."""
    entries: list[tuple[str, int, bytes]] = [
        ("bin", stat.S_IFDIR | 0o755, b""),
        ("dev", stat.S_IFDIR | 0o755, b""),
        ("proc", stat.S_IFDIR | 0o755, b""),
        ("modules", stat.S_IFDIR | 0o755, b""),
        ("dev/console", stat.S_IFCHR | 0o600, b""),
        ("init", stat.S_IFREG | 0o755, init.encode()),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox),
    ]
    for applet in ("sh", "mount", "insmod", "mkdir", "switch_root", "echo", "sleep"):
        entries.append((f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox"))
    for name, data in modules.items():
        entries.append((f"modules/{name}", stat.S_IFREG | 0o644, data))
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        # the kernel opens /dev/console (char 5:1) of the initramfs for init's stdio
        out += _entry(name, mode, data, ino, (5, 1) if name == "dev/console" else (0, 0))
    out += _entry("TRAILER!!!", 0)
    return bytes(out + bytes(-len(out) % 512))


def initrd_path(toolchain: Toolchain) -> Path:
    """Build (once) and return the 9p initramfs for the toolchain's kernel."""
    kver = toolchain.kernel.name.removeprefix("vmlinuz-")
    moddir = toolchain.root / "lib" / "modules" / kver
    sources = [moddir / (m + ".xz") for m in MODULES]
    busybox = toolchain.root / "bin" / "busybox"
    digest = hashlib.sha256(INIT_SCRIPT.encode() + kver.encode() + busybox.read_bytes()[:4096]).hexdigest()[:12]
    target = toolchain.cache_dir / f"9p-initrd-{digest}.cpio"
    if target.is_file():
        return target
    modules = {}
    for i, src in enumerate(sources):
        plain = src.with_suffix("")
        data = lzma.decompress(src.read_bytes()) if src.is_file() else plain.read_bytes()
        modules[f"{i:02d}-{plain.name}"] = data
    image = build_cpio(busybox.read_bytes(), modules)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(image)
    os.replace(tmp, target)
    return target
