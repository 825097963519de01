"""The BAR0 register file: identity, access rules, reset, interrupts (INTx, MSI-X, ITR), rings, stats."""

from __future__ import annotations

import pytest

from device.contract import regs
from device.contract.regs import Cause, Ctrl, ErrCode, IntMode, Status
from device.nic.card import QueueKind, Stat, firmware_capabilities
from device.pci import capabilities as caps
from device.pci.config_space import COMMAND, STATUS, StatusBits
from device.vfio_user.device_api import IRQ_INTX, IRQ_MSIX, REGION_CONFIG, VfioUserError


def r32(fn, offset: int) -> int:
    return int.from_bytes(fn.region_read(0, offset, 4), "little")


def w32(fn, offset: int, value: int) -> None:
    fn.region_write(0, offset, (value & 0xFFFF_FFFF).to_bytes(4, "little"))


def cfg_w16(fn, offset: int, value: int) -> None:
    fn.region_write(REGION_CONFIG, offset, value.to_bytes(2, "little"))


def set_mode(fn, mode: IntMode) -> None:
    w32(fn, regs.CTRL, (r32(fn, regs.CTRL) & ~Ctrl.INT_MODE) | mode << regs.CTRL_INT_MODE_SHIFT)


def enable_msix(fn, masked: bool = False) -> None:
    ctl = fn.msix_offset + caps.MSIX_CONTROL
    cfg_w16(fn, ctl, caps.MsixControl.ENABLE | (caps.MsixControl.FUNCTION_MASK if masked else 0))


# ----- identity and capabilities -----

def test_identity_reads(fn, profile):
    assert fn.region_read(0, regs.ID, 4) == b"IPNC"
    assert r32(fn, regs.reg("REGMAP_VERSION")) == regs.REGMAP_VERSION_VALUE
    mac = r32(fn, regs.reg("MAC_LO")).to_bytes(4, "little") + r32(fn, regs.reg("MAC_HI")).to_bytes(2, "little")
    assert mac == profile.nic.mac
    assert r32(fn, regs.reg("NUM_TXQ")) == profile.nic.tx_queues
    assert r32(fn, regs.reg("NUM_MSIX")) == profile.nic.msix_vectors
    assert r32(fn, regs.reg("MTU")) == profile.nic.mtu
    assert r32(fn, regs.STATUS) == Status.READY


def test_capability_registers_come_from_the_firmware_model(fn, profile):
    fw = firmware_capabilities(profile)
    assert r32(fn, regs.reg("SA_CAPACITY")) == fw.sa_capacity == profile.firmware["sa_capacity"]
    assert r32(fn, regs.reg("ENC_ALGOS")) == fw.encryption_mask
    assert r32(fn, regs.reg("AUTH_ALGOS")) == fw.authentication_mask
    features = regs.Features(r32(fn, regs.reg("FEATURES")))
    assert regs.Features.ESN in features and regs.Features.MSIX in features
    assert (regs.Features.PACKET_OFFLOAD in features) == fw.packet_offload
    enc = regs.EncAlg(r32(fn, regs.reg("ENC_ALGOS")))
    assert regs.EncAlg.AES_GCM_128 in enc and regs.EncAlg.DES_CBC not in enc  # default profile


# ----- access rules -----

def test_read_only_write_ignored_and_counted(fn):
    card = fn.card
    w32(fn, regs.ID, 0)
    w32(fn, regs.reg("SA_CAPACITY"), 7)
    assert fn.region_read(0, regs.ID, 4) == b"IPNC"
    assert card.ignored_writes == 2


def test_scratch_is_read_write(fn):
    w32(fn, regs.reg("SCRATCH"), 0xDEADBEEF)
    assert r32(fn, regs.reg("SCRATCH")) == 0xDEADBEEF


def test_unknown_offsets_read_zero_and_ignore_writes(fn):
    for off in (0x0F0, 0x2FFC, regs.DOORBELL_PAGE, regs.txq_reg(fn.card.profile.nic.tx_queues, regs.QREG_TAIL)):
        w32(fn, off, 0xFFFF_FFFF)
        assert r32(fn, off) == 0


def test_narrow_reads_and_ignored_narrow_writes(fn):
    assert fn.region_read(0, regs.ID + 1, 2) == b"PN"
    assert fn.region_read(0, regs.ID + 3, 2) == b"C\x00"  # crosses into REGMAP_VERSION (0x00010000)
    fn.region_write(0, regs.reg("SCRATCH"), b"\x12\x34")
    assert r32(fn, regs.reg("SCRATCH")) == 0 and fn.card.bad_accesses == 1
    odd = fn.region_read(0, regs.ID, 3)  # length 3 is split into 2 + 1
    assert odd == b"IPN"


def test_eight_byte_access_is_two_dwords(fn):
    off = regs.reg("SCRATCH") - 4  # MTU (0x110) and SCRATCH (0x114) form an aligned qword
    fn.region_write(0, off, (0xAABBCCDD_000005DC).to_bytes(8, "little"))
    assert r32(fn, regs.reg("MTU")) == 1500 and r32(fn, regs.reg("SCRATCH")) == 0xAABBCCDD


def test_out_of_range_and_absent_regions(fn):
    with pytest.raises(VfioUserError):
        fn.region_read(0, regs.BAR0_SIZE - 2, 4)
    with pytest.raises(VfioUserError):
        fn.region_read(1, 0, 4)
    with pytest.raises(VfioUserError):
        fn.region_write(5, 0, b"\0\0\0\0")
    with pytest.raises(VfioUserError):
        fn.region_info(9)


# ----- control -----

def test_ctrl_reset_self_clears_and_restores(fn):
    w32(fn, regs.reg("SCRATCH"), 5)
    w32(fn, regs.reg("IMS"), Cause.ADMINQ)
    w32(fn, regs.reg("ICS"), Cause.LINK)
    fn.card.add_stat(Stat.TX_PACKETS, 3)
    resets = []
    fn.card.reset_hooks.append(lambda: resets.append(1))
    w32(fn, regs.CTRL, Ctrl.RESET | Ctrl.ENABLE)
    assert r32(fn, regs.CTRL) == 0  # RESET reads 0, and the rest of that write was not applied
    assert r32(fn, regs.reg("SCRATCH")) == 0 and r32(fn, regs.reg("IMS")) == 0 and r32(fn, regs.ICR) == 0
    assert r32(fn, regs.stat_offset("TX_PACKETS")) == 0
    assert resets == [1]
    assert r32(fn, regs.STATUS) == Status.READY


def test_enable_sets_status_and_calls_hook(fn):
    seen = []
    fn.card.enable_hook = seen.append
    w32(fn, regs.CTRL, Ctrl.ENABLE)
    assert r32(fn, regs.STATUS) & Status.ENABLED
    w32(fn, regs.CTRL, 0)
    assert not r32(fn, regs.STATUS) & Status.ENABLED
    assert seen == [True, False]


def test_fatal_error_blocks_enable_until_reset(fn):
    w32(fn, regs.CTRL, Ctrl.ENABLE)
    fn.card.report_error(ErrCode.DMA_FAULT, 0x101, fatal=True)
    assert r32(fn, regs.STATUS) & Status.FATAL and not r32(fn, regs.STATUS) & Status.ENABLED
    assert (r32(fn, regs.reg("ERR_CODE")), r32(fn, regs.reg("ERR_INFO"))) == (ErrCode.DMA_FAULT, 0x101)
    assert r32(fn, regs.ICR) & Cause.ERROR
    w32(fn, regs.CTRL, Ctrl.ENABLE)
    assert not r32(fn, regs.STATUS) & Status.ENABLED
    w32(fn, regs.CTRL, Ctrl.RESET)
    w32(fn, regs.CTRL, Ctrl.ENABLE)
    assert r32(fn, regs.STATUS) & Status.ENABLED and r32(fn, regs.reg("ERR_CODE")) == 0


def test_mtu_bounds(fn):
    w32(fn, regs.reg("MTU"), 9000)
    assert r32(fn, regs.reg("MTU")) == 9000
    w32(fn, regs.reg("MTU"), 67)
    assert r32(fn, regs.reg("MTU")) == 9000
    assert r32(fn, regs.reg("ERR_CODE")) == ErrCode.BAD_MTU and r32(fn, regs.reg("ERR_INFO")) == 67


def test_link_change_raises_cause_and_survives_reset(fn):
    fn.card.set_link(True)
    assert r32(fn, regs.STATUS) & Status.LINK_UP and r32(fn, regs.ICR) & Cause.LINK
    w32(fn, regs.CTRL, Ctrl.RESET)
    assert r32(fn, regs.STATUS) & Status.LINK_UP and not r32(fn, regs.ICR)


# ----- interrupt registers -----

def test_icr_w1c_ics_ims_imc(fn):
    w32(fn, regs.reg("ICS"), Cause.ADMINQ | Cause.RX1 | (1 << 30))  # bit 30 is not a cause
    assert r32(fn, regs.ICR) == Cause.ADMINQ | Cause.RX1
    w32(fn, regs.ICR, Cause.RX1)
    assert r32(fn, regs.ICR) == Cause.ADMINQ
    assert r32(fn, regs.reg("ICS")) == 0  # write-only
    w32(fn, regs.reg("IMS"), Cause.TX0)
    w32(fn, regs.reg("IMS"), Cause.RX0)
    assert r32(fn, regs.reg("IMS")) == Cause.TX0 | Cause.RX0  # set bits accumulate
    w32(fn, regs.reg("IMC"), Cause.TX0)
    assert r32(fn, regs.reg("IMS")) == Cause.RX0


def test_poll_mode_raises_nothing(fn, ctx):
    w32(fn, regs.reg("IMS"), 0xFFFF_FFFF)
    w32(fn, regs.reg("ICS"), Cause.ADMINQ)
    assert ctx.irqs == []
    assert not fn.config.u16(STATUS) & StatusBits.INTERRUPT


def test_intx_level_follows_unmasked_causes(fn, ctx):
    set_mode(fn, IntMode.SINGLE)
    w32(fn, regs.reg("ICS"), Cause.RX0)  # masked: latched only
    assert ctx.irqs == [] and r32(fn, regs.ICR) == Cause.RX0
    w32(fn, regs.reg("IMS"), Cause.RX0)  # unmasking a pending cause asserts
    assert ctx.irqs == [(IRQ_INTX, 0)]
    assert fn.config.u16(STATUS) & StatusBits.INTERRUPT
    w32(fn, regs.reg("ICS"), Cause.ADMINQ | Cause.RX0)  # still asserted: no second edge
    assert ctx.irqs == [(IRQ_INTX, 0)]
    fn.irq_unmasked(IRQ_INTX)  # client unmasked while the level is still up: re-signal
    assert ctx.irqs == [(IRQ_INTX, 0)] * 2
    w32(fn, regs.ICR, 0xFFFF_FFFF)
    assert not fn.config.u16(STATUS) & StatusBits.INTERRUPT and not fn.intx_asserted


def test_intx_disable_holds_the_line_but_not_the_status(fn, ctx):
    set_mode(fn, IntMode.SINGLE)
    cfg_w16(fn, COMMAND, 0x0400)  # INTX_DISABLE
    w32(fn, regs.reg("IMS"), Cause.LINK)
    w32(fn, regs.reg("ICS"), Cause.LINK)
    assert ctx.irqs == []
    assert fn.config.u16(STATUS) & StatusBits.INTERRUPT
    cfg_w16(fn, COMMAND, 0)
    assert ctx.irqs == [(IRQ_INTX, 0)]


def test_msix_vectors_follow_ivar(fn, ctx):
    enable_msix(fn)
    set_mode(fn, IntMode.VECTORS)
    w32(fn, regs.reg("IMS"), 0xFFFF_FFFF)
    w32(fn, regs.reg("ICS"), Cause.TX1)
    w32(fn, regs.reg("ICS"), Cause.ADMINQ | Cause.RX3)
    assert ctx.irqs == [(IRQ_MSIX, 2), (IRQ_MSIX, 0), (IRQ_MSIX, 4)]
    assert not fn.config.u16(STATUS) & StatusBits.INTERRUPT  # INTx unused under MSI-X
    w32(fn, regs.ICR, 0xFFFF_FFFF)
    ctx.irqs.clear()
    # Reroute RX0 (cause bit 16 = IVAR[4] byte 0) to vector 3; clear TX0's valid bit.
    w32(fn, regs.REGISTER_BY_NAME["IVAR"].element_offset(4), 0x84838283)
    w32(fn, regs.REGISTER_BY_NAME["IVAR"].element_offset(2), 0x84838201)
    w32(fn, regs.reg("ICS"), Cause.RX0 | Cause.TX0)
    assert ctx.irqs == [(IRQ_MSIX, 3)]


def test_msix_single_mode_uses_vector_zero(fn, ctx):
    enable_msix(fn)
    set_mode(fn, IntMode.SINGLE)
    w32(fn, regs.reg("IMS"), Cause.RX2)
    w32(fn, regs.reg("ICS"), Cause.RX2)
    assert ctx.irqs == [(IRQ_MSIX, 0)]


def test_msix_function_mask_pends_in_pba(fn, ctx):
    enable_msix(fn, masked=True)
    set_mode(fn, IntMode.VECTORS)
    w32(fn, regs.reg("IMS"), 0xFFFF_FFFF)
    w32(fn, regs.reg("ICS"), Cause.TX0 | Cause.ADMINQ)
    assert ctx.irqs == []
    pba = int.from_bytes(fn.region_read(2, regs.MSIX_PBA_OFFSET, 8), "little")
    assert pba == 0b11  # vectors 0 and 1
    enable_msix(fn, masked=False)
    assert sorted(ctx.irqs) == [(IRQ_MSIX, 0), (IRQ_MSIX, 1)]
    assert fn.region_read(2, regs.MSIX_PBA_OFFSET, 8) == bytes(8)


def test_msix_table_entries_reset_masked(fn):
    assert fn.region_read(2, regs.MSIX_TABLE_OFFSET + 12, 4) == b"\x01\0\0\0"


def test_itr_defers_second_interrupt_on_a_vector(fn, ctx):
    enable_msix(fn)
    set_mode(fn, IntMode.VECTORS)
    w32(fn, regs.reg("ITR"), 0x1_0000 | 500)  # only 16 bits stored
    assert r32(fn, regs.reg("ITR")) == 500
    w32(fn, regs.reg("IMS"), 0xFFFF_FFFF)
    w32(fn, regs.reg("ICS"), Cause.RX0)
    w32(fn, regs.ICR, Cause.RX0)
    w32(fn, regs.reg("ICS"), Cause.RX0)
    w32(fn, regs.reg("ICS"), Cause.TX0)  # same vector 1, within the gap: no extra timer
    assert ctx.irqs == [(IRQ_MSIX, 1)]
    assert len(ctx.timers) == 1 and 0 < ctx.timers[0].when <= 500e-6
    ctx.timers[0].callback()
    assert ctx.irqs == [(IRQ_MSIX, 1), (IRQ_MSIX, 1)]


def test_interrupt_without_eventfd_is_counted(fn, ctx):
    ctx.configured = False
    enable_msix(fn)
    set_mode(fn, IntMode.SINGLE)
    w32(fn, regs.reg("IMS"), Cause.LINK)
    w32(fn, regs.reg("ICS"), Cause.LINK)
    assert fn.interrupts_lost == 1


# ----- rings -----

def _setup_ring(fn, base: int, length: int, addr: int = 0x1000_0000) -> None:
    w32(fn, base + regs.QREG_BASE_LO, addr & 0xFFFF_FFFF)
    w32(fn, base + regs.QREG_BASE_HI, addr >> 32)
    w32(fn, base + regs.QREG_LEN, length)


def test_doorbell_hook_on_tail_write(fn):
    calls = []
    fn.card.doorbell_hook = lambda kind, index: calls.append((kind, index))
    enables = []
    fn.card.ring_enable_hook = lambda kind, index, on: enables.append((kind, index, on))
    base = regs.txq_reg(1, 0)
    _setup_ring(fn, base, 256, 0x1_2345_6000)
    w32(fn, base + regs.QREG_TAIL, 5)  # disabled ring: stored, no doorbell
    assert calls == []
    w32(fn, base + regs.QREG_CTRL, regs.QueueCtrl.ENABLE)
    assert enables == [(QueueKind.TX, 1, True)]
    assert calls == [(QueueKind.TX, 1)]  # enabling with work already posted rings the bell
    ring = fn.card.tx_rings[1]
    assert ring.base_address == 0x1_2345_6000 and ring.pending() == 5 and ring.head == 0
    w32(fn, base + regs.QREG_TAIL, 9)
    assert calls[-1] == (QueueKind.TX, 1) and ring.tail == 9
    ring.set_head(9)
    assert r32(fn, base + regs.QREG_HEAD) == 9 and ring.pending() == 0
    w32(fn, base + regs.QREG_HEAD, 0)  # device-owned
    assert r32(fn, base + regs.QREG_HEAD) == 9
    w32(fn, base + regs.QREG_LEN, 16)  # fixed while enabled
    assert ring.length == 256


def test_tail_beyond_ring_is_refused(fn):
    calls = []
    fn.card.doorbell_hook = lambda kind, index: calls.append((kind, index))
    base = regs.rxq_reg(0, 0)
    _setup_ring(fn, base, 8)
    w32(fn, base + regs.QREG_CTRL, 1)
    w32(fn, base + regs.QREG_TAIL, 8)
    assert calls == [] and fn.card.rx_rings[0].tail == 0
    assert r32(fn, regs.reg("ERR_CODE")) == ErrCode.BAD_RING_CONFIG
    assert r32(fn, regs.reg("ERR_INFO")) == regs.QueueId.RX | 0


@pytest.mark.parametrize(("length", "addr"), [(0, 0x1000), (6, 0x1000), (8192, 0x1000), (8, 0x1020)])
def test_bad_ring_config_refuses_enable(fn, length, addr):
    base = regs.ADMINQ_BASE
    _setup_ring(fn, base, length, addr)
    w32(fn, base + regs.QREG_CTRL, 1)
    assert r32(fn, base + regs.QREG_CTRL) == 0
    assert r32(fn, regs.reg("ERR_CODE")) == ErrCode.BAD_RING_CONFIG
    assert r32(fn, regs.reg("ERR_INFO")) == regs.QueueId.ADMIN
    assert r32(fn, regs.ICR) & Cause.ERROR


def test_admin_doorbell(fn):
    calls = []
    fn.card.doorbell_hook = lambda kind, index: calls.append((kind, index))
    _setup_ring(fn, regs.ADMINQ_BASE, 16)
    w32(fn, regs.reg("AQ_CTRL"), 1)
    w32(fn, regs.reg("AQ_TAIL"), 1)
    assert calls == [(QueueKind.ADMIN, 0)]


# ----- statistics -----

def test_stat_lo_read_latches_hi(fn):
    card = fn.card
    lo = regs.stat_offset("RX_BYTES")
    card.add_stat(Stat.RX_BYTES, 0x1_0000_0005)
    assert r32(fn, lo) == 5
    card.add_stat(Stat.RX_BYTES, 0xFFFF_FFFF)  # carries into HI after the LO read
    assert r32(fn, lo + 4) == 1  # latched value, consistent with the LO read
    assert int.from_bytes(fn.region_read(0, lo, 8), "little") == 0x2_0000_0004
    w32(fn, lo, 0)  # read-only
    assert r32(fn, lo) == 4


# ----- function-level reset -----

def test_device_reset_resets_card_and_config(fn, ctx):
    set_mode(fn, IntMode.SINGLE)
    w32(fn, regs.reg("IMS"), Cause.LINK)
    w32(fn, regs.reg("ICS"), Cause.LINK)
    assert fn.intx_asserted
    fn.reset()
    assert not fn.intx_asserted and r32(fn, regs.CTRL) == 0 and r32(fn, regs.ICR) == 0
    assert fn.region_read(0, regs.ID, 4) == b"IPNC"
