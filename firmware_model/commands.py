"""The firmware's admin commands: decode (device/contract/sa.py), check against the card (SADB),
commit; one handler per opcode. The dispatch that calls them is firmware.Firmware.execute."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from device.contract import ndis
from device.contract.enums import Direction, IpProto, Mode
from device.contract.ndis import NdisStatus, ParseError, RejectReason, SaListFlags, V2Operation
from device.contract.sa import NAT_T_PORT, SaInvalid, SaParams, UdpEncap, decode_v1, decode_v2
from firmware_model.capabilities import Capabilities
from firmware_model.sadb import Sadb, SadbEntry, SaRejected, Selector
from firmware_model.traffic_filter import TrafficFilter


class AdminCommands:
    """The command handlers of Firmware (a part of it: they share its SADB, capabilities and last_error)."""

    caps: Capabilities
    sadb: Sadb
    last_error: str

    def stats(self) -> ndis.GlobalStats:
        raise NotImplementedError  # Firmware.stats

    # Python-level add used by commands, sa_file/fwtool and tests
    def add_sa(self, params: list[SaParams] | tuple[SaParams, ...], *, packet_offload: bool = False,
               selector: Selector | None = None, rx_filter: TrafficFilter | None = None) -> int:
        """Add one bundle (raises SaRejected). Packet-offload transport SAs without a selector match
        traffic between their endpoints."""
        outbound = bool(params) and params[0].direction == Direction.OUTBOUND
        if not outbound:
            selector = None  # selectors pick SAs for transmit: an inbound SA must never encrypt traffic
        elif packet_offload and selector is None:
            selector = _default_selector(params[0])
        entry = self.sadb.add(params, packet_offload=packet_offload, selector=selector, rx_filter=rx_filter)
        return entry.handle

    def _cmd_get_caps(self, req: bytes) -> tuple[int, bytes]:
        _expect_empty(req, "GET_CAPS")
        return NdisStatus.SUCCESS, self.caps.pack()

    def _cmd_get_stats(self, req: bytes) -> tuple[int, bytes]:
        _expect_empty(req, "GET_STATS")
        # counts this command as completed before it snapshots (so cmd_ok includes it)
        snap = self.stats()
        snap.cmd_ok += 1
        return NdisStatus.SUCCESS, snap.pack()

    # -- v1
    def _bundle(self, handle: int, command: str) -> SadbEntry:
        """The SA bundle ``handle`` names; INVALID_PARAMETER for an unknown or stale one."""
        sa = self.sadb.get(handle)
        if sa is None:
            raise ParseError(f"{command}: unknown handle {handle:#x}", NdisStatus.INVALID_PARAMETER)
        return sa

    def _decoded(self, decode: Callable[..., list[SaParams]], *args, **kwargs) -> list[SaParams]:
        """The SAs a command carries; a refusal is counted under its reason (validate, then commit)."""
        try:
            return decode(*args, **kwargs)
        except SaInvalid as exc:
            raise self._count(exc.reason, str(exc)) from None

    def _count(self, reason: RejectReason, message: str) -> SaRejected:
        self.sadb.rejects[reason] += 1
        return SaRejected(reason, message)

    def _cmd_v1_add_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V1AddSa.unpack(req_bytes)
        params = self._decoded(decode_v1, req, req.key_mat)
        entry = self.sadb.add(params, rx_filter=_v1_rx_filter(req, params, udpesp=False))
        return NdisStatus.SUCCESS, ndis.HandleResponse(entry.handle).pack()

    def _cmd_v1_add_udpesp_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V1AddUdpEspSa.unpack(req_bytes)
        params = self._decoded(decode_v1, req, req.key_mat)
        if any(p.proto != IpProto.ESP for p in params):
            raise self._count(RejectReason.BAD_ENCAPSULATION, "UDP-ESP SAs carry ESP only")
        if req.udp_encap_type != ndis.UdpEncapType.OTHER:
            raise self._count(RejectReason.UNSUPPORTED_FEATURE,
                              f"udp_encap_type {req.udp_encap_type}: only OTHER (1) is supported")
        inbound = params[0].direction == Direction.INBOUND
        entry = None
        port = NAT_T_PORT
        if inbound:
            port = req.dst_encap_port
            if port == 0:
                raise self._count(RejectReason.BAD_ENCAPSULATION, "dst_encap_port 0")
            if req.encap_type_entry_offld_handle:
                entry = self.sadb.parser_entry(req.encap_type_entry_offld_handle)
                if entry is None or (entry.encap_type, entry.port) != (req.udp_encap_type, port):
                    raise self._count(RejectReason.BAD_PARSER_ENTRY,
                                      f"parser entry {req.encap_type_entry_offld_handle:#x} unknown or for another port")
        params = [replace(p, encap=UdpEncap(sport=NAT_T_PORT, dport=port)) for p in params]
        # all or nothing: validate the SA before a parser entry is created
        self.sadb.check(params)
        created = False
        if inbound and entry is None:
            entry = self.sadb.find_parser(req.udp_encap_type, port)
            if entry is None:
                entry = self.sadb.create_parser(req.udp_encap_type, port)
                created = True
        try:
            sa = self.sadb.add(params, parser_entry=entry, rx_filter=_v1_rx_filter(req, params, udpesp=True),
                               checked=True)
        except Exception:
            if created:
                self.sadb.delete_parser(entry)
            raise
        return NdisStatus.SUCCESS, ndis.V1AddUdpEspResponse(sa.handle, entry.handle if entry else 0).pack()

    def _cmd_v1_delete_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V1DeleteSa.unpack(req_bytes)
        if self.sadb.remove(req.offload_handle) is None:
            raise ParseError(f"unknown handle {req.offload_handle:#x}", NdisStatus.INVALID_PARAMETER)
        return NdisStatus.SUCCESS, b""

    def _cmd_v1_delete_udpesp_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V1DeleteUdpEspSa.unpack(req_bytes)
        sa = self._bundle(req.offload_handle, "V1_DELETE_UDPESP_SA")
        entry = None
        if req.encap_type_entry_offld_handle:
            entry = self.sadb.parser_entry(req.encap_type_entry_offld_handle)
            if entry is None:
                raise ParseError(f"unknown parser entry {req.encap_type_entry_offld_handle:#x}",
                                 NdisStatus.INVALID_PARAMETER)
            others = entry.refs - (1 if sa.parser_entry is entry else 0)
            if others:
                raise ParseError(f"parser entry {entry.handle:#x} still used by {others} other SA(s)",
                                 NdisStatus.INVALID_PARAMETER)
        self.sadb.remove(sa.handle)
        if entry is not None:
            self.sadb.delete_parser(entry)
        return NdisStatus.SUCCESS, b""

    # -- v2
    def _add_v2_entry(self, req, key: bytes) -> SadbEntry:
        return self.sadb.add(self._decoded(decode_v2, req, key, udp_esp_offered=int(self.caps.udp_esp)))

    def _cmd_v2_add_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        entries = ndis.unpack_v2_add_sa_list(req_bytes)  # a malformed list adds nothing
        results = []
        first_error: NdisStatus | None = None
        added = 0
        for entry in entries:
            try:
                sa = self._add_v2_entry(entry, entry.key_data)
                results.append(ndis.V2AddSaResult(sa.handle, NdisStatus.SUCCESS, 0))
                added += 1
            except SaRejected as exc:  # partial success: this entry gets a NULL handle
                # beyond NDIS: the entry keeps why it was refused (datasheet §12.1 row 10)
                results.append(ndis.V2AddSaResult(0, exc.status, int(exc.reason)))
                first_error = first_error or exc.status
                self.last_error = str(exc)
        status = NdisStatus.SUCCESS if added else (first_error or NdisStatus.FAILURE)
        return status, ndis.pack_counted(results)

    def _cmd_v2_add_sa_ex(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V2AddSaEx.unpack(req_bytes)
        sa = self._add_v2_entry(req, req.key_data)
        return NdisStatus.SUCCESS, ndis.HandleResponse(sa.handle).pack()

    def _cmd_add_sa_packet(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.AddSaPacket.unpack(req_bytes)
        if req.num_ext_hdrs != 1 or req.sec_assoc[0].operation != V2Operation.ESP:
            raise self._count(RejectReason.UNSUPPORTED_FEATURE, "packet offload takes exactly one ESP SA")
        params = self._decoded(decode_v2, req, req.key_data, udp_esp_offered=int(self.caps.udp_esp), packet=req)
        selector = None
        if req.sel_flags & ndis.SEL_PRESENT:
            v6 = bool(req.sel_flags & ndis.SEL_IPV6)
            bits = 128 if v6 else 32
            src = int.from_bytes(req.sel_src[: bits // 8], "big")
            dst = int.from_bytes(req.sel_dst[: bits // 8], "big")
            full = (1 << bits) - 1
            smask = full ^ ((1 << (bits - req.sel_src_prefix)) - 1)
            dmask = full ^ ((1 << (bits - req.sel_dst_prefix)) - 1)
            selector = Selector(6 if v6 else 4, src & smask, req.sel_src_prefix, dst & dmask, req.sel_dst_prefix,
                                req.sel_proto, req.sel_sport, req.sel_dport)
        rx_filter = None
        if selector is not None and params[0].direction == Direction.INBOUND:
            # RFC 4301 §5.2 step 4: the inbound SA's selector is checked after decapsulation
            rx_filter = TrafficFilter.from_prefixes(
                128 if selector.family == 6 else 32, selector.src, selector.src_prefix, selector.dst,
                selector.dst_prefix, selector.proto, selector.sport, selector.dport)
        handle = self.add_sa(params, packet_offload=True, selector=selector, rx_filter=rx_filter)
        return NdisStatus.SUCCESS, ndis.HandleResponse(handle).pack()

    def _cmd_v2_delete_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        handles = ndis.unpack_v2_delete_sa_list(req_bytes)
        statuses = []
        seen: set[int] = set()
        ok = True
        for h in handles:
            good = h not in seen and self.sadb.get(h) is not None
            seen.add(h)
            statuses.append(ndis.StatusEntry(NdisStatus.SUCCESS if good else NdisStatus.INVALID_PARAMETER))
            ok &= good
        if not ok:  # validate-then-commit: nothing is deleted
            self.last_error = "V2_DELETE_SA: unknown or repeated handle"
            return NdisStatus.INVALID_PARAMETER, ndis.pack_counted(statuses)
        for h in handles:
            self.sadb.remove(h)
        return NdisStatus.SUCCESS, ndis.pack_counted(statuses)

    def _cmd_v2_update_sa(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.V2UpdateSa.unpack(req_bytes)
        bad = NdisStatus.INVALID_PARAMETER
        sa = self._bundle(req.offload_handle, "UPDATE_SA")
        proto = {V2Operation.ESP: IpProto.ESP, V2Operation.AH: IpProto.AH}.get(req.operation)
        if proto is None:
            raise ParseError(f"UPDATE_SA: operation {req.operation}", bad)
        match = [p for p in sa.params if p.proto == proto and p.spi == req.spi]
        if not match:
            raise ParseError(f"UPDATE_SA: no {proto.name} SPI {req.spi:#x} in bundle {sa.handle:#x}", bad)
        if not match[0].esn or not self.caps.esn:
            raise ParseError(f"UPDATE_SA: SA {req.spi:#x} is not an ESN SA", bad)
        if sa.packet_offload:
            raise ParseError("UPDATE_SA: packet-offload SAs track their own ESN", bad)
        rt = sa.runtime()
        engines = sa.built_engines()
        target = engines[sa.params.index(match[0])] if len(engines) > 1 else rt
        target.set_seq_hi(req.sequence_number_high_order)
        return NdisStatus.SUCCESS, b""

    def _cmd_get_sa_stats(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.HandleRequest.unpack(req_bytes)
        sa = self._bundle(req.offload_handle, "GET_SA_STATS")
        engines = sa.built_engines()
        entries = []
        for i, p in enumerate(sa.params):
            st = engines[i].stats if engines else None
            entries.append(ndis.SaStatsEntry(
                spi=p.spi, proto=int(p.proto), direction=int(p.direction),
                packets=st.packets if st else 0, bytes=st.bytes if st else 0,
                auth_failures=st.auth_failures if st else 0, replay_drops=st.replay_drops if st else 0,
                syntax_errors=st.syntax_errors if st else 0,
                other_errors=(st.seq_overflows + st.hard_limit_drops + st.wrong_protocol) if st else 0,
            ))
        return NdisStatus.SUCCESS, ndis.pack_sa_stats(sa.handle, entries)

    def _cmd_list_sas(self, req_bytes: bytes) -> tuple[int, bytes]:
        req = ndis.ListSasRequest.unpack(req_bytes)
        # A page below one whole bundle could never make progress (next_index would not move).
        if not ndis.MIN_LIST_SAS_ENTRIES <= req.max_entries <= ndis.MAX_LIST_SAS_ENTRIES:
            raise ParseError(f"LIST_SAS: max_entries {req.max_entries} outside "
                             f"{ndis.MIN_LIST_SAS_ENTRIES}..{ndis.MAX_LIST_SAS_ENTRIES}", NdisStatus.INVALID_PARAMETER)
        rows: list[ndis.SaListEntry] = []
        next_index = 0xFFFF_FFFF
        for slot, sa in self.sadb.bundles(req.start_index):
            if len(rows) + len(sa.params) > req.max_entries:
                next_index = slot
                break
            flags = SaListFlags(0)
            if sa.params[0].esn:
                flags |= SaListFlags.ESN
            if sa.params[0].encap is not None:
                flags |= SaListFlags.UDP_ENCAP
            if sa.packet_offload:
                flags |= SaListFlags.PACKET_OFFLOAD
            if sa.delete_requested:
                flags |= SaListFlags.DELETE_REQUESTED
            if sa.paired is not None:
                flags |= SaListFlags.PAIRED
            for p in sa.params:
                rows.append(ndis.SaListEntry(sa.handle, p.spi, int(p.proto), int(p.direction), int(p.mode),
                                             sa.family, int(flags), sa.paired.handle if sa.paired else 0))
        head = ndis.ListSasResponse(len(self.sadb), next_index, len(rows))
        return NdisStatus.SUCCESS, ndis.pack_list_sas(head, rows)

    # ---------------------------------------------------------------------------------------------
    # datapath


def _expect_empty(req: bytes, name: str) -> None:
    if req:
        raise ParseError(f"{name} takes no payload, got {len(req)} bytes", NdisStatus.INVALID_LENGTH)


def _v1_rx_filter(req, params: list[SaParams], *, udpesp: bool) -> TrafficFilter | None:
    """Inbound v1 SAs deliver only the packets their filter covers (seed 000: the filter names the
    packets "to which the SAs apply"); outbound ones are the host's to use."""
    if params[0].direction != Direction.INBOUND:
        return None
    return TrafficFilter.from_v1(req, udpesp=udpesp)


def _default_selector(p: SaParams) -> Selector | None:
    """Transport mode: the SA endpoints; tunnel mode: the inner addresses if given, else none."""
    if p.mode == Mode.TRANSPORT:
        return Selector.from_text(p.src, p.dst)
    if p.inner_src or p.inner_dst:
        any_addr = "::/0" if (p.inner_src or p.inner_dst or "").count(":") else "0.0.0.0/0"
        return Selector.from_text(p.inner_src or any_addr, p.inner_dst or any_addr)
    return None
