"""Descriptor-ring helpers shared by the admin queue, TX and RX engines.

The ring registers live in the register file (device/nic/card.py ``Ring``: BASE/LEN are fixed while
the ring is enabled and checked when it is enabled; HEAD is card-owned; TAIL is the doorbell). As in
igb (QEMU hw/net/igb_core.c ``igb_ring_empty``/``igb_ring_advance``) a ring is empty when
HEAD == TAIL and the card owns descriptors HEAD .. TAIL-1.

Descriptors are fetched in contiguous blocks (one DMA read up to the end of the ring or of the
driver's work, whichever comes first) instead of one read per descriptor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

from device.contract import regs
from device.nic.dma_pass import READ, Pass

# Index of each statistics counter (regs.STATISTICS order = card.Stat values = register order).
STAT: dict[str, int] = {name: i for i, (name, _) in enumerate(regs.STATISTICS)}

# Statistics counter indices (card.Stat order).
TX_PACKETS, TX_BYTES = STAT["TX_PACKETS"], STAT["TX_BYTES"]
RX_PACKETS, RX_BYTES = STAT["RX_PACKETS"], STAT["RX_BYTES"]
TX_CRYPTO_OK, RX_CRYPTO_OK = STAT["TX_CRYPTO_OK"], STAT["RX_CRYPTO_OK"]
RX_AUTH_FAIL, RX_REPLAY_DROP = STAT["RX_AUTH_FAIL"], STAT["RX_REPLAY_DROP"]
RX_NO_BUFFER, TX_OFFLOAD_ERROR = STAT["RX_NO_BUFFER"], STAT["TX_OFFLOAD_ERROR"]
BAD_DESCRIPTOR, DMA_ERROR = STAT["BAD_DESCRIPTOR"], STAT["DMA_ERROR"]

# The register file keeps every register in one array indexed by offset / 4 (card.NicCard.mem); the
# engines' hot paths read it directly instead of going through enum-typed properties.
CTRL_AT = regs.CTRL >> 2
STATUS_AT = regs.STATUS >> 2
ICR_AT = regs.ICR >> 2
MTU_AT = regs.MTU >> 2
ENABLED = int(regs.Status.ENABLED)
Q_BASE_LO, Q_BASE_HI, Q_LEN = regs.QREG_BASE_LO >> 2, regs.QREG_BASE_HI >> 2, regs.QREG_LEN >> 2
Q_HEAD, Q_TAIL, Q_CTRL = regs.QREG_HEAD >> 2, regs.QREG_TAIL >> 2, regs.QREG_CTRL >> 2
Q_ENABLE = int(regs.QueueCtrl.ENABLE)
SA_DELETE_CAUSE = int(regs.Cause.SA_DELETE_REQ)


class RingRegs(Protocol):
    """What the engines need from a ring's register block (card.Ring implements it)."""

    index: int

    @property
    def base_address(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def head(self) -> int: ...

    @property
    def tail(self) -> int: ...

    @property
    def enabled(self) -> bool: ...

    @property
    def queue_id(self) -> int: ...

    def set_head(self, value: int) -> None: ...


class QueueEvents(Protocol):
    """What a queue engine reports back to its card (the data path implements it)."""

    def count(self, stat: int, amount: int = 1) -> None: ...

    def dma_fault(self, queue_id: int) -> None: ...

    def set_cause(self, bits: int) -> None: ...

    def report_error(self, code: regs.ErrCode, info: int = 0) -> None: ...


def fetch_block(base: int, size: int, head: int, count: int, desc_size: int) -> Pass:
    """Read up to ``count`` descriptors from ``head`` without wrapping (``yield from``, a DMA pass step):
    (bytes, descriptors read). Raises DmaError if the ring memory is unreachable."""
    n = min(count, size - head)
    return (yield READ, base + head * desc_size, n * desc_size), n


@dataclass
class DatapathStats:
    """Diagnostics beyond the statistics registers (ipsec-nic serve logs them; tests read them)."""

    no_bus_master: int = 0  # passes skipped because COMMAND.BUS_MASTER was clear
    rx_not_enabled: int = 0  # frames that arrived while CTRL.ENABLE was clear
    rx_filtered: int = 0  # frames for another MAC (not PROMISC)
    rx_runts: int = 0  # frames shorter than an Ethernet header
    rx_backlogged: int = 0  # frames that had to wait for an RX descriptor
    rx_discarded: int = 0  # dummy packets discarded by packet offload
    tx_not_sent: int = 0  # frames the wire could not take (peer absent, link down)
    admin_commands: int = 0
    dma_messages: int = 0  # DMA accesses sent as vfio-user DMA_READ/DMA_WRITE (guest RAM not shared)
    passes_abandoned: int = 0  # passes waiting for message DMA dropped by a reset, ring disable or detach

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
