"""SA YAML files -> SaParams, and their one-line errors."""

from __future__ import annotations

import pytest
import yaml

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.sa import UdpEncap
from device.contract.sa_file import SaFileError, load_sa_file, parse_sa_document

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
