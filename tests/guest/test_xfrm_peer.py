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


def ah_sa(**kw) -> SaParams:
    base = dict(spi=0x3003, proto=IpProto.AH, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT, src="10.0.0.1",
                dst="10.0.0.2", auth_alg=AuthAlg.SHA1, auth_key=HMAC_KEY[:20], icv_len=12)
    base.update(kw)
    return SaParams(**base)


def test_unsupported_sas_are_refused_without_quoting_keys():
    gmac_key = bytes(range(100, 120))
    with pytest.raises(PeerConfigError, match="AH with AES_GMAC_128 has no Linux counterpart") as info:
        state_add(ah_sa(auth_alg=AuthAlg.AES_GMAC_128, auth_key=gmac_key, icv_len=16), 1)
    assert gmac_key.hex() not in str(info.value)
    with pytest.raises(PeerConfigError, match="AH carries no cipher"):
        state_add(ah_sa(enc_alg=EncAlg.AES_CBC_128, enc_key=KEY), 1)
    with pytest.raises(PeerConfigError, match="RFC 3948"):
        state_add(ah_sa(encap=UdpEncap()), 1)
    with pytest.raises(PeerConfigError, match="cannot follow a CBC cipher") as info:
        state_add(cbc_sa(auth_alg=AuthAlg.AES_GMAC_128, auth_key=gmac_key), 1)
    assert gmac_key.hex() not in str(info.value) and KEY.hex() not in str(info.value)
    with pytest.raises(PeerConfigError, match="whitespace"):
        batch_text([["xfrm", "state", "add", "a b"]])


@pytest.mark.parametrize(("alg", "name", "key_len", "icv"), [
    (AuthAlg.MD5, "hmac(md5)", 16, 12), (AuthAlg.SHA1, "hmac(sha1)", 20, 12), (AuthAlg.SHA256, "hmac(sha256)", 32, 16),
])
def test_ah_states_are_proto_ah_with_auth_trunc_only(alg, name, key_len, icv):
    key = HMAC_KEY[:key_len]
    argv = state_add(ah_sa(auth_alg=alg, auth_key=key, icv_len=icv, esn=True, seq=5), 4)
    assert argv[argv.index("proto") + 1] == "ah" and argv[argv.index("spi") + 1] == "0x3003"
    assert argv[argv.index("auth-trunc"):] == ["auth-trunc", name, "0x" + key.hex(), str(icv * 8)]
    assert "enc" not in argv and "aead" not in argv
    assert argv[argv.index("replay-seq") + 1] == "0x5" and argv[argv.index("flag") + 1:][:2] == ["esn", "align4"]
    policy = policy_add(ah_sa(), 4)
    assert policy[policy.index("tmpl"):] == ["tmpl", "src", "10.0.0.1", "dst", "10.0.0.2", "proto", "ah",
                                             "reqid", "4", "mode", "transport"]


def test_ipv4_ah_states_take_align4_as_the_card_pads_ah_to_32_bits():
    """RFC 4302 §3.3.3.2.1: IPv4 AH is a multiple of 32 bits; Linux's ah4 wants 64 unless XFRM_STATE_ALIGN4
    (an HMAC-SHA256-128 AH header is 28 bytes here, 32 in Linux's default)."""
    v4 = state_add(ah_sa(auth_alg=AuthAlg.SHA256, auth_key=HMAC_KEY[:32], icv_len=16), 1)
    assert v4[v4.index("flag") + 1] == "align4"
    v6 = state_add(ah_sa(src="fd00::1", dst="fd00::2"), 1)  # IPv6 AH is 64-bit aligned (RFC 4302 §2) as in Linux
    esp = state_add(SaParams(spi=0x3004, proto=IpProto.ESP, direction=Direction.OUTBOUND, mode=Mode.TRANSPORT,
                             src="10.0.0.1", dst="10.0.0.2", enc_alg=EncAlg.AES_GCM_128, enc_key=bytes(20),
                             icv_len=16), 1)
    assert "align4" not in v6 and "align4" not in esp


# Every (cipher, integrity) pair the card's SA file can name maps to the Linux crypto API name the
# kernel's xfrm_algo.c lists (tools/testing/selftests/net/ipsec.c uses the same names).
@pytest.mark.parametrize(("enc", "auth", "want"), [
    (EncAlg.AES_GCM_192, AuthAlg.NONE, ["aead", "rfc4106(gcm(aes))"]),
    (EncAlg.NONE, AuthAlg.AES_GMAC_256, ["aead", "rfc4543(gcm(aes))"]),
    (EncAlg.AES_CBC_192, AuthAlg.SHA1, ["enc", "cbc(aes)"]),
    (EncAlg.TDES_CBC, AuthAlg.MD5, ["enc", "cbc(des3_ede)"]),
    (EncAlg.NONE, AuthAlg.SHA256, ["enc", "ecb(cipher_null)", '""', "auth-trunc", "hmac(sha256)"]),
])
def test_every_esp_algorithm_family_has_its_linux_name(enc, auth, want):
    p = cbc_sa(enc_alg=enc, enc_key=bytes(24) if enc == EncAlg.TDES_CBC else KEY, auth_alg=auth,
               auth_key=HMAC_KEY, icv_len=8)
    args = xfrm_peer.algorithm_args(p)
    assert args[:len(want)] == want
    assert args[-1] == "64"  # the ICV length in bits follows the SA, not a default


def _bundle(mode=Mode.TRANSPORT, direction=Direction.OUTBOUND):
    esp = cbc_sa(direction=direction, mode=mode, src="10.0.0.1", dst="10.0.0.2", spi=0x1001,
                 inner_src="192.168.1.1" if mode == Mode.TUNNEL else None,
                 inner_dst="192.168.2.1" if mode == Mode.TUNNEL else None)
    return esp, ah_sa(direction=direction, mode=mode, spi=0x1002)


def test_esp_then_ah_bundle_is_two_states_and_one_policy_with_esp_innermost():
    esp, ah = _bundle()
    states_and_policy = xfrm_peer.bundle_commands(esp, ah, reqid=5)
    assert [c[:3] for c in states_and_policy] == [["xfrm", "state", "add"]] * 2 + [["xfrm", "policy", "add"]]
    assert states_and_policy[0] == state_add(esp, 5) and states_and_policy[1] == state_add(ah, 6)
    policy = states_and_policy[2]
    tmpls = [i for i, w in enumerate(policy) if w == "tmpl"]
    assert len(tmpls) == 2
    assert policy[tmpls[0]:tmpls[1]] == ["tmpl", "src", "10.0.0.1", "dst", "10.0.0.2", "proto", "esp", "reqid", "5",
                                         "mode", "transport"]
    assert policy[tmpls[1]:] == ["tmpl", "src", "10.0.0.1", "dst", "10.0.0.2", "proto", "ah", "reqid", "6",
                                 "mode", "transport"]
    assert policy[policy.index("dir") + 1] == "in"


def test_tunnel_bundle_is_esp_tunnel_inside_ah_transport_over_the_outer_header():
    esp, ah = _bundle(Mode.TUNNEL, Direction.INBOUND)
    cmds = xfrm_peer.bundle_commands(esp, ah, reqid=1)
    assert cmds[0][cmds[0].index("mode") + 1] == "tunnel"
    assert cmds[1][cmds[1].index("mode") + 1] == "transport"  # whatever mode the AH SA names
    policy = cmds[2]
    assert policy[3:9] == ["src", "192.168.1.1/32", "dst", "192.168.2.1/32", "dir", "out"]
    assert [policy[i + 1:i + 11:2] for i, w in enumerate(policy) if w == "tmpl"] == [
        ["src", "dst", "proto", "reqid", "mode"]] * 2
    assert policy[-4:] == ["reqid", "2", "mode", "transport"] and "tunnel" in policy[:-4]


def test_bundles_are_refused_unless_esp_then_ah_share_the_flow():
    esp, ah = _bundle()
    with pytest.raises(PeerConfigError, match="ESP SA first"):
        xfrm_peer.bundle_commands(ah, esp, 1)
    with pytest.raises(PeerConfigError, match="share direction"):
        xfrm_peer.bundle_commands(esp, ah_sa(direction=Direction.INBOUND), 1)
    with pytest.raises(PeerConfigError, match="share direction"):
        xfrm_peer.bundle_commands(esp, ah_sa(dst="10.0.0.9"), 1)


def test_peer_commands_mixes_single_sas_and_bundles_with_distinct_reqids():
    esp, ah = _bundle()
    cmds = peer_commands([gcm_sa(Direction.INBOUND, spi=0x2001, src="10.0.0.2", dst="10.0.0.1"), (esp, ah),
                          ah_sa(spi=0x4004)])
    reqids = [c[c.index("reqid") + 1] for c in cmds if c[1] == "state"]
    assert reqids == ["1", "2", "3", "4"]
    assert len(cmds) == 2 + 3 + 2
    assert sum(w == "tmpl" for w in cmds[4]) == 2


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
    assert (out_sa.enc_key, out_sa.auth_key) != (in_sa.enc_key, in_sa.auth_key)  # fresh keys per SA
    if mode == "tunnel":
        assert (out_sa.inner_src, out_sa.inner_dst) == scenario.NET.addrs(family, tunnel=True)
    for argv in peer_commands([out_sa, in_sa]):
        assert all(word and not any(c.isspace() for c in word) for word in argv)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("ah", scenario.AH_ALGORITHMS)
@pytest.mark.parametrize("alg", ["none", "aes-cbc-128+hmac-sha1-96", "aes-gcm-256"])
def test_scenario_ah_specs_are_ah_only_sas_or_esp_then_ah_bundles(family, ah, alg):
    spec = Spec(family=family, alg=alg, ah=ah, spi_base=48)
    spec.check()
    sas = scenario.card_sas(scenario.fill_keys(scenario.sa_document(spec)))
    want_auth = {"hmac-md5-96": AuthAlg.MD5, "hmac-sha1-96": AuthAlg.SHA1, "hmac-sha256-128": AuthAlg.SHA256}[ah]
    for sa, spi in zip(sas, (scenario.SPI_OUT + 48, scenario.SPI_IN + 48), strict=True):
        if alg == "none":
            assert isinstance(sa, SaParams) and sa.proto == IpProto.AH and sa.spi == spi
            assert sa.auth_alg == want_auth and sa.enc_alg == EncAlg.NONE
        else:
            esp, ah_sa_ = sa
            assert (esp.proto, ah_sa_.proto) == (IpProto.ESP, IpProto.AH) and ah_sa_.auth_alg == want_auth
            assert (esp.spi, ah_sa_.spi) == (spi, spi + scenario.AH_SPI_OFFSET)
            assert (ah_sa_.direction, ah_sa_.src, ah_sa_.dst) == (esp.direction, esp.src, esp.dst)
            assert ah_sa_.auth_key and ah_sa_.auth_key != esp.auth_key
    for argv in peer_commands(sas):
        assert all(word and not any(c.isspace() for c in word) for word in argv)


def test_ah_spec_validation():
    for bad, why in (({"alg": "none"}, "or none, with ah"), ({"ah": "aes-gmac-128"}, "ah must be one of"),
                     ({"ah": "hmac-sha1-96", "offload": "packet"}, "crypto offload"),
                     ({"ah": "hmac-sha1-96", "encap": True}, "crypto offload")):
        with pytest.raises(ValueError, match=why):
            Spec.from_dict(bad)


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


# --- the algorithm table and run-many (pure parts) -----------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(scenario.ALGORITHMS))
def test_every_scenario_algorithm_loads_and_has_a_linux_peer(alg):
    out_sa, in_sa = parse_sa_document(scenario.fill_keys(scenario.sa_document(Spec(alg=alg))))
    section = scenario.ALGORITHMS[alg]
    if "aead" in section:
        assert out_sa.icv_len == section["aead"]["icv"]
    else:
        assert out_sa.auth_alg != AuthAlg.NONE  # never ESP without integrity (NDIS, RFC 4303 §3.2)
    for argv in peer_commands([out_sa, in_sa]):
        assert all(word and not any(c.isspace() for c in word) for word in argv)


def test_v1_specs_are_crypto_offload_without_esn():
    Spec(v1=True, alg="3des-cbc+hmac-md5-96").check()
    with pytest.raises(ValueError, match="v1"):
        Spec(v1=True, offload="packet").check()
    with pytest.raises(ValueError, match="v1"):
        Spec(v1=True, esn=True).check()


def test_run_many_reports_each_case_and_survives_a_failing_one(monkeypatch):
    specs = [Spec(name="a"), Spec(name="b", alg="aes-gmac-128"), Spec(name="c")]
    assert [s.name for s in scenario.specs_from_b64(scenario.specs_to_b64(specs))] == ["a", "b", "c"]
    assert scenario.specs_from_b64(scenario.specs_to_b64(specs)) == specs

    def fake_run(spec):
        if spec.name == "b":
            raise scenario.ScenarioError("refused")
        return {"name": spec.name}

    monkeypatch.setattr(scenario, "run", fake_run)
    emitted = []
    outcomes = scenario.run_many(specs, emit=emitted.append)
    assert outcomes == emitted
    assert outcomes == [{"case": 0, "name": "a", "result": {"name": "a"}},
                        {"case": 1, "name": "b", "error": "ScenarioError: refused"},
                        {"case": 2, "name": "c", "result": {"name": "c"}}]
    with pytest.raises(ValueError, match="list"):
        scenario.specs_from_b64(Spec().to_b64())


def test_host_reads_run_many_lines_in_case_order():
    from ipsec_nic.topology import parse_guest_results

    lines = [scenario.RESULT_PREFIX + '{"case": 1, "error": "x"}', "noise",
             scenario.RESULT_PREFIX + '{"case": 0, "result": {"n": 1}}', scenario.RESULT_PREFIX + '{"done": 2}']
    assert parse_guest_results("\n".join(lines)) == [{"case": 0, "result": {"n": 1}}, {"case": 1, "error": "x"}]
