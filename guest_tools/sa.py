"""Firmware status -> message for a user, and the host's ESP framing facts for a crypto-offload SA.

The SA encoders themselves are part of the card's interface (device/contract/sa.py).
"""

from __future__ import annotations

from device.contract.algorithms import AUTH_INFO, ENC_INFO, esp_align
from device.contract.enums import EncAlg, IpProto, Mode
from device.contract.sa import SaParams, effective_icv_len
from device.contract.status import NdisStatus
from guest_tools.packets import AhGeometry, EspGeometry

# What each firmware status means for a user, and what to check.
STATUS_HELP: dict[int, str] = {
    NdisStatus.SUCCESS: "success",
    NdisStatus.NOT_ACCEPTED: "firmware is resetting: retry after the card reports READY",
    NdisStatus.FAILURE: "the firmware refused the command (see 'stats' reject counters for the reason)",
    NdisStatus.INVALID_PARAMETER: "invalid parameter: unknown or stale SA handle, wrong SPI/operation, "
    "or a field the card does not accept",
    NdisStatus.RESOURCES: "SA table full: delete SAs first ('sa list', 'sa del')",
    NdisStatus.NOT_SUPPORTED: "not supported by this card: check 'caps' (algorithms, ESN, UDP-ESP, IPv6, tunnel)",
    NdisStatus.REQUEST_ABORTED: "command aborted (card reset while it ran)",
    NdisStatus.INVALID_LENGTH: "payload length does not match the command layout (driver/firmware version "
    "mismatch?)",
    NdisStatus.INVALID_DATA: "a field holds an impossible value (bad key length, algorithm, address or flags)",
    NdisStatus.BUFFER_TOO_SHORT: "response buffer too short",
    NdisStatus.INVALID_OID: "unknown command opcode (firmware too old for this tool?)",
}


def status_name(status: int) -> str:
    try:
        return NdisStatus(status).name
    except ValueError:
        return f"{status:#010x}"


def status_message(status: int) -> str:
    return f"{status_name(status)}: {STATUS_HELP.get(status, 'unknown NDIS status')}"


def esp_geometry(p: SaParams):
    """IV/ICV/alignment facts the host needs to frame crypto-offload ESP for ``p``."""
    if p.proto != IpProto.ESP:
        raise ValueError("the host ESP framing applies to ESP SAs only")
    enc = ENC_INFO[p.enc_alg]
    iv = enc.iv_len
    if p.enc_alg == EncAlg.NONE and AUTH_INFO[p.auth_alg].kind == "gmac":
        iv = 8  # ENCR_NULL_AUTH_AES_GMAC carries an 8-byte IV (RFC 4543 §3.1); NULL + HMAC has none
    encap = (p.encap.sport, p.encap.dport) if p.encap is not None else None
    return EspGeometry(p.spi, iv, effective_icv_len(p), esp_align(enc.block), p.mode == Mode.TUNNEL, encap, p.src, p.dst)


def ah_geometry(p: SaParams) -> AhGeometry:
    """IV/ICV facts the host needs to frame crypto-offload AH for ``p`` (RFC 4302 §2)."""
    if p.proto != IpProto.AH:
        raise ValueError("the host AH framing applies to AH SAs only")
    # No IV: AH integrity is HMAC only (validate_sa refuses AH-GMAC, whose RFC 4543 §3.2 IV would go here).
    return AhGeometry(p.spi, 0, effective_icv_len(p), p.mode == Mode.TUNNEL, p.src, p.dst)
