"""SA parameters shared by the SADB (commands side) and the crypto engine.

`SaParams` is the validated, immutable description of one security association. Key material never
appears in its repr (field(repr=False)), and `validate()` messages never quote key bytes.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache

# RFC 4303 §2.1: SPI values 1..255 are reserved by IANA, 0 is local-use only and never sent.
MIN_SPI = 256
MAX_SPI = 0xFFFF_FFFF
MAX_REPLAY_WINDOW = 65536  # well above the ">= 4096" goal; the bitmap costs W/8 bytes


class IpProto(IntEnum):
    ESP = 50
    AH = 51


class Direction(IntEnum):
    INBOUND = 1
    OUTBOUND = 2


class Mode(IntEnum):
    TRANSPORT = 0
    TUNNEL = 1


class EncAlg(IntEnum):
    """Values = NDIS v2 IPSEC_OFFLOAD_V2_ENCRYPTION_* identifiers."""

    NONE = 0x001
    DES_CBC = 0x002
    TDES_CBC = 0x004
    AES_GCM_128 = 0x008
    AES_GCM_192 = 0x010
    AES_GCM_256 = 0x020
    AES_CBC_128 = 0x040
    AES_CBC_192 = 0x080
    AES_CBC_256 = 0x100


class AuthAlg(IntEnum):
    """Values = NDIS v2 IPSEC_OFFLOAD_V2_AUTHENTICATION_* (the GCM ones mean AES-GMAC, RFC 4543)."""

    NONE = 0x00
    MD5 = 0x01
    SHA1 = 0x02
    SHA256 = 0x04
    AES_GMAC_128 = 0x08
    AES_GMAC_192 = 0x10
    AES_GMAC_256 = 0x20


@lru_cache(maxsize=65536)
def parse_address(addr: str) -> tuple[int, bytes]:
    """(IP version, packed bytes) of an address string, exactly as `ipaddress.ip_address` reads it;
    raises ValueError (the ipaddress message) for anything it refuses.

    Adding SAs in bulk spent most of its time here, so: results are cached (a table repeats a few
    endpoints), and a string that inet_pton accepts *and* that inet_ntop prints back unchanged is in
    canonical form, which ipaddress reads the same way -- those skip ipaddress's pure-Python parser.
    Everything else (leading zeros, scope ids, upper case, non-strings, garbage) goes to ipaddress."""
    if isinstance(addr, str):
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            try:
                packed = socket.inet_pton(family, addr)
            except (OSError, ValueError):
                continue
            if socket.inet_ntop(family, packed) == addr:
                return version, packed
    ip = ipaddress.ip_address(addr)
    return ip.version, ip.packed


@dataclass(frozen=True)
class UdpEncap:
    """RFC 3948 UDP encapsulation ports (NDIS only allows 4500)."""

    sport: int = 4500
    dport: int = 4500


@dataclass(frozen=True)  # (no slots: callers rely on vars()/__dict__ of SaParams)
class SaParams:
    spi: int
    proto: IpProto
    direction: Direction
    mode: Mode
    src: str  # SA endpoints (outer addresses; tunnel endpoints in tunnel mode)
    dst: str
    enc_alg: EncAlg = EncAlg.NONE
    enc_key: bytes = field(default=b"", repr=False)  # AES-GCM/GMAC: key || 4-byte salt (RFC 4106 §8.1)
    auth_alg: AuthAlg = AuthAlg.NONE
    auth_key: bytes = field(default=b"", repr=False)  # AES-GMAC: key || 4-byte salt (RFC 4543 §8)
    icv_len: int = 16
    esn: bool = False
    seq: int = 0  # outbound: last sent (first packet uses seq+1); inbound: window start
    replay_window: int = 64  # inbound; 0 = no anti-replay
    encap: UdpEncap | None = None
    inner_src: str | None = None
    inner_dst: str | None = None
    soft_packets: int = 0
    hard_packets: int = 0
    soft_bytes: int = 0
    hard_bytes: int = 0

    @property
    def family(self) -> int:
        return parse_address(self.dst)[0]

    def validate(self) -> None:
        """Raise ValueError with a one-line reason if the SA cannot be built (no key bytes quoted)."""
        from firmware_model.algorithms import check_sa_algorithms  # late: algorithms imports params

        try:
            src_version = parse_address(self.src)[0]
            dst_version = parse_address(self.dst)[0]
        except ValueError as exc:
            raise ValueError(f"bad SA endpoint address: {exc}") from None
        if src_version != dst_version:
            raise ValueError("SA src and dst must be the same IP family")
        if not MIN_SPI <= self.spi <= MAX_SPI:
            raise ValueError(f"SPI {self.spi:#x} outside {MIN_SPI}..{MAX_SPI:#x} (RFC 4303 §2.1)")
        if self.inner_src is not None or self.inner_dst is not None:
            for name in ("inner_src", "inner_dst"):
                value = getattr(self, name)
                if value is not None:
                    try:
                        parse_address(value)
                    except ValueError as exc:
                        raise ValueError(f"bad {name}: {exc}") from None
        if self.encap is not None:
            if self.proto != IpProto.ESP:
                raise ValueError("UDP encapsulation applies to ESP only (RFC 3948)")
            for port in (self.encap.sport, self.encap.dport):
                if not 1 <= port <= 0xFFFF:
                    raise ValueError(f"UDP encapsulation port {port} out of range")
        seq_limit = 1 << (64 if self.esn else 32)
        if not 0 <= self.seq < seq_limit:
            raise ValueError(f"initial sequence number {self.seq} does not fit {'64' if self.esn else '32'} bits")
        if not 0 <= self.replay_window <= MAX_REPLAY_WINDOW:
            raise ValueError(f"replay window {self.replay_window} outside 0..{MAX_REPLAY_WINDOW}")
        if self.soft_packets < 0 or self.hard_packets < 0 or self.soft_bytes < 0 or self.hard_bytes < 0:
            for name in ("soft_packets", "hard_packets", "soft_bytes", "hard_bytes"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must not be negative")
        check_sa_algorithms(self)
