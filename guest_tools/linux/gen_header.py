"""Generate ipsec_nic_hw.h, the C view of the card's contract, for the Linux kernel driver.

    python -m guest_tools.linux.gen_header            # rewrite guest_tools/linux/ipsec_nic_hw.h
    python -m guest_tools.linux.gen_header --check    # exit 1 if the committed header is stale

Every register offset, bit, enum value and descriptor/admin structure the driver uses comes from the
Python definitions the device model, the guest tools and docs/datasheet.md use too, so the C code holds
no hand-copied offsets. The import surface is the four names below: repoint them when the contract moves.
tests/unit/test_c_header.py fails when the committed header differs from what this prints.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path

from device.contract import enums as _enums
from device.contract import ndis as _ndis
from device.contract import regs as _regs
from device.contract import status as _status

# --- the import surface (the contract's modules) ------------------------------------------------------
REGS = _regs
NDIS = _ndis
ENUMS = _enums
NDIS_STATUS = _status.NdisStatus
SOURCES = ("device/contract/regs.py", "device/contract/enums.py", "device/contract/ndis.py",
           "device/contract/status.py")

HEADER = Path(__file__).resolve().parent / "ipsec_nic_hw.h"
PREFIX = "IPNC"

_C_TYPES = {"B": "u8", "H": "__le16", "I": "__le32", "Q": "__le64"}

# Admin structures the driver sends or parses (ndis Layout names).
NDIS_LAYOUTS = (
    "ALGO_INFO_V2",
    "SA_V2",
    "V2_ADD_SA_EX",
    "ADD_SA_PACKET",
    "HANDLE_RESPONSE",
    "LIST_HEADER",
    "V2_DELETE_SA",
    "STATUS_ENTRY",
    "V2_UPDATE_SA",
    "HANDLE_REQUEST",
    "SA_STATS_ENTRY",
    "LIST_SAS_REQUEST",
    "LIST_SAS_RESPONSE",
    "SA_LIST_ENTRY",
    "GLOBAL_STATS",
)

NDIS_ENUMS = ("Opcode", "V2AddFlags", "V2SaFlags", "V2Operation", "SaListFlags")
# Shared between registers and admin commands (the NDIS identifiers are also the capability bits).
SHARED_ENUMS = ("EncAlg", "AuthAlg", "Mode", "UdpEspEncapsulation")

REG_FLAGS = ("Features", "Ctrl", "Status", "Cause", "QueueCtrl", "AdminFlags", "TxFlags",
             "TxWbFlags", "RxWbFlags")
REG_ENUMS = ("IntMode", "ErrCode", "QueueId", "AdminStatus", "TxStatus", "CryptoStatus")


def _snake_upper(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and (not name[i - 1].isupper() or (i + 1 < len(name) and name[i + 1].islower())):
            out.append("_")
        out.append(ch.upper())
    return "".join(out)


def _define(name: str, value: int | str, width: int = 48) -> str:
    text = value if isinstance(value, str) else (f"0x{value:X}" if value > 9 else str(value))
    if isinstance(value, int) and value > 0x7FFFFFFF:
        text += "U"
    line = f"#define {name:<{width}} {text}"
    # Kernel coding style caps lines at 100 columns (scripts/checkpatch.pl): a long value is not aligned.
    return line if len(line) <= 100 else f"#define {name} {text}"


def _members(e: type[enum.Enum]) -> list[tuple[str, int]]:
    return [(name, int(member.value)) for name, member in e.__members__.items()]


def _enum_block(group: str, e: type[enum.Enum]) -> list[str]:
    tag = f"{PREFIX}_{_snake_upper(group)}"
    lines = [f"/* {e.__name__} */"]
    lines += [_define(f"{tag}_{name}", value) for name, value in _members(e)]
    return lines


def _registers() -> list[str]:
    r = REGS
    lines = ["/* BAR0 registers (device/contract/regs.py REGISTERS) */"]
    for reg in r.REGISTERS:
        if reg.name.startswith(("TXQ_", "RXQ_")):
            continue  # ring registers: IPNC_TXQ(q, rel) / IPNC_RXQ(q, rel) below
        if reg.count == 1:
            lines.append(_define(f"{PREFIX}_REG_{reg.name}", reg.offset))
        else:
            lines.append(_define(f"{PREFIX}_REG_{reg.name}(n)", f"(0x{reg.offset:X} + (n) * 0x{reg.stride:X})"))
    lines.append("")
    lines.append("/* Ring register blocks: admin queue, TX queue q, RX queue q; rel = IPNC_QREG_* */")
    for name in ("BASE_LO", "BASE_HI", "LEN", "HEAD", "TAIL", "CTRL"):
        lines.append(_define(f"{PREFIX}_QREG_{name}", getattr(r, f"QREG_{name}")))
    lines.append(_define(f"{PREFIX}_ADMINQ_BASE", r.ADMINQ_BASE))
    lines.append(_define(f"{PREFIX}_TXQ(q, rel)", f"(0x{r.TXQ_BASE:X} + (q) * 0x{r.QUEUE_STRIDE:X} + (rel))"))
    lines.append(_define(f"{PREFIX}_RXQ(q, rel)", f"(0x{r.RXQ_BASE:X} + (q) * 0x{r.QUEUE_STRIDE:X} + (rel))"))
    lines.append("")
    lines.append("/* 64-bit statistics: LO at the offset, HI 4 bytes above; reading LO latches HI */")
    for name, _ in r.STATISTICS:
        lines.append(_define(f"{PREFIX}_STAT_{name}", r.stat_offset(name)))
    lines.append(_define(f"{PREFIX}_NUM_STATS", len(r.STATISTICS)))
    lines.append(f"#define {PREFIX}_STAT_NAMES {{ \\")
    for name, _ in r.STATISTICS:
        lines.append(f'\t"{name.lower()}", \\')
    lines.append("}")
    return lines


def _geometry() -> list[str]:
    r = REGS
    return [
        "/* Identity and geometry */",
        _define(f"{PREFIX}_VENDOR_ID", r.VENDOR_ID),
        _define(f"{PREFIX}_DEVICE_ID", r.DEVICE_ID),
        _define(f"{PREFIX}_ID_MAGIC", r.ID_MAGIC),
        _define(f"{PREFIX}_REGMAP_VERSION", r.REGMAP_VERSION_VALUE),
        _define(f"{PREFIX}_BAR0_SIZE", r.BAR0_SIZE),
        _define(f"{PREFIX}_MAX_QUEUES", r.MAX_QUEUES),
        _define(f"{PREFIX}_RING_ALIGN", r.RING_ALIGN),
        _define(f"{PREFIX}_MIN_RING_SIZE", r.MIN_RING_SIZE),
        _define(f"{PREFIX}_MIN_MTU", r.MIN_MTU),
        _define(f"{PREFIX}_CTRL_INT_MODE_SHIFT", r.CTRL_INT_MODE_SHIFT),
        _define(f"{PREFIX}_CAUSE_TX_SHIFT", r.CAUSE_TX_SHIFT),
        _define(f"{PREFIX}_CAUSE_RX_SHIFT", r.CAUSE_RX_SHIFT),
        _define(f"{PREFIX}_IVAR_VALID", r.IVAR_VALID),
        _define(f"{PREFIX}_IVAR_VECTOR_MASK", r.IVAR_VECTOR_MASK),
    ]


def _regs_struct(layout) -> list[str]:
    name = f"ipnc_{_snake_upper(layout.name).lower()}"
    lines = [f"/* {layout.name}, {layout.size} bytes */", f"struct {name} {{"]
    for f in layout.fields:
        lines.append(f"\t{_C_TYPES[f.fmt]} {f.name};")
    lines += ["} __packed;", f"static_assert(sizeof(struct {name}) == {layout.size});"]
    return lines


def _ndis_struct(layout) -> list[str]:
    name = f"ipnc_{layout.name.lower()}"
    lines = [f"/* {layout.name}{' (mirrors ' + layout.ndis + ')' if layout.ndis else ''}, {layout.size} bytes */",
             f"struct {name} {{"]
    for f in layout.fields:
        if isinstance(f.fmt, NDIS.Layout):
            suffix = f"[{f.count}]" if f.count > 1 else ""
            lines.append(f"\tstruct ipnc_{f.fmt.name.lower()} {f.name}{suffix};")
        elif f.fmt.endswith("s"):
            lines.append(f"\tu8 {f.name}[{int(f.fmt[:-1])}];")
        else:
            lines.append(f"\t{_C_TYPES[f.fmt]} {f.name};")
    lines += ["} __packed;", f"static_assert(sizeof(struct {name}) == {layout.size});"]
    return lines


def render() -> str:
    out = [
        "/* SPDX-License-Identifier: GPL-2.0 */",
        "/*",
        " * ipsec-nic hardware interface: registers, descriptors and admin commands.",
        " *",
        " * GENERATED by guest_tools/linux/gen_header.py from",
        *(f" *   {source}" for source in SOURCES),
        " * Do not edit: change the Python definitions and run `python -m guest_tools.linux.gen_header`.",
        " * Everything the card exposes is little-endian.",
        " */",
        "#ifndef IPSEC_NIC_HW_H",
        "#define IPSEC_NIC_HW_H",
        "",
        "#include <linux/build_bug.h>",
        "#include <linux/types.h>",
        "",
    ]
    out += _geometry() + [""]
    out += _registers() + [""]
    for group in SHARED_ENUMS:
        out += _enum_block(group, getattr(ENUMS, group)) + [""]
    for group in REG_FLAGS:
        out += _enum_block(group, getattr(REGS, group)) + [""]
    for group in REG_ENUMS:
        out += _enum_block(group, getattr(REGS, group)) + [""]
    for layout in REGS.LAYOUTS:
        out += _regs_struct(layout) + [""]
    out += ["/* Admin commands (device/contract/ndis.py) */",
            _define(f"{PREFIX}_NDIS_OBJECT_TYPE_DEFAULT", NDIS.NDIS_OBJECT_TYPE_DEFAULT),
            _define(f"{PREFIX}_NDIS_REVISION_1", NDIS.REVISION_1),
            _define(f"{PREFIX}_SEL_IPV6", NDIS.SEL_IPV6),
            _define(f"{PREFIX}_SEL_PRESENT", NDIS.SEL_PRESENT),
            _define(f"{PREFIX}_MIN_LIST_SAS_ENTRIES", NDIS.MIN_LIST_SAS_ENTRIES),
            _define(f"{PREFIX}_MAX_LIST_SAS_ENTRIES", NDIS.MAX_LIST_SAS_ENTRIES),
            ""]
    for group in NDIS_ENUMS:
        out += _enum_block(group, getattr(NDIS, group)) + [""]
    out += _enum_block("NdisStatus", NDIS_STATUS) + [""]
    for name in NDIS_LAYOUTS:
        out += _ndis_struct(NDIS.LAYOUTS[name]) + [""]
    counters = [f.name for f in NDIS.LAYOUTS["GLOBAL_STATS"].fields if f.fmt == "Q"]
    first = next(i for i, f in enumerate(NDIS.LAYOUTS["GLOBAL_STATS"].fields) if f.fmt == "Q")
    out += ["/* GLOBAL_STATS 64-bit counters, in order, from field " + counters[0] + " on */",
            _define(f"{PREFIX}_FW_STAT_FIRST", f"offsetof(struct ipnc_global_stats, {counters[0]})"),
            _define(f"{PREFIX}_NUM_FW_STATS", len(counters)),
            f"#define {PREFIX}_FW_STAT_NAMES {{ \\"]
    out += [f'\t"{name}", \\' for name in counters]
    out += ["}", ""]
    assert first >= 0
    out += ["#endif /* IPSEC_NIC_HW_H */"]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not HEADER.is_file() or HEADER.read_text() != text:
            print(f"{HEADER} is stale: run `python -m guest_tools.linux.gen_header`", file=sys.stderr)
            return 1
        return 0
    HEADER.write_text(text)
    print(f"wrote {HEADER}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
