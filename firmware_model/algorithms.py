"""Per-algorithm facts (sizes, names) and which ones this firmware can honestly run.

Sizes come from the defining RFCs: AES-GCM RFC 4106 (§3.1 IV 8, §6 ICV 8/12/16, §8.1 4-byte salt at the
end of the key material), AES-GMAC RFC 4543 (IV 8, ICV 16, salt 4), AES-CBC RFC 3602 (§3 IV 16, block 16),
3DES-CBC RFC 2451 (IV 8, block 8), HMAC-MD5-96 RFC 2403, HMAC-SHA1-96 RFC 2404 (ICV 12), HMAC-SHA-256-128
RFC 4868 (§2.1 key 32, ICV 16). Availability is probed against `cryptography` at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from firmware_model.params import AuthAlg, EncAlg, IpProto, SaParams

GCM_SALT_LEN = 4  # RFC 4106 §4 / RFC 4543 §3.1
GCM_IV_LEN = 8


class UnsupportedAlgorithm(ValueError):
    """The SA asks for an algorithm (or combination) this firmware refuses."""


def _triple_des():
    """TripleDES moved to cryptography.hazmat.decrepit in cryptography 43; older releases keep it in
    primitives.ciphers.algorithms. Returns the class or None."""
    try:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    except ImportError:
        try:
            from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES  # type: ignore
        except ImportError:
            return None
    return TripleDES


def _probe_triple_des() -> str:
    cls = _triple_des()
    if cls is None:
        return "TripleDES is not offered by the installed cryptography package"
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        Cipher(cls(bytes(range(24))), modes.CBC(bytes(8))).encryptor().update(bytes(8))
    except Exception as exc:  # OpenSSL 3 may have the legacy provider disabled
        return f"TripleDES unavailable in this OpenSSL build ({type(exc).__name__})"
    return ""


def _probe_md5() -> str:
    try:
        from cryptography.hazmat.primitives import hmac

        mac = hmac.HMAC(bytes(16), hashes.MD5())
        mac.update(b"x")
        mac.finalize()
    except Exception as exc:  # FIPS builds refuse MD5
        return f"HMAC-MD5 unavailable ({type(exc).__name__})"
    return ""


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


_TDES_REASON = _probe_triple_des()
_MD5_REASON = _probe_md5()

ENC_INFO: dict[EncAlg, EncInfo] = {
    EncAlg.NONE: EncInfo("null", "null", 0, 0, 0, 1),
    EncAlg.DES_CBC: EncInfo(
        "des-cbc", "cbc", 8, 0, 8, 8,
        unavailable="DES-CBC is refused: single DES is broken (RFC 8221: MUST NOT) and cryptography has no DES",
    ),
    EncAlg.TDES_CBC: EncInfo("3des-cbc", "cbc", 24, 0, 8, 8, unavailable=_TDES_REASON),
    EncAlg.AES_GCM_128: EncInfo("aes-gcm-128", "aead", 16, GCM_SALT_LEN, GCM_IV_LEN, 1, (8, 12, 16)),
    EncAlg.AES_GCM_192: EncInfo("aes-gcm-192", "aead", 24, GCM_SALT_LEN, GCM_IV_LEN, 1, (8, 12, 16)),
    EncAlg.AES_GCM_256: EncInfo("aes-gcm-256", "aead", 32, GCM_SALT_LEN, GCM_IV_LEN, 1, (8, 12, 16)),
    EncAlg.AES_CBC_128: EncInfo("aes-cbc-128", "cbc", 16, 0, 16, 16),
    EncAlg.AES_CBC_192: EncInfo("aes-cbc-192", "cbc", 24, 0, 16, 16),
    EncAlg.AES_CBC_256: EncInfo("aes-cbc-256", "cbc", 32, 0, 16, 16),
}

AUTH_INFO: dict[AuthAlg, AuthInfo] = {
    AuthAlg.NONE: AuthInfo("null", "null", 0, 0, 0),
    AuthAlg.MD5: AuthInfo("hmac-md5-96", "hmac", 16, 0, 12, "md5", unavailable=_MD5_REASON),
    AuthAlg.SHA1: AuthInfo("hmac-sha1-96", "hmac", 20, 0, 12, "sha1"),
    AuthAlg.SHA256: AuthInfo("hmac-sha256-128", "hmac", 32, 0, 16, "sha256"),
    AuthAlg.AES_GMAC_128: AuthInfo("aes-gmac-128", "gmac", 16, GCM_SALT_LEN, 16),
    AuthAlg.AES_GMAC_192: AuthInfo("aes-gmac-192", "gmac", 24, GCM_SALT_LEN, 16),
    AuthAlg.AES_GMAC_256: AuthInfo("aes-gmac-256", "gmac", 32, GCM_SALT_LEN, 16),
}

HASHES = {"md5": hashes.MD5, "sha1": hashes.SHA1, "sha256": hashes.SHA256}


def enc_info(alg: EncAlg) -> EncInfo:
    info = ENC_INFO.get(alg)
    if info is None:
        raise UnsupportedAlgorithm(f"unknown encryption algorithm {int(alg):#x}")
    if info.unavailable:
        raise UnsupportedAlgorithm(info.unavailable)
    return info


def auth_info(alg: AuthAlg) -> AuthInfo:
    info = AUTH_INFO.get(alg)
    if info is None:
        raise UnsupportedAlgorithm(f"unknown integrity algorithm {int(alg):#x}")
    if info.unavailable:
        raise UnsupportedAlgorithm(info.unavailable)
    return info


def effective_icv_len(params: SaParams) -> int:
    """ICV bytes on the wire: the GCM choice, else the integrity algorithm's fixed truncation."""
    if ENC_INFO[params.enc_alg].kind == "aead":
        return params.icv_len
    return AUTH_INFO[params.auth_alg].icv_len


def check_sa_algorithms(params: SaParams) -> None:
    """Validate the algorithm combination and key lengths (raises UnsupportedAlgorithm/ValueError)."""
    enc = enc_info(params.enc_alg)
    auth = auth_info(params.auth_alg)
    if params.proto == IpProto.AH:
        if params.enc_alg != EncAlg.NONE:
            raise UnsupportedAlgorithm("AH has no encryption (RFC 4302); enc_alg must be NONE")
        if auth.kind == "null":
            raise UnsupportedAlgorithm("AH needs an integrity algorithm")
    else:
        if enc.kind == "aead" and auth.kind != "null":
            raise UnsupportedAlgorithm(f"{enc.name} is a combined mode; auth_alg must be NONE (RFC 4106 §1)")
        if auth.kind == "gmac" and enc.kind != "null":
            raise UnsupportedAlgorithm("AES-GMAC is ENCR_NULL_AUTH_AES_GMAC: enc_alg must be NONE (RFC 4543 §3)")
        if enc.kind == "null" and auth.kind == "null":
            raise UnsupportedAlgorithm("ESP with neither encryption nor integrity is not allowed (RFC 4303 §3.2)")
    if len(params.enc_key) != enc.key_len + enc.salt_len:
        raise ValueError(
            f"{enc.name} needs {enc.key_len + enc.salt_len}-byte enc_key"
            + (f" (key || {enc.salt_len}-byte salt)" if enc.salt_len else "")
            + f", got {len(params.enc_key)}"
        )
    if len(params.auth_key) != auth.key_len + auth.salt_len:
        raise ValueError(
            f"{auth.name} needs {auth.key_len + auth.salt_len}-byte auth_key"
            + (f" (key || {auth.salt_len}-byte salt)" if auth.salt_len else "")
            + f", got {len(params.auth_key)}"
        )
    if enc.kind == "aead":
        if params.icv_len not in enc.icv_lens:
            raise ValueError(f"{enc.name} ICV must be one of {enc.icv_lens} bytes (RFC 4106 §6)")
    elif auth.kind != "null" and params.icv_len != auth.icv_len:
        raise ValueError(f"{auth.name} ICV is {auth.icv_len} bytes, not {params.icv_len}")
