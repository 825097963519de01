"""Which algorithms this firmware can honestly run: the contract's facts (device/contract/algorithms.py)
with availability probed against `cryptography` at import time, and lookups that refuse the others.
"""

from __future__ import annotations

from dataclasses import replace

from cryptography.hazmat.primitives import hashes

from device.contract.algorithms import AUTH_INFO as CONTRACT_AUTH_INFO
from device.contract.algorithms import ENC_INFO as CONTRACT_ENC_INFO
from device.contract.algorithms import AuthInfo, EncInfo
from device.contract.enums import AuthAlg, EncAlg
from device.contract.sa import SaParams, available, validate_sa


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


_TDES_REASON = _probe_triple_des()
_MD5_REASON = _probe_md5()

# The contract's algorithm facts plus what this firmware's crypto library can run.
ENC_INFO: dict[EncAlg, EncInfo] = {**CONTRACT_ENC_INFO, EncAlg.TDES_CBC: replace(CONTRACT_ENC_INFO[EncAlg.TDES_CBC],
                                                                                  unavailable=_TDES_REASON)}
AUTH_INFO: dict[AuthAlg, AuthInfo] = {**CONTRACT_AUTH_INFO, AuthAlg.MD5: replace(CONTRACT_AUTH_INFO[AuthAlg.MD5],
                                                                                 unavailable=_MD5_REASON)}

HASHES = {"md5": hashes.MD5, "sha1": hashes.SHA1, "sha256": hashes.SHA256}


def enc_info(alg: EncAlg) -> EncInfo:
    return available(ENC_INFO, alg, "encryption")


def auth_info(alg: AuthAlg) -> AuthInfo:
    return available(AUTH_INFO, alg, "integrity")


def check_sa(params: SaParams) -> None:
    """validate_sa against what this firmware can run (raises SaInvalid / UnsupportedAlgorithm)."""
    validate_sa(params, ENC_INFO, AUTH_INFO)
