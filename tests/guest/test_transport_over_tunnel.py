"""Transport over tunnel through the guest tools: the driver (send with a tunnel SA, receive with
NEXT_CRYPTO_DONE) and the CLI (`send --tunnel-sa`, `recv`), against the real device model
(tests/guest/harness.py). scapy seals and opens both ESP layers on the wire side (the oracle)."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.regs import CryptoStatus, Features, TxStatus
from device.contract.sa import SaParams, UdpEncap
from guest_tools import cli, packets
from guest_tools.driver import CardError

from .harness import Harness, missing_device_piece

pytestmark = pytest.mark.skipif(bool(missing_device_piece()), reason=missing_device_piece() or "ok")

COMBINED = {"firmware": {"transport_tunnel_combined": True}}
CARD_T, PEER_T = "10.0.0.1", "10.0.0.2"  # tunnel endpoints
CARD_H, PEER_H = "192.168.1.1", "192.168.2.1"  # end hosts (the tunnel SAs' selector)
GCM_KEY = bytes(range(16)) + b"OUT!"
CBC_KEY, SHA_KEY = bytes(range(32, 48)), bytes(range(64, 96))
PEER_MAC = bytes.fromhex("020000000002")


def transport_sa(spi: int, direction: Direction, key: bytes = CBC_KEY) -> SaParams:
    """AES-CBC + HMAC-SHA256 (16-byte alignment, unlike the outer GCM layer's 4)."""
    src, dst = (CARD_H, PEER_H) if direction == Direction.OUTBOUND else (PEER_H, CARD_H)
    return SaParams(spi=spi, proto=IpProto.ESP, direction=direction, mode=Mode.TRANSPORT, src=src, dst=dst,
                    enc_alg=EncAlg.AES_CBC_128, enc_key=key, auth_alg=AuthAlg.SHA256, auth_key=SHA_KEY, icv_len=16)


def tunnel_sa(spi: int, direction: Direction) -> SaParams:
    out = direction == Direction.OUTBOUND
    src, dst = (CARD_T, PEER_T) if out else (PEER_T, CARD_T)
    isrc, idst = (CARD_H, PEER_H) if out else (PEER_H, CARD_H)
    return SaParams(spi=spi, proto=IpProto.ESP, direction=direction, mode=Mode.TUNNEL, src=src, dst=dst,
                    inner_src=isrc, inner_dst=idst, enc_alg=EncAlg.AES_GCM_128, enc_key=GCM_KEY, icv_len=16)


def scapy_transport(spi: int, key: bytes = CBC_KEY, auth_key: bytes = SHA_KEY) -> SecurityAssociation:
    return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-CBC", crypt_key=key, auth_algo="SHA2-256-128",
                               auth_key=auth_key)


def scapy_tunnel(spi: int, src: str, dst: str) -> SecurityAssociation:
    return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=GCM_KEY,
                               tunnel_header=IP(src=src, dst=dst))


def udp_frame(card, n: int, src: str = CARD_H, dst: str = PEER_H) -> bytes:
    ip = packets.udp_packet(src, dst, 4001, 5001, packets.pattern_payload(100 + n, n))
    return packets.ethernet(PEER_MAC, card.ident.mac, ip)


@pytest.fixture
def combined():
    h = Harness(COMBINED)
    card = h.card(ring_size=16).init(reset=True)
    yield h, card
    card.close()


def test_the_profile_flag_is_advertised_in_features_and_caps():
    on, off = Harness(COMBINED), Harness()
    card_on, card_off = on.card(ring_size=16).init(reset=True), off.card(ring_size=16).init(reset=True)
    try:
        assert card_on.offers(Features.TRANSPORT_TUNNEL_COMBINED)
        assert "TRANSPORT_TUNNEL_COMBINED" in card_on.features()
        assert card_on.caps().transport_tunnel_combined == 1
        assert not card_off.offers(Features.TRANSPORT_TUNNEL_COMBINED)  # the default profile leaves it off
        assert "TRANSPORT_TUNNEL_COMBINED" not in card_off.features()
        assert card_off.caps().transport_tunnel_combined == 0
    finally:
        card_on.close()
        card_off.close()


def test_send_seals_transport_inside_tunnel_and_scapy_opens_both(combined):
    h, card = combined
    inner = card.add_sa(transport_sa(0x1111, Direction.OUTBOUND))
    outer = card.add_sa(tunnel_sa(0x2222, Direction.OUTBOUND))
    sent = [udp_frame(card, n) for n in range(3)]
    for f in sent:
        card.send(f, inner, "crypto", tunnel_handle=outer)
    assert [c.status for c in card.flush_tx()] == [TxStatus.OK] * 3
    assert len(h.wire.sent) == 3
    for n, (wire, plain) in enumerate(zip(h.wire.sent, sent, strict=True)):
        outer_ip = Ether(wire)[IP]
        assert (outer_ip.src, outer_ip.dst, outer_ip[ESP].spi, outer_ip[ESP].seq) == (CARD_T, PEER_T, 0x2222, n + 1)
        tunnelled = scapy_tunnel(0x2222, CARD_T, PEER_T).decrypt(outer_ip)
        assert (tunnelled[IP].src, tunnelled[IP].dst, tunnelled[ESP].spi, tunnelled[ESP].seq) == \
            (CARD_H, PEER_H, 0x1111, n + 1)
        opened = scapy_transport(0x1111).decrypt(tunnelled)
        assert bytes(opened) == plain[14:]
    assert (card.host.get(inner).next_seq, card.host.get(outer).next_seq) == (4, 4)


def test_send_refusals_name_the_layer_and_queue_nothing(combined):
    h, card = combined
    inner = card.add_sa(transport_sa(0x1111, Direction.OUTBOUND))
    outer = card.add_sa(tunnel_sa(0x2222, Direction.OUTBOUND))
    inbound = card.add_sa(tunnel_sa(0x3333, Direction.INBOUND))
    with pytest.raises(CardError, match="0x2222 cannot be the transport layer"):
        card.send(udp_frame(card, 0), outer, "crypto", tunnel_handle=inner)  # roles swapped
    with pytest.raises(CardError, match="0x1111 cannot be the tunnel layer"):
        card.send(udp_frame(card, 0), inner, "crypto", tunnel_handle=inner)
    with pytest.raises(CardError, match="tunnel SA handle .* not an outbound"):
        card.send(udp_frame(card, 0), inner, "crypto", tunnel_handle=inbound)
    with pytest.raises(CardError, match="crypto offload only"):
        card.send(udp_frame(card, 0), inner, "packet", tunnel_handle=outer)
    with pytest.raises(CardError, match="does not apply to this packet"):
        card.send(udp_frame(card, 0, dst="192.168.9.9"), inner, "crypto", tunnel_handle=outer)
    assert card.flush_tx() == [] and h.wire.sent == []
    assert card.host.get(inner).next_seq == 1  # a refused frame uses no sequence number


def test_default_card_refuses_a_tunnel_sa_before_any_descriptor():
    h = Harness()
    card = h.card(ring_size=16).init(reset=True)
    try:
        inner = card.add_sa(transport_sa(0x1111, Direction.OUTBOUND))
        outer = card.add_sa(tunnel_sa(0x2222, Direction.OUTBOUND))
        with pytest.raises(CardError, match="does not offer transport over tunnel"):
            card.send(udp_frame(card, 0), inner, "crypto", tunnel_handle=outer)
        assert card.flush_tx() == [] and h.wire.sent == [] and card.stats()["tx_packets"] == 0
    finally:
        card.close()


def nested_from_peer(card, n: int, inner_keys: tuple[bytes, bytes] = (CBC_KEY, SHA_KEY)) -> tuple[bytes, bytes]:
    """(frame the peer sends, the plain IP packet inside): transport ESP 0x5555 in tunnel ESP 0x6666."""
    plain = IP(src=PEER_H, dst=CARD_H) / UDP(sport=4002, dport=5002) / Raw(b"peer to card #%d " % n * 4)
    plain = IP(bytes(plain))
    inner = scapy_transport(0x5555, *inner_keys).encrypt(plain, seq_num=n + 1)
    outer = scapy_tunnel(0x6666, PEER_T, CARD_T).encrypt(inner, seq_num=n + 1)
    return bytes(Ether(src=PEER_MAC, dst=card.ident.mac) / outer), bytes(plain)


def test_recv_reports_both_layers_and_strips_both(combined):
    h, card = combined
    outer = card.add_sa(tunnel_sa(0x6666, Direction.INBOUND))
    inner = card.add_sa(transport_sa(0x5555, Direction.INBOUND))
    expected = []
    for n in range(2):
        frame, plain = nested_from_peer(card, n)
        expected.append(plain)
        h.inject(frame)
    got = card.recv(timeout=2.0)
    assert len(got) == 2
    for pkt, plain in zip(got, expected, strict=True):
        assert (pkt.crypto_done, pkt.next_crypto_done) == (True, True)
        assert (pkt.handle, pkt.next_handle) == (outer, inner)
        assert pkt.crypto_status == CryptoStatus.SUCCESS
        assert (pkt.tunnel_status_name, pkt.transport_status_name) == ("SUCCESS", "SUCCESS")
        assert pkt.inner is not None and pkt.inner[14:] == plain, pkt.note
    s = got[0].summary()
    assert (s["next_crypto_done"], s["next_handle"], s["tunnel_status"], s["transport_status"]) == \
        (True, inner, "SUCCESS", "SUCCESS")


def test_recv_inner_failure_is_next_crypto_done_with_the_transport_status(combined):
    h, card = combined
    outer = card.add_sa(tunnel_sa(0x6666, Direction.INBOUND))
    inner = card.add_sa(transport_sa(0x5555, Direction.INBOUND))
    frame, _ = nested_from_peer(card, 0, inner_keys=(bytes(16), bytes(32)))  # the peer's inner keys are wrong
    h.inject(frame)
    [pkt] = card.recv(timeout=2.0)
    assert (pkt.crypto_done, pkt.next_crypto_done, pkt.handle, pkt.next_handle) == (True, True, outer, inner)
    assert pkt.crypto_status == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED  # datasheet §12.1 row 22
    assert (pkt.tunnel_status_name, pkt.transport_status_name) == ("SUCCESS", "TRANSPORT_ESP_AUTH_FAILED")
    assert pkt.inner is None and pkt.frame == frame  # nothing delivered; indicated as received
    assert "transport layer failed" in pkt.note


def _session(h: Harness) -> tuple[cli.Session, io.StringIO]:
    out = io.StringIO()
    return cli.Session(opener=lambda a, reset: h.card(ring_size=16).init(reset=reset), out=out), out


def test_cli_send_with_tunnel_sa_and_recv_output(combined):
    h, card = combined
    inner = card.add_sa(transport_sa(0x1111, Direction.OUTBOUND))
    outer = card.add_sa(tunnel_sa(0x2222, Direction.OUTBOUND))
    in_outer = card.add_sa(tunnel_sa(0x6666, Direction.INBOUND))
    in_inner = card.add_sa(transport_sa(0x5555, Direction.INBOUND))
    session, out = _session(h)
    session.card = card  # the CLI session drives the same card handle (its host SA table included)
    argv = ["send", "--src", CARD_H, "--dst", PEER_H, "--count", "2", "--sa", hex(inner), "--tunnel-sa", hex(outer)]
    assert cli.run_one(session, argv) == cli.EXIT_OK
    assert "OK=2" in out.getvalue() and len(h.wire.sent) == 2
    assert Ether(h.wire.sent[0])[ESP].spi == 0x2222
    for n in range(2):
        h.inject(nested_from_peer(card, n)[0])
    assert cli.run_one(session, ["recv", "--count", "1", "--timeout", "2"]) == cli.EXIT_OK
    line = out.getvalue().splitlines()[-1]
    assert f"handle={in_outer:#x} next_crypto_done=1 next_handle={in_inner:#x}" in line
    assert "tunnel_status=SUCCESS transport_status=SUCCESS" in line
    assert cli.run_one(session, ["recv", "--count", "1", "--timeout", "2", "--json"]) == cli.EXIT_OK
    record = json.loads(out.getvalue().splitlines()[-1])
    assert (record["next_crypto_done"], record["handle"], record["next_handle"]) == (True, in_outer, in_inner)
    assert (record["tunnel_status"], record["transport_status"]) == ("SUCCESS", "SUCCESS")
    assert bytes.fromhex(record["inner"])[14:] == nested_from_peer(card, 1)[1]
    session.card = None


def test_cli_refuses_tunnel_sa_on_the_default_card(capsys):
    h = Harness()
    card = h.card(ring_size=16).init(reset=True)
    inner = card.add_sa(transport_sa(0x1111, Direction.OUTBOUND))
    outer = card.add_sa(tunnel_sa(0x2222, Direction.OUTBOUND))
    session, out = _session(h)
    session.card = card
    argv = ["send", "--src", CARD_H, "--dst", PEER_H, "--sa", hex(inner), "--tunnel-sa", hex(outer)]
    assert cli.run_one(session, argv) == cli.EXIT_ERROR
    assert "does not offer transport over tunnel" in capsys.readouterr().err
    assert h.wire.sent == [] and "sent" not in out.getvalue()
    card.close()


@pytest.mark.parametrize("extra", [["--plain"], ["--mode", "packet", "--sa", "1"]])
def test_cli_tunnel_sa_usage_errors(extra, capsys):
    session, _ = _session(Harness())
    argv = ["send", "--src", CARD_H, "--dst", PEER_H, "--tunnel-sa", "2", *extra]
    assert cli.run_one(session, argv) == cli.EXIT_USAGE
    assert "--tunnel-sa needs --sa" in capsys.readouterr().err


def test_peer_commands_nest_transport_inside_tunnel_in_one_policy():
    from guest_tools.checks.combined import sa_document
    from guest_tools.scenario import card_sas, fill_keys
    from guest_tools.xfrm_peer import PeerConfigError, transport_over_tunnel_commands

    t_out, u_out, t_in, u_in = card_sas(fill_keys(sa_document({"spi_base": 0})))
    assert (t_out.mode, u_out.mode, u_out.inner_src, u_out.inner_dst) == \
        (Mode.TRANSPORT, Mode.TUNNEL, t_out.src, t_out.dst)
    states_t, states_u, policy = transport_over_tunnel_commands(t_in, u_in, 3)
    assert states_t[:9] == ["xfrm", "state", "add", "src", PEER_H, "dst", CARD_H, "proto", "esp"]
    assert "tunnel" in states_u and states_u[3:7] == ["src", PEER_T, "dst", CARD_T]
    line = " ".join(policy)
    # the card's inbound pair is the peer's `dir out`; templates innermost first (Linux applies them in
    # that order outbound and checks the secpath against them inbound)
    assert line.startswith(f"xfrm policy add src {PEER_H}/32 dst {CARD_H}/32 dir out ")
    assert line.endswith(f"tmpl src {PEER_H} dst {CARD_H} proto esp reqid 3 mode transport "
                         f"tmpl src {PEER_T} dst {CARD_T} proto esp reqid 4 mode tunnel")
    with pytest.raises(PeerConfigError, match="transport-mode SA inside a tunnel-mode SA"):
        transport_over_tunnel_commands(u_in, t_in, 3)
    with pytest.raises(PeerConfigError, match="share a direction"):
        transport_over_tunnel_commands(t_out, u_in, 3)


# --- a UDP-encapsulated layer (RFC 3948): UdpEsp TRANSPORT_OVER_TUNNEL / UDP_ESP_TRANSPORT_OVER_TUNNEL ----------

ALL_UDP = ["transport", "tunnel", "transport-over-tunnel", "udp-transport-over-tunnel"]
KIND_PROFILES = {
    "a": {"firmware": {"transport_tunnel_combined": True, "udp_esp": ["transport", "tunnel", "transport-over-tunnel"]}},
    "b": {"firmware": {"transport_tunnel_combined": True,
                       "udp_esp": ["transport", "tunnel", "udp-transport-over-tunnel"]}},
}
UDP_LAYERS = {"a": (False, True), "b": (True, False)}  # kind -> (transport layer in UDP, tunnel layer in UDP)


def _udp_sas(kind: str, direction: Direction, t_spi: int, u_spi: int) -> tuple[SaParams, SaParams]:
    inner_udp, outer_udp = UDP_LAYERS[kind]
    t, u = transport_sa(t_spi, direction), tunnel_sa(u_spi, direction)
    return (replace(t, encap=UdpEncap()) if inner_udp else t), (replace(u, encap=UdpEncap()) if outer_udp else u)


def _udp_scapy(kind: str, t_spi: int, u_spi: int, src: str, dst: str):
    inner_udp, outer_udp = UDP_LAYERS[kind]
    nat_t = UDP(sport=4500, dport=4500)
    t = SecurityAssociation(ESP, spi=t_spi, crypt_algo="AES-CBC", crypt_key=CBC_KEY, auth_algo="SHA2-256-128",
                            auth_key=SHA_KEY, nat_t_header=nat_t if inner_udp else None)
    u = SecurityAssociation(ESP, spi=u_spi, crypt_algo="AES-GCM", crypt_key=GCM_KEY,
                            tunnel_header=IP(src=src, dst=dst), nat_t_header=nat_t if outer_udp else None)
    return t, u


@pytest.mark.parametrize("kind", ["a", "b"])
def test_udp_kinds_register_send_and_recv(kind):
    """The driver reads UDP_ESP at init; it sends with either layer UDP-encapsulated (scapy opens both, the
    UDP header is where the kind puts it) and strips both layers of what a peer sends."""
    h = Harness(KIND_PROFILES[kind])
    card = h.card(ring_size=16).init(reset=True)
    try:
        assert card.ident.udp_esp == (0x7 if kind == "a" else 0xB)
        inner_udp, outer_udp = UDP_LAYERS[kind]
        t, u = _udp_sas(kind, Direction.OUTBOUND, 0x1111, 0x2222)
        inner, outer = card.add_sa(t), card.add_sa(u)
        sent = [udp_frame(card, n) for n in range(2)]
        for f in sent:
            card.send(f, inner, "crypto", tunnel_handle=outer)
        assert [c.status for c in card.flush_tx()] == [TxStatus.OK] * 2
        st, su = _udp_scapy(kind, 0x1111, 0x2222, CARD_T, PEER_T)
        for n, (wire, plain) in enumerate(zip(h.wire.sent, sent, strict=True)):
            outer_ip = Ether(wire)[IP]
            assert (outer_ip.src, outer_ip.dst, outer_ip.proto) == (CARD_T, PEER_T, 17 if outer_udp else 50)
            if outer_udp:
                assert (outer_ip[UDP].sport, outer_ip[UDP].dport, outer_ip[UDP].chksum) == (4500, 4500, 0)
            assert (outer_ip[ESP].spi, outer_ip[ESP].seq) == (0x2222, n + 1)
            tunnelled = su.decrypt(outer_ip)
            assert (tunnelled[IP].src, tunnelled[IP].dst, tunnelled[IP].proto) == \
                (CARD_H, PEER_H, 17 if inner_udp else 50)
            if inner_udp:
                assert (tunnelled[UDP].sport, tunnelled[UDP].dport) == (4500, 4500)
            assert (tunnelled[ESP].spi, tunnelled[ESP].seq) == (0x1111, n + 1)
            assert bytes(st.decrypt(tunnelled)) == plain[14:]
        # receive: the peer seals both layers the same way; the driver strips both
        ti, ui = _udp_sas(kind, Direction.INBOUND, 0x5555, 0x6666)
        in_outer, in_inner = card.add_sa(ui), card.add_sa(ti)
        pt, pu = _udp_scapy(kind, 0x5555, 0x6666, PEER_T, CARD_T)
        plains = []
        for n in range(2):
            plain = IP(bytes(IP(src=PEER_H, dst=CARD_H) / UDP(sport=4002, dport=5002) / Raw(b"udp kind %d" % n)))
            plains.append(bytes(plain))
            h.inject(bytes(Ether(src=PEER_MAC, dst=card.ident.mac)
                           / pu.encrypt(pt.encrypt(plain, seq_num=n + 1), seq_num=n + 1)))
        got = card.recv(timeout=2.0)
        assert len(got) == 2
        for pkt, plain in zip(got, plains, strict=True):
            assert (pkt.crypto_done, pkt.next_crypto_done, pkt.handle, pkt.next_handle) == \
                (True, True, in_outer, in_inner)
            assert pkt.crypto_status == CryptoStatus.SUCCESS
            assert pkt.inner is not None and pkt.inner[14:] == plain, pkt.note
            # RFC 3948 §3.1.2: only a UDP-encapsulated transport layer vouches for the inner checksum
            assert pkt.l4_csum_ok == inner_udp
    finally:
        card.close()


def test_udp_kind_the_card_does_not_offer_is_refused_before_any_descriptor():
    """Each kind is refused on a card that offers transport over tunnel but not that kind (UDP_ESP register),
    and both layers in UDP on any card; the message names the register bit or the rule."""
    for offered, other, match in (("a", "b", "UDP_ESP.UDP_ESP_TRANSPORT_OVER_TUNNEL is clear"),
                                  ("b", "a", "UDP_ESP.TRANSPORT_OVER_TUNNEL is clear")):
        h = Harness(KIND_PROFILES[offered])
        card = h.card(ring_size=16).init(reset=True)
        try:
            t, u = _udp_sas(other, Direction.OUTBOUND, 0x1111, 0x2222)
            inner, outer = card.add_sa(t), card.add_sa(u)
            with pytest.raises(CardError, match=match):
                card.send(udp_frame(card, 0), inner, "crypto", tunnel_handle=outer)
            assert card.flush_tx() == [] and h.wire.sent == []
            assert (card.host.get(inner).next_seq, card.host.get(outer).next_seq) == (1, 1)
        finally:
            card.close()
    h = Harness({"firmware": {"transport_tunnel_combined": True, "udp_esp": ALL_UDP}})
    card = h.card(ring_size=16).init(reset=True)
    try:
        assert card.ident.udp_esp == 0xF
        t = replace(transport_sa(0x1111, Direction.OUTBOUND), encap=UdpEncap())
        u = replace(tunnel_sa(0x2222, Direction.OUTBOUND), encap=UdpEncap())
        inner, outer = card.add_sa(t), card.add_sa(u)
        with pytest.raises(CardError, match="both UDP-encapsulated"):
            card.send(udp_frame(card, 0), inner, "crypto", tunnel_handle=outer)
        assert card.flush_tx() == [] and h.wire.sent == []
    finally:
        card.close()


def test_default_and_plain_combined_cards_advertise_no_udp_kind():
    for profile in (None, COMBINED):
        h = Harness(profile) if profile else Harness()
        card = h.card(ring_size=16).init(reset=True)
        try:
            assert card.ident.udp_esp == 0x3 and card.caps().udp_esp == 0x3
        finally:
            card.close()


@pytest.mark.parametrize("udp", ["tunnel", "transport"])
def test_peer_commands_for_a_udp_encapsulated_layer(udp):
    """The UDP layer's peer states carry `encap espinudp 4500 4500`; for a UDP-encapsulated transport layer
    the peer's inbound side also gets a tunnel-only policy for the encapsulated flow, preferred over the
    two-template one (Linux checks policy at the encap socket before opening the ESP-in-UDP)."""
    from guest_tools.checks.combined import sa_document
    from guest_tools.scenario import card_sas, fill_keys
    from guest_tools.xfrm_peer import transport_over_tunnel_commands

    t_out, u_out, t_in, u_in = card_sas(fill_keys(sa_document({"spi_base": 0, "udp": udp})))
    inbound = transport_over_tunnel_commands(t_out, u_out, 1)  # the card's outbound pair: the peer's `dir in`
    outbound = transport_over_tunnel_commands(t_in, u_in, 3)
    encapsulated = (inbound[1], outbound[1]) if udp == "tunnel" else (inbound[0], outbound[0])
    plain = (inbound[0], outbound[0]) if udp == "tunnel" else (inbound[1], outbound[1])
    for state in encapsulated:
        assert state[-5:] == ["encap", "espinudp", "4500", "4500", "0.0.0.0"]
    assert not [s for s in plain if "encap" in s]
    assert len(outbound) == 3
    if udp == "tunnel":
        assert len(inbound) == 3 and "priority" not in inbound[2]
        return
    general, flow = " ".join(inbound[2]), " ".join(inbound[3])
    assert f"dst {PEER_H}/32 dir in priority 100 tmpl src {CARD_H} " in general
    assert flow == (f"xfrm policy add src {CARD_H}/32 dst {PEER_H}/32 proto udp sport 4500 dport 4500 dir in "
                    f"priority 10 tmpl src {CARD_T} dst {PEER_T} proto esp reqid 2 mode tunnel")
