"""Admin queue: commands travel by DMA to the real firmware model and back, as a driver sees them."""

from __future__ import annotations

import logging

from device.contract import ndis, regs
from device.contract.enums import EncAlg
from device.contract.regs import AdminFlags, AdminStatus
from device.contract.status import NdisStatus
from device.vfio_user.device_api import IRQ_INTX
from tests.fakes import GUEST_BASE, GUEST_SIZE

from .conftest import make_rig

KEY = bytes.fromhex("4c80cdefbb5d10da906ac73c3613a634") + bytes.fromhex("2e443b68")  # AES-128 key || salt


def add_sa_ex(spi: int, inbound: bool, key: bytes = KEY) -> bytes:
    sa = ndis.SaV2(operation=ndis.V2Operation.ESP, spi=spi,
                   encryption_algorithm=ndis.AlgoInfoV2(identifier=EncAlg.AES_GCM_128,
                                                        key_length=len(key), additional_info=16))
    return ndis.V2AddSaEx(
        num_ext_hdrs=1, flags=ndis.V2AddFlags.INBOUND if inbound else 0,
        src_addr=bytes([10, 0, 0, 1]) + bytes(12), dest_addr=bytes([10, 0, 0, 2]) + bytes(12),
        udp_esp_encapsulation=0, sec_assoc=(sa, ndis.SaV2()), key_length=len(key),
        key_offset=ndis.V2AddSaEx.LAYOUT.size, key_data=key,
    ).pack()


def test_get_caps_matches_capability_registers(rig):
    drv = rig.drv
    drv.w(regs.IMS, int(regs.Cause.ADMINQ))
    wb, resp = drv.admin(ndis.Opcode.GET_CAPS, interrupt=True)
    assert wb.flags == AdminFlags.DONE | AdminFlags.INTERRUPT
    assert wb.status == AdminStatus.OK and wb.fw_status == NdisStatus.SUCCESS
    assert wb.cookie == 0x1234_5678_9ABC_DEF0 and wb.opcode == ndis.Opcode.GET_CAPS  # untouched
    caps = ndis.CAPS.unpack_exact(resp)
    assert wb.resp_len == ndis.CAPS.size
    # The firmware's answer and the card's capability registers describe the same card.
    assert caps.encryption_algorithms == drv.r(regs.reg("ENC_ALGOS"))
    assert caps.sa_offload_capacity == drv.r(regs.reg("SA_CAPACITY"))
    assert drv.head("admin") == 1
    assert drv.r(regs.ICR) & regs.Cause.ADMINQ
    assert (IRQ_INTX, 0) in rig.ctx.irqs


def test_add_sa_ex_then_delete(rig, caplog):
    drv = rig.drv
    caplog.set_level(logging.DEBUG)
    wb, resp = drv.admin(ndis.Opcode.V2_ADD_SA_EX, add_sa_ex(0x1001, inbound=False))
    assert (wb.status, wb.fw_status) == (AdminStatus.OK, NdisStatus.SUCCESS)
    handle = ndis.HandleResponse.unpack(resp).offload_handle
    assert handle != 0
    assert rig.firmware.stats().sa_bundles == 1
    delete = ndis.pack_v2_delete_sa_list([handle])
    wb, resp = drv.admin(ndis.Opcode.V2_DELETE_SA, delete)
    assert (wb.status, wb.fw_status) == (AdminStatus.OK, NdisStatus.SUCCESS)
    assert rig.firmware.stats().sa_bundles == 0
    # A second delete of the same handle: the descriptor is fine, the firmware says no.
    wb, _ = drv.admin(ndis.Opcode.V2_DELETE_SA, delete)
    assert wb.status == AdminStatus.OK and wb.fw_status == NdisStatus.INVALID_PARAMETER
    assert not wb.flags & AdminFlags.ERROR
    # Key material never reaches the log.
    for text in (KEY.hex(), KEY[:16].hex()):
        assert text not in caplog.text
    assert KEY[:16] not in caplog.text.encode("latin-1", "replace")


def test_response_truncated_to_capacity(rig):
    drv = rig.drv
    resp_addr = drv.alloc(64)
    wb, _ = drv.admin(ndis.Opcode.GET_CAPS, resp_cap=8, resp_addr=resp_addr)
    assert wb.status == AdminStatus.RESPONSE_TRUNCATED
    assert wb.flags & AdminFlags.ERROR and wb.flags & AdminFlags.DONE
    assert wb.resp_len == ndis.CAPS.size  # the length the whole response would have had
    assert drv.peek(resp_addr + 8, 56) == bytes([0xA5]) * 56  # nothing written past the capacity


def test_malformed_admin_descriptors_then_card_keeps_serving(rig):
    drv = rig.drv
    max_buf = drv.r(regs.reg("AQ_MAX_BUF"))
    wb, _ = drv.admin(ndis.Opcode.GET_CAPS, reserved2=1)
    assert wb.status == AdminStatus.BAD_DESCRIPTOR and wb.flags == AdminFlags.DONE | AdminFlags.ERROR
    wb, _ = drv.admin(ndis.Opcode.GET_CAPS, flags=0x40)
    assert wb.status == AdminStatus.BAD_DESCRIPTOR
    wb, _ = drv.admin(ndis.Opcode.GET_CAPS, req_len=max_buf + 1, req_addr=GUEST_BASE)
    assert wb.status == AdminStatus.REQUEST_TOO_LONG
    assert drv.stat("BAD_DESCRIPTOR") == 3
    # A request buffer outside guest memory: DMA_ERROR, counted, reported with the admin queue id.
    wb, _ = drv.admin(ndis.Opcode.V2_ADD_SA_EX, req_len=64, req_addr=GUEST_BASE + GUEST_SIZE - 32)
    assert wb.status == AdminStatus.DMA_ERROR
    assert drv.stat("DMA_ERROR") == 1
    assert drv.r(regs.reg("ERR_CODE")) == regs.ErrCode.DMA_FAULT
    assert drv.r(regs.reg("ERR_INFO")) == regs.QueueId.ADMIN
    # A response buffer outside guest memory.
    wb, _ = drv.admin(ndis.Opcode.GET_CAPS, resp_addr=0xDEAD_0000)
    assert wb.status == AdminStatus.DMA_ERROR and drv.stat("DMA_ERROR") == 2
    assert not drv.r(regs.STATUS) & regs.Status.FATAL
    wb, resp = drv.admin(ndis.Opcode.GET_CAPS)
    assert wb.status == AdminStatus.OK and len(resp) == ndis.CAPS.size
    assert drv.head("admin") == 6


def test_unknown_opcode_is_a_firmware_answer(rig):
    wb, _ = rig.drv.admin(0x7777)
    assert wb.status == AdminStatus.OK and wb.fw_status == NdisStatus.INVALID_OID


def test_admin_ring_unreachable_stops_without_moving_head():
    r = make_rig()
    drv = r.drv
    drv.bus_master(True)
    drv.enable()
    drv.setup_ring("admin", 0, 4, base=0x7000_0000)  # aligned, but not guest memory
    drv.tails[("admin", 0)] = 1
    drv.doorbell("admin")
    r.ctx.run()
    assert drv.head("admin") == 0
    assert drv.stat("DMA_ERROR") == 1
    assert drv.r(regs.reg("ERR_CODE")) == regs.ErrCode.DMA_FAULT
    r.datapath.close()


def test_no_work_inside_the_mmio_handler(rig):
    drv = rig.drv
    drv.post("admin", 0, regs.ADMIN_DESC.pack(opcode=ndis.Opcode.GET_CAPS), ring_doorbell=True)
    assert drv.head("admin") == 0  # only scheduled
    assert rig.ctx.soon
    rig.ctx.run()
    assert drv.head("admin") == 1
