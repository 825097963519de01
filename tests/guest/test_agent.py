"""The guest agent (guest_tools/agent.py): CLI command lines forwarded over its UNIX socket run in one
process that holds the card, so what one client adds the next one sees; exit status, stdout and stderr come
back; other users are refused; stop releases the card. Runs the real driver against the device model."""

from __future__ import annotations

import contextlib
import os
import stat
import threading

import pytest

from guest_tools import agent, cli

from .harness import Harness, missing_device_piece

pytestmark = pytest.mark.skipif(bool(missing_device_piece()), reason=missing_device_piece() or "ok")

SA_FILE = """sas:
  - {spi: 0x1001, direction: outbound, src: 10.0.0.1, dst: 10.0.0.2,
     aead: {alg: aes-gcm-128, key: 000102030405060708090a0b0c0d0e0f, salt: cafebabe}}
  - {spi: 0x1001, direction: inbound, src: 10.0.0.1, dst: 10.0.0.2,
     aead: {alg: aes-gcm-128, key: 000102030405060708090a0b0c0d0e0f, salt: cafebabe}}
"""


@pytest.fixture()
def served(tmp_path):
    h = Harness()
    opened = []

    def opener(a, reset):
        card = h.card().init(reset=reset)
        opened.append(card)
        return card

    a = agent.Agent(cli.Session(opener), tmp_path / "card.sock", cli.run_one)
    server = a.listen()
    thread = threading.Thread(target=a.serve, args=(server,), daemon=True)
    thread.start()
    yield a, h, opened
    if thread.is_alive():
        with contextlib.suppress(OSError):  # a test that stopped the agent may race its thread's exit
            agent.request(a.path, control="stop", timeout=10)
        thread.join(10)
    assert not thread.is_alive(), "the agent did not stop"


def test_commands_from_separate_clients_share_one_card(served, tmp_path):
    a, h, opened = served
    assert stat.S_IMODE(os.stat(a.path).st_mode) == 0o600
    sa_file = tmp_path / "sas.yaml"
    sa_file.write_text(SA_FILE)
    added = agent.request(a.path, ["sa", "add", "--sa", str(sa_file)], timeout=30)
    assert added["status"] == 0 and added["stdout"].count("spi 0x1001") == 2, added
    out_handle = added["stdout"].split()[0]
    listed = agent.request(a.path, ["sa", "list"], timeout=30)
    assert listed["status"] == 0 and "2 SA(s)" in listed["stdout"]
    sent = agent.request(a.path, ["send", "--count", "2", "--src", "10.0.0.1", "--dst", "10.0.0.2", "--sa",
                                  out_handle], timeout=30)
    assert sent["status"] == 0 and "OK=2" in sent["stdout"] and len(h.wire.sent) == 2
    assert len(opened) == 1  # the card was opened once for all clients


def test_errors_and_stdin_are_forwarded(served, tmp_path):
    a, _, _ = served
    bad = agent.request(a.path, ["sa", "del"], timeout=30)
    assert bad["status"] == cli.EXIT_USAGE and "sa del needs HANDLE" in bad["stderr"] and bad["stdout"] == ""
    unknown = agent.request(a.path, ["sa", "del", "0x80000999"], timeout=30)
    assert unknown["status"] == cli.EXIT_ERROR and unknown["stderr"].startswith("error:")
    session = agent.request(a.path, ["session"], stdin="caps\nsa list\n", timeout=30)
    assert session["status"] == 0 and "0 SA(s)" in session["stdout"] and "# line 2: exit 0" in session["stdout"]
    assert "holds the card" in agent.request(a.path, control="status", timeout=10)["stdout"]


def test_other_users_are_refused(served, monkeypatch):
    a, _, opened = served
    monkeypatch.setattr(agent.os, "geteuid", lambda: os.getuid() + 1)
    answer = agent.request(a.path, ["sa", "list"], timeout=30)
    assert answer["status"] == 1 and "refuses uid" in answer["stderr"] and not opened


def test_stop_releases_the_card(served):
    a, _, opened = served
    agent.request(a.path, ["caps"], timeout=30)
    closed = []
    opened[0].close = lambda: closed.append(True)
    answer = agent.request(a.path, control="stop", timeout=10)
    assert answer["status"] == 0 and "every SA is gone" in answer["stdout"]
    for _ in range(100):
        if closed and not a.path.exists():
            break
        threading.Event().wait(0.05)
    assert closed and not a.path.exists()
