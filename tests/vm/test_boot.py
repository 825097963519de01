"""The VM toolchain boots a guest that can run the guest tools' dependencies (no card attached)."""

from __future__ import annotations

import re

import pytest

from qemu.launch import PROJECT_DIR, ShareDir, VmConfig, run_vm

pytestmark = pytest.mark.vm

IMPORT_CHECK = (
    "python3 -c 'import sys, cryptography, scapy, yaml; "
    'print("versions", sys.version.split()[0], cryptography.__version__, scapy.VERSION, yaml.__version__)\''
)


def test_one_shot_boot_runs_the_command_with_guest_python_modules(toolchain, tmp_path):
    lines: list[str] = []
    result = run_vm(VmConfig(command=IMPORT_CHECK, timeout_s=300, log_dir=tmp_path), toolchain, lines.append)
    assert result.exit_code == 0, result.output
    match = re.search(
        r"^versions (3\.\d+\.\d+) (\d+\.\d+\S*) (\d+\.\d+\S*) (\d+\.\d+\S*)$", result.output, re.M
    )
    assert match, result.output
    assert tuple(int(x) for x in match[1].split(".")[:2]) >= (3, 11)
    assert 0 < result.boot_seconds < result.wall_seconds
    assert "versions" in result.serial_log_path.read_text()
    assert any(line.startswith("versions ") for line in lines)
    print(f"boot to guest command {result.boot_seconds:.1f} s, wall {result.wall_seconds:.1f} s")


def test_one_shot_boot_reports_the_guest_exit_status(toolchain, tmp_path):
    result = run_vm(VmConfig(command="echo before; exit 7", timeout_s=300, log_dir=tmp_path), toolchain)
    assert (result.exit_code, result.output) == (7, "before")


def test_guest_root_is_the_read_only_tree_and_the_checkout_is_shared(guest):
    assert guest.run("touch /should-fail").exit_code != 0
    assert guest.run("touch /tmp/ok && echo fine").output.strip() == "fine"
    kernel = guest.run("uname -r").output.strip()
    assert guest.run(f"test -d /lib/modules/{kernel}").exit_code == 0
    listing = guest.run("cat /opt/ipsec-nic/pyproject.toml").output
    assert listing == (PROJECT_DIR / "pyproject.toml").read_text()


def test_guest_session_runs_many_commands_and_keeps_quoting(guest):
    first = guest.run("echo $$")
    second = guest.run("echo $$")
    assert first.exit_code == second.exit_code == 0
    assert first.output != second.output  # separate shells, one boot
    assert guest.run("printf '%s|' \"a b\" c").output == "a b|c|"
    assert guest.run("exit 3").exit_code == 3
    timed = guest.run("sleep 30", timeout=1)
    assert timed.timed_out and timed.exit_code != 0


def test_guest_linux_has_xfrm_for_interop_peers(guest):
    # The interop suites use the guest kernel's ESP; it must load on demand without udev.
    result = guest.run(
        "ip xfrm state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x100 mode transport "
        "aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128 && ip xfrm state list"
    )
    assert result.exit_code == 0, result.output
    assert "spi 0x00000100" in result.output and "rfc4106(gcm(aes))" in result.output
    guest.run("ip xfrm state flush", check=True)


def test_writable_share_carries_files_out_of_the_guest(toolchain, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = VmConfig(
        command="echo written-in-guest > /mnt/out/result.txt && ls /mnt/out",
        shares=(ShareDir(out, "out", readonly=False),),
        timeout_s=300,
        log_dir=tmp_path / "logs",
    )
    result = run_vm(cfg, toolchain)
    assert result.exit_code == 0, result.output
    assert (out / "result.txt").read_text() == "written-in-guest\n"
