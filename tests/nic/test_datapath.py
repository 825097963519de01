"""TX and RX rings through the real card, firmware and a loopback wire; checked with scapy."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from device.contract import ndis, regs
from device.contract.enums import EncAlg, Mode
from device.contract.regs import CryptoStatus, RxWbFlags, TxFlags, TxStatus, TxWbFlags
from device.nic import rx as rx_module
from device.vfio_user.device_api import IRQ_MSIX
from tests.fakes import GUARD, GUEST_BASE, GUEST_SIZE

from .conftest import Rig, make_rig
from .test_adminq import KEY, add_sa_ex

CARD_MAC = "02:49:50:4e:43:00"  # the default profile's MAC
PEER_MAC = "02:00:00:00:00:02"
EOP_RS = int(TxFlags.EOP | TxFlags.REPORT_STATUS)


def udp_frame(payload: bytes = b"hello card", dst: str = CARD_MAC, dport: int = 7) -> bytes:
    return bytes(Ether(dst=dst, src=PEER_MAC) / IP(src="10.0.0.1", dst="10.0.0.2") /
                 UDP(sport=1234, dport=dport) / Raw(payload))


def host_built_esp(spi: int, seq: int, inner: bytes, next_header: int = 17) -> tuple[bytes, int]:
    """What an NDIS crypto-offload host hands the card: ESP header, IV room, payload, RFC 4303 §2.4
    padding (to 4 bytes), pad length, next header, and 16 bytes of ICV room (RFC 4106)."""
    pad = (-(len(inner) + 2)) % 4
    esp = (struct.pack("!II", spi, seq) + bytes(8) + inner + bytes(range(1, pad + 1)) +
           bytes([pad, next_header]) + bytes(16))
    frame = bytes(Ether(dst=CARD_MAC, src=PEER_MAC) / IP(src="10.0.0.1", dst="10.0.0.2", proto=50) / Raw(esp))
    return frame, pad


def add_pair(drv) -> tuple[int, int]:
    handles = []
    for inbound in (False, True):
        wb, resp = drv.admin(ndis.Opcode.V2_ADD_SA_EX, add_sa_ex(0x1001, inbound))
        assert wb.fw_status == 0
        handles.append(ndis.HandleResponse.unpack(resp).offload_handle)
    return handles[0], handles[1]


def test_plaintext_tx_comes_back_on_rx(rig):
    drv = rig.drv
    drv.w(regs.IMS, regs.cause_tx(0) | regs.cause_rx(0))
    rx = drv.post_rx(4)
    frame = udp_frame()
    i = drv.send(frame)
    rig.ctx.run()
    wb = drv.tx_wb(i)
    assert (wb.wb_status, wb.wb_flags) == (TxStatus.OK, TxWbFlags.DONE)
    assert drv.head("tx") == 1
    d, data = drv.rx(rx[0])
    assert d.wb_flags == RxWbFlags.DD | RxWbFlags.EOP
    assert d.length == len(frame) and data == frame
    assert d.crypto_status == 0 and d.offload_handle == 0
    assert drv.head("rx") == 1
    assert (drv.stat("TX_PACKETS"), drv.stat("TX_BYTES")) == (1, len(frame))
    assert (drv.stat("RX_PACKETS"), drv.stat("RX_BYTES")) == (1, len(frame))
    assert drv.r(regs.ICR) & (regs.cause_tx(0) | regs.cause_rx(0)) == regs.cause_tx(0) | regs.cause_rx(0)


def test_tx_write_back_without_report_status_raises_no_cause(rig):
    drv = rig.drv
    i = drv.send(udp_frame(), flags=int(TxFlags.EOP))
    rig.ctx.run()
    assert drv.tx_wb(i).wb_flags == TxWbFlags.DONE
    assert not drv.r(regs.ICR) & regs.cause_tx(0)


def test_multi_descriptor_frame(rig):
    drv = rig.drv
    rx = drv.post_rx(1)
    frame = udp_frame(bytes(range(200)))
    parts = [frame[:14], frame[14:100], frame[100:]]
    first = drv.send(parts[0], flags=0, ring_doorbell=False)
    drv.send(parts[1], flags=0, ring_doorbell=False)
    drv.doorbell("tx")
    rig.ctx.run()
    assert drv.head("tx") == 0  # no EOP yet: the card waits for the rest of the frame
    last = drv.send(parts[2], flags=EOP_RS)
    rig.ctx.run()
    assert drv.head("tx") == 3
    for i in range(first, last + 1):
        assert drv.tx_wb(i).wb_flags == TxWbFlags.DONE
    d, data = drv.rx(rx[0])
    assert data == frame
    assert drv.stat("TX_PACKETS") == 1


def test_crypto_offload_roundtrip_checked_by_scapy(tmp_path):
    r = make_rig(wire={"type": "loopback", "pcap": str(tmp_path / "wire.pcap")})
    drv = r.drv
    drv.bus_master()
    drv.enable()
    for kind in ("admin", "tx", "rx"):
        drv.setup_ring(kind, 0, 16)
    out_h, in_h = add_pair(drv)
    inner = bytes(UDP(sport=1000, dport=2000) / Raw(b"secret payload 123"))
    frame, pad = host_built_esp(0x1001, 1, inner)
    rx = drv.post_rx(2)
    i = drv.send(frame, flags=int(TxFlags.EOP | TxFlags.REPORT_STATUS | TxFlags.IPSEC_CRYPTO), handle=out_h,
                 esp_offset=34, pad_length=pad, next_header=17)
    r.ctx.run()
    assert drv.tx_wb(i).wb_status == TxStatus.OK
    assert drv.stat("TX_CRYPTO_OK") == 1
    # scapy, an independent ESP implementation, decrypts what went on the wire.
    from scapy.utils import rdpcap

    wire_frames = rdpcap(str(tmp_path / "wire.pcap"))
    sent = wire_frames[0]
    assert sent[ESP].spi == 0x1001 and sent[ESP].seq == 1
    sa = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=KEY)
    plain = sa.decrypt(sent[IP])
    assert bytes(plain[UDP]) == inner
    # Back in through the loopback: the inbound SA verifies and decrypts in place.
    d, data = drv.rx(rx[0])
    assert d.wb_flags & RxWbFlags.CRYPTO_DONE and d.wb_flags & RxWbFlags.DD
    assert d.crypto_status == CryptoStatus.SUCCESS
    assert d.offload_handle == in_h
    assert d.wb_flags & RxWbFlags.HEADER_INFO
    assert (d.next_header, d.pad_length) == (17, pad)
    assert data[34 + 16 : 34 + 16 + len(inner)] == inner  # ESP header + IV stay, plaintext replaces ciphertext
    assert drv.stat("RX_CRYPTO_OK") == 1
    r.datapath.close()


def test_crypto_offload_esn_high_half_from_the_descriptor(tmp_path):
    """TxFlags.SEQ_HI: the frame's ESN high half comes from the descriptor (a host such as Linux, whose
    transmit path cannot issue UPDATE_SA, passes it per frame); scapy checks the ICV with that high half."""
    r = make_rig(wire={"type": "loopback", "pcap": str(tmp_path / "wire.pcap")})
    drv = r.drv
    drv.bus_master()
    drv.enable()
    for kind in ("admin", "tx", "rx"):
        drv.setup_ring(kind, 0, 16)
    sa = ndis.SaV2(flags=ndis.V2SaFlags.ESN_SA, operation=ndis.V2Operation.ESP, spi=0x1001,
                   encryption_algorithm=ndis.AlgoInfoV2(identifier=EncAlg.AES_GCM_128,
                                                        key_length=len(KEY), additional_info=16))
    req = ndis.V2AddSaEx(num_ext_hdrs=1, flags=0, src_addr=bytes([10, 0, 0, 1]) + bytes(12),
                         dest_addr=bytes([10, 0, 0, 2]) + bytes(12), udp_esp_encapsulation=0,
                         sec_assoc=(sa, ndis.SaV2()), key_length=len(KEY), key_offset=ndis.V2AddSaEx.LAYOUT.size,
                         key_data=KEY).pack()
    wb, resp = drv.admin(ndis.Opcode.V2_ADD_SA_EX, req)
    assert wb.fw_status == 0
    out_h = ndis.HandleResponse.unpack(resp).offload_handle
    inner = bytes(UDP(sport=1000, dport=2000) / Raw(b"after the wrap"))
    frame, pad = host_built_esp(0x1001, 5, inner)
    flags = int(TxFlags.EOP | TxFlags.REPORT_STATUS | TxFlags.IPSEC_CRYPTO | TxFlags.SEQ_HI)
    i = drv.send(frame, flags=flags, handle=out_h, esp_offset=34, pad_length=pad, next_header=17, seq_hi=7)
    r.ctx.run()
    assert drv.tx_wb(i).wb_status == TxStatus.OK
    from scapy.utils import rdpcap

    sent = rdpcap(str(tmp_path / "wire.pcap"))[0]
    for hi, ok in ((7, True), (0, False)):
        sa = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=KEY, esn_en=True, esn=hi)
        try:
            plain = sa.decrypt(sent[IP])
        except Exception:  # scapy raises on an ICV mismatch
            assert not ok
        else:
            assert ok and bytes(plain[UDP]) == inner
    r.datapath.close()


def test_tampered_frame_is_delivered_with_auth_failed(rig):
    drv = rig.drv
    out_h, in_h = add_pair(drv)
    inner = bytes(UDP(sport=1000, dport=2000) / Raw(b"x" * 40))
    frame, _ = host_built_esp(0x1001, 7, inner)
    # A sealed frame from the outbound SA (straight from the firmware), with one ciphertext bit flipped,
    # sent as plain TX: the loopback brings it to the inbound SA.
    sealed = rig.firmware.transmit(frame, out_h, packet_offload=False).frame
    assert sealed is not None
    tampered = bytearray(sealed)
    tampered[34 + 16 + 5] ^= 0x01
    rx = drv.post_rx(1)
    drv.send(bytes(tampered))
    rig.ctx.run()
    d, data = drv.rx(rx[0])
    assert d.wb_flags & RxWbFlags.DD and d.wb_flags & RxWbFlags.CRYPTO_DONE
    assert not d.wb_flags & RxWbFlags.HEADER_INFO
    assert d.crypto_status == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED
    assert d.offload_handle == in_h
    assert data == bytes(tampered)  # still delivered, untouched
    assert drv.stat("RX_AUTH_FAIL") == 1 and drv.stat("RX_CRYPTO_OK") == 0


def test_bad_offload_handle(rig):
    drv = rig.drv
    frame, _ = host_built_esp(0x1001, 1, b"abcd" * 4)
    i = drv.send(frame, flags=int(TxFlags.EOP | TxFlags.IPSEC_CRYPTO), handle=0x8000_0042)
    j = drv.send(frame, flags=int(TxFlags.EOP | TxFlags.IPSEC_CRYPTO), handle=0)
    rig.ctx.run()
    assert drv.tx_wb(i).wb_status == TxStatus.BAD_HANDLE
    assert drv.tx_wb(j).wb_status == TxStatus.BAD_HANDLE
    assert drv.stat("TX_OFFLOAD_ERROR") == 2 and drv.stat("TX_PACKETS") == 0


def test_rx_ring_full_counts_no_buffer_then_backlog_drains(rig):
    drv = rig.drv
    total = rx_module.RX_BACKLOG + 5
    for n in range(total):
        drv.send(udp_frame(n.to_bytes(2, "big") * 8), flags=int(TxFlags.EOP))
        if n % 8 == 7:
            rig.ctx.run()
    rig.ctx.run()
    assert drv.stat("TX_PACKETS") == total
    assert drv.stat("RX_PACKETS") == 0
    assert drv.stat("RX_NO_BUFFER") == total - rx_module.RX_BACKLOG
    # Posting buffers (RX doorbell) delivers the waiting frames in order.
    rx = drv.post_rx(15)
    rig.ctx.run()
    assert drv.stat("RX_PACKETS") == 15
    for k, i in enumerate(rx):
        _, data = drv.rx(i)
        assert data == udp_frame(k.to_bytes(2, "big") * 8)


def test_mac_filter_and_promiscuous(rig):
    drv = rig.drv
    rx = drv.post_rx(8)
    frames = [udp_frame(dst="02:00:00:00:00:99"), udp_frame(dst="ff:ff:ff:ff:ff:ff"),
              udp_frame(dst="01:00:5e:00:00:01"), udp_frame()]
    for f in frames:
        drv.send(f, flags=int(TxFlags.EOP))
    rig.ctx.run()
    assert drv.stat("RX_PACKETS") == 3
    assert rig.datapath.extra.rx_filtered == 1
    assert [drv.rx(i)[1] for i in rx[:3]] == frames[1:]
    drv.enable(promisc=True)
    drv.send(frames[0], flags=int(TxFlags.EOP))
    rig.ctx.run()
    assert drv.rx(rx[3])[1] == frames[0]


def _changed(before: bytes, after: bytes) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]


def test_malicious_tx_descriptors_are_refused_and_card_keeps_serving(rig):
    drv = rig.drv
    rx = drv.post_rx(2)
    frame = udp_frame()
    good = drv.put(frame)
    tx_base, _ = drv.rings[("tx", 0)]
    cases = [
        (dict(addr=GUEST_BASE + GUEST_SIZE - 10, length=len(frame), flags=EOP_RS), TxStatus.DMA_ERROR),
        (dict(addr=0xFFFF_FFFF_FFFF_FF00, length=200, flags=EOP_RS), TxStatus.DMA_ERROR),
        (dict(addr=good, length=0, flags=EOP_RS), TxStatus.BAD_LENGTH),
        (dict(addr=good, length=0xFFFF, flags=EOP_RS), TxStatus.BAD_LENGTH),
        (dict(addr=good, length=len(frame), flags=EOP_RS, seq_hi=1), TxStatus.BAD_DESCRIPTOR),
        (dict(addr=good, length=len(frame), flags=EOP_RS | 0x80), TxStatus.BAD_DESCRIPTOR),
        (dict(addr=good, length=len(frame), flags=EOP_RS | int(TxFlags.SEQ_HI), seq_hi=1), TxStatus.BAD_DESCRIPTOR),
        (dict(addr=good, length=len(frame), flags=EOP_RS | int(TxFlags.IPSEC_CRYPTO | TxFlags.IPSEC_PACKET)),
         TxStatus.BAD_DESCRIPTOR),
        (dict(addr=good, length=len(frame), flags=EOP_RS), TxStatus.OK),
    ]
    for fields, _ in cases:
        drv.post("tx", 0, regs.TX_DESC.pack(**fields), ring_doorbell=False)
    snapshot = bytes(rig.ctx.dma.mem)
    drv.doorbell("tx")
    rig.ctx.run()
    for i, (_, expected) in enumerate(cases):
        assert drv.tx_wb(i).wb_status == expected, i
        assert drv.tx_wb(i).wb_flags == TxWbFlags.DONE
    assert drv.stat("DMA_ERROR") == 2
    assert drv.stat("BAD_DESCRIPTOR") == 6
    assert drv.r(regs.reg("ERR_CODE")) == regs.ErrCode.DMA_FAULT
    assert drv.r(regs.reg("ERR_INFO")) == regs.QueueId.TX | 0
    assert drv.stat("TX_PACKETS") == 1 and drv.rx(rx[0])[1] == frame
    # Only TX write-back fields, the RX descriptor and its buffer changed in guest memory.
    allowed = set()
    for i in range(len(cases)):
        at = tx_base + i * 32 + 24 - GUEST_BASE
        allowed.update(range(at, at + 4))
    rx_desc = drv.desc_addr("rx", 0, rx[0]) - GUEST_BASE
    allowed.update(range(rx_desc, rx_desc + 32))
    rx_buf = drv.rx(rx[0])[0].addr - GUEST_BASE
    allowed.update(range(rx_buf, rx_buf + len(frame)))
    assert set(_changed(snapshot, bytes(rig.ctx.dma.mem))) <= allowed
    assert not drv.r(regs.STATUS) & regs.Status.FATAL


def test_no_eop_within_limit_is_refused(rig):
    drv = rig.drv
    drv.setup_ring("tx", 1, 8)
    for _ in range(7):
        drv.send(b"\x00" * 20, flags=0, q=1, ring_doorbell=False)
    drv.doorbell("tx", 1)
    rig.ctx.run()
    # A full ring with no EOP can never complete: the card refuses it instead of waiting forever.
    assert drv.head("tx", 1) == 7
    assert all(drv.tx_wb(i, q=1).wb_status == TxStatus.BAD_DESCRIPTOR for i in range(7))


def test_malicious_rx_descriptors(rig):
    drv = rig.drv
    good_buf = drv.alloc(2048)
    for fields in (dict(addr=good_buf, buf_len=2048, reserved0=1), dict(addr=good_buf, buf_len=0),
                   dict(addr=GUEST_BASE + GUEST_SIZE - 8, buf_len=2048), dict(addr=good_buf, buf_len=30)):
        drv.post("rx", 0, regs.RX_DESC.pack(**fields), ring_doorbell=False)
    drv.doorbell("rx")
    frame1, frame2 = udp_frame(b"one"), udp_frame(b"second frame")
    drv.send(frame1, flags=int(TxFlags.EOP))
    rig.ctx.run()
    drv.send(frame2, flags=int(TxFlags.EOP))
    rig.ctx.run()
    d = [drv.rx(i)[0] for i in range(4)]
    assert d[0].wb_flags == RxWbFlags.DD | RxWbFlags.ERROR and d[0].length == 0
    assert d[1].wb_flags == RxWbFlags.DD | RxWbFlags.ERROR
    assert d[2].wb_flags == RxWbFlags.DD | RxWbFlags.ERROR  # its buffer runs past guest memory
    assert drv.stat("BAD_DESCRIPTOR") == 2 and drv.stat("DMA_ERROR") == 1
    # frame1 skips the unusable descriptors and lands in the 30-byte buffer: cut, flagged, original length.
    assert d[3].wb_flags & RxWbFlags.ERROR and d[3].length == len(frame1)
    assert drv.peek(good_buf, 30) == frame1[:30]
    assert drv.peek(good_buf + 30, 8) == bytes([GUARD]) * 8
    assert drv.stat("RX_PACKETS") == 1
    # frame2 found no descriptor: it waits in the backlog (not lost) until the driver posts one.
    (i,) = drv.post_rx(1)
    rig.ctx.run()
    desc, data = drv.rx(i)
    assert desc.wb_flags & RxWbFlags.DD and data == frame2
    assert drv.stat("RX_PACKETS") == 2 and drv.stat("RX_NO_BUFFER") == 0


def packet_offload_rig(wire: dict) -> tuple[Rig, int, int]:
    """An enabled card with admin/TX/RX rings and a packet-offload SA pair (SPI 0x2002) on ``wire``."""
    r = make_rig(wire=wire)
    drv = r.drv
    drv.bus_master()
    drv.enable()
    for kind in ("admin", "tx", "rx"):
        drv.setup_ring(kind, 0, 16)
    handles = []
    for inbound in (False, True):
        wb, resp = drv.admin(ndis.Opcode.ADD_SA_PACKET, add_sa_packet(0x2002, inbound))
        assert wb.fw_status == 0, r.firmware.last_error
        handles.append(ndis.HandleResponse.unpack(resp).offload_handle)
    return r, handles[0], handles[1]


def test_frame_without_a_usable_descriptor_leaves_the_sa_untouched():
    """A packet-offload frame that finds only unusable RX descriptors must not reach the firmware: if it
    did, its sequence number would enter the replay window and the frame itself would be lost."""
    r, out_h, in_h = packet_offload_rig({"type": "loopback"})
    drv = r.drv
    drv.post("rx", 0, regs.RX_DESC.pack(addr=GUEST_BASE + GUEST_SIZE - 8, buf_len=2048))  # unreachable buffer
    drv.send(udp_frame(b"first"), flags=int(TxFlags.EOP | TxFlags.IPSEC_PACKET), handle=out_h)
    r.ctx.run()
    inbound = r.firmware.sadb.get(in_h).runtime()
    assert inbound.stats.packets == 0  # the firmware never saw it; the frame waits in the backlog
    rx = drv.post_rx(2)
    r.ctx.run()
    desc, data = drv.rx(rx[0])
    assert desc.crypto_status == CryptoStatus.SUCCESS and bytes(Ether(data)[UDP].payload) == b"first"
    assert inbound.stats.packets == 1 and drv.stat("RX_REPLAY_DROP") == 0
    r.datapath.close()


def test_tx_ring_unreachable_reports_queue_id(rig):
    drv = rig.drv
    drv.setup_ring("tx", 2, 4, base=0x40_0000_0000)
    drv.tails[("tx", 2)] = 1
    drv.doorbell("tx", 2)
    rig.ctx.run()
    assert drv.head("tx", 2) == 0
    assert drv.stat("DMA_ERROR") == 1
    assert drv.r(regs.reg("ERR_INFO")) == regs.QueueId.TX | 2
    assert drv.r(regs.ICR) & regs.Cause.ERROR
    wb, _ = drv.admin(ndis.Opcode.GET_CAPS)  # still serving
    assert wb.status == 0


def test_bus_master_off_means_no_dma(rig):
    drv = rig.drv
    rx = drv.post_rx(2)
    drv.bus_master(False)
    i = drv.send(udp_frame(), ring_doorbell=False)
    snapshot = bytes(rig.ctx.dma.mem)
    drv.doorbell("tx")
    rig.ctx.run()
    assert bytes(rig.ctx.dma.mem) == snapshot
    assert rig.datapath.extra.no_bus_master >= 1
    assert drv.head("tx") == 0
    drv.bus_master(True)
    drv.doorbell("tx")
    rig.ctx.run()
    assert drv.tx_wb(i).wb_flags == TxWbFlags.DONE
    assert drv.rx(rx[0])[0].wb_flags & RxWbFlags.DD


def test_reset_mid_traffic(rig):
    drv = rig.drv
    add_pair(drv)
    assert rig.firmware.stats().sa_bundles == 2
    drv.post_rx(2)
    drv.send(udp_frame())  # scheduled, not yet run
    drv.w(regs.CTRL, int(regs.Ctrl.RESET))
    rig.ctx.run()
    assert drv.stat("TX_PACKETS") == 0 and drv.stat("RX_PACKETS") == 0
    assert rig.firmware.stats().sa_bundles == 0
    assert drv.r(regs.CTRL) == 0 and not drv.r(regs.STATUS) & regs.Status.ENABLED
    assert drv.r(regs.txq_reg(0, regs.QREG_CTRL)) == 0
    # The driver starts over and traffic flows again.
    drv.enable()
    drv.setup_ring("tx", 0, 16)
    drv.setup_ring("rx", 0, 16)
    rx = drv.post_rx(1)
    drv.send(udp_frame(b"after reset"))
    rig.ctx.run()
    assert drv.rx(rx[0])[1] == udp_frame(b"after reset")


def test_itr_moderation_defers_the_second_interrupt(rig, monkeypatch):
    import types

    from device.nic import card as card_module

    monkeypatch.setattr(card_module, "time", types.SimpleNamespace(monotonic=lambda: rig.ctx.now))
    drv = rig.drv
    drv.enable_msix()
    drv.enable(int_mode=regs.IntMode.VECTORS)
    drv.w(regs.ITR, 1000)  # at most one interrupt per vector per millisecond
    drv.w(regs.IMS, regs.cause_rx(0))
    drv.post_rx(4)
    rig.ctx.advance(1.0)
    rig.ctx.irqs.clear()
    drv.send(udp_frame(b"1"), flags=int(TxFlags.EOP))
    rig.ctx.run()
    assert rig.ctx.irqs == [(IRQ_MSIX, 1)]  # RX0 -> vector 1 by the reset IVAR map
    drv.w(regs.ICR, regs.cause_rx(0))  # the driver handles it
    drv.send(udp_frame(b"2"), flags=int(TxFlags.EOP))
    rig.ctx.run()
    assert rig.ctx.irqs == [(IRQ_MSIX, 1)]  # held back
    rig.ctx.advance(0.0005)
    assert rig.ctx.irqs == [(IRQ_MSIX, 1)]
    rig.ctx.advance(0.0006)
    assert rig.ctx.irqs == [(IRQ_MSIX, 1), (IRQ_MSIX, 1)]


@pytest.mark.parametrize("mtu", [576, 1500])
def test_mtu_limit(rig, mtu):
    drv = rig.drv
    drv.w(regs.reg("MTU"), mtu)
    ok = drv.send(b"\x02" * (mtu + 18))
    too_long = drv.send(b"\x02" * (mtu + 19))
    rig.ctx.run()
    assert drv.tx_wb(ok).wb_status == TxStatus.OK
    assert drv.tx_wb(too_long).wb_status == TxStatus.BAD_LENGTH


def add_sa_packet(spi: int, inbound: bool) -> bytes:
    sa = ndis.SaV2(operation=ndis.V2Operation.ESP, spi=spi,
                   encryption_algorithm=ndis.AlgoInfoV2(identifier=EncAlg.AES_GCM_128,
                                                        key_length=len(KEY), additional_info=16))
    return ndis.AddSaPacket(
        num_ext_hdrs=1, flags=ndis.V2AddFlags.INBOUND if inbound else 0,
        src_addr=bytes([10, 0, 0, 1]) + bytes(12), dest_addr=bytes([10, 0, 0, 2]) + bytes(12),
        udp_esp_encapsulation=0, sec_assoc=(sa, ndis.SaV2()), key_length=len(KEY),
        key_offset=ndis.AddSaPacket.LAYOUT.size, source_switch_port_id=0, vlan_id=0, mode=Mode.TRANSPORT,
        encap_sport=0, encap_dport=0, replay_window=64, initial_seq=0, key_data=KEY,
    ).pack()


def test_packet_offload_roundtrip_and_replay_drop(tmp_path):
    r, out_h, in_h = packet_offload_rig({"type": "loopback", "pcap": str(tmp_path / "w.pcap")})
    drv = r.drv
    rx = drv.post_rx(4)
    plain = udp_frame(b"packet offload payload")
    i = drv.send(plain, flags=int(TxFlags.EOP | TxFlags.REPORT_STATUS | TxFlags.IPSEC_PACKET), handle=out_h)
    r.ctx.run()
    assert drv.tx_wb(i).wb_status == TxStatus.OK
    from scapy.utils import rdpcap

    on_wire = rdpcap(str(tmp_path / "w.pcap"))[0]
    wire_bytes = bytes(on_wire)
    assert on_wire[IP].proto == 50 and on_wire[ESP].spi == 0x2002 and on_wire[ESP].seq == 1
    sa = SecurityAssociation(ESP, spi=0x2002, crypt_algo="AES-GCM", crypt_key=KEY)
    assert bytes(sa.decrypt(on_wire[IP])[UDP].payload) == b"packet offload payload"
    d, data = drv.rx(rx[0])
    assert d.wb_flags & RxWbFlags.DECAPSULATED and d.wb_flags & RxWbFlags.CRYPTO_DONE
    assert d.crypto_status == CryptoStatus.SUCCESS and d.offload_handle == in_h
    assert bytes(Ether(data)[UDP].payload) == b"packet offload payload"
    # The same ESP packet again (replayed from the capture): refused by the window, counted, not delivered.
    drv.send(wire_bytes, flags=int(TxFlags.EOP))
    r.ctx.run()
    assert drv.stat("RX_REPLAY_DROP") == 1
    assert drv.stat("RX_PACKETS") == 1
    assert not drv.rx(rx[1])[0].wb_flags & RxWbFlags.DD
    r.datapath.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=8), point_into_memory=st.booleans())
def test_random_tx_descriptors_never_escape(descs, point_into_memory):
    r = make_rig()
    drv = r.drv
    drv.bus_master()
    drv.enable()
    drv.setup_ring("tx", 0, 16)
    drv.setup_ring("rx", 0, 16)
    drv.setup_ring("admin", 0, 4)
    rx = drv.post_rx(4, buf_len=256)
    payload = drv.put(udp_frame())
    tx_base, _ = drv.rings[("tx", 0)]
    for raw in descs:
        desc = bytearray(raw)
        if point_into_memory:  # aim at real memory so more descriptors get past the DMA check
            struct.pack_into("<Q", desc, 0, payload)
        drv.post("tx", 0, bytes(desc), ring_doorbell=False)
    snapshot = bytes(r.ctx.dma.mem)
    drv.doorbell("tx")
    r.ctx.run()
    allowed = set()
    for i in range(len(descs)):
        at = tx_base + i * 32 + 24 - GUEST_BASE
        allowed.update(range(at, at + 4))
    for i in rx:
        d = drv.desc_addr("rx", 0, i) - GUEST_BASE
        allowed.update(range(d, d + 32))
        buf = drv.rx(i)[0].addr - GUEST_BASE
        allowed.update(range(buf, buf + 256))
    assert set(_changed(snapshot, bytes(r.ctx.dma.mem))) <= allowed
    wb, _ = drv.admin(ndis.Opcode.GET_CAPS)  # the card still answers
    assert wb.status == 0
    r.datapath.close()


def test_frames_wait_while_bus_master_is_off(rig):
    drv = rig.drv
    rx = drv.post_rx(4)
    drv.bus_master(False)
    frames = [udp_frame(bytes([n]) * 20) for n in range(3)]
    for f in frames[:2]:
        rig.datapath.frame_received(f)  # straight from the wire
    rig.ctx.run()
    assert not drv.rx(rx[0])[0].wb_flags & RxWbFlags.DD
    drv.bus_master(True)
    rig.datapath.frame_received(frames[2])  # the next arrival drains the backlog first, in order
    rig.ctx.run()
    assert [drv.rx(i)[1] for i in rx[:3]] == frames
    assert drv.stat("RX_NO_BUFFER") == 0


# ---- receive policy in the RX write-back (datasheet §7.6, §12.1) ---------------------------------------

def test_filter_miss_is_indicated_unprocessed_with_policy_mismatch(rig):
    from tests.firmware.test_policy import AUTH_KEY, _v1

    drv = rig.drv
    # v1 inbound SA for UDP to port 5000 from 10.0.0.0/24 to 10.0.0.2 (NULL + HMAC-SHA1-96)
    wb, _ = drv.admin(ndis.Opcode.V1_ADD_SA, _v1(0x7001, dst="10.0.0.2", dport=5000))
    assert wb.fw_status == 0
    tx = SecurityAssociation(ESP, spi=0x7001, crypt_algo="NULL", auth_algo="HMAC-SHA1-96", auth_key=AUTH_KEY)

    def frame(dport: int, seq: int) -> bytes:
        inner = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=dport) / Raw(b"policy")
        return bytes(Ether(dst=CARD_MAC, src=PEER_MAC) / tx.encrypt(inner, seq_num=seq))

    rx = drv.post_rx(2)
    outside, inside = frame(6000, 1), frame(5000, 2)
    drv.send(outside)
    drv.send(inside)
    rig.ctx.run()
    d, data = drv.rx(rx[0])
    assert d.wb_flags & RxWbFlags.POLICY_MISMATCH and d.wb_flags & RxWbFlags.DD
    assert not d.wb_flags & RxWbFlags.CRYPTO_DONE and d.offload_handle == 0
    assert data == outside
    d, _ = drv.rx(rx[1])
    assert d.wb_flags & RxWbFlags.CRYPTO_DONE and d.crypto_status == CryptoStatus.SUCCESS
    assert not d.wb_flags & RxWbFlags.POLICY_MISMATCH and d.offload_handle


def test_packet_offload_selector_miss_is_dropped_and_counted():
    from device.contract.enums import Direction, IpProto
    from device.contract.sa import SaParams
    from device.contract.sa import add_sa_packet as encode_packet_sa

    r, _, _ = packet_offload_rig({"type": "loopback"})
    drv = r.drv
    sa = SaParams(spi=0x7002, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TUNNEL, src="10.0.0.1",
                  dst="10.0.0.2", enc_alg=EncAlg.AES_GCM_128, enc_key=KEY, icv_len=16,
                  inner_src="192.168.2.1", inner_dst="192.168.1.1")
    wb, _ = drv.admin(ndis.Opcode.ADD_SA_PACKET, encode_packet_sa(sa))
    assert wb.fw_status == 0
    peer = SecurityAssociation(ESP, spi=0x7002, crypt_algo="AES-GCM", crypt_key=KEY,
                               tunnel_header=IP(src="10.0.0.1", dst="10.0.0.2"))

    def frame(src: str, seq: int) -> bytes:
        return bytes(Ether(dst=CARD_MAC, src=PEER_MAC) /
                     peer.encrypt(IP(src=src, dst="192.168.1.1") / UDP() / Raw(b"sel"), seq_num=seq))

    rx = drv.post_rx(2)
    drv.send(frame("192.168.9.9", 1), flags=int(TxFlags.EOP))
    r.ctx.run()
    assert drv.stat("RX_POLICY_DROP") == 1 and drv.stat("RX_PACKETS") == 0
    assert not drv.rx(rx[0])[0].wb_flags & RxWbFlags.DD  # the descriptor is still the driver's
    drv.send(frame("192.168.2.1", 2), flags=int(TxFlags.EOP))
    r.ctx.run()
    d, data = drv.rx(rx[0])
    assert d.wb_flags & RxWbFlags.DECAPSULATED and IP(data[14:]).src == "192.168.2.1"
    r.datapath.close()


def test_transport_over_tunnel_through_the_descriptors(rig):
    """TxDesc.tunnel_handle seals both layers; the loopback brings the frame to the inbound pair and
    RxDesc says NEXT_CRYPTO_DONE with next_offload_handle = the inner SA."""
    from dataclasses import replace

    from device.contract.enums import Direction
    from firmware_model.capabilities import Capabilities
    from tests.firmware.test_combined import INNER_KEY, OUTER_KEY, PAYLOAD, _host_frame, _sa

    fw = rig.firmware
    fw.caps = replace(fw.caps, transport_tunnel_combined=True)  # as a profile offering it would
    inner_out = fw.add_sa(_sa(0x1111, INNER_KEY, inbound=False, tunnel=False))
    outer_out = fw.add_sa(_sa(0x2222, OUTER_KEY, inbound=False, tunnel=True))
    # the loopback returns the frame: inbound SAs with the outbound ones' endpoints
    inner_in = fw.add_sa([replace(p, direction=Direction.INBOUND) for p in _sa(0x1111, INNER_KEY, inbound=False,
                                                                                tunnel=False)])
    outer_in = fw.add_sa([replace(p, direction=Direction.INBOUND) for p in _sa(0x2222, OUTER_KEY, inbound=False,
                                                                                tunnel=True)])
    drv = rig.drv
    rx = drv.post_rx(1)
    frame = bytes(Ether(dst=CARD_MAC, src=PEER_MAC, type=0x0800)) + _host_frame()[14:]
    i = drv.send(frame, flags=int(TxFlags.EOP | TxFlags.REPORT_STATUS | TxFlags.IPSEC_CRYPTO), handle=inner_out,
                 tunnel_handle=outer_out)
    rig.ctx.run()
    assert drv.tx_wb(i).wb_status == TxStatus.OK
    d, data = drv.rx(rx[0])
    assert d.wb_flags & RxWbFlags.CRYPTO_DONE and d.wb_flags & RxWbFlags.NEXT_CRYPTO_DONE
    assert d.crypto_status == CryptoStatus.SUCCESS
    assert (d.offload_handle, d.next_offload_handle) == (outer_in, inner_in)
    assert data[86 + 8:86 + 8 + len(PAYLOAD)] == PAYLOAD
    assert Capabilities().transport_tunnel_combined is False  # the default profile does not offer it
