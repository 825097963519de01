"""Per-algorithm facts a driver needs to program an SA: names, key/salt/IV/ICV sizes, padding.

Sizes come from the defining RFCs: AES-GCM RFC 4106 (§3.1 IV 8, §6 ICV 8/12/16, §8.1 4-byte salt at the
end of the key material), AES-GMAC RFC 4543 (IV 8, ICV 16, salt 4), AES-CBC RFC 3602 (§3 IV 16, block 16),
3DES-CBC RFC 2451 (IV 8, block 8), HMAC-MD5-96 RFC 2403, HMAC-SHA1-96 RFC 2404 (ICV 12), HMAC-SHA-256-128
RFC 4868 (§2.1 key 32, ICV 16). Which of them a card runs is in its capabilities (ENC_ALGOS / AUTH_ALGOS);
the firmware model adds what its crypto library can do (firmware_model/algorithms.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from device.contract.enums import AuthAlg, EncAlg

GCM_SALT_LEN = 4  # RFC 4106 §4 / RFC 4543 §3.1
GCM_IV_LEN = 8
# Datasheet policy: single DES is refused by every card, whatever its crypto library offers.
DES_REFUSED = "DES-CBC is refused: single DES is broken (RFC 8221: MUST NOT) and cryptography has no DES"


@dataclass(frozen=True)
class EncInfo:
    name: str
    kind: str  # "aead" (GCM), "cbc", "null"
    key_len: int  # cipher key bytes, without salt
    salt_len: int
    iv_len: int
    block: int  # cipher block size for padding (1 for counter modes); ESP aligns to lcm(block, 4)
    icv_lens: tuple[int, ...] = ()  # combined-mode ICV choices
    unavailable: str = ""  # non-empty = refused, with the reason


@dataclass(frozen=True)
class AuthInfo:
    name: str
    kind: str  # "hmac", "gmac", "null"
    key_len: int  # without salt
    salt_len: int
    icv_len: int
    hash_name: str = ""
    unavailable: str = ""


ENC_INFO: dict[EncAlg, EncInfo] = {
    EncAlg.NONE: EncInfo("null", "null", 0, 0, 0, 1),
    EncAlg.DES_CBC: EncInfo("des-cbc", "cbc", 8, 0, 8, 8, unavailable=DES_REFUSED),
    EncAlg.TDES_CBC: EncInfo("3des-cbc", "cbc", 24, 0, 8, 8),
    EncAlg.AES_GCM_128: EncInfo("aes-gcm-128", "aead", 16, GCM_SALT_LEN, GCM_IV_LEN, 1, (8, 12, 16)),
    EncAlg.AES_GCM_192: EncInfo("aes-gcm-192", "aead", 24, GCM_SALT_LEN, GCM_IV_LEN, 1, (8, 12, 16)),
    EncAlg.AES_GCM_256: EncInfo("aes-gcm-256", "aead", 32, GCM_SALT_LEN, GCM_IV_LEN, 1, (8, 12, 16)),
    EncAlg.AES_CBC_128: EncInfo("aes-cbc-128", "cbc", 16, 0, 16, 16),
    EncAlg.AES_CBC_192: EncInfo("aes-cbc-192", "cbc", 24, 0, 16, 16),
    EncAlg.AES_CBC_256: EncInfo("aes-cbc-256", "cbc", 32, 0, 16, 16),
}

AUTH_INFO: dict[AuthAlg, AuthInfo] = {
    AuthAlg.NONE: AuthInfo("null", "null", 0, 0, 0),
    AuthAlg.MD5: AuthInfo("hmac-md5-96", "hmac", 16, 0, 12, "md5"),
    AuthAlg.SHA1: AuthInfo("hmac-sha1-96", "hmac", 20, 0, 12, "sha1"),
    AuthAlg.SHA256: AuthInfo("hmac-sha256-128", "hmac", 32, 0, 16, "sha256"),
    AuthAlg.AES_GMAC_128: AuthInfo("aes-gmac-128", "gmac", 16, GCM_SALT_LEN, 16),
    AuthAlg.AES_GMAC_192: AuthInfo("aes-gmac-192", "gmac", 24, GCM_SALT_LEN, 16),
    AuthAlg.AES_GMAC_256: AuthInfo("aes-gmac-256", "gmac", 32, GCM_SALT_LEN, 16),
}

ENC_BY_NAME = {info.name: alg for alg, info in ENC_INFO.items()}
AUTH_BY_NAME = {info.name: alg for alg, info in AUTH_INFO.items() if alg != AuthAlg.NONE}


def esp_align(block: int) -> int:
    """RFC 4303 §2.4: ciphertext a multiple of the block size and the trailer 4-byte aligned."""
    align = 4
    while align % block:
        align += 4
    return align
