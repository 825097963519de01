"""The server's single-message MMIO path (``VfioUserConnection.take_mmio`` + ``VfioUserServer._serve_mmio``)
against the general path (``receive_data`` -> ``next_event`` -> handlers).

Each test drives two servers step by step with the same chunks: one as shipped, one with
``mmio_fast_path`` off, each with its own copy of the device. After every chunk both must have sent the
same bytes (and fds), be attached or dropped alike, and their devices must end in the same state; the
fast server's counter shows which chunks it served itself.
"""

from __future__ import annotations

import array
import errno
import os
import random
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from device.pci.config_space import BarLayout, BarType
from device.pci.function import PciFunction, PciIds
from device.vfio_user import protocol as p
from device.vfio_user.device_api import VfioUserError
from device.vfio_user.server import VfioUserServer

from .client import QEMU_CAPS
from .fake_device import FakeDevice

RW = struct.Struct("<HHIIIQII")  # header + offset, region, count (spec "REGION_READ/WRITE")
READ, WRITE = 9, 10
F_REPLY, F_NO_REPLY = 0x1, 0x10
CONFIG = 7


def version_msg(msg_id: int = 0) -> bytes:
    import json

    body = struct.pack("<HH", 0, 0) + json.dumps(QEMU_CAPS).encode() + b"\0"
    return struct.pack("<HHIII", msg_id, 1, 16 + len(body), 0, 0) + body


def read_msg(msg_id: int, region: int, offset: int, count: int, flags: int = 0) -> bytes:
    return RW.pack(msg_id, READ, 32, flags, 0, offset, region, count)


def write_msg(msg_id: int, region: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return RW.pack(msg_id, WRITE, 32 + len(data), flags, 0, offset, region, len(data)) + data


class Regs:
    """A BAR handler with the side effects that make order and duplication visible.

    0x000-0x03F plain dwords (any size); 0x40 an event counter that every write bumps and a read clears;
    0x80 read raises VfioUserError(EFAULT); 0x84 read raises RuntimeError (a device bug -> EIO);
    0x88 read returns a value wider than the access (the reply keeps the access's low bytes);
    0xC0 write starts a message DMA write of 4 bytes to IOVA 0x1000 from inside the handler.
    """

    def __init__(self) -> None:
        self.mem = bytearray(0x100)
        self.events = 0
        self.log: list[tuple[str, int, int, int]] = []
        self.ctx = None
        self.dma_results: list[bool] = []

    def attached(self, ctx) -> None:
        self.ctx = ctx

    def detached(self) -> None:
        self.ctx = None

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, 0))
        if offset == 0x40:
            value, self.events = self.events, 0
            return value
        if offset == 0x80:
            raise VfioUserError(errno.EFAULT, "read of a faulting register")
        if offset == 0x84:
            raise RuntimeError("device bug")
        if offset == 0x88:
            return 0x1122334455667788_99AA
        return int.from_bytes(self.mem[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))
        self.events += 1
        self.mem[offset : offset + size] = value.to_bytes(size, "little")
        if offset == 0xC0 and self.ctx is not None:
            self.ctx.dma_write_async(0x1000, value.to_bytes(4, "little"), self.dma_results.append)

    def reset(self) -> None:
        self.mem[:] = bytes(len(self.mem))
        self.events = 0


def pci_device() -> tuple[PciFunction, Callable[[], object]]:
    regs = Regs()
    fn = PciFunction(PciIds(0x1AF4, 0x10FF, 0x1AF4, 0x0001, 0x020000, 1),
                     {0: (BarLayout(0, 4096, BarType.MEM32), regs)}, msix_vectors=4)
    return fn, lambda: (bytes(regs.mem), regs.events, list(regs.log), list(regs.dma_results),
                        fn.bad_accesses, bytes(fn.config.data))


def fake_device() -> tuple[FakeDevice, Callable[[], object]]:
    dev = FakeDevice()
    return dev, lambda: (bytes(dev.bar0), bytes(dev.config), list(dev.writes), os.pread(dev.bar2_fd, 8192, 0))


class Stepper:
    """A server that is stepped by hand: one chunk in, one loop round, every byte it sent out."""

    def __init__(self, device, fast: bool) -> None:
        self.server = VfioUserServer("/nonexistent/fastpath.sock", device, dma_timeout=600)
        self.server.mmio_fast_path = fast
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.b.setblocking(False)
        self.server.adopt_client(self.a)

    @property
    def attached(self) -> bool:
        return self.server._sock is not None

    def step(self, chunk: bytes, fds: tuple[int, ...] = ()) -> tuple[bytes, int, bool]:
        """Send ``chunk`` as one sendmsg, run one loop round; (bytes sent back, fds sent back, attached)."""
        assert chunk, "an empty chunk would leave the loop waiting"
        if not self.attached:
            return b"", 0, False
        if fds:
            self.b.sendmsg([chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.b.sendall(chunk)
        self.server._run_once()
        if self.server._ready_q:  # call_soon work queued by the round's callbacks: the next round runs it
            self.server._run_once()
        return (*self.drain(), self.attached)

    def drain(self) -> tuple[bytes, int]:
        out = bytearray()
        nfds = 0
        while True:
            try:
                data, anc, _flags, _ = self.b.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return bytes(out), nfds
            for _level, _kind, blob in anc:
                a = array.array("i")
                a.frombytes(blob[: len(blob) - len(blob) % 4])
                for fd in a:
                    os.close(fd)
                nfds += len(a)
            if not data:
                return bytes(out), nfds
            out += data

    def close(self) -> None:
        self.server.close()
        self.a.close()
        self.b.close()


@pytest.fixture(params=["pci", "fake"])
def pair(request) -> Iterator[tuple[Stepper, Stepper, Callable[[], object], Callable[[], object]]]:
    make = pci_device if request.param == "pci" else fake_device
    dev_fast, state_fast = make()
    dev_ref, state_ref = make()
    fast, ref = Stepper(dev_fast, True), Stepper(dev_ref, False)
    yield fast, ref, state_fast, state_ref
    fast.close()
    ref.close()
    for dev in (dev_fast, dev_ref):
        if isinstance(dev, FakeDevice):
            os.close(dev.bar2_fd)


def run_same(fast: Stepper, ref: Stepper, chunks: list[tuple[bytes, tuple[int, ...]] | bytes]) -> list[bytes]:
    """Feed both servers the same chunks; assert identical output after each; return the outputs."""
    outs = []
    for i, item in enumerate(chunks):
        chunk, fds = (item, ()) if isinstance(item, bytes) else item
        got, want = fast.step(chunk, fds), ref.step(chunk, fds)
        assert got == want, f"chunk {i} {chunk[:40].hex()}: fast path {got!r} != general path {want!r}"
        outs.append(got[0])
    return outs


def header(reply: bytes) -> tuple[int, int, int, int, int]:
    return struct.unpack_from("<HHIII", reply)


def test_fast_path_serves_single_mmio_messages_with_the_general_paths_replies(pair):
    fast, ref, state_fast, state_ref = pair
    chunks: list = [version_msg()]
    expected_fast = 0
    msg_id = 1
    for region in (0, CONFIG):
        for size in (1, 2, 4, 8):
            for offset in (0, 8, 0x40):
                chunks.append(write_msg(msg_id, region, offset, bytes(range(1, size + 1))))
                chunks.append(read_msg(msg_id + 1, region, offset, size))
                chunks.append(write_msg(msg_id + 2, region, offset, bytes(range(9, 9 + size)), F_NO_REPLY))
                chunks.append(read_msg(msg_id + 3, region, offset, size, F_NO_REPLY))  # side effect, no reply
                chunks.append(read_msg(msg_id + 4, region, 0x40, 4))  # sees what the last ones did
                msg_id += 5
                expected_fast += 5
    outs = run_same(fast, ref, chunks)
    assert fast.server.mmio_fast_messages == expected_fast
    assert ref.server.mmio_fast_messages == 0
    assert state_fast() == state_ref()
    # Spot-check the replies themselves (the general path is the reference, but not blindly).
    first_write, first_read, posted, posted_read = outs[1:5]
    assert header(first_write) == (1, WRITE, 32, F_REPLY, 0)
    assert header(first_read)[:4] == (2, READ, 33, F_REPLY) and first_read[32:] == b"\x01"
    assert posted == b"" and posted_read == b""


def test_errors_and_odd_messages_get_the_general_paths_answers(pair):
    fast, ref, state_fast, state_ref = pair
    rfd = os.eventfd(0)
    try:
        early = run_same(fast, ref, [read_msg(1, 0, 0, 4), version_msg(2)])  # before VERSION: refused
        assert header(early[0])[3] & 0x20 and header(early[0])[4] == errno.EINVAL
        cases = [
            read_msg(10, 0, 4096 - 2, 4),                    # runs past the end of BAR0
            read_msg(11, 0, (1 << 64) - 4, 8),               # offset + count overflows 64 bits
            read_msg(12, 1, 0, 4),                           # absent BAR
            read_msg(13, 9, 0, 4),                           # region beyond num_regions
            read_msg(14, 0xFFFFFFFF, 0, 4),
            write_msg(15, 0, 4096 - 1, b"\1\2"),             # write past the end
            write_msg(16, 5, 0, b"\1\2\3\4"),                # absent region, write
            write_msg(17, 0, 4096, b"\1", F_NO_REPLY),       # refused posted write: no reply either way
            read_msg(18, 0, 0, 0),                           # zero-length read
            read_msg(19, 0, 0, 3),                           # odd sizes: split by the device
            write_msg(20, 0, 1, b"\1\2\3"),
            read_msg(21, 0, 0, 16),
            write_msg(22, 0, 0, bytes(16)),
            read_msg(23, 0, 0, p.MAX_DATA_XFER_SIZE + 1),    # count beyond max_data_xfer_size
            RW.pack(24, READ, 36, 0, 0, 0, 0, 4) + b"\0" * 4,  # READ with a payload
            RW.pack(25, WRITE, 36, 0, 0, 0, 0, 8) + b"\0" * 4,  # WRITE count != data
            RW.pack(26, WRITE, 32, 0, 0, 0, 0, 0),           # WRITE of nothing
            RW.pack(27, READ, 32, F_REPLY, 0, 0, 0, 4),      # a "reply" nobody asked for: ignored
            RW.pack(28, 99, 32, 0, 0, 0, 0, 4),              # unknown command: ENOSYS
            RW.pack(29, READ, 32, 0x20, 0, 0, 0, 4),         # ERROR flag on a command: served like any read
            (read_msg(30, 0, 0, 4), (rfd,)),                 # fds attached: EINVAL, fd closed
            (write_msg(31, 0, 0, b"\1\2\3\4"), (rfd,)),
            read_msg(32, 0, 0, 4)[:20],                      # a message in two chunks
            read_msg(32, 0, 0, 4)[20:],
            read_msg(33, 0, 0, 4) + read_msg(34, 0, 8, 4),   # two in one chunk
            write_msg(35, 0, 0, b"\5\6\7\x08")[:33],
            write_msg(35, 0, 0, b"\5\6\7\x08")[33:] + read_msg(36, 0, 0, 4),
        ]
        run_same(fast, ref, cases)
        n_pci = isinstance(fast.server.device, PciFunction)
        if n_pci:  # device errors from the BAR handler itself
            outs = run_same(fast, ref, [read_msg(40, 0, 0x80, 4), read_msg(41, 0, 0x84, 4), read_msg(42, 0, 0x88, 2),
                                        read_msg(43, 0, 0x88, 8)])
            assert header(outs[0])[3:] == (F_REPLY | 0x20, errno.EFAULT)
            assert header(outs[1])[3:] == (F_REPLY | 0x20, errno.EIO)
            assert outs[2][32:] == (0x99AA).to_bytes(2, "little")
        assert fast.attached and ref.attached
        assert state_fast() == state_ref()
        # Taken by the fast entry: each chunk that is one well-formed READ (any count up to the maximum) or a
        # WRITE of 1, 2, 4 or 8 bytes after VERSION (ids 10-19, 21, 29; 40-43 on the PCI device), whatever the
        # region and the handler then said.
        assert fast.server.mmio_fast_messages == 12 + (4 if n_pci else 0)
        # A framing error ends the connection on both.
        outs = run_same(fast, ref, [RW.pack(50, READ, 32, 0x2, 0, 0, 0, 4)])
        assert not fast.attached and not ref.attached
    finally:
        os.close(rfd)


def test_mmio_interleaved_with_other_commands_and_message_dma(pair):
    fast, ref, state_fast, state_ref = pair
    pci = isinstance(fast.server.device, PciFunction)
    chunks: list = [version_msg()]
    chunks.append(struct.pack("<HHIII", 1, 4, 32, 0, 0) + struct.pack("<IIII", 16, 0, 0, 0))  # DEVICE_GET_INFO
    for index in (0, 2, CONFIG):
        chunks.append(struct.pack("<HHIII", 2 + index, 5, 48, 0, 0) + struct.pack("<IIIIQQ", 80, 0, index, 0, 0, 0))
    # A DMA window without an fd: the device's DMA then travels as DMA_READ/DMA_WRITE messages.
    chunks.append(struct.pack("<HHIII", 20, 2, 48, 0, 0) + struct.pack("<IIQQQ", 32, 3, 0, 0x1000, 0x1000))
    chunks.append(write_msg(21, 0, 0x00, b"\xaa\xbb\xcc\xdd"))
    chunks.append(read_msg(22, 0, 0x00, 4))
    if pci:
        chunks.append(write_msg(23, 0, 0xC0, b"DMA!"))  # the handler queues a DMA_WRITE before the reply
        chunks.append(struct.pack("<HHIII", 0, 12, 16, F_REPLY, 0))  # the client's answer to it
    else:  # FakeDevice: DMA_ADDR/LEN/CMD 4 (write via messages) runs in call_soon after the reply
        chunks.append(write_msg(23, 0, 0x08, struct.pack("<Q", 0x1000)))
        chunks.append(write_msg(24, 0, 0x10, struct.pack("<I", 4)))
        chunks.append(write_msg(25, 0, 0x14, struct.pack("<I", 4)))
        chunks.append(struct.pack("<HHIII", 0, 12, 16, F_REPLY, 0))
    chunks.append(read_msg(26, 0, 0x18 if not pci else 0x40, 4))
    chunks.append(struct.pack("<HHIII", 27, 13, 16, 0, 0))  # DEVICE_RESET
    chunks.append(read_msg(28, 0, 0x00, 4))
    outs = run_same(fast, ref, chunks)
    dma_chunk = outs[-5]  # the reply to the write that started the DMA, and the DMA_WRITE request
    requests = []
    buf = dma_chunk
    while buf:
        hdr = header(buf)
        requests.append(hdr[1])
        buf = buf[hdr[2]:]
    assert 12 in requests, f"no DMA_WRITE request in {dma_chunk.hex()}"  # DMA_WRITE went out
    if pci:
        assert requests == [12, WRITE]  # queued inside the handler: before the reply, as from _process
    assert state_fast() == state_ref()
    assert fast.server.mmio_fast_messages > 0 and ref.server.mmio_fast_messages == 0


def test_random_streams_get_identical_answers(pair):
    """Random MMIO traffic, valid and not, cut into random chunks: both paths answer byte for byte alike."""
    fast, ref, state_fast, state_ref = pair
    rng = random.Random(12)
    run_same(fast, ref, [version_msg()])
    msgs = []
    for i in range(1500):
        region = rng.choice((0, 0, 0, 1, 2, CONFIG, 8, 9))
        size = rng.choice((1, 2, 4, 8, 8, 4, 4, 3, 0, 16))
        offset = rng.choice((0, 4, 8, 0x40, 0x88, 0xC0 - 0x40, 0xFC, 4092, 4096, 8188, 1 << 63))
        flags = rng.choice((0, 0, 0, F_NO_REPLY, 0x20))
        if rng.random() < 0.5:
            msg = read_msg(i & 0xFFFF, region, offset, size, flags)
        else:
            msg = write_msg(i & 0xFFFF, region, offset, bytes(rng.randrange(256) for _ in range(size)), flags)
        if rng.random() < 0.03:  # a damaged size field that still frames (too long for the payload)
            msg = msg[:4] + struct.pack("<I", len(msg) + 4) + msg[8:] + b"\0" * 4
        msgs.append(msg)
    # Mostly one message per chunk (what QEMU sends); some split in two, some joined with the next.
    chunks: list = []
    carry = b""
    for msg in msgs:
        r = rng.random()
        if r < 0.08:
            cut = rng.randrange(1, len(msg))
            chunks += [carry + msg[:cut], msg[cut:]]
            carry = b""
        elif r < 0.14:
            carry += msg
        else:
            chunks.append(carry + msg)
            carry = b""
    if carry:
        chunks.append(carry)
    run_same(fast, ref, chunks)
    assert fast.attached and ref.attached
    assert state_fast() == state_ref()
    assert fast.server.mmio_fast_messages > 500


def test_fast_path_is_taken_by_a_threaded_server(server, client):
    """Through the real loop and socket (fixtures of conftest.py)."""
    before = server.mmio_fast_messages
    client.write32(0, 0x00, 0x12345678)
    assert client.read32(0, 0x00) == 0x12345678
    assert server.mmio_fast_messages == before + 2
    with pytest.raises(OSError) as exc:
        client.region_read(0, 4094, 4)
    assert exc.value.errno == errno.EINVAL
    assert server.mmio_fast_messages == before + 3


def test_tracing_uses_the_general_path(tmp_path):
    import logging

    dev = FakeDevice()
    try:
        logger = logging.getLogger("device.vfio_user.server")
        old = logger.level
        logger.setLevel(logging.DEBUG)
        try:
            s = Stepper(dev, True)
        finally:
            logger.setLevel(old)
        try:
            s.step(version_msg())
            out, _nfds, _attached = s.step(read_msg(1, 0, 0, 4))
            assert header(out)[:4] == (1, READ, 36, F_REPLY)
            assert s.server.mmio_fast_messages == 0  # every request logged: nothing bypasses _process
        finally:
            s.close()
    finally:
        os.close(dev.bar2_fd)


def test_real_card_registers_answer_alike():
    """The card's own BAR handler (read-to-clear ICR, STATUS, SCRATCH, the mirror BAR) through both paths."""
    from device.contract import regs
    from device.nic.assembly import build_card
    from device.profile import load_profile

    cards = [build_card(load_profile()), build_card(load_profile())]
    fast, ref = Stepper(cards[0], True), Stepper(cards[1], False)
    try:
        chunks = [version_msg()]
        names = ("SCRATCH", "STATUS", "ICR", "IMS", "CTRL")
        for i, name in enumerate(names):
            off = regs.reg(name)
            chunks += [read_msg(10 * i, 0, off, 4), write_msg(10 * i + 1, 0, off, b"\xff\0\0\0"),
                       read_msg(10 * i + 2, 0, off, 4), read_msg(10 * i + 3, 0, off, 8),
                       read_msg(10 * i + 4, 0, off + 1, 2), write_msg(10 * i + 5, 0, off, b"\1\2", F_NO_REPLY),
                       read_msg(10 * i + 6, 4, off, 4)]
        outs = run_same(fast, ref, chunks)
        assert fast.server.mmio_fast_messages == len(chunks) - 1
        assert outs[3][32:] == b"\xff\0\0\0"  # SCRATCH read back
        assert list(cards[0].card.mem) == list(cards[1].card.mem)
        assert cards[0].card.stats == cards[1].card.stats
    finally:
        fast.close()
        ref.close()
        for card in cards:
            if card.card.datapath is not None:
                card.card.datapath.close()
