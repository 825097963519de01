"""The committed C header of the kernel driver is exactly what gen_header renders from the Python contract."""

from __future__ import annotations

import re

from device.contract import ndis, regs
from guest_tools.linux import gen_header


def test_committed_header_is_current():
    assert gen_header.HEADER.read_text() == gen_header.render(), (
        "guest_tools/linux/ipsec_nic_hw.h is stale: run `python -m guest_tools.linux.gen_header`"
    )


def _defines(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#define (\w+)\s+(.+)$", text, re.M))


def test_header_values_come_from_the_contract():
    defines = _defines(gen_header.render())
    assert int(defines["IPNC_VENDOR_ID"], 0) == regs.VENDOR_ID
    assert int(defines["IPNC_REG_CTRL"], 0) == regs.CTRL
    assert int(defines["IPNC_STAT_RX_AUTH_FAIL"], 0) == regs.stat_offset("RX_AUTH_FAIL")
    assert int(defines["IPNC_TX_FLAGS_IPSEC_CRYPTO"], 0) == int(regs.TxFlags.IPSEC_CRYPTO)
    assert int(defines["IPNC_OPCODE_V2_ADD_SA_EX"], 0) == ndis.Opcode.V2_ADD_SA_EX
    assert int(defines["IPNC_NUM_FW_STATS"], 0) == sum(f.fmt == "Q" for f in ndis.GLOBAL_STATS.fields)


def test_structures_match_layout_sizes_and_field_order():
    text = gen_header.render()
    for layout in regs.LAYOUTS:
        c_name = "ipnc_" + gen_header._snake_upper(layout.name).lower()
        body = re.search(rf"struct {c_name} {{\n(.*?)\n}} __packed;", text, re.S)
        assert body, c_name
        names = [line.split()[-1].rstrip(";") for line in body.group(1).splitlines()]
        assert names == [f.name for f in layout.fields]
        assert f"static_assert(sizeof(struct {c_name}) == {layout.size});" in text
    for name in gen_header.NDIS_LAYOUTS:
        layout = ndis.LAYOUTS[name]
        assert f"static_assert(sizeof(struct ipnc_{name.lower()}) == {layout.size});" in text


def test_stale_header_is_reported(tmp_path, monkeypatch):
    stale = tmp_path / "ipsec_nic_hw.h"
    stale.write_text(gen_header.render().replace("0x434E5049", "0x0"))
    monkeypatch.setattr(gen_header, "HEADER", stale)
    assert gen_header.main(["--check"]) == 1
    stale.write_text(gen_header.render())
    assert gen_header.main(["--check"]) == 0
