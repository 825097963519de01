"""The driver's SA API (add, delete, list, update, statistics) and what the host remembers about its SAs
(never keys): the outbound sequence counter, the ESN high half it pushed, the ESP framing sizes."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from device.contract import ndis
from device.contract import sa as sa_codec
from device.contract.enums import IpProto, Mode
from device.contract.ndis import Opcode
from device.contract.sa import SaParams
from guest_tools import packets
from guest_tools import sa as sa_wire
from guest_tools.admin_queue import CardError, _opcode_name

# what the host remembers about its SAs (no keys)


@dataclass
class HostSa:
    handle: int
    spi: int
    direction: int
    offload: str  # "crypto" | "packet"
    esn: bool = False
    next_seq: int = 1  # outbound crypto offload: sequence number of the next packet
    seq_hi_pushed: int = 0  # ESN high half last told to the card (UPDATE_SA)
    iv_len: int = 0
    icv_len: int = 0
    align: int = 4
    tunnel: bool = False
    encap: tuple[int, int] | None = None
    src: str = ""
    dst: str = ""
    inner_src: str | None = None  # tunnel mode: the selector the host checks (v2 carries none to the card)
    inner_dst: str | None = None
    ah_spi: int = 0  # AH SA of the bundle (or the AH-only SA); 0 = no AH
    ah_iv_len: int = 0
    ah_icv_len: int = 0

    @property
    def has_esp(self) -> bool:
        return bool(self.icv_len)

    @property
    def framable(self) -> bool:
        """The host knows how to frame this SA's packets (crypto offload, ESP and/or AH)."""
        return self.offload == "crypto" and bool(self.icv_len or self.ah_icv_len)

    def geometry(self) -> packets.EspGeometry:
        return packets.EspGeometry(self.spi, self.iv_len, self.icv_len, self.align, self.tunnel, self.encap,
                                   self.src, self.dst)

    def ah_geometry(self) -> packets.AhGeometry:
        # in a bundle AH is applied in transport mode over what ESP produced (RFC 4301 §4.5)
        return packets.AhGeometry(self.ah_spi, self.ah_iv_len, self.ah_icv_len, self.tunnel and not self.has_esp,
                                  self.src, self.dst)


class HostSaTable:
    """handle -> HostSa, optionally persisted to a JSON file so separate CLI processes share it."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.sas: dict[int, HostSa] = {}
        if self.path is not None and self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                for item in raw.get("sas", []):
                    if item.get("encap") is not None:
                        item["encap"] = tuple(item["encap"])
                    sa = HostSa(**item)
                    self.sas[sa.handle] = sa
            except (OSError, ValueError, TypeError) as exc:
                raise CardError(f"host SA state {self.path} unreadable ({exc}); delete it and run 'reset'") from None

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sas": [asdict(s) for s in self.sas.values()]}, indent=1))
        os.replace(tmp, self.path)

    def get(self, handle: int) -> HostSa | None:
        return self.sas.get(handle)


@dataclass(frozen=True)
class AddResult:
    """One entry of a V2_ADD_SA list: handle 0 and a non-SUCCESS NDIS status when the card refused it."""

    params: SaParams
    handle: int
    status: int
    reason: int | None = None  # RejectReason, when the card's V2_ADD_SA_RESULT carries one

    @property
    def reason_name(self) -> str:
        if self.reason is None:
            return ""
        try:
            return ndis.RejectReason(self.reason).name
        except ValueError:
            return f"reason {self.reason}"


class SaOps:
    """Card's SA part: admin commands through AdminQueueOps, host state in ``self.host``."""

    host: HostSaTable
    admin_buf_size: int

    def command(self, opcode: int, request: bytes = b"") -> bytes:
        raise NotImplementedError  # AdminQueueOps.command

    def admin(self, opcode: int, request: bytes = b"", timeout: float | None = None) -> tuple[int, bytes]:
        raise NotImplementedError  # AdminQueueOps.admin

    # SA operations

    def caps(self) -> ndis.CapsWire:
        return ndis.CapsWire.unpack(self.command(Opcode.GET_CAPS))

    def firmware_stats(self) -> ndis.GlobalStats:
        return ndis.GlobalStats.unpack(self.command(Opcode.GET_STATS))

    def add_sa(self, params: SaParams, offload: str = "crypto", v1: bool = False, ah: SaParams | None = None) -> int:
        """Offload one SA (with ``ah``: an ESP-then-AH bundle); returns its handle. ``offload``: "crypto"
        (V2_ADD_SA_EX, or V1_ADD_SA / V1_ADD_UDPESP_SA with ``v1``) or "packet" (ADD_SA_PACKET)."""
        try:
            if offload == "packet":
                if v1:
                    raise ValueError("v1 commands have no packet offload")
                if ah is not None:
                    raise ValueError("packet offload takes exactly one ESP SA (no AH bundles)")
                opcode, request = Opcode.ADD_SA_PACKET, sa_codec.add_sa_packet(params)
            elif offload != "crypto":
                raise ValueError(f"offload must be 'crypto' or 'packet', not {offload!r}")
            elif v1 and params.encap is not None:
                if ah is not None:
                    raise ValueError("UDP encapsulation cannot carry AH (RFC 3948 covers ESP only)")
                opcode, request = Opcode.V1_ADD_UDPESP_SA, sa_codec.v1_add_udpesp_sa(params)
            elif v1:
                opcode, request = Opcode.V1_ADD_SA, sa_codec.v1_add_sa(params, ah)
            else:
                opcode, request = Opcode.V2_ADD_SA_EX, sa_codec.v2_add_sa_ex(params, ah)
        except ValueError as exc:
            raise CardError(f"SA {params.spi:#x} cannot be offloaded: {exc}") from None
        response = self.command(opcode, request)
        handle = struct.unpack_from("<I", response)[0] if len(response) >= 4 else 0
        if handle == 0:
            raise CardError(f"{_opcode_name(opcode)} succeeded but returned handle 0 (firmware bug)")
        self._remember(params, handle, offload, ah)
        self.host.save()
        return handle

    def add_sa_list(self, params: list[SaParams], ahs: list[SaParams | None] | None = None) -> list[AddResult]:
        """Offload crypto-offload SAs (``ahs[i]``: the AH of an ESP-then-AH bundle) as V2_ADD_SA lists
        (NDIS partial success: each entry has its own result; the SAs that were added stay added). One
        command per list that fits the admin buffer."""
        ahs = ahs or [None] * len(params)
        try:
            requests = [(p, ah, sa_codec.v2_add_sa_list([p], [ah])) for p, ah in zip(params, ahs, strict=True)]
        except ValueError as exc:
            raise CardError(f"SA cannot be offloaded: {exc}") from None
        results: list[AddResult] = []
        batch: list[tuple[SaParams, SaParams | None]] = []
        size = 0
        for p, ah, alone in requests:
            if batch and size + len(alone) + 4 > self.admin_buf_size:
                results += self._add_batch(batch)
                batch, size = [], 0
            batch.append((p, ah))
            size += len(alone) + 4  # + alignment padding between entries
        if batch:
            results += self._add_batch(batch)
        self.host.save()
        return results

    def _add_batch(self, batch: list[tuple[SaParams, SaParams | None]]) -> list[AddResult]:
        request = sa_codec.v2_add_sa_list([p for p, _ in batch], [ah for _, ah in batch])
        fw_status, response = self.admin(Opcode.V2_ADD_SA, request)
        try:
            entries = ndis.unpack_counted(response, ndis.V2_ADD_SA_RESULT)
        except ndis.ParseError:
            entries = []
        if len(entries) != len(batch):
            # a malformed list is refused whole (nothing added): every entry gets the command's status
            if fw_status == 0:
                raise CardError(f"V2_ADD_SA returned {len(entries)} results for {len(batch)} entries")
            return [AddResult(p, 0, fw_status) for p, _ in batch]
        out = []
        for (p, ah), r in zip(batch, entries, strict=True):
            if r.offload_handle and r.status == 0:
                self._remember(p, r.offload_handle, "crypto", ah)
            out.append(AddResult(p, r.offload_handle, r.status, getattr(r, "reason", None) if r.status else None))
        return out

    def _remember(self, params: SaParams, handle: int, offload: str, ah: SaParams | None = None) -> None:
        host = HostSa(handle, params.spi, int(params.direction), offload, params.esn,
                      next_seq=params.seq + 1, seq_hi_pushed=params.seq >> 32)
        if offload == "crypto":
            host.tunnel, host.src, host.dst = params.mode == Mode.TUNNEL, params.src, params.dst
            host.inner_src, host.inner_dst = params.inner_src, params.inner_dst
            if params.proto == IpProto.ESP:
                g = sa_wire.esp_geometry(params)
                host.iv_len, host.icv_len, host.align, host.encap = g.iv_len, g.icv_len, g.align, g.encap
            ah = params if params.proto == IpProto.AH else ah
            if ah is not None:
                g_ah = sa_wire.ah_geometry(ah)
                host.ah_spi, host.ah_iv_len, host.ah_icv_len = g_ah.spi, g_ah.iv_len, g_ah.icv_len
        self.host.sas[handle] = host

    def delete_sa(self, handles: list[int]) -> None:
        self.command(Opcode.V2_DELETE_SA, sa_codec.v2_delete(handles))
        for h in handles:
            self.host.sas.pop(h, None)
        self.host.save()

    def list_sas(self) -> list[ndis.SaListEntry]:
        rows: list[ndis.SaListEntry] = []
        start = 0
        per_page = max(1, (self.admin_buf_size - ndis.LIST_SAS_RESPONSE.size) // ndis.SA_LIST_ENTRY.size)
        for _ in range(ndis.MAX_LIST_SAS_ENTRIES):
            head, entries = ndis.unpack_list_sas(self.command(Opcode.LIST_SAS,
                                                              ndis.ListSasRequest(start, per_page).pack()))
            rows += entries
            if head.next_index == 0xFFFF_FFFF or head.next_index == start:
                break
            start = head.next_index
        return rows

    def delete_all(self) -> int:
        handles = sorted({e.offload_handle for e in self.list_sas()})
        if handles:
            self.delete_sa(handles)
        return len(handles)

    def forget_stale(self) -> None:
        """Drop host state for handles the card no longer has (reset elsewhere, deleted by another process)."""
        live = {e.offload_handle for e in self.list_sas()}
        for h in [h for h in self.host.sas if h not in live]:
            del self.host.sas[h]
        self.host.save()

    def update_sa(self, handle: int, seq_hi: int, spi: int | None = None, proto: IpProto = IpProto.ESP) -> None:
        if spi is None:
            known = self.host.get(handle)
            if known is None:
                match = [e for e in self.list_sas() if e.offload_handle == handle]
                if not match:
                    raise CardError(f"SA handle {handle:#x} not on the card ('sa list')")
                spi, proto = match[0].spi, IpProto(match[0].proto)
            else:
                spi = known.spi
        self.command(Opcode.V2_UPDATE_SA, sa_codec.v2_update_sa(handle, spi, seq_hi, proto))
        known = self.host.get(handle)
        if known is not None:
            known.seq_hi_pushed = seq_hi
            self.host.save()

    def sa_stats(self, handle: int) -> list[ndis.SaStatsEntry]:
        return ndis.unpack_sa_stats(self.command(Opcode.GET_SA_STATS, ndis.HandleRequest(handle).pack()))[1]
