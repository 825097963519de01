"""Enums shared by the driver and the card: SA protocol, direction, mode, algorithms, UDP-ESP kinds.

Each is declared once. The algorithm identifiers are the NDIS IPSEC_OFFLOAD_V2_ENCRYPTION_* /
_AUTHENTICATION_* values, which NDIS also uses as capability bits: so one flag enum serves as the
identifier in an ADD_SA command, as the bit in the ENC_ALGOS / AUTH_ALGOS registers and in the CAPS
masks. Members carry a one-line description (``.doc``) for the datasheet.
"""

from __future__ import annotations

import enum


class DocFlag(enum.IntFlag):
    """An IntFlag whose members also carry a one-line description (``.doc``) for the datasheet."""

    doc: str

    def __new__(cls, value: int, doc: str = "") -> DocFlag:
        member = int.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member


class IpProto(enum.IntEnum):
    """IPsec protocol of an SA: the IP protocol number of its header."""

    ESP = 50
    AH = 51


class Direction(enum.IntEnum):
    INBOUND = 1
    OUTBOUND = 2


class Mode(enum.IntEnum):
    """SA mode (ADD_SA_PACKET.mode, LIST_SAS entries)."""

    TRANSPORT = 0
    TUNNEL = 1


class EncAlg(DocFlag):
    """IPSEC_OFFLOAD_V2_ENCRYPTION_* identifiers (identifier = capability bit; ENC_ALGOS register)."""

    NONE = 0x001, "NULL encryption (ESP with integrity only)"
    DES_CBC = 0x002, "DES-CBC (RFC 2405)"
    TDES_CBC = 0x004, "3DES-CBC (RFC 2451)"
    AES_GCM_128 = 0x008, "AES-GCM-128 (RFC 4106, combined mode)"
    AES_GCM_192 = 0x010, "AES-GCM-192 (RFC 4106, combined mode)"
    AES_GCM_256 = 0x020, "AES-GCM-256 (RFC 4106, combined mode)"
    AES_CBC_128 = 0x040, "AES-CBC-128 (RFC 3602)"
    AES_CBC_192 = 0x080, "AES-CBC-192 (RFC 3602)"
    AES_CBC_256 = 0x100, "AES-CBC-256 (RFC 3602)"


class AuthAlg(DocFlag):
    """IPSEC_OFFLOAD_V2_AUTHENTICATION_* identifiers (AUTH_ALGOS register). NDIS names the AES-GMAC ones
    AES_GCM_*: they are ENCR_NULL_AUTH_AES_GMAC (RFC 4543)."""

    NONE = 0x00, "No integrity algorithm (AES-GCM carries its own)"
    MD5 = 0x01, "HMAC-MD5-96 (RFC 2403)"
    SHA1 = 0x02, "HMAC-SHA1-96 (RFC 2404)"
    SHA256 = 0x04, "HMAC-SHA-256-128 (RFC 4868)"
    AES_GMAC_128 = 0x08, "AES-GMAC-128 (RFC 4543)"
    AES_GMAC_192 = 0x10, "AES-GMAC-192 (RFC 4543)"
    AES_GMAC_256 = 0x20, "AES-GMAC-256 (RFC 4543)"


class UdpEspEncapsulation(DocFlag):
    """IPSEC_OFFLOAD_V2_UDP_ESP_ENCAPSULATION_* (ADD_SA udp_esp_encapsulation; UDP_ESP register, CAPS)."""

    NONE = 0x0, "No UDP encapsulation"
    TRANSPORT = 0x1, "UDP-encapsulated transport"
    TUNNEL = 0x2, "UDP-encapsulated tunnel"
    TRANSPORT_OVER_TUNNEL = 0x4, "Transport over UDP-encapsulated tunnel"
    UDP_ESP_TRANSPORT_OVER_TUNNEL = 0x8, "UDP-encapsulated transport over tunnel"
