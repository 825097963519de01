"""Guest check with two ipsec-nic cards cabled back to back (run by tests/vm/test_two_cards.py).

    python3 -m guest_tools.checks.two_cards flows SPEC

SPEC: {"macs": {"<mac>": "a", "<mac>": "b"}, "flows": [{"from": "a", "to": "b", "mode": "crypto"|"packet",
"out": SA, "in": SA, "frames": [hex, ...]}, ...]} with SA as in common.gcm_sa. For each flow the outbound
SA goes on the sending card and the inbound SA on the receiving card; the frames (plain IP in Ethernet)
are sent through the sender's offload and read back from the receiver. Both cards are driven from this
one process with the polling driver.
"""

from __future__ import annotations

from typing import Any

from device.contract import regs
from guest_tools import pci
from guest_tools.checks.common import gcm_sa, main, recv_n, stats_delta
from guest_tools.driver import Card, open_card


def _open_all(macs: dict[str, str]) -> dict[str, Card]:
    cards: dict[str, Card] = {}
    try:
        for dev in pci.list_devices():
            if (dev.vendor_id, dev.device_id) != (regs.VENDOR_ID, regs.DEVICE_ID):
                continue
            card = open_card(dev.bdf, irq="poll", reset=True, state_path=f"/tmp/ipsec-nic-2cards-{dev.bdf}.json")
            name = macs.get(card.ident.mac_text)
            if name is None or name in cards:
                card.close()
                raise RuntimeError(f"card {dev.bdf} has MAC {card.ident.mac_text}, not one of {sorted(macs)}")
            cards[name] = card
    except BaseException:
        for card in cards.values():
            card.close()
        raise
    return cards


def _flow(cards: dict[str, Card], flow: dict[str, Any]) -> dict[str, Any]:
    tx, rx = cards[flow["from"]], cards[flow["to"]]
    mode = flow["mode"]
    out_h = tx.add_sa(gcm_sa(flow["out"]), offload=mode)
    in_h = rx.add_sa(gcm_sa(flow["in"]), offload=mode)
    tx_before, rx_before = tx.stats(), rx.stats()
    frames = [bytes.fromhex(f) for f in flow["frames"]]
    for f in frames:
        tx.send(f, out_h, mode)
    statuses = [c.status for c in tx.flush_tx()]
    got = recv_n(rx, len(frames), timeout=5.0)
    result = {"handles": [out_h, in_h], "tx_status": statuses, "rx": got,
              "tx_stats": stats_delta(tx_before, tx.stats()), "rx_stats": stats_delta(rx_before, rx.stats())}
    tx.delete_sa([out_h])
    rx.delete_sa([in_h])
    return result


def check_flows(spec: dict[str, Any]) -> dict[str, Any]:
    cards = _open_all(spec["macs"])
    try:
        out: dict[str, Any] = {"cards": {n: c.bdf for n, c in cards.items()},  # type: ignore[attr-defined]
                               "link_up": {n: bool(c.mmio.read32(regs.STATUS) & regs.Status.LINK_UP)
                                           for n, c in cards.items()}}
        out["flows"] = [_flow(cards, flow) for flow in spec["flows"]]
        return out
    finally:
        for card in cards.values():
            card.close()


CHECKS = {"flows": check_flows}

if __name__ == "__main__":
    raise SystemExit(main(CHECKS))
