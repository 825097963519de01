"""`sa add` refuses what the offload mode cannot honour, adds several crypto-offload SAs as one V2_ADD_SA
list with a line per entry, takes lifetimes, and checks tunnel selectors on the host - the CLI driving
the real device model (tests/guest/harness.py)."""

from __future__ import annotations

import io

import pytest

from device.contract.enums import Direction
from guest_tools import cli
from guest_tools.admin_queue import AdminQueueOps

from .harness import Harness, missing_device_piece

pytestmark = pytest.mark.skipif(bool(missing_device_piece()), reason=missing_device_piece() or "ok")

GCM = "aes-gcm-128:000102030405060708090a0b0c0d0e0f:cafebabe"
CARD_MAC = "02:49:50:4e:43:00"


class Cli:
    def __init__(self, **profile) -> None:
        self.h = Harness(profile or None)
        self.card = None

    def run(self, *argv: str, capsys) -> tuple[int, str, str]:
        out = io.StringIO()

        def opener(a, reset):
            if self.card is None:
                self.card = self.h.card().init(reset=True)
            elif reset:
                self.card.init(reset=True)
            return self.card

        session = cli.Session(opener=opener, out=out)
        session.close = lambda: None  # the card stays open across "processes" (one harness)
        capsys.readouterr()
        status = cli.run_one(session, list(argv))
        return status, out.getvalue(), capsys.readouterr().err

    def sas(self, capsys) -> int:
        status, out, _ = self.run("sa", "list", capsys=capsys)
        assert status == 0
        return int(out.split()[0])


def _sa_flags(*extra: str, spi: str = "0x1001", direction: str = "in") -> list[str]:
    return ["sa", "add", "--spi", spi, "--dir", direction, "--src", "10.0.0.1", "--dst", "10.0.0.2",
            "--aead", GCM, *extra]


@pytest.mark.parametrize("extra, flag, why", [
    (["--replay-window", "128"], "--replay-window", "no anti-replay on the card"),
    (["--lifetime", "hard_packets=3"], "--lifetime", "no lifetime fields"),
    (["--seq", "5"], "--seq", "only the ESN high half"),
    (["--encap", "udp:4501:4500"], "--encap", "port 4500 only"),
])
def test_crypto_offload_refuses_flags_it_cannot_honour(capsys, extra, flag, why):
    c = Cli()
    status, _, err = c.run(*_sa_flags(*extra), capsys=capsys)
    assert status == cli.EXIT_USAGE and f"SA 0x1001: {flag}: crypto offload: " in err and why in err, err
    assert "0001020304" not in err
    assert c.sas(capsys) == 0


def test_v1_refuses_esn(capsys):
    c = Cli()
    status, _, err = c.run("sa", "add", "--spi", "0x1001", "--dir", "out", "--src", "10.0.0.1", "--dst", "10.0.0.2",
                           "--cipher", "3des-cbc:" + "00" * 24, "--integrity", "hmac-sha1-96:" + "11" * 20,
                           "--esn", "--v1", capsys=capsys)
    assert status == cli.EXIT_USAGE and "--esn: crypto offload (--v1): " in err, err


def test_sa_file_refusal_names_file_entry_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("sas:\n"
                    "  - {spi: 0x1001, direction: outbound, src: 10.0.0.1, dst: 10.0.0.2,\n"
                    "     aead: {alg: aes-gcm-128, key: 000102030405060708090a0b0c0d0e0f, salt: cafebabe}}\n"
                    "  - {spi: 0x1001, direction: inbound, src: 10.0.0.1, dst: 10.0.0.2, replay_window: 64,\n"
                    "     aead: {alg: aes-gcm-128, key: 000102030405060708090a0b0c0d0e0f, salt: cafebabe}}\n")
    c = Cli()
    status, out, err = c.run("sa", "add", "--sa", str(path), capsys=capsys)
    assert status == cli.EXIT_USAGE and f"{path}: sas[1].replay_window: crypto offload: " in err, err
    assert out == "" and c.sas(capsys) == 0  # refused before anything reached the card
    status, out, err = c.run("sa", "add", "--sa", str(path), "--offload", "packet", capsys=capsys)
    assert status == 0 and out.count("packet") == 2, err


def test_several_crypto_sas_go_as_one_list_and_each_refusal_is_shown(tmp_path, capsys, monkeypatch):
    # entries 0 and 2 are fine; entry 1 repeats entry 0's inbound SPI and destination, which the card
    # refuses (RFC 4301 §4.1: SPI + destination identify an inbound SA) while the others stay added
    path = tmp_path / "three.yaml"
    entry = ("  - {{spi: {spi}, direction: inbound, src: 10.0.0.1, dst: 10.0.0.2,\n"
             "     aead: {{alg: aes-gcm-128, key: 000102030405060708090a0b0c0d0e0f, salt: cafebabe}}}}\n")
    path.write_text("sas:\n" + entry.format(spi="0x2001") + entry.format(spi="0x2001") + entry.format(spi="0x2002"))
    c = Cli()
    opcodes = []
    admin = AdminQueueOps.admin

    def spy(self, opcode, *rest, **kw):
        opcodes.append(opcode)
        return admin(self, opcode, *rest, **kw)

    monkeypatch.setattr(AdminQueueOps, "admin", spy)
    status, out, err = c.run("sa", "add", "--sa", str(path), capsys=capsys)
    lines = out.splitlines()
    assert status == cli.EXIT_ERROR and "1 of 3 SA(s) refused" in err, (out, err)
    assert lines[0].startswith("0x") and "spi 0x2001 inbound" in lines[0]
    assert lines[1].startswith("refused") and f"{path}: sas[1]" in lines[1] and "spi 0x2001" in lines[1]
    assert lines[1].endswith("): INVALID_PARAMETER: invalid parameter: unknown or stale SA handle, wrong "
                             "SPI/operation, or a field the card does not accept [DUPLICATE_SPI]"), lines[1]
    assert lines[2].startswith("0x") and "spi 0x2002" in lines[2]
    from device.contract.ndis import Opcode

    assert opcodes.count(Opcode.V2_ADD_SA) == 1 and Opcode.V2_ADD_SA_EX not in opcodes
    assert c.sas(capsys) == 2
    assert sorted(s.spi for s in c.card.host.sas.values()) == [0x2001, 0x2002]


def test_packet_offload_lifetime_from_the_cli(capsys):
    c = Cli()
    status, out, err = c.run(*_sa_flags("--offload", "packet", "--lifetime", "soft_packets=2,hard_packets=3",
                                        direction="out"), capsys=capsys)
    assert status == 0, err
    handle = int(out.split()[0], 16)
    status, out, _ = c.run("send", "--count", "5", "--src", "10.0.0.1", "--dst", "10.0.0.2", "--sa", hex(handle),
                           "--mode", "packet", capsys=capsys)
    assert status == cli.EXIT_ERROR and "OK=3" in out and "OFFLOAD_FAILED=2" in out, out
    assert len(c.h.wire.sent) == 3
    status, out, _ = c.run("sa", "list", capsys=capsys)
    assert "delete_requested" in out, out  # soft limit reached: SaDeleteReq raised


@pytest.mark.parametrize("text, message", [
    ("hard_packets", "expected KEY=N"), ("hard_minutes=3", "expected KEY=N"), ("hard_bytes=x", "not a number"),
    ("soft_bytes=1,soft_bytes=2", "given twice"),
])
def test_lifetime_flag_errors(text, message):
    with pytest.raises(cli.UsageError, match=message):
        cli.parse_lifetime(text)


def test_lifetime_flag_parses_every_limit():
    assert cli.parse_lifetime("soft_packets=1,hard_packets=2,soft_bytes=0x10,hard_bytes=32") == dict(
        soft_packets=1, hard_packets=2, soft_bytes=16, hard_bytes=32)


def test_tunnel_selector_is_checked_by_the_host_in_crypto_offload(capsys):
    c = Cli()
    status, out, err = c.run("sa", "add", "--spi", "0x1001", "--dir", "out", "--mode", "tunnel", "--src", "192.0.2.1",
                             "--dst", "192.0.2.2", "--inner-src", "10.0.0.1", "--inner-dst", "10.0.0.2",
                             "--aead", GCM, capsys=capsys)
    assert status == 0, err
    handle = out.split()[0]
    status, out, _ = c.run("send", "--src", "10.0.0.1", "--dst", "10.0.0.2", "--sa", handle, capsys=capsys)
    assert status == 0 and "OK=1" in out
    status, _, err = c.run("send", "--src", "10.0.0.9", "--dst", "10.0.0.2", "--sa", handle, capsys=capsys)
    assert status == cli.EXIT_ERROR and "inner source 10.0.0.9 is not the SA's selector 10.0.0.1" in err, err
    assert len(c.h.wire.sent) == 1
    assert c.card.host.get(int(handle, 16)).direction == Direction.OUTBOUND


AH_FILE = """\
sas:
  - {spi: 0x4001, direction: outbound, proto: ah, src: 10.0.0.1, dst: 10.0.0.2,
     integrity: {alg: hmac-sha256-128, key: 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f}}
  - {spi: 0x4001, direction: inbound, proto: ah, src: 10.0.0.1, dst: 10.0.0.2,
     integrity: {alg: hmac-sha256-128, key: 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f}}
  - {spi: 0x5001, direction: outbound, mode: tunnel, src: 10.1.0.1, dst: 10.2.0.1,
     tunnel: {src: 192.0.2.1, dst: 192.0.2.2},
     cipher: {alg: aes-cbc-128, key: 000102030405060708090a0b0c0d0e0f},
     integrity: {alg: hmac-sha1-96, key: 000102030405060708090a0b0c0d0e0f10111213},
     ah: {spi: 0x5002, integrity: {alg: hmac-sha1-96, key: 202122232425262728292a2b2c2d2e2f30313233}}}
  - {spi: 0x5001, direction: inbound, mode: tunnel, src: 10.1.0.1, dst: 10.2.0.1,
     tunnel: {src: 192.0.2.1, dst: 192.0.2.2},
     cipher: {alg: aes-cbc-128, key: 000102030405060708090a0b0c0d0e0f},
     integrity: {alg: hmac-sha1-96, key: 000102030405060708090a0b0c0d0e0f10111213},
     ah: {spi: 0x5002, integrity: {alg: hmac-sha1-96, key: 202122232425262728292a2b2c2d2e2f30313233}}}
"""


def test_ah_and_esp_then_ah_traffic_through_the_cli(tmp_path, capsys):
    import json

    from scapy.layers.inet import IP
    from scapy.layers.ipsec import AH
    from scapy.layers.l2 import Ether

    path = tmp_path / "ah.yaml"
    path.write_text(AH_FILE)
    c = Cli()
    status, out, err = c.run("sa", "add", "--sa", str(path), capsys=capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].endswith(" ah") and lines[2].endswith("esp+ah ah-spi 0x5002"), out
    ah_out, bundle_out = int(lines[0].split()[0], 16), int(lines[2].split()[0], 16)
    ah_in, bundle_in = int(lines[1].split()[0], 16), int(lines[3].split()[0], 16)
    for handle, src, dst, expect_in in ((ah_out, "10.0.0.1", "10.0.0.2", ah_in),
                                        (bundle_out, "10.1.0.1", "10.2.0.1", bundle_in)):
        c.h.wire.sent.clear()
        status, out, _ = c.run("send", "--count", "2", "--size", "40", "--src", src, "--dst", dst, "--dst-mac",
                               CARD_MAC, "--sa", hex(handle), capsys=capsys)
        assert status == 0 and "OK=2" in out, out
        wire = [Ether(f) for f in c.h.wire.sent]
        assert [p[AH].seq for p in wire] == [1, 2]
        if handle == bundle_out:  # outer header = tunnel endpoints, AH over ESP
            assert wire[0][IP].src == "192.0.2.1" and wire[0][AH].nh == 50
            assert bytes(wire[0][AH].payload)[:4] == (0x5001).to_bytes(4, "big")  # ESP SPI after AH
        for f in c.h.wire.sent:
            c.h.inject(f)  # loopback: the card verifies (and decrypts) its own output
        status, out, _ = c.run("recv", "--count", "2", "--json", capsys=capsys)
        got = [json.loads(line) for line in out.splitlines()]
        assert status == 0 and len(got) == 2
        for n, pkt in enumerate(got):
            assert pkt["crypto_status"] == "SUCCESS" and pkt["handle"] == expect_in and pkt["note"] == ""
            inner = Ether(bytes.fromhex(pkt["inner"]))
            assert (inner[IP].src, inner[IP].dst, inner[IP].proto) == (src, dst, 17)
            assert bytes(inner[IP].payload)[8:16] == n.to_bytes(8, "big")


def test_bundles_and_ah_are_refused_in_packet_offload(tmp_path, capsys):
    path = tmp_path / "ah.yaml"
    path.write_text(AH_FILE)
    status, _, err = Cli().run("sa", "add", "--sa", str(path), "--offload", "packet", capsys=capsys)
    assert status == cli.EXIT_USAGE and f"{path}: sas[0].proto: packet offload: " in err, err
    status, _, err = Cli().run("sa", "add", "--sa", str(path), "--index", "2", "--offload", "packet",
                               capsys=capsys)
    assert status == cli.EXIT_USAGE and f"{path}: sas[0].proto" in err  # the whole file is checked first


def test_add_result_names_the_reject_reason_when_the_card_gives_one():
    from device.contract.ndis import RejectReason
    from device.contract.sa_file import parse_sa_entries
    from guest_tools.sa_api import AddResult

    (entry,) = parse_sa_entries({"sas": [{"spi": 0x1001, "direction": "inbound", "src": "10.0.0.1",
                                          "dst": "10.0.0.2", "aead": {"alg": "aes-gcm-128", "key": "00" * 16,
                                                                      "salt": "cafebabe"}}]})
    assert AddResult(entry.params, 0, 0xC0000001, int(RejectReason.UNSUPPORTED_ALGORITHM)).reason_name == \
        "UNSUPPORTED_ALGORITHM"
    assert AddResult(entry.params, 0, 0xC0000001).reason_name == ""  # today's 8-byte result has no reason
    assert AddResult(entry.params, 0, 0xC0000001, 999).reason_name == "reason 999"


def _v1_inbound(*extra: str) -> list[str]:
    """An inbound v1 SA (NULL + HMAC-SHA1-96, what V1_ADD_SA carries) from 10.0.0.2 to the card."""
    return ["sa", "add", "--spi", "0x1101", "--dir", "in", "--src", "10.0.0.2", "--dst", "10.0.0.1",
            "--cipher", "null:", "--integrity", "hmac-sha1-96:" + "22" * 20, *extra]


def test_selector_flags_reach_the_v1_filter_and_decide_what_is_delivered(capsys):
    import json

    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP, SecurityAssociation
    from scapy.layers.l2 import Ether

    c = Cli()
    status, out, err = c.run(*_v1_inbound("--v1", "--sel-proto", "udp", "--sel-dport", "5001"), capsys=capsys)
    assert status == 0 and out.endswith(" spi 0x1101 inbound transport crypto selector udp sport any dport 5001\n"), out
    handle = int(out.split()[0], 16)
    flt = c.h.firmware.sadb.get(handle).rx_filter
    assert (flt.proto, flt.sport, flt.dport) == (17, 0, 5001)
    peer = SecurityAssociation(ESP, spi=0x1101, crypt_algo="NULL", auth_algo="HMAC-SHA1-96",
                               auth_key=bytes.fromhex("22" * 20))
    for seq, dport in ((1, 5001), (2, 5002)):
        c.h.inject(bytes(Ether(dst=CARD_MAC) / peer.encrypt(IP(src="10.0.0.2", dst="10.0.0.1") /
                                                            UDP(sport=4002, dport=dport), seq_num=seq)))
    status, out, _ = c.run("recv", "--count", "2", "--json", capsys=capsys)
    inside, outside = (json.loads(line) for line in out.splitlines())
    assert status == 0 and (inside["crypto_done"], inside["crypto_status"], inside["handle"]) == (True, "SUCCESS",
                                                                                                 handle)
    assert (outside["crypto_done"], outside["handle"]) == (False, 0)
    assert (inside["policy_mismatch"], outside["policy_mismatch"]) == (False, True)
    assert c.h.firmware.stats().rx_policy_unprocessed == 1
    c.h.inject(bytes(Ether(dst=CARD_MAC) / peer.encrypt(IP(src="10.0.0.2", dst="10.0.0.1") /
                                                        UDP(sport=4002, dport=5002), seq_num=3)))
    status, out, _ = c.run("recv", capsys=capsys)
    assert status == 0 and "crypto_done=0" in out and " policy_mismatch=1" in out, out


def test_host_counts_what_it_drops_for_a_v2_tunnel_selector_and_stats_shows_it(capsys):
    """v2 crypto offload has no selector on the card (datasheet §12.1 row 8): the guest driver checks the inner
    header after the card decrypted it, drops a spoofed inner source and counts it (RFC 4301 §5.2)."""
    import json

    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP, SecurityAssociation
    from scapy.layers.l2 import Ether

    c = Cli()
    status, out, err = c.run("sa", "add", "--spi", "0x1201", "--dir", "in", "--mode", "tunnel", "--src", "192.0.2.2",
                             "--dst", "192.0.2.1", "--inner-src", "10.0.0.2", "--inner-dst", "10.0.0.1",
                             "--aead", GCM, capsys=capsys)
    assert status == 0, err
    handle = int(out.split()[0], 16)
    peer = SecurityAssociation(ESP, spi=0x1201, crypt_algo="AES-GCM",
                               crypt_key=bytes.fromhex("000102030405060708090a0b0c0d0e0f" + "cafebabe"),
                               tunnel_header=IP(src="192.0.2.2", dst="192.0.2.1"))
    for seq, inner_src in ((1, "10.0.0.2"), (2, "10.0.0.9")):
        c.h.inject(bytes(Ether(dst=CARD_MAC) / peer.encrypt(IP(src=inner_src, dst="10.0.0.1") /
                                                            UDP(sport=4002, dport=5001) / (b"x" * 20), seq_num=seq)))
    status, out, _ = c.run("recv", "--count", "2", "--json", capsys=capsys)
    good, spoofed = (json.loads(line) for line in out.splitlines())
    # The card verified both (it has no selector to check); the host delivers one and drops the other.
    assert (good["crypto_status"], spoofed["crypto_status"]) == ("SUCCESS", "SUCCESS")
    assert good["handle"] == spoofed["handle"] == handle
    assert good["inner_length"] is not None and spoofed["inner_length"] is None
    assert spoofed["note"].startswith("dropped by the host: inner source 10.0.0.9"), spoofed
    assert c.card.host_policy_drops == 1
    status, out, _ = c.run("stats", capsys=capsys)
    assert status == 0 and "outside the SA's selector (RFC 4301 §5.2): 1" in out, out


@pytest.mark.parametrize("extra, message", [
    (["--sel-proto", "udp", "--sel-dport", "5001"],
     "SA 0x1101: --sel-proto/--sel-dport: crypto offload: V2_ADD_SA has no filter fields"),
    (["--v1", "--dir", "out", "--sel-proto", "tcp"], "SA 0x1101: --sel-proto: crypto offload (--v1): "),
    (["--v1", "--sel-dport", "5001"], "--sel-sport/--sel-dport need --sel-proto tcp or udp"),
    (["--v1", "--sel-proto", "sctp"], "--sel-proto: expected tcp, udp or a protocol number 1..255"),
    (["--v1", "--sel-proto", "udp", "--sel-sport", "65536"], "--sel-sport: 65536 is not a port"),
])
def test_selector_flags_are_refused_by_name(capsys, extra, message):
    c = Cli()
    status, _, err = c.run(*_v1_inbound(*extra), capsys=capsys)
    assert status == cli.EXIT_USAGE and message in err, err
    assert c.card is None or c.sas(capsys) == 0
