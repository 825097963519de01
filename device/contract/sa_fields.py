"""Which SA field is honoured where, per offload mode: the one table the SA-file loader and the guest CLI
check before they add an SA, so no field a user gave vanishes silently.

Each SA field (the SA-file key; the CLI flag of the same name) is, per offload mode,

* honoured by the **card** (it travels in the add command and the card acts on it),
* honoured by the **host** driver (crypto offload: the host numbers and frames packets itself), or
* **refused** (the mode has no place for it; the user is told to drop it or change the mode).

Crypto offload follows NDIS: V2_ADD_SA(_EX) and V1_ADD_SA carry no anti-replay window, no lifetime and no
low sequence half (the V2 SA has only SequenceNumberHighOrder), and v2 carries no mode and no selector.
The v1 filter (Protocol, SrcPort, DestPort: the SA file's ``selector``) is enforced by the card on inbound
SAs only. Packet offload (ADD_SA_PACKET, beyond NDIS) carries everything.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from device.contract.enums import Direction, IpProto, Mode
from device.contract.net import IPPROTO_UDP
from device.contract.sa import NAT_T_PORT, SaParams


class Offload(enum.Enum):
    """How an SA is added: crypto offload through the v2 or v1 commands, or packet offload."""

    CRYPTO = "crypto offload"
    CRYPTO_V1 = "crypto offload (--v1)"
    PACKET = "packet offload"

    @classmethod
    def of(cls, offload: str, v1: bool = False) -> Offload:
        if offload == "packet":
            return cls.PACKET
        return cls.CRYPTO_V1 if v1 else cls.CRYPTO


class Where(enum.Enum):
    CARD = "card"
    HOST = "host"
    REFUSED = "refused"


CARD, HOST, REFUSED = Where.CARD, Where.HOST, Where.REFUSED


@dataclass(frozen=True)
class FieldRule:
    key: str  # SA-file key (CLI: --key with '-' for '_')
    case: str  # which SAs the row is about (rendered in README)
    applies: Callable[[SaParams], bool]
    crypto: Where
    crypto_v1: Where
    packet: Where
    why: str  # the reason given when the field is refused

    def where(self, offload: Offload) -> Where:
        return {Offload.CRYPTO: self.crypto, Offload.CRYPTO_V1: self.crypto_v1, Offload.PACKET: self.packet}[offload]


def _always(_: SaParams) -> bool:
    return True


def _inbound(p: SaParams) -> bool:
    return p.direction == Direction.INBOUND


def _outbound(p: SaParams) -> bool:
    return p.direction == Direction.OUTBOUND


def _udp_on_udp_esp(p: SaParams) -> bool:
    return p.encap is not None and p.sel_proto == IPPROTO_UDP


_NO_CARD_FIELD = "NDIS crypto offload has no field for it on the card"

# The table. A row concerns an SA when its key was given and ``applies`` holds; the first refusing row
# names the key. Fields not listed (spi, direction, src, dst, algorithms and keys) are honoured by the card
# in every mode.
FIELD_RULES: tuple[FieldRule, ...] = (
    FieldRule("mode", "any", _always, HOST, CARD, CARD,
              "the host frames tunnel/transport itself in crypto offload (v2 has no mode field)"),
    FieldRule("src, dst", "tunnel mode: the inner selector", lambda p: p.mode == Mode.TUNNEL, HOST, CARD, CARD,
              "v2 has no selector: the host driver checks inner addresses on send and receive (RFC 4301 §5.2)"),
    FieldRule("proto", "ah", lambda p: p.proto == IpProto.AH, CARD, CARD, REFUSED,
              "packet offload takes ESP SAs only; add AH SAs with crypto offload"),
    FieldRule("ah", "ESP-then-AH bundle", _always, CARD, CARD, REFUSED,
              "packet offload takes exactly one ESP SA; add bundles with crypto offload"),
    FieldRule("esn", "true", lambda p: p.esn, CARD, REFUSED, CARD,
              "the v1 commands have no extended sequence numbers; use the v2 commands (drop --v1)"),
    FieldRule("encap", "sport/dport other than 4500", lambda p: p.encap is not None and
              (p.encap.sport, p.encap.dport) != (NAT_T_PORT, NAT_T_PORT), REFUSED, REFUSED, CARD,
              "NDIS offloads UDP-ESP on port 4500 only (RFC 3948); use packet offload for other ports"),
    FieldRule("seq", "outbound: last number used", _outbound, HOST, HOST, CARD,
              "(never refused)"),
    FieldRule("seq", "inbound, ESN high half", lambda p: _inbound(p) and p.esn and not p.seq & 0xFFFF_FFFF,
              CARD, REFUSED, CARD,
              "an inbound SA's window start is not carried by NDIS crypto offload"),
    FieldRule("seq", "inbound, low 32 bits", lambda p: _inbound(p) and p.seq & 0xFFFF_FFFF != 0,
              REFUSED, REFUSED, CARD,
              "NDIS crypto offload carries only the ESN high half (SequenceNumberHighOrder); the card has no "
              "window start below it"),
    FieldRule("replay_window", "inbound", _inbound, REFUSED, REFUSED, CARD,
              "no anti-replay on the card (NDIS leaves it to the host stack)"),
    FieldRule("replay_window", "outbound", _outbound, REFUSED, REFUSED, REFUSED,
              "an anti-replay window applies to inbound SAs only (RFC 4303 §3.4.3)"),
    FieldRule("lifetime", "packets and bytes, soft and hard", _always, REFUSED, REFUSED, CARD,
              f"{_NO_CARD_FIELD} (NDIS has no lifetime fields; the host stack counts)"),
    # The v1 filter's Protocol/SrcPort/DestPort, ADD_SA_PACKET's sel_proto/sel_sport/sel_dport.
    FieldRule("selector", "inbound: proto, sport, dport", _inbound, REFUSED, CARD, CARD,
              "V2_ADD_SA has no filter fields (datasheet §12.1 row 8) and the host driver checks only a tunnel's "
              "inner addresses"),
    FieldRule("selector", "outbound: proto, sport, dport", _outbound, REFUSED, REFUSED, CARD,
              "the card applies a crypto-offload filter to received packets only; outbound, the host picks the "
              "SA for each packet"),
    FieldRule("selector", "proto udp on a UDP-ESP SA", _udp_on_udp_esp, REFUSED, REFUSED, CARD,
              "V1_ADD_UDPESP_SA's Protocol 17 names the encapsulation, not the inner protocol (datasheet §12.1 "
              "row 16)"),
)


@dataclass(frozen=True)
class Refusal:
    key: str
    message: str


def refusals(p: SaParams, given: Iterable[str], offload: Offload) -> list[Refusal]:
    """The given fields of ``p`` that ``offload`` cannot honour, one Refusal per key (first rule wins)."""
    given = set(given)
    out: dict[str, Refusal] = {}
    for rule in FIELD_RULES:
        if rule.key in given and rule.key not in out and rule.applies(p) and rule.where(offload) == REFUSED:
            hint = "" if offload == Offload.PACKET else "; remove it or use --offload packet"
            if rule.key in ("esn", "seq") and offload == Offload.CRYPTO_V1:
                hint = "; remove it or drop --v1"
            if rule.key == "replay_window" and _outbound(p):
                hint = "; remove it"
            if rule.key == "selector":
                hint = ("; remove it or use --offload packet" if offload == Offload.CRYPTO_V1 or _outbound(p)
                        else "; remove it, or use --v1 or --offload packet")
            out[rule.key] = Refusal(rule.key, f"{offload.value}: {rule.why}{hint}")
    return list(out.values())


def markdown_table() -> str:
    """FIELD_RULES as the README table (tests/firmware/test_sa_file.py checks README carries it)."""
    lines = ["| field | case | crypto (v2) | crypto `--v1` | packet |", "|---|---|---|---|---|"]
    for r in FIELD_RULES:
        lines.append(f"| `{r.key}` | {r.case} | {r.crypto.value} | {r.crypto_v1.value} | {r.packet.value} |")
    return "\n".join(lines)
