"""Shared pieces of the guest-side checks: spec in, one JSON result line out, descriptor-level helpers.

Each check runs as ``python3 -m guest_tools.checks.<module> <check> <spec>`` where ``spec`` is
base64(JSON) chosen by the host test. The check prints exactly one line ``@@check-result {json}``
with what it *observed* (bytes as hex, counters, statuses); the host test decides whether that is
right. An exception becomes ``{"error": traceback}`` so the host sees why.

The helpers below go around :class:`guest_tools.driver.Card` where a check must see the card's raw
behaviour (a descriptor the driver would never write, an admin command whose completion must be
signalled by an interrupt rather than found by polling).
"""

from __future__ import annotations

import base64
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from device.contract import regs
from device.contract.enums import Direction, EncAlg, IpProto, Mode
from device.contract.regs import ADMIN_DESC, RX_DESC, TX_DESC, AdminFlags, TxWbFlags
from device.contract.sa import SaParams
from guest_tools.driver import Card

RESULT_PREFIX = "@@check-result "
Check = Callable[[dict[str, Any]], dict[str, Any]]


def encode_spec(spec: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(spec).encode()).decode("ascii")


def decode_spec(text: str) -> dict[str, Any]:
    value = json.loads(base64.b64decode(text))
    if not isinstance(value, dict):
        raise ValueError("spec must be a JSON object")
    return value


def main(checks: dict[str, Check], argv: list[str] | None = None) -> int:
    """Run the check named by argv[0] with the spec in argv[1]; print its result line."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in checks:
        print(f"usage: CHECK [SPEC_BASE64]; checks: {', '.join(sorted(checks))}", file=sys.stderr)
        return 2
    try:
        spec = decode_spec(args[1]) if len(args) > 1 else {}
        result = checks[args[0]](spec)
    except Exception:  # report, do not hide: the host prints it with the failure
        result = {"error": traceback.format_exc()}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


# --- SAs and frames ---------------------------------------------------------------------------------


def gcm_sa(spec: dict[str, Any]) -> SaParams:
    """An AES-GCM-128 ESP transport SA from {"spi", "dir", "src", "dst", "key" (hex: key || salt), ...}."""
    return SaParams(
        spi=int(spec["spi"]), proto=IpProto.ESP,
        direction=Direction.INBOUND if spec["dir"] == "in" else Direction.OUTBOUND, mode=Mode.TRANSPORT,
        src=spec["src"], dst=spec["dst"], enc_alg=EncAlg.AES_GCM_128, enc_key=bytes.fromhex(spec["key"]),
        icv_len=16, seq=int(spec.get("seq", 0)), replay_window=int(spec.get("replay_window", 64)),
        soft_packets=int(spec.get("soft_packets", 0)),
    )


def rx_record(pkt) -> dict[str, Any]:
    """Everything the RX write-back said about one frame, plus its bytes."""
    return {
        "frame": pkt.frame.hex(), "length": pkt.length, "flags": pkt.flags, "crypto_status": pkt.crypto_status,
        "handle": pkt.handle, "next_header": pkt.next_header, "pad_length": pkt.pad_length,
        "inner": pkt.inner.hex() if pkt.inner is not None else None,
    }


def recv_n(card: Card, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Up to ``count`` received frames within ``timeout`` seconds (fewer if no more arrive)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        out += [rx_record(p) for p in card.recv(timeout=left, limit=count - len(out))]
    return out


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


# --- descriptor-level access ----------------------------------------------------------------------------


def post_admin(card: Card, opcode: int, request: bytes = b"", *, interrupt: bool = True,
               req_addr: int | None = None, req_len: int | None = None, resp_addr: int | None = None,
               doorbell: bool = True) -> int:
    """Write one admin descriptor at the driver's tail (optionally with addresses of the caller's choosing)
    and ring the doorbell; returns its index. The caller collects it with :func:`admin_result`."""
    ring = card.aq
    i = ring.tail
    card.aq_req.view[:len(request)] = request
    card._cookie += 1
    ring.mem.view[ring.at(i):ring.at(i) + ADMIN_DESC.size] = ADMIN_DESC.pack(
        opcode=opcode, flags=int(AdminFlags.INTERRUPT) if interrupt else 0,
        req_len=len(request) if req_len is None else req_len,
        req_addr=(card.aq_req.iova if request else 0) if req_addr is None else req_addr,
        resp_addr=card.aq_resp.iova if resp_addr is None else resp_addr, resp_len=card.aq_resp.size,
        cookie=card._cookie)
    ring.tail = (i + 1) % ring.entries
    if doorbell:
        card.mmio.write32(regs.ADMINQ_BASE + regs.QREG_TAIL, ring.tail)
    return i


def admin_done(card: Card, index: int) -> bool:
    return bool(ADMIN_DESC.get(card.aq.mem.view, card.aq.at(index), "flags") & AdminFlags.DONE)


def admin_result(card: Card, index: int, timeout: float = 5.0) -> dict[str, Any]:
    """Poll descriptor ``index`` until DONE; its write-back fields (done=False on timeout)."""
    deadline = time.monotonic() + timeout
    while not admin_done(card, index) and time.monotonic() < deadline:
        time.sleep(0.001)
    d = ADMIN_DESC.unpack(card.aq.mem.view, card.aq.at(index))
    card.aq.clean = card.aq.tail
    return {"done": bool(d.flags & AdminFlags.DONE), "flags": d.flags, "status": d.status,
            "fw_status": d.fw_status, "resp_len": d.resp_len,
            "response": bytes(card.aq_resp.view[:min(d.resp_len, card.aq_resp.size)]).hex()}


def post_tx(card: Card, *, addr: int, length: int, flags: int, handle: int = 0) -> int:
    """One raw TX descriptor (addresses and lengths as given, however wrong) + doorbell; its index."""
    r = card.txr
    i = r.tail
    r.mem.view[r.at(i):r.at(i) + TX_DESC.size] = TX_DESC.pack(addr=addr, length=length, flags=flags,
                                                                offload_handle=handle)
    r.tail = (i + 1) % r.entries
    card.mmio.write32(regs.txq_reg(card.queue, regs.QREG_TAIL), r.tail)
    return i


def tx_writeback(card: Card, index: int, timeout: float = 5.0) -> dict[str, Any]:
    """Wait for TX descriptor ``index`` to be written back; reclaims it in the driver's books."""
    view, at = card.txr.mem.view, card.txr.at(index)
    deadline = time.monotonic() + timeout
    while not TX_DESC.get(view, at, "wb_flags") & TxWbFlags.DONE and time.monotonic() < deadline:
        time.sleep(0.001)
    d = TX_DESC.unpack(view, at)
    card.poll_tx()  # the driver's clean index moves past it
    return {"done": bool(d.wb_flags & TxWbFlags.DONE), "status": d.wb_status}


def set_rx_descriptor(card: Card, index: int, addr: int, buf_len: int) -> None:
    """Overwrite an armed RX descriptor (the card reads it when the next frame arrives)."""
    at = card.rxr.at(index)
    card.rxr.mem.view[at:at + RX_DESC.size] = RX_DESC.pack(addr=addr, buf_len=buf_len)


def registers(card: Card, *names: str) -> dict[str, int]:
    return {n.lower(): card.mmio.read32(regs.reg(n)) for n in names}


# --- host side ---------------------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    """The guest check did not produce a result (crash, timeout); the message has its output."""


def parse_result(output: str) -> dict[str, Any]:
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            value = json.loads(line[len(RESULT_PREFIX):])
            if "error" in value:
                raise CheckFailed(f"guest check raised:\n{value['error']}")
            return value
    raise CheckFailed("no check result in the guest output:\n" + output[-3000:])


def run_check(vm, module: str, check: str, spec: dict[str, Any] | None = None, timeout: float = 90.0
              ) -> dict[str, Any]:
    """Run ``guest_tools.checks.<module> <check>`` in a booted VM (qemu.launch.Vm); its result dict."""
    result = vm.run(f"python3 -m guest_tools.checks.{module} {check} {encode_spec(spec or {})}", timeout=timeout)
    if result.timed_out:
        raise CheckFailed(f"{module} {check} timed out after {timeout:g} s:\n{result.output[-3000:]}")
    value = parse_result(result.output)
    value["_seconds"] = result.seconds
    return value
