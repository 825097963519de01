"""Find the ipsec-nic card, map BAR0 and print its identity and capabilities.

    python3 -m guest_tools.probe [--json] [--vendor 0xEC5E] [--device 0x0001] [--bdf 0000:00:03.0]

Runs inside the guest as root on the guest's python3 (stdlib only). Reading is side-effect free:
only identity, capability, control/status and interrupt-mask registers are read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from device.contract import regs
from device.contract.enums import UdpEspEncapsulation
from guest_tools import pci

# Registers the probe reads: everything in the identity, capability and control blocks, plus the
# interrupt cause and mask (reading ICR does not clear it: causes are write-1-to-clear).
PROBED = tuple(
    r.name for r in regs.REGISTERS
    if r.count == 1 and r.access is not regs.Access.WO
    and (r.block in (regs.Block.IDENTITY, regs.Block.CAPABILITIES, regs.Block.CONTROL)
         or r.name in ("ICR", "IMS", "ITR"))
)


def flag_names(flags: type[regs.DocFlag], value: int) -> list[str]:
    """Names of the single-bit members set in ``value``, then any unknown bits as hex."""
    names = []
    known = 0
    for name, member in flags.__members__.items():
        bit = int(member)
        if bit & (bit - 1):
            continue  # multi-bit fields are decoded by the caller
        known |= bit
        if value & bit:
            names.append(name)
    if value & ~known:
        names.append(f"unknown:{value & ~known:#x}")
    return names


def mac_from_registers(lo: int, hi: int) -> str:
    raw = lo.to_bytes(4, "little") + (hi & 0xFFFF).to_bytes(2, "little")
    return ":".join(f"{b:02x}" for b in raw)


def _enum_name(enum_type: Callable[[int], Any], value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return f"unknown({value})"


def decode(values: Mapping[str, int]) -> dict[str, Any]:
    """Turn raw register values (by name) into a readable, JSON-able report. Pure."""
    v = values
    ctrl = v["CTRL"]
    return {
        "id": f"{v['ID']:#010x}",
        "id_ok": v["ID"] == regs.ID_MAGIC,
        "magic": v["ID"].to_bytes(4, "little").decode("latin-1"),
        "regmap_version": regs.decode_version(v["REGMAP_VERSION"]),
        "hw_version": regs.decode_version(v["HW_VERSION"]),
        "fw_version": regs.decode_version(v["FW_VERSION"]),
        "features": flag_names(regs.Features, v["FEATURES"]),
        "sa_capacity": v["SA_CAPACITY"],
        "encryption": flag_names(regs.EncAlg, v["ENC_ALGOS"]),
        "integrity": flag_names(regs.AuthAlg, v["AUTH_ALGOS"]),
        "udp_esp": flag_names(UdpEspEncapsulation, v["UDP_ESP"]),
        "max_replay_window": v["MAX_REPLAY_WINDOW"],
        "tx_queues": v["NUM_TXQ"],
        "rx_queues": v["NUM_RXQ"],
        "max_ring_size": v["MAX_RING_SIZE"],
        "msix_vectors": v["NUM_MSIX"],
        "mac": mac_from_registers(v["MAC_LO"], v["MAC_HI"]),
        "max_mtu": v["MAX_MTU"],
        "mtu": v["MTU"],
        "admin_queue_max": v["AQ_MAX_LEN"],
        "admin_buffer_max": v["AQ_MAX_BUF"],
        "ctrl": flag_names(regs.Ctrl, ctrl & ~regs.Ctrl.INT_MODE),
        "int_mode": _enum_name(regs.IntMode, (ctrl & regs.Ctrl.INT_MODE) >> regs.CTRL_INT_MODE_SHIFT),
        "status": flag_names(regs.Status, v["STATUS"]),
        "error": _enum_name(regs.ErrCode, v["ERR_CODE"]),
        "error_info": v["ERR_INFO"],
        "interrupt_causes": flag_names(regs.Cause, v["ICR"]),
        "interrupt_mask": flag_names(regs.Cause, v["IMS"]),
        "itr_us": v["ITR"],
    }


def format_report(report: Mapping[str, Any], bdf: str = "") -> str:
    """The human-readable form of :func:`decode`'s report. Pure."""

    def names(key: str) -> str:
        return ", ".join(report[key]) or "-"

    head = f"ipsec-nic at {bdf}" if bdf else "ipsec-nic"
    magic = "ok" if report["id_ok"] else "WRONG (not an ipsec-nic register map?)"
    lines = [
        head,
        f"  id               {report['id']} '{report['magic']}' {magic}",
        f"  versions         register map {report['regmap_version']}, hardware {report['hw_version']}, "
        f"firmware {report['fw_version']}",
        f"  mac              {report['mac']}   mtu {report['mtu']} (max {report['max_mtu']})",
        f"  queues           {report['tx_queues']} tx, {report['rx_queues']} rx, rings up to "
        f"{report['max_ring_size']}; admin ring up to {report['admin_queue_max']}, "
        f"buffers up to {report['admin_buffer_max']} B",
        f"  msix vectors     {report['msix_vectors']}",
        f"  features         {names('features')}",
        f"  sa capacity      {report['sa_capacity']}",
        f"  encryption       {names('encryption')}",
        f"  integrity        {names('integrity')}",
        f"  udp-esp          {names('udp_esp')}",
        f"  replay window    {report['max_replay_window'] or 'none'}",
        f"  ctrl             {names('ctrl')} (interrupts: {report['int_mode']})",
        f"  status           {names('status')}",
        f"  error            {report['error']} (info {report['error_info']:#x})",
        f"  interrupts       causes {names('interrupt_causes')}; enabled {names('interrupt_mask')}; "
        f"itr {report['itr_us']} us",
    ]
    return "\n".join(lines)


def read_registers(bar: pci.Bar) -> dict[str, int]:
    return {name: bar.read32(regs.reg(name)) for name in PROBED}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m guest_tools.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--vendor", type=lambda s: int(s, 0), default=regs.VENDOR_ID,
                        help=f"PCI vendor id (default {regs.VENDOR_ID:#06x})")
    parser.add_argument("--device", type=lambda s: int(s, 0), default=regs.DEVICE_ID,
                        help=f"PCI device id (default {regs.DEVICE_ID:#06x})")
    parser.add_argument("--bdf", help="PCI address, if several cards are present")
    args = parser.parse_args(argv)
    try:
        pci.require_root()
        dev = pci.find_device(args.vendor, args.device, args.bdf)
        pci.enable_device(dev)
        with pci.Bar(dev, 0) as bar:
            values = read_registers(bar)
    except pci.PciError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 1
    report = decode(values)
    if args.json:
        print(json.dumps({"bdf": dev.bdf, **report, "raw": {k: f"{v:#010x}" for k, v in values.items()}},
                         indent=2))
    else:
        print(format_report(report, dev.bdf))
    return 0 if report["id_ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
