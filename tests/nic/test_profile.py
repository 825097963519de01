"""Card profile loading: the default file, and errors that name file, key and problem."""

from __future__ import annotations

import pytest
import yaml

from device.contract import regs
from device.profile import ProfileError, default_profile_path, load_profile, profile_from_dict


def test_default_profile_matches_register_constants(profile):
    assert profile.pci.vendor_id == regs.VENDOR_ID and profile.pci.device_id == regs.DEVICE_ID
    assert profile.pci.class_code == regs.CLASS_CODE
    assert profile.nic.mac_text == "02:49:50:4e:43:00"
    assert profile.nic.msix_vectors == 1 + max(profile.nic.tx_queues, profile.nic.rx_queues)
    assert profile.source.endswith("default.yaml")


def test_default_file_lists_every_default():
    # The packaged YAML spells out the dataclass defaults (so the file documents them truthfully).
    raw = yaml.safe_load(default_profile_path().read_text())
    empty = profile_from_dict({})
    full = profile_from_dict(raw)
    assert full.pci == empty.pci and full.nic == empty.nic and full.wire == empty.wire


def _write(tmp_path, text: str):
    path = tmp_path / "card.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("nic: {tx_queues: 9}", "nic.tx_queues", "9 outside 1..8"),
        ("nic: {rx_queues: two}", "nic.rx_queues", "expected an integer"),
        ("nic: {ring_size: 1000}", "nic.ring_size", "not a power of two"),
        ("nic: {mac: '01:00:5e:00:00:01'}", "nic.mac", "multicast"),
        ("nic: {mac: 'not-a-mac'}", "nic.mac", "six hex bytes"),
        ("nic: {mtu: 9500}", "nic.mtu", "outside 68..9000"),
        ("nic: {msix_vectors: 200}", "nic.msix_vectors", "outside 1..128"),
        ("nic: {hw_version: banana}", "nic.hw_version", "version like"),
        ("nic: {tx_queue: 2}", "nic.tx_queue", "unknown key"),
        ("pci: {vendor_id: 0xFFFF}", "pci.vendor_id", "outside"),
        ("pci: {revision: true}", "pci.revision", "expected an integer"),
        ("wire: {type: ethernet}", "wire.type", "not one of"),
        ("wire: {type: dgram}", "wire.path", "needs a socket path"),
        ("firmware: {sa_capacity: 0}", "firmware.sa_capacity", "outside"),
        ("firmware: {encryption: [rot13]}", "firmware.encryption", "unknown algorithm"),
        ("firmware: {bogus: 1}", "firmware.bogus", "unknown key"),
        ("nic: [1, 2]", "nic", "must be a mapping"),
        ("extra: {}", "extra", "unknown key"),
    ],
)
def test_errors_name_file_key_and_problem(tmp_path, text, key, problem):
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert f"{key}:" in message and problem in message, message


def test_yaml_syntax_error_names_line(tmp_path):
    path = _write(tmp_path, "nic:\n  tx_queues: [1,\n")
    with pytest.raises(ProfileError, match=r"card\.yaml: line \d+ not valid YAML"):
        load_profile(path)


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "nope.yaml")


def test_empty_file_is_all_defaults(tmp_path):
    p = load_profile(_write(tmp_path, ""))
    assert p.nic == profile_from_dict({}).nic


def test_overrides_apply(tmp_path):
    p = load_profile(_write(tmp_path, "nic: {tx_queues: 2, rx_queues: 3, mac: '02:00:00:00:00:07'}\n"
                                      "wire: {type: dgram, path: /tmp/w.sock}\n"))
    assert (p.nic.tx_queues, p.nic.rx_queues, p.nic.msix_vectors) == (2, 3, 4)
    assert p.nic.mac == bytes.fromhex("020000000007")
    assert p.wire.type == "dgram" and p.wire.path == "/tmp/w.sock"
