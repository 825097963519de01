"""Fakes of the vfio-user library's side for fast in-process tests of the card (tests/nic, tests/pci,
tests/guest): guest memory as a bytearray and a DeviceContext that queues work instead of running a
socket loop. The real library is exercised over real sockets in tests/protocol and tests/vm."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from device.vfio_user.device_api import DmaError, MappingInfo
from device.vfio_user.server import TimerHandle

GUEST_BASE = 0x1_0000_0000  # above 4 GiB, so BASE_HI matters
GUEST_SIZE = 1 << 20
GUARD = 0xA5  # every byte of fresh guest memory starts as this, so stray card writes show up


class FakeDma:
    """Guest memory [base, base + len(mem)): every access must lie wholly inside it (else DmaError, as in
    device/vfio_user/dma.py). ``mem`` shares an existing bytearray (the guest driver's test memory)."""

    def __init__(self, base: int = GUEST_BASE, size: int = GUEST_SIZE, mem: bytearray | None = None) -> None:
        self.base = base
        self.mem = mem if mem is not None else bytearray([GUARD]) * size
        self.size = len(self.mem)
        self.faults = 0

    def _offset(self, iova: int, length: int) -> int:
        if length < 0 or iova < self.base or iova + length > self.base + self.size:
            self.faults += 1
            raise DmaError(f"DMA of {length} bytes at {iova:#x} is outside guest memory")
        return iova - self.base

    def read(self, iova: int, length: int) -> bytes:
        o = self._offset(iova, length)
        return bytes(self.mem[o : o + length])

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        n = len(memoryview(data).cast("B"))
        o = self._offset(iova, n)
        self.mem[o : o + n] = data

    def mapped(self, iova: int, length: int) -> MappingInfo | None:
        if length < 0 or iova < self.base or iova + length > self.base + self.size:
            return None
        return MappingInfo(self.base, self.size, True, True, True)

    def view(self, iova: int, length: int) -> memoryview:
        o = self._offset(iova, length)
        return memoryview(self.mem)[o : o + length]


Timer = TimerHandle  # the server's own record: fake timers behave like real ones


class FakeContext:
    """DeviceContext without sockets: call_soon work is queued and run by the test (``run``), call_later
    timers are recorded (``advance`` fires them on the fake clock), interrupts are recorded in ``irqs``
    (refused while ``configured`` is False). ``clock``: a real clock instead of the fake one."""

    def __init__(self, dma: FakeDma | None = None, clock: Callable[[], float] | None = None) -> None:
        self.dma = dma if dma is not None else FakeDma()
        self.clock = clock
        self.now = 0.0
        self.soon: deque[Callable[[], None]] = deque()
        self.timers: list[Timer] = []
        self.irqs: list[tuple[int, int]] = []
        self.readers: dict[int, Callable[[], None]] = {}
        self.configured = True

    def time(self) -> float:
        return self.clock() if self.clock is not None else self.now

    def trigger_irq(self, index: int, vector: int = 0) -> bool:
        if not self.configured:
            return False
        self.irqs.append((index, vector))
        return True

    def irq_configured(self, index: int, vector: int = 0) -> bool:
        return self.configured

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.time() + delay, callback)
        self.timers.append(timer)
        return timer

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def dma_read_async(self, iova: int, length: int, done: Callable[[bytes | None], None]) -> None:
        try:
            done(self.dma.read(iova, length))
        except DmaError:
            done(None)

    def dma_write_async(self, iova: int, data: bytes, done: Callable[[bool], None]) -> None:
        try:
            self.dma.write(iova, data)
            done(True)
        except DmaError:
            done(False)

    def run(self, limit: int = 10_000) -> int:
        """Run queued call_soon work (and what it queues) until idle; returns callbacks run."""
        ran = 0
        while self.soon:
            assert ran < limit, "call_soon work does not settle"
            self.soon.popleft()()
            ran += 1
        return ran

    def advance(self, seconds: float) -> None:
        """Move the fake clock and fire due timers."""
        self.now += seconds
        for timer in sorted(self.timers, key=lambda t: t.when):
            if timer.when <= self.now + 1e-12 and not timer.cancelled:
                self.timers.remove(timer)
                timer.callback()
        self.run()
