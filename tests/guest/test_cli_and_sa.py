"""CLI parsing, SA command encodings (decoded by the real firmware) and a CLI session on the harness."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from device.contract import sa as sa_codec
from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.ndis import Opcode
from device.contract.sa import SaParams, UdpEncap
from device.contract.status import NdisStatus
from firmware_model.capabilities import Capabilities
from firmware_model.firmware import Firmware
from guest_tools import cli
from guest_tools import sa as sa_wire

from .harness import Harness, missing_device_piece

GCM = SaParams(spi=0x1001, proto=IpProto.ESP, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT, src="10.0.0.1",
               dst="10.0.0.2", enc_alg=EncAlg.AES_GCM_256, enc_key=bytes(range(36)), icv_len=12, esn=True,
               seq=3 << 32)
CBC6 = SaParams(spi=0x2001, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TUNNEL, src="2001:db8::1",
                dst="2001:db8::2", enc_alg=EncAlg.AES_CBC_128, enc_key=bytes(16), auth_alg=AuthAlg.SHA256,
                auth_key=bytes(range(32)), icv_len=16, replay_window=0, encap=UdpEncap())
GMAC = SaParams(spi=0x3001, proto=IpProto.ESP, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT, src="10.0.0.1",
                dst="10.0.0.2", auth_alg=AuthAlg.AES_GMAC_128, auth_key=bytes(20), icv_len=16)
AH = SaParams(spi=0x4001, proto=IpProto.AH, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT, src="10.0.0.1",
              dst="10.0.0.2", auth_alg=AuthAlg.SHA1, auth_key=bytes(20), icv_len=12)


def _firmware_view(opcode, request) -> SaParams:
    fw = Firmware(Capabilities.from_profile(None))
    status, response = fw.execute(opcode, request)
    assert status == NdisStatus.SUCCESS, fw.last_error
    return fw.sadb.get(int.from_bytes(response[:4], "little")).params[0]


@pytest.mark.parametrize("p", [GCM, CBC6, GMAC, AH], ids=["gcm-esn", "cbc-v6-tunnel-udp", "gmac", "ah"])
def test_v2_add_sa_ex_decodes_to_the_same_sa(p):
    got = _firmware_view(Opcode.V2_ADD_SA_EX, sa_codec.v2_add_sa_ex(p))
    # crypto offload carries no replay window or low sequence half (NDIS: the host numbers packets)
    want = replace(p, replay_window=0, seq=p.seq & ~0xFFFF_FFFF if p.esn else 0)
    assert got == want
    assert got.enc_key == p.enc_key and got.auth_key == p.auth_key


def test_add_sa_packet_keeps_ports_window_and_selector():
    p = replace(CBC6, encap=UdpEncap(4501, 4502), replay_window=256, inner_src="2001:db8:9::1",
                inner_dst="2001:db8:9::2", seq=77)
    assert _firmware_view(Opcode.ADD_SA_PACKET, sa_codec.add_sa_packet(p)) == p


def test_v1_add_sa_decodes():
    p = replace(AH, replay_window=0)
    assert _firmware_view(Opcode.V1_ADD_SA, sa_codec.v1_add_sa(p)) == p
    with pytest.raises(ValueError, match="IPv4"):
        sa_codec.v1_add_sa(replace(CBC6, encap=None))


def test_crypto_offload_refuses_other_nat_ports():
    with pytest.raises(ValueError, match="4500"):
        sa_codec.v2_add_sa_ex(replace(CBC6, encap=UdpEncap(4500, 4600)))


def test_status_messages_name_what_to_check():
    assert "table full" in sa_wire.status_message(NdisStatus.RESOURCES)
    assert sa_wire.status_message(0x1234).startswith("0x00001234")


def _args(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_sa_add_flags_to_params():
    a = _args("sa", "add", "--spi", "0x1001", "--dir", "out", "--src", "10.0.0.1", "--dst", "10.0.0.2",
              "--aead", "aes-gcm-256:" + bytes(range(32)).hex() + ":20212223:12", "--esn", "--seq", str(3 << 32))
    assert cli.params_from_args(a) == GCM
    a = _args("sa", "add", "--spi", "0x2001", "--dir", "in", "--mode", "tunnel", "--src", "2001:db8::1",
              "--dst", "2001:db8::2", "--cipher", "aes-cbc-128:" + "00" * 16, "--integrity",
              "hmac-sha256-128:" + bytes(range(32)).hex(), "--encap", "udp:4500:4500", "--replay-window", "0")
    assert cli.params_from_args(a) == CBC6


@pytest.mark.parametrize("argv, match", [
    (["sa", "add", "--spi", "0x1001"], "--dir"),
    (["sa", "add", "--spi", "0x1001", "--dir", "out", "--src", "10.0.0.1", "--dst", "10.0.0.2",
      "--aead", "aes-gcm-128:zz:00010203"], "not hex"),
    (["sa", "add", "--spi", "0x1001", "--dir", "out", "--src", "10.0.0.1", "--dst", "10.0.0.2",
      "--aead", "aes-gcm-128:" + "00" * 15 + ":00010203"], "needs 20-byte"),
])
def test_sa_add_usage_errors(argv, match):
    with pytest.raises(cli.UsageError, match=match):
        cli.params_from_args(_args(*argv))


def test_bad_command_is_usage_exit_2(capsys):
    assert cli.main(["frobnicate"]) == cli.EXIT_USAGE
    assert cli.main(["sa", "del"], opener=lambda a, r: None) == cli.EXIT_USAGE


def test_build_frames_are_udp_with_card_mac():
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    a = _args("send", "--src", "2001:db8::1", "--dst", "2001:db8::2", "--count", "2", "--size", "100",
              "--dst-mac", "02:00:00:00:00:09")
    frames = cli.build_frames(b"\x02IPNC\x00", a)
    pkt = Ether(frames[1])
    assert pkt.src == "02:49:50:4e:43:00" and pkt.dst == "02:00:00:00:00:09"
    assert len(pkt[IPv6].payload.payload) == 100


@pytest.mark.skipif(bool(missing_device_piece()), reason=missing_device_piece() or "ok")
def test_session_script_on_the_harness(tmp_path):
    h = Harness()
    script = tmp_path / "s.txt"
    sa_file = tmp_path / "sa.yaml"
    sa_file.write_text("sas:\n  - spi: 0x1001\n    direction: outbound\n    src: 192.0.2.1\n    dst: 192.0.2.2\n"
                       "    aead: {alg: aes-gcm-128, key: '000102030405060708090a0b0c0d0e0f', salt: cafebabe}\n")
    script.write_text("# demo\nreset\nsa add --sa " + str(sa_file) + "\nsa list\n"
                      "send --src 192.0.2.1 --dst 192.0.2.2 --count 3 --sa 0x80000000\n"
                      "send --src 192.0.2.1 --dst 192.0.2.2 --sa 0x1234\nstats\nsa del --all\n")
    out = io.StringIO()
    session = cli.Session(opener=lambda a, reset: h.card().init(reset=reset), out=out)
    status = cli.run_one(session, ["session", str(script)])
    session.close()
    text = out.getvalue()
    assert "1 SA(s)" in text and "sent 3 frame(s)" in text and "OK=3" in text
    assert "# line 6: exit 1" in text  # unknown handle: a card error, the session goes on
    assert "deleted 1 SA bundle(s)" in text and status == cli.EXIT_ERROR
    assert len(h.wire.sent) == 3
