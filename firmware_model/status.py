"""Status codes the firmware reports: NDIS_STATUS_* for commands, CryptoStatus for received packets.

Values are the real NDIS ones, so a driver author can compare them with the WDK headers:
- NDIS_STATUS_* values: WDK ``ndis.h`` (NDIS 6.x) and the FreeBSD NDIS compatibility header
  ``sys/compat/ndis/ndis_var.h`` (freebsd/freebsd-src), which lists them numerically.
  ``NDIS_STATUS_INVALID_PARAMETER`` is defined by NDIS 6 ``ndis.h`` as ``STATUS_INVALID_PARAMETER``,
  which ``ntstatus.h`` defines as 0xC000000D (not in the 0xC001xxxx NDIS range).
- CryptoStatus: the NDIS enum used in ``NDIS_IPSEC_OFFLOAD_V2_NET_BUFFER_LIST_INFO.Receive.CryptoStatus``
  (0..7; see shared/reference/ipsec-offload-notes.md §1.8).

This module is stdlib-only: guest tools import it through ``firmware_model.ndis``.
"""

from __future__ import annotations

from enum import IntEnum
from functools import cache


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
    """NDIS CryptoStatus enum (receive metadata of a packet the card checked)."""

    SUCCESS = 0
    GENERIC_ERROR = 1
    TRANSPORT_AH_AUTH_FAILED = 2
    TRANSPORT_ESP_AUTH_FAILED = 3
    TUNNEL_AH_AUTH_FAILED = 4
    TUNNEL_ESP_AUTH_FAILED = 5
    INVALID_PACKET_SYNTAX = 6
    INVALID_PROTOCOL = 7


_AUTH_FAILED = {
    # (is_ah, is_tunnel) -> status
    (False, False): CryptoStatus.TRANSPORT_ESP_AUTH_FAILED,
    (True, False): CryptoStatus.TRANSPORT_AH_AUTH_FAILED,
    (False, True): CryptoStatus.TUNNEL_ESP_AUTH_FAILED,
    (True, True): CryptoStatus.TUNNEL_AH_AUTH_FAILED,
}


@cache
def _verdict_table() -> dict[int, CryptoStatus | None]:
    # Imported lazily: esp.py imports this module, and guest tools never need the engine.
    from firmware_model.esp import Verdict

    table: dict[int, CryptoStatus | None] = {}
    for verdict in Verdict:
        name = verdict.name
        if name in ("OK", "DUMMY"):
            # A dummy packet (next header 59) passed its ICV: RFC 4303 §2.6.
            table[verdict] = CryptoStatus.SUCCESS
        elif name == "AUTH_FAILED":
            table[verdict] = None  # depends on AH/ESP and transport/tunnel
        elif name == "BAD_SYNTAX":
            table[verdict] = CryptoStatus.INVALID_PACKET_SYNTAX
        elif name == "WRONG_PROTOCOL":
            table[verdict] = CryptoStatus.INVALID_PROTOCOL
        else:
            # REPLAY, HARD_LIMIT, SEQ_OVERFLOW, ...: outcomes NDIS has no code for (NDIS leaves anti-replay
            # to the host); the precise reason travels separately as the engine verdict.
            table[verdict] = CryptoStatus.GENERIC_ERROR
    return table


def crypto_status_for(verdict: int, *, ah: bool, tunnel: bool) -> CryptoStatus:
    """Map an engine ``Verdict`` for a received packet to the NDIS CryptoStatus.

    ``ah`` says which header failed (AH or ESP), ``tunnel`` whether the SA is a tunnel-mode SA
    (NDIS distinguishes CRYPTO_TRANSPORT_* from CRYPTO_TUNNEL_* auth failures).
    """
    status = _verdict_table().get(int(verdict), CryptoStatus.GENERIC_ERROR)
    if status is None:
        return _AUTH_FAILED[(ah, tunnel)]
    return status
