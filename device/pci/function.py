"""A PCI Express function served over vfio-user: config space + BAR handlers + interrupts.

:class:`PciFunction` implements the library's :class:`VfioUserDevice` contract. It owns the config
space model (device/pci/config_space.py) and dispatches BAR accesses to :class:`BarHandler` objects;
the NIC (device/nic/card.py) is one such handler and raises interrupts through
:meth:`PciFunction.raise_interrupt`.

Access rules (the same for every BAR): an access of 1, 2, 4 or 8 bytes goes to the handler in one
call; any other length is split into naturally aligned pieces of at most 4 bytes. An access that is
not fully inside the region, or to an absent region, is answered with EINVAL.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from device.pci import capabilities as caps
from device.pci.config_space import (
    COMMAND,
    CONFIG_SPACE_SIZE,
    STATUS,
    BarLayout,
    BarType,
    CapabilityId,
    Command,
    ConfigSpace,
    StatusBits,
)
from device.vfio_user.device_api import (
    IRQ_ERR,
    IRQ_INTX,
    IRQ_MSI,
    IRQ_MSIX,
    IRQ_REQ,
    NUM_PCI_IRQS,
    NUM_PCI_REGIONS,
    REGION_CONFIG,
    DeviceContext,
    IrqInfo,
    RegionInfo,
    VfioUserError,
)


class BarHandler(Protocol):
    """What a BAR's contents implement. Offsets are relative to the BAR; size is 1, 2, 4 or 8."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class PciIds:
    vendor_id: int
    device_id: int
    subsystem_vendor_id: int
    subsystem_id: int
    class_code: int
    revision: int


class MsixBar:
    """BAR contents holding the MSI-X table and PBA (QEMU emulates the table itself; this backs
    direct accesses and answers PBA reads, PCI 3.0 §6.8.2.9)."""

    def __init__(self, function: PciFunction, vectors: int, table_offset: int, pba_offset: int) -> None:
        self.function = function
        self.vectors = vectors
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.table = bytearray(caps.msix_table_bytes(vectors))
        self.reset()

    def reset(self) -> None:
        self.table[:] = bytes(len(self.table))
        for v in range(self.vectors):
            self.table[v * caps.MSIX_ENTRY_SIZE + 12] = 1  # vector control: masked at reset (§6.8.2.9)

    def read(self, offset: int, size: int) -> int:
        rel = offset - self.table_offset
        if rel >= 0 and rel + size <= len(self.table):
            return int.from_bytes(self.table[rel : rel + size], "little")
        rel = offset - self.pba_offset
        if 0 <= rel < caps.msix_pba_bytes(self.vectors):
            return (self.function.msix_pending >> (8 * rel)) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        rel = offset - self.table_offset
        if rel >= 0 and rel + size <= len(self.table) and size in (4, 8) and rel % 4 == 0:
            self.table[rel : rel + size] = value.to_bytes(size, "little")
        # PBA and anything else: read-only, writes ignored (QEMU drops PBA writes too)


class PciFunction:
    """A single PCIe Endpoint function: the VfioUserDevice the vfio-user server serves."""

    num_regions = NUM_PCI_REGIONS
    num_irqs = NUM_PCI_IRQS
    supports_reset = True

    def __init__(
        self,
        ids: PciIds,
        bars: dict[int, tuple[BarLayout, BarHandler]],
        msix_vectors: int,
        msix_bar: int = 2,
        msix_table_offset: int = 0,
        msix_pba_offset: int = 0x800,
        serial_number: int | None = None,
        interrupt_pin: int = 1,
    ) -> None:
        self.ids = ids
        self.config = ConfigSpace(CONFIG_SPACE_SIZE)
        self.config.define_header(
            ids.vendor_id, ids.device_id, ids.class_code, ids.revision, ids.subsystem_vendor_id,
            ids.subsystem_id, interrupt_pin,
        )
        self.bar_layouts: dict[int, BarLayout] = {}
        self.handlers: dict[int, BarHandler] = {}
        for layout, handler in bars.values():
            self._add_bar(layout, handler)
        self.msix_vectors = msix_vectors
        self.msix_pending = 0  # PBA bits: vectors raised while function-masked
        if msix_vectors:
            table_end = msix_table_offset + caps.msix_table_bytes(msix_vectors)
            pba_end = msix_pba_offset + caps.msix_pba_bytes(msix_vectors)
            if msix_table_offset < pba_end and msix_pba_offset < table_end:
                raise ValueError(f"{msix_vectors} MSI-X vectors: table overlaps the PBA at {msix_pba_offset:#x}")
            bar_size = self.bar_layouts[msix_bar].size if msix_bar in self.bar_layouts else 0
            end = max(msix_table_offset + caps.msix_table_bytes(msix_vectors),
                      msix_pba_offset + caps.msix_pba_bytes(msix_vectors))
            if msix_bar not in self.bar_layouts:
                # The table BAR is owned by us: size it to hold table + PBA (at least 4 KiB).
                size = max(4096, 1 << (end - 1).bit_length())
                self._add_bar(BarLayout(msix_bar, size, BarType.MEM32),
                              MsixBar(self, msix_vectors, msix_table_offset, msix_pba_offset))
            elif end > bar_size:
                raise ValueError(f"MSI-X table/PBA ({end:#x} bytes) do not fit BAR{msix_bar}")
        self.config.add_capability(caps.power_management())
        self.pm_offset = self.config.capabilities[CapabilityId.POWER_MANAGEMENT]
        self.msix_offset: int | None = None
        if msix_vectors:
            self.msix_offset = self.config.add_capability(
                caps.msix(msix_vectors, msix_bar, msix_table_offset, msix_pba_offset))
        self.pcie_offset = self.config.add_capability(caps.pci_express(flr=True))
        if serial_number is not None:
            self.config.add_capability(caps.device_serial_number(serial_number))
        self.config.add_write_hook(COMMAND, 2, self._command_written)
        self.config.add_write_hook(self.pm_offset + caps.PM_PMCSR, 2, self._pmcsr_written)
        if self.msix_offset is not None:
            self.config.add_write_hook(self.msix_offset + caps.MSIX_CONTROL, 2, self._msix_control_written)
        self.config.add_write_hook(self.pcie_offset + caps.PCIE_DEVCTL, 2, self._devctl_written)
        self.ctx: DeviceContext | None = None
        self.intx_asserted = False
        self.interrupts_lost = 0  # raised while nothing could deliver them (no eventfd)
        self.bad_accesses = 0
        self.reset_listeners: list[Callable[[], None]] = []

    def _add_bar(self, layout: BarLayout, handler: BarHandler) -> None:
        if layout.index in self.bar_layouts:
            raise ValueError(f"BAR{layout.index} defined twice")
        self.bar_layouts[layout.index] = layout
        self.handlers[layout.index] = handler
        self.config.define_bar(layout)

    # ----- VfioUserDevice -----

    def region_info(self, index: int) -> RegionInfo:
        if index in self.bar_layouts:
            # A BAR whose handler keeps side-effect-free pages in a shared file offers them for mmap
            # (vfio sparse mmap: the client traps everything else as before).
            shared = getattr(self.handlers[index], "shared_mapping", None)
            mapping = shared() if shared is not None else None
            if mapping is not None:
                fd, areas = mapping
                return RegionInfo(size=self.bar_layouts[index].size, mmap_fd=fd, sparse_areas=areas)
            return RegionInfo(size=self.bar_layouts[index].size)
        if index == REGION_CONFIG:
            return RegionInfo(size=self.config.size)
        if 0 <= index < self.num_regions:
            return RegionInfo(size=0, readable=False, writable=False)  # absent BAR, no ROM, no VGA
        raise VfioUserError(errno.EINVAL, f"no region {index}")

    def irq_info(self, index: int) -> IrqInfo:
        if index == IRQ_INTX:
            # vfio's INTx contract: the trigger auto-masks until the client unmasks (level emulation)
            return IrqInfo(count=1, maskable=True, automasked=True)
        if index == IRQ_MSI:
            return IrqInfo(count=0)
        if index == IRQ_MSIX:
            return IrqInfo(count=self.msix_vectors)
        if index in (IRQ_ERR, IRQ_REQ):
            return IrqInfo(count=1)
        raise VfioUserError(errno.EINVAL, f"no irq index {index}")

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == REGION_CONFIG:
            self._check_range(index, offset, count, self.config.size)
            return self.config.read(offset, count)
        handler = self._handler(index, offset, count)
        out = bytearray()
        for at, size in _pieces(offset, count):
            value = handler.read(at, size)
            out += (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == REGION_CONFIG:
            self._check_range(index, offset, len(data), self.config.size)
            self.config.write(offset, bytes(data))
            return
        handler = self._handler(index, offset, len(data))
        for at, size in _pieces(offset, len(data)):
            rel = at - offset
            handler.write(at, size, int.from_bytes(data[rel : rel + size], "little"))

    def region_access(self, index: int) -> tuple[Callable[[int, int], int], Callable[[int, int, int], None]] | None:
        """The BAR handler's own ``read``/``write`` for region ``index`` (None for config space or an absent
        BAR). An access of 1, 2, 4 or 8 bytes fully inside the BAR goes to them in one call (module
        docstring), so a caller that checked that may skip region_read/region_write's bytes conversions."""
        handler = self.handlers.get(index)
        return None if handler is None else (handler.read, handler.write)

    def reset(self) -> None:
        """DEVICE_RESET (QEMU system reset) and FLR: config space and every BAR back to reset state."""
        self.config.reset()
        self.msix_pending = 0
        self.intx_asserted = False
        for handler in self.handlers.values():
            handler.reset()
        for listener in self.reset_listeners:
            listener()

    def attached(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        for handler in self.handlers.values():
            hook = getattr(handler, "attached", None)
            if hook is not None:
                hook(ctx)

    def detached(self) -> None:
        self.ctx = None
        for handler in self.handlers.values():
            hook = getattr(handler, "detached", None)
            if hook is not None:
                hook()

    def irq_unmasked(self, index: int, vector: int = 0) -> None:
        """The client unmasked an irq (SET_IRQS UNMASK): re-signal INTx if it is still asserted."""
        if index == IRQ_INTX and self.intx_asserted:
            self._signal_intx()

    # ----- state queries -----

    @property
    def command(self) -> int:
        return self.config.u16(COMMAND)

    def bus_master_enabled(self) -> bool:
        return bool(self.command & Command.BUS_MASTER)

    def memory_enabled(self) -> bool:
        return bool(self.command & Command.MEMORY)

    def msix_control(self) -> int:
        if self.msix_offset is None:
            return 0
        return self.config.u16(self.msix_offset + caps.MSIX_CONTROL)

    def msix_enabled(self) -> bool:
        return bool(self.msix_control() & caps.MsixControl.ENABLE)

    def msix_function_masked(self) -> bool:
        return bool(self.msix_control() & caps.MsixControl.FUNCTION_MASK)

    def power_state(self) -> int:
        return self.config.u16(self.pm_offset + caps.PM_PMCSR) & caps.PMCSR_POWER_STATE

    # ----- interrupts -----

    def raise_interrupt(self, vector: int = 0) -> bool:
        """Signal ``vector``: MSI-X when enabled (pending in the PBA while function-masked), else
        assert INTx unless COMMAND.INTX_DISABLE (PCI 3.0 §6.8.2: MSI-X enable turns INTx off).
        Returns True if an eventfd was signalled now."""
        if self.msix_enabled():
            if not 0 <= vector < self.msix_vectors:
                vector = 0  # datasheet: vectors beyond the table go to vector 0
            if self.msix_function_masked():
                self.msix_pending |= 1 << vector
                return False
            return self._signal_msix(vector)
        # INTx is a level: STATUS.INTERRUPT shows it whatever INTX_DISABLE says (PCI 3.0 §6.2.3).
        self.config.set_bits16(STATUS, StatusBits.INTERRUPT, True)
        if self.intx_asserted:
            return False
        self.intx_asserted = True
        return self._signal_intx()

    def deassert_intx(self) -> None:
        """The cause behind the INTx level went away (e.g. the driver cleared it)."""
        self.intx_asserted = False
        self.config.set_bits16(STATUS, StatusBits.INTERRUPT, False)

    def _signal_intx(self) -> bool:
        if self.command & Command.INTX_DISABLE:
            return False
        return self._trigger(IRQ_INTX, 0)

    def _signal_msix(self, vector: int) -> bool:
        return self._trigger(IRQ_MSIX, vector)

    def _trigger(self, index: int, vector: int) -> bool:
        if self.ctx is None or not self.ctx.trigger_irq(index, vector):
            self.interrupts_lost += 1
            return False
        return True

    # ----- config write hooks -----

    def _command_written(self, offset: int, old: bytes, new: bytes) -> None:
        was = int.from_bytes(old, "little")
        now = int.from_bytes(new, "little")
        if was & Command.INTX_DISABLE and not now & Command.INTX_DISABLE and self.intx_asserted:
            self._signal_intx()  # the level was held back by INTX_DISABLE: deliver it now

    def _pmcsr_written(self, offset: int, old: bytes, new: bytes) -> None:
        state = int.from_bytes(new, "little") & caps.PMCSR_POWER_STATE
        if state not in (caps.PM_D0, caps.PM_D3HOT):
            # D1/D2 are not supported: such a write is ignored (PM 1.2 §5.4.1)
            self.config.data[offset : offset + 2] = old

    def _msix_control_written(self, offset: int, old: bytes, new: bytes) -> None:
        if self.msix_enabled() and not self.msix_function_masked() and self.msix_pending:
            pending, self.msix_pending = self.msix_pending, 0
            for vector in range(self.msix_vectors):
                if pending >> vector & 1:
                    self._signal_msix(vector)
        if self.msix_enabled():
            self.intx_asserted = False  # MSI-X supersedes INTx
            self.config.set_bits16(STATUS, StatusBits.INTERRUPT, False)

    def _devctl_written(self, offset: int, old: bytes, new: bytes) -> None:
        value = int.from_bytes(new, "little")
        if value & caps.DEVCTL_INITIATE_FLR:
            # PCIe 4.0 §6.6.2: FLR resets the function; the bit always reads 0.
            self.config.data[offset : offset + 2] = (value & ~caps.DEVCTL_INITIATE_FLR).to_bytes(2, "little")
            self.reset()

    # ----- helpers -----

    def _handler(self, index: int, offset: int, count: int) -> BarHandler:
        layout = self.bar_layouts.get(index)
        if layout is None:
            raise VfioUserError(errno.EINVAL, f"region {index} is absent")
        self._check_range(index, offset, count, layout.size)
        return self.handlers[index]

    def _check_range(self, index: int, offset: int, count: int, size: int) -> None:
        if offset < 0 or count <= 0 or offset + count > size:
            self.bad_accesses += 1
            raise VfioUserError(errno.EINVAL, f"region {index}: {offset:#x}+{count} outside {size:#x} bytes")

    def bar_base(self, index: int) -> int:
        return self.config.bar_address(index)


def _pieces(offset: int, count: int) -> list[tuple[int, int]]:
    """Split an access: 1/2/4/8 bytes stay whole; others become aligned pieces of <= 4 bytes."""
    if count in (1, 2, 4, 8):
        return [(offset, count)]
    out = []
    end = offset + count
    while offset < end:
        size = 4
        while size > 1 and (offset % size or offset + size > end):
            size //= 2
        out.append((offset, size))
        offset += size
    return out

