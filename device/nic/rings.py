"""Descriptor-ring helpers shared by the admin queue, TX and RX engines.

The ring registers live in the register file (device/nic/card.py ``Ring``: BASE/LEN are fixed while
the ring is enabled and checked when it is enabled; HEAD is card-owned; TAIL is the doorbell). As in
igb (QEMU hw/net/igb_core.c ``igb_ring_empty``/``igb_ring_advance``) a ring is empty when
HEAD == TAIL and the card owns descriptors HEAD .. TAIL-1.

Descriptors are fetched in contiguous blocks (one DMA read up to the end of the ring or of the
driver's work, whichever comes first) instead of one read per descriptor.
"""

from __future__ import annotations

from typing import Protocol

from device.contract import regs
from device.vfio_user.device_api import DmaAccess

# Index of each statistics counter (regs.STATISTICS order = card.Stat values = register order).
STAT: dict[str, int] = {name: i for i, (name, _) in enumerate(regs.STATISTICS)}


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


def fetch_block(dma: DmaAccess, base: int, size: int, head: int, count: int, desc_size: int) -> tuple[bytes, int]:
    """Read up to ``count`` descriptors from ``head`` without wrapping: (bytes, descriptors read).
    Raises DmaError if the ring memory is unreachable."""
    n = min(count, size - head)
    return dma.read(base + head * desc_size, n * desc_size), n
