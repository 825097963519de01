"""Write the seed corpora in tests/fuzz/corpus/<target>/ (small, deterministic; committed).

    python -m tests.fuzz.seeds

Seeds are valid inputs built by code independent of the parsers under test where possible (the guest
tools' request builders, the client side of the protocol), so the fuzzer starts from deep inside each format.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from dataclasses import replace

from device.contract import regs
from device.contract.ndis import Opcode, pack_v2_add_sa_list
from device.vfio_user import protocol as p
from guest_tools import sa as sa_wire
from tests.fuzz import targets
from tests.fuzz.run import CORPUS

C = p.Command


def _msg(msg_id: int, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return p.build_message(msg_id, command, payload, flags)


def _w32(msg_id: int, offset: int, value: int, posted: bool = True) -> bytes:
    return _msg(msg_id, C.REGION_WRITE, p.REGION_RW.pack(offset, 0, 4) + struct.pack("<I", value),
                p.FLAG_NO_REPLY if posted else 0)


def vfio_user_seeds() -> list[bytes]:
    info = b"".join([
        _msg(2, C.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0)),
        _msg(3, C.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 0, 0, 0, 0)),
        _msg(4, C.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 7, 0, 0, 0)),
        _msg(5, C.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(16, 0, 2, 0)),
        _msg(6, C.REGION_READ, p.REGION_RW.pack(0, 7, 64)),
        _msg(7, C.REGION_READ, p.REGION_RW.pack(regs.STATUS, 0, 4)),
    ])
    irqs = _msg(8, C.DEVICE_SET_IRQS, p.SET_IRQS.pack(20, int(p.IrqSetFlag.DATA_EVENTFD | p.IrqSetFlag.ACTION_TRIGGER),
                                                        2, 0, 1))
    dma_map = _msg(9, C.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0x100000, 0x1000))
    # An admin ring at IOVA 0 holding one GET_CAPS descriptor (RAM prefix), then enable + doorbell.
    desc = regs.ADMIN_DESC.pack(opcode=Opcode.GET_CAPS, resp_addr=0x100, resp_len=256).ljust(targets.RAM_PREFIX, b"\0")
    admin = b"".join([
        _msg(10, C.REGION_WRITE, p.REGION_RW.pack(4, 7, 2) + struct.pack("<H", 6)),  # COMMAND: memory + bus master
        _w32(11, regs.CTRL, int(regs.Ctrl.ENABLE)),
        _w32(12, regs.ADMINQ_BASE + regs.QREG_BASE_LO, 0), _w32(13, regs.ADMINQ_BASE + regs.QREG_BASE_HI, 0),
        _w32(14, regs.ADMINQ_BASE + regs.QREG_LEN, 8), _w32(15, regs.ADMINQ_BASE + regs.QREG_CTRL, 1),
        _w32(16, regs.ADMINQ_BASE + regs.QREG_TAIL, 1),
        _msg(17, C.REGION_READ, p.REGION_RW.pack(regs.ADMINQ_BASE + regs.QREG_HEAD, 0, 4)),
    ])
    multi = _msg(18, C.REGION_WRITE_MULTI, p.WRITE_MULTI_COUNT.pack(1) + p.WRITE_MULTI_ONE.pack(0, 0, 4, bytes(8)))
    return [
        bytes([0]) + _msg(1, C.VERSION, p.VERSION_HEAD.pack(0, 0) + b'{"capabilities":{"max_msg_fds":8}}\0'),
        bytes([0]) + _msg(1, C.VERSION, p.VERSION_HEAD.pack(0, 0) + b"[[[[[[[[]]]]]]]]\0"),
        bytes([1]) + info,
        bytes([1 | 2]) + irqs,
        bytes([1 | 4]) + dma_map,
        bytes([1 | 0x20]) + desc + admin,
        bytes([1 | 8]) + multi + _msg(19, C.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0, 0x100000, 0x1000)),
        bytes([1 | 16]) + _msg(20, C.DEVICE_RESET) + _msg(21, C.DEVICE_FEATURE, p.DEVICE_FEATURE.pack(8, 0)),
    ]


def _opcode_seed(opcode: int, request: bytes) -> bytes:
    opcodes = [int(o) for o in Opcode] + [0xFFFF]
    return bytes([opcodes.index(int(opcode))]) + request


def admin_seeds() -> list[bytes]:
    out, _ = targets._sa_pair()
    gcm, cbc6, ah, udp, esn, des3 = out
    seeds = [
        _opcode_seed(Opcode.GET_CAPS, b""),
        _opcode_seed(Opcode.GET_STATS, b""),
        _opcode_seed(Opcode.V1_ADD_SA, sa_wire.v1_add_sa(des3)),
        _opcode_seed(Opcode.V1_ADD_SA, sa_wire.v1_add_sa(ah)),
        _opcode_seed(Opcode.V1_ADD_UDPESP_SA, sa_wire.v1_add_udpesp_sa(replace(des3, encap=udp.encap))),
        _opcode_seed(Opcode.V2_ADD_SA_EX, sa_wire.v2_add_sa_ex(cbc6)),
        _opcode_seed(Opcode.V2_ADD_SA_EX, sa_wire.v2_add_sa_ex(esn)),
        _opcode_seed(Opcode.ADD_SA_PACKET, sa_wire.add_sa_packet(gcm)),
        _opcode_seed(Opcode.V2_UPDATE_SA, sa_wire.v2_update_sa(1, esn, 1)),
        _opcode_seed(Opcode.V2_DELETE_SA, sa_wire.v2_delete([1, 2])),
        _opcode_seed(Opcode.V1_DELETE_SA, struct.pack("<I", 1)),
        _opcode_seed(Opcode.GET_SA_STATS, struct.pack("<I", 1)),
        _opcode_seed(Opcode.LIST_SAS, struct.pack("<II", 0, 16)),
    ]
    from device.contract import ndis  # the list form: V2_ADD_SA_EX entries re-framed by the guest builder

    ex = ndis.V2AddSaEx.unpack(sa_wire.v2_add_sa_ex(gcm))
    entry = ndis.V2AddSa(next_offset=0, num_ext_hdrs=ex.num_ext_hdrs, flags=ex.flags, src_addr=ex.src_addr,
                         dest_addr=ex.dest_addr, udp_esp_encapsulation=ex.udp_esp_encapsulation,
                         sec_assoc=ex.sec_assoc, key_length=ex.key_length, key_data=ex.key_data)
    seeds.append(_opcode_seed(Opcode.V2_ADD_SA, pack_v2_add_sa_list([entry, entry])))
    return seeds


def _esp_plaintext(inner: bytes, next_header: int, block: int) -> bytes:
    """RFC 4303 §2.4: payload, padding 1, 2, 3 ... to the block (>= 4), pad length, next header."""
    align = max(block, 4)
    pad = (-(len(inner) + 2)) % align
    return inner + bytes(range(1, pad + 1)) + bytes([pad, next_header])


def esp_rx_seeds() -> list[bytes]:
    from guest_tools import packets

    udp4 = packets.udp_packet(targets.A, targets.B, 4000, 5000, b"seed payload")
    inner_tunnel = packets.udp_packet("10.0.0.1", "10.0.0.2", 4000, 5000, b"tunnelled")
    seeds = []
    for i, spec in enumerate(targets.SA_SPECS):
        if spec.get("proto") == "ah":
            continue
        tunnel = spec.get("mode") == "tunnel"
        block = 16 if "cipher" in spec and spec["cipher"]["alg"].startswith("aes") else (8 if "cipher" in spec else 1)
        body = (_esp_plaintext(inner_tunnel, 4, block) if tunnel
                else _esp_plaintext(udp4[20:], 17, block))  # transport: the UDP header and data
        seeds.append(bytes([i << 1, 0]) + body)
    seeds += [bytes([(i << 1) | 0x40, 0]) + b"seed payload" for i in range(len(targets.SA_SPECS))]
    seeds.append(bytes([0xC0, 7]) + b"sealed, then one byte damaged")
    # Raw frames: what the outbound twins put on the wire, and plain traffic.
    tx, handles = targets.sealing_firmware()
    for i, h in enumerate(handles):
        frame = tx.transmit(targets.MAC_HDR + (inner_tunnel if i == 1 else udp4), h, True).frame
        assert frame is not None, f"SA {i} sealed nothing"
        seeds.append(b"\x01\x00" + frame)
    seeds.append(b"\x01\x00" + targets.MAC_HDR + udp4)
    return seeds


SEEDS = {"vfio_user": vfio_user_seeds, "admin": admin_seeds, "esp_rx": esp_rx_seeds}


def main() -> None:
    for name, make in SEEDS.items():
        d = CORPUS / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for data in make():
            (d / hashlib.sha1(data).hexdigest()).write_bytes(data)
        print(f"{name}: {len(list(d.iterdir()))} seeds")


if __name__ == "__main__":
    main()
