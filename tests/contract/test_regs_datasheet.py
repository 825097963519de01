"""The register map: internal consistency, agreement with the datasheet and with the firmware model."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.contract import regs

ROOT = Path(__file__).resolve().parents[2]
DATASHEET = ROOT / "docs" / "datasheet.md"


def test_datasheet_contains_generated_tables_verbatim():
    text = DATASHEET.read_text(encoding="utf-8")
    assert text.count(regs.DATASHEET_BEGIN) == 1, "datasheet lost its generated-section marker"
    start = text.index(regs.DATASHEET_BEGIN)
    end = text.index(regs.DATASHEET_END, start) + len(regs.DATASHEET_END) + 1
    assert text[start:end] == regs.datasheet_section(), (
        "docs/datasheet.md register tables are stale: regenerate them from device/contract/regs.py"
    )


def test_every_register_row_is_in_the_datasheet():
    text = DATASHEET.read_text(encoding="utf-8")
    for r in regs.REGISTERS:
        assert f"| {r.name} |" in text, r.name


def test_registers_aligned_inside_bar0_without_overlap():
    seen: dict[int, str] = {}
    for r in regs.REGISTERS:
        for i in range(r.count):
            off = r.element_offset(i)
            assert off % 4 == 0 and 0 <= off <= regs.BAR0_SIZE - 4, r.name
            assert off not in seen, f"{r.name}[{i}] overlaps {seen.get(off)}"
            assert off < regs.DOORBELL_PAGE, f"{r.name} in the reserved doorbell page"
            seen[off] = r.name
    assert len(seen) == len(regs.REGISTER_AT)


def test_module_constants_match_the_table():
    for r in regs.REGISTERS:
        assert getattr(regs, r.name) == r.offset
    assert regs.ID == 0 and regs.CTRL == 0x100 and regs.ICR == 0x200
    assert regs.txq_reg(3, regs.QREG_TAIL) == regs.REGISTER_BY_NAME["TXQ_TAIL"].element_offset(3)
    assert regs.rxq_reg(7, regs.QREG_CTRL) == regs.REGISTER_BY_NAME["RXQ_CTRL"].element_offset(7)
    assert regs.stat_offset("DMA_ERROR") + 4 == regs.reg("DMA_ERROR_HI")


def test_magic_reads_ipnc_in_memory_order():
    assert regs.ID_MAGIC.to_bytes(4, "little") == b"IPNC"


def test_cause_bits_match_queue_helpers():
    for q in range(regs.MAX_QUEUES):
        assert regs.cause_tx(q) == regs.Cause[f"TX{q}"]
        assert regs.cause_rx(q) == regs.Cause[f"RX{q}"]
    defined = 0
    for member in regs.Cause.__members__.values():
        defined |= int(member)
    assert defined == regs.CAUSES_DEFINED


def test_ivar_reset_map_routes_queue_pairs():
    resets = regs.REGISTER_BY_NAME["IVAR"].resets
    slot = b"".join(v.to_bytes(4, "little") for v in resets)
    assert slot[0] == regs.IVAR_VALID | 0  # ADMINQ -> vector 0
    assert slot[regs.CAUSE_TX_SHIFT + 2] == regs.IVAR_VALID | 3
    assert slot[regs.CAUSE_RX_SHIFT + 2] == regs.IVAR_VALID | 3
    assert slot[4] == 0  # reserved cause bit: not routed


@pytest.mark.parametrize("layout", regs.LAYOUTS, ids=lambda layout: layout.name)
def test_layout_offsets_are_struct_offsets(layout):
    # Each field's offset equals what struct computes for the prefix before it: no hidden padding.
    prefix = "<"
    for f in layout.fields:
        assert f.offset == struct.calcsize(prefix), f.name
        prefix += f.fmt
    assert struct.calcsize(prefix) == layout.size == layout.struct.size
    assert layout.size % 16 == 0


def test_layout_sizes():
    assert (regs.ADMIN_DESC.size, regs.TX_DESC.size, regs.RX_DESC.size) == (64, 32, 32)
    # Write-back fields of the data descriptors never overlap what the driver wrote.
    assert regs.TX_DESC.offset_of("wb_status") >= regs.TX_DESC.offset_of("tunnel_handle") + 4
    assert regs.RX_DESC.offset_of("length") >= regs.RX_DESC.offset_of("buf_len") + 2


def _field_values(layout):
    limits = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFF_FFFF, "Q": 0xFFFF_FFFF_FFFF_FFFF}
    return st.fixed_dictionaries({f.name: st.integers(0, limits[f.fmt]) for f in layout.fields})


@pytest.mark.parametrize("layout", regs.LAYOUTS, ids=lambda layout: layout.name)
def test_layout_round_trip(layout):
    @given(_field_values(layout))
    def check(values):
        raw = layout.pack(**values)
        assert len(raw) == layout.size
        assert dataclasses.asdict(layout.unpack(raw)) == values
        buf = bytearray(8) + bytearray(raw)
        for name, value in values.items():
            assert layout.get(buf, 8, name) == value
        layout.set(buf, 8, "addr" if "addr" in values else "opcode", 0)

    check()


def test_layout_little_endian_by_example():
    raw = regs.TX_DESC.pack(addr=0x1122334455667788, length=0x0102, flags=regs.TxFlags.EOP)
    assert raw[:8] == bytes.fromhex("8877665544332211")
    assert raw[8:12] == bytes.fromhex("02010100")
    with pytest.raises(TypeError, match="no field"):
        regs.TX_DESC.pack(bogus=1)


def test_register_fields_are_the_shared_enums():
    """ENC_ALGOS / AUTH_ALGOS / UDP_ESP bits are the NDIS identifiers an ADD_SA carries: one enum each,
    shared by the register table, the command structures and the firmware."""
    from device.contract import enums, ndis, status
    from firmware_model import algorithms

    fields = {r.name: r.fields for r in regs.REGISTERS}
    assert fields["ENC_ALGOS"] is enums.EncAlg and fields["AUTH_ALGOS"] is enums.AuthAlg
    assert fields["UDP_ESP"] is enums.UdpEspEncapsulation
    assert regs.CryptoStatus is status.CryptoStatus and ndis.RejectReason is not None
    assert set(algorithms.ENC_INFO) == set(enums.EncAlg)
    assert set(algorithms.AUTH_INFO) == set(enums.AuthAlg.__members__.values())


def test_every_register_has_its_offset_constant():
    for r in regs.REGISTERS:
        assert getattr(regs, r.name) == r.offset, r.name


def _python313() -> str | None:
    for candidate in ("/usr/bin/python3.13", "/root/.pyenv/versions/3.13.0/bin/python3.13"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.skipif(_python313() is None, reason="no python3.13 (the guest's version) on this host")
def test_regs_and_guest_tools_import_on_python_313():
    """The guest runs Python 3.13 with only the stdlib: regs and the probe must import and work there."""
    code = ("import sys, device.contract.regs as r, guest_tools.probe as p; "
            "assert not [m for m in sys.modules if m.startswith(('yaml', 'firmware_model'))]; "
            "print(r.datasheet_tables().count('|') > 100, p.flag_names(r.Features, 3))")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([_python313(), "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True ['CRYPTO_OFFLOAD', 'PACKET_OFFLOAD']"
