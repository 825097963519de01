"""Guest probe: decoding (pure), sysfs discovery on a fake tree, and the ctypes BAR accessor."""

from __future__ import annotations

import json

import pytest

from device.contract import regs
from guest_tools import pci, probe


def card_values(fn) -> dict[str, int]:
    return {name: int.from_bytes(fn.region_read(0, regs.reg(name), 4), "little") for name in probe.PROBED}


def test_decode_of_the_default_card(fn, profile):
    report = probe.decode(card_values(fn))
    assert report["id_ok"] and report["magic"] == "IPNC"
    assert report["mac"] == profile.nic.mac_text
    assert report["tx_queues"] == profile.nic.tx_queues and report["msix_vectors"] == profile.nic.msix_vectors
    assert report["regmap_version"] == regs.decode_version(regs.REGMAP_VERSION_VALUE)
    assert "CRYPTO_OFFLOAD" in report["features"] and "MSIX" in report["features"]
    assert report["encryption"] == ["NONE", "AES_GCM_128", "AES_GCM_192", "AES_GCM_256", "AES_CBC_128",
                                    "AES_CBC_192", "AES_CBC_256"]
    assert report["integrity"] == ["SHA1", "SHA256", "AES_GMAC_128", "AES_GMAC_192", "AES_GMAC_256"]
    assert report["udp_esp"] == ["TRANSPORT", "TUNNEL"]
    assert report["status"] == ["READY"] and report["int_mode"] == "POLL" and report["error"] == "NONE"
    json.dumps(report)  # JSON-able
    text = probe.format_report(report, "0000:00:03.0")
    assert "ipsec-nic at 0000:00:03.0" in text and profile.nic.mac_text in text and "AES_GCM_128" in text


def test_decode_flags_unknown_bits_and_bad_magic():
    assert probe.flag_names(regs.Status, 0x5) == ["READY", "LINK_UP"]
    assert probe.flag_names(regs.Status, 0x101) == ["READY", "unknown:0x100"]
    values = dict.fromkeys(probe.PROBED, 0)
    values["CTRL"] = int(regs.Ctrl.ENABLE) | 3 << regs.CTRL_INT_MODE_SHIFT
    values["ERR_CODE"] = 99
    report = probe.decode(values)
    assert not report["id_ok"] and report["int_mode"] == "unknown(3)" and report["error"] == "unknown(99)"
    assert report["ctrl"] == ["ENABLE"]
    assert "WRONG" in probe.format_report(report)


def test_mac_from_registers():
    assert probe.mac_from_registers(0x4E504902, 0xFFFF0043) == "02:49:50:4e:43:00"


def test_probed_registers_have_no_read_side_effects():
    for name in probe.PROBED:
        r = regs.REGISTER_BY_NAME[name]
        assert r.block is not regs.Block.STATS and r.access is not regs.Access.WO


def _fake_sysfs(tmp_path, devices):
    root = tmp_path / "devices"
    for bdf, vendor, device, klass in devices:
        d = root / bdf
        d.mkdir(parents=True)
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")
        (d / "class").write_text(f"0x{klass:06x}\n")
        (d / "config").write_bytes(bytes(256))
        (d / "enable").write_text("0\n")
    return root


def test_find_device_and_errors_list_what_exists(tmp_path):
    root = _fake_sysfs(tmp_path, [("0000:00:01.0", 0x8086, 0x100E, 0x020000),
                                  ("0000:00:03.0", regs.VENDOR_ID, regs.DEVICE_ID, 0x020000)])
    dev = pci.find_device(regs.VENDOR_ID, regs.DEVICE_ID, root=root)
    assert dev.bdf == "0000:00:03.0" and dev.class_code == 0x020000
    with pytest.raises(pci.PciError) as err:
        pci.find_device(0x1234, 0x5678, root=root)
    assert "0000:00:01.0 [8086:100e]" in str(err.value) and "1234:5678" in str(err.value)
    with pytest.raises(pci.PciError, match="does not exist"):
        pci.list_devices(tmp_path / "nowhere")


def test_enable_device_sets_memory_decode(tmp_path):
    root = _fake_sysfs(tmp_path, [("0000:00:03.0", regs.VENDOR_ID, regs.DEVICE_ID, 0x020000)])
    dev = pci.find_device(regs.VENDOR_ID, regs.DEVICE_ID, root=root)
    command = pci.enable_device(dev, bus_master=True)
    assert command == pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER
    assert (dev.path / "enable").read_text() == "1"
    assert pci.read_config(dev, pci.PCI_COMMAND, 2) == command


def test_bar_accessor_on_a_mapped_file(tmp_path):
    root = _fake_sysfs(tmp_path, [("0000:00:03.0", regs.VENDOR_ID, regs.DEVICE_ID, 0x020000)])
    dev = pci.find_device(regs.VENDOR_ID, regs.DEVICE_ID, root=root)
    (dev.path / "resource0").write_bytes(b"IPNC" + bytes(4092))
    with pci.Bar(dev, 0) as bar:
        assert bar.size == 4096 and bar.read32(0) == regs.ID_MAGIC
        bar.write32(8, 0x1_2345_6789)
        assert bar.read32(8) == 0x2345_6789
        bar.write32(16, 7)
        bar.write32(20, 1)
        assert bar.read64_pair(16) == (1 << 32) | 7
        with pytest.raises(pci.PciError, match="bad 4-byte access"):
            bar.read32(2)
        with pytest.raises(pci.PciError):
            bar.read32(4096)
    assert (dev.path / "resource0").read_bytes()[8:12] == (0x2345_6789).to_bytes(4, "little")
    with pytest.raises(pci.PciError, match="resource1 missing"):
        pci.Bar(dev, 1)
