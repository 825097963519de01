"""Issue 11, secrets: `sa add` keys can come from a file or stdin instead of argv (where `ps` and shell
history see them), and keys on argv draw a warning. Error messages never quote key material."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from guest_tools import cli

REPO = Path(__file__).resolve().parents[2]
KEY = bytes(range(32)).hex()
BASE = ["sa", "add", "--spi", "0x1001", "--dir", "out", "--src", "10.0.0.1", "--dst", "10.0.0.2", "--esn"]
AEAD = f"aes-gcm-256:{KEY}:20212223:12"


def _params(*argv: str):
    return cli.params_from_args(cli.build_parser().parse_args([*BASE, *argv]))


def test_key_file_gives_the_same_sa_as_flags(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# SA 0x1001\naead {AEAD}\n")
    assert _params("--key-file", str(f)) == _params("--aead", AEAD)
    f.write_text(f"cipher aes-cbc-128:{'00' * 16}\nintegrity hmac-sha256-128:{KEY}\n")
    assert _params("--key-file", str(f)) == _params("--cipher", f"aes-cbc-128:{'00' * 16}",
                                                    "--integrity", f"hmac-sha256-128:{KEY}")


def test_key_file_from_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"aead {AEAD}\n"))
    assert _params("--key-file", "-") == _params("--aead", AEAD)


@pytest.mark.parametrize("text, match", [
    (f"aead {AEAD}\naead {AEAD}\n", r"keys:2: aead given twice"),
    (f"aed {AEAD}\n", r"keys:1: expected 'aead\|cipher\|integrity SPEC'"),
    ("# nothing\n", "no aead, cipher or integrity line"),
    (f"aead aes-gcm-256:{'zz' * 32}:20212223\n", "not hex"),
])
def test_key_file_errors_name_the_line_not_the_key(tmp_path, text, match):
    f = tmp_path / "keys"
    f.write_text(text)
    with pytest.raises(cli.UsageError, match=match) as exc:
        _params("--key-file", str(f))
    assert KEY not in str(exc.value) and "zzzz" not in str(exc.value)


def test_key_file_and_key_flags_together_are_refused(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"aead {AEAD}\n")
    with pytest.raises(cli.UsageError, match="not both"):
        _params("--key-file", str(f), "--aead", AEAD)


class _Card:
    def add_sa(self, params, offload, v1):
        return 0x42

    def close(self):
        pass


def test_keys_on_argv_draw_a_warning_and_key_files_do_not(tmp_path, capsys):
    assert cli.main([*BASE, "--aead", AEAD], opener=lambda a, r: _Card()) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "warning: key material on the command line" in err and KEY not in err
    f = tmp_path / "keys"
    f.write_text(f"aead {AEAD}\n")
    assert cli.main([*BASE, "--key-file", str(f)], opener=lambda a, r: _Card()) == cli.EXIT_OK
    assert "warning" not in capsys.readouterr().err


def test_the_guest_command_warns_before_touching_the_card(tmp_path):
    # On the host there is no card: the command fails after the warning (or stays quiet with a key file).
    run = lambda *argv, stdin="": subprocess.run(  # noqa: E731
        [sys.executable, "-m", "guest_tools.cli", "--state", str(tmp_path / "state.json"), *BASE, *argv],
        input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO)
    res = run("--aead", AEAD)
    assert "warning: key material on the command line" in res.stderr
    res = run("--key-file", "-", stdin=f"aead {AEAD}\n")
    assert "warning" not in res.stderr and "Traceback" not in res.stderr
