"""Guest checks of the card under bad input and bad timing (run by tests/vm/test_card_robustness.py).

    python3 -m guest_tools.checks.robustness CHECK SPEC

Every check opens the card with the polling driver (sysfs BAR0, pagemap DMA), resets it, and uses its
loopback wire: a frame the guest sends comes back as a received frame, so ESP frames the *host* built
(with scapy, from keys in SPEC) reach the card's receive path unchanged. Checks report observations
only; the host asserts.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from device.contract import ndis, regs
from device.contract import sa as sa_codec
from device.contract.enums import AuthAlg, Direction, EncAlg, IpProto, Mode
from device.contract.ndis import Opcode
from device.contract.regs import TX_DESC, Ctrl, Status, TxFlags, TxWbFlags
from device.contract.sa import SaParams, UdpEncap
from guest_tools import packets
from guest_tools.checks.common import (
    admin_result,
    gcm_sa,
    main,
    post_admin,
    post_tx,
    recv_n,
    registers,
    set_rx_descriptor,
    stats_delta,
    tx_writeback,
)
from guest_tools.driver import Card, open_card

STATE = "/tmp/ipsec-nic-checks-robustness.json"
OUTSIDE_RAM = 0xDEAD_0000_0000  # far above the guest's 1 GiB of RAM: no DMA mapping covers it


def _open() -> Card:
    return open_card(irq="poll", reset=True, state_path=STATE)


def _frames(spec: dict[str, Any], key: str) -> list[bytes]:
    return [bytes.fromhex(f) for f in spec[key]]


def _inject(card: Card, frames: list[bytes]) -> list[dict[str, Any]]:
    """Send frames unchanged (no offload) and collect what the card's receive path made of them."""
    for f in frames:
        card.send_raw(f)
    tx = [c.status for c in card.flush_tx()]
    if any(tx):
        raise RuntimeError(f"plain TX failed: {tx}")
    return recv_n(card, len(frames), timeout=3.0)


def _sa_list(card: Card) -> list[dict[str, int]]:
    return [{"handle": e.offload_handle, "spi": e.spi, "flags": e.flags, "paired": e.paired_handle}
            for e in card.list_sas()]


def _alive(card: Card, probe: bytes) -> dict[str, Any]:
    """Does the card still serve: an admin command, and a frame out and back."""
    fw_status, _ = card.admin(Opcode.GET_CAPS)
    back = _inject(card, [probe])
    status = card.mmio.read32(regs.STATUS)
    return {"caps_fw_status": fw_status, "echo_ok": [bytes.fromhex(r["frame"]) for r in back] == [probe],
            "status": status, "fatal": bool(status & Status.FATAL)}


# --- crypto-offload receive of tampered ESP ---------------------------------------------------------------


def check_tamper(spec: dict[str, Any]) -> dict[str, Any]:
    with _open() as card:
        handle = card.add_sa(gcm_sa(spec["sa"]))
        before = card.stats()
        rx = _inject(card, _frames(spec, "frames"))
        return {"handle": handle, "rx": rx, "stats": stats_delta(before, card.stats()),
                "sa_stats": [vars(e) for e in card.sa_stats(handle)]}


# --- packet-offload anti-replay -------------------------------------------------------------------------------


def check_replay(spec: dict[str, Any]) -> dict[str, Any]:
    with _open() as card:
        handle = card.add_sa(gcm_sa(spec["sa"]), offload="packet")
        before = card.stats()
        rx = _inject(card, _frames(spec, "frames"))
        return {"handle": handle, "rx": rx, "stats": stats_delta(before, card.stats()),
                "sa_stats": [vars(e) for e in card.sa_stats(handle)]}


# --- SA delete -----------------------------------------------------------------------------------------------


def check_sa_delete(spec: dict[str, Any]) -> dict[str, Any]:
    plain = bytes.fromhex(spec["plain"])
    inbound = _frames(spec, "inbound")
    with _open() as card:
        out_h = card.add_sa(gcm_sa(spec["out"]))
        in_h = card.add_sa(gcm_sa(spec["in"]))
        # The ESP frame the host stack would hand the card for the outbound SA (kept for after the delete).
        host = card.host.get(out_h)
        esp = packets.build_esp(host.geometry(), plain[14:], host.next_seq)
        esp_frame = plain[:14] + esp.packet
        result: dict[str, Any] = {"handles": [out_h, in_h]}
        card.send(plain, out_h, "crypto")
        result["tx_before"] = [c.status for c in card.flush_tx()]
        recv_n(card, 1, timeout=3.0)  # the encrypted frame back from the loopback (no SA of its own)
        result["rx_before"] = _inject(card, inbound[:1])
        card.delete_sa([out_h, in_h])
        result["sas_after_delete"] = _sa_list(card)
        before = card.stats()
        i = card.send_raw(esp_frame, TxFlags.IPSEC_CRYPTO, out_h, 14 + esp.esp_offset, esp.pad_length,
                          esp.next_header)
        result["tx_after"] = tx_writeback(card, i)
        result["rx_after"] = _inject(card, inbound[1:])
        result["stats"] = stats_delta(before, card.stats())
        result["alive"] = _alive(card, plain)
        return result


# --- SA table capacity ------------------------------------------------------------------------------------------


def _v2_list_entry(p: SaParams) -> ndis.V2AddSa:
    fields = sa_codec._v2_common(p, allow_any_port=False)
    fields.pop("key_offset")
    return ndis.V2AddSa(next_offset=0, **fields)


def _v2_add_list(card: Card, params: list[SaParams]) -> dict[str, Any]:
    fw_status, response = card.admin(Opcode.V2_ADD_SA, ndis.pack_v2_add_sa_list([_v2_list_entry(p)
                                                                                  for p in params]))
    results = ndis.unpack_counted(response, ndis.V2_ADD_SA_RESULT) if response else []
    return {"fw_status": fw_status, "results": [[r.offload_handle, r.status] for r in results]}


def _udpesp_sa(spi: int) -> SaParams:
    return SaParams(spi=spi, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT,
                    src="192.0.2.2", dst="192.0.2.1", enc_alg=EncAlg.NONE, auth_alg=AuthAlg.SHA1,
                    auth_key=bytes(range(20)), icv_len=12, replay_window=0, encap=UdpEncap(4500, 4500))


def check_capacity(spec: dict[str, Any]) -> dict[str, Any]:
    key = spec["key"]

    def sa(spi: int) -> SaParams:
        return gcm_sa({"spi": spi, "dir": "in", "src": "192.0.2.2", "dst": "192.0.2.1", "key": key})

    with _open() as card:
        capacity = card.mmio.read32(regs.reg("SA_CAPACITY"))
        first = [card.add_sa(sa(0x5001 + i)) for i in range(capacity - 2)]
        out: dict[str, Any] = {"capacity": capacity, "first": first}
        out["list_partial"] = _v2_add_list(card, [sa(0x5101 + i) for i in range(4)])
        fw_status, response = card.admin(Opcode.V2_ADD_SA_EX, sa_codec.v2_add_sa_ex(sa(0x5201)))
        out["single_full"] = {"fw_status": fw_status, "response": response.hex()}
        parsers_before = card.firmware_stats().parser_entries
        udp_request = sa_codec.v1_add_udpesp_sa(_udpesp_sa(0x5301))
        fw_status, response = card.admin(Opcode.V1_ADD_UDPESP_SA, udp_request)
        out["v1_udpesp_full"] = {"fw_status": fw_status, "response": response.hex(),
                                 "parsers_before": parsers_before,
                                 "parsers_after": card.firmware_stats().parser_entries}
        out["list_all_fail"] = _v2_add_list(card, [sa(0x5401), sa(0x5402)])
        out["sas_full"] = _sa_list(card)
        out["fw_stats_full"] = vars(card.firmware_stats())
        out["deleted"] = card.delete_all()
        # The refused v1 UDP-ESP request was a good one: with room it is taken (with its parser entry).
        fw_status, response = card.admin(Opcode.V1_ADD_UDPESP_SA, udp_request)
        out["v1_udpesp_room"] = {"fw_status": fw_status, "response": response.hex(),
                                 "parsers": card.firmware_stats().parser_entries}
        return out


# --- SaDeleteReq ----------------------------------------------------------------------------------------------


def check_sa_delete_req(spec: dict[str, Any]) -> dict[str, Any]:
    with _open() as card:
        out_h = card.add_sa(gcm_sa(spec["out"]), offload="packet")
        in_h = card.add_sa(gcm_sa(spec["in"]), offload="packet")
        result: dict[str, Any] = {"handles": [out_h, in_h], "sas_before": _sa_list(card)}
        inbound = _frames(spec, "inbound")
        result["rx"] = _inject(card, inbound[:-1])
        sends = []
        for f in _frames(spec, "outbound"):
            card.send(f, out_h, "packet")
            sends += [c.status for c in card.flush_tx()]
        recv_n(card, len(sends), timeout=3.0)  # the encapsulated frames back (no SA matches them)
        result["tx"] = sends
        card.service()
        result["icr_sa_delete_req_seen"] = card.sa_delete_requests
        result["sas_flagged"] = _sa_list(card)
        # Honour the request: delete the pair; the SPI is then no longer processed.
        card.delete_sa([out_h, in_h])
        result["sas_after"] = _sa_list(card)
        result["rx_after"] = _inject(card, inbound[-1:])
        return result


# --- reset while the rings are busy -----------------------------------------------------------------------------


def _tx_done_count(card: Card) -> int:
    view = card.txr.mem.view
    return sum(1 for i in range(card.txr.entries)
               if TX_DESC.get(view, card.txr.at(i), "wb_flags") & TxWbFlags.DONE)


def check_reset(spec: dict[str, Any]) -> dict[str, Any]:
    """Fill the RX ring and the card's RX backlog (nobody receives), leave TX work queued, then CTRL.RESET."""
    frames = [bytes.fromhex(spec["frame"])] * int(spec["count"])  # one frame, many times: a short spec
    echo = _frames(spec, "echo")
    card = _open()
    try:
        card.add_sa(gcm_sa(spec["sa"]))
        card.mmio.write32(regs.reg("SCRATCH"), 0x5CA7C4)
        out: dict[str, Any] = {"sas_before": len(card.list_sas())}
        for f in frames:
            card.send_raw(f)  # one doorbell per frame, no waiting (reclaims only when the TX ring is full)
        out["stats_before_reset"] = card.stats()
        out["tx_outstanding_at_reset"] = (card.txr.tail - card.mmio.read32(regs.txq_reg(0, regs.QREG_HEAD))) \
            % card.txr.entries
        card.mmio.write32(regs.CTRL, Ctrl.RESET)
        out["regs_after_reset"] = registers(card, "CTRL", "STATUS", "ICR", "IMS", "SCRATCH", "ERR_CODE")
        out["rings_after_reset"] = {
            "aq_ctrl": card.mmio.read32(regs.ADMINQ_BASE + regs.QREG_CTRL),
            "txq_ctrl": card.mmio.read32(regs.txq_reg(0, regs.QREG_CTRL)),
            "rxq_ctrl": card.mmio.read32(regs.rxq_reg(0, regs.QREG_CTRL)),
            "txq_head": card.mmio.read32(regs.txq_reg(0, regs.QREG_HEAD)),
            "rxq_head": card.mmio.read32(regs.rxq_reg(0, regs.QREG_HEAD)),
        }
        out["stats_after_reset"] = card.stats()
        out["tx_done_at_reset"] = _tx_done_count(card)
        time.sleep(1.0)
        out["tx_done_1s_later"] = _tx_done_count(card)
        out["stats_1s_later"] = card.stats()
        # Re-initialise (no second reset): the card must be fully usable again, without the old SAs and
        # without the frames it held when the reset came.
        card.init(reset=False)
        out["sas_after_reinit"] = len(card.list_sas())
        before = card.stats()
        back = _inject(card, echo)
        out["received_after_reinit"] = [r["frame"] for r in back]
        out["stats_after_reinit"] = stats_delta(before, card.stats())
        return out
    finally:
        card.close()


# --- malicious descriptors ---------------------------------------------------------------------------------------


def check_malicious(spec: dict[str, Any]) -> dict[str, Any]:
    probe = bytes.fromhex(spec["plain"])
    ram_end = int(spec["ram_end"])
    eop_rs = int(TxFlags.EOP | TxFlags.REPORT_STATUS)
    with _open() as card:
        before = card.stats()
        out: dict[str, Any] = {}

        def error_regs() -> dict[str, int]:
            return {"err_code": card.mmio.read32(regs.reg("ERR_CODE")),
                    "err_info": card.mmio.read32(regs.reg("ERR_INFO")), "card_status": card.mmio.read32(regs.STATUS)}

        i = post_tx(card, addr=OUTSIDE_RAM, length=100, flags=eop_rs)
        out["tx_outside_ram"] = {**tx_writeback(card, i), **error_regs()}
        buf = card.tx_bufs[card.txr.tail]
        buf.view[:len(probe)] = probe
        i = post_tx(card, addr=buf.iova, length=0xFFFF, flags=eop_rs)
        out["tx_huge_length"] = tx_writeback(card, i)
        i = post_tx(card, addr=ram_end - 64, length=200, flags=eop_rs)
        out["tx_across_ram_end"] = {**tx_writeback(card, i), **error_regs()}

        set_rx_descriptor(card, card.rxr.clean, OUTSIDE_RAM, card.buf_size)
        card.send_raw(probe)
        card.flush_tx()
        out["rx_outside_ram"] = {"rx": recv_n(card, 1, timeout=3.0), **error_regs()}

        i = post_admin(card, Opcode.V2_DELETE_SA, req_addr=OUTSIDE_RAM, req_len=8, interrupt=False)
        out["admin_request_outside_ram"] = admin_result(card, i)
        i = post_admin(card, Opcode.V2_DELETE_SA, req_len=0xFFFF_FFFF, req_addr=card.aq_req.iova, interrupt=False)
        out["admin_request_too_long"] = admin_result(card, i)
        i = post_admin(card, Opcode.GET_CAPS, resp_addr=OUTSIDE_RAM, interrupt=False)
        out["admin_response_outside_ram"] = {**admin_result(card, i), **error_regs()}
        out["stats"] = stats_delta(before, card.stats())
        out["alive"] = _alive(card, probe)
        return out


# --- traffic until the VM dies (QEMU killed by the host) ----------------------------------------------------


def check_flood(spec: dict[str, Any]) -> dict[str, Any]:
    """Add an SA, mark SCRATCH, then loop traffic for spec["seconds"], printing progress lines."""
    frame = bytes.fromhex(spec["plain"])
    card = _open()
    card.add_sa(gcm_sa(spec["sa"]))
    card.mmio.write32(regs.reg("SCRATCH"), int(spec["scratch"]))
    sent = received = 0
    end = time.monotonic() + float(spec["seconds"])
    last = 0.0
    while time.monotonic() < end:
        for _ in range(16):
            card.send_raw(frame)
            sent += 1
        card.poll_tx()
        received += len(card.recv(timeout=0.05, limit=64))
        if time.monotonic() - last > 0.5:
            last = time.monotonic()
            print(f"flood sent={sent} received={received}", flush=True)
            sys.stdout.flush()
    card.close()
    return {"sent": sent, "received": received}


def check_state(spec: dict[str, Any]) -> dict[str, Any]:
    """What a fresh VM finds on the card (no reset by this process)."""
    card = open_card(irq="poll", reset=False, state_path=STATE)
    with card:
        out = {"regs": registers(card, "SCRATCH", "STATUS", "ERR_CODE"), "sas": _sa_list(card),
               "stats": card.stats()}
        frame = bytes.fromhex(spec["plain"])
        back = _inject(card, [frame, frame])
        out["echo_ok"] = [bytes.fromhex(r["frame"]) for r in back] == [frame, frame]
        return out


CHECKS = {
    "tamper": check_tamper, "replay": check_replay, "sa_delete": check_sa_delete, "capacity": check_capacity,
    "sa_delete_req": check_sa_delete_req, "reset": check_reset, "malicious": check_malicious,
    "flood": check_flood, "state": check_state,
}

if __name__ == "__main__":
    raise SystemExit(main(CHECKS))
