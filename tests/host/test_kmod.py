"""qemu/kmod.py without a toolchain: cache key, source set, guest paths, errors, locking.

The real build (chroot into the toolchain tree, gcc-14, the guest kernel's headers) runs in the VM tests
through `ipsec-nic vm run --kernel-driver`.
"""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest

from qemu import kmod
from qemu.toolchain import Toolchain


def _toolchain(tmp_path: Path, kver: str = "6.12.117+deb13-amd64") -> Toolchain:
    root = tmp_path / "trixie-root"
    (root / "boot").mkdir(parents=True)
    kernel = root / "boot" / f"vmlinuz-{kver}"
    kernel.write_bytes(b"")
    return Toolchain(cache_dir=tmp_path / "cache", root=root, kernel=kernel, initrd=None, qemu_argv=("qemu",),
                     qemu_env={}, qemu_version=(10, 1, 0), qemu_source="test", virtiofsd_argv=("virtiofsd",))


def _sources(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    for name, text in (("a.c", "int a;\n"), ("a.h", "#define A 1\n"), ("Kbuild", "obj-m += a.o\n"),
                       ("Makefile", "all:\n"), ("gen_header.py", "x = 1\n"), ("__init__.py", "")):
        (src / name).write_text(text)
    return kmod.source_files(src)


def test_source_set_is_what_the_build_reads(tmp_path):
    assert [p.name for p in _sources(tmp_path)] == ["Kbuild", "Makefile", "a.c", "a.h"]


def test_the_real_driver_sources_are_found():
    names = {p.name for p in kmod.source_files()}
    assert {"Kbuild", "ipsec_nic_main.c", "ipsec_nic_hw.h"} <= names


def test_key_follows_sources_and_kernel_version(tmp_path):
    sources = _sources(tmp_path)
    key = kmod.module_key(sources, "6.12.117+deb13-amd64")
    assert key == kmod.module_key(sources, "6.12.117+deb13-amd64")
    assert key != kmod.module_key(sources, "6.12.118+deb13-amd64")
    sources[2].write_text("int a = 2;\n")
    assert key != kmod.module_key(sources, "6.12.117+deb13-amd64")


def test_kernel_version_comes_from_the_guest_kernel_image(tmp_path):
    assert kmod.kernel_version(_toolchain(tmp_path, "6.12.99+deb13-amd64")) == "6.12.99+deb13-amd64"


def test_load_command_loads_esp_offload_first():
    command = kmod.load_command("/var/lib/ipsec-nic/kmod/abc")
    assert command.index("modprobe esp4_offload") < command.index("modprobe esp6_offload") < command.index("insmod")
    assert command.endswith("insmod /var/lib/ipsec-nic/kmod/abc/ipsec_nic.ko")


def test_missing_headers_is_a_clear_error(tmp_path):
    tc = _toolchain(tmp_path)
    with pytest.raises(kmod.KmodError, match=r"no kernel headers for 6\.12\.117\+deb13-amd64"):
        kmod.ensure_module(tc, progress=lambda line: None)


def test_cached_module_is_reused_and_installed_in_the_tree(tmp_path, monkeypatch):
    tc = _toolchain(tmp_path)
    key = kmod.module_key(kmod.source_files(), kmod.kernel_version(tc))
    cached = tc.cache_dir / "kmod" / key / "ipsec_nic.ko"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x7fELF module")

    def no_compile(*args, **kwargs):
        raise AssertionError("a cached module must not be rebuilt")

    monkeypatch.setattr(kmod, "_compile", no_compile)
    lines: list[str] = []
    module = kmod.ensure_module(tc, progress=lines.append)
    assert module.ko_path == cached and module.key == key
    assert module.guest_dir == f"/var/lib/ipsec-nic/kmod/{key}"
    in_tree = tc.root / module.guest_dir.lstrip("/") / "ipsec_nic.ko"
    assert in_tree.read_bytes() == b"\x7fELF module"  # the guest's root is the tree
    assert module.load_command.endswith(f"insmod {module.guest_ko}")
    in_tree.unlink()  # a rebuilt tree loses it: the next call puts it back
    kmod.ensure_module(tc, progress=lines.append)
    assert in_tree.is_file()


def test_failed_build_reports_the_compiler_tail(tmp_path, monkeypatch):
    tc = _toolchain(tmp_path)
    (tc.root / "usr/lib/modules/6.12.117+deb13-amd64/build").mkdir(parents=True)
    monkeypatch.setattr(kmod.os, "geteuid", lambda: 0)

    class Result:
        returncode = 2
        stdout = "".join(f"line {i}\n" for i in range(100))
        stderr = "ipsec_nic_main.c:1:1: error: expected ';'\n"

    monkeypatch.setattr(kmod.subprocess, "run", lambda *a, **k: Result())
    with pytest.raises(kmod.KmodError) as info:
        kmod.ensure_module(tc, progress=lambda line: None)
    text = str(info.value)
    assert "exit 2" in text and "error: expected ';'" in text and "line 99" in text
    assert "line 10\n" not in text  # only the tail
    assert not list((tc.root / "tmp").glob("ipsec-nic-kmod-*"))  # build directory cleaned up


def test_builds_are_serialised_by_a_lock(tmp_path):
    lock = tmp_path / "kmod" / "lock"
    lock.parent.mkdir()
    waited: list[str] = []
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        def build() -> None:
            with kmod.tc.locked(lock, "kernel module build", waited.append):
                waited.append("built")

        thread = threading.Thread(target=build)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive() and waited and "waiting" in waited[0]
        fcntl.flock(held, fcntl.LOCK_UN)
    thread.join(timeout=5)
    assert not thread.is_alive() and waited[-1] == "built"
