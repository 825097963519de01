"""ipsec_nic.runner: the card server child process never outlives an interrupted start; `vm run` options and
the test bed's run.sh (run on the host), refused requests never boot anything."""

from __future__ import annotations

import os
import subprocess
import time
import types
from pathlib import Path

import pytest

from ipsec_nic import runner


def test_card_server_interrupted_while_starting_is_stopped(tmp_path, monkeypatch):
    profile = runner.write_profile(tmp_path / "card.yaml")
    card = runner.CardServer(tmp_path / "card.sock", profile, tmp_path / "card.log", verbose=0)

    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    # Ctrl-C while waiting for the socket (only the runner's view of the time module is replaced)
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=interrupted))
    try:
        with pytest.raises(KeyboardInterrupt), card:
            pytest.fail("start() should have been interrupted")
        assert card.process is not None
        assert card.process.poll() is not None, "the card server kept running after an interrupted start"
    finally:
        card.stop()


def test_serve_on_a_path_that_is_not_a_socket_fails_clearly(tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    assert runner.serve(str(target)) != 0
    err = capsys.readouterr().err
    assert "ipsec-nic serve: cannot serve on" in err and "not a socket" in err
    assert "Traceback" not in err
    assert target.read_text() == "keep me"


# --- `ipsec-nic vm run`: options, the test bed's run.sh, errors before anything boots -----------------


def _no_toolchain(*args, **kwargs):
    raise AssertionError("the toolchain must not be touched for a request refused up front")


@pytest.fixture
def no_boot(monkeypatch):
    from qemu import toolchain

    monkeypatch.setattr(toolchain, "setup", _no_toolchain)


def test_a_long_command_is_refused_with_a_pointer_to_script(no_boot, capsys):
    from ipsec_nic.cli import main

    status = main(["vm", "run", "--command", "echo " + "x" * 2000])
    err = capsys.readouterr().err
    assert status == 2
    assert "too long for the kernel command line" in err and "--script FILE" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--json", "--script", "{script}"], "--json formats the probe's report"),
    (["--json", "--kernel-driver"], "--json formats the probe's report"),
    (["--script", "{missing}"], "no such file"),
])
def test_vm_run_refuses_options_that_cannot_work(no_boot, capsys, tmp_path, argv, message):
    from ipsec_nic.cli import main

    script = tmp_path / "s.sh"
    script.write_text("true\n")
    argv = [a.format(script=script, missing=tmp_path / "nope.sh") for a in argv]
    assert main(["vm", "run", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_command_and_script_are_alternatives(capsys, tmp_path):
    from ipsec_nic.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["vm", "run", "--command", "true", "--script", str(tmp_path / "s.sh")])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_lists_every_script_variable(capsys):
    from ipsec_nic.cli import main
    from ipsec_nic.testbed import SCRIPT_VARIABLES

    with pytest.raises(SystemExit):
        main(["vm", "run", "--help"])
    out = capsys.readouterr().out
    for option in ("--script", "--kernel-driver", "--peer"):
        assert option in out
    for name in SCRIPT_VARIABLES:
        assert name in out


def _host_testbed(tmp_path, **fields):
    """A Testbed whose guest paths point into tmp_path, so its run.sh runs on the host (no driver,
    no peer: nothing in the set-up needs root or a VM)."""
    from ipsec_nic import testbed as tb

    share = tmp_path / "share"
    share.mkdir()
    paths = tb.GuestPaths(setup_script=str(Path(__file__).resolve().parents[2] / "qemu/guest_testbed.sh"),
                          env_file=str(tmp_path / "testbed.env"), run_share=str(share),
                          script_copy=str(tmp_path / "copy.sh"), workdir=str(tmp_path))
    return tb.Testbed(paths=paths, **fields), share


def test_run_sh_copies_the_script_and_returns_its_exit_status(tmp_path):
    from ipsec_nic import testbed as tb

    bed, share = _host_testbed(tmp_path)
    script = tmp_path / "user.sh"
    script.write_text('echo "dev=[$IPSEC_NIC_DEV] cwd=$(pwd)"\necho "arg-free $0"\nexit 7\n')
    run = tb.prepare_run_dir(share, bed, script, None)
    assert (share / tb.SCRIPT_FILE).read_bytes() == script.read_bytes()
    proc = subprocess.run(["sh", str(run)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.splitlines() == [f"dev=[] cwd={tmp_path}", f"arg-free {tmp_path / 'copy.sh'}"]
    assert (tmp_path / "copy.sh").read_bytes() == script.read_bytes()
    # Without a driver or a peer there is no address to give; the host reads the file the same way.
    from ipsec_nic.topology import parse_env_file

    assert parse_env_file((tmp_path / "testbed.env").read_text()) == {"IPSEC_NIC_DEV": ""}
    assert parse_env_file("export IPSEC_NIC_DEV='eth1'\nexport IPSEC_NIC_PEER_NS='peer'\njunk\n") == \
        {"IPSEC_NIC_DEV": "eth1", "IPSEC_NIC_PEER_NS": "peer"}


def test_run_sh_without_script_runs_the_command_and_keeps_its_quoting(tmp_path):
    from ipsec_nic import testbed as tb

    bed, share = _host_testbed(tmp_path)
    run = tb.prepare_run_dir(share, bed, None, "printf '%s|' \"a b\" 'c d'; echo")
    proc = subprocess.run(["sh", str(run)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, "a b|c d|\n")


def test_a_failed_set_up_never_runs_the_script(tmp_path):
    from ipsec_nic import testbed as tb

    # A driver that does not load: the set-up stops with its own status and message.
    bed, share = _host_testbed(tmp_path, load_command="echo loading >&2; false",
                               pci_id=(0xFFFE, 0xFFFE))
    script = tmp_path / "user.sh"
    script.write_text("echo SCRIPT RAN\n")
    proc = subprocess.run(["sh", str(tb.prepare_run_dir(share, bed, script, None))], capture_output=True, text=True)
    assert proc.returncode == tb.SETUP_FAILED
    assert "SCRIPT RAN" not in proc.stdout
    assert "ipsec-nic test bed: loading the kernel driver failed" in proc.stderr


def test_setup_command_quotes_the_load_command_and_names_the_card():
    import shlex

    from ipsec_nic import testbed as tb

    bed = tb.Testbed(peer=True, load_command="modprobe -a esp4_offload esp6_offload && insmod '/x y/a.ko'")
    words = shlex.split(bed.setup_command())
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("/"))
    assert env["TB_LOAD"] == bed.load_command
    assert env["TB_PCI"] == "ec5e:0001" and env["TB_PEER"] == "1"
    assert env["TB_CARD4"] == bed.net.card_v4 and env["TB_PEER6"] == bed.net.peer_v6
    assert words[-2:] == [bed.paths.setup_script, "setup"]
    with pytest.raises(ValueError):
        bed.setup_command("frobnicate")


def test_the_module_share_follows_kmod(tmp_path):
    assert runner.module_shares(None) == ()
    assert runner.module_shares(types.SimpleNamespace(share=None)) == ()
    (share,) = runner.module_shares(types.SimpleNamespace(share=tmp_path))
    assert share.host_path == tmp_path and share.readonly
