"""The Linux XFRM peer's command generation and output parsing (guest_tools/xfrm_peer.py), and the pure
parts of the guest scenario runner (guest_tools/scenario.py).

Independent checks: generated commands are fed to the host's real iproute2 in a throw-away network
namespace (when root), sample `ip -s xfrm state` output was captured from the guest's iproute2 6.15,
frames are built with scapy, and the SA documents go through the firmware's own SA-file parser.
"""

from __future__ import annotations

import ctypes
import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.sa import SaParams, UdpEncap
from device.contract.sa_file import parse_sa_document
from guest_tools import scenario, xfrm_peer
from guest_tools.scenario import Spec
from guest_tools.xfrm_peer import (
    FLUSH_COMMANDS,
    PeerConfigError,
    batch_text,
    netns_setup,
    parse_state_stats,
    parse_xfrm_stat,
    peer_commands,
    policy_add,
    state_add,
)

KEY = bytes(range(16))
SALT = bytes.fromhex("cafebabe")
HMAC_KEY = bytes(range(32, 64))


def gcm_sa(direction=Direction.OUTBOUND, **kw) -> SaParams:
    base = dict(spi=0x1001, proto=IpProto.ESP, direction=direction, mode=Mode.TRANSPORT, src="10.0.0.1",
                dst="10.0.0.2", enc_alg=EncAlg.AES_GCM_128, enc_key=KEY + SALT, icv_len=16)
    base.update(kw)
    return SaParams(**base)


def cbc_sa(**kw) -> SaParams:
    base = dict(spi=0x2002, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT, src="fd00::2",
                dst="fd00::1", enc_alg=EncAlg.AES_CBC_128, enc_key=KEY, auth_alg=AuthAlg.SHA256,
                auth_key=HMAC_KEY, icv_len=16)
    base.update(kw)
    return SaParams(**base)


# --- command generation ------------------------------------------------------------------------------


def test_gcm_state_carries_key_and_salt_as_one_rfc4106_blob():
    argv = state_add(gcm_sa(), reqid=3)
    assert argv[:3] == ["xfrm", "state", "add"]
    i = argv.index("aead")
    assert argv[i:i + 4] == ["aead", "rfc4106(gcm(aes))", "0x" + (KEY + SALT).hex(), "128"]
    assert argv[argv.index("spi") + 1] == "0x1001" and argv[argv.index("reqid") + 1] == "3"
    assert argv[argv.index("mode") + 1] == "transport"
    assert "encap" not in argv and "flag" not in argv


def test_cbc_hmac_state_uses_enc_and_auth_trunc_with_128_bit_icv():
    argv = state_add(cbc_sa(), reqid=1)
    i = argv.index("enc")
    assert argv[i:i + 3] == ["enc", "cbc(aes)", "0x" + KEY.hex()]
    j = argv.index("auth-trunc")
    assert argv[j:j + 4] == ["auth-trunc", "hmac(sha256)", "0x" + HMAC_KEY.hex(), "128"]


def test_esn_positions_mirror_the_card_counters():
    # The card sends from 0x1_fffffff0 (last used): the peer's receive window sits there.
    out = state_add(gcm_sa(esn=True, seq=0x1_FFFF_FFF0, replay_window=0), reqid=1)
    assert out[out.index("flag") + 1] == "esn"
    assert out[out.index("replay-seq") + 1] == "0xfffffff0" and out[out.index("replay-seq-hi") + 1] == "0x1"
    assert int(out[out.index("replay-window") + 1]) > 0  # iproute2 refuses ESN without a window
    assert "replay-oseq" not in out
    # The card receives from there: the peer's output counter starts there (first packet = seq + 1).
    inb = state_add(gcm_sa(Direction.INBOUND, esn=True, seq=0xFFFF_FFF0), reqid=2)
    assert inb[inb.index("replay-oseq") + 1] == "0xfffffff0" and inb[inb.index("replay-oseq-hi") + 1] == "0x0"
    assert "replay-seq" not in inb


def test_udp_encapsulation_per_family():
    v4 = state_add(gcm_sa(encap=UdpEncap(4500, 4500)), 1)
    assert v4[v4.index("encap"):] == ["encap", "espinudp", "4500", "4500", "0.0.0.0"]
    v6 = state_add(cbc_sa(encap=UdpEncap(4500, 4500)), 1)
    assert v6[v6.index("encap"):] == ["encap", "espinudp", "4500", "4500", "::"]


def test_policies_take_the_opposite_direction_and_the_inner_selector_in_tunnel_mode():
    assert policy_add(gcm_sa(), 7) == ["xfrm", "policy", "add", "src", "10.0.0.1/32", "dst", "10.0.0.2/32", "dir",
                                       "in", "tmpl", "src", "10.0.0.1", "dst", "10.0.0.2", "proto", "esp",
                                       "reqid", "7", "mode", "transport"]
    tun = cbc_sa(mode=Mode.TUNNEL, inner_src="fd02::1", inner_dst="fd01::1")
    argv = policy_add(tun, 2)
    assert argv[argv.index("dir") + 1] == "out"
    assert argv[3:7] == ["src", "fd02::1/128", "dst", "fd01::1/128"]
    assert argv[argv.index("tmpl"):] == ["tmpl", "src", "fd00::2", "dst", "fd00::1", "proto", "esp", "reqid", "2",
                                         "mode", "tunnel"]
    with pytest.raises(PeerConfigError, match="inner"):
        policy_add(cbc_sa(mode=Mode.TUNNEL), 1)


def test_unsupported_sas_are_refused_without_quoting_keys():
    with pytest.raises(PeerConfigError) as info:
        state_add(gcm_sa(proto=IpProto.AH, enc_alg=EncAlg.NONE, enc_key=b"", auth_alg=AuthAlg.SHA256,
                         auth_key=HMAC_KEY), 1)
    assert HMAC_KEY.hex() not in str(info.value)
    with pytest.raises(PeerConfigError, match="whitespace"):
        batch_text([["xfrm", "state", "add", "a b"]])


def test_batch_text_is_one_line_per_command():
    text = batch_text(FLUSH_COMMANDS + peer_commands([gcm_sa(), cbc_sa()]))
    lines = text.splitlines()
    assert lines[:2] == ["xfrm policy flush", "xfrm state flush"]
    assert len(lines) == 6 and text.endswith("\n")
    assert lines[2].startswith("xfrm state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x1001 reqid 1 ")
    assert lines[5].startswith("xfrm policy add src fd00::2/128 dst fd00::1/128 dir out ")


def test_netns_setup_moves_the_nic_and_pins_the_cards_neighbours():
    root, inside = netns_setup("eth0", "02:49:50:4e:43:00")
    assert root == [["netns", "add", "peer"], ["link", "set", "eth0", "netns", "peer"]]
    assert ["addr", "add", "fd00::2/64", "dev", "eth0", "nodad"] in inside
    assert ["neigh", "replace", "10.0.0.1", "lladdr", "02:49:50:4e:43:00", "dev", "eth0", "nud", "permanent"] in inside
    assert ["route", "add", "192.168.1.1/32", "via", "10.0.0.1", "dev", "eth0"] in inside


# --- the real iproute2 accepts what we generate (host, fresh network namespace) ----------------------------

# --- parsing what Linux prints -------------------------------------------------------------------------------

# `ip -s xfrm state` of the guest's iproute2 6.15 / Linux 6.12 after 32 ESN packets (test keys only).
STATE_SAMPLE = """\
src 10.0.0.2 dst 10.0.0.1
\tproto esp spi 0x00001001(4097) reqid 2(0x00000002) mode transport
\treplay-window 0 seq 0x00000000 flag  (0x00000000)
\tauth-trunc hmac(sha256) 0x000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f (256 bits) 128
\tenc cbc(aes) 0x000102030405060708090a0b0c0d0e0f (128 bits)
\tanti-replay esn context:
\t seq-hi 0x0, seq 0x0, oseq-hi 0x0, oseq 0x8
\t replay_window 64, bitmap-length 2
\t 00000000 00000000
\tsel src 0.0.0.0/0 dst 0.0.0.0/0 uid 0
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\t  limit: soft (INF)(packets), hard (INF)(packets)
\t  expire add: soft 0(sec), hard 0(sec)
\t  expire use: soft 0(sec), hard 0(sec)
\tlifetime current:
\t  1664(bytes), 8(packets)
\t  add 2026-11-22 00:47:50 use 2026-11-22 00:47:52
\tstats:
\t  replay-window 0 replay 0 failed 0
src 10.0.0.1 dst 10.0.0.2
\tproto esp spi 0x00001000(4096) reqid 1(0x00000001) mode transport
\treplay-window 0 seq 0x00000000 flag esn (0x10000000)
\taead rfc4106(gcm(aes)) 0x000102030405060708090a0b0c0d0e0f10111213 (160 bits) 128
\tanti-replay esn context:
\t seq-hi 0x1, seq 0x10, oseq-hi 0x0, oseq 0x0
\t replay_window 128, bitmap-length 4
\t 00000000 00000000 00000000 0000ffff
\tsel src 0.0.0.0/0 dst 0.0.0.0/0 uid 0
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\t  limit: soft (INF)(packets), hard (INF)(packets)
\t  expire add: soft 0(sec), hard 0(sec)
\t  expire use: soft 0(sec), hard 0(sec)
\tlifetime current:
\t  6656(bytes), 32(packets)
\t  add 2026-11-22 00:47:48 use 2026-11-22 00:47:52
\tstats:
\t  replay-window 2 replay 1 failed 3
"""


def test_state_counters_are_parsed_and_keys_are_not_kept():
    first, second = parse_state_stats(STATE_SAMPLE)
    assert (first.src, first.dst, first.spi, first.packets, first.bytes) == ("10.0.0.2", "10.0.0.1", 0x1001, 8, 1664)
    assert (first.oseq_hi, first.oseq) == (0, 8)
    assert (second.spi, second.packets, second.seq_hi, second.seq) == (0x1000, 32, 1, 0x10)
    assert (second.replay_window_errors, second.replay, second.integrity_failed) == (2, 1, 3)
    flat = repr([s.as_dict() for s in (first, second)])
    assert "0a0b0c0d0e0f" not in flat


def test_xfrm_stat_parsing_and_error_filter():
    text = "XfrmInError             \t0\nXfrmInStateProtoError   \t4\nXfrmInTmplMismatch      \t0\n"
    stats = parse_xfrm_stat(text)
    assert stats == {"XfrmInError": 0, "XfrmInStateProtoError": 4, "XfrmInTmplMismatch": 0}
    assert xfrm_peer.xfrm_errors(stats) == {"XfrmInStateProtoError": 4}


# --- scenario pure parts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["transport", "tunnel"])
@pytest.mark.parametrize("alg", sorted(scenario.ALGORITHMS))
def test_scenario_sa_documents_load_with_the_firmwares_sa_file_parser(family, mode, alg):
    spec = Spec(family=family, mode=mode, alg=alg, encap=True, esn=True, seq=0xFFFF_FFF0, spi_base=32)
    doc = scenario.fill_keys(scenario.sa_document(spec))
    out_sa, in_sa = parse_sa_document(doc)
    assert (out_sa.direction, in_sa.direction) == (Direction.OUTBOUND, Direction.INBOUND)
    assert (out_sa.spi, in_sa.spi) == (scenario.SPI_OUT + 32, scenario.SPI_IN + 32)
    assert (out_sa.src, out_sa.dst) == (in_sa.dst, in_sa.src)
    assert out_sa.family == family and out_sa.esn and out_sa.seq == 0xFFFF_FFF0 and out_sa.encap == UdpEncap()
    assert out_sa.enc_key != in_sa.enc_key  # fresh keys per SA
    if mode == "tunnel":
        assert (out_sa.inner_src, out_sa.inner_dst) == scenario.NET.addrs(family, tunnel=True)
    for argv in peer_commands([out_sa, in_sa]):
        assert all(word and not any(c.isspace() for c in word) for word in argv)


def test_payloads_are_deterministic_and_distinct():
    a = scenario.payload("x", "card-to-peer", 3, 200)
    assert a == scenario.payload("x", "card-to-peer", 3, 200) and len(a) == 200
    assert a != scenario.payload("x", "peer-to-card", 3, 200) != scenario.payload("x", "card-to-peer", 4, 200)
    assert scenario.expected_digest(Spec(name="x", count=2), "card-to-peer") == scenario.payload_digest(
        [scenario.payload("x", "card-to-peer", i, 200) for i in range(2)])


@pytest.mark.parametrize("ip", [IP(src="10.0.0.2", dst="10.0.0.1"), IPv6(src="fd00::2", dst="fd00::1")])
def test_udp_frames_are_parsed_like_scapy_builds_them(ip):
    frame = bytes(Ether() / ip / UDP(sport=4002, dport=5002) / b"hello world")
    dgram = scenario.parse_udp_frame(frame + b"\0" * 6)  # Ethernet padding must not count
    assert dgram == scenario.Datagram(ip.src, ip.dst, 4002, 5002, b"hello world")
    assert scenario.parse_udp_frame(frame[:30]) is None
    assert scenario.parse_udp_frame(bytes(Ether() / ip / b"raw")) is None


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown scenario keys: bogus"):
        Spec.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="family"):
        Spec.from_dict({"family": 5})
    spec = Spec.from_dict({"name": "n", "directions": ["peer-to-card"]})
    assert spec.directions == ("peer-to-card",)


class _Selector(ctypes.Structure):
    _fields_ = [("daddr", ctypes.c_uint8 * 16), ("saddr", ctypes.c_uint8 * 16), ("ports", ctypes.c_uint16 * 4),
                ("family", ctypes.c_uint16), ("prefixlen_d", ctypes.c_uint8), ("prefixlen_s", ctypes.c_uint8),
                ("proto", ctypes.c_uint8), ("ifindex", ctypes.c_int), ("user", ctypes.c_uint32)]


class _UserPolicyInfo(ctypes.Structure):  # linux/xfrm.h struct xfrm_userpolicy_info
    _fields_ = [("sel", _Selector), ("lft", ctypes.c_uint64 * 8), ("curlft", ctypes.c_uint64 * 4),
                ("priority", ctypes.c_uint32), ("index", ctypes.c_uint32), ("dir", ctypes.c_uint8),
                ("action", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("share", ctypes.c_uint8)]


@pytest.mark.parametrize("family", [4, 6])
def test_bypass_policy_matches_the_kernel_struct_layout(family):
    level, name, raw = scenario.bypass_policy(family, scenario.XFRM_POLICY_OUT)
    assert len(raw) == ctypes.sizeof(_UserPolicyInfo)
    info = _UserPolicyInfo.from_buffer_copy(raw)
    assert info.sel.family == (socket.AF_INET if family == 4 else socket.AF_INET6)
    assert (info.dir, info.action) == (1, 0) and info.lft[0] == info.lft[3] == (1 << 64) - 1
    assert (level, name) == ((socket.IPPROTO_IP, 17) if family == 4 else (socket.IPPROTO_IPV6, 35))
