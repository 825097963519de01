"""Issue 11: bad input files give one clear line naming the file (and key), never a traceback, and nothing
is skipped silently. Unit level first, then the real commands (`ipsec-nic serve`, the guest CLI) as
processes."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from device.contract.sa_file import SaFileError, load_sa_file
from device.profile import ProfileError, load_profile
from guest_tools import cli

REPO = Path(__file__).resolve().parents[2]
NOT_UTF8 = b"sas:\n  - spi: 0x1001 \xff\xfe\n"
DEEP = ("sas: " + "[" * 20000 + "]" * 20000 + "\n").encode()  # ~40 kB: small, only the depth hurts


def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    f = tmp_path / name
    f.write_bytes(data if isinstance(data, bytes) else data.encode())
    return f


@pytest.mark.parametrize("data, problem", [(NOT_UTF8, "not UTF-8"), (DEEP, "nested too deeply")])
def test_sa_file_errors_name_the_file(tmp_path, data, problem):
    f = _write(tmp_path, "sas.yaml", data)
    with pytest.raises(SaFileError) as exc:
        load_sa_file(f)
    assert str(exc.value).startswith(f"{f}: ") and problem in str(exc.value)


@pytest.mark.parametrize("text, problem", [
    (b"nic:\n  mac: \"\xff\"\n", ": not UTF-8 text"),
    (DEEP.replace(b"sas", b"nic"), ": YAML nested too deeply"),
    ("wire:\n  type: loopback\n  mode: server\n", ": wire.mode: only a stream wire takes a mode"),
    ("wire:\n  type: stream\n  path: /tmp/w.sock\n  mode: bogus\n", ": wire.mode: 'bogus' is not one of server"),
    ("wire:\n  type: loopback\n  pcap: /nonexistent-dir/x.pcap\n", ": wire.pcap: cannot write /nonexistent-dir"),
    ("wire:\n  type: loopback\n  pcap: /tmp\n", ": wire.pcap: cannot write /tmp: it is a directory"),
])
def test_profile_errors_name_the_file_and_key(tmp_path, text, problem):
    f = _write(tmp_path, "card.yaml", text)
    with pytest.raises(ProfileError) as exc:
        load_profile(f)
    assert str(exc.value).startswith(f"{f}") and problem in str(exc.value)


def test_serve_with_a_bad_profile_says_so_in_one_line(tmp_path):
    f = _write(tmp_path, "card.yaml", DEEP.replace(b"sas", b"nic"))
    res = subprocess.run([sys.executable, "-m", "ipsec_nic.cli", "serve", "--socket", str(tmp_path / "s.sock"),
                          "--profile", str(f)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 2
    assert res.stderr.strip() == f"ipsec-nic serve: {f}: YAML nested too deeply"


SCRIPT = 'sa add --sa "unbalanced.yaml\nsa add --bogus\n'


def test_session_line_with_an_unbalanced_quote_is_reported_and_the_rest_runs(tmp_path, capsys):
    script = _write(tmp_path, "cmds.txt", SCRIPT)
    out = io.StringIO()
    session = cli.Session(opener=lambda *_a: pytest.fail("no card needed"), out=out)
    args = cli.build_parser().parse_args(["session", str(script)])
    assert session.run(args) == cli.EXIT_USAGE
    assert out.getvalue().splitlines() == ["# line 1: exit 2", "# line 2: exit 2"]
    err = capsys.readouterr().err
    assert f"{script}:1: No closing quotation" in err
    assert "unrecognized arguments: --bogus" in err  # line 2 ran


def test_session_process_survives_an_unbalanced_quote(tmp_path):
    script = _write(tmp_path, "cmds.txt", SCRIPT)
    res = subprocess.run([sys.executable, "-m", "guest_tools.cli", "session", str(script)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == cli.EXIT_USAGE
    assert "Traceback" not in res.stderr
    assert res.stdout.splitlines() == ["# line 1: exit 2", "# line 2: exit 2"]
