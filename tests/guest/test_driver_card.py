"""The real guest driver against the real device model (tests/guest/harness.py), wire checked with scapy."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether

from device.contract.enums import Direction, EncAlg, IpProto, Mode
from device.contract.regs import CryptoStatus, TxStatus
from device.contract.sa import SaParams
from guest_tools import packets
from guest_tools.driver import AdminError, CardError, FirmwareError

from .harness import Harness, missing_device_piece

pytestmark = pytest.mark.skipif(bool(missing_device_piece()), reason=missing_device_piece() or "ok")

KEY = bytes(range(16)) + bytes.fromhex("cafebabe")
PEER_MAC = bytes.fromhex("020000000002")


def sa(direction: Direction, spi: int, src: str = "", dst: str = "", **kw) -> SaParams:
    if not src:
        src, dst = ("192.0.2.1", "192.0.2.2") if direction == Direction.OUTBOUND else ("192.0.2.2", "192.0.2.1")
    return SaParams(spi=spi, proto=IpProto.ESP, direction=direction, mode=Mode.TRANSPORT, src=src, dst=dst,
                    enc_alg=EncAlg.AES_GCM_128, enc_key=KEY, icv_len=16, **kw)


@pytest.fixture
def rig():
    h = Harness()
    card = h.card(ring_size=16).init(reset=True)
    yield h, card
    card.close()


def frame(card, n: int = 0, src="192.0.2.1", dst="192.0.2.2") -> bytes:
    ip = packets.udp_packet(src, dst, 4000, 5000, packets.pattern_payload(60, n))
    return packets.ethernet(PEER_MAC, card.ident.mac, ip)


def test_plain_send_reaches_the_wire_and_counts(rig):
    h, card = rig
    sent = [frame(card, n) for n in range(40)]  # more than the 16-entry ring: reclaim must work
    for f in sent:
        card.send(f)
    done = card.flush_tx()
    assert h.wire.sent == sent
    assert card.stats()["tx_packets"] == 40
    assert all(c.status == TxStatus.OK for c in done)


def test_crypto_offload_tx_decrypts_with_scapy(rig):
    h, card = rig
    handle = card.add_sa(sa(Direction.OUTBOUND, 0x1001, seq=99))
    for n in range(3):
        card.send(frame(card, n), handle, "crypto")
    assert [c.status for c in card.flush_tx()] == [TxStatus.OK] * 3
    ref = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=KEY)
    for n, wire in enumerate(h.wire.sent):
        pkt = Ether(wire)
        assert pkt[ESP].seq == 100 + n  # SaParams.seq is the last sent number
        inner = ref.decrypt(pkt[IP])
        assert bytes(inner[UDP].payload) == packets.pattern_payload(60, n)
    assert card.stats()["tx_crypto_ok"] == 3


def test_crypto_offload_rx_strips_esp(rig):
    h, card = rig
    handle = card.add_sa(sa(Direction.INBOUND, 0x2001))
    peer = SecurityAssociation(ESP, spi=0x2001, crypt_algo="AES-GCM", crypt_key=KEY)
    plain = packets.udp_packet("192.0.2.2", "192.0.2.1", 7, 8, b"hello through the card")
    enc = peer.encrypt(IP(plain), seq_num=1)
    h.inject(bytes(Ether(dst=card.ident.mac, src=PEER_MAC) / enc))
    got = card.recv(timeout=1.0)
    assert len(got) == 1
    pkt = got[0]
    assert pkt.crypto_done and pkt.crypto_status == CryptoStatus.SUCCESS and pkt.handle == handle
    assert pkt.inner is not None and pkt.inner[14:] == plain

    # A corrupted ICV: CryptoDone with an auth failure, nothing stripped.
    bad = bytearray(bytes(Ether(dst=card.ident.mac, src=PEER_MAC) / peer.encrypt(IP(plain), seq_num=2)))
    bad[-1] ^= 1
    h.inject(bytes(bad))
    pkt = card.recv(timeout=1.0)[0]
    assert pkt.crypto_status_name == "TRANSPORT_ESP_AUTH_FAILED" and pkt.inner is None


def test_packet_offload_loop(rig):
    h, card = rig
    out_h = card.add_sa(sa(Direction.OUTBOUND, 0x3001), offload="packet")
    # The inbound twin matches our own outbound packets (same endpoints), so the wire can loop back.
    in_h = card.add_sa(sa(Direction.INBOUND, 0x3001, "192.0.2.1", "192.0.2.2"), offload="packet")
    f = frame(card)
    card.send(f, out_h, "packet")
    assert card.flush_tx()[0].status == TxStatus.OK
    wire = h.wire.sent[-1]
    assert Ether(wire)[IP].proto == 50
    h.inject(wire.replace(PEER_MAC, card.ident.mac, 1))  # loop it back to ourselves
    pkt = card.recv(timeout=1.0)[0]
    assert pkt.decapsulated and pkt.handle == in_h and pkt.frame[14:] == f[14:]
    h.inject(wire.replace(PEER_MAC, card.ident.mac, 1))  # replayed: dropped by the window
    assert card.recv(timeout=0.05) == []
    assert card.stats()["rx_replay_drop"] == 1


def test_sa_list_update_delete_and_errors(rig):
    h, card = rig
    a = card.add_sa(sa(Direction.OUTBOUND, 0x4001, esn=True))
    b = card.add_sa(sa(Direction.INBOUND, 0x4002))
    assert {e.spi for e in card.list_sas()} == {0x4001, 0x4002}
    card.update_sa(a, 7)
    with pytest.raises(FirmwareError, match="INVALID_PARAMETER"):
        card.update_sa(b, 1)  # not an ESN SA
    with pytest.raises(FirmwareError, match="INVALID_PARAMETER"):
        card.add_sa(sa(Direction.INBOUND, 0x4002))  # duplicate SPI
    card.delete_sa([a])
    assert [e.offload_handle for e in card.list_sas()] == [b]
    with pytest.raises(FirmwareError):
        card.delete_sa([a])  # stale handle
    assert card.delete_all() == 1 and card.list_sas() == []


def test_esn_crypto_send_pushes_high_half(rig):
    h, card = rig
    handle = card.add_sa(sa(Direction.OUTBOUND, 0x5001, esn=True, seq=0xFFFF_FFFF))
    card.send(frame(card), handle, "crypto")  # seq 2^32: low half 0, high half 1 -> UPDATE_SA first
    assert card.flush_tx()[0].status == TxStatus.OK
    assert card.host.get(handle).seq_hi_pushed == 1
    ref = SecurityAssociation(ESP, spi=0x5001, crypt_algo="AES-GCM", crypt_key=KEY, esn_en=True, esn=1)
    pkt = Ether(h.wire.sent[-1])
    assert pkt[ESP].seq == 0
    assert bytes(ref.decrypt(pkt[IP])[UDP].payload) == packets.pattern_payload(60, 0)


def test_admin_timeout_names_the_server(rig):
    h, card = rig
    h.pump = lambda: 0  # the device stops doing work
    card.admin_timeout = 0.05
    with pytest.raises(AdminError, match="device server running"):
        card.caps()


def test_admin_command_completed_at_its_deadline_is_taken_not_lost(rig):
    """A starved card server finishes a command just as the driver gives up: the driver re-checks DONE
    after reading HEAD and takes the result (the SA really was added) instead of reporting a failure."""
    h, card = rig
    real_pump = h.pump
    h.pump = lambda: 0

    def starved_wait(ready, timeout, what):
        assert not ready()
        h.pump = real_pump  # the server gets the CPU back while the driver reads STATUS and HEAD
        raise CardError(f"timed out after {timeout:g} s waiting for {what}")

    card._wait = starved_wait
    handle = card.add_sa(sa(Direction.OUTBOUND, 0x7001))
    assert card.late_admin_completions == 1
    del card._wait  # back to the real wait
    assert [e.offload_handle for e in card.list_sas()] == [handle]
    assert card.late_admin_completions == 1


def test_second_process_reattaches_without_losing_sas(rig):
    h, card = rig
    handle = card.add_sa(sa(Direction.OUTBOUND, 0x6001))
    card.close()
    again = h.card(state=card.host, ring_size=8).init(reset=False)
    assert [e.offload_handle for e in again.list_sas()] == [handle]
    again.send(frame(again), handle, "crypto")
    assert again.flush_tx()[0].status == TxStatus.OK
    again.close()


def test_bad_mode_is_refused(rig):
    _, card = rig
    with pytest.raises(CardError, match="not an outbound crypto-offload"):
        card.send(frame(card), 0x1234, "crypto")


def test_key_material_is_wiped_from_the_admin_buffer(rig):
    """Datasheet §5.1: once DONE is set the driver may wipe the request buffer -- and it should, so an
    SA's keys do not linger in DMA memory until a later, shorter command overwrites part of them."""
    _, card = rig
    card.add_sa(sa(Direction.INBOUND, 0x1002))
    assert KEY not in bytes(card.aq_req.view) and KEY[:8] not in bytes(card.aq_req.view)
