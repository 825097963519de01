"""Status codes the card reports: NDIS_STATUS_* for commands, CryptoStatus for received packets.

Values are the real NDIS ones, so a driver author can compare them with the WDK headers:
- NDIS_STATUS_* values: WDK ``ndis.h`` (NDIS 6.x) and the FreeBSD NDIS compatibility header
  ``sys/compat/ndis/ndis_var.h`` (freebsd/freebsd-src), which lists them numerically.
  ``NDIS_STATUS_INVALID_PARAMETER`` is defined by NDIS 6 ``ndis.h`` as ``STATUS_INVALID_PARAMETER``,
  which ``ntstatus.h`` defines as 0xC000000D (not in the 0xC001xxxx NDIS range).
- CryptoStatus: the NDIS enum used in ``NDIS_IPSEC_OFFLOAD_V2_NET_BUFFER_LIST_INFO.Receive.CryptoStatus``
  (0..7; see shared/reference/ipsec-offload-notes.md §1.8).

Part of the card's programming interface (device/contract: standard library only).
"""

from __future__ import annotations

from enum import IntEnum


class NdisStatus(IntEnum):
    """NDIS_STATUS_* values (u32) returned in an admin-command completion."""

    SUCCESS = 0x00000000  # NDIS_STATUS_SUCCESS
    NOT_ACCEPTED = 0x00010003  # NDIS_STATUS_NOT_ACCEPTED: firmware is resetting
    FAILURE = 0xC0000001  # NDIS_STATUS_FAILURE (= STATUS_UNSUCCESSFUL)
    INVALID_PARAMETER = 0xC000000D  # NDIS_STATUS_INVALID_PARAMETER (= STATUS_INVALID_PARAMETER)
    RESOURCES = 0xC000009A  # NDIS_STATUS_RESOURCES (= STATUS_INSUFFICIENT_RESOURCES): SA table full
    NOT_SUPPORTED = 0xC00000BB  # NDIS_STATUS_NOT_SUPPORTED (= STATUS_NOT_SUPPORTED)
    REQUEST_ABORTED = 0xC001000C  # NDIS_STATUS_REQUEST_ABORTED
    INVALID_LENGTH = 0xC0010014  # NDIS_STATUS_INVALID_LENGTH: payload size does not match the layout
    INVALID_DATA = 0xC0010015  # NDIS_STATUS_INVALID_DATA: a field holds an impossible value
    BUFFER_TOO_SHORT = 0xC0010016  # NDIS_STATUS_BUFFER_TOO_SHORT
    INVALID_OID = 0xC0010017  # NDIS_STATUS_INVALID_OID: unknown command opcode


class CryptoStatus(IntEnum):
    """RX ``crypto_status``: the NDIS CryptoStatus enum (receive metadata of a packet the card checked),
    plus card values from 0x100 up."""

    SUCCESS = 0
    GENERIC_ERROR = 1
    TRANSPORT_AH_AUTH_FAILED = 2
    TRANSPORT_ESP_AUTH_FAILED = 3
    TUNNEL_AH_AUTH_FAILED = 4
    TUNNEL_ESP_AUTH_FAILED = 5
    INVALID_PACKET_SYNTAX = 6
    INVALID_PROTOCOL = 7
    REPLAY = 0x100  # card value beyond NDIS (RX descriptor, packet offload): refused by the anti-replay window
