"""A boot without shared guest RAM (VmConfig.guest_ram='private'): QEMU argv, kernel command line and the 9p
initramfs image (checked with the tree's busybox cpio when a toolchain is built; booted in
tests/vm/test_message_dma.py)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from qemu import initrd_9p, launch
from qemu.launch import ShareDir, VmConfig

from .test_qemu_argv import cmdline_params, option_values, paths, tc  # noqa: F401 (fixtures)


def test_private_ram_shares_nothing_and_uses_9p(tc, paths, tmp_path):  # noqa: F811
    cfg = VmConfig(guest_ram="private", memory_mib=512, shares=(ShareDir(tmp_path, "out", readonly=False),))
    argv = launch.qemu_argv(cfg, tc, paths, initrd_9p=tmp_path / "i.cpio")
    assert option_values(argv, "-m") == ["512M"]
    assert not option_values(argv, "-object") and not option_values(argv, "-numa")
    assert not any("vhost-user-fs" in a for a in argv)
    fsdevs = option_values(argv, "-fsdev")
    assert fsdevs[0] == f"local,id=fs0,path={tc.root},security_model=none,readonly=on"
    assert fsdevs[2] == f"local,id=fs2,path={tmp_path},security_model=none"  # writable share
    assert option_values(argv, "-device")[:3] == [
        "virtio-9p-pci,fsdev=fs0,mount_tag=root", "virtio-9p-pci,fsdev=fs1,mount_tag=ipsec-nic",
        "virtio-9p-pci,fsdev=fs2,mount_tag=share-out"]
    assert option_values(argv, "-initrd") == [str(tmp_path / "i.cpio")]
    params = cmdline_params(argv)
    assert params["rdinit"] == "/init" and params["ipsec_nic.fs"] == "9p"
    assert "root" not in params and "rootfstype" not in params and "init" not in params
    # the tags the initramfs mounts are the launcher's
    assert (initrd_9p.ROOT_TAG_9P, initrd_9p.PROJECT_TAG_9P) == (launch.ROOT_TAG, launch.PROJECT_TAG)


def test_private_ram_needs_the_initramfs_and_a_known_mode(tc, paths):  # noqa: F811
    with pytest.raises(ValueError, match="9p initramfs"):
        launch.qemu_argv(VmConfig(guest_ram="private"), tc, paths)
    with pytest.raises(ValueError, match="guest_ram"):
        launch.qemu_argv(VmConfig(guest_ram="shared"), tc, paths)
    assert "-initrd" not in launch.qemu_argv(VmConfig(), tc, paths)


def parse_newc(image: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev), from the newc layout (kernel buffer-format.rst)."""
    out, off = {}, 0
    while True:
        assert image[off : off + 6] == b"070701"
        f = [int(image[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = image[off + 110 : off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        data = image[off : off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (f[1], data, (f[9], f[10]))


def test_cpio_layout():
    image = initrd_9p.build_cpio(b"\x7fELF busybox", {"00-a.ko": b"module a", "01-b.ko": b"bb"})
    assert len(image) % 512 == 0
    files = parse_newc(image)
    assert files["init"][1].decode() == initrd_9p.INIT_SCRIPT and files["init"][0] == stat.S_IFREG | 0o755
    assert files["bin/busybox"][1] == b"\x7fELF busybox"
    assert files["bin/switch_root"] == (stat.S_IFLNK | 0o777, b"busybox", (0, 0))
    assert files["dev/console"][0] == stat.S_IFCHR | 0o600 and files["dev/console"][2] == (5, 1)
    assert files["modules/01-b.ko"][1] == b"bb"


def test_built_initrd_unpacks_with_busybox_cpio():
    from qemu.toolchain import load

    built = load()
    if built is None:
        pytest.skip("VM toolchain not built")
    image = initrd_9p.initrd_path(built)
    listing = subprocess.run([str(Path(built.root) / "bin/busybox"), "cpio", "-it"], input=image.read_bytes(),
                             capture_output=True, check=True).stdout.decode().split()
    assert {"init", "bin/busybox", "dev/console"} <= set(listing)
    assert [n for n in listing if n.startswith("modules/")] == [
        "modules/00-netfs.ko", "modules/01-9pnet.ko", "modules/02-9pnet_virtio.ko", "modules/03-9p.ko"]
    assert initrd_9p.initrd_path(built) == image  # built once
