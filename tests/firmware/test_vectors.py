"""Known-answer tests against published vectors (files in tests/firmware/data name their sources):
draft-mcgrew-gcm-test-01 (AES-GCM / AES-GMAC ESP packets), RFC 3602 §4 (AES-CBC ESP packets),
RFC 4868 §2.7.2.1 (HMAC-SHA-256-128) and RFC 2202 (HMAC-SHA-1, truncated to 96 bits per RFC 2404)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.sa import SaParams
from firmware_model.engine import SaEngine
from firmware_model.esp import (
    CbcHmacTransform,
    GcmTransform,
    GmacTransform,
    Verdict,
    hmac_base,
    strip_trailer,
)

DATA = Path(__file__).parent / "data"


def _blocks(name: str) -> list[dict[str, str]]:
    """Parse 'field = hex' blocks separated by blank lines; continuation lines are indented."""
    cases: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = None
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                cases.append(current)
            current, last = {}, None
            continue
        if line[0] == " " and last:
            current[last] += "".join(line.split())
            continue
        key, _, value = line.partition("=")
        last = key.strip()
        current[last] = "".join(value.split())
    if current:
        cases.append(current)
    return cases


DRAFT = _blocks("gcm_esp_draft_mcgrew.txt")
RFC3602 = _blocks("rfc3602_esp_vectors.txt")
GCM_ALG = {16: EncAlg.AES_GCM_128, 24: EncAlg.AES_GCM_192, 32: EncAlg.AES_GCM_256}
GMAC_ALG = {16: AuthAlg.AES_GMAC_128, 24: AuthAlg.AES_GMAC_192, 32: AuthAlg.AES_GMAC_256}


def _case(c: dict[str, str]):
    key = bytes.fromhex(c["key"])
    nonce = bytes.fromhex(c["nonce"])
    seq = bytes.fromhex(c["seq"])
    seq64 = int.from_bytes(seq, "big")
    esn = len(seq) == 8
    return key, nonce[:4], nonce[4:], int(c["spi"], 16), seq64, esn, bytes.fromhex(c["plaintext"]), bytes.fromhex(c["packet"])


def _params(c: dict[str, str], direction: Direction, icv_len: int = 16, mode: Mode = Mode.TRANSPORT) -> SaParams:
    key, salt, _, spi, seq64, esn, _, _ = _case(c)
    gmac = c["algorithm"] == "AES-GMAC-ESP"
    return SaParams(
        spi=spi, proto=IpProto.ESP, direction=direction, mode=mode, src="192.0.2.1", dst="192.0.2.2",
        enc_alg=EncAlg.NONE if gmac else GCM_ALG[len(key)], enc_key=b"" if gmac else key + salt,
        auth_alg=GMAC_ALG[len(key)] if gmac else AuthAlg.NONE, auth_key=key + salt if gmac else b"",
        icv_len=icv_len, esn=esn, seq=seq64 - 1, replay_window=64,
    )


def test_vector_files_parsed() -> None:
    assert len(DRAFT) == 17
    assert sum(c["algorithm"] == "AES-GMAC-ESP" for c in DRAFT) == 1
    assert {len(bytes.fromhex(c["key"])) for c in DRAFT} == {16, 24, 32}
    assert len(RFC3602) == 2


@pytest.mark.parametrize("c", DRAFT, ids=[f"draft{i}" for i in range(len(DRAFT))])
def test_draft_transform_byte_exact(c: dict[str, str]) -> None:
    key, salt, iv, spi, seq64, esn, plaintext, packet = _case(c)
    tr = GmacTransform(key, salt) if c["algorithm"] == "AES-GMAC-ESP" else GcmTransform(key, salt, 16)
    hdr = struct.pack("!II", spi, seq64 & 0xFFFFFFFF)
    hi = seq64 >> 32 if esn else None
    assert hdr + iv + tr.seal(hdr, hi, iv, plaintext) == packet
    assert tr.open(hdr, hi, iv, packet[16:]) == plaintext
    tampered = bytearray(packet)
    tampered[-1] ^= 1
    assert tr.open(hdr, hi, iv, bytes(tampered[16:])) is None
    if esn:  # the high half is authenticated although never sent
        assert tr.open(hdr, hi ^ 1, iv, packet[16:]) is None


VALID_SPI = [c for c in DRAFT if int(c["spi"], 16) >= 256]


@pytest.mark.parametrize("c", VALID_SPI, ids=[f"draft-spi{c['spi']}-{c['seq']}" for c in VALID_SPI])
def test_draft_crypto_offload_in_place(c: dict[str, str]) -> None:
    """NDIS crypto offload: the host built IPv4 + ESP header, IV room, plaintext with trailer, ICV room."""
    _, _, iv, spi, seq64, esn, plaintext, packet = _case(c)
    esp_len = len(packet)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + esp_len, 0, 0, 64, 50, 0, bytes(4), bytes(4))
    frame = bytearray(b"\x00" * 14 + ip + packet[:8] + bytes(8) + plaintext + bytes(16))
    tx = SaEngine(_params(c, Direction.OUTBOUND))
    assert tx.crypto_encrypt(frame, 14, seq64 >> 32 if esn else None, iv=iv) == Verdict.OK
    assert bytes(frame[34:]) == packet
    rx = SaEngine(_params(c, Direction.INBOUND))
    rx.set_seq_hi(seq64 >> 32)
    assert rx.crypto_decrypt(frame, 14) == Verdict.OK
    assert bytes(frame[34 + 16:34 + 16 + len(plaintext)]) == plaintext


@pytest.mark.parametrize("c", VALID_SPI, ids=[f"draft-spi{c['spi']}-{c['seq']}" for c in VALID_SPI])
def test_draft_packet_offload(c: dict[str, str]) -> None:
    """Packet offload in transport mode: the engine pads (RFC 4303 §2.4) and frames the packet itself."""
    _, _, iv, spi, seq64, esn, plaintext, packet = _case(c)
    payload_len, nh = strip_trailer(plaintext)
    assert payload_len >= 0
    payload = plaintext[:payload_len]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 7, 0, 64, nh, 0,
                     bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    original = ip + payload
    tx = SaEngine(_params(c, Direction.OUTBOUND))
    verdict, wire = tx.encapsulate(original, iv=iv)
    assert verdict == Verdict.OK
    assert wire[20:] == packet  # the draft's padding is the minimal 1, 2, 3, ... padding
    assert wire[9] == 50 and int.from_bytes(wire[2:4], "big") == len(wire)
    rx = SaEngine(_params(c, Direction.INBOUND))
    verdict, back = rx.decapsulate(wire)
    assert verdict == Verdict.OK
    assert back[20:] == payload and back[9] == nh
    assert rx.decapsulate(wire)[0] == Verdict.REPLAY


@pytest.mark.parametrize("icv_len", [8, 12])
def test_gcm_truncated_icv(icv_len: int) -> None:
    """RFC 4106 §6: ICV of 8/12 bytes = the leading bytes of the full GCM tag."""
    key, salt, iv, spi, seq64, esn, plaintext, packet = _case(DRAFT[1])
    hdr = packet[:8]
    tr = GcmTransform(key, salt, icv_len)
    sealed = tr.seal(hdr, None, iv, plaintext)
    assert sealed == packet[16:len(packet) - 16 + icv_len]
    assert tr.open(hdr, None, iv, sealed) == plaintext
    bad = bytearray(sealed)
    bad[-1] ^= 0x80
    assert tr.open(hdr, None, iv, bytes(bad)) is None
    bad = bytearray(sealed)
    bad[3] ^= 0x01
    assert tr.open(hdr, None, iv, bytes(bad)) is None


def _cbc_params(c: dict[str, str], direction: Direction) -> SaParams:
    return SaParams(
        spi=int(c["spi"], 16), proto=IpProto.ESP, direction=direction,
        mode=Mode.TUNNEL if c["mode"] == "tunnel" else Mode.TRANSPORT,
        src="192.168.123.3", dst="192.168.123.100", enc_alg=EncAlg.AES_CBC_128,
        enc_key=bytes.fromhex(c["key"]), seq=int(c["seq"], 16) - 1,
    )


@pytest.mark.parametrize("c", RFC3602, ids=[f"rfc3602-case{c['case']}" for c in RFC3602])
def test_rfc3602_cbc_packets(c: dict[str, str]) -> None:
    original = bytes.fromhex(c["original"])
    packet = bytes.fromhex(c["packet"])
    iv = bytes.fromhex(c["iv"])
    tx = SaEngine(_cbc_params(c, Direction.OUTBOUND))
    verdict, wire = tx.encapsulate(original, iv=iv)
    assert verdict == Verdict.OK
    if c["mode"] == "transport":
        assert wire == packet  # whole packet incl. the rebuilt IPv4 header and its checksum
    else:
        assert wire[20:] == packet[20:]
    rx = SaEngine(_cbc_params(c, Direction.INBOUND))
    verdict, back = rx.decapsulate(packet)
    assert verdict == Verdict.OK
    assert back == original


def _hmac_rows():
    for line in (DATA / "hmac_vectors.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, key, data, full = (part.strip() for part in line.split("|"))
        yield name, bytes.fromhex(key), bytes.fromhex(data), bytes.fromhex(full)


@pytest.mark.parametrize("row", list(_hmac_rows()), ids=lambda r: f"{r[0]}-{r[3][:4].hex()}")
def test_hmac_truncated_vectors(row) -> None:
    name, key, data, full = row
    icv_len = 16 if name == "sha256" else 12  # RFC 4868 §2.1 / RFC 2404 §2
    tr = CbcHmacTransform(None, hmac_base(name, key), icv_len)
    sealed = tr.seal(data[:0], None, b"", data)  # NULL encryption: ICV over the data itself
    assert sealed == data + full[:icv_len]
    assert tr.open(b"", None, b"", sealed) == data
