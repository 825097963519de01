"""The card's SA database: validate-then-commit adds, O(1) lookups, UDP-ESP parser entries, pairing.

* An *SA bundle* is what one NDIS add creates and one handle names: ESP, AH, or ESP followed by AH
  (same direction and endpoints). ``SaOffloadCapacity`` counts bundles.
* Handles (u32, never 0): ``VALID (bit 31) | generation (bits 30..20) | slot (bits 19..0)``. A deleted
  slot's generation is bumped, so a stale handle no longer matches (netdevsim uses index | BIT(31)).
* Inbound lookup is by (SPI, destination address, protocol) as NDIS receive processing requires
  ("the packet's destination address must equal the SA's"); an SA with a wildcard destination matches
  on (SPI, protocol) alone. The index is one dict per protocol keyed by the SPI alone, its value the
  bundle, whose packed destination the lookup then compares; the rare SPIs that several SAs share (other
  destinations, or a wildcard beside an exact one) go through a small per-SPI table. Per lookup that is
  one int hash and, in a large table, one cache miss fewer than a (SPI, dst, proto) tuple key -> tuple
  value, and no tuple is stored per SA.
* Packet-offload outbound SAs can also be found by selector (tuple-space search: one dict per
  distinct prefix-length pair).
* Inbound and outbound bundles with mirrored endpoints are paired, so SaDeleteReq on an inbound SA can
  mark its outbound partner too; both stay until the host deletes them (NDIS
  deleting-a-security-association-from-a-nic).
* Engines (cipher contexts) are built on first use, so a million idle SAs cost only their parameters.

Every refusal names one ``RejectReason`` and bumps its counter; nothing is stored until every check
has passed.
"""

from __future__ import annotations

import ipaddress
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from device.contract.enums import Direction, IpProto, Mode
from device.contract.ndis import RejectReason
from device.contract.sa import SaInvalid, SaParams, parse_address
from device.contract.status import NdisStatus
from firmware_model.algorithms import ENC_INFO, check_sa
from firmware_model.capabilities import Capabilities
from firmware_model.traffic_filter import TrafficFilter

VALID = 1 << 31
SLOT_BITS = 20
SLOT_MASK = (1 << SLOT_BITS) - 1
GEN_MASK = (1 << 11) - 1
PARSER_HANDLE_BASE = 0x4000_0000  # parser-entry handles live in their own space (bit 30, never 0)

# Enum members read through their class cost ~0.3 us each on Python 3.11; adds and lookups use these.
_ESP = IpProto.ESP
_AH = IpProto.AH
_INBOUND = Direction.INBOUND
_OUTBOUND = Direction.OUTBOUND
_TUNNEL = Mode.TUNNEL
_TRANSPORT = Mode.TRANSPORT

_STATUS_FOR = {
    RejectReason.CAPACITY: NdisStatus.RESOURCES,
    RejectReason.UNSUPPORTED_ALGORITHM: NdisStatus.NOT_SUPPORTED,
    RejectReason.UNSUPPORTED_FEATURE: NdisStatus.NOT_SUPPORTED,
}


class SaRejected(Exception):
    """An add was refused: one reason, its NDIS status, and a one-line message (never key bytes)."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = _STATUS_FOR.get(reason, NdisStatus.INVALID_PARAMETER)


@dataclass(eq=False)
class ParserEntry:
    """A v1 UDP-ESP parser entry: (encap type, UDP port) the card parses for ESP; refcounted by SAs."""

    handle: int
    encap_type: int
    port: int
    refs: int = 0


@dataclass(frozen=True)
class Selector:
    """Outbound traffic selector for packet offload (RFC 4301 §4.4.1 subset)."""

    family: int
    src: int
    src_prefix: int
    dst: int
    dst_prefix: int
    proto: int = 0  # 0 = any
    sport: int = 0
    dport: int = 0

    @classmethod
    def from_text(cls, src: str, dst: str, proto: int = 0, sport: int = 0, dport: int = 0) -> Selector:
        s = ipaddress.ip_network(src, strict=False)
        d = ipaddress.ip_network(dst, strict=False)
        if s.version != d.version:
            raise ValueError("selector src and dst must be the same IP family")
        return cls(s.version, int(s.network_address), s.prefixlen, int(d.network_address), d.prefixlen,
                   proto, sport, dport)


class SadbEntry:
    # A large table holds a million of these: only what the per-frame paths read is stored; the
    # inbound lookup keys, the endpoints, mode and family are derived from params when needed.
    __slots__ = ("handle", "params", "direction", "dst", "packet_offload", "tunnel", "selector",
                 "parser_entry", "paired", "delete_requested", "_runtime", "rx_filter")

    def __init__(self, params: tuple[SaParams, ...], packet_offload: bool, selector: Selector | None,
                 rx_filter: TrafficFilter | None = None) -> None:
        first = params[0]
        self.handle = 0
        self.params = params
        self.direction = first.direction
        # packed destination, b"" for a wildcard (shared through _packed's cache); set by Sadb.add for
        # inbound bundles, whose lookups compare it
        self.dst = b""
        self.tunnel = first.mode == _TUNNEL
        self.packet_offload = packet_offload
        self.selector = selector
        # inbound: which decrypted packets this SA may deliver (v1 filter, packet-offload selector);
        # None or an all-zero filter = every packet (traffic.py checks it after the ICV)
        self.rx_filter = None if rx_filter is None or rx_filter.is_any else rx_filter
        self.parser_entry: ParserEntry | None = None
        self.paired: SadbEntry | None = None
        self.delete_requested = False
        self._runtime = None

    @property
    def mode(self) -> Mode:
        return self.params[0].mode

    @property
    def family(self) -> int:
        """4 or 6: the IP version of the bundle's destination (add validated it)."""
        return _parse(self.params[0].dst)[0]

    @property
    def lookup_keys(self) -> tuple:
        """The keys this bundle's SAs are filed under in the inbound table (none when outbound)."""
        if self.direction != _INBOUND:
            return ()
        return tuple(Sadb._inbound_key(p) for p in self.params)

    @property
    def endpoints(self) -> tuple[bytes, bytes]:
        """Packed (src, dst) of the bundle; b"" for a wildcard address."""
        first = self.params[0]
        return _packed(first.src), _packed(first.dst)

    @property
    def esp_icv_len(self) -> int:
        """ICV length of the bundle's ESP element, -1 when it has none (AH only)."""
        return next((p.icv_len for p in self.params if p.proto == _ESP), -1)

    def runtime(self):
        """The engine (EspEngine/AhEngine, or engine.SaBundle for ESP+AH), built on first use: cipher
        contexts are costly and most of a large table may sit idle."""
        rt = self._runtime
        if rt is None:
            from firmware_model import engine

            if len(self.params) == 2:
                rt = engine.SaBundle(self.params[0], self.params[1])
            else:
                rt = engine.SaEngine(self.params[0])
            self._runtime = rt
        return rt

    def built_engines(self) -> list:
        """Per-element engines in params order, or [] if nothing was built yet."""
        rt = self._runtime
        if rt is None:
            return []
        if len(self.params) == 2:
            return [rt.esp, rt.ah]
        return [rt]

    def __repr__(self) -> str:  # never shows keys (SaParams hides them too)
        spis = "+".join(f"{p.proto.name}:{p.spi:#x}" for p in self.params)
        return f"<SadbEntry {self.handle:#010x} {self.direction.name} {spis}>"


class _SharedSpi:
    """Inbound index entry for an SPI that several SAs of one protocol use: packed destination (b"" for
    the wildcard) -> (bundle, index). Its ``dst`` of None is what tells lookup_inbound it is not a bundle."""

    __slots__ = ("by_dst",)
    dst = None

    def __init__(self) -> None:
        self.by_dst: dict[bytes, tuple[SadbEntry, int]] = {}


# (version, packed) of an address, cached; raises ValueError for garbage (params.parse_address)
_parse = parse_address


@lru_cache(maxsize=65536)
def _packed(addr: str | None) -> bytes:
    """Packed address for lookups; the unspecified address (0.0.0.0, ::) is a wildcard -> b""."""
    if not addr:
        return b""
    packed = _parse(addr)[1]
    return b"" if not any(packed) else packed


class Sadb:
    def __init__(self, caps: Capabilities) -> None:
        self.caps = caps
        self.capacity = caps.sa_capacity
        self.rejects = [0] * len(RejectReason)
        self.reset()

    def reset(self) -> None:
        self._slots: list[SadbEntry | None] = []
        self._gens = array("H")  # generation per slot (11 bits used)
        self._free: list[int] = []
        self._count = 0
        # inbound index, one per protocol: SPI -> the bundle, or a _SharedSpi when several SAs use it
        self._esp: dict[int, SadbEntry | _SharedSpi] = {}
        self._ah: dict[int, SadbEntry | _SharedSpi] = {}
        self._sel_groups: dict[tuple[int, int, int], dict[tuple[int, int], list[SadbEntry]]] = {}
        self._unpaired: dict[tuple, list[SadbEntry]] = {}
        self._parsers: dict[tuple[int, int], ParserEntry] = {}
        self._parsers_by_handle: dict[int, ParserEntry] = {}
        self._parser_ports: dict[int, int] = {}  # UDP port -> entries using it
        self._next_parser = 1
        self.udp_sa_count = 0  # SAs with UDP encapsulation (v2 UDP-ESP parses port 4500)

    # -- queries -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def get(self, handle: int) -> SadbEntry | None:
        # A stored handle always has VALID set, so equality with it also checks that bit.
        slots = self._slots
        slot = handle & SLOT_MASK
        if slot < len(slots):
            bundle = slots[slot]
            if bundle is not None and bundle.handle == handle:
                return bundle
        return None

    def lookup_inbound(self, spi: int, dst: bytes, proto: int) -> tuple[SadbEntry, int] | None:
        """Inbound SA for a received header: (bundle, index of the SA in it); `dst` is the packed
        destination address. An SA for exactly `dst` wins over one with a wildcard destination."""
        if proto == 50:
            sa = self._esp.get(spi)
        elif proto == 51:
            sa = self._ah.get(spi)
        else:
            return None
        if sa is None:
            return None
        sa_dst = sa.dst
        if sa_dst == dst or sa_dst == b"":
            return sa, (0 if proto == 50 else len(sa.params) - 1)  # as _hit, inlined
        if sa_dst is None:  # a _SharedSpi
            return sa.by_dst.get(dst) or sa.by_dst.get(b"")
        return None

    def lookup_selector(self, family: int, src: int, dst: int, proto: int, sport: int, dport: int) -> SadbEntry | None:
        """First packet-offload outbound bundle whose selector matches; longest prefixes first."""
        bits = 32 if family == 4 else 128
        full = (1 << bits) - 1
        for (fam, splen, dplen), table in self._sel_groups.items():
            if fam != family:
                continue
            smask = full ^ ((1 << (bits - splen)) - 1)
            dmask = full ^ ((1 << (bits - dplen)) - 1)
            for bundle in table.get((src & smask, dst & dmask), ()):
                sel = bundle.selector
                if (sel.proto in (0, proto) and sel.sport in (0, sport) and sel.dport in (0, dport)):
                    return bundle
        return None

    def parser_for_port(self, port: int) -> bool:
        return port in self._parser_ports

    def parser_entry(self, handle: int) -> ParserEntry | None:
        return self._parsers_by_handle.get(handle)

    @property
    def parser_count(self) -> int:
        return len(self._parsers)

    def bundles(self, start: int = 0) -> Iterator[tuple[int, SadbEntry]]:
        for slot in range(max(0, start), len(self._slots)):
            bundle = self._slots[slot]
            if bundle is not None:
                yield slot, bundle

    # -- validation --------------------------------------------------------------------------------
    def check(self, params: Sequence[SaParams], packet_offload: bool = False) -> None:
        """Raise SaRejected (counted) unless a bundle of `params` could be added right now."""
        try:
            self._check(params, packet_offload)
        except SaRejected as exc:
            self.rejects[exc.reason] += 1
            raise

    def _check(self, params: Sequence[SaParams], packet_offload: bool) -> None:
        caps = self.caps
        if not 1 <= len(params) <= 2:
            raise SaRejected(RejectReason.BAD_BUNDLE, f"a bundle holds 1 or 2 SAs, not {len(params)}")
        if len(params) == 2:
            esp, ah = params
            if esp.proto != _ESP or ah.proto != _AH:
                raise SaRejected(RejectReason.BAD_BUNDLE, "the only 2-SA bundle is ESP followed by AH")
            if (esp.direction, esp.mode, esp.src, esp.dst) != (ah.direction, ah.mode, ah.src, ah.dst):
                raise SaRejected(RejectReason.BAD_BUNDLE, "ESP and AH of a bundle must share direction, mode, endpoints")
            if esp.encap is not None:
                raise SaRejected(RejectReason.BAD_BUNDLE, "UDP encapsulation cannot be combined with AH (RFC 3948)")
            if not caps.ah_esp_combined:
                raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "AH+ESP bundles are not enabled")
            if packet_offload:
                raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "packet offload supports ESP-only bundles")
        for p in params:
            self._check_one(p, packet_offload)
        for p in params:
            if p.direction == _INBOUND and self._indexed(p) is not None:
                raise SaRejected(RejectReason.DUPLICATE_SPI,
                                 f"inbound {p.proto.name} SPI {p.spi:#x} to {p.dst or 'any'} already exists")
        if self._count >= self.capacity:
            raise SaRejected(RejectReason.CAPACITY, f"SA table full ({self.capacity} bundles)")

    def _check_one(self, p: SaParams, packet_offload: bool) -> None:
        caps = self.caps
        try:
            dst_version = _parse(p.dst)[0]
        except (ValueError, TypeError):
            dst_version = 0  # validate_sa below names the bad address
        if dst_version == 6 and not caps.ipv6:
            raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "IPv6 SAs are not enabled")
        if p.proto == _ESP and not caps.esp:
            raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "ESP is not enabled")
        if p.proto == _AH and not caps.ah:
            raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "AH is not enabled")
        if p.mode == _TUNNEL and not caps.tunnel:
            raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "tunnel mode is not enabled")
        if p.mode == _TRANSPORT and not caps.transport:
            raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "transport mode is not enabled")
        if p.esn and not caps.esn:
            raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "ESN is not enabled")
        if p.encap is not None and not caps.udp_esp:
            raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "UDP-ESP encapsulation is not enabled")
        if packet_offload:
            if not caps.packet_offload:
                raise SaRejected(RejectReason.UNSUPPORTED_FEATURE, "packet offload is not enabled")
            if p.replay_window > caps.max_replay_window:
                raise SaRejected(RejectReason.BAD_PARAMETER,
                                 f"replay window {p.replay_window} above the card's {caps.max_replay_window}")
        if p.proto == _ESP and p.enc_alg not in caps.encryption:
            raise SaRejected(RejectReason.UNSUPPORTED_ALGORITHM,
                             f"encryption {ENC_INFO[p.enc_alg].name if p.enc_alg in ENC_INFO else hex(p.enc_alg)} "
                             "is not enabled")
        if p.auth_alg and p.auth_alg not in caps.integrity:
            raise SaRejected(RejectReason.UNSUPPORTED_ALGORITHM, f"integrity {p.auth_alg.name} is not enabled")
        if p.proto == _ESP and ENC_INFO[p.enc_alg].kind == "cbc" and not p.auth_alg:
            # datasheet decision: NDIS says no IPsec packet may go without authentication; only combined
            # modes (AES-GCM) carry their own.
            raise SaRejected(RejectReason.UNSUPPORTED_ALGORITHM, "CBC encryption without integrity is refused")
        try:
            check_sa(p)  # the card-independent checks: one reason per refusal
        except SaInvalid as exc:
            raise SaRejected(exc.reason, str(exc)) from None

    @staticmethod
    def _inbound_key(p: SaParams) -> tuple:
        return (p.spi, _packed(p.dst), int(p.proto))

    def _table(self, p: SaParams) -> dict[int, SadbEntry | _SharedSpi]:
        return self._esp if p.proto == _ESP else self._ah

    @staticmethod
    def _hit(bundle: SadbEntry, proto: int) -> tuple[SadbEntry, int]:
        # ESP is first in any bundle; AH is second only in an ESP+AH bundle
        return bundle, (0 if proto == 50 else len(bundle.params) - 1)

    def _indexed(self, p: SaParams) -> tuple[SadbEntry, int] | None:
        """What the inbound index holds for exactly p's (SPI, destination, protocol), if anything."""
        dst = _packed(p.dst)
        sa = self._table(p).get(p.spi)
        if sa is None:
            return None
        if isinstance(sa, _SharedSpi):
            return sa.by_dst.get(dst)
        return self._hit(sa, p.proto) if sa.dst == dst else None

    def _file_inbound(self, bundle: SadbEntry) -> None:
        bundle.dst = dst = _packed(bundle.params[0].dst)  # a bundle's SAs share their endpoints (_check)
        for index, p in enumerate(bundle.params):
            table = self._table(p)
            there = table.get(p.spi)
            if there is None:
                table[p.spi] = bundle
                continue
            if not isinstance(there, _SharedSpi):  # a second SA with this SPI: switch to a per-SPI table
                shared = _SharedSpi()
                shared.by_dst[there.dst] = self._hit(there, p.proto)
                table[p.spi] = there = shared
            there.by_dst[dst] = (bundle, index)  # a checked=True add may overwrite (as it always could)

    def _unfile_inbound(self, bundle: SadbEntry) -> None:
        dst = bundle.dst
        for p in bundle.params:
            table = self._table(p)
            there = table.get(p.spi)
            if there is bundle:
                del table[p.spi]
            elif isinstance(there, _SharedSpi):
                hit = there.by_dst.get(dst)
                if hit is not None and hit[0] is bundle:
                    del there.by_dst[dst]
                    if len(there.by_dst) == 1:  # back to a plain entry
                        (last, _), = there.by_dst.values()
                        table[p.spi] = last
                    elif not there.by_dst:
                        del table[p.spi]

    # -- commit ------------------------------------------------------------------------------------
    def add(self, params: Sequence[SaParams], *, packet_offload: bool = False, selector: Selector | None = None,
            parser_entry: ParserEntry | None = None, rx_filter: TrafficFilter | None = None,
            checked: bool = False) -> SadbEntry:
        """Validate (unless `checked`) and store a bundle; returns it with its handle set."""
        if not checked:
            self.check(params, packet_offload)
        bundle = SadbEntry(tuple(params), packet_offload, selector, rx_filter)
        slot = self._alloc_slot()
        gen = self._gens[slot]
        bundle.handle = VALID | (gen << SLOT_BITS) | slot
        self._slots[slot] = bundle
        self._count += 1
        if bundle.direction == _INBOUND:
            self._file_inbound(bundle)
        if selector is not None:
            group = self._sel_groups.setdefault((selector.family, selector.src_prefix, selector.dst_prefix), {})
            group.setdefault((selector.src, selector.dst), []).append(bundle)
            # longest prefixes first (dicts keep insertion order, so rebuild sorted)
            self._sel_groups = dict(sorted(self._sel_groups.items(), key=lambda kv: -(kv[0][1] + kv[0][2])))
        if parser_entry is not None:
            parser_entry.refs += 1
            bundle.parser_entry = parser_entry
        if params[0].encap is not None:
            self.udp_sa_count += 1
        self._pair(bundle)
        return bundle

    def _alloc_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = len(self._slots)
        if slot > SLOT_MASK:
            raise SaRejected(RejectReason.CAPACITY, "no free handle slot")
        self._slots.append(None)
        self._gens.append(0)
        return slot

    def remove(self, handle: int) -> SadbEntry | None:
        bundle = self.get(handle)
        if bundle is None:
            return None
        slot = handle & SLOT_MASK
        self._slots[slot] = None
        self._gens[slot] = (self._gens[slot] + 1) & GEN_MASK
        self._free.append(slot)
        self._count -= 1
        if bundle.direction == _INBOUND:
            self._unfile_inbound(bundle)
        sel = bundle.selector
        if sel is not None:
            gkey = (sel.family, sel.src_prefix, sel.dst_prefix)
            group = self._sel_groups[gkey]
            lst = group[(sel.src, sel.dst)]
            lst.remove(bundle)
            if not lst:
                del group[(sel.src, sel.dst)]
            if not group:
                del self._sel_groups[gkey]
        if bundle.parser_entry is not None:
            bundle.parser_entry.refs -= 1
        if bundle.params[0].encap is not None:
            self.udp_sa_count -= 1
        self._unpair(bundle)
        return bundle

    # -- pairing (for SaDeleteReq) -----------------------------------------------------------------
    @staticmethod
    def _pair_key(bundle: SadbEntry, mirrored: bool) -> tuple:
        src, dst = bundle.endpoints
        direction = bundle.direction
        if mirrored:
            src, dst = dst, src
            direction = _OUTBOUND if direction == _INBOUND else _INBOUND
        return (int(direction), src, dst)

    def _pair(self, bundle: SadbEntry) -> None:
        waiting = self._unpaired.get(self._pair_key(bundle, mirrored=True))
        if waiting:
            partner = waiting.pop(0)
            if not waiting:
                del self._unpaired[self._pair_key(bundle, mirrored=True)]
            partner.paired = bundle
            bundle.paired = partner
        else:
            self._unpaired.setdefault(self._pair_key(bundle, mirrored=False), []).append(bundle)

    def _unpair(self, bundle: SadbEntry) -> None:
        partner = bundle.paired
        if partner is None:
            key = self._pair_key(bundle, mirrored=False)
            lst = self._unpaired.get(key)
            if lst and bundle in lst:
                lst.remove(bundle)
                if not lst:
                    del self._unpaired[key]
            return
        bundle.paired = None
        partner.paired = None
        if not partner.delete_requested:
            self._pair(partner)  # let it pair with a future replacement

    def request_delete(self, bundle: SadbEntry) -> None:
        """SaDeleteReq: flag the bundle and its partner; they stay until the host deletes them."""
        bundle.delete_requested = True
        if bundle.paired is not None:
            bundle.paired.delete_requested = True

    # -- UDP-ESP parser entries (v1) ----------------------------------------------------------------
    def find_parser(self, encap_type: int, port: int) -> ParserEntry | None:
        return self._parsers.get((encap_type, port))

    def create_parser(self, encap_type: int, port: int) -> ParserEntry:
        entry = ParserEntry(PARSER_HANDLE_BASE | self._next_parser, encap_type, port)
        self._next_parser = self._next_parser % 0xFFFFFF + 1
        while (PARSER_HANDLE_BASE | self._next_parser) in self._parsers_by_handle:
            self._next_parser = self._next_parser % 0xFFFFFF + 1
        self._parsers[(encap_type, port)] = entry
        self._parsers_by_handle[entry.handle] = entry
        self._parser_ports[port] = self._parser_ports.get(port, 0) + 1
        return entry

    def delete_parser(self, entry: ParserEntry) -> None:
        self._parsers.pop((entry.encap_type, entry.port), None)
        self._parsers_by_handle.pop(entry.handle, None)
        left = self._parser_ports.get(entry.port, 0) - 1
        if left > 0:
            self._parser_ports[entry.port] = left
        else:
            self._parser_ports.pop(entry.port, None)
