"""Builders for the card's PCI capabilities: PM, MSI-X, PCI Express (v2 Endpoint) and DSN.

Each builder returns a :class:`Capability` (bytes + writable + write-1-to-clear masks). Offsets of
the registers inside each capability are constants here so the PCI function can hook them.
"""

from __future__ import annotations

import enum
import struct

from device.pci.config_space import Capability, CapabilityId, ExtCapabilityId

# ----- Power management (PCI Bus Power Management Interface 1.2 §3.2) -----

PM_PMC = 2  # u16 capabilities
PM_PMCSR = 4  # u16 control/status
PM_SIZE = 8

PMCSR_POWER_STATE = 0x0003  # 0 = D0, 3 = D3hot; D1/D2 not supported
PMCSR_NO_SOFT_RESET = 0x0008  # D3hot -> D0 keeps state: the model has no reset on that transition
PM_D0 = 0
PM_D3HOT = 3


def power_management() -> Capability:
    pmc = 0x0003  # version 3 (PM 1.2); no PME, no D1/D2, no aux current
    data = struct.pack("<BBHHBB", CapabilityId.POWER_MANAGEMENT, 0, pmc, PMCSR_NO_SOFT_RESET, 0, 0)
    wmask = struct.pack("<BBHHBB", 0, 0, 0, PMCSR_POWER_STATE, 0, 0)
    return Capability(CapabilityId.POWER_MANAGEMENT, data, wmask, bytes(PM_SIZE))


# ----- MSI-X (PCI 3.0 §6.8.2) -----

MSIX_CONTROL = 2  # u16 message control
MSIX_TABLE = 4  # u32 table offset | BIR
MSIX_PBA = 8  # u32 PBA offset | BIR
MSIX_SIZE = 12


class MsixControl(enum.IntFlag):
    TABLE_SIZE = 0x07FF  # N - 1, read-only
    FUNCTION_MASK = 1 << 14
    ENABLE = 1 << 15


MSIX_ENTRY_SIZE = 16


def msix(vectors: int, bar: int, table_offset: int, pba_offset: int) -> Capability:
    if not 1 <= vectors <= 2048:
        raise ValueError(f"MSI-X table size {vectors} outside 1..2048")
    if table_offset % 8 or pba_offset % 8:
        raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned (BIR uses bits 2:0)")
    control = vectors - 1
    data = struct.pack("<BBHII", CapabilityId.MSIX, 0, control, table_offset | bar, pba_offset | bar)
    wmask = struct.pack("<BBHII", 0, 0, MsixControl.FUNCTION_MASK | MsixControl.ENABLE, 0, 0)
    return Capability(CapabilityId.MSIX, data, wmask, bytes(MSIX_SIZE))


def msix_table_bytes(vectors: int) -> int:
    return vectors * MSIX_ENTRY_SIZE


def msix_pba_bytes(vectors: int) -> int:
    return ((vectors + 63) // 64) * 8  # one bit per vector, in whole qwords


# ----- PCI Express capability, version 2, Endpoint (PCIe Base 4.0 §7.5.3) -----

PCIE_CAPS = 2  # u16
PCIE_DEVCAP = 4  # u32
PCIE_DEVCTL = 8  # u16
PCIE_DEVSTA = 10  # u16
PCIE_LINKCAP = 12  # u32
PCIE_LINKCTL = 16  # u16
PCIE_LINKSTA = 18  # u16
PCIE_DEVCAP2 = 36
PCIE_DEVCTL2 = 40
PCIE_LINKCAP2 = 44
PCIE_LINKCTL2 = 48
PCIE_SIZE = 60  # v2 capability with all the "2" registers

PCIE_TYPE_ENDPOINT = 0x0
DEVCAP_MPS_256 = 0x1  # Max_Payload_Size supported: 256 bytes
DEVCAP_ROLE_BASED_ERROR = 1 << 15  # must be 1 (PCIe 4.0 §7.5.3.3)
DEVCAP_FLR = 1 << 28
DEVCTL_INITIATE_FLR = 1 << 15  # write 1 → Function Level Reset; always reads 0
# Correctable/non-fatal/fatal/UR reporting, relaxed ordering, MPS, extended tag, no snoop, MRRS
DEVCTL_WRITABLE = 0x01FF | 0x0800 | 0x7000
DEVCTL_RESET = 0x2810  # relaxed ordering + no snoop + MRRS 512 B, the usual power-on defaults
DEVSTA_W1C = 0x000F  # error detected bits
LINK_SPEED_8GT = 3
LINK_WIDTH = 4
LINKCAP = LINK_SPEED_8GT | LINK_WIDTH << 4  # 8 GT/s x4; ASPM not supported; port number 0
LINKCTL_WRITABLE = 0x00CB  # ASPM control, RCB, common clock, extended synch
LINKSTA = LINK_SPEED_8GT | LINK_WIDTH << 4 | 1 << 12  # trained at max; slot clock configuration
LINKCAP2 = 0b1110  # supported speeds vector: 2.5, 5 and 8 GT/s
LINKCTL2 = LINK_SPEED_8GT  # target link speed


def pci_express(flr: bool = True) -> Capability:
    data = bytearray(PCIE_SIZE)
    wmask = bytearray(PCIE_SIZE)
    w1c = bytearray(PCIE_SIZE)
    data[0] = CapabilityId.PCI_EXPRESS
    struct.pack_into("<H", data, PCIE_CAPS, 2 | PCIE_TYPE_ENDPOINT << 4)
    devcap = DEVCAP_MPS_256 | DEVCAP_ROLE_BASED_ERROR | (DEVCAP_FLR if flr else 0)
    struct.pack_into("<I", data, PCIE_DEVCAP, devcap)
    struct.pack_into("<H", data, PCIE_DEVCTL, DEVCTL_RESET)
    struct.pack_into("<H", wmask, PCIE_DEVCTL, DEVCTL_WRITABLE | (DEVCTL_INITIATE_FLR if flr else 0))
    struct.pack_into("<H", w1c, PCIE_DEVSTA, DEVSTA_W1C)
    struct.pack_into("<I", data, PCIE_LINKCAP, LINKCAP)
    struct.pack_into("<H", wmask, PCIE_LINKCTL, LINKCTL_WRITABLE)
    struct.pack_into("<H", data, PCIE_LINKSTA, LINKSTA)
    struct.pack_into("<I", data, PCIE_LINKCAP2, LINKCAP2)
    struct.pack_into("<H", data, PCIE_LINKCTL2, LINKCTL2)
    return Capability(CapabilityId.PCI_EXPRESS, bytes(data), bytes(wmask), bytes(w1c))


# ----- Device Serial Number extended capability (PCIe 4.0 §7.9.3) -----

DSN_SIZE = 12


def eui64_from_mac(mac: bytes) -> int:
    """EUI-64 from a MAC-48 by inserting FF-FE after the OUI (IEEE "EUI-64" guidelines)."""
    if len(mac) != 6:
        raise ValueError("MAC address must be 6 bytes")
    return int.from_bytes(mac[:3] + b"\xff\xfe" + mac[3:], "big")


def device_serial_number(serial: int) -> Capability:
    # Header (filled by the config space), then the 64-bit serial as lower dword, upper dword.
    data = struct.pack("<IQ", ExtCapabilityId.DEVICE_SERIAL_NUMBER, serial)
    return Capability(
        ExtCapabilityId.DEVICE_SERIAL_NUMBER, data, bytes(DSN_SIZE), bytes(DSN_SIZE), extended=True, version=1
    )
