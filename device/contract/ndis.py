"""Admin-command wire formats of the card (part of device/contract: standard library only).

The commands mirror the NDIS IPsec offload OIDs (v1 ``OID_TCP_TASK_IPSEC_*``, v2
``OID_TCP_TASK_IPSEC_OFFLOAD_V2_*``): same structures, field names (in snake_case), field order and
meaning, but with fixed-size, explicit little-endian encodings that fit a DMA buffer:

* every integer is little-endian; ``HANDLE`` and ``PVOID`` become ``u32`` (handle 0 = NULL);
* IP addresses are raw bytes in network order: ``u8[4]`` in v1 structures (v1 is IPv4 only) and
  ``u8[16]`` in v2 structures (an IPv4 address fills the first 4 bytes, the other 12 are zero);
* SPIs are integer values (``u32``), e.g. ``0x1001``, not wire-order bytes;
* v2 structures start with an NDIS_OBJECT_HEADER (Type 0x80 = NDIS_OBJECT_TYPE_DEFAULT, Revision 1,
  Size = size of the fixed part); a mismatch is rejected;
* pointer-linked lists (v2 ``Next``) become ``next_offset``: byte offset from the start of this entry
  to the next one (0 = last entry), a multiple of 4 and at least the size of the entry it follows, so
  a list can only move forward and always terminates;
* reserved fields must be zero.

Every structure is declared once as a ``Layout`` (device/contract/layout.py) from which the packing code,
the wire dataclass and the datasheet tables are all produced, so they cannot drift.
``COMMANDS`` lists every opcode with its request/response structures and semantics.

Decisions on the NDIS documentation defects (shared/reference/ipsec-offload-notes.md §1.10):

1. v1 ``KeyMat`` order: for each ``sec_assoc`` entry in array order, the confidentiality key
   (``conf_algo.algo_keylen`` bytes) comes first, then the integrity key (``integrity_algo.algo_keylen``
   bytes) — as the OFFLOAD_IPSEC_ADD_SA / ADD_UDPESP_SA pages say (the OFFLOAD_ALGO_INFO page says the
   opposite). ``key_len`` must equal the sum of all key lengths.
2. V2_UPDATE_SA carries exactly one update (the struct has no ``Next``); extra bytes are rejected.
3. ``sequence_number_high_order`` is the full high 32 bits of the 64-bit ESN (RFC 4304).
4. AES-GCM / AES-GMAC ``key_length`` includes the 4-byte salt, which is the last 4 bytes (RFC 4106 §8.1,
   RFC 4543 §8 — the Linux ``rfc4106(gcm(aes))`` convention); ``additional_info`` of an AES-GCM
   encryption algorithm is the ICV length in **bytes** (8, 12 or 16; 0 means 16).
5. HMAC-SHA-256 ICV is 16 bytes (RFC 4868 HMAC-SHA-256-128); HMAC-SHA1/MD5 ICVs are 12 bytes.
6. ESP without integrity is accepted only for a combined-mode algorithm (AES-GCM); encryption-only
   CBC SAs are refused (NDIS: "It is not permissible for an IPsec packet to have no authentication").
7. v1 ``num_sas`` must be 1 or 2 (the array keeps its 3 slots, OFFLOAD_MAX_SAS); the only
   2-entry bundle is ESP (ENCRYPT) followed by AH (AUTHENTICATE).
8. v2 ADD_SA carries no protocol/port filters; the card matches received packets on SPI +
   destination address + protocol only.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum, IntFlag
from typing import Any

from device.contract.layout import SIZE, Layout, ParseError, Wire, wire_class
from device.contract.status import NdisStatus

# ---------------------------------------------------------------------------------------------------
# constants (numeric values from the WDK headers, see ipsec-offload-notes.md §1.2-§1.7)


class Opcode(IntEnum):
    GET_CAPS = 0x0001
    V1_ADD_SA = 0x0010
    V1_DELETE_SA = 0x0011
    V1_ADD_UDPESP_SA = 0x0012
    V1_DELETE_UDPESP_SA = 0x0013
    V2_ADD_SA = 0x0020
    V2_ADD_SA_EX = 0x0021
    V2_DELETE_SA = 0x0022
    V2_UPDATE_SA = 0x0023
    ADD_SA_PACKET = 0x0024
    GET_STATS = 0x0030
    GET_SA_STATS = 0x0031
    LIST_SAS = 0x0032


NDIS_OBJECT_TYPE_DEFAULT = 0x80
REVISION_1 = 1
OFFLOAD_MAX_SAS = 3  # v1 SecAssoc[] array size
IPSEC_OFFLOAD_V2_MAX_EXTENSION_HEADERS = 2  # v2 SecAssoc[] array size
MAX_LIST_ENTRIES = 4096  # entries per V2_ADD_SA / V2_DELETE_SA list: bounds the work of one command
MAX_KEY_BYTES = 256  # no supported algorithm needs more than 64; anything larger is garbage
MAX_LIST_SAS_ENTRIES = 4096
MIN_LIST_SAS_ENTRIES = 2  # ESP + AH: the most rows one bundle has


class V1Operation(IntEnum):  # OFFLOAD_OPERATION_E
    AUTHENTICATE = 1
    ENCRYPT = 2


class V1ConfAlgo(IntEnum):  # OFFLOAD_CONF_ALGO
    NONE = 0
    DES = 1
    RESERVED = 2
    TRIPLE_DES = 3


class V1IntegrityAlgo(IntEnum):  # OFFLOAD_INTEGRITY_ALGO
    NONE = 0
    MD5 = 1
    SHA = 2


class V1SaFlags(IntFlag):
    INBOUND = 0x0001  # OFFLOAD_INBOUND_SA
    OUTBOUND = 0x0002  # OFFLOAD_OUTBOUND_SA


class UdpEncapType(IntEnum):  # UDP_ENCAP_TYPE
    IKE = 0  # documented as reserved: refused
    OTHER = 1  # ESP in UDP on DstEncapPort (normally 4500)


class V2Operation(IntEnum):  # IPSEC_OFFLOAD_V2_OPERATION
    AH = 1
    ESP = 2


class V2AddFlags(IntFlag):
    INBOUND = 0x01  # IPSEC_OFFLOAD_V2_INBOUND (else outbound)
    IPV6 = 0x10  # IPSEC_OFFLOAD_V2_IPv6 (else IPv4)


class V2SaFlags(IntFlag):
    ESN_SA = 0x1  # IPSEC_OFFLOAD_V2_ESN_SA


class V1UdpEspParseFlags(IntFlag):  # NDIS_IPSEC_OFFLOAD_V1 Supported.Flags
    TPT_IKE = 0x01
    TUN_IKE = 0x02
    TPTOVERTUN_IKE = 0x04
    TPT_OVER_PURE_TUN_IKE = 0x08
    TPT_OTHER = 0x10
    TUN_OTHER = 0x20
    TPTOVERTUN_OTHER = 0x40
    TPT_OVER_PURE_TUN_OTHER = 0x80


NDIS_ENCAPSULATION_IEEE_802_3 = 0x2


class SaListFlags(IntFlag):  # LIST_SAS entry flags (beyond NDIS)
    ESN = 0x01
    UDP_ENCAP = 0x02
    PACKET_OFFLOAD = 0x04
    DELETE_REQUESTED = 0x08  # SaDeleteReq was raised; the SA stays until the host deletes it
    PAIRED = 0x10  # paired_handle names the opposite-direction SA


class RejectReason(IntEnum):
    """Why an SA add was refused; each has a counter in GET_STATS (validate-then-commit)."""

    CAPACITY = 0
    UNSUPPORTED_ALGORITHM = 1
    BAD_KEY = 2
    BAD_ICV_LENGTH = 3
    BAD_SPI = 4
    DUPLICATE_SPI = 5
    BAD_BUNDLE = 6
    BAD_ADDRESS = 7
    UNSUPPORTED_FEATURE = 8
    BAD_ENCAPSULATION = 9
    BAD_PARSER_ENTRY = 10
    BAD_PARAMETER = 11


# ---------------------------------------------------------------------------------------------------
# layouts

def _header() -> list[tuple]:
    return [
        ("header_type", "B", "NDIS_OBJECT_HEADER.Type = NDIS_OBJECT_TYPE_DEFAULT", NDIS_OBJECT_TYPE_DEFAULT),
        ("header_revision", "B", "NDIS_OBJECT_HEADER.Revision = 1", REVISION_1),
        ("header_size", "H", "NDIS_OBJECT_HEADER.Size = size of the fixed part", SIZE),
    ]


# ---- v1 ---------------------------------------------------------------------------------------------

ALGO_INFO_V1 = Layout(
    "ALGO_INFO_V1",
    "OFFLOAD_ALGO_INFO",
    [
        ("algo_identifier", "I", "V1ConfAlgo or V1IntegrityAlgo value"),
        ("algo_keylen", "I", "key length in bytes (its key sits in key_mat, see KeyMat order)"),
        ("algo_rounds", "I", "cipher rounds; informational, 0 = algorithm default"),
    ],
)


AlgoInfoV1 = wire_class(ALGO_INFO_V1, "AlgoInfoV1")


SA_V1 = Layout(
    "SA_V1",
    "OFFLOAD_SECURITY_ASSOCIATION",
    [
        ("operation", "I", "V1Operation: 1 = AUTHENTICATE (AH), 2 = ENCRYPT (ESP); 0 in unused slots"),
        ("spi", "I", "SPI value"),
        ("integrity_algo", ALGO_INFO_V1, "integrity algorithm (AH, or ESP authentication)"),
        ("conf_algo", ALGO_INFO_V1, "confidentiality algorithm; all zero for AH"),
        ("reserved_identifier", "I", "Reserved.algoIdentifier", 0),
        ("reserved_keylen", "I", "Reserved.algoKeylen", 0),
        ("reserved_rounds", "I", "Reserved.algoRounds", 0),
    ],
)


SaV1 = wire_class(SA_V1, "SaV1")


_V1_FILTER = [
    ("src_addr", "4s", "source host (IPv4, network order); 0 = any"),
    ("src_mask", "4s", "source mask"),
    ("dest_addr", "4s", "destination host; 0 = any"),
    ("dest_mask", "4s", "destination mask"),
    ("protocol", "I", "IP protocol number of the protected traffic; 0 = any"),
    ("src_port", "H", "TCP/UDP source port; 0 = any"),
    ("dest_port", "H", "TCP/UDP destination port; 0 = any"),
    ("src_tunnel_addr", "4s", "tunnel source endpoint; 0 for a transport-mode SA"),
    ("dest_tunnel_addr", "4s", "tunnel destination endpoint; 0 for a transport-mode SA"),
    ("flags", "H", "V1SaFlags: 0x1 = inbound, 0x2 = outbound (exactly one)"),
    ("num_sas", "H", "valid sec_assoc entries: 1, or 2 for ESP followed by AH"),
    ("sec_assoc", SA_V1, "ordered operations (slots >= num_sas are ignored)", None, OFFLOAD_MAX_SAS),
    ("offload_handle", "I", "output field: must be 0 in the request (the handle comes in the response)", 0),
]

V1_ADD_SA = Layout(
    "V1_ADD_SA",
    "OFFLOAD_IPSEC_ADD_SA",
    [*_V1_FILTER, ("key_len", "I", "bytes of key_mat that follow this fixed part")],
    doc="Followed by key_mat[key_len]: per sec_assoc entry, confidentiality key then integrity key.",
)


# Key material follows the fixed part; it never appears in a repr.
_KEY_MAT = (("key_mat", bytes, field(default=b"", repr=False)),)
_KEY_DATA = (("key_data", bytes, field(default=b"", repr=False)),)


def _pack_key_tail(self) -> bytes:
    return self.LAYOUT.pack(self) + self.key_mat


def _with_key_tail(cls, buf):
    fixed = cls.LAYOUT.unpack_from(buf)
    tail = bytes(buf[cls.LAYOUT.size :])
    if fixed.key_len > MAX_KEY_BYTES * OFFLOAD_MAX_SAS or len(tail) != fixed.key_len:
        raise ParseError(
            f"{cls.LAYOUT.name}: key_len {fixed.key_len} but {len(tail)} key bytes follow", NdisStatus.INVALID_LENGTH
        )
    return replace(fixed, key_mat=tail)


_KEY_TAIL = {"pack": _pack_key_tail, "unpack": classmethod(_with_key_tail)}
V1AddSa = wire_class(V1_ADD_SA, "V1AddSa", extra=_KEY_MAT, methods=_KEY_TAIL)


V1_ADD_UDPESP_SA = Layout(
    "V1_ADD_UDPESP_SA",
    "OFFLOAD_IPSEC_ADD_UDPESP_SA",
    [
        *_V1_FILTER,
        ("udp_encap_type", "I", "UdpEncapType: 1 = OTHER (ESP in UDP); 0 = IKE is reserved and refused"),
        ("dst_encap_port", "H", "inbound: UDP destination port to parse (normally 4500); ignored outbound"),
        ("reserved", "H", "alignment", 0),
        ("encap_type_entry_offld_handle", "I", "inbound: parser-entry handle, 0 = find or create one"),
        ("key_len", "I", "bytes of key_mat that follow this fixed part"),
    ],
    doc="Followed by key_mat[key_len] (same order as V1_ADD_SA).",
)


V1AddUdpEspSa = wire_class(V1_ADD_UDPESP_SA, "V1AddUdpEspSa", extra=_KEY_MAT, methods=_KEY_TAIL)


HANDLE_RESPONSE = Layout(
    "HANDLE_RESPONSE", "", [("offload_handle", "I", "handle of the new SA bundle (never 0)")]
)


HandleResponse = wire_class(HANDLE_RESPONSE, "HandleResponse")


V1_UDPESP_RESPONSE = Layout(
    "V1_ADD_UDPESP_SA_RESPONSE",
    "",
    [
        ("offload_handle", "I", "handle of the new SA bundle"),
        ("encap_type_entry_offld_handle", "I", "inbound: parser-entry handle (new or existing); 0 outbound"),
    ],
)


V1AddUdpEspResponse = wire_class(V1_UDPESP_RESPONSE, "V1AddUdpEspResponse")


V1_DELETE_SA = Layout(
    "V1_DELETE_SA", "OFFLOAD_IPSEC_DELETE_SA", [("offload_handle", "I", "SA bundle to delete")]
)


V1DeleteSa = wire_class(V1_DELETE_SA, "V1DeleteSa")


V1_DELETE_UDPESP_SA = Layout(
    "V1_DELETE_UDPESP_SA",
    "OFFLOAD_IPSEC_DELETE_UDPESP_SA",
    [
        ("offload_handle", "I", "SA bundle to delete"),
        ("encap_type_entry_offld_handle", "I", "parser entry to delete as well (0 = keep it)"),
    ],
)


V1DeleteUdpEspSa = wire_class(V1_DELETE_UDPESP_SA, "V1DeleteUdpEspSa")


# ---- v2 ---------------------------------------------------------------------------------------------

ALGO_INFO_V2 = Layout(
    "ALGO_INFO_V2",
    "IPSEC_OFFLOAD_V2_ALGORITHM_INFO",
    [
        ("identifier", "I", "EncAlg / AuthAlg identifier"),
        ("key_length", "I", "key bytes (AES-GCM/GMAC: key + 4-byte salt)"),
        ("key_offset_bytes", "I", "offset of the key inside the key buffer"),
        ("additional_info", "I", "AES-GCM encryption: ICV length in bytes (8/12/16, 0 = 16); else 0"),
    ],
)


AlgoInfoV2 = wire_class(ALGO_INFO_V2, "AlgoInfoV2")


SA_V2 = Layout(
    "SA_V2",
    "IPSEC_OFFLOAD_V2_SECURITY_ASSOCIATION",
    [
        ("flags", "I", "V2SaFlags: 0x1 = ESN SA"),
        ("operation", "I", "V2Operation: 1 = AH, 2 = ESP; 0 in an unused slot"),
        ("spi", "I", "SPI value"),
        ("authentication_algorithm", ALGO_INFO_V2, "integrity algorithm; unused (zero) for AES-GCM"),
        ("encryption_algorithm", ALGO_INFO_V2, "encryption algorithm; all zero for AH"),
        ("sequence_number_high_order", "I", "ESN SA: initial high 32 bits of the sequence number"),
    ],
)


SaV2 = wire_class(SA_V2, "SaV2")


_V2_COMMON = [
    ("num_ext_hdrs", "I", "valid sec_assoc entries: 1, or 2 for ESP followed by AH"),
    ("flags", "I", "V2AddFlags: 0x1 = inbound (else outbound), 0x10 = IPv6 (else IPv4)"),
    ("src_addr", "16s", "SA source endpoint (tunnel endpoint when tunnelled); 0 = any"),
    ("dest_addr", "16s", "SA destination endpoint; 0 = any"),
    ("offload_handle", "I", "output field: must be 0 in the request", 0),
    ("udp_esp_encapsulation", "I", "UdpEspEncapsulation type (UDP port 4500), 0 = none"),
    ("sec_assoc", SA_V2, "ordered operations", None, IPSEC_OFFLOAD_V2_MAX_EXTENSION_HEADERS),
]

V2_ADD_SA = Layout(
    "V2_ADD_SA",
    "IPSEC_OFFLOAD_V2_ADD_SA",
    [
        *_header(),
        ("next_offset", "I", "offset from this entry to the next (mirrors Next); 0 = last"),
        *_V2_COMMON,
        ("key_length", "I", "bytes of key_data following this fixed part"),
    ],
    doc="One list entry; followed by key_data[key_length]. Algorithm key offsets are into key_data.",
)


V2AddSa = wire_class(V2_ADD_SA, "V2AddSa", extra=_KEY_DATA)


V2_ADD_SA_EX = Layout(
    "V2_ADD_SA_EX",
    "IPSEC_OFFLOAD_V2_ADD_SA_EX",
    [
        *_header(),
        *_V2_COMMON,
        ("key_length", "I", "bytes in the key buffer"),
        ("key_offset", "I", "offset of the key buffer from the start of this structure (>= its size)"),
        ("source_switch_port_id", "I", "NDIS reserved; ignored"),
        ("vlan_id", "H", "NDIS reserved; ignored"),
        ("reserved", "H", "alignment", 0),
    ],
    doc="The key buffer lies at key_offset and must end the request.",
)


def _pack_key_offset(self) -> bytes:
    if self.key_offset < self.LAYOUT.size and self.key_data:
        raise ValueError("key_offset must not overlap the fixed part")
    gap = b"\0" * max(0, self.key_offset - self.LAYOUT.size)
    return self.LAYOUT.pack(self) + gap + self.key_data


def _with_key_offset(cls, buf):
    fixed = cls.LAYOUT.unpack_from(buf)
    size = cls.LAYOUT.size
    if fixed.key_length == 0:
        if len(buf) != size:
            raise ParseError(f"{cls.LAYOUT.name}: {len(buf) - size} stray bytes after the structure",
                             NdisStatus.INVALID_LENGTH)
        return fixed
    if fixed.key_length > MAX_KEY_BYTES * 2 or fixed.key_offset < size:
        raise ParseError(f"{cls.LAYOUT.name}: key_offset {fixed.key_offset} / key_length {fixed.key_length} "
                         f"invalid (fixed part is {size} bytes)", NdisStatus.INVALID_LENGTH)
    if fixed.key_offset + fixed.key_length != len(buf):
        raise ParseError(f"{cls.LAYOUT.name}: key buffer {fixed.key_offset}+{fixed.key_length} does not end "
                         f"the {len(buf)}-byte request", NdisStatus.INVALID_LENGTH)
    return replace(fixed, key_data=bytes(buf[fixed.key_offset :]))


_KEY_OFFSET = {"pack": _pack_key_offset, "unpack": classmethod(_with_key_offset)}
V2AddSaEx = wire_class(V2_ADD_SA_EX, "V2AddSaEx", extra=_KEY_DATA, methods=_KEY_OFFSET)


ADD_SA_PACKET = Layout(
    "ADD_SA_PACKET",
    "",
    [
        *_header(),
        *_V2_COMMON,
        ("key_length", "I", "bytes in the key buffer"),
        ("key_offset", "I", "offset of the key buffer from the start of this structure (>= its size)"),
        ("source_switch_port_id", "I", "reserved; ignored"),
        ("vlan_id", "H", "reserved; ignored"),
        ("reserved", "H", "alignment", 0),
        ("mode", "I", "Mode: 0 = transport, 1 = tunnel (src/dest_addr are then the tunnel endpoints)"),
        ("encap_sport", "H", "UDP encapsulation source port (0 = 4500 if udp_esp_encapsulation != 0)"),
        ("encap_dport", "H", "UDP encapsulation destination port (0 = 4500)"),
        ("replay_window", "I", "inbound anti-replay window in packets (0 = off)"),
        ("initial_seq", "Q", "outbound: last sequence number used (first packet gets +1); inbound: window start"),
        ("soft_packets", "Q", "packets after which SaDeleteReq is raised (0 = none)"),
        ("hard_packets", "Q", "packets after which the SA stops (0 = none)"),
        ("soft_bytes", "Q", "bytes after which SaDeleteReq is raised (0 = none)"),
        ("hard_bytes", "Q", "bytes after which the SA stops (0 = none)"),
        ("sel_src", "16s", "inner selector: source address (network order; 0 = any)"),
        ("sel_dst", "16s", "inner selector: destination address"),
        ("sel_src_prefix", "B", "source prefix length (0 = any)"),
        ("sel_dst_prefix", "B", "destination prefix length (0 = any)"),
        ("sel_proto", "B", "IP protocol (0 = any)"),
        ("sel_flags", "B", "bit 0: selector is IPv6; bit 1: selector present"),
        ("sel_sport", "H", "source port (0 = any)"),
        ("sel_dport", "H", "destination port (0 = any)"),
    ],
    doc="Packet-offload SA (beyond NDIS): ADD_SA_EX plus what the card needs to build and number whole "
    "ESP packets. Outbound packets are matched by handle or by selector (transport mode without a "
    "selector matches the SA endpoints).",
)

SEL_IPV6 = 0x1
SEL_PRESENT = 0x2


AddSaPacket = wire_class(ADD_SA_PACKET, "AddSaPacket", extra=_KEY_DATA, methods=_KEY_OFFSET)


V2_ADD_SA_RESULT = Layout(
    "V2_ADD_SA_RESULT",
    "",
    [
        ("offload_handle", "I", "handle of the added SA bundle, 0 (NULL) if this entry failed"),
        ("status", "I", "NdisStatus of this entry (beyond NDIS: says why a NULL handle was returned)"),
        ("reason", "H", "RejectReason of a refused entry (beyond NDIS); valid only when status is not SUCCESS "
                        "(0 is CAPACITY)"),
        ("reserved", "H", "zero", 0),
    ],
)


V2AddSaResult = wire_class(V2_ADD_SA_RESULT, "V2AddSaResult")


LIST_HEADER = Layout(
    "LIST_HEADER",
    "",
    [("count", "I", "number of entries that follow"), ("reserved", "I", "alignment", 0)],
)


ListHeader = wire_class(LIST_HEADER, "ListHeader")


V2_DELETE_SA = Layout(
    "V2_DELETE_SA",
    "IPSEC_OFFLOAD_V2_DELETE_SA",
    [
        *_header(),
        ("next_offset", "I", "offset from this entry to the next (mirrors Next); 0 = last"),
        ("offload_handle", "I", "SA bundle to delete"),
    ],
)


V2DeleteSa = wire_class(V2_DELETE_SA, "V2DeleteSa")


STATUS_ENTRY = Layout("STATUS_ENTRY", "", [("status", "I", "NdisStatus of the matching request entry")])


StatusEntry = wire_class(STATUS_ENTRY, "StatusEntry")


V2_UPDATE_SA = Layout(
    "V2_UPDATE_SA",
    "IPSEC_OFFLOAD_V2_UPDATE_SA",
    [
        *_header(),
        ("offload_handle", "I", "SA bundle to update"),
        ("operation", "I", "V2Operation selecting the AH or ESP element of the bundle"),
        ("spi", "I", "SPI of that element (must match)"),
        ("sequence_number_high_order", "I", "new high 32 bits of the ESN"),
    ],
)


V2UpdateSa = wire_class(V2_UPDATE_SA, "V2UpdateSa")


# ---- capabilities, stats, listing --------------------------------------------------------------------

CAPS = Layout(
    "CAPS",
    "NDIS_IPSEC_OFFLOAD_V2",
    [
        ("encapsulation", "I", "MAC encapsulations: 0x2 = NDIS_ENCAPSULATION_IEEE_802_3"),
        ("ipv6_supported", "B", "BOOLEAN"),
        ("ipv4_options", "B", "BOOLEAN: IPv4 packets with options are processed"),
        ("ipv6_non_ipsec_extension_headers", "B", "BOOLEAN"),
        ("ah", "B", "BOOLEAN"),
        ("esp", "B", "BOOLEAN"),
        ("ah_esp_combined", "B", "BOOLEAN"),
        ("transport", "B", "BOOLEAN"),
        ("tunnel", "B", "BOOLEAN (NDIS requires TRUE for any IPsec offload)"),
        ("transport_tunnel_combined", "B", "BOOLEAN"),
        ("lso_supported", "B", "BOOLEAN"),
        ("extended_sequence_numbers", "B", "BOOLEAN"),
        ("reserved0", "B", "alignment", 0),
        ("udp_esp", "I", "UdpEspEncapsulation types supported"),
        ("authentication_algorithms", "I", "AuthAlg mask"),
        ("encryption_algorithms", "I", "EncAlg mask"),
        ("sa_offload_capacity", "I", "SA bundles the card can hold"),
        ("v1_udp_esp_flags", "I", "V1UdpEspParseFlags (NDIS_IPSEC_OFFLOAD_V1 Supported.Flags)"),
        ("packet_offload", "B", "BOOLEAN: ADD_SA_PACKET available (beyond NDIS)"),
        ("reserved1", "B", "alignment", 0),
        ("reserved2", "H", "alignment", 0),
        ("max_replay_window", "I", "largest packet-offload anti-replay window"),
    ],
)


CapsWire = wire_class(CAPS, "CapsWire")


_STATS_COUNTERS = [
    ("tx_packets", "frames handed to transmit"),
    ("tx_bytes", "bytes handed to transmit"),
    ("tx_crypto", "frames encrypted (crypto offload)"),
    ("tx_packet_offload", "frames encapsulated (packet offload)"),
    ("tx_passthrough", "frames with handle 0 (no offload)"),
    ("tx_bad_handle", "frames naming an unknown, stale or wrong-direction handle"),
    ("tx_errors", "frames the engine refused (syntax, sequence overflow, hard limit)"),
    ("rx_packets", "frames received"),
    ("rx_bytes", "bytes received"),
    ("rx_crypto_done", "frames with CryptoDone set"),
    ("rx_crypto_ok", "frames whose check passed"),
    ("rx_auth_failed", "frames with an ICV failure"),
    ("rx_syntax_errors", "frames with CRYPTO_INVALID_PACKET_SYNTAX/PROTOCOL"),
    ("rx_other_errors", "frames with CRYPTO_GENERIC_ERROR (replay, hard limit)"),
    ("rx_no_sa", "IPsec frames with no matching SA (indicated without metadata)"),
    ("rx_not_processed", "frames not inspected (not IPsec, fragments, IKE, keepalives)"),
    ("rx_sa_delete_req", "frames indicated with SaDeleteReq"),
    ("cmd_ok", "commands completed with NDIS_STATUS_SUCCESS"),
    ("cmd_failed", "commands completed with an error status"),
]

_STATS_COUNTERS_1_1 = [
    ("rx_policy_unprocessed", "crypto offload: authentic frames outside their SA's filter, indicated unprocessed"),
    ("rx_policy_drops", "packet offload: decapsulated frames outside their SA's selector, dropped"),
    ("rx_l4_csum_ok", "transport UDP-ESP frames indicated with L4_CSUM_OK (RFC 3948 §3.1.2)"),
]

GLOBAL_STATS = Layout(
    "GLOBAL_STATS",
    "",
    [
        ("sa_bundles", "I", "SA bundles in use"),
        ("sa_capacity", "I", "SaOffloadCapacity"),
        ("parser_entries", "I", "UDP-ESP parser entries in use"),
        ("reserved", "I", "alignment", 0),
        *[(n, "Q", d) for n, d in _STATS_COUNTERS],
        *[(f"reject_{r.name.lower()}", "Q", f"SA adds refused: {r.name}") for r in RejectReason],
        # REGMAP 1.1 additions, appended so every earlier offset stays
        *[(n, "Q", d) for n, d in _STATS_COUNTERS_1_1],
    ],
)


GlobalStats = wire_class(GLOBAL_STATS, "GlobalStats", frozen=False)


HANDLE_REQUEST = Layout("HANDLE_REQUEST", "", [("offload_handle", "I", "SA bundle")])


HandleRequest = wire_class(HANDLE_REQUEST, "HandleRequest")


SA_STATS_ENTRY = Layout(
    "SA_STATS_ENTRY",
    "",
    [
        ("spi", "I", "SPI of this bundle element"),
        ("proto", "B", "50 = ESP, 51 = AH"),
        ("direction", "B", "1 = inbound, 2 = outbound"),
        ("reserved", "H", "alignment", 0),
        ("packets", "Q", "packets processed successfully"),
        ("bytes", "Q", "bytes processed successfully"),
        ("auth_failures", "Q", "ICV failures"),
        ("replay_drops", "Q", "packets refused by the anti-replay window (packet offload)"),
        ("syntax_errors", "Q", "malformed packets"),
        ("other_errors", "Q", "sequence overflow, hard limit"),
    ],
)


SaStatsEntry = wire_class(SA_STATS_ENTRY, "SaStatsEntry")


LIST_SAS_REQUEST = Layout(
    "LIST_SAS_REQUEST",
    "",
    [
        ("start_index", "I", "slot index to start from (0, then next_index of the previous response)"),
        ("max_entries", "I", f"largest number of entries wanted ({MIN_LIST_SAS_ENTRIES}..{MAX_LIST_SAS_ENTRIES}: "
                             "a bundle's rows are never split, so a page must hold the largest bundle)"),
    ],
)


ListSasRequest = wire_class(LIST_SAS_REQUEST, "ListSasRequest")


LIST_SAS_RESPONSE = Layout(
    "LIST_SAS_RESPONSE",
    "",
    [
        ("total", "I", "SA bundles in the table"),
        ("next_index", "I", "start_index for the next page; 0xFFFFFFFF = no more"),
        ("count", "I", "entries that follow (one per bundle element)"),
        ("reserved", "I", "alignment", 0),
    ],
)


ListSasResponse = wire_class(LIST_SAS_RESPONSE, "ListSasResponse")


SA_LIST_ENTRY = Layout(
    "SA_LIST_ENTRY",
    "",
    [
        ("offload_handle", "I", "bundle handle"),
        ("spi", "I", "SPI"),
        ("proto", "B", "50 = ESP, 51 = AH"),
        ("direction", "B", "1 = inbound, 2 = outbound"),
        ("mode", "B", "0 = transport, 1 = tunnel"),
        ("family", "B", "4 or 6"),
        ("flags", "I", "SaListFlags"),
        ("paired_handle", "I", "opposite-direction bundle paired for SaDeleteReq, 0 = none"),
    ],
    doc="Never contains key material.",
)


SaListEntry = wire_class(SA_LIST_ENTRY, "SaListEntry")


# Every command structure, in declaration order (datasheet tables, tests).
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    ALGO_INFO_V1, SA_V1, V1_ADD_SA, V1_ADD_UDPESP_SA, HANDLE_RESPONSE, V1_UDPESP_RESPONSE, V1_DELETE_SA,
    V1_DELETE_UDPESP_SA, ALGO_INFO_V2, SA_V2, V2_ADD_SA, V2_ADD_SA_EX, ADD_SA_PACKET, V2_ADD_SA_RESULT, LIST_HEADER,
    V2_DELETE_SA, STATUS_ENTRY, V2_UPDATE_SA, CAPS, GLOBAL_STATS, HANDLE_REQUEST, SA_STATS_ENTRY, LIST_SAS_REQUEST,
    LIST_SAS_RESPONSE, SA_LIST_ENTRY,
)}


# ---------------------------------------------------------------------------------------------------
# lists (v2 Next pointers -> next_offset)


def pack_linked(entries: Sequence[bytes]) -> bytes:
    """Concatenate encoded entries (each starting with header + next_offset), padding to 4 bytes and
    filling next_offset (at byte 4 of each entry)."""
    out = bytearray()
    for i, raw in enumerate(entries):
        padded = bytearray(raw) + b"\0" * (-len(raw) % 4)
        nxt = len(padded) if i + 1 < len(entries) else 0
        struct.pack_into("<I", padded, 4, nxt)
        out += padded
    return bytes(out)


def _walk_linked(buf: bytes | bytearray | memoryview, layout: Layout) -> Iterator[tuple[int, Any]]:
    offset = 0
    for _ in range(MAX_LIST_ENTRIES):
        entry = layout.unpack_from(buf, offset)
        yield offset, entry
        if entry.next_offset == 0:
            return
        offset += entry.next_offset
    raise ParseError(f"{layout.name} list longer than {MAX_LIST_ENTRIES} entries", NdisStatus.INVALID_PARAMETER)


def pack_v2_add_sa_list(entries: Sequence[V2AddSa]) -> bytes:
    return pack_linked([V2_ADD_SA.pack(e) + e.key_data for e in entries])


def unpack_v2_add_sa_list(buf: bytes | bytearray | memoryview) -> list[V2AddSa]:
    if len(buf) == 0:
        raise ParseError("V2_ADD_SA: empty list", NdisStatus.INVALID_LENGTH)
    out = []
    end = 0
    for offset, entry in _walk_linked(buf, V2_ADD_SA):
        key_start = offset + V2_ADD_SA.size
        key_end = key_start + entry.key_length
        if entry.key_length > MAX_KEY_BYTES * 2 or key_end > len(buf):
            raise ParseError(f"V2_ADD_SA entry at {offset}: key_length {entry.key_length} runs past the buffer",
                             NdisStatus.INVALID_LENGTH)
        if entry.next_offset and (entry.next_offset % 4 or entry.next_offset < key_end - offset):
            raise ParseError(f"V2_ADD_SA entry at {offset}: next_offset {entry.next_offset} overlaps the entry "
                             "or is not a multiple of 4", NdisStatus.INVALID_PARAMETER)
        out.append(replace(entry, key_data=bytes(buf[key_start:key_end])))
        end = key_end
    if len(buf) - end >= 4 or any(buf[end:]):
        raise ParseError(f"V2_ADD_SA: {len(buf) - end} bytes after the last entry", NdisStatus.INVALID_LENGTH)
    return out


def pack_v2_delete_sa_list(handles: Sequence[int]) -> bytes:
    return pack_linked([V2_DELETE_SA.pack(V2DeleteSa(0, h)) for h in handles])


def unpack_v2_delete_sa_list(buf: bytes | bytearray | memoryview) -> list[int]:
    if len(buf) == 0:
        raise ParseError("V2_DELETE_SA: empty list", NdisStatus.INVALID_LENGTH)
    out = []
    end = 0
    for offset, entry in _walk_linked(buf, V2_DELETE_SA):
        if entry.next_offset and (entry.next_offset % 4 or entry.next_offset < V2_DELETE_SA.size):
            raise ParseError(f"V2_DELETE_SA entry at {offset}: bad next_offset {entry.next_offset}",
                             NdisStatus.INVALID_PARAMETER)
        out.append(entry.offload_handle)
        end = offset + V2_DELETE_SA.size
    if len(buf) != end:
        raise ParseError(f"V2_DELETE_SA: {len(buf) - end} bytes after the last entry", NdisStatus.INVALID_LENGTH)
    return out


def pack_counted(items: Sequence[Wire]) -> bytes:
    """LIST_HEADER + concatenated fixed-size entries (responses)."""
    return ListHeader(len(items)).pack() + b"".join(i.pack() for i in items)


def unpack_counted(buf: bytes | bytearray | memoryview, entry: Layout) -> list[Any]:
    head = LIST_HEADER.unpack_from(buf)
    if head.count > MAX_LIST_ENTRIES or len(buf) != LIST_HEADER.size + head.count * entry.size:
        raise ParseError(f"{entry.name} list: count {head.count} does not match {len(buf)} bytes",
                         NdisStatus.INVALID_LENGTH)
    return [entry.unpack_from(buf, LIST_HEADER.size + i * entry.size) for i in range(head.count)]


def pack_list_sas(head: ListSasResponse, entries: Sequence[SaListEntry]) -> bytes:
    return head.pack() + b"".join(e.pack() for e in entries)


def unpack_list_sas(buf: bytes | bytearray | memoryview) -> tuple[ListSasResponse, list[SaListEntry]]:
    head = LIST_SAS_RESPONSE.unpack_from(buf)
    if head.count > MAX_LIST_SAS_ENTRIES or len(buf) != LIST_SAS_RESPONSE.size + head.count * SA_LIST_ENTRY.size:
        raise ParseError(f"LIST_SAS response: count {head.count} does not match {len(buf)} bytes",
                         NdisStatus.INVALID_LENGTH)
    return head, [SA_LIST_ENTRY.unpack_from(buf, LIST_SAS_RESPONSE.size + i * SA_LIST_ENTRY.size)
                  for i in range(head.count)]


def pack_sa_stats(handle: int, entries: Sequence[SaStatsEntry]) -> bytes:
    return struct.pack("<II", handle, len(entries)) + b"".join(e.pack() for e in entries)


def unpack_sa_stats(buf: bytes | bytearray | memoryview) -> tuple[int, list[SaStatsEntry]]:
    if len(buf) < 8:
        raise ParseError("GET_SA_STATS response shorter than 8 bytes", NdisStatus.INVALID_LENGTH)
    handle, count = struct.unpack_from("<II", buf)
    if count > OFFLOAD_MAX_SAS or len(buf) != 8 + count * SA_STATS_ENTRY.size:
        raise ParseError(f"GET_SA_STATS response: count {count} does not match {len(buf)} bytes",
                         NdisStatus.INVALID_LENGTH)
    return handle, [SA_STATS_ENTRY.unpack_from(buf, 8 + i * SA_STATS_ENTRY.size) for i in range(count)]


# ---------------------------------------------------------------------------------------------------
# addresses


def addr16(text: str | None) -> bytes:
    """IP address text -> 16 bytes (IPv4 in the first 4); None/empty -> zeros (wildcard)."""
    if not text:
        return bytes(16)
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def addr4(text: str | None) -> bytes:
    if not text:
        return bytes(4)
    packed = ipaddress.ip_address(text).packed
    if len(packed) != 4:
        raise ValueError(f"{text}: v1 structures carry IPv4 addresses only")
    return packed


def addr_text(raw: bytes, ipv6: bool) -> str | None:
    """16-byte (or 4-byte) field -> address text; None when all zero (wildcard)."""
    if not any(raw):
        return None
    if ipv6:
        return str(ipaddress.IPv6Address(bytes(raw[:16])))
    return str(ipaddress.IPv4Address(bytes(raw[:4])))


# ---------------------------------------------------------------------------------------------------
# command table (for the datasheet and for dispatch sanity checks)


@dataclass(frozen=True)
class Command:
    opcode: Opcode
    ndis: str
    request: str
    response: str
    semantics: str


COMMANDS: tuple[Command, ...] = (
    Command(Opcode.GET_CAPS, "OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES (IPsecV2 part)", "empty", "CAPS",
            "Reports what the card can offload."),
    Command(Opcode.V1_ADD_SA, "OID_TCP_TASK_IPSEC_ADD_SA", "V1_ADD_SA + key_mat", "HANDLE_RESPONSE",
            "Adds one SA bundle (ESP, AH, or ESP then AH). All or nothing."),
    Command(Opcode.V1_DELETE_SA, "OID_TCP_TASK_IPSEC_DELETE_SA", "V1_DELETE_SA", "empty",
            "Deletes a bundle; unknown handle -> INVALID_PARAMETER."),
    Command(Opcode.V1_ADD_UDPESP_SA, "OID_TCP_TASK_IPSEC_ADD_UDPESP_SA", "V1_ADD_UDPESP_SA + key_mat",
            "V1_ADD_UDPESP_SA_RESPONSE",
            "Adds a UDP-ESP bundle. Inbound: parser-entry handle 0 -> find or create the (type, port) entry; "
            "non-zero -> must exist. All or nothing: on failure no SA and no new parser entry remain."),
    Command(Opcode.V1_DELETE_UDPESP_SA, "OID_TCP_TASK_IPSEC_DELETE_UDPESP_SA", "V1_DELETE_UDPESP_SA", "empty",
            "Deletes the bundle and, if the entry handle is non-zero, the parser entry, which must then have "
            "no other SA; otherwise nothing is deleted and the status is INVALID_PARAMETER."),
    Command(Opcode.V2_ADD_SA, "OID_TCP_TASK_IPSEC_OFFLOAD_V2_ADD_SA", "list of V2_ADD_SA + key_data",
            "LIST_HEADER + V2_ADD_SA_RESULT[count]",
            "Partial success: SUCCESS if at least one bundle was added; failed entries get handle 0. "
            "If the command fails, nothing was added. A malformed list adds nothing."),
    Command(Opcode.V2_ADD_SA_EX, "OID_TCP_TASK_IPSEC_OFFLOAD_V2_ADD_SA_EX", "V2_ADD_SA_EX + key buffer",
            "HANDLE_RESPONSE", "Adds exactly one bundle."),
    Command(Opcode.V2_DELETE_SA, "OID_TCP_TASK_IPSEC_OFFLOAD_V2_DELETE_SA", "list of V2_DELETE_SA",
            "LIST_HEADER + STATUS_ENTRY[count]",
            "Deletes every listed bundle. Validated first: an unknown or repeated handle fails the command "
            "with INVALID_PARAMETER and deletes nothing."),
    Command(Opcode.V2_UPDATE_SA, "OID_TCP_TASK_IPSEC_OFFLOAD_V2_UPDATE_SA", "V2_UPDATE_SA", "empty",
            "New ESN high bits for one element. Unknown handle, operation/SPI mismatch or non-ESN SA -> "
            "INVALID_PARAMETER."),
    Command(Opcode.ADD_SA_PACKET, "(beyond NDIS; like Linux XFRM packet offload)", "ADD_SA_PACKET + key buffer",
            "HANDLE_RESPONSE", "Adds one packet-offload bundle (ESP only)."),
    Command(Opcode.GET_STATS, "(beyond NDIS)", "empty", "GLOBAL_STATS", "Global counters."),
    Command(Opcode.GET_SA_STATS, "(beyond NDIS)", "HANDLE_REQUEST", "u32 handle, u32 count, SA_STATS_ENTRY[count]",
            "Per-element counters of one bundle; unknown handle -> INVALID_PARAMETER."),
    Command(Opcode.LIST_SAS, "(beyond NDIS)", "LIST_SAS_REQUEST", "LIST_SAS_RESPONSE + SA_LIST_ENTRY[count]",
            "Pages through the SA table; never returns key material."),
)


def markdown_tables() -> str:
    """All structure tables, in declaration order (used by the datasheet generator and its test)."""
    return "\n\n".join(layout.markdown() for layout in LAYOUTS.values())
