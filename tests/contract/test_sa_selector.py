"""The SA file's ``selector`` (proto/sport/dport): parsed, refused by name where a mode cannot honour it
(device/contract/sa_fields.py), and carried to the card's filter by the v1 and packet-offload encoders -
read back with the firmware's own decoders and acted on by the firmware's receive path."""

from __future__ import annotations

import pytest
import yaml
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether

from device.contract import ndis
from device.contract import sa as sa_codec
from device.contract.ndis import NdisStatus, Opcode
from device.contract.sa_fields import FIELD_RULES, Offload, Where
from device.contract.sa_file import SaFileError, load_sa_entries, parse_sa_entries
from device.contract.status import CryptoStatus
from firmware_model.capabilities import Capabilities
from firmware_model.firmware import Firmware

AUTH_KEY = "11" * 20
PEER, ME = "10.0.0.2", "10.0.0.1"
V1_ALGS = {"cipher": {"alg": "null"}, "integrity": {"alg": "hmac-sha1-96", "key": AUTH_KEY}}
GCM = {"aead": {"alg": "aes-gcm-128", "key": "00112233445566778899aabbccddeeff", "salt": "cafebabe"}}


def _doc(selector, direction: str = "inbound", algs=None, **extra) -> dict:
    entry = {"spi": 0x1001, "direction": direction, "src": PEER, "dst": ME, **(algs or V1_ALGS), **extra}
    if selector is not None:
        entry["selector"] = selector
    return {"sas": [entry]}


def _load(tmp_path, doc, offload):
    path = tmp_path / "sas.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, load_sa_entries(path, offload)


@pytest.mark.parametrize("selector, want", [
    ({"proto": "udp", "dport": 5001}, (17, 0, 5001)),
    ({"proto": "TCP", "sport": 1024, "dport": 443}, (6, 1024, 443)),
    ({"proto": 132}, (132, 0, 0)),
    ({"proto": "0x11", "sport": 7}, (17, 7, 0)),
])
def test_selector_is_parsed(selector, want):
    (e,) = parse_sa_entries(_doc(selector))
    assert (e.params.sel_proto, e.params.sel_sport, e.params.sel_dport) == want and "selector" in e.given


def test_an_all_zero_selector_asks_for_nothing():
    (e,) = parse_sa_entries(_doc({"sport": 0, "dport": 0}))
    assert "selector" not in e.given and (e.params.sel_proto, e.params.sel_sport, e.params.sel_dport) == (0, 0, 0)


@pytest.mark.parametrize("selector, message", [
    ({"proto": "udp", "port": 1}, "sas[0].selector: unknown key 'port'"),
    ({"proto": "sctp"}, "sas[0].selector.proto: expected tcp, udp or a protocol number 1..255, got 'sctp'"),
    ({"proto": 256}, "sas[0].selector.proto: expected tcp, udp or a protocol number"),
    ({"proto": "udp", "dport": 70000}, "sas[0].selector.dport: 70000 is not a port"),
    ({"proto": "udp", "sport": -1}, "sas[0].selector.sport: must not be negative"),
    ({"dport": 5001}, "sas[0].selector: ports need proto tcp or udp"),
    ({"proto": 1, "dport": 5001}, "sas[0].selector: ports need proto tcp or udp"),
    ("udp", "sas[0].selector: expected {proto: udp, sport: N, dport: N}"),
    ({}, "sas[0].selector: expected {proto: udp, sport: N, dport: N}"),
])
def test_selector_errors_name_the_place(selector, message):
    with pytest.raises(SaFileError) as exc:
        parse_sa_entries(_doc(selector))
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("direction, algs, offload, extra, why, hint", [
    ("inbound", GCM, Offload.CRYPTO, {}, "V2_ADD_SA has no filter fields", "use --v1 or --offload packet"),
    ("outbound", GCM, Offload.CRYPTO, {}, "outbound, the host picks the SA", "use --offload packet"),
    ("outbound", V1_ALGS, Offload.CRYPTO_V1, {}, "received packets only", "use --offload packet"),
    ("inbound", V1_ALGS, Offload.CRYPTO_V1, {"encap": {"type": "udp"}}, "names the encapsulation",
     "use --offload packet"),
])
def test_selector_is_refused_by_name_where_the_mode_cannot_honour_it(tmp_path, direction, algs, offload, extra,
                                                                    why, hint):
    with pytest.raises(SaFileError) as exc:
        _load(tmp_path, _doc({"proto": "udp", "dport": 5001}, direction, algs, **extra), offload)
    text = str(exc.value)
    assert text.startswith(f"{tmp_path / 'sas.yaml'}: sas[0].selector: {offload.value}: "), text
    assert why in text and text.endswith(hint) and AUTH_KEY not in text


def test_selector_is_honoured_by_the_card_in_v1_and_packet_offload():
    rules = [r for r in FIELD_RULES if r.key == "selector"]
    assert {r.case.split(":")[0] for r in rules} >= {"inbound", "outbound"}
    inbound = next(r for r in rules if r.case.startswith("inbound"))
    assert (inbound.crypto, inbound.crypto_v1, inbound.packet) == (Where.REFUSED, Where.CARD, Where.CARD)


def _fw(opcode: int, request: bytes) -> Firmware:
    fw = Firmware(Capabilities())
    assert fw.execute(opcode, request)[0] == NdisStatus.SUCCESS, fw.last_error
    return fw


def test_v1_selector_from_the_file_reaches_the_card_and_filters(tmp_path):
    _, (e,) = _load(tmp_path, _doc({"proto": "udp", "dport": 5001}), Offload.CRYPTO_V1)
    request = sa_codec.v1_add_sa(e.params)
    req = ndis.V1AddSa.unpack(request)
    assert (req.protocol, req.src_port, req.dest_port) == (17, 0, 5001)
    fw = _fw(Opcode.V1_ADD_SA, request)
    tx = SecurityAssociation(ESP, spi=0x1001, crypt_algo="NULL", auth_algo="HMAC-SHA1-96",
                             auth_key=bytes.fromhex(AUTH_KEY))
    inside = fw.receive(bytes(Ether() / tx.encrypt(IP(src=PEER, dst=ME) / UDP(dport=5001), seq_num=1)))
    outside = fw.receive(bytes(Ether() / tx.encrypt(IP(src=PEER, dst=ME) / UDP(dport=5002), seq_num=2)))
    tcp = fw.receive(bytes(Ether() / tx.encrypt(IP(src=PEER, dst=ME) / TCP(dport=5001), seq_num=3)))
    assert (inside.crypto_done, inside.crypto_status) == (True, CryptoStatus.SUCCESS)
    assert [(r.crypto_done, r.handle, r.policy_mismatch) for r in (outside, tcp)] == [(False, 0, True)] * 2
    assert fw.stats().rx_policy_unprocessed == 2


def test_packet_offload_selector_from_the_file_reaches_the_card_and_filters(tmp_path):
    doc = _doc({"proto": "udp", "sport": 4002}, algs=GCM, mode="tunnel", tunnel={"src": PEER, "dst": ME})
    doc["sas"][0].update(src="192.168.2.1", dst="192.168.1.1")
    _, (e,) = _load(tmp_path, doc, Offload.PACKET)
    request = sa_codec.add_sa_packet(e.params)
    req = ndis.AddSaPacket.unpack(request)
    assert (req.sel_proto, req.sel_sport, req.sel_dport, req.sel_src_prefix) == (17, 4002, 0, 32)
    fw = _fw(Opcode.ADD_SA_PACKET, request)
    key = bytes.fromhex("00112233445566778899aabbccddeeff" "cafebabe")
    tx = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=key,
                             tunnel_header=IP(src=PEER, dst=ME))
    inner = IP(src="192.168.2.1", dst="192.168.1.1")
    ok = fw.receive(bytes(Ether() / tx.encrypt(inner / UDP(sport=4002, dport=9), seq_num=1)))
    port = fw.receive(bytes(Ether() / tx.encrypt(inner / UDP(sport=4003, dport=9), seq_num=2)))
    spoof = fw.receive(bytes(Ether() / tx.encrypt(IP(src="192.168.2.9", dst="192.168.1.1") / UDP(sport=4002),
                                                 seq_num=3)))
    assert ok.decapsulated and not ok.policy_drop
    assert port.policy_drop and spoof.policy_drop and fw.stats().rx_policy_drops == 2


def test_outbound_transport_port_selector_stays_between_the_sa_endpoints(tmp_path):
    """A transport SA's port selector narrows its endpoints' traffic (datasheet §5.2): frames sent without a
    handle to another destination, or to another port, find no SA."""
    from firmware_model.traffic import TxOutcome

    _, (e,) = _load(tmp_path, _doc({"proto": "udp", "dport": 5001}, "outbound", GCM, src=ME, dst=PEER),
                    Offload.PACKET)
    fw = _fw(Opcode.ADD_SA_PACKET, sa_codec.add_sa_packet(e.params))

    def send(dst: str, dport: int):
        return fw.transmit(bytes(Ether() / IP(src=ME, dst=dst) / UDP(sport=4000, dport=dport) / (b"x" * 20)), 0,
                           True).status

    assert [send(PEER, 5001), send("10.0.0.9", 5001), send(PEER, 5002)] == [TxOutcome.OK, TxOutcome.NO_SA,
                                                                            TxOutcome.NO_SA]
