"""Run the real guest driver against the real device model in one process.

    guest_tools.driver.Card --MMIO--> PciFunction.region_read/write(BAR0)   (CallbackMmio)
                           <--DMA--- a bytearray "guest memory"             (ArrayMemory + tests.fakes.FakeDma)

The device model expects a vfio-user server loop: MMIO handlers only schedule work with
``ctx.call_soon`` and the loop runs it after the reply. Here tests.fakes.FakeContext queues those
callbacks and :meth:`Harness.pump` runs them; the MMIO backend pumps after every register access, so
from the driver's point of view the card works "between" two register accesses - as it does behind
QEMU, only deterministic. The wire is :class:`CaptureWire`: frames the card sends are collected,
frames a test injects are delivered to the card.
"""

from __future__ import annotations

import time

from device.contract import regs
from device.vfio_user.device_api import REGION_BAR0, REGION_CONFIG
from guest_tools.dma import ArrayMemory
from guest_tools.mmio import CallbackMmio
from tests.fakes import FakeContext, FakeDma

PUMP_LIMIT = 100_000  # callbacks per pump: a device that keeps rescheduling itself is a bug, not a hang


def _capture_wire_class():
    from device.nic.wire import Wire

    class CaptureWire(Wire):
        """Collects what the card transmits; ``inject`` hands a frame to the card's receive path."""

        kind = "capture"

        def __init__(self) -> None:
            super().__init__()
            self.sent: list[bytes] = []

        def attach(self, ctx, on_frame, on_link) -> None:
            super().attach(ctx, on_frame, on_link)
            self._set_link(True)

        def _send(self, frame: bytes) -> bool:
            self.sent.append(bytes(frame))
            return True

        def inject(self, frame: bytes) -> None:
            self._deliver(bytes(frame))

    return CaptureWire


class Harness:
    """Device model (build_card + Datapath + Firmware) + guest memory + the driver's MMIO backend."""

    def __init__(self, profile_overrides: dict | None = None, memory_size: int = 8 << 20) -> None:
        from device.nic.assembly import build_card
        from device.profile import profile_from_dict

        self.profile = profile_from_dict(profile_overrides or {})
        self.function = build_card(self.profile)
        self.nic = self.function.card
        # The card's own datapath and firmware, with the wire swapped for one the tests can feed.
        self.datapath = self.nic.datapath
        assert self.datapath is not None, "build_card() must give the card a datapath"
        self.firmware = self.datapath.firmware
        self.wire = _capture_wire_class()()
        self.datapath.wire.close()
        self.datapath.wire = self.wire
        self.memory = ArrayMemory(memory_size)
        self.ctx = FakeContext(FakeDma(self.memory.base, mem=self.memory.memory), clock=time.monotonic)
        self.function.attached(self.ctx)  # attaches the datapath (and its wire) too
        self.mmio = CallbackMmio(self._read, self._write, regs.BAR0_SIZE)
        self.bus_master(True)

    def bus_master(self, on: bool) -> None:
        """PCI COMMAND.MEMORY | BUS_MASTER through config space (what the guest's enable does)."""
        cmd = int.from_bytes(self.function.region_read(REGION_CONFIG, 4, 2), "little")
        cmd = (cmd | 0x6) if on else (cmd & ~0x4)
        self.function.region_write(REGION_CONFIG, 4, cmd.to_bytes(2, "little"))

    def _read(self, offset: int, count: int) -> bytes:
        data = self.function.region_read(REGION_BAR0, offset, count)
        self.pump()
        return data

    def _write(self, offset: int, data: bytes) -> None:
        self.function.region_write(REGION_BAR0, offset, data)
        self.pump()

    def pump(self) -> int:
        """Run queued device work (and due timers) until the queue is empty."""
        ran = 0
        soon = self.ctx.soon
        while True:
            while soon:
                soon.popleft()()
                ran += 1
                if ran > PUMP_LIMIT:
                    raise RuntimeError("device model keeps scheduling work (runaway call_soon loop)")
            now = time.monotonic()
            due = [t for t in self.ctx.timers if t.when <= now and not t.cancelled]
            if not due:
                return ran
            self.ctx.timers = [t for t in self.ctx.timers if t not in due and not t.cancelled]
            for t in due:
                t.callback()

    def inject(self, frame: bytes) -> None:
        """A frame arrives from the wire."""
        self.wire.inject(frame)
        self.pump()

    def card(self, **kwargs):
        from guest_tools.driver import Card

        return Card(self.mmio, self.memory, **kwargs)


def missing_device_piece() -> str:
    """Empty when the device side needed by the harness imports; else what is missing."""
    try:
        import device.nic.card  # noqa: F401
        import device.nic.datapath  # noqa: F401
        import device.nic.wire  # noqa: F401
        import firmware_model.firmware  # noqa: F401
    except ImportError as exc:
        return f"device model piece missing: {exc}"
    return ""
