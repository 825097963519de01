"""The mirror BAR (regs.MIRROR_BAR): offered for mmap over vfio-user, kept equal to its BAR0 sources.

The check reads the BAR through an independent mmap of the fd GET_REGION_INFO hands out, as QEMU's
vfio-user client does (hw/vfio/region.c: mmap(fd, region offset + sparse area offset)).
"""

from __future__ import annotations

import mmap
import struct

import pytest

from device.contract import regs
from device.contract.regs import Cause, Ctrl, Status
from device.vfio_user import protocol as p

from .conftest import make_rig
from .test_datapath import udp_frame


@pytest.fixture
def mirror(rig):
    info = rig.fn.region_info(regs.MIRROR_BAR)
    assert info.mmap_fd is not None and info.size == regs.MIRROR_BAR_SIZE
    assert [(a.offset, a.size) for a in info.sparse_areas] == [(0, regs.MIRROR_BAR_SIZE)]
    mm = mmap.mmap(info.mmap_fd, regs.MIRROR_BAR_SIZE, mmap.MAP_SHARED, mmap.PROT_READ, offset=info.mmap_offset)
    yield lambda off: struct.unpack_from("<I", mm, off)[0]
    mm.close()
    rig.card.close()


def _r4(rig, offset: int) -> int:
    return int.from_bytes(rig.fn.region_read(regs.MIRROR_BAR, offset, 4), "little")


def _pairs(rig):
    nic = rig.card.profile.nic
    return regs.mirror_sources(nic.tx_queues, nic.rx_queues)


def _assert_mirrors_equal(rig, mirror):
    for src, m in _pairs(rig).items():
        value = rig.drv.r(src)
        assert mirror(m) == value, f"mirror {m:#x} of {src:#x}"
        assert _r4(rig, m) == value  # a trapped read of the mirror BAR sees the same value


def test_only_the_mirror_bar_is_offered_for_mmap(rig):
    info = rig.fn.region_info(regs.MIRROR_BAR)
    data, fds = p.build_region_info_reply(1, 4096, regs.MIRROR_BAR, info)
    assert fds == (info.mmap_fd,)
    flags = p.REGION_INFO.unpack_from(data, p.HEADER.size)[1]
    assert flags & p.REGION_INFO_FLAG_MMAP and flags & p.REGION_INFO_FLAG_CAPS
    area = p.SPARSE_MMAP_AREA.unpack_from(data, p.HEADER.size + p.REGION_INFO.size + p.SPARSE_MMAP_CAP.size)
    assert area == (0, regs.MIRROR_BAR_SIZE)
    # BAR0 stays wholly trapped, so QEMU keeps posting its writes (doorbells); BAR2 is QEMU's MSI-X
    assert rig.fn.region_info(0).mmap_fd is None and rig.fn.region_info(2).mmap_fd is None
    rig.card.close()


def test_mirrors_follow_status_icr_and_heads_through_traffic(rig, mirror):
    drv = rig.drv
    _assert_mirrors_equal(rig, mirror)
    assert mirror(regs.M_STATUS) & Status.ENABLED
    drv.w(regs.IMS, regs.cause_tx(0) | regs.cause_rx(0))
    drv.post_rx(4)
    drv.send(udp_frame())
    rig.ctx.run()
    assert mirror(regs.M_TXQ_HEAD) == 1 and mirror(regs.M_RXQ_HEAD) == 1
    assert mirror(regs.M_ICR) & regs.cause_tx(0)
    assert mirror(regs.M_ICR) & regs.cause_tx(0)  # reading the mirror clears nothing
    _assert_mirrors_equal(rig, mirror)
    drv.w(regs.ICR, 0xFFFF_FFFF)
    assert mirror(regs.M_ICR) == 0
    drv.w(regs.ICS, Cause.ADMINQ)
    assert mirror(regs.M_ICR) == Cause.ADMINQ
    drv.w(regs.MTU, 1)  # refused: ERR_CODE/ERR_INFO and the ERROR cause
    assert mirror(regs.M_ERR_CODE) == regs.ErrCode.BAD_MTU and mirror(regs.M_ERR_INFO) == 1
    _assert_mirrors_equal(rig, mirror)


def test_mirrors_follow_reset_and_writes_to_them_are_ignored(rig, mirror):
    drv = rig.drv
    drv.w(regs.ICR, 0xFFFF_FFFF)
    drv.w(regs.ICS, Cause.ADMINQ)
    rig.fn.region_write(regs.MIRROR_BAR, regs.M_ICR, bytes(4))  # trapped write to the read-only BAR
    assert mirror(regs.M_ICR) == Cause.ADMINQ and rig.card.mirror_bar.ignored_writes == 1
    drv.w(regs.CTRL, Ctrl.RESET)
    assert mirror(regs.M_ICR) == 0 and mirror(regs.M_TXQ_HEAD) == 0
    assert mirror(regs.M_STATUS) == drv.r(regs.STATUS) and not mirror(regs.M_STATUS) & Status.ENABLED
    _assert_mirrors_equal(rig, mirror)


def test_mirror_survives_the_client_going_away(rig):
    rig.fn.region_info(regs.MIRROR_BAR)  # a client maps it ...
    rig.drv.w(regs.ICS, Cause.ADMINQ)
    rig.card.detached()  # ... and disconnects: the fd goes, the values stay
    assert rig.card._shared_file is None
    assert _r4(rig, regs.M_ICR) & Cause.ADMINQ
    info = rig.fn.region_info(regs.MIRROR_BAR)  # the next client gets a fresh file with the same values
    assert struct.unpack_from("<I", mmap.mmap(info.mmap_fd, regs.MIRROR_BAR_SIZE, prot=mmap.PROT_READ),
                              regs.M_ICR)[0] & Cause.ADMINQ
    rig.card.close()


def test_absent_queues_mirror_zero_and_every_mirror_is_in_the_datasheet():
    r = make_rig(nic={"tx_queues": 1, "rx_queues": 1})
    try:
        assert regs.txq_reg(1, regs.QREG_HEAD) not in _pairs(r)
        assert _r4(r, regs.M_TXQ_HEAD + 4) == 0 and _r4(r, regs.M_RXQ_HEAD + 28) == 0
    finally:
        r.datapath.close()
    text = (regs.__file__.rsplit("/device/", 1)[0] + "/docs/datasheet.md")
    with open(text, encoding="utf-8") as f:
        sheet = f.read()
    for m in regs.MIRRORS:
        assert f"| {m.name} |" in sheet
        assert m.offset % 4 == 0 and m.offset + 4 * m.count <= regs.MIRROR_BAR_SIZE


def test_profile_can_withhold_the_mmap():
    r = make_rig(nic={"mirror_mmap": False})
    try:
        assert r.fn.region_info(regs.MIRROR_BAR).mmap_fd is None  # trapped: still readable
        r.drv.w(regs.ICS, Cause.ADMINQ)
        assert _r4(r, regs.M_ICR) & Cause.ADMINQ
    finally:
        r.datapath.close()
