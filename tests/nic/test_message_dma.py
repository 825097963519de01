"""The card when guest RAM is not shared: every DMA access is a DMA_READ/DMA_WRITE message whose reply comes
later (device/nic/dma_pass.py). The harness holds the replies and delivers them in an order chosen by
hypothesis; the real card, firmware and loopback wire do the rest. The same run over a real vfio-user socket is
in tests/protocol/test_card_message_dma.py, through QEMU in tests/vm/test_message_dma.py."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.contract import ndis, regs
from device.contract.regs import AdminStatus, RxWbFlags, TxStatus, TxWbFlags
from device.nic.adminq import LIST_CHUNK
from device.vfio_user.device_api import DmaError, MappingInfo
from tests.fakes import FakeContext, FakeDma

from .conftest import Rig, make_rig
from .test_adminq import add_sa_ex
from .test_adminq_time_bound import _entry
from .test_datapath import EOP_RS, udp_frame


class MessageOnlyDma:
    """What the card sees of guest RAM mapped without an fd: ranges exist, direct access is refused
    (as device/vfio_user/dma.py's DmaTable does for an fd-less DMA_MAP)."""

    def __init__(self, memory: FakeDma) -> None:
        self.memory = memory

    def mapped(self, iova: int, length: int) -> MappingInfo | None:
        m = self.memory
        if length < 0 or iova < m.base or iova + length > m.base + m.size:
            return None
        return MappingInfo(m.base, m.size, False, True, True)

    def read(self, iova: int, length: int) -> bytes:
        raise DmaError(f"guest range at {iova:#x} has no fd; use ctx.dma_read_async")

    def write(self, iova: int, data) -> None:
        raise DmaError(f"guest range at {iova:#x} has no fd; use ctx.dma_write_async")

    def view(self, iova: int, length: int) -> memoryview:
        raise DmaError(f"guest range at {iova:#x} has no fd; no direct view possible")


@dataclass
class Pending:
    write: bool
    addr: int
    payload: bytes | int
    done: Callable


class MessageContext(FakeContext):
    """FakeContext whose DMA goes only through dma_read_async/dma_write_async; the replies wait in
    ``pending`` until ``run`` delivers them (in ``rng`` order). ``log`` records ("issue"|"done", W|R, addr)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.memory = FakeDma()
        super().__init__(dma=MessageOnlyDma(self.memory))  # type: ignore[arg-type]
        self.rng = rng or random.Random(0)
        self.pending: list[Pending] = []
        self.log: list[tuple[str, str, int]] = []
        self.fail: Callable[[Pending], bool] = lambda op: False

    def dma_read_async(self, iova: int, length: int, done) -> None:
        self.pending.append(Pending(False, iova, length, done))
        self.log.append(("issue", "R", iova))

    def dma_write_async(self, iova: int, data: bytes, done) -> None:
        self.pending.append(Pending(True, iova, bytes(data), done))
        self.log.append(("issue", "W", iova))

    def deliver_one(self) -> None:
        op = self.pending.pop(self.rng.randrange(len(self.pending)))
        self.log.append(("done", "W" if op.write else "R", op.addr))
        if self.fail(op):
            op.done(False if op.write else None)
        elif op.write:
            self.memory.write(op.addr, op.payload)
            op.done(True)
        else:
            op.done(self.memory.read(op.addr, op.payload))

    def run(self, limit: int = 100_000) -> int:
        ran = 0
        while self.soon or self.pending:
            assert ran < limit, "work does not settle"
            if self.soon and (not self.pending or self.rng.random() < 0.5):
                self.soon.popleft()()
            else:
                self.deliver_one()
            ran += 1
        return ran


def message_rig(seed: int = 0) -> Rig:
    ctx = MessageContext(random.Random(seed))
    r = make_rig(ctx=ctx)
    r.drv.dma = ctx.memory  # the test's driver writes guest RAM directly, as the guest does
    r.drv.bus_master(True)
    r.drv.enable()
    r.drv.setup_ring("admin", 0, 16)
    r.drv.setup_ring("tx", 0, 16)
    r.drv.setup_ring("rx", 0, 16)
    return r


def add_pair(drv) -> tuple[int, int]:
    handles = []
    for inbound in (False, True):
        wb, resp = drv.admin(ndis.Opcode.V2_ADD_SA_EX, add_sa_ex(0x1001, inbound))
        assert (wb.status, wb.fw_status, wb.flags) == (AdminStatus.OK, 0, regs.AdminFlags.DONE)
        handles.append(ndis.HandleResponse.unpack(resp).offload_handle)
    return handles[0], handles[1]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_admin_tx_rx_complete_in_any_reply_order(seed):
    r = message_rig(seed)
    drv, ctx = r.drv, r.ctx
    out_h, in_h = add_pair(drv)
    assert out_h and in_h and out_h != in_h
    rx = drv.post_rx(4)
    frames = [udp_frame(b"message dma %d" % i) for i in range(3)]
    sent = [drv.send(f, ring_doorbell=False) for f in frames[:2]]
    # a frame in three descriptors: header, payload, tail
    f = frames[2]
    for k, (a, b) in enumerate(((0, 14), (14, 30), (30, len(f)))):
        flags = EOP_RS if k == 2 else int(regs.TxFlags.REPORT_STATUS)
        sent.append(drv.send(f[a:b], flags=flags, ring_doorbell=False))
    drv.doorbell("tx")
    ctx.run()
    for i in sent:
        wb = drv.tx_wb(i)
        assert (wb.wb_status, wb.wb_flags) == (TxStatus.OK, TxWbFlags.DONE)
    got = [drv.rx(i) for i in rx[:3]]
    assert [data for _, data in got] == frames
    assert all(d.wb_flags == RxWbFlags.DD | RxWbFlags.EOP for d, _ in got)
    assert drv.head("tx") == 5 and drv.head("rx") == 3
    assert drv.stat("DMA_ERROR") == 0 and drv.stat("TX_PACKETS") == 3 and drv.stat("RX_PACKETS") == 3
    assert r.datapath.extra.dma_messages > 0 and not ctx.pending


def test_rx_write_back_is_issued_only_after_the_frame_write_is_acknowledged():
    r = message_rig(7)
    drv, ctx = r.drv, r.ctx
    rx = drv.post_rx(2)
    ctx.run()
    ctx.log.clear()
    frame = udp_frame(b"order")
    r.datapath.frame_received(frame)
    ctx.run()
    d, data = drv.rx(rx[0])
    assert data == frame
    buf_write = ("issue", "W", d.addr)
    wb_write = ("issue", "W", drv.desc_addr("rx", 0, rx[0]) + regs.RX_DESC.offset_of("length"))
    assert buf_write in ctx.log and wb_write in ctx.log
    assert ctx.log.index(("done", "W", d.addr)) < ctx.log.index(wb_write)


def test_admin_done_flag_is_the_last_write():
    r = message_rig(3)
    drv, ctx = r.drv, r.ctx
    ctx.log.clear()
    wb, resp = drv.admin(ndis.Opcode.GET_CAPS)
    assert wb.status == AdminStatus.OK and resp
    writes = [e for e in ctx.log if e[1] == "W"]
    flags_at = drv.desc_addr("admin", 0, 0) + regs.ADMIN_DESC.offset_of("flags")
    assert writes[-2:] == [("issue", "W", flags_at), ("done", "W", flags_at)]
    # every earlier write (response, status, resp_len) completed before DONE was sent
    assert sum(1 for e in writes[:-2] if e[0] == "issue") == sum(1 for e in writes[:-2] if e[0] == "done") == 3


def test_failed_replies_become_dma_errors_and_the_card_keeps_serving():
    r = message_rig(1)
    drv, ctx = r.drv, r.ctx
    request = add_sa_ex(0x2002, False)
    ctx.fail = lambda op: not op.write and op.payload == len(request)  # the request buffer read fails
    wb, _ = drv.admin(ndis.Opcode.V2_ADD_SA_EX, request)
    assert (wb.status, wb.flags) == (AdminStatus.DMA_ERROR, regs.AdminFlags.DONE | regs.AdminFlags.ERROR)
    assert drv.stat("DMA_ERROR") == 1 and r.firmware.stats().sa_bundles == 0

    frame = udp_frame(b"lost")
    ctx.fail = lambda op: not op.write and op.payload == len(frame)  # the TX buffer read fails
    i = drv.send(frame)
    ctx.run()
    assert drv.tx_wb(i).wb_status == TxStatus.DMA_ERROR and drv.stat("TX_PACKETS") == 0

    ctx.fail = lambda op: False
    add_pair(drv)  # and everything works again
    rx = drv.post_rx(1)
    drv.send(udp_frame(b"after"))
    ctx.run()
    assert drv.rx(rx[0])[1] == udp_frame(b"after") and drv.stat("DMA_ERROR") == 2


def test_reset_while_a_pass_waits_abandons_it():
    r = message_rig(5)
    drv, ctx = r.drv, r.ctx
    drv.post_rx(2)
    ctx.run()
    i = drv.send(udp_frame(b"never"))
    while not ctx.pending:  # run until the TX pass waits for its descriptor read
        ctx.soon.popleft()()
    drv.w(regs.CTRL, int(regs.Ctrl.RESET))
    before = bytes(ctx.memory.mem)
    issued = len([e for e in ctx.log if e[0] == "issue"])
    ctx.run()  # the reply arrives after the reset
    assert len([e for e in ctx.log if e[0] == "issue"]) == issued, "the abandoned pass issued more DMA"
    assert bytes(ctx.memory.mem) == before and drv.tx_wb(i).wb_flags == 0
    assert drv.stat("TX_PACKETS") == 0 and not r.datapath._passes


def test_doorbell_and_frames_during_a_pass_are_not_lost():
    r = message_rig(11)
    drv, ctx = r.drv, r.ctx
    rx = drv.post_rx(4)
    ctx.run()
    first = drv.send(udp_frame(b"one"))
    while not ctx.pending:
        ctx.soon.popleft()()
    second = drv.send(udp_frame(b"two"))  # doorbell while the pass of this ring waits
    r.datapath.frame_received(udp_frame(b"from the wire"))  # RX pass starts and waits too
    r.datapath.frame_received(udp_frame(b"queued behind it"))
    ctx.run()
    assert drv.tx_wb(first).wb_flags == drv.tx_wb(second).wb_flags == TxWbFlags.DONE
    got = [drv.rx(i)[1] for i in rx]
    assert got[:2] == [udp_frame(b"from the wire"), udp_frame(b"queued behind it")]
    assert sorted(got[2:]) == sorted([udp_frame(b"one"), udp_frame(b"two")])


class CountingContext(FakeContext):
    def __init__(self) -> None:
        super().__init__()
        self.messages = 0

    def dma_read_async(self, iova, length, done) -> None:
        self.messages += 1
        super().dma_read_async(iova, length, done)

    def dma_write_async(self, iova, data, done) -> None:
        self.messages += 1
        super().dma_write_async(iova, data, done)


def test_shared_memory_passes_send_no_messages_and_finish_in_one_call():
    r = make_rig(ctx=CountingContext())
    drv = r.drv
    drv.bus_master(True)
    drv.enable()
    for kind in ("admin", "tx", "rx"):
        drv.setup_ring(kind, 0, 16)
    add_pair(drv)
    rx = drv.post_rx(2)
    drv.send(udp_frame())
    r.ctx.run()
    assert drv.rx(rx[0])[1] == udp_frame()
    assert r.ctx.messages == 0 and r.datapath.extra.dma_messages == 0 and not r.datapath._passes


def test_unmapped_buffer_is_still_a_dma_fault():
    r = message_rig(2)
    drv, ctx = r.drv, r.ctx
    i = drv.post("tx", 0, regs.TX_DESC.pack(addr=0x10, length=60, flags=EOP_RS))
    ctx.run()
    assert drv.tx_wb(i).wb_status == TxStatus.DMA_ERROR and drv.stat("DMA_ERROR") == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_long_v2_list_split_over_passes(seed):
    r = message_rig(seed)
    drv = r.drv
    entries = [_entry(0x3000 + i) for i in range(2 * LIST_CHUNK + 3)]  # executed over several steps
    wb, resp = drv.admin(ndis.Opcode.V2_ADD_SA, ndis.pack_v2_add_sa_list(entries), resp_cap=8 + ndis.V2_ADD_SA_RESULT.size * len(entries))
    assert wb.status == AdminStatus.OK
    results = ndis.unpack_counted(resp, ndis.V2_ADD_SA_RESULT)
    assert len(results) == len(entries) and len({x.offload_handle for x in results}) == len(entries)
    assert all(x.offload_handle for x in results) and r.firmware.stats().sa_bundles == len(entries)


def test_ring_disabled_while_its_pass_waits():
    r = message_rig(13)
    drv, ctx = r.drv, r.ctx
    first = drv.send(udp_frame(b"abandoned"))
    while not ctx.pending:
        ctx.soon.popleft()()
    drv.w(regs.txq_reg(0, regs.QREG_CTRL), 0)  # the driver disables the ring under the pass
    before = bytes(ctx.memory.mem)
    ctx.run()
    assert bytes(ctx.memory.mem) == before and drv.tx_wb(first).wb_flags == 0
    assert r.datapath.extra.passes_abandoned == 1 and drv.stat("TX_PACKETS") == 0
    # re-enabled (HEAD back to 0), the ring works from its new start
    rx = drv.post_rx(1)
    drv.setup_ring("tx", 0, 16)
    drv.send(udp_frame(b"fresh"))
    ctx.run()
    assert drv.head("tx") == 1 and drv.rx(rx[0])[1] == udp_frame(b"fresh")


def _tx_mix(r: Rig) -> tuple[list[tuple[int, int]], dict[str, int], int]:
    """A TX burst mixing every outcome of one pass: good single-descriptor frames, refused descriptors
    (reserved flag, zero length, runt, both IPSEC flags, over MTU), a crypto frame without a handle, an
    unreachable buffer and a frame in two descriptors. Returns the write-backs, counters and HEAD."""
    drv, ctx = r.drv, r.ctx
    f = udp_frame(b"mix")
    idx = [drv.send(f, ring_doorbell=False),
           drv.send(f, flags=EOP_RS | 1 << 7, ring_doorbell=False),
           drv.send(b"", ring_doorbell=False),
           drv.send(f[:10], ring_doorbell=False),
           drv.send(f, flags=EOP_RS | int(regs.TxFlags.IPSEC_CRYPTO | regs.TxFlags.IPSEC_PACKET), ring_doorbell=False),
           drv.send(f + bytes(2000), ring_doorbell=False),
           drv.send(f, flags=EOP_RS | int(regs.TxFlags.IPSEC_CRYPTO), ring_doorbell=False),
           drv.post("tx", 0, regs.TX_DESC.pack(addr=0x10, length=60, flags=EOP_RS), ring_doorbell=False),
           drv.send(f[:20], flags=int(regs.TxFlags.REPORT_STATUS), ring_doorbell=False),
           drv.send(f[20:], ring_doorbell=False),
           drv.send(f, ring_doorbell=False)]
    drv.doorbell("tx")
    ctx.run()
    wbs = [(w.wb_status, w.wb_flags) for w in map(drv.tx_wb, idx)]
    names = ("TX_PACKETS", "TX_BYTES", "BAD_DESCRIPTOR", "DMA_ERROR", "TX_OFFLOAD_ERROR", "TX_CRYPTO_OK")
    return wbs, {n: drv.stat(n) for n in names}, drv.head("tx")


def test_tx_shared_memory_fast_path_matches_the_message_path():
    """Frames in one descriptor skip the pass generator when guest RAM is shared (device/nic/tx.py
    _tx_single); the write-backs, counters and HEAD must be those of the message path."""
    shared = make_rig()
    shared.drv.bus_master(True)
    shared.drv.enable()
    for kind in ("admin", "tx", "rx"):
        shared.drv.setup_ring(kind, 0, 16)
    fast = _tx_mix(shared)
    slow = _tx_mix(message_rig(3))
    assert fast == slow
    wbs, counts, head = fast
    assert [s for s, _ in wbs] == [TxStatus.OK, TxStatus.BAD_DESCRIPTOR, TxStatus.BAD_LENGTH, TxStatus.BAD_LENGTH,
                                   TxStatus.BAD_DESCRIPTOR, TxStatus.BAD_LENGTH, TxStatus.BAD_HANDLE,
                                   TxStatus.DMA_ERROR, TxStatus.OK, TxStatus.OK, TxStatus.OK]
    assert all(flags == TxWbFlags.DONE for _, flags in wbs) and head == 11
    assert counts["TX_PACKETS"] == 3 and counts["BAD_DESCRIPTOR"] == 5 and counts["DMA_ERROR"] == 1
    assert counts["TX_OFFLOAD_ERROR"] == 1
