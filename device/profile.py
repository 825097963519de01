"""Card profiles: the YAML file that says which card to build (ids, MAC, queues, firmware, wire).

``load_profile(path)`` parses and validates; every error names the file, the key and the problem,
e.g. ``my.yaml: nic.tx_queues: 9 outside 1..8``. Unknown keys are errors too (they are usually
typos). The ``firmware:`` section is validated by the firmware model's own
:meth:`firmware_model.capabilities.Capabilities.from_profile` and passed through to it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from device.contract import regs
from device.contract.yaml_file import read_yaml

DEFAULT_PROFILE = "default.yaml"
WIRE_TYPES = ("none", "loopback", "dgram", "stream", "cable")
STREAM_MODES = ("server", "client")  # device/nic/wire.py StreamWire
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_VERSION_RE = re.compile(r"^(\d{1,5})\.(\d{1,3})(?:\.(\d{1,3}))?$")


class ProfileError(ValueError):
    """A card profile is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class PciProfile:
    vendor_id: int = regs.VENDOR_ID
    device_id: int = regs.DEVICE_ID
    subsystem_vendor_id: int = regs.VENDOR_ID
    subsystem_id: int = regs.DEVICE_ID
    class_code: int = regs.CLASS_CODE
    revision: int = 1


@dataclass(frozen=True)
class NicProfile:
    mac: bytes = bytes.fromhex("0249504e4300")
    tx_queues: int = 4
    rx_queues: int = 4
    ring_size: int = 4096
    msix_vectors: int = 5
    mtu: int = 1500
    max_mtu: int = 9000
    admin_queue_size: int = 256
    admin_buffer_size: int = 65536
    hw_version: int = regs.encode_version(1, 0, 0)
    # Offer the mirror BAR for mmap (datasheet §2). Off: its reads are trapped like BAR0's, and QEMU keeps
    # posting BAR writes (it stops once any region is mapped; docs/performance.md).
    mirror_mmap: bool = True

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)


@dataclass(frozen=True)
class WireProfile:
    type: str = "none"
    path: str | None = None
    peer: str | None = None
    pcap: str | None = None
    mode: str | None = None


@dataclass(frozen=True)
class Profile:
    pci: PciProfile = field(default_factory=PciProfile)
    nic: NicProfile = field(default_factory=NicProfile)
    firmware: Mapping[str, Any] = field(default_factory=dict)  # raw section for Capabilities.from_profile
    wire: WireProfile = field(default_factory=WireProfile)
    source: str = "<defaults>"


def default_profile_path() -> Path:
    return Path(str(resources.files("device") / "profiles" / DEFAULT_PROFILE))


def load_profile(path: str | Path | None = None) -> Profile:
    """Read and validate a profile file (the packaged default when ``path`` is None)."""
    p = Path(path) if path is not None else default_profile_path()
    data = read_yaml(p, "profile", ProfileError)
    return profile_from_dict(data if data is not None else {}, str(p))


def profile_from_dict(data: Any, source: str = "<dict>") -> Profile:
    v = _Validator(source)
    if not isinstance(data, Mapping):
        raise ProfileError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    v.only_keys(data, "", ("pci", "nic", "firmware", "wire"))
    pci = _pci(v, v.section(data, "pci"))
    nic = _nic(v, v.section(data, "nic"))
    firmware = dict(v.section(data, "firmware"))
    _check_firmware(source, firmware)
    wire = _wire(v, v.section(data, "wire"))
    return Profile(pci=pci, nic=nic, firmware=firmware, wire=wire, source=source)


def _check_firmware(source: str, section: dict[str, Any]) -> None:
    from firmware_model.capabilities import Capabilities  # the firmware model owns these keys

    try:
        Capabilities.from_profile(section, where="firmware")
    except ValueError as exc:
        raise ProfileError(f"{source}: {exc}") from None


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.source}: {key}: {problem}")

    def section(self, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        value = data.get(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(name, f"must be a mapping, got {type(value).__name__}")
        return value

    def only_keys(self, data: Mapping[str, Any], prefix: str, known: tuple[str, ...]) -> None:
        for key in data:
            if key not in known:
                name = f"{prefix}.{key}" if prefix else str(key)
                raise self.error(name, f"unknown key (known: {', '.join(known)})")

    def integer(self, data: Mapping[str, Any], key: str, name: str, default: int, low: int, high: int) -> int:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise self.error(name, f"{value} outside {low}..{high}")
        return value

    def string(self, data: Mapping[str, Any], key: str, name: str) -> str | None:
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(name, f"expected a string, got {value!r}")
        return value


def _pci(v: _Validator, s: Mapping[str, Any]) -> PciProfile:
    d = PciProfile()
    v.only_keys(s, "pci", ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_id", "class_code",
                           "revision"))
    vendor = v.integer(s, "vendor_id", "pci.vendor_id", d.vendor_id, 0x0001, 0xFFFE)  # 0/FFFF = no device
    return PciProfile(
        vendor_id=vendor,
        device_id=v.integer(s, "device_id", "pci.device_id", d.device_id, 0, 0xFFFE),
        subsystem_vendor_id=v.integer(s, "subsystem_vendor_id", "pci.subsystem_vendor_id", vendor, 0, 0xFFFF),
        subsystem_id=v.integer(s, "subsystem_id", "pci.subsystem_id", d.subsystem_id, 0, 0xFFFF),
        class_code=v.integer(s, "class_code", "pci.class_code", d.class_code, 0, 0xFFFFFF),
        revision=v.integer(s, "revision", "pci.revision", d.revision, 0, 0xFF),
    )


def _nic(v: _Validator, s: Mapping[str, Any]) -> NicProfile:
    d = NicProfile()
    v.only_keys(s, "nic", ("mac", "tx_queues", "rx_queues", "ring_size", "msix_vectors", "mtu", "max_mtu",
                           "admin_queue_size", "admin_buffer_size", "hw_version", "mirror_mmap"))
    mac = d.mac
    if "mac" in s:
        text = s["mac"]
        if not isinstance(text, str) or not _MAC_RE.match(text):
            raise v.error("nic.mac", f"expected six hex bytes like 02:49:50:4e:43:00, got {text!r}")
        mac = bytes.fromhex(text.replace(":", ""))
        if mac[0] & 1:
            raise v.error("nic.mac", f"{text} is a multicast address (bit 0 of the first byte is set)")
    tx = v.integer(s, "tx_queues", "nic.tx_queues", d.tx_queues, 1, regs.MAX_QUEUES)
    rx = v.integer(s, "rx_queues", "nic.rx_queues", d.rx_queues, 1, regs.MAX_QUEUES)
    ring = v.integer(s, "ring_size", "nic.ring_size", d.ring_size, regs.MIN_RING_SIZE, 1 << 15)
    aq = v.integer(s, "admin_queue_size", "nic.admin_queue_size", d.admin_queue_size, regs.MIN_RING_SIZE, 4096)
    for name, value in (("nic.ring_size", ring), ("nic.admin_queue_size", aq)):
        if value & (value - 1):
            raise v.error(name, f"{value} is not a power of two")
    max_mtu = v.integer(s, "max_mtu", "nic.max_mtu", d.max_mtu, regs.MIN_MTU, 9216)
    mtu = v.integer(s, "mtu", "nic.mtu", min(d.mtu, max_mtu), regs.MIN_MTU, max_mtu)
    # One vector for admin/link/errors plus one per queue pair is the natural layout (IVAR reset map).
    default_vectors = 1 + max(tx, rx)
    vectors = v.integer(s, "msix_vectors", "nic.msix_vectors", default_vectors, 1, regs.MSIX_MAX_VECTORS)
    mirror_mmap = s.get("mirror_mmap", d.mirror_mmap)
    if not isinstance(mirror_mmap, bool):
        raise v.error("nic.mirror_mmap", f"expected true or false, got {mirror_mmap!r}")
    hw_version = d.hw_version
    if "hw_version" in s:
        hw_version = _version(v, s["hw_version"], "nic.hw_version")
    return NicProfile(
        mac=mac, tx_queues=tx, rx_queues=rx, ring_size=ring, msix_vectors=vectors, mtu=mtu, max_mtu=max_mtu,
        admin_queue_size=aq,
        admin_buffer_size=v.integer(s, "admin_buffer_size", "nic.admin_buffer_size", d.admin_buffer_size,
                                    4096, 1 << 20),
        hw_version=hw_version,
        mirror_mmap=mirror_mmap,
    )


def _version(v: _Validator, value: Any, name: str) -> int:
    m = _VERSION_RE.match(str(value)) if isinstance(value, str | int | float) else None
    if m is None or int(m.group(1)) > 0xFFFF or int(m.group(2)) > 0xFF or int(m.group(3) or 0) > 0xFF:
        raise v.error(name, f"expected a version like \"1.0.0\", got {value!r}")
    return regs.encode_version(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def _wire(v: _Validator, s: Mapping[str, Any]) -> WireProfile:
    v.only_keys(s, "wire", ("type", "path", "peer", "pcap", "mode"))
    kind = s.get("type", "none")
    if kind not in WIRE_TYPES:
        raise v.error("wire.type", f"{kind!r} is not one of {', '.join(WIRE_TYPES)}")
    path = v.string(s, "path", "wire.path")
    if kind in ("dgram", "stream", "cable") and not path:
        raise v.error("wire.path", f"a {kind} wire needs a socket path")
    mode = v.string(s, "mode", "wire.mode")
    if mode is not None:
        if kind != "stream":
            raise v.error("wire.mode", f"only a stream wire takes a mode (this one is {kind})")
        if mode not in STREAM_MODES:
            raise v.error("wire.mode", f"{mode!r} is not one of {', '.join(STREAM_MODES)}")
    pcap = v.string(s, "pcap", "wire.pcap")
    if pcap:
        problem = _unwritable(Path(pcap))
        if problem:
            raise v.error("wire.pcap", f"cannot write {pcap}: {problem}")
    return WireProfile(type=kind, path=path, peer=v.string(s, "peer", "wire.peer"), pcap=pcap, mode=mode)


def _unwritable(path: Path) -> str | None:
    """Why the card could not create or overwrite ``path``, or None (checked before serving, so the
    error names the profile; the recorder still handles a disk that fills up later)."""
    if path.is_dir():
        return "it is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else "permission denied"
    parent = path.parent
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"directory {parent} is not writable"
