"""AH integrity is HMAC only (datasheet §12.1 decision 23): an AH SA, or the AH half of an ESP-then-AH bundle,
with AES-GMAC is refused as NOT_SUPPORTED / UNSUPPORTED_ALGORITHM on every add path that can name it."""

from __future__ import annotations

import pytest

from device.contract import ndis
from device.contract.enums import AuthAlg, EncAlg
from device.contract.ndis import AlgoInfoV2, NdisStatus, Opcode, RejectReason, SaV2, V2AddFlags, V2Operation
from firmware_model.capabilities import Capabilities
from firmware_model.firmware import Firmware

from .fw_builders import GCM_KEY, SALT, A, B

GMAC_KEY = bytes(range(16)) + SALT  # AES-GMAC-128: key || 4-byte salt (RFC 4543 §8)
SHA1_KEY = bytes(range(20))
MESSAGE = "AH integrity must be an HMAC; aes-gmac-128 is offered for ESP only"


def _ah(spi: int, alg: AuthAlg, key_len: int, offset: int = 0) -> SaV2:
    return SaV2(operation=V2Operation.AH, spi=spi, authentication_algorithm=AlgoInfoV2(alg, key_len, offset, 0))


def _ah_only_ex(alg: AuthAlg, key: bytes) -> bytes:
    return ndis.V2AddSaEx(1, V2AddFlags.INBOUND, ndis.addr16(A), ndis.addr16(B), 0, (_ah(0x900, alg, len(key)), SaV2()),
                          len(key), ndis.V2_ADD_SA_EX.size, key_data=key).pack()


def _bundle_entry(spi: int, ah_alg: AuthAlg, ah_key: bytes) -> ndis.V2AddSa:
    esp_key = GCM_KEY + SALT
    esp = SaV2(operation=V2Operation.ESP, spi=spi, encryption_algorithm=AlgoInfoV2(EncAlg.AES_GCM_128, len(esp_key), 0, 16))
    key = esp_key + ah_key
    return ndis.V2AddSa(0, 2, V2AddFlags.INBOUND, ndis.addr16(A), ndis.addr16(B), 0,
                        (esp, _ah(spi + 1, ah_alg, len(ah_key), len(esp_key))), len(key), key)


def test_v2_add_sa_ex_refuses_an_ah_only_sa_with_gmac():
    fw = Firmware(Capabilities())
    assert AuthAlg.AES_GMAC_128 in fw.caps.integrity  # advertised, for ESP: the refusal is AH's rule, not the profile's
    status, _ = fw.execute(Opcode.V2_ADD_SA_EX, _ah_only_ex(AuthAlg.AES_GMAC_128, GMAC_KEY))
    assert status == NdisStatus.NOT_SUPPORTED and fw.last_error == MESSAGE
    assert len(fw.sadb) == 0 and fw.stats().reject_unsupported_algorithm == 1
    status, _ = fw.execute(Opcode.V2_ADD_SA_EX, _ah_only_ex(AuthAlg.SHA1, SHA1_KEY))
    assert status == NdisStatus.SUCCESS and len(fw.sadb) == 1


def test_v2_add_sa_list_refuses_the_ah_half_of_a_bundle_with_gmac():
    fw = Firmware(Capabilities())
    status, resp = fw.execute(Opcode.V2_ADD_SA, ndis.pack_v2_add_sa_list([
        _bundle_entry(0x910, AuthAlg.AES_GMAC_128, GMAC_KEY), _bundle_entry(0x920, AuthAlg.SHA1, SHA1_KEY)]))
    assert status == NdisStatus.SUCCESS  # partial success: the HMAC bundle is offloaded
    refused, added = ndis.unpack_counted(resp, ndis.V2_ADD_SA_RESULT)
    assert (refused.offload_handle, refused.status, refused.reason) == \
        (0, NdisStatus.NOT_SUPPORTED, RejectReason.UNSUPPORTED_ALGORITHM)
    assert added.offload_handle and added.status == NdisStatus.SUCCESS
    assert len(fw.sadb) == 1


def test_v1_has_no_gmac_code_point():
    """The v1 add path cannot name AES-GMAC at all (OFFLOAD_INTEGRITY_ALGO: none, MD5, SHA), so the rule
    needs no v1 check; an unknown v1 integrity value is refused like any other."""
    assert [a.name for a in ndis.V1IntegrityAlgo] == ["NONE", "MD5", "SHA"]


@pytest.mark.parametrize("alg", [AuthAlg.AES_GMAC_128, AuthAlg.AES_GMAC_192, AuthAlg.AES_GMAC_256])
def test_firmware_add_sa_refuses_every_gmac_size_for_ah(alg):
    from device.contract.enums import Direction, IpProto, Mode
    from device.contract.sa import SaParams
    from firmware_model.algorithms import AUTH_INFO
    from firmware_model.sadb import SaRejected

    info = AUTH_INFO[alg]
    ah = SaParams(spi=0x930, proto=IpProto.AH, direction=Direction.INBOUND, mode=Mode.TRANSPORT, src=A, dst=B,
                  auth_alg=alg, auth_key=bytes(info.key_len + info.salt_len), icv_len=16)
    with pytest.raises(SaRejected, match="AH integrity must be an HMAC") as refused:
        Firmware(Capabilities()).sadb.add([ah])
    assert refused.value.reason == RejectReason.UNSUPPORTED_ALGORITHM
