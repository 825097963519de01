"""docs/datasheet.md beyond the register map: generated blocks are current, and its claims hold.

The generated blocks (admin commands, status codes, algorithm sizes, profile keys) must be exactly what
device/nic/datasheet.py renders from the code. The NDIS-defect decisions of §12 that no firmware test
pinned yet are pinned here, each checked against an implementation nobody here wrote (scapy, or the
`cryptography` AEAD used directly with the RFC 4106 construction).
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from device.contract import ndis, regs
from device.contract.enums import AuthAlg, EncAlg, Mode
from device.contract.ndis import AlgoInfoV2, NdisStatus, Opcode, SaV2
from device.contract.status import CryptoStatus
from device.nic import datasheet
from device.profile import load_profile, profile_from_dict
from firmware_model.capabilities import Capabilities
from firmware_model.firmware import Firmware, TxOutcome

ROOT = Path(__file__).resolve().parents[2]
DATASHEET = ROOT / "docs" / "datasheet.md"
A, B = "192.0.2.1", "192.0.2.2"
GCM_KEY, SALT = bytes(range(16)), bytes.fromhex("cafebabe")


# ---- the document ------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", datasheet.BLOCKS, ids=lambda b: b.name)
def test_generated_block_is_current(block):
    text = DATASHEET.read_text(encoding="utf-8")
    assert text.count(block.begin) == 1, f"datasheet lost the marker {block.begin}"
    start = text.index(block.begin)
    end = text.index(block.end, start) + len(block.end) + 1
    assert text[start:end] == block.section(), (
        f"docs/datasheet.md block '{block.name}' is stale: run python -m device.nic.datasheet docs/datasheet.md")


def test_check_command_reports_stale_blocks(tmp_path):
    doc = tmp_path / "datasheet.md"
    good = DATASHEET.read_text(encoding="utf-8")
    doc.write_text(good, encoding="utf-8")
    run = [sys.executable, "-m", "device.nic.datasheet", "--check", str(doc)]
    assert subprocess.run(run, cwd=ROOT, capture_output=True).returncode == 0
    doc.write_text(good.replace("| 0x0021 | V2_ADD_SA_EX |", "| 0x0021 | V2_ADD_SA_XX |"), encoding="utf-8")
    assert subprocess.run(run, cwd=ROOT, capture_output=True).returncode == 1
    subprocess.run(run[:3] + [str(doc)], cwd=ROOT, check=True)  # regenerate in place
    assert doc.read_text(encoding="utf-8") == good


def test_every_opcode_is_documented_and_dispatched():
    text = DATASHEET.read_text(encoding="utf-8")
    documented = {c.opcode for c in ndis.COMMANDS}
    assert documented == set(ndis.Opcode)
    assert set(Firmware(Capabilities())._handlers) == documented
    for op in ndis.Opcode:
        assert f"| 0x{int(op):04X} | {op.name} |" in text


def test_every_status_value_has_its_situations():
    text = DATASHEET.read_text(encoding="utf-8")
    for s in NdisStatus:
        assert f"| 0x{int(s):08X} | {s.name} |" in text
    for e in (regs.AdminStatus, regs.TxStatus, regs.CryptoStatus):
        for m in e:
            assert f"| 0x{int(m):X} | {m.name} |" in text
    for m in CryptoStatus:  # the firmware's enum and the register enum agree (REPLAY is card-only)
        assert regs.CryptoStatus[m.name] == m


def test_render_refuses_an_undocumented_value(monkeypatch):
    monkeypatch.delitem(datasheet.TX_STATUS_WHEN, "BAD_HANDLE")
    with pytest.raises(ValueError, match="BAD_HANDLE"):
        datasheet.status_code_tables()


def test_profile_table_defaults_are_the_loaders_and_default_yaml_states_them():
    text = DATASHEET.read_text(encoding="utf-8")
    empty = profile_from_dict({})
    packaged = load_profile()
    assert (packaged.pci, packaged.nic, packaged.wire) == (empty.pci, empty.nic, empty.wire)
    assert Capabilities.from_profile(packaged.firmware) == Capabilities()
    assert "| `nic.msix_vectors` | 5 |" in text and "| `pci.vendor_id` | 0xEC5E |" in text
    for key in datasheet.PROFILE_KEYS:
        section, name = key.split(".")
        assert re.search(rf"^\s*{name}:", _yaml_section(section), re.M), f"default.yaml does not show {key}"


def _yaml_section(name: str) -> str:
    text = (ROOT / "device" / "profiles" / "default.yaml").read_text(encoding="utf-8")
    return text.split(f"\n{name}:", 1)[1].split("\n\n", 1)[0]


def test_pinning_tests_named_in_section_12_exist():
    text = DATASHEET.read_text(encoding="utf-8")
    section = text.split("## 12.", 1)[1]
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", section)
    assert len(refs) >= 13
    for path, name in refs:
        source = (ROOT / path).read_text(encoding="utf-8")
        if name:
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} named in §12 does not exist"


# ---- §12 decisions pinned here -----------------------------------------------------------------------


def _add_ex(fw: Firmware, sa: SaV2, key: bytes, *, inbound: bool = False) -> int:
    flags = ndis.V2AddFlags.INBOUND if inbound else 0
    req = ndis.V2AddSaEx(1, flags, ndis.addr16(A), ndis.addr16(B), 0, (sa, SaV2()), len(key), ndis.V2_ADD_SA_EX.size,
                         key_data=key).pack()
    status, resp = fw.execute(Opcode.V2_ADD_SA_EX, req)
    assert status == NdisStatus.SUCCESS, fw.last_error
    return ndis.HandleResponse.unpack(resp).offload_handle


def _host_built(spi: int, seq: int, payload: bytes, iv_len: int, align: int, icv_len: int) -> bytes:
    """The frame a host builds for crypto offload (§7.3): ESP header, IV room, payload, RFC 4303 §2.4
    padding, pad length, next header (UDP), ICV room."""
    padlen = -(len(payload) + 2) % align
    body = struct.pack("!II", spi, seq) + bytes(iv_len) + payload + bytes(range(1, padlen + 1)) + \
        bytes((padlen, 17)) + bytes(icv_len)
    return bytes(Ether() / IP(src=A, dst=B, proto=50) / Raw(body))


def _udp_payload(text: bytes) -> bytes:
    return bytes(UDP(sport=7, dport=9) / Raw(text))


def _gcm_sa(spi: int, icv_info: int, *, esn: bool = False, hi: int = 0) -> SaV2:
    return SaV2(flags=ndis.V2SaFlags.ESN_SA if esn else 0, operation=ndis.V2Operation.ESP, spi=spi,
                encryption_algorithm=AlgoInfoV2(EncAlg.AES_GCM_128, 20, 0, icv_info),
                sequence_number_high_order=hi)


@pytest.mark.parametrize("icv_info, icv_len", [(8, 8), (12, 12), (16, 16), (0, 16)])
def test_gcm_additional_info_is_icv_bytes(icv_info, icv_len):
    """Decision 4b: additional_info is the ICV length in bytes (0 = 16). Checked against the RFC 4106
    construction built here from the AEAD primitive: nonce = salt || IV, AAD = SPI || Seq."""
    fw = Firmware(Capabilities())
    handle = _add_ex(fw, _gcm_sa(0x3001, icv_info), GCM_KEY + SALT)
    payload = _udp_payload(b"icv length in bytes")
    frame = _host_built(0x3001, 9, payload, 8, 4, icv_len)
    res = fw.transmit(frame, handle, False)
    assert res.status == TxOutcome.OK and len(res.frame) == len(frame)
    esp = res.frame[14 + 20:]
    iv, sealed = esp[8:16], esp[16:]
    plaintext = frame[14 + 20 + 16:len(frame) - icv_len]
    expected = AESGCM(GCM_KEY).encrypt(SALT + iv, plaintext, esp[:8])
    assert sealed == expected[:len(plaintext) + icv_len]  # ciphertext, then the tag cut to icv_len bytes


@pytest.mark.parametrize("icv_info", [96, 128, 4])
def test_gcm_icv_length_in_bits_is_refused(icv_info):
    fw = Firmware(Capabilities())
    req = ndis.V2AddSaEx(1, 0, ndis.addr16(A), ndis.addr16(B), 0, (_gcm_sa(0x3002, icv_info), SaV2()), 20,
                         ndis.V2_ADD_SA_EX.size, key_data=GCM_KEY + SALT).pack()
    assert fw.execute(Opcode.V2_ADD_SA_EX, req)[0] == NdisStatus.INVALID_PARAMETER
    assert fw.stats().reject_bad_icv_length == 1 and len(fw.sadb) == 0


def test_sha256_icv_is_16_bytes():
    """Decision 5, through the command path: AES-CBC-128 + HMAC-SHA-256 with a 16-byte ICV decrypts in scapy
    (which implements RFC 4868 SHA2-256-128); the 12-byte truncation of older drafts would not."""
    enc_key, auth_key = bytes(range(32, 48)), bytes(range(64, 96))
    sa = SaV2(operation=ndis.V2Operation.ESP, spi=0x3003,
              authentication_algorithm=AlgoInfoV2(AuthAlg.SHA256, 32, 16, 0),
              encryption_algorithm=AlgoInfoV2(EncAlg.AES_CBC_128, 16, 0, 0))
    fw = Firmware(Capabilities())
    handle = _add_ex(fw, sa, enc_key + auth_key)
    frame = _host_built(0x3003, 4, _udp_payload(b"sha-256-128"), 16, 16, 16)
    res = fw.transmit(frame, handle, False)
    assert res.status == TxOutcome.OK
    peer = SecurityAssociation(ESP, spi=0x3003, crypt_algo="AES-CBC", crypt_key=enc_key,
                               auth_algo="SHA2-256-128", auth_key=auth_key)
    assert peer.decrypt(Ether(res.frame)[IP])[Raw].load == b"sha-256-128"


def test_esn_high_half_is_32_bits_on_transmit():
    """Decision 3: sequence_number_high_order is the whole high 32 bits (scapy ESN as the oracle)."""
    hi = 0x89ABCDEF
    fw = Firmware(Capabilities())
    handle = _add_ex(fw, _gcm_sa(0x3004, 16, esn=True, hi=hi), GCM_KEY + SALT)
    res = fw.transmit(_host_built(0x3004, 2, _udp_payload(b"esn"), 8, 4, 16), handle, False)
    assert res.status == TxOutcome.OK

    def scapy_rx(high: int) -> SecurityAssociation:
        return SecurityAssociation(ESP, spi=0x3004, crypt_algo="AES-GCM", crypt_key=GCM_KEY + SALT,
                                   esn_en=True, esn=high)

    assert scapy_rx(hi).decrypt(Ether(res.frame)[IP])[Raw].load == b"esn"
    with pytest.raises(Exception):  # noqa: B017 -- scapy raises its own IPSecIntegrityError
        scapy_rx(hi & 1).decrypt(Ether(res.frame)[IP])


def _v1_request(entries: list[ndis.SaV1], num_sas: int, key_mat: bytes) -> bytes:
    slots = (entries + [ndis.SaV1()] * 3)[:3]
    return ndis.V1AddSa(ndis.addr4(A), b"\xff" * 4, ndis.addr4(B), b"\xff" * 4, 0, 0, 0, bytes(4), bytes(4),
                        ndis.V1SaFlags.INBOUND, num_sas, tuple(slots), len(key_mat), key_mat).pack()


def test_v1_num_sas_and_bundle_order():
    """Decision 7: num_sas is 1 or 2 and the only pair is ESP (ENCRYPT) then AH (AUTHENTICATE)."""
    sha = ndis.AlgoInfoV1(ndis.V1IntegrityAlgo.SHA, 20)
    esp = ndis.SaV1(ndis.V1Operation.ENCRYPT, 0x4001, sha, ndis.AlgoInfoV1(ndis.V1ConfAlgo.NONE, 0))
    ah = ndis.SaV1(ndis.V1Operation.AUTHENTICATE, 0x4002, sha)
    keys = bytes(range(20)) + bytes(range(20, 40))
    fw = Firmware(Capabilities())
    for entries, n in (([esp, ah, esp], 3), ([esp, ah], 0), ([ah, esp], 2)):
        assert fw.execute(Opcode.V1_ADD_SA, _v1_request(entries, n, keys))[0] == NdisStatus.INVALID_PARAMETER
    assert fw.stats().reject_bad_bundle == 3 and len(fw.sadb) == 0
    assert fw.execute(Opcode.V1_ADD_SA, _v1_request([esp, ah], 2, keys))[0] == NdisStatus.SUCCESS
    assert fw.execute(Opcode.V1_ADD_SA, _v1_request([esp], 1, keys[:20]))[0] == NdisStatus.INVALID_PARAMETER  # dup
    assert len(fw.sadb) == 1 and fw.stats().reject_duplicate_spi == 1


# ---- other datasheet claims ----------------------------------------------------------------------------


def test_inbound_packet_offload_sa_is_never_chosen_by_selector():
    """§5.2: selectors pick outbound SAs only; an inbound SA with a selector must not encrypt traffic."""
    fw = Firmware(Capabilities())
    key = GCM_KEY + SALT
    sa = _gcm_sa(0x5001, 16)
    req = ndis.AddSaPacket(1, ndis.V2AddFlags.INBOUND, ndis.addr16(A), ndis.addr16(B), 0, (sa, SaV2()), len(key),
                           ndis.ADD_SA_PACKET.size, 0, 0, Mode.TRANSPORT, 0, 0, 64, 0,
                           sel_src=ndis.addr16(A), sel_dst=ndis.addr16(B), sel_src_prefix=32, sel_dst_prefix=32,
                           sel_flags=ndis.SEL_PRESENT, key_data=key).pack()
    assert fw.execute(Opcode.ADD_SA_PACKET, req)[0] == NdisStatus.SUCCESS
    plain = bytes(Ether() / IP(src=A, dst=B) / UDP(sport=5, dport=6) / Raw(b"must not leave encrypted"))
    assert fw.transmit(plain, 0, True).status == TxOutcome.NO_SA


def test_forged_high_sequence_number_does_not_ask_for_a_rekey():
    """§7.7: only an authenticated sequence number near 2^32 raises SaDeleteReq."""
    fw = Firmware(Capabilities())
    _add_ex(fw, _gcm_sa(0x6001, 16), GCM_KEY + SALT, inbound=True)
    sender = SecurityAssociation(ESP, spi=0x6001, crypt_algo="AES-GCM", crypt_key=GCM_KEY + SALT)
    genuine = bytes(Ether() / sender.encrypt(IP(src=A, dst=B) / UDP() / Raw(b"late"), seq_num=0xFFFF_FFF0))
    forged = bytearray(genuine)
    forged[-1] ^= 1
    rx = fw.receive(bytes(forged))
    assert rx.crypto_status == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED and not rx.sa_delete_req
    rx = fw.receive(genuine)
    assert rx.crypto_status == CryptoStatus.SUCCESS and rx.sa_delete_req
