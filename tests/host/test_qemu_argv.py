"""Pure parts of the VM toolchain and launcher: QEMU argv, kernel command line, apt sources, markers."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qemu import launch, toolchain
from qemu.launch import ShareDir, VfioUserCard, VmConfig, VmRunPaths

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tc(tmp_path: Path) -> toolchain.Toolchain:
    root = tmp_path / "root"
    qemu_argv, qemu_env = toolchain.tree_qemu(root)
    return toolchain.Toolchain(
        cache_dir=tmp_path,
        root=root,
        kernel=root / "boot/vmlinuz-6.12.0-amd64",
        initrd=None,
        qemu_argv=qemu_argv,
        qemu_env=qemu_env,
        qemu_version=(11, 1, 3),
        qemu_source="test",
        virtiofsd_argv=toolchain.tree_runner(root, toolchain.VIRTIOFSD_BIN),
    )


@pytest.fixture
def paths(tmp_path: Path) -> VmRunPaths:
    return VmRunPaths(tmp_path / "sock", tmp_path / "log", "abc123")


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def cmdline_params(argv: list[str]) -> dict[str, str]:
    (append,) = option_values(argv, "-append")
    return dict(word.partition("=")[::2] for word in append.split())


def test_guest_ram_is_a_shared_memfd_backing_the_numa_node(tc, paths):
    argv = launch.qemu_argv(VmConfig(memory_mib=768), tc, paths)
    assert "memory-backend-memfd,id=mem,size=768M,share=on" in option_values(argv, "-object")
    assert option_values(argv, "-numa") == ["node,memdev=mem"]
    assert option_values(argv, "-m") == ["768M"]


def test_tcg_uses_cpu_max_and_kvm_cpu_host(tc, paths):
    tcg = launch.qemu_argv(VmConfig(), tc, paths, accel="tcg")
    assert option_values(tcg, "-machine") == ["q35,accel=tcg"]
    assert option_values(tcg, "-cpu") == ["max"]
    kvm = launch.qemu_argv(VmConfig(), tc, paths, accel="kvm")
    assert option_values(kvm, "-machine") == ["q35,accel=kvm"]
    assert option_values(kvm, "-cpu") == ["host"]
    with pytest.raises(ValueError, match="accel"):
        launch.qemu_argv(VmConfig(), tc, paths, accel="auto")


def test_argv_starts_with_the_tree_loader_and_boots_the_tree_kernel_from_virtiofs(tc, paths):
    argv = launch.qemu_argv(VmConfig(), tc, paths)
    assert argv[0] == str(tc.root / "usr/lib64/ld-linux-x86-64.so.2")
    assert argv[3] == str(tc.root / "usr/bin/qemu-system-x86_64")
    assert str(tc.root / "usr/share/seabios") in option_values(argv, "-L")
    assert option_values(argv, "-kernel") == [str(tc.kernel)]
    assert "-initrd" not in argv
    assert "-no-reboot" in argv
    params = cmdline_params(argv)
    assert params["root"] == launch.ROOT_TAG
    assert params["rootfstype"] == "virtiofs"
    assert "ro" in params
    assert params["init"] == toolchain.STAGE0_PATH
    assert params["ipsec_nic.nonce"] == "abc123"
    # The root tag and the project tag each have a vhost-user-fs device bound to their own socket.
    devices = option_values(argv, "-device")
    assert "vhost-user-fs-pci,chardev=fs0,tag=root" in devices
    assert "vhost-user-fs-pci,chardev=fs1,tag=ipsec-nic" in devices
    chardevs = option_values(argv, "-chardev")
    assert f"socket,id=fs0,path={paths.virtiofs_socket(0)}" in chardevs
    assert any(c.startswith("stdio,id=console") and f"logfile={paths.serial_log}" in c for c in chardevs)


def test_command_travels_base64_on_the_kernel_command_line(tc, paths):
    command = "python3 -c 'print(\"a b\")' && echo done"
    params = cmdline_params(launch.qemu_argv(VmConfig(command=command), tc, paths))
    assert base64.b64decode(params["ipsec_nic.cmd"]).decode() == command
    assert "ipsec_nic.agent" not in params


def test_too_long_command_is_refused_not_truncated(tc, paths):
    with pytest.raises(launch.CommandTooLong, match="too long.*--script FILE"):
        launch.qemu_argv(VmConfig(command="x" * 2000), tc, paths)
    longest = "x" * (launch.MAX_INLINE_COMMAND_BYTES * 3 // 4)
    assert base64.b64decode(cmdline_params(launch.qemu_argv(VmConfig(command=longest), tc, paths))
                            ["ipsec_nic.cmd"]).decode() == longest
    with pytest.raises(launch.CommandTooLong):
        launch.check_inline_command(longest + "x")


def test_run_vm_refuses_a_long_command_before_starting_anything(tc, tmp_path):
    with pytest.raises(launch.CommandTooLong):
        launch.run_vm(VmConfig(command="x" * 2000, log_dir=tmp_path / "logs"), tc)
    assert not (tmp_path / "logs").exists()


def test_agent_mode_adds_a_second_serial_port_and_no_command(tc, paths):
    argv = launch.qemu_argv(VmConfig(command="ignored"), tc, paths, agent=True)
    assert option_values(argv, "-serial") == ["chardev:console", "chardev:agent"]
    assert f"socket,id=agent,path={paths.agent_socket},server=on,wait=off" in option_values(argv, "-chardev")
    params = cmdline_params(argv)
    assert params["ipsec_nic.agent"] == "/dev/ttyS1"
    assert "ipsec_nic.cmd" not in params


def test_vfio_user_cards_are_json_devices_after_the_iommu(tc, paths):
    cfg = VmConfig(
        intel_iommu=True,
        cards=(
            VfioUserCard(Path("/tmp/card0.sock")),
            VfioUserCard(Path("/tmp/card1.sock"), msg_timeout_ms=20000, properties=(("addr", "0x6"),)),
        ),
    )
    argv = launch.qemu_argv(cfg, tc, paths)
    devices = option_values(argv, "-device")
    cards = [json.loads(d) for d in devices if d.startswith("{")]
    assert cards == [
        {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": "/tmp/card0.sock"}},
        {
            "driver": "vfio-user-pci",
            "socket": {"type": "unix", "path": "/tmp/card1.sock"},
            "x-msg-timeout": 20000,
            "addr": "0x6",
        },
    ]
    iommu_index = devices.index("intel-iommu,caching-mode=on")
    assert all(iommu_index < devices.index(d) for d in devices if d.startswith("{"))
    assert cmdline_params(argv)["intel_iommu"] == "on"


def test_extra_args_are_appended_and_virtio_net_gets_its_module(tc, paths):
    extra = (
        "-netdev",
        "dgram,id=n0,local.type=unix,local.path=/tmp/a,remote.type=unix,remote.path=/tmp/b",
        "-device",
        "virtio-net-pci,netdev=n0",
    )
    argv = launch.qemu_argv(VmConfig(extra_args=extra, modules=("esp4",)), tc, paths)
    assert argv[-4:] == list(extra)
    assert cmdline_params(argv)["ipsec_nic.modules"] == "virtio_net,esp4"
    assert "ipsec_nic.modules" not in cmdline_params(launch.qemu_argv(VmConfig(), tc, paths))


def test_extra_shares_get_their_own_tag_and_mount_name(tc, paths, tmp_path):
    cfg = VmConfig(shares=(ShareDir(tmp_path, "out", readonly=False),))
    argv = launch.qemu_argv(cfg, tc, paths)
    assert "vhost-user-fs-pci,chardev=fs2,tag=share-out" in option_values(argv, "-device")
    assert cmdline_params(argv)["ipsec_nic.shares"] == "share-out:out"
    with pytest.raises(ValueError, match="share name"):
        launch.qemu_argv(VmConfig(shares=(ShareDir(tmp_path, "a/b"),)), tc, paths)
    with pytest.raises(ValueError, match="share name"):
        launch.qemu_argv(VmConfig(shares=(ShareDir(tmp_path, "x"), ShareDir(tmp_path, "x"))), tc, paths)


def test_virtiofsd_argv_is_read_only_with_page_cache_for_the_tree(tc, paths):
    root_share, project_share = launch._shares(VmConfig(), tc)
    root_argv = launch.virtiofsd_argv(tc, root_share, paths.virtiofs_socket(0))
    assert root_argv[: len(tc.virtiofsd_argv)] == list(tc.virtiofsd_argv)
    assert {"--readonly", "--cache=always", "--sandbox=none", f"--shared-dir={tc.root}"} <= set(root_argv)
    project_argv = launch.virtiofsd_argv(tc, project_share, paths.virtiofs_socket(1))
    assert "--cache=auto" in project_argv
    assert f"--shared-dir={launch.PROJECT_DIR}" in project_argv


# --- toolchain helpers ------------------------------------------------------------------------------

HOST_DEB822 = """Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
"""


def test_mirror_comes_from_the_hosts_deb822_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("IPSEC_NIC_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/nodesource.sources").write_text(
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n"
    )
    (tmp_path / "sources.list.d/debian.sources").write_text(HOST_DEB822)
    assert toolchain.find_debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("IPSEC_NIC_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://ftp.example/debian bookworm main\n"
    )
    assert toolchain.find_debian_mirror(tmp_path) == "http://ftp.example/debian"
    monkeypatch.setenv("IPSEC_NIC_DEBIAN_MIRROR", "http://other.example/debian/")
    assert toolchain.find_debian_mirror(tmp_path) == "http://other.example/debian"


def test_no_mirror_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("IPSEC_NIC_DEBIAN_MIRROR", raising=False)
    with pytest.raises(toolchain.ToolchainError, match="IPSEC_NIC_DEBIAN_MIRROR"):
        toolchain.find_debian_mirror(tmp_path)


def test_qemu_version_parsing():
    text = "QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)\nCopyright (c) 2003-2025"
    assert toolchain.parse_qemu_version(text) == (11, 1, 3)
    assert toolchain.parse_qemu_version("QEMU emulator version 10.1") == (10, 1, 0)
    with pytest.raises(toolchain.ToolchainError):
        toolchain.parse_qemu_version("bash: qemu: not found")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IPSEC_NIC_CACHE", str(tmp_path / "c"))
    assert toolchain.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IPSEC_NIC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert toolchain.cache_dir() == tmp_path / "x/ipsec-nic"


def test_load_refuses_a_tree_from_another_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("IPSEC_NIC_CACHE", str(tmp_path))
    (tmp_path / "trixie-root").mkdir()
    (tmp_path / "trixie-root.ready").write_text(json.dumps({"recipe": "0" * 16, "qemu_version": [11, 1, 3]}))
    assert toolchain.load() is None


def test_stage0_and_guest_init_are_valid_shell():
    subprocess.run(["sh", "-n", "-c", toolchain.STAGE0_SCRIPT], check=True)
    subprocess.run(["sh", "-n", str(REPO / "qemu/guest_init.sh")], check=True)
    subprocess.run(["sh", "-n", str(REPO / "qemu/guest_testbed.sh")], check=True)


# --- console markers and the guest agent ---------------------------------------------------------


def feed_console(text: bytes, nonce: str = "n0nce") -> launch._Console:
    read_fd, write_fd = os.pipe()
    seen: list[str] = []
    with open(read_fd, "rb", buffering=0) as stream:
        console = launch._Console(stream, nonce, seen.append)
        os.write(write_fd, text)
        os.close(write_fd)
        assert console.closed.wait(5)
    console.seen = seen  # type: ignore[attr-defined]
    return console


def test_console_takes_output_between_this_runs_markers_only():
    console = feed_console(
        b"[    1.0] kernel line\r\n"
        b"@@ipsec-nic-begin other@@\r\n"  # a different run's nonce: not a marker
        b"@@ipsec-nic-begin n0nce@@\r\n"
        b"hello\r\n"
        b"@@ipsec-nic-exit other 0@@\r\n"
        b"partial@@ipsec-nic-exit n0nce 42@@\r\n"
        b"[    2.0] reboot: Power down\r\n"
    )
    assert console.exit_code == 42
    assert console.command_output == ["hello", "@@ipsec-nic-exit other 0@@", "partial"]
    assert console.begin_time is not None
    assert console.seen[0] == "[    1.0] kernel line"
    assert console.lines[-1] == "[    2.0] reboot: Power down"


def test_console_streams_the_commands_lines_apart_from_the_boot_chatter():
    read_fd, write_fd = os.pipe()
    other: list[str] = []
    command: list[str] = []
    with open(read_fd, "rb", buffering=0) as stream:
        console = launch._Console(stream, "n0nce", other.append, command.append)
        os.write(write_fd, b"[ 1.0] boot\n@@ipsec-nic-begin n0nce@@\none\ntwo\n@@ipsec-nic-exit n0nce 3@@\n[ 2.0] off\n")
        os.close(write_fd)
        assert console.closed.wait(5)
    assert command == ["one", "two"]
    assert other == ["[ 1.0] boot", "[ 2.0] off"]
    assert console.command_output == ["one", "two"] and console.exit_code == 3


def test_console_without_exit_marker_has_no_exit_code():
    console = feed_console(b"@@ipsec-nic-begin n0nce@@\nKernel panic\n")
    assert console.exit_code is None
    assert console.finished.is_set()


def run_agent(requests: list[bytes]) -> list[dict]:
    """Drive qemu/guest_agent.py (host python, a pty instead of a serial port)."""
    import pty

    controller, device = pty.openpty()
    device_path = os.ttyname(device)
    agent = subprocess.Popen([sys.executable, str(REPO / "qemu/guest_agent.py"), device_path, "nn"])
    replies: list[dict] = []
    buffer = b""

    def read_replies(count: int) -> None:
        nonlocal buffer
        while len(replies) < count:
            while b"\n" not in buffer:
                buffer += os.read(controller, 65536)
            line, buffer = buffer.split(b"\n", 1)
            replies.append(json.loads(line))

    try:
        read_replies(1)
        for request in requests:
            os.write(controller, request + b"\n")
        reader = threading.Thread(target=read_replies, args=(1 + len(requests),), daemon=True)
        reader.start()
        reader.join(30)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        os.close(controller)
        os.close(device)
    return replies


def test_guest_agent_runs_commands_and_survives_bad_requests():
    replies = run_agent(
        [
            b"not json",
            json.dumps({"id": 1, "cmd": "echo out; echo err >&2; exit 5", "timeout": 20}).encode(),
            json.dumps({"id": 2, "cmd": 17}).encode(),
            json.dumps({"id": 3, "cmd": "sleep 20", "timeout": 0.5}).encode(),
            json.dumps({"id": 4, "op": "exit"}).encode(),
        ]
    )
    assert replies[0] == {"event": "ready", "nonce": "nn"}
    assert replies[1]["id"] is None and "bad request" in replies[1]["error"]
    assert replies[2]["id"] == 1 and replies[2]["exit_code"] == 5
    assert base64.b64decode(replies[2]["output"]).decode().splitlines() == ["out", "err"]
    assert replies[3]["id"] == 2 and "error" in replies[3]
    assert replies[4]["id"] == 3 and replies[4]["timed_out"] is True and replies[4]["seconds"] < 10
    assert replies[5]["id"] == 4 and replies[5]["exit_code"] == 0


def test_guest_agent_passes_shell_quoting_through():
    # The agent gets the shell string as JSON, so quoting survives untouched.
    command = "printf '%s\\n' \"a b\" 'c'"
    replies = run_agent(
        [
            json.dumps({"id": 1, "cmd": command, "timeout": 20}).encode(),
            json.dumps({"id": 2, "op": "exit"}).encode(),
        ]
    )
    assert base64.b64decode(replies[1]["output"]).decode().splitlines() == shlex.split("'a b' c")


def test_build_progress_lines_name_the_package_being_handled():
    get = "Get:12 http://mirror.example/debian trixie/main amd64 libfoo1 amd64 1.2-3 [12.3 kB]"
    assert toolchain._activity(get) == "downloading libfoo1"
    assert toolchain._activity("Unpacking iproute2 (6.15.0-1) ...") == "unpacking iproute2"
    assert toolchain._activity("Setting up python3 (3.13.5-1) ...") == "setting up python3"
    assert toolchain._activity("I: Retrieving Packages") == "retrieving Packages"
    assert toolchain._activity("Processing triggers for man-db") is None
