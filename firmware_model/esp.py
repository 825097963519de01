"""ESP wire format (RFC 4303) and the per-algorithm ESP transforms.

Wire layout (RFC 4303 §2): SPI(4) | Seq(4) | IV | payload | padding | pad length(1) | next header(1) | ICV.
A transform turns (ESP header, ESN high half, IV, plaintext incl. trailer) into ciphertext||ICV and back.
Cipher and MAC objects are built once per SA and reused for every packet (see perf-anchors.md): AESGCM
is reused, CBC runs on a persistent, never-finalised context (the chaining value is corrected with one
block XOR per packet), HMACs are pre-keyed and `.copy()`-ed.

IP framing helpers used by the engine and by ah.py live here too (no other module owns IP parsing).
"""

from __future__ import annotations

import hmac as _hmac_cmp
import os
import struct
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from device.contract.algorithms import GCM_SALT_LEN
from device.contract.enums import EncAlg
from device.contract.net import (
    IPV6_DSTOPTS,
    IPV6_HOPOPTS,
    IPV6_ROUTING,
)
from device.contract.sa import SaParams, effective_icv_len
from device.contract.status import CryptoStatus
from firmware_model.algorithms import HASHES, _triple_des, auth_info, enc_info


class Verdict(IntEnum):
    """Outcome of one engine operation (the facade maps it onto NDIS CryptoStatus)."""

    OK = 0
    AUTH_FAILED = 1  # ICV mismatch
    REPLAY = 2  # duplicate or left of the anti-replay window (RFC 4303 §3.4.3)
    BAD_SYNTAX = 3  # short/truncated packet, bad lengths, bad padding
    WRONG_PROTOCOL = 4  # IPsec header that is not this SA's (other SPI, AH vs ESP)
    SEQ_OVERFLOW = 5  # outbound counter would cycle without ESN (RFC 4303 §3.3.3)
    HARD_LIMIT = 6  # hard packet/byte lifetime reached; SA must be replaced
    DUMMY = 7  # next header 59: dummy/TFC packet, discard silently (RFC 4303 §2.6)
    NOT_ESP = 8  # not IPsec at all: NAT keepalive, IKE (non-ESP marker), other protocol -> pass on


_AUTH_FAILED = {
    # (is_ah, is_tunnel) -> status
    (False, False): CryptoStatus.TRANSPORT_ESP_AUTH_FAILED,
    (True, False): CryptoStatus.TRANSPORT_AH_AUTH_FAILED,
    (False, True): CryptoStatus.TUNNEL_ESP_AUTH_FAILED,
    (True, True): CryptoStatus.TUNNEL_AH_AUTH_FAILED,
}
_CRYPTO_STATUS: dict[int, CryptoStatus | None] = {
    # A dummy packet (next header 59) passed its ICV: RFC 4303 §2.6.
    Verdict.OK: CryptoStatus.SUCCESS,
    Verdict.DUMMY: CryptoStatus.SUCCESS,
    Verdict.AUTH_FAILED: None,  # depends on AH/ESP and transport/tunnel
    Verdict.BAD_SYNTAX: CryptoStatus.INVALID_PACKET_SYNTAX,
    Verdict.WRONG_PROTOCOL: CryptoStatus.INVALID_PROTOCOL,
    # Every other verdict (REPLAY, HARD_LIMIT, SEQ_OVERFLOW, ...) is an outcome NDIS has no code for (NDIS
    # leaves anti-replay to the host): GENERIC_ERROR; the precise reason travels separately as the verdict.
}


def crypto_status_for(verdict: int, *, ah: bool, tunnel: bool) -> CryptoStatus:
    """Map an engine ``Verdict`` for a received packet to the NDIS CryptoStatus.

    ``ah`` says which header failed (AH or ESP), ``tunnel`` whether the SA is a tunnel-mode SA
    (NDIS distinguishes CRYPTO_TRANSPORT_* from CRYPTO_TUNNEL_* auth failures).
    """
    status = _CRYPTO_STATUS.get(int(verdict), CryptoStatus.GENERIC_ERROR)
    if status is None:
        return _AUTH_FAILED[(ah, tunnel)]
    return status



ESP_HDR = struct.Struct("!II")  # SPI, Seq (RFC 4303 §2)
ESP_HDR_LEN = 8
U32 = struct.Struct("!I")
U64 = struct.Struct("!Q")
U16 = struct.Struct("!H")
UDP_HDR = struct.Struct("!HHHH")  # RFC 768; RFC 3948 §2.1 sends checksum 0
NAT_KEEPALIVE = b"\xff"  # RFC 3948 §2.3
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2

# RFC 4303 §2.4: default padding is the byte sequence 1, 2, 3, ...
PAD_BYTES = bytes(range(1, 256))

_TRAILER_TABLES: dict[int, list[list[bytes]]] = {}


def trailer_table(align: int) -> list[list[bytes]]:
    """table[next_header][payload_len % align] = padding || pad length || next header, with the least
    padding that makes payload + trailer a multiple of `align` (RFC 4303 §2.4). Shared by all SAs."""
    table = _TRAILER_TABLES.get(align)
    if table is None:
        table = []
        for nh in range(256):
            row = []
            for rem in range(align):
                padlen = -(rem + 2) % align
                row.append(PAD_BYTES[:padlen] + bytes((padlen, nh)))
            table.append(row)
        _TRAILER_TABLES[align] = table
    return table


def strip_trailer(plaintext: bytes) -> tuple[int, int]:
    """Check the trailer of decrypted data; returns (payload_len, next_header) or (-1, 0) if the pad
    length does not fit or the padding is not 1, 2, 3, ... (RFC 4303 §2.4: receiver SHOULD check)."""
    n = len(plaintext)
    if n < 2:
        return -1, 0
    padlen = plaintext[-2]
    end = n - 2 - padlen
    if end < 0 or plaintext[end:n - 2] != PAD_BYTES[:padlen]:
        return -1, 0
    return end, plaintext[-1]


class UdpPayloadKind(IntEnum):
    ESP = 0
    KEEPALIVE = 1  # RFC 3948 §2.3: one 0xFF byte, receivers ignore it
    NON_ESP = 2  # RFC 3948 §2.2: starts with four zero bytes (IKE)
    TOO_SHORT = 3


def classify_udp_payload(payload: bytes | bytearray | memoryview) -> UdpPayloadKind:
    """Classify the payload of a UDP datagram on the NAT-T port (RFC 3948 §2.2/§2.3; the SPI of a real
    ESP packet is never zero, which is what makes the marker unambiguous)."""
    if len(payload) == 1 and payload[0] == 0xFF:
        return UdpPayloadKind.KEEPALIVE
    if len(payload) >= 4 and payload[:4] == NON_ESP_MARKER:
        return UdpPayloadKind.NON_ESP
    if len(payload) < ESP_HDR_LEN:
        return UdpPayloadKind.TOO_SHORT
    return UdpPayloadKind.ESP


# ---------------------------------------------------------------------------------------------------
# IP helpers (pure; shared with ah.py and engine.py)

_HDR_WORDS = {ihl: struct.Struct(f"!{ihl * 2}H") for ihl in range(5, 16)}


def ipv4_checksum(header: bytes | bytearray) -> int:
    """RFC 791 header checksum over `header` (checksum field must already be zero)."""
    total = sum(_HDR_WORDS[len(header) >> 2].unpack(header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fold_checksum(total: int) -> int:
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv6_transport_split(packet: bytes | bytearray, limit: int) -> tuple[int, int]:
    """Where ESP/AH goes in an IPv6 packet for transport mode (RFC 4303 §3.1.1, RFC 4302 §3.1.1): after
    hop-by-hop and routing headers and after destination options that come before a routing header;
    destination options after a routing header stay protected (the same placement as scapy).
    Returns (offset of the next-header byte to patch, offset of the protected payload), or (-1, -1) if
    the header chain is truncated."""
    nh_at = 6
    off = 40
    nh = packet[6]
    seen_routing = False
    while nh in (IPV6_HOPOPTS, IPV6_ROUTING, IPV6_DSTOPTS):
        if nh == IPV6_ROUTING:
            seen_routing = True
        elif nh == IPV6_DSTOPTS and seen_routing:
            break
        if off + 2 > limit:
            return -1, -1
        nh_at = off
        nh = packet[off]
        off += (packet[off + 1] + 1) * 8
        if off > limit:
            return -1, -1
    return nh_at, off


def ipv6_find_header(packet: bytes | bytearray, start: int, limit: int,
                     wanted: tuple[int, ...]) -> tuple[int, int, int]:
    """Walk the IPv6 extension-header chain of the fixed header at `start` up to the first header in
    `wanted` or the first other header (a fragment header stops the walk). Returns (protocol, its offset, offset of the byte that
    names it), or (-1, -1, -1) if the chain runs past `limit`."""
    nh_at = start + 6
    nh = packet[nh_at]
    off = start + 40
    while nh not in wanted and nh in (IPV6_HOPOPTS, IPV6_ROUTING, IPV6_DSTOPTS):
        if off + 8 > limit:
            return -1, -1, -1
        length = (packet[off + 1] + 1) * 8
        nh_at = off
        nh = packet[off]
        off += length
    if off > limit:
        return -1, -1, -1
    return nh, off, nh_at


# ---------------------------------------------------------------------------------------------------
# Transforms

class GcmTransform:
    """AES-GCM ESP, RFC 4106: nonce = salt || IV (§4), AAD = SPI || Seq or SPI || Seq-high || Seq-low
    with ESN (§5), ICV = the GCM tag truncated to 8/12/16 bytes (§6)."""

    __slots__ = ("_aead", "_salt", "icv_len", "iv_len", "block", "_cut")

    def __init__(self, key: bytes, salt: bytes, icv_len: int) -> None:
        self._aead = AESGCM(key)
        self._salt = salt
        self.icv_len = icv_len
        self.iv_len = 8
        self.block = 1
        self._cut = icv_len - 16  # 0 = full tag

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        aad = hdr if seq_hi is None else hdr[:4] + U32.pack(seq_hi) + hdr[4:]
        out = self._aead.encrypt(self._salt + iv, plaintext, aad)
        return out[:self._cut] if self._cut else out

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, body: bytes) -> bytes | None:
        aad = hdr if seq_hi is None else hdr[:4] + U32.pack(seq_hi) + hdr[4:]
        nonce = self._salt + iv
        if not self._cut:
            try:
                return self._aead.decrypt(nonce, body, aad)
            except InvalidTag:
                return None
        # Truncated tag: AESGCM.decrypt only takes 16-byte tags. GCM encryption is an XOR with a
        # keystream, so "encrypting" the ciphertext yields the candidate plaintext; re-encrypting that
        # gives the full tag to compare with the received prefix. Nothing leaves before the compare.
        cut = len(body) - self.icv_len
        candidate = self._aead.encrypt(nonce, body[:cut], aad)[:cut]
        tag = self._aead.encrypt(nonce, candidate, aad)[cut:cut + self.icv_len]
        if not _hmac_cmp.compare_digest(tag, body[cut:]):
            return None
        return candidate


class GmacTransform:
    """ENCR_NULL_AUTH_AES_GMAC, RFC 4543 §3: no confidentiality; nonce = salt || IV; AAD = SPI, (E)SN,
    IV and the whole payload incl. padding/pad length/next header; empty plaintext; 16-byte ICV
    (draft-mcgrew-gcm-test-01 §3 confirms the IV is in the AAD)."""

    __slots__ = ("_aead", "_salt", "icv_len", "iv_len", "block")

    def __init__(self, key: bytes, salt: bytes) -> None:
        self._aead = AESGCM(key)
        self._salt = salt
        self.icv_len = 16
        self.iv_len = 8
        self.block = 1

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        head = hdr if seq_hi is None else hdr[:4] + U32.pack(seq_hi) + hdr[4:]
        return plaintext + self._aead.encrypt(self._salt + iv, b"", head + iv + plaintext)

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, body: bytes) -> bytes | None:
        head = hdr if seq_hi is None else hdr[:4] + U32.pack(seq_hi) + hdr[4:]
        data = body[:-16]
        try:
            self._aead.decrypt(self._salt + iv, body[-16:], head + iv + data)
        except InvalidTag:
            return None
        return data


class CbcHmacTransform:
    """AES-CBC (RFC 3602) / 3DES-CBC (RFC 2451) or NULL encryption (RFC 2410), with HMAC-SHA1-96
    (RFC 2404), HMAC-SHA-256-128 (RFC 4868), HMAC-MD5-96 (RFC 2403) or no integrity.

    The ICV covers SPI, Seq, IV and ciphertext; with ESN the high 32 bits are appended after them for
    the ICV computation only (RFC 4303 §2.2.1, §3.3.2.1, §3.4.4.1). Inbound, the ICV is verified before
    decrypting (RFC 4303 §3.4.4.1).
    """

    __slots__ = ("_enc", "_dec", "_enc_chain", "_dec_chain", "_mac", "_ivgen", "_iv_counter",
                 "icv_len", "iv_len", "block")

    def __init__(self, cipher_alg, mac_base, icv_len: int) -> None:
        self._mac = mac_base
        self.icv_len = icv_len
        if cipher_alg is None:  # NULL encryption, RFC 2410: no IV, block size 1
            self._enc = self._dec = None
            self.iv_len = 0
            self.block = 1
            return
        block = cipher_alg.block_size // 8
        self.block = block
        self.iv_len = block
        zero = bytes(block)
        # Persistent contexts: CBC chains from the last ciphertext block we fed; seal/open fold the real
        # IV into the first block with one XOR instead of building a Cipher per packet.
        self._enc = Cipher(cipher_alg, modes.CBC(zero)).encryptor()
        self._dec = Cipher(cipher_alg, modes.CBC(zero)).decryptor()
        self._enc_chain = 0
        self._dec_chain = 0
        # RFC 3602 §3 wants unpredictable IVs: AES-ECB of a counter under a random per-SA key (the
        # counter-encryption construction of NIST SP 800-38A App. C), one cheap block op per packet.
        self._ivgen = Cipher(algorithms.AES(os.urandom(16)), modes.ECB()).encryptor()
        self._iv_counter = 0

    def next_iv(self) -> bytes:
        if not self.iv_len:
            return b""
        self._iv_counter += 1
        return self._ivgen.update(self._iv_counter.to_bytes(16, "big"))[:self.iv_len]

    def _icv(self, hdr: bytes, seq_hi: int | None, iv: bytes, ciphertext: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(hdr)
        if iv:
            mac.update(iv)
        mac.update(ciphertext)
        if seq_hi is not None:
            mac.update(U32.pack(seq_hi))
        return mac.finalize()[:self.icv_len]

    def seal(self, hdr: bytes, seq_hi: int | None, iv: bytes, plaintext: bytes) -> bytes:
        if self._enc is None:
            ciphertext = plaintext
        else:
            b = self.block
            first = int.from_bytes(plaintext[:b], "big") ^ int.from_bytes(iv, "big") ^ self._enc_chain
            ciphertext = self._enc.update(first.to_bytes(b, "big") + plaintext[b:])
            self._enc_chain = int.from_bytes(ciphertext[-b:], "big")
        if self._mac is None:
            return ciphertext
        return ciphertext + self._icv(hdr, seq_hi, iv, ciphertext)

    def open(self, hdr: bytes, seq_hi: int | None, iv: bytes, body: bytes) -> bytes | None:
        icv_len = self.icv_len
        if icv_len:
            ciphertext = body[:-icv_len]
            if not _hmac_cmp.compare_digest(self._icv(hdr, seq_hi, iv, ciphertext), body[-icv_len:]):
                return None
        else:
            ciphertext = body
        if self._dec is None:
            return bytes(ciphertext)
        b = self.block
        out = self._dec.update(ciphertext)
        fix = int.from_bytes(out[:b], "big") ^ self._dec_chain ^ int.from_bytes(iv, "big")
        self._dec_chain = int.from_bytes(ciphertext[-b:], "big")
        return fix.to_bytes(b, "big") + out[b:]


EspTransform = GcmTransform | GmacTransform | CbcHmacTransform


def hmac_base(hash_name: str, key: bytes) -> hmac.HMAC:
    return hmac.HMAC(key, HASHES[hash_name]())


def build_esp_transform(params: SaParams) -> EspTransform:
    """One transform per SA (raises UnsupportedAlgorithm/ValueError for refused parameters)."""
    enc = enc_info(params.enc_alg)
    auth = auth_info(params.auth_alg)
    if enc.kind == "aead":
        key = params.enc_key
        return GcmTransform(key[:-GCM_SALT_LEN], key[-GCM_SALT_LEN:], params.icv_len)
    if auth.kind == "gmac":
        key = params.auth_key
        return GmacTransform(key[:-GCM_SALT_LEN], key[-GCM_SALT_LEN:])
    cipher_alg = None
    if params.enc_alg == EncAlg.TDES_CBC:
        cipher_alg = _triple_des()(params.enc_key)
    elif enc.kind == "cbc":
        cipher_alg = algorithms.AES(params.enc_key)
    mac = hmac_base(auth.hash_name, params.auth_key) if auth.kind == "hmac" else None
    return CbcHmacTransform(cipher_alg, mac, effective_icv_len(params) if mac else 0)
