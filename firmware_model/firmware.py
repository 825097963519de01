"""The card firmware facade the NIC model calls: admin commands, transmit, receive, reset, stats.

Its parts: firmware_model/commands.py (one handler per admin command), firmware_model/traffic.py
(transmit / receive), firmware_model/sadb.py (the SA table), firmware_model/frames.py (L2/L3 helpers);
the command formats and the SA decoders are the card's interface (device/contract/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from device.contract import ndis
from device.contract.ndis import NdisStatus, Opcode, ParseError, RejectReason
from firmware_model import framepath
from firmware_model.capabilities import Capabilities
from firmware_model.commands import AdminCommands
from firmware_model.sadb import Sadb, SaRejected
from firmware_model.traffic import RxResult, TrafficPath, TxOutcome, TxResult

GlobalStats = ndis.GlobalStats


class PlanSadb(Sadb):
    """The SA table, emptying the frame fast paths' per-SA plan caches (firmware_model/framepath.py) on
    every change to its contents, so a cached plan never names a deleted or replaced SA."""

    def __init__(self, caps: Capabilities, caches: tuple[dict, ...]) -> None:
        self._plan_caches = caches  # before Sadb.__init__, which resets the table
        super().__init__(caps)

    def _forget_plans(self) -> None:
        for cache in self._plan_caches:
            cache.clear()

    def reset(self) -> None:
        self._forget_plans()
        super().reset()

    def add(self, *args, **kwargs):
        self._forget_plans()
        return super().add(*args, **kwargs)

    def remove(self, handle: int):
        self._forget_plans()
        return super().remove(handle)


class Firmware(AdminCommands, TrafficPath):
    # Per-frame entry points: the whole-frame fast paths, which hand anything else to TrafficPath's
    transmit = framepath.transmit
    receive = framepath.receive

    def __init__(self, caps: Capabilities) -> None:
        self.caps = caps
        self._tx_plans: dict = {}  # handle -> framepath plan (or False: not of the fast shape)
        self._rx_plans: dict = {}  # SPI -> (destination, plan or None)
        self.sadb = PlanSadb(caps, (self._tx_plans, self._rx_plans))
        self._stats = GlobalStats()  # the general code's counters; the fast paths' own: framepath.fold_counts
        framepath.clear_counts(self)
        self.last_error = ""
        self._handlers: dict[int, Callable[[bytes], tuple[int, bytes]]] = {
            Opcode.GET_CAPS: self._cmd_get_caps,
            Opcode.V1_ADD_SA: self._cmd_v1_add_sa,
            Opcode.V1_DELETE_SA: self._cmd_v1_delete_sa,
            Opcode.V1_ADD_UDPESP_SA: self._cmd_v1_add_udpesp_sa,
            Opcode.V1_DELETE_UDPESP_SA: self._cmd_v1_delete_udpesp_sa,
            Opcode.V2_ADD_SA: self._cmd_v2_add_sa,
            Opcode.V2_ADD_SA_EX: self._cmd_v2_add_sa_ex,
            Opcode.V2_DELETE_SA: self._cmd_v2_delete_sa,
            Opcode.V2_UPDATE_SA: self._cmd_v2_update_sa,
            Opcode.ADD_SA_PACKET: self._cmd_add_sa_packet,
            Opcode.GET_STATS: self._cmd_get_stats,
            Opcode.GET_SA_STATS: self._cmd_get_sa_stats,
            Opcode.LIST_SAS: self._cmd_list_sas,
        }

    # ---------------------------------------------------------------------------------------------
    # facade
    def reset(self) -> None:
        """Function reset: every SA and parser entry goes (NDIS: the miniport deletes SAs itself before
        the NIC is removed); counters restart."""
        self.sadb.reset()
        self.sadb.rejects = [0] * len(RejectReason)
        self._stats = GlobalStats()
        framepath.clear_counts(self)
        self.last_error = ""

    def stats(self) -> GlobalStats:
        st = replace(self._stats)
        framepath.fold_counts(self, st)
        st.sa_bundles = len(self.sadb)
        st.sa_capacity = self.sadb.capacity
        st.parser_entries = self.sadb.parser_count
        for reason in RejectReason:
            setattr(st, f"reject_{reason.name.lower()}", self.sadb.rejects[reason])
        return st

    def execute(self, opcode: int, request: bytes) -> tuple[int, bytes]:
        """Run one admin command; never raises. Returns (NdisStatus value, response payload)."""
        handler = self._handlers.get(opcode)
        if handler is None:
            status, response = NdisStatus.INVALID_OID, b""
            self.last_error = f"unknown opcode {opcode:#06x}"
        else:
            try:
                status, response = handler(bytes(request))
                if status == NdisStatus.SUCCESS:
                    self.last_error = ""
            except ParseError as exc:
                status, response = exc.status, b""
                self.last_error = str(exc)
            except SaRejected as exc:
                status, response = exc.status, b""
                self.last_error = str(exc)
            except Exception as exc:  # a firmware bug must not take the device down
                status, response = NdisStatus.FAILURE, b""
                self.last_error = f"internal error: {type(exc).__name__}: {exc}"
        if status == NdisStatus.SUCCESS:
            self._stats.cmd_ok += 1
        else:
            self._stats.cmd_failed += 1
        return int(status), response


__all__ = ["Firmware", "GlobalStats", "RxResult", "TxResult", "TxOutcome"]
