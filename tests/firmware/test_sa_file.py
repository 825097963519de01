"""SA YAML files -> SaParams, and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from device.contract import ndis
from device.contract import sa as sa_codec
from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.sa import UdpEncap
from device.contract.sa_fields import Offload, markdown_table
from device.contract.sa_file import SaFileError, load_sa_entries, load_sa_file, parse_sa_document

EXAMPLE = """
sas:
  - spi: 0x1001
    direction: outbound
    mode: transport
    src: 192.0.2.1
    dst: 192.0.2.2
    encap: {type: udp, sport: 4500, dport: 4500}
    aead: {alg: aes-gcm-128, key: 00112233445566778899aabbccddeeff, salt: cafebabe, icv: 16}
    esn: true
    seq: 0xfffffff0
    replay_window: 128
  - spi: 0x2002
    direction: inbound
    mode: tunnel
    src: 10.1.0.1
    dst: 10.2.0.1
    tunnel: {src: 198.51.100.1, dst: 198.51.100.2}
    cipher: {alg: aes-cbc-256, key: "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"}
    integrity: {alg: hmac-sha256-128, key: "00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff"}
"""


def test_example_file(tmp_path):
    path = tmp_path / "sas.yaml"
    path.write_text(EXAMPLE)
    first, second = load_sa_file(path)
    assert (first.spi, first.direction, first.mode, first.proto) == (0x1001, Direction.OUTBOUND, Mode.TRANSPORT, IpProto.ESP)
    assert first.enc_alg == EncAlg.AES_GCM_128
    assert first.enc_key == bytes.fromhex("00112233445566778899aabbccddeeff") + bytes.fromhex("cafebabe")
    assert first.encap == UdpEncap(4500, 4500) and first.esn and first.seq == 0xFFFFFFF0 and first.replay_window == 128
    # tunnel: outer endpoints become the SA endpoints, src/dst the inner selector
    assert (second.src, second.dst, second.inner_src, second.inner_dst) == (
        "198.51.100.1", "198.51.100.2", "10.1.0.1", "10.2.0.1")
    assert second.enc_alg == EncAlg.AES_CBC_256 and second.auth_alg == AuthAlg.SHA256 and second.icv_len == 16
    assert "00112233" not in repr(first)  # keys never in repr


def sa_doc(**override) -> dict:
    entry = {"spi": 0x1001, "direction": "inbound", "src": "192.0.2.1", "dst": "192.0.2.2",
             "aead": {"alg": "aes-gcm-128", "key": "00112233445566778899aabbccddeeff", "salt": "cafebabe"}}
    entry.update(override)
    return {"sas": [{k: v for k, v in entry.items() if v is not None}]}


@pytest.mark.parametrize("override, message", [
    ({"aead": {"alg": "aes-gcm-100", "key": "00", "salt": "cafebabe"}}, "sas[0].aead.alg: unknown algorithm 'aes-gcm-100'"),
    ({"aead": {"alg": "aes-gcm-128", "key": "0011", "salt": "cafebabe"}}, "needs a 16-byte key, got 2 bytes"),
    ({"aead": {"alg": "aes-gcm-128", "key": "00112233445566778899aabbccddeeff", "salt": 12345678}},
     "quoted hex string"),
    ({"spi": 0}, "SPI 0 is reserved"),
    ({"spi": 7}, "IANA-reserved"),
    ({"dst": None}, "sas[0]: missing 'dst'"),
    ({"direction": "sideways"}, "sas[0].direction: expected one of outbound, inbound"),
    ({"cipher": {"alg": "aes-cbc-128", "key": "00" * 16}}, "either aead or cipher/integrity"),
    ({"mode": "tunnel"}, "tunnel mode needs tunnel"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"aead": None, "integrity": {"alg": "hmac-sha7", "key": "00"}}, "sas[0].integrity.alg: unknown algorithm"),
    ({"aead": {"alg": "aes-gcm-128", "key": "zz", "salt": "cafebabe"}}, "not a hex string"),
    ({"aead": {"alg": "aes-gcm-128", "key": "00112233445566778899aabbccddeeff", "salt": "cafebabe", "icv": 10}},
     "ICV"),
])
def test_errors_are_one_line_and_name_the_place(override, message):
    with pytest.raises(SaFileError) as exc:
        parse_sa_document(sa_doc(**override))
    text = str(exc.value)
    assert message in text and "\n" not in text
    assert "00112233445566778899aabbccddeeff" not in text


def test_file_level_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sas: [\n")
    with pytest.raises(SaFileError, match="not valid YAML"):
        load_sa_file(bad)
    with pytest.raises(SaFileError, match="cannot read"):
        load_sa_file(tmp_path / "missing.yaml")
    with pytest.raises(SaFileError, match="'sas' list"):
        parse_sa_document(yaml.safe_load("[1, 2]"))


def test_gmac_and_ah_entries():
    doc = sa_doc(aead={"alg": "aes-gmac-128", "key": "00" * 16, "salt": "01020304"})
    (gmac,) = parse_sa_document(doc)
    assert gmac.enc_alg == EncAlg.NONE and gmac.auth_alg == AuthAlg.AES_GMAC_128 and gmac.auth_key[-4:] == b"\1\2\3\4"
    (ah,) = parse_sa_document(sa_doc(proto="ah", aead=None, integrity={"alg": "hmac-sha1-96", "key": "11" * 20}))
    assert ah.proto == IpProto.AH and ah.icv_len == 12


# --- no silent drops: every given field is honoured by the card or the host, or refused by name ---------


CRYPTO, V1, PACKET = Offload.CRYPTO, Offload.CRYPTO_V1, Offload.PACKET
CBC_SHA1 = {"aead": None, "cipher": {"alg": "aes-cbc-128", "key": "00" * 16},
            "integrity": {"alg": "hmac-sha1-96", "key": "11" * 20}}
V1_ALGS = {"aead": None, "cipher": {"alg": "3des-cbc", "key": "00" * 24},
           "integrity": {"alg": "hmac-sha1-96", "key": "11" * 20}}


def _load(tmp_path, offload, **override):
    path = tmp_path / "sas.yaml"
    path.write_text(yaml.safe_dump(sa_doc(**override)))
    return path, load_sa_entries(path, offload)


@pytest.mark.parametrize("override, offload, key, why", [
    ({"replay_window": 128}, CRYPTO, "replay_window", "no anti-replay on the card"),
    ({"replay_window": 128, **V1_ALGS}, V1, "replay_window", "no anti-replay on the card"),
    ({"replay_window": 128, "direction": "outbound"}, PACKET, "replay_window", "inbound SAs only"),
    ({"lifetime": {"hard_packets": 3}}, CRYPTO, "lifetime", "no lifetime fields"),
    ({"lifetime": {"soft_bytes": 3}, **V1_ALGS}, V1, "lifetime", "no lifetime fields"),
    ({"seq": 5}, CRYPTO, "seq", "only the ESN high half"),
    ({"seq": (7 << 32) | 5, "esn": True}, CRYPTO, "seq", "only the ESN high half"),
    ({"seq": 5, **V1_ALGS}, V1, "seq", "only the ESN high half"),
    ({"esn": True, **V1_ALGS}, V1, "esn", "no extended sequence numbers"),
    ({"encap": {"type": "udp", "sport": 4501, "dport": 4500}}, CRYPTO, "encap", "port 4500 only"),
    ({"encap": {"type": "udp", "sport": 4501, "dport": 4500}, **V1_ALGS}, V1, "encap", "port 4500 only"),
    ({"proto": "ah", "aead": None, "integrity": {"alg": "hmac-sha1-96", "key": "11" * 20}}, PACKET, "proto",
     "ESP SAs only"),
])
def test_fields_an_offload_mode_cannot_honour_are_refused_by_name(tmp_path, override, offload, key, why):
    with pytest.raises(SaFileError) as exc:
        _load(tmp_path, offload, **override)
    text = str(exc.value)
    assert text.startswith(f"{tmp_path / 'sas.yaml'}: sas[0].{key}: {offload.value}: "), text
    assert why in text and "\n" not in text and "0011223344" not in text


def _firmware_decode(request: bytes, opcode: str):
    """The SA as the firmware's own decoder reads the command (what reaches the card)."""
    if opcode == "packet":
        req = ndis.AddSaPacket.unpack(request)
        return sa_codec.decode_v2(req, req.key_data, packet=req)[0]
    if opcode == "v1":
        req = ndis.V1AddSa.unpack(request)
        return sa_codec.decode_v1(req, req.key_mat)[0]
    req = ndis.V2AddSaEx.unpack(request)
    return sa_codec.decode_v2(req, req.key_data)[0]


def test_honoured_fields_reach_the_card_in_packet_offload(tmp_path):
    _, (e,) = _load(tmp_path, PACKET, replay_window=256, seq=77, lifetime={"soft_packets": 5, "hard_bytes": 9000})
    got = _firmware_decode(sa_codec.add_sa_packet(e.params), "packet")
    assert (got.replay_window, got.seq, got.soft_packets, got.hard_bytes) == (256, 77, 5, 9000)


def test_esn_high_half_reaches_the_card_in_crypto_offload(tmp_path):
    _, (e,) = _load(tmp_path, CRYPTO, esn=True, seq=7 << 32)
    assert _firmware_decode(sa_codec.v2_add_sa_ex(e.params), "v2").seq == 7 << 32


def test_outbound_seq_and_mode_are_the_hosts_in_crypto_offload(tmp_path):
    # accepted: the guest driver numbers (seq + 1 first) and frames (tunnel) outbound crypto-offload packets
    _, (e,) = _load(tmp_path, CRYPTO, direction="outbound", seq=41, mode="tunnel",
                    tunnel={"src": "198.51.100.1", "dst": "198.51.100.2"})
    assert e.params.seq == 41 and {"seq", "mode"} <= e.given


def test_zero_limits_ask_for_nothing(tmp_path):
    _, (e,) = _load(tmp_path, CRYPTO, replay_window=0, lifetime={"hard_packets": 0})
    assert not {"replay_window", "lifetime"} & e.given


def test_readme_carries_the_code_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("<!-- sa-fields table")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- end sa-fields table -->")]
    assert block.strip() == markdown_table()
