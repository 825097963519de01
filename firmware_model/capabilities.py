"""What the card offers (NDIS_IPSEC_OFFLOAD_V2 plus packet-offload extras), built from the card profile.

The ``firmware:`` section of the YAML card profile, e.g.::

    firmware:
      sa_capacity: 1024
      encryption: [aes-gcm-128, aes-gcm-256, aes-cbc-128, aes-cbc-256, null]
      integrity: [hmac-sha1-96, hmac-sha256-128, aes-gmac-128]
      esn: true
      udp_esp: true              # or a list: [transport, tunnel]
      ipv6: true
      transport: true
      tunnel: true
      ah: true
      esp: true
      ah_esp_combined: true
      transport_tunnel_combined: false
      ipv4_options: false
      max_replay_window: 4096
      packet_offload: true

Every key is optional. lso exists in NDIS but not in this card: a profile asking for it is refused.
transport_tunnel_combined (crypto offload) is off unless the profile asks for it; the UDP-ESP kinds
transport-over-tunnel (transport ESP inside a UDP-encapsulated tunnel) and udp-transport-over-tunnel
(UDP-encapsulated transport ESP inside a plain tunnel) are layers of it, so udp_esp may list them only
together with transport_tunnel_combined: true (else the profile is refused). Algorithms the engine cannot run honestly (single DES; 3DES or MD5 when the
installed ``cryptography``/OpenSSL lacks them) are refused with an error naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from device.contract.enums import AuthAlg, EncAlg, UdpEspEncapsulation
from device.contract.ndis import NDIS_ENCAPSULATION_IEEE_802_3, CapsWire, V1UdpEspParseFlags
from device.contract.sa import MAX_REPLAY_WINDOW
from firmware_model.algorithms import AUTH_INFO, ENC_INFO

MAX_SA_CAPACITY = (1 << 20) - 1  # handle slot field is 20 bits (see sadb.py)

ENC_BY_NAME = {info.name: alg for alg, info in ENC_INFO.items()}
AUTH_BY_NAME = {info.name: alg for alg, info in AUTH_INFO.items() if alg != AuthAlg.NONE}

DEFAULT_ENCRYPTION = ("aes-gcm-128", "aes-gcm-192", "aes-gcm-256", "aes-cbc-128", "aes-cbc-192", "aes-cbc-256", "null")
DEFAULT_INTEGRITY = ("hmac-sha1-96", "hmac-sha256-128", "aes-gmac-128", "aes-gmac-192", "aes-gmac-256")

UDP_ESP_NAMES = {
    "transport": UdpEspEncapsulation.TRANSPORT,
    "tunnel": UdpEspEncapsulation.TUNNEL,
    "transport-over-tunnel": UdpEspEncapsulation.TRANSPORT_OVER_TUNNEL,
    "udp-transport-over-tunnel": UdpEspEncapsulation.UDP_ESP_TRANSPORT_OVER_TUNNEL,
}

_BOOL_KEYS = (
    "esn", "ipv6", "ipv4_options", "transport", "tunnel", "transport_tunnel_combined", "ah", "esp",
    "ah_esp_combined", "packet_offload", "lso",
)


# Capabilities NDIS defines that this card does not implement: a profile may not switch them on, so the
# card never advertises them (datasheet §12.2 says why each is missing).
_NOT_IMPLEMENTED = {
    "lso": "the card never segments (no large send offload)",
}
# The UDP-ESP kinds that only exist as one layer of transport over tunnel (NDIS: "transport over
# UDP-encapsulated tunnel", "UDP-encapsulated transport over tunnel"; the card implements both in crypto
# offload, firmware_model/traffic.py _tx_combined / _rx_nested): advertising one without
# transport_tunnel_combined would promise a path the card never takes.
UDP_ESP_COMBINED = UdpEspEncapsulation.TRANSPORT_OVER_TUNNEL | UdpEspEncapsulation.UDP_ESP_TRANSPORT_OVER_TUNNEL
_UDP_ESP_COMBINED_REASON = "a layer of transport over tunnel: needs transport_tunnel_combined: true"


class ProfileError(ValueError):
    """The firmware section of a card profile is invalid; the message names the key."""


@dataclass(frozen=True)
class Capabilities:
    sa_capacity: int = 1024
    encryption: frozenset[EncAlg] = field(default_factory=lambda: frozenset(ENC_BY_NAME[n] for n in DEFAULT_ENCRYPTION))
    integrity: frozenset[AuthAlg] = field(default_factory=lambda: frozenset(AUTH_BY_NAME[n] for n in DEFAULT_INTEGRITY))
    esn: bool = True
    udp_esp: UdpEspEncapsulation = UdpEspEncapsulation.TRANSPORT | UdpEspEncapsulation.TUNNEL
    ipv6: bool = True
    ipv4_options: bool = False
    transport: bool = True
    tunnel: bool = True  # NDIS: must be TRUE for IPsec offload to be used at all
    transport_tunnel_combined: bool = False
    ah: bool = True
    esp: bool = True
    ah_esp_combined: bool = True
    lso: bool = False
    max_replay_window: int = 4096
    packet_offload: bool = True

    def __post_init__(self) -> None:
        # never advertise what is not implemented (the profile loader names the key; this guards code)
        if self.lso:
            raise ProfileError("LSO is not implemented")
        if self.udp_esp & UDP_ESP_COMBINED and not self.transport_tunnel_combined:
            raise ProfileError(f"UDP-ESP transport-over-tunnel kinds: {_UDP_ESP_COMBINED_REASON}")

    @classmethod
    def from_profile(cls, section: Mapping[str, Any] | None, where: str = "firmware") -> Capabilities:
        section = dict(section or {})
        known = {"sa_capacity", "encryption", "integrity", "udp_esp", "max_replay_window", *_BOOL_KEYS}
        for key in section:
            if key not in known:
                raise ProfileError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        kwargs: dict[str, Any] = {}
        for key in _BOOL_KEYS:
            if key in section:
                if not isinstance(section[key], bool):
                    raise ProfileError(f"{where}.{key}: expected true/false, got {section[key]!r}")
                if section[key] and key in _NOT_IMPLEMENTED:
                    raise ProfileError(f"{where}.{key}: true refused: {_NOT_IMPLEMENTED[key]}")
                kwargs[key] = section[key]
        if "sa_capacity" in section:
            kwargs["sa_capacity"] = _int_in(section["sa_capacity"], 1, MAX_SA_CAPACITY, f"{where}.sa_capacity")
        if "max_replay_window" in section:
            kwargs["max_replay_window"] = _int_in(
                section["max_replay_window"], 0, MAX_REPLAY_WINDOW, f"{where}.max_replay_window"
            )
        if "encryption" in section:
            kwargs["encryption"] = frozenset(
                _algorithms(section["encryption"], ENC_BY_NAME, ENC_INFO, f"{where}.encryption")
            )
        if "integrity" in section:
            kwargs["integrity"] = frozenset(
                _algorithms(section["integrity"], AUTH_BY_NAME, AUTH_INFO, f"{where}.integrity")
            )
        if "udp_esp" in section:
            kwargs["udp_esp"] = _udp_esp(section["udp_esp"], f"{where}.udp_esp")
            combined = [n for n, f in UDP_ESP_NAMES.items() if f & kwargs["udp_esp"] & UDP_ESP_COMBINED]
            if combined and not kwargs.get("transport_tunnel_combined", cls.transport_tunnel_combined):
                raise ProfileError(f"{where}.udp_esp: {', '.join(combined)} refused: {_UDP_ESP_COMBINED_REASON} "
                                   f"({where}.transport_tunnel_combined)")
        return cls(**kwargs)

    @property
    def encryption_mask(self) -> int:
        return _mask(self.encryption)

    @property
    def authentication_mask(self) -> int:
        return _mask(self.integrity)

    @property
    def v1_udp_esp_flags(self) -> V1UdpEspParseFlags:
        flags = V1UdpEspParseFlags(0)
        if self.udp_esp & UdpEspEncapsulation.TRANSPORT:
            flags |= V1UdpEspParseFlags.TPT_OTHER
        if self.udp_esp & UdpEspEncapsulation.TUNNEL:
            flags |= V1UdpEspParseFlags.TUN_OTHER
        if self.udp_esp & UdpEspEncapsulation.TRANSPORT_OVER_TUNNEL:
            flags |= V1UdpEspParseFlags.TPTOVERTUN_OTHER
        if self.udp_esp & UdpEspEncapsulation.UDP_ESP_TRANSPORT_OVER_TUNNEL:
            flags |= V1UdpEspParseFlags.TPT_OVER_PURE_TUN_OTHER
        return flags

    def to_wire(self) -> CapsWire:
        return CapsWire(
            encapsulation=NDIS_ENCAPSULATION_IEEE_802_3,
            ipv6_supported=int(self.ipv6),
            ipv4_options=int(self.ipv4_options),
            ipv6_non_ipsec_extension_headers=int(self.ipv6),  # the engine walks IPv6 extension headers
            ah=int(self.ah),
            esp=int(self.esp),
            ah_esp_combined=int(self.ah_esp_combined),
            transport=int(self.transport),
            tunnel=int(self.tunnel),
            transport_tunnel_combined=int(self.transport_tunnel_combined),
            lso_supported=int(self.lso),
            extended_sequence_numbers=int(self.esn),
            udp_esp=int(self.udp_esp),
            authentication_algorithms=self.authentication_mask,
            encryption_algorithms=self.encryption_mask,
            sa_offload_capacity=self.sa_capacity,
            v1_udp_esp_flags=int(self.v1_udp_esp_flags),
            packet_offload=int(self.packet_offload),
            max_replay_window=self.max_replay_window,
        )

    def pack(self) -> bytes:
        """GET_CAPS response payload."""
        return self.to_wire().pack()


def _mask(algs) -> int:
    mask = 0
    for alg in algs:
        mask |= int(alg)
    return mask


def _int_in(value: Any, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"{where}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ProfileError(f"{where}: {value} outside {low}..{high}")
    return value


def _algorithms(value: Any, by_name: Mapping[str, Any], info: Mapping[Any, Any], where: str) -> list:
    if not isinstance(value, list | tuple):
        raise ProfileError(f"{where}: expected a list of algorithm names, got {value!r}")
    out = []
    for name in value:
        alg = by_name.get(str(name).lower()) if isinstance(name, str) else None
        if alg is None:
            raise ProfileError(f"{where}: unknown algorithm {name!r} (known: {', '.join(sorted(by_name))})")
        reason = info[alg].unavailable
        if reason:
            raise ProfileError(f"{where}: {name} refused: {reason}")
        out.append(alg)
    return out


def _udp_esp(value: Any, where: str) -> UdpEspEncapsulation:
    if isinstance(value, bool):
        return UdpEspEncapsulation.TRANSPORT | UdpEspEncapsulation.TUNNEL if value else UdpEspEncapsulation.NONE
    if not isinstance(value, list | tuple):
        raise ProfileError(f"{where}: expected true/false or a list of {', '.join(UDP_ESP_NAMES)}")
    flags = UdpEspEncapsulation.NONE
    for name in value:
        if name not in UDP_ESP_NAMES:
            raise ProfileError(f"{where}: unknown UDP-ESP encapsulation {name!r} (known: {', '.join(UDP_ESP_NAMES)})")
        flags |= UDP_ESP_NAMES[name]
    return flags
