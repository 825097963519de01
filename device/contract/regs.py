"""The ipsec-nic register interface: BAR0 register map, bit fields and DMA descriptor layouts.

Part of the card's programming interface (device/contract). It is the one source for the device model
(device/nic/), the guest tools (guest_tools/) and the register tables in docs/datasheet.md
(`datasheet_tables()` renders them; tests/contract/test_regs_datasheet.py checks the doc matches).

Standard library only: the guest imports it on its own python3 from a read-only share of the
checkout, so it must pull in nothing else (device/__init__.py and device/contract/__init__.py stay empty).

Byte order: everything the card exposes is little-endian: registers, descriptors, admin buffers.
All registers are 32 bits wide; 64-bit counters are LO/HI register pairs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from device.contract.enums import AuthAlg, DocFlag, EncAlg, UdpEspEncapsulation
from device.contract.layout import Layout, wire_class
from device.contract.status import CryptoStatus

# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------

BAR0_SIZE = 0x4000  # 16 KiB of registers; the last 4 KiB page is reserved for mmappable doorbells
BAR2_SIZE = 0x1000  # MSI-X table (offset 0) and PBA (offset MSIX_PBA_OFFSET)
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
MSIX_MAX_VECTORS = 128  # 128 table entries x 16 bytes = 2 KiB, exactly up to the PBA

ID_MAGIC = int.from_bytes(b"IPNC", "little")  # 0x434E5049: the bytes read "IPNC" in memory order
REGMAP_VERSION_VALUE = 0x0001_0100  # major 1, minor 1 (1.1: mirror BAR, RX policy/checksum flags); minor = additions

# PCI identity of the card. 0xEC5E is absent from the pci.ids database (2023.04 snapshot) and well
# above its recently assigned ids (around 0x1Fxx-0x2xxx), so the card cannot be mistaken for a real
# product and no real driver binds to it. It is NOT a registered id: a profile may override it.
VENDOR_ID = 0xEC5E
DEVICE_ID = 0x0001
CLASS_CODE = 0x020000  # network controller, Ethernet

MAX_QUEUES = 8  # per direction; the cause bits and IVAR slots are sized for this
QUEUE_STRIDE = 0x40  # bytes between consecutive queues' register blocks
TXQ_BASE = 0x1000
RXQ_BASE = 0x2000
DOORBELL_PAGE = 0x3000  # reserved: a 4 KiB page that a later revision may make mmappable

# BAR4, the mirror BAR (register map 1.1): read-only mirrors of card-owned registers (STATUS, ICR,
# ERR_*, ring HEADs). Nothing in it has a read or write side effect, so the card lets the client mmap
# all of it: the driver reads it from shared memory, no trap and no message. A BAR of its own keeps
# BAR0 wholly trapped (every BAR0 access reaches the card, in order).
MIRROR_BAR = 4
MIRROR_BAR_SIZE = 0x1000
MIRROR_TXQ_HEAD_BASE = 0x40
MIRROR_RXQ_HEAD_BASE = 0x60
MIRROR_MIN_VERSION = 0x0001_0100  # REGMAP_VERSION from which the mirror BAR exists

RING_ALIGN = 64  # ring base addresses must be multiples of this (one cache line)
MIN_RING_SIZE = 2  # entries; ring sizes are powers of two between MIN and the MAX_RING_SIZE register
MIN_MTU = 68  # RFC 791: every IPv4 host must accept 68-byte datagrams


def encode_version(major: int, minor: int = 0, patch: int = 0) -> int:
    """Version register format: major in bits 31:16, minor in 15:8, patch in 7:0."""
    return ((major & 0xFFFF) << 16) | ((minor & 0xFF) << 8) | (patch & 0xFF)


def decode_version(value: int) -> str:
    return f"{value >> 16}.{(value >> 8) & 0xFF}.{value & 0xFF}"


# ---------------------------------------------------------------------------------------------
# Bit fields. Each member carries its datasheet description; multi-bit members are field masks.
# ---------------------------------------------------------------------------------------------


class Features(DocFlag):
    """FEATURES (0x010): what the card and its firmware can do. Firmware bits mirror NDIS_IPSEC_OFFLOAD_V2."""

    CRYPTO_OFFLOAD = 1 << 0, "Crypto offload: host builds ESP, card encrypts/verifies (NDIS IPsec offload v2)"
    PACKET_OFFLOAD = 1 << 1, "Packet offload: card encapsulates, numbers, pads and decapsulates ESP"
    ESP = 1 << 2, "ESP (RFC 4303) SAs"
    AH = 1 << 3, "AH (RFC 4302) SAs"
    AH_ESP_COMBINED = 1 << 4, "ESP followed by AH in one SA bundle"
    TRANSPORT = 1 << 5, "Transport mode"
    TUNNEL = 1 << 6, "Tunnel mode"
    TRANSPORT_TUNNEL_COMBINED = 1 << 7, "Transport-over-tunnel bundles"
    IPV6 = 1 << 8, "IPv6 SAs and packets"
    IPV4_OPTIONS = 1 << 9, "IPv4 packets with options are processed (else passed up unprocessed)"
    IPV6_EXT_HEADERS = 1 << 10, "IPv6 packets with non-IPsec extension headers are processed"
    ESN = 1 << 11, "Extended sequence numbers (RFC 4304); UPDATE_SA pushes the high half"
    UDP_ESP = 1 << 12, "UDP-encapsulated ESP (RFC 3948); kinds in UDP_ESP"
    ANTI_REPLAY = 1 << 13, "Packet offload enforces an anti-replay window (up to MAX_REPLAY_WINDOW)"
    LIFETIMES = 1 << 14, "Packet offload counts soft/hard packet and byte limits"
    LSO = 1 << 15, "Large send offload also for IPsec traffic (NDIS LsoSupported)"
    MSIX = 1 << 16, "MSI-X interrupts (NUM_MSIX vectors)"
    INTX = 1 << 17, "Legacy INTx interrupt (pin A)"


class Ctrl(DocFlag):
    """CTRL (0x100)."""

    ENABLE = 1 << 0, "Start the card: rings, admin queue and wire run only while set"
    RESET = 1 << 1, "Write 1: reset every BAR0 register and the firmware state (SAs); self-clearing, reads 0"
    PROMISC = 1 << 2, "Receive frames for any destination MAC (else own MAC, broadcast, multicast)"
    INT_MODE = 0x3 << 4, "Interrupt mode, an IntMode value"


CTRL_INT_MODE_SHIFT = 4


class IntMode(enum.IntEnum):
    """CTRL.INT_MODE values."""

    POLL = 0  # no interrupts at all: the driver polls ICR and descriptors
    SINGLE = 1  # every unmasked cause raises the one interrupt (INTx, or MSI-X vector 0)
    VECTORS = 2  # each cause raises the MSI-X vector IVAR maps it to (SINGLE when MSI-X is off)


class Status(DocFlag):
    """STATUS (0x104)."""

    READY = 1 << 0, "Firmware is up; registers may be programmed"
    ENABLED = 1 << 1, "CTRL.ENABLE took effect"
    LINK_UP = 1 << 2, "The wire backend is connected"
    FATAL = 1 << 3, "A fatal error stopped the card; see ERR_CODE/ERR_INFO; only CTRL.RESET recovers"


class ErrCode(enum.IntEnum):
    """ERR_CODE (0x108) values; ERR_INFO gives the detail named here."""

    NONE = 0
    BAD_RING_CONFIG = 1  # ERR_INFO = queue id (see QueueId) of the ring with bad base/length
    DMA_FAULT = 2  # ERR_INFO = queue id of the ring whose descriptor or buffer was unreachable
    BAD_MTU = 3  # ERR_INFO = the rejected MTU value
    FIRMWARE_FAULT = 4  # ERR_INFO = firmware-specific
    BAD_DESCRIPTOR = 5  # ERR_INFO = queue id


class QueueId(enum.IntEnum):
    """How ERR_INFO names a ring: kind in bits 15:8, index in bits 7:0."""

    ADMIN = 0x000
    TX = 0x100
    RX = 0x200


class Cause(DocFlag):
    """Interrupt cause bits of ICR/ICS/IMS/IMC (0x200-0x20C)."""

    ADMINQ = 1 << 0, "An admin command completed"
    LINK = 1 << 1, "STATUS.LINK_UP changed"
    ERROR = 1 << 2, "ERR_CODE was set (STATUS.FATAL may be set too)"
    SA_DELETE_REQ = 1 << 3, "Firmware asks the host to delete an SA pair (see RX write-back)"
    TX0 = 1 << 8, "TX queue 0 wrote back a descriptor with REPORT_STATUS"
    TX1 = 1 << 9, "TX queue 1"
    TX2 = 1 << 10, "TX queue 2"
    TX3 = 1 << 11, "TX queue 3"
    TX4 = 1 << 12, "TX queue 4"
    TX5 = 1 << 13, "TX queue 5"
    TX6 = 1 << 14, "TX queue 6"
    TX7 = 1 << 15, "TX queue 7"
    RX0 = 1 << 16, "RX queue 0 wrote back a received frame"
    RX1 = 1 << 17, "RX queue 1"
    RX2 = 1 << 18, "RX queue 2"
    RX3 = 1 << 19, "RX queue 3"
    RX4 = 1 << 20, "RX queue 4"
    RX5 = 1 << 21, "RX queue 5"
    RX6 = 1 << 22, "RX queue 6"
    RX7 = 1 << 23, "RX queue 7"


CAUSE_TX_SHIFT = 8
CAUSE_RX_SHIFT = 16
CAUSES_DEFINED = 0x00FF_FF0F  # all cause bits above; ICS/IMS ignore the others


def cause_tx(queue: int) -> int:
    return 1 << (CAUSE_TX_SHIFT + queue)


def cause_rx(queue: int) -> int:
    return 1 << (CAUSE_RX_SHIFT + queue)


class QueueCtrl(DocFlag):
    """Per-ring CTRL (TXQ/RXQ/AQ +0x14)."""

    ENABLE = 1 << 0, "Ring runs; base and length are checked when this goes 0->1 (HEAD resets to 0)"


IVAR_VALID = 0x80  # per-cause byte in IVAR: bits 6:0 MSI-X vector, bit 7 valid
IVAR_VECTOR_MASK = 0x7F


# ---------------------------------------------------------------------------------------------
# The register table
# ---------------------------------------------------------------------------------------------


class Access(enum.Enum):
    RO = "RO"  # read-only; writes are ignored (and counted)
    RW = "RW"  # read/write
    W1C = "W1C"  # read; writing 1 clears a bit
    W1S = "W1S"  # read; writing 1 sets a bit (0 bits unchanged)
    WO = "WO"  # write-only; reads return 0


class Block(enum.Enum):
    IDENTITY = "Identity"
    CAPABILITIES = "Capabilities"
    CONTROL = "Control and status"
    INTERRUPTS = "Interrupts"
    ADMINQ = "Admin queue"
    STATS = "Statistics"
    TXQ = "TX queues"
    RXQ = "RX queues"
    MIRROR = "Mirror BAR (BAR4, mmappable)"


@dataclass(frozen=True)
class Register:
    """One register, or an array of ``count`` registers ``stride`` bytes apart."""

    name: str
    offset: int
    access: Access
    block: Block
    description: str
    reset: int = 0
    reset_from: str = ""  # set when the reset value comes from the card profile / firmware
    count: int = 1
    stride: int = 4
    resets: tuple[int, ...] = ()  # per-element reset values of an array (else all ``reset``)
    fields: type[DocFlag] | None = None
    width: int = 32

    def element_offset(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"{self.name}[{index}] out of range 0..{self.count - 1}")
        return self.offset + index * self.stride

    def element_reset(self, index: int) -> int:
        return self.resets[index] if self.resets else self.reset


# Offsets within one ring's register block (admin queue, each TX queue, each RX queue).
QREG_BASE_LO = 0x00
QREG_BASE_HI = 0x04
QREG_LEN = 0x08
QREG_HEAD = 0x0C
QREG_TAIL = 0x10
QREG_CTRL = 0x14

_RING_REGS: tuple[tuple[str, int, Access, str], ...] = (
    ("BASE_LO", QREG_BASE_LO, Access.RW, "Ring base guest address bits 31:0 (multiple of 64)"),
    ("BASE_HI", QREG_BASE_HI, Access.RW, "Ring base guest address bits 63:32"),
    ("LEN", QREG_LEN, Access.RW, "Ring size in descriptors (power of two, 2..max)"),
    ("HEAD", QREG_HEAD, Access.RO, "Next descriptor the card will process (card-owned)"),
    ("TAIL", QREG_TAIL, Access.RW, "Doorbell: one past the last descriptor the driver made ready"),
    ("CTRL", QREG_CTRL, Access.RW, "Ring control (QueueCtrl)"),
)


def _ring_registers(prefix: str, base: int, block: Block, count: int) -> list[Register]:
    return [
        Register(
            f"{prefix}_{suffix}",
            base + rel,
            access,
            block,
            description,
            count=count,
            stride=QUEUE_STRIDE,
            fields=QueueCtrl if suffix == "CTRL" else None,
        )
        for suffix, rel, access, description in _RING_REGS
    ]


# 64-bit statistics counters (LO at the offset, HI 4 bytes above). Reading LO latches HI so a
# LO-then-HI read pair is consistent; all counters reset with the card.
STATS_BASE = 0x400
STATISTICS: tuple[tuple[str, str], ...] = (
    ("TX_PACKETS", "Frames sent on the wire"),
    ("TX_BYTES", "Bytes sent on the wire (frame length, no FCS)"),
    ("RX_PACKETS", "Frames received into an RX ring"),
    ("RX_BYTES", "Bytes received into an RX ring"),
    ("TX_CRYPTO_OK", "TX frames the card encrypted / protected"),
    ("RX_CRYPTO_OK", "RX frames that passed ICV check and were decrypted"),
    ("RX_AUTH_FAIL", "RX frames whose ICV check failed"),
    ("RX_REPLAY_DROP", "RX frames refused by the anti-replay window (packet offload)"),
    ("RX_NO_BUFFER", "RX frames dropped because the ring had no free descriptor"),
    ("TX_OFFLOAD_ERROR", "TX frames completed with an offload error (bad handle, crypto)"),
    ("BAD_DESCRIPTOR", "Descriptors refused as malformed (all rings)"),
    ("DMA_ERROR", "Guest addresses the card could not reach (all rings and admin buffers)"),
    ("RX_POLICY_DROP", "RX frames dropped after decapsulation: outside the SA's selector (packet offload)"),
)


def _stats_registers() -> list[Register]:
    regs = []
    for i, (name, description) in enumerate(STATISTICS):
        offset = STATS_BASE + 8 * i
        regs.append(Register(f"{name}_LO", offset, Access.RO, Block.STATS, f"{description}, bits 31:0"))
        regs.append(Register(f"{name}_HI", offset + 4, Access.RO, Block.STATS, f"{description}, bits 63:32"))
    return regs


def _default_ivar() -> tuple[int, ...]:
    """Reset MSI-X map: misc causes -> vector 0; TXn and RXn -> vector 1+n (one vector per queue pair)."""
    slots = [0] * 32
    for bit in (0, 1, 2, 3):
        slots[bit] = IVAR_VALID | 0
    for q in range(MAX_QUEUES):
        slots[CAUSE_TX_SHIFT + q] = IVAR_VALID | (1 + q)
        slots[CAUSE_RX_SHIFT + q] = IVAR_VALID | (1 + q)
    return tuple(int.from_bytes(bytes(slots[4 * i : 4 * i + 4]), "little") for i in range(8))


_I, _C, _CS, _INT, _AQ = Block.IDENTITY, Block.CAPABILITIES, Block.CONTROL, Block.INTERRUPTS, Block.ADMINQ

REGISTERS: tuple[Register, ...] = (
    # Identity
    Register("ID", 0x000, Access.RO, _I, "Magic: bytes 'I','P','N','C' (0x434E5049)", reset=ID_MAGIC),
    Register("REGMAP_VERSION", 0x004, Access.RO, _I, "Version of this register map (major.minor.patch)",
             reset=REGMAP_VERSION_VALUE),
    Register("HW_VERSION", 0x008, Access.RO, _I, "Hardware revision (major.minor.patch)",
             reset_from="nic.hw_version"),
    Register("FW_VERSION", 0x00C, Access.RO, _I, "Firmware version (major.minor.patch)",
             reset_from="firmware model version"),
    # Capabilities
    Register("FEATURES", 0x010, Access.RO, _C, "Feature bits (Features)", reset_from="firmware + nic",
             fields=Features),
    Register("SA_CAPACITY", 0x014, Access.RO, _C, "SA bundles the card can hold (NDIS SaOffloadCapacity)",
             reset_from="firmware.sa_capacity"),
    Register("ENC_ALGOS", 0x018, Access.RO, _C, "Encryption algorithms (EncAlg mask)",
             reset_from="firmware.encryption", fields=EncAlg),
    Register("AUTH_ALGOS", 0x01C, Access.RO, _C, "Integrity algorithms (AuthAlg mask)",
             reset_from="firmware.integrity", fields=AuthAlg),
    Register("UDP_ESP", 0x020, Access.RO, _C, "UDP-ESP encapsulations (UdpEspEncapsulation mask)",
             reset_from="firmware.udp_esp", fields=UdpEspEncapsulation),
    Register("MAX_REPLAY_WINDOW", 0x024, Access.RO, _C, "Largest anti-replay window in packets (0 = none)",
             reset_from="firmware.max_replay_window"),
    Register("NUM_TXQ", 0x028, Access.RO, _C, "TX queues implemented (1..8)", reset_from="nic.tx_queues"),
    Register("NUM_RXQ", 0x02C, Access.RO, _C, "RX queues implemented (1..8)", reset_from="nic.rx_queues"),
    Register("MAX_RING_SIZE", 0x030, Access.RO, _C, "Largest TX/RX ring in descriptors",
             reset_from="nic.ring_size"),
    Register("NUM_MSIX", 0x034, Access.RO, _C, "MSI-X vectors (table size)", reset_from="nic.msix_vectors"),
    Register("MAC_LO", 0x038, Access.RO, _C, "MAC address bytes 0-3 (byte 0 in bits 7:0)",
             reset_from="nic.mac"),
    Register("MAC_HI", 0x03C, Access.RO, _C, "MAC address bytes 4-5 in bits 15:0", reset_from="nic.mac"),
    Register("MAX_MTU", 0x040, Access.RO, _C, "Largest MTU (IP packet bytes) the card accepts",
             reset_from="nic.max_mtu"),
    Register("AQ_MAX_LEN", 0x044, Access.RO, _C, "Largest admin ring in descriptors",
             reset_from="nic.admin_queue_size"),
    Register("AQ_MAX_BUF", 0x048, Access.RO, _C, "Largest admin request/response buffer in bytes",
             reset_from="nic.admin_buffer_size"),
    # Control and status
    Register("CTRL", 0x100, Access.RW, _CS, "Card control (Ctrl)", fields=Ctrl),
    Register("STATUS", 0x104, Access.RO, _CS, "Card status (Status)", reset=Status.READY, fields=Status),
    Register("ERR_CODE", 0x108, Access.RO, _CS, "Last error (ErrCode); cleared by reset"),
    Register("ERR_INFO", 0x10C, Access.RO, _CS, "Detail for ERR_CODE"),
    Register("MTU", 0x110, Access.RW, _CS, "Current MTU; writes outside 68..MAX_MTU are refused (BAD_MTU)",
             reset_from="nic.mtu"),
    Register("SCRATCH", 0x114, Access.RW, _CS, "Free for the driver; no effect"),
    # Interrupts
    Register("ICR", 0x200, Access.W1C, _INT, "Interrupt causes (Cause); write 1 to clear", fields=Cause),
    Register("ICS", 0x204, Access.WO, _INT, "Write 1 to set a cause (software interrupt)", fields=Cause),
    Register("IMS", 0x208, Access.W1S, _INT, "Interrupt mask: write 1 to enable a cause; reads the mask",
             fields=Cause),
    Register("IMC", 0x20C, Access.WO, _INT, "Write 1 to disable a cause", fields=Cause),
    Register("ITR", 0x210, Access.RW, _INT, "Minimum gap between interrupts of one vector, microseconds "
             "(0 = none, max 65535)"),
    Register("IVAR", 0x220, Access.RW, _INT, "MSI-X map: byte k of IVAR[n] routes cause bit 4n+k; "
             "bits 6:0 vector, bit 7 valid", count=8, stride=4, resets=_default_ivar()),
    # Admin queue (same register shape as a data ring)
    *(
        Register(f"AQ_{suffix}", 0x300 + rel, access, _AQ, description.replace("2..max", "2..AQ_MAX_LEN"),
                 fields=QueueCtrl if suffix == "CTRL" else None)
        for suffix, rel, access, description in _RING_REGS
    ),
    *_stats_registers(),
    *_ring_registers("TXQ", TXQ_BASE, Block.TXQ, MAX_QUEUES),
    *_ring_registers("RXQ", RXQ_BASE, Block.RXQ, MAX_QUEUES),
)

# The mirror BAR's registers (offsets within BAR4). The card writes each one whenever its source
# changes; reading one never clears or latches anything (ICR is cleared only by writing ICR in BAR0).
# Entries of queues the card lacks read 0.
MIRRORS: tuple[Register, ...] = (
    Register("M_STATUS", 0x00, Access.RO, Block.MIRROR, "Mirror of STATUS", reset=Status.READY, fields=Status),
    Register("M_ICR", 0x04, Access.RO, Block.MIRROR,
             "Mirror of ICR: pending causes; reading clears nothing (write ICR to clear)", fields=Cause),
    Register("M_ERR_CODE", 0x08, Access.RO, Block.MIRROR, "Mirror of ERR_CODE"),
    Register("M_ERR_INFO", 0x0C, Access.RO, Block.MIRROR, "Mirror of ERR_INFO"),
    Register("M_AQ_HEAD", 0x10, Access.RO, Block.MIRROR, "Mirror of AQ_HEAD"),
    Register("M_TXQ_HEAD", MIRROR_TXQ_HEAD_BASE, Access.RO, Block.MIRROR, "Mirror of TXQ_HEAD[n]",
             count=MAX_QUEUES, stride=4),
    Register("M_RXQ_HEAD", MIRROR_RXQ_HEAD_BASE, Access.RO, Block.MIRROR, "Mirror of RXQ_HEAD[n]",
             count=MAX_QUEUES, stride=4),
)
MIRROR_BY_NAME: dict[str, Register] = {r.name: r for r in MIRRORS}

REGISTER_BY_NAME: dict[str, Register] = {r.name: r for r in REGISTERS}


def _expand() -> dict[int, tuple[Register, int]]:
    table: dict[int, tuple[Register, int]] = {}
    for reg in REGISTERS:
        for i in range(reg.count):
            offset = reg.element_offset(i)
            if offset in table:
                raise AssertionError(f"register {reg.name}[{i}] overlaps {table[offset][0].name}")
            if offset % 4 or offset + 4 > BAR0_SIZE:
                raise AssertionError(f"register {reg.name}[{i}] misplaced at {offset:#x}")
            table[offset] = (reg, i)
    return table


# Every implemented register offset -> (definition, array index).
REGISTER_AT: dict[int, tuple[Register, int]] = _expand()


def reg(name: str) -> int:
    """Offset of a scalar register by name (``reg("CTRL") == 0x100``)."""
    return REGISTER_BY_NAME[name].offset


# Register offsets by name (arrays: element 0; use txq_reg()/rxq_reg() or Register.element_offset()).
# Derived from REGISTERS, spelled out so readers, linters and the C header generator see every name.
ID = reg("ID")
REGMAP_VERSION = reg("REGMAP_VERSION")
HW_VERSION = reg("HW_VERSION")
FW_VERSION = reg("FW_VERSION")
FEATURES = reg("FEATURES")
SA_CAPACITY = reg("SA_CAPACITY")
ENC_ALGOS = reg("ENC_ALGOS")
AUTH_ALGOS = reg("AUTH_ALGOS")
UDP_ESP = reg("UDP_ESP")
MAX_REPLAY_WINDOW = reg("MAX_REPLAY_WINDOW")
NUM_TXQ = reg("NUM_TXQ")
NUM_RXQ = reg("NUM_RXQ")
MAX_RING_SIZE = reg("MAX_RING_SIZE")
NUM_MSIX = reg("NUM_MSIX")
MAC_LO = reg("MAC_LO")
MAC_HI = reg("MAC_HI")
MAX_MTU = reg("MAX_MTU")
AQ_MAX_LEN = reg("AQ_MAX_LEN")
AQ_MAX_BUF = reg("AQ_MAX_BUF")
CTRL = reg("CTRL")
STATUS = reg("STATUS")
ERR_CODE = reg("ERR_CODE")
ERR_INFO = reg("ERR_INFO")
MTU = reg("MTU")
SCRATCH = reg("SCRATCH")
ICR = reg("ICR")
ICS = reg("ICS")
IMS = reg("IMS")
IMC = reg("IMC")
ITR = reg("ITR")
IVAR = reg("IVAR")
AQ_BASE_LO = reg("AQ_BASE_LO")
AQ_BASE_HI = reg("AQ_BASE_HI")
AQ_LEN = reg("AQ_LEN")
AQ_HEAD = reg("AQ_HEAD")
AQ_TAIL = reg("AQ_TAIL")
AQ_CTRL = reg("AQ_CTRL")
TX_PACKETS_LO = reg("TX_PACKETS_LO")
TX_PACKETS_HI = reg("TX_PACKETS_HI")
TX_BYTES_LO = reg("TX_BYTES_LO")
TX_BYTES_HI = reg("TX_BYTES_HI")
RX_PACKETS_LO = reg("RX_PACKETS_LO")
RX_PACKETS_HI = reg("RX_PACKETS_HI")
RX_BYTES_LO = reg("RX_BYTES_LO")
RX_BYTES_HI = reg("RX_BYTES_HI")
TX_CRYPTO_OK_LO = reg("TX_CRYPTO_OK_LO")
TX_CRYPTO_OK_HI = reg("TX_CRYPTO_OK_HI")
RX_CRYPTO_OK_LO = reg("RX_CRYPTO_OK_LO")
RX_CRYPTO_OK_HI = reg("RX_CRYPTO_OK_HI")
RX_AUTH_FAIL_LO = reg("RX_AUTH_FAIL_LO")
RX_AUTH_FAIL_HI = reg("RX_AUTH_FAIL_HI")
RX_REPLAY_DROP_LO = reg("RX_REPLAY_DROP_LO")
RX_REPLAY_DROP_HI = reg("RX_REPLAY_DROP_HI")
RX_NO_BUFFER_LO = reg("RX_NO_BUFFER_LO")
RX_NO_BUFFER_HI = reg("RX_NO_BUFFER_HI")
TX_OFFLOAD_ERROR_LO = reg("TX_OFFLOAD_ERROR_LO")
TX_OFFLOAD_ERROR_HI = reg("TX_OFFLOAD_ERROR_HI")
BAD_DESCRIPTOR_LO = reg("BAD_DESCRIPTOR_LO")
BAD_DESCRIPTOR_HI = reg("BAD_DESCRIPTOR_HI")
DMA_ERROR_LO = reg("DMA_ERROR_LO")
DMA_ERROR_HI = reg("DMA_ERROR_HI")
RX_POLICY_DROP_LO = reg("RX_POLICY_DROP_LO")
RX_POLICY_DROP_HI = reg("RX_POLICY_DROP_HI")
TXQ_BASE_LO = reg("TXQ_BASE_LO")
TXQ_BASE_HI = reg("TXQ_BASE_HI")
TXQ_LEN = reg("TXQ_LEN")
TXQ_HEAD = reg("TXQ_HEAD")
TXQ_TAIL = reg("TXQ_TAIL")
TXQ_CTRL = reg("TXQ_CTRL")
RXQ_BASE_LO = reg("RXQ_BASE_LO")
RXQ_BASE_HI = reg("RXQ_BASE_HI")
RXQ_LEN = reg("RXQ_LEN")
RXQ_HEAD = reg("RXQ_HEAD")
RXQ_TAIL = reg("RXQ_TAIL")
RXQ_CTRL = reg("RXQ_CTRL")
# Mirror BAR offsets (BAR4).
M_STATUS = MIRROR_BY_NAME["M_STATUS"].offset
M_ICR = MIRROR_BY_NAME["M_ICR"].offset
M_ERR_CODE = MIRROR_BY_NAME["M_ERR_CODE"].offset
M_ERR_INFO = MIRROR_BY_NAME["M_ERR_INFO"].offset
M_AQ_HEAD = MIRROR_BY_NAME["M_AQ_HEAD"].offset
M_TXQ_HEAD = MIRROR_BY_NAME["M_TXQ_HEAD"].offset
M_RXQ_HEAD = MIRROR_BY_NAME["M_RXQ_HEAD"].offset


def mirror_sources(tx_queues: int = MAX_QUEUES, rx_queues: int = MAX_QUEUES) -> dict[int, int]:
    """BAR0 offset of a source register -> BAR4 offset of its mirror (the card keeps them equal)."""
    pairs = {STATUS: M_STATUS, ICR: M_ICR, ERR_CODE: M_ERR_CODE, ERR_INFO: M_ERR_INFO, AQ_HEAD: M_AQ_HEAD}
    for q in range(tx_queues):
        pairs[TXQ_BASE + q * QUEUE_STRIDE + QREG_HEAD] = MIRROR_TXQ_HEAD_BASE + 4 * q
    for q in range(rx_queues):
        pairs[RXQ_BASE + q * QUEUE_STRIDE + QREG_HEAD] = MIRROR_RXQ_HEAD_BASE + 4 * q
    return pairs


def txq_reg(queue: int, rel: int) -> int:
    """Offset of TX queue ``queue``'s register ``rel`` (a QREG_* value)."""
    return TXQ_BASE + queue * QUEUE_STRIDE + rel


def rxq_reg(queue: int, rel: int) -> int:
    return RXQ_BASE + queue * QUEUE_STRIDE + rel


ADMINQ_BASE = 0x300


def stat_offset(name: str) -> int:
    """Offset of the LO half of statistics counter ``name`` (e.g. "RX_AUTH_FAIL")."""
    for i, (stat, _) in enumerate(STATISTICS):
        if stat == name:
            return STATS_BASE + 8 * i
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Descriptor layouts (little-endian, precompiled)
# ---------------------------------------------------------------------------------------------


class AdminFlags(DocFlag):
    """Admin descriptor ``flags``."""

    DONE = 1 << 0, "Card: command finished, write-back fields valid"
    ERROR = 1 << 1, "Card: status != OK"
    INTERRUPT = 1 << 8, "Driver: raise the ADMINQ cause when this command completes"


class AdminStatus(enum.IntEnum):
    """Admin descriptor ``status``: the card's verdict on the descriptor itself.

    The firmware's answer to the command (an NDIS status) is in ``fw_status``; it is valid when
    status is OK or RESPONSE_TRUNCATED.
    """

    OK = 0
    DMA_ERROR = 1  # request or response buffer not reachable
    REQUEST_TOO_LONG = 2  # req_len > AQ_MAX_BUF
    RESPONSE_TRUNCATED = 3  # the response did not fit resp_len; resp_len says how long it was
    BAD_DESCRIPTOR = 4  # reserved fields or flags not zero
    FIRMWARE_FAULT = 5  # the firmware failed internally


ADMIN_DESC = Layout(
    "AdminDesc",
    "",
    (
        ("opcode", "H", "Command (firmware opcode; see Admin commands)"),
        ("flags", "H", "AdminFlags: DONE/ERROR written by the card, INTERRUPT by the driver"),
        ("status", "H", "Write-back: AdminStatus"),
        ("reserved0", "H", "Zero"),
        ("fw_status", "I", "Write-back: firmware status (NDIS_STATUS value)"),
        ("req_len", "I", "Request buffer length in bytes (0 = no request buffer)"),
        ("req_addr", "Q", "Request buffer guest address"),
        ("resp_addr", "Q", "Response buffer guest address"),
        ("resp_len", "I", "Driver: response buffer capacity; write-back: response length"),
        ("reserved1", "I", "Zero"),
        ("cookie", "Q", "Opaque to the card, left unchanged"),
        ("reserved2", "Q", "Zero"),
        ("reserved3", "Q", "Zero"),
    ),
)


class TxFlags(DocFlag):
    """TX descriptor ``flags`` (driver-written)."""

    EOP = 1 << 0, "End of packet: last descriptor of a frame"
    IPSEC_CRYPTO = 1 << 1, "Crypto offload: encrypt/ICV the ESP the host built, with SA offload_handle"
    IPSEC_PACKET = 1 << 2, "Packet offload: encapsulate the IP packet with SA offload_handle"
    REPORT_STATUS = 1 << 3, "Write back wb_flags/wb_status and raise TXn when done"
    SEQ_HI = 1 << 4, "Crypto offload, ESN SA: seq_hi is this frame's ESN high half (else the SA's, UPDATE_SA)"


class TxWbFlags(DocFlag):
    """TX descriptor ``wb_flags`` (card-written)."""

    DONE = 1 << 0, "The card finished with this descriptor (DD)"


class TxStatus(enum.IntEnum):
    """TX descriptor ``wb_status``."""

    OK = 0
    DMA_ERROR = 1  # buffer not reachable
    BAD_LENGTH = 2  # zero length, or frame longer than MTU + Ethernet header
    BAD_HANDLE = 3  # offload_handle unknown, stale, or not an outbound SA
    OFFLOAD_FAILED = 4  # the firmware refused the packet (malformed ESP, sequence overflow, limit)
    BAD_DESCRIPTOR = 5  # reserved bits set, or both IPSEC flags


TX_DESC = Layout(
    "TxDesc",
    "",
    (
        ("addr", "Q", "Buffer guest address"),
        ("length", "H", "Bytes in the buffer"),
        ("flags", "H", "TxFlags"),
        ("offload_handle", "I", "SA handle for IPSEC_* (0 = none)"),
        ("esp_offset", "H", "Crypto offload: ESP header offset from the frame start"),
        ("pad_length", "B", "Crypto offload: ESP pad length the host used"),
        ("next_header", "B", "Crypto offload: ESP next header"),
        ("tunnel_handle", "I", "Crypto offload: outer (tunnel) SA for transport-over-tunnel, else 0"),
        ("wb_status", "H", "Write-back: TxStatus"),
        ("wb_flags", "H", "Write-back: TxWbFlags"),
        ("seq_hi", "I", "With SEQ_HI: ESN high 32 bits for this frame (RFC 4304), first descriptor only; else zero"),
    ),
)


class RxWbFlags(DocFlag):
    """RX descriptor ``wb_flags`` (card-written). Names and meaning follow the NDIS receive metadata."""

    DD = 1 << 0, "Descriptor done: the card filled this buffer"
    EOP = 1 << 1, "End of packet (always set: a frame never spans buffers)"
    SA_DELETE_REQ = 1 << 2, "The card asks the host to delete this inbound SA and its outbound pair"
    CRYPTO_DONE = 1 << 3, "At least one IPsec payload was checked; crypto_status is valid"
    NEXT_CRYPTO_DONE = 1 << 4, "Both tunnel and transport payloads were checked"
    HEADER_INFO = 1 << 5, "next_header and pad_length are valid"
    DECAPSULATED = 1 << 6, "Packet offload removed the ESP (and tunnel/UDP) headers"
    ERROR = 1 << 7, "Frame truncated to buf_len (length is the original size)"
    L4_CSUM_OK = 1 << 8, ("The inner TCP/UDP checksum needs no check: transport-mode UDP-ESP whose ICV verified "
                          "(RFC 3948 §3.1.2; packet offload also rewrote it)")
    POLICY_MISMATCH = 1 << 9, ("Crypto offload: an authentic frame outside its SA's filter/selector, indicated "
                               "unprocessed as received (CRYPTO_DONE clear, handle 0)")


RX_DESC = Layout(
    "RxDesc",
    "",
    (
        ("addr", "Q", "Buffer guest address"),
        ("buf_len", "H", "Buffer size in bytes"),
        ("reserved0", "H", "Zero"),
        ("length", "H", "Write-back: frame length"),
        ("wb_flags", "H", "Write-back: RxWbFlags"),
        ("crypto_status", "H", "Write-back: CryptoStatus"),
        ("reserved1", "H", "Zero"),
        ("offload_handle", "I", "Write-back: handle of the inbound SA that matched (0 = none)"),
        ("next_header", "B", "Write-back: ESP next header (HEADER_INFO)"),
        ("pad_length", "B", "Write-back: ESP pad length (HEADER_INFO)"),
        ("reserved2", "H", "Zero"),
        ("next_offload_handle", "I", "Write-back: inner (transport) SA of a transport-over-tunnel frame, valid "
                                     "with NEXT_CRYPTO_DONE, else 0 (REGMAP 1.1; was reserved, not checked)"),
    ),
)

LAYOUTS: tuple[Layout, ...] = (ADMIN_DESC, TX_DESC, RX_DESC)
# The descriptors as records (what ``LAYOUT.unpack`` returns); each ends with its declared size.
AdminDescRecord = wire_class(ADMIN_DESC, "AdminDesc", module=__name__)
TxDescRecord = wire_class(TX_DESC, "TxDesc", module=__name__)
RxDescRecord = wire_class(RX_DESC, "RxDesc", module=__name__)
assert [d.size for d in LAYOUTS] == [64, 32, 32]


# ---------------------------------------------------------------------------------------------
# Datasheet tables
# ---------------------------------------------------------------------------------------------

DATASHEET_BEGIN = "<!-- BEGIN GENERATED from device/contract/regs.py: datasheet_tables() -->"
DATASHEET_END = "<!-- END GENERATED -->"


def _offset_text(r: Register) -> str:
    if r.count == 1:
        return f"0x{r.offset:04X}"
    return f"0x{r.offset:04X} + 0x{r.stride:X}·n, n = 0..{r.count - 1}"


def _reset_text(r: Register) -> str:
    if r.reset_from:
        return f"from {r.reset_from}"
    if r.resets:
        return "see below"
    return f"0x{r.reset:08X}"


def _fields_table(flags: type[DocFlag]) -> list[str]:
    lines = ["| Bits | Name | Meaning |", "|---|---|---|"]
    for name, member in flags.__members__.items():
        value = int(member)
        if not value:
            continue  # a zero member (NONE) names no bit
        low = (value & -value).bit_length() - 1
        high = value.bit_length() - 1
        bits = str(low) if low == high else f"{high}:{low}"
        lines.append(f"| {bits} | {name} | {member.doc} |")
    return lines


def _enum_table(e: type[enum.IntEnum]) -> list[str]:
    lines = ["| Value | Name |", "|---|---|"]
    lines += [f"| 0x{int(m):X} | {m.name} |" for m in e]
    return lines


def datasheet_tables() -> str:
    """The register map, bit fields and descriptor layouts as Markdown (the datasheet's generated part)."""
    out: list[str] = []
    out.append(f"BAR0 is {BAR0_SIZE // 1024} KiB; all registers are 32-bit, little-endian. "
               f"Register map version {decode_version(REGMAP_VERSION_VALUE)}.")
    for block in Block:
        regs_in_block = [r for r in (*REGISTERS, *MIRRORS) if r.block is block]
        out += ["", f"### {block.value}", ""]
        if block is Block.MIRROR:
            out += [f"BAR{MIRROR_BAR}, {MIRROR_BAR_SIZE // 1024} KiB, offsets within it (§2, *The mirror BAR*):",
                    ""]
        out += ["| Offset | Name | Access | Reset | Description |", "|---|---|---|---|---|"]
        for r in regs_in_block:
            out.append(f"| {_offset_text(r)} | {r.name} | {r.access.value} | {_reset_text(r)} | "
                       f"{r.description} |")
    out += ["", "### Ring register block", "",
            "Admin queue at 0x0300, TX queue n at 0x1000 + 0x40·n, RX queue n at 0x2000 + 0x40·n:", "",
            "| Offset | Register | Access | Description |", "|---|---|---|---|"]
    out += [f"| +0x{rel:02X} | {name} | {access.value} | {description} |"
            for name, rel, access, description in _RING_REGS]
    out += ["", "IVAR reset values (n = 0..7): " + ", ".join(
        f"0x{v:08X}" for v in REGISTER_BY_NAME["IVAR"].resets) + "."]
    out += ["", "### Bit fields"]
    seen: set[type[DocFlag]] = set()
    for r in (*REGISTERS, *MIRRORS):
        if r.fields is not None and r.fields not in seen:
            seen.add(r.fields)
            users = [x.name for x in (*REGISTERS, *MIRRORS) if x.fields is r.fields]
            out += ["", f"#### {', '.join(dict.fromkeys(users))} ({r.fields.__name__})", ""]
            out += _fields_table(r.fields)
    for title, e in (("CTRL.INT_MODE (IntMode)", IntMode), ("ERR_CODE (ErrCode)", ErrCode),
                     ("ERR_INFO ring id (QueueId, plus the index in bits 7:0)", QueueId)):
        out += ["", f"#### {title}", ""] + _enum_table(e)
    out += ["", "### Descriptor layouts"]
    for layout in LAYOUTS:
        out += ["", f"#### {layout.name} ({layout.size} bytes)", "", "| Offset | Size | Field | Meaning |",
                "|---|---|---|---|"]
        out += [f"| {f.offset} | {f.size} | {f.name} | {f.desc} |" for f in layout.fields]
    for flags in (AdminFlags, TxFlags, TxWbFlags, RxWbFlags):
        out += ["", f"#### {flags.__name__}", ""] + _fields_table(flags)
    for title, e in (("AdminStatus", AdminStatus), ("TxStatus", TxStatus), ("CryptoStatus", CryptoStatus)):
        out += ["", f"#### {title}", ""] + _enum_table(e)
    return "\n".join(out) + "\n"


def datasheet_section() -> str:
    """The generated block exactly as it appears in docs/datasheet.md, markers included."""
    return f"{DATASHEET_BEGIN}\n{datasheet_tables()}{DATASHEET_END}\n"


def replace_datasheet_section(text: str) -> str:
    """``text`` (docs/datasheet.md) with its generated block replaced by the current tables."""
    start = text.index(DATASHEET_BEGIN)
    end = text.index(DATASHEET_END, start) + len(DATASHEET_END)
    if text[end : end + 1] == "\n":
        end += 1
    return text[:start] + datasheet_section() + text[end:]


if __name__ == "__main__":
    # python -m device.contract.regs docs/datasheet.md   -> rewrite the generated block in place
    import sys

    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            updated = replace_datasheet_section(f.read())
        with open(path, "w", encoding="utf-8") as f:
            f.write(updated)
