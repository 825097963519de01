"""A tiny device for the protocol tests (the real PCI function lives in device/pci/).

BAR0 (4 KiB, trapped):
  0x00 SCRATCH   read/write
  0x08 DMA_ADDR  u64 guest address
  0x10 DMA_LEN   u32
  0x14 DMA_CMD   1 read guest->buffer (ctx.dma), 2 write buffer->guest (ctx.dma),
                 3 read via DMA_READ messages, 4 write via DMA_WRITE messages.
                 Work runs in ctx.call_soon, i.e. after the reply.
  0x18 DMA_STATUS 0 done, 1 busy, else errno of the failure
  0x1C IRQ       write v: raise MSI-X vector v; read: 1 if it was delivered
  0x100..0x1FF   the device's 256-byte DMA buffer
BAR2 (8 KiB memfd, mmappable; only the first page is a sparse-mmap area).
Config (region 7): 256 bytes, vendor:device 0x1af4:0x10ff, otherwise plain memory.
IRQs: INTx 1, MSI 0, MSI-X 4, ERR 1, REQ 1.
"""

from __future__ import annotations

import errno
import os
import struct

from device.vfio_user.device_api import (
    IRQ_MSIX,
    REGION_BAR0,
    REGION_BAR2,
    REGION_CONFIG,
    DeviceContext,
    DmaError,
    IrqInfo,
    MmapArea,
    RegionInfo,
    VfioUserError,
)

SCRATCH, DMA_ADDR, DMA_LEN, DMA_CMD, DMA_STATUS, IRQ = 0x00, 0x08, 0x10, 0x14, 0x18, 0x1C
BUF, BUF_SIZE = 0x100, 0x100


class FakeDevice:
    num_regions = 9
    num_irqs = 5
    supports_reset = True

    def __init__(self) -> None:
        self.bar0 = bytearray(4096)
        self.config = bytearray(256)
        struct.pack_into("<HH", self.config, 0, 0x1AF4, 0x10FF)
        self.bar2_fd = os.memfd_create("fake-bar2")
        os.ftruncate(self.bar2_fd, 8192)
        self.ctx: DeviceContext | None = None
        self.attach_count = 0
        self.detach_count = 0
        self.reset_count = 0
        self.writes: list[tuple[int, int, bytes]] = []
        self.unmasked: list[tuple[int, int]] = []

    # -------------------------------------------------------------- VfioUserDevice

    def region_info(self, index: int) -> RegionInfo:
        if index == REGION_BAR0:
            return RegionInfo(size=4096)
        if index == REGION_BAR2:
            return RegionInfo(size=8192, mmap_fd=self.bar2_fd, sparse_areas=(MmapArea(0, 4096),))
        if index == REGION_CONFIG:
            return RegionInfo(size=256)
        return RegionInfo(size=0)

    def irq_info(self, index: int) -> IrqInfo:
        return IrqInfo(count=(1, 0, 4, 1, 1)[index], maskable=index == 0)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == REGION_BAR0:
            return bytes(self.bar0[offset : offset + count])
        if index == REGION_CONFIG:
            return bytes(self.config[offset : offset + count])
        if index == REGION_BAR2:
            return os.pread(self.bar2_fd, count, offset)
        raise VfioUserError(errno.EINVAL, f"region {index}")

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.writes.append((index, offset, bytes(data)))
        if index == REGION_CONFIG:
            self.config[offset : offset + len(data)] = data
            return
        if index == REGION_BAR2:
            os.pwrite(self.bar2_fd, data, offset)
            return
        if index != REGION_BAR0:
            raise VfioUserError(errno.EINVAL, f"region {index}")
        self.bar0[offset : offset + len(data)] = data
        if offset == DMA_CMD and len(data) == 4:
            cmd = struct.unpack("<I", data)[0]
            struct.pack_into("<I", self.bar0, DMA_STATUS, 1)
            assert self.ctx is not None
            self.ctx.call_soon(lambda: self._run_dma(cmd))  # never work inside the handler
        elif offset == IRQ and len(data) == 4:
            assert self.ctx is not None
            ok = self.ctx.trigger_irq(IRQ_MSIX, struct.unpack("<I", data)[0])
            struct.pack_into("<I", self.bar0, IRQ, int(ok))

    def reset(self) -> None:
        self.reset_count += 1
        self.bar0[:] = bytes(4096)

    def attached(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self.attach_count += 1

    def detached(self) -> None:
        self.ctx = None
        self.detach_count += 1

    def irq_unmasked(self, index: int, vector: int) -> None:
        self.unmasked.append((index, vector))

    # -------------------------------------------------------------- DMA engine

    def _status(self, value: int) -> None:
        struct.pack_into("<I", self.bar0, DMA_STATUS, value)

    def _run_dma(self, cmd: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        addr = struct.unpack_from("<Q", self.bar0, DMA_ADDR)[0]
        n = min(struct.unpack_from("<I", self.bar0, DMA_LEN)[0], BUF_SIZE)
        try:
            if cmd == 1:
                self.bar0[BUF : BUF + n] = ctx.dma.read(addr, n)
                self._status(0)
            elif cmd == 2:
                ctx.dma.write(addr, bytes(self.bar0[BUF : BUF + n]))
                self._status(0)
            elif cmd == 3:
                def got(data: bytes | None) -> None:
                    if data is None:
                        self._status(errno.EFAULT)
                    else:
                        self.bar0[BUF : BUF + len(data)] = data
                        self._status(0)

                ctx.dma_read_async(addr, n, got)
            elif cmd == 4:
                ctx.dma_write_async(addr, bytes(self.bar0[BUF : BUF + n]),
                                    lambda ok: self._status(0 if ok else errno.EFAULT))
            else:
                self._status(errno.EINVAL)
        except DmaError as exc:
            self._status(exc.errno)
