"""ipsec_nic.runner.CardServer: the card server child process never outlives an interrupted start."""

from __future__ import annotations

import time
import types

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
