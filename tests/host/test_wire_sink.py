"""The kernel packets/s bench's host-side wire sink (ipsec_nic/bench/wire_sink.py): what it counts, what it
refuses, and that its process loses nothing. ESP frames come from scapy's own ESP (an encoder that is not
the project's), so the sink's decoder is checked against an independent implementation."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether

from ipsec_nic.bench.wire_sink import Checker, EspKey, FlowSpec, Tally, WireSink

SINK_MAC = bytes.fromhex("525400495009")
KEY, SALT = bytes(range(16)), b"\xa1\xb2\xc3\xd4"
SPI = 0x1000
FLOW = FlowSpec("10.0.0.1", "10.0.0.2", 9, 1372, SINK_MAC, EspKey(SPI, KEY, SALT))


def plain(payload: bytes = bytes(1372), src: str = "10.0.0.1", dport: int = 9) -> bytes:
    return bytes(Ether(dst="52:54:00:49:50:09", src="02:49:50:4e:43:00") / IP(src=src, dst="10.0.0.2")
                 / UDP(sport=40000, dport=dport) / payload)


def esp(seq: int, key: bytes = KEY, spi: int = SPI, payload: bytes = bytes(1372), iv: bytes | None = None) -> bytes:
    sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key + SALT, seq_num=seq)
    inner = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=40000, dport=9) / payload
    return bytes(Ether(dst="52:54:00:49:50:09", src="02:49:50:4e:43:00") / sa.encrypt(IP(bytes(inner)), iv=iv))


def test_the_sink_counts_esp_that_authenticates_and_decrypts_to_the_senders_datagram():
    frames = [esp(seq) for seq in (1, 2, 3, 5)]  # 4 never arrived
    t = Checker(FLOW).tally(frames)
    assert (t.frames, t.esp, t.plain, t.bad, t.replayed, t.other) == (4, 4, 0, 0, 0, 0)
    assert (t.seq_min, t.seq_max, t.seq_gaps) == (1, 5, 1)


def test_the_sink_refuses_esp_that_does_not_authenticate_or_is_not_the_flows():
    good = esp(7)
    flipped = bytearray(good)
    flipped[80] ^= 0x01  # a ciphertext byte
    cases = {
        "ESP ICV (does not authenticate)": [bytes(flipped), esp(8, key=bytes(16))],
        "ESP SPI": [esp(9, spi=0x2000)],
        "UDP payload": [esp(10, payload=b"\x01" + bytes(1371))],
        "UDP length": [esp(11, payload=bytes(100))],
    }
    for reason, frames in cases.items():
        t = Checker(FLOW).tally(frames)
        assert (t.esp, t.bad, t.reasons) == (0, len(frames), {reason: len(frames)}), reason
    # The same sequence number twice is counted once.
    t = Checker(FLOW).tally([good, good, esp(8)])
    assert (t.esp, t.replayed) == (2, 1)
    # A new sequence number under an IV already used with this key authenticates, but is not counted
    # (RFC 4106 §3.1); nor is it a sequence gap.
    t = Checker(FLOW).tally([esp(1, iv=b"\x00" * 7 + b"\x01"), esp(2, iv=b"\x00" * 7 + b"\x01"), esp(3)])
    assert (t.esp, t.iv_reused, t.bad, t.seq_gaps) == (2, 1, 0, 0)


def test_the_sink_verifies_esp_the_card_built_itself_under_packet_offload():
    """Packet offload: the card's firmware (firmware_model, its TX fast path as the card server runs it)
    gets the guest's clear datagram and builds the ESP packet, sequence number and IV its own. The sink,
    given only the bench's keys (kernel_pps.sink_flow), must count every such frame, in order."""
    from device.contract.enums import Direction
    from device.contract.sa_file import parse_sa_document
    from firmware_model.capabilities import Capabilities
    from firmware_model.firmware import Firmware
    from guest_tools.scenario import Spec, fill_keys, sa_document
    from ipsec_nic import kernel_scenarios as ks
    from ipsec_nic.bench.kernel_pps import SINK_MAC as MAC
    from ipsec_nic.bench.kernel_pps import sink_flow

    spec = Spec(name="kpps", alg="aes-gcm-128", mode="transport", family=4)
    sas = parse_sa_document(fill_keys(sa_document(spec)))
    _, sink_addr = ks.traffic_addresses(spec)
    out = next(p for p in sas if p.direction == Direction.OUTBOUND)
    card = Firmware(Capabilities())
    handle = card.add_sa([out], packet_offload=True)
    datagram = bytes(Ether(dst=MAC, src="02:49:50:4e:43:00") / IP(src=out.src, dst=sink_addr)
                     / UDP(sport=40000, dport=9) / bytes(1372))
    sent = [card.transmit(datagram, handle, True) for _ in range(50)]
    assert all(r.status == 0 and r.frame for r in sent)
    t = Checker(sink_flow(sas, sink_addr)).tally([r.frame for r in sent])
    assert (t.esp, t.bad, t.replayed, t.iv_reused, t.other) == (50, 0, 0, 0, 0), t.reasons
    assert (t.seq_min, t.seq_max, t.seq_gaps) == (1, 50, 0)  # RFC 4303 §3.3.3: a fresh SA starts at 1
    # The same frames under another key do not count.
    flow = sink_flow(sas, sink_addr)
    assert flow.esp is not None
    other = FlowSpec(flow.src, flow.dst, flow.dport, flow.payload, flow.dst_mac, EspKey(flow.esp.spi, bytes(16),
                                                                                        flow.esp.salt))
    t = Checker(other).tally([r.frame for r in sent])
    assert (t.esp, t.bad) == (0, 50) and t.reasons == {"ESP ICV (does not authenticate)": 50}


def test_the_sink_checks_clear_datagrams_and_leaves_other_traffic_aside():
    v6 = bytes(Ether(dst="33:33:00:00:00:16", type=0x86DD) / (b"\x60" + bytes(60)))
    bad_sum = bytearray(plain())
    bad_sum[40:42] = b"\x12\x34"  # UDP checksum
    wrong_mac = bytes(6) + plain()[6:]
    t = Checker(FLOW).tally([plain(), plain(), v6, plain(src="10.0.0.3"), bytes(bad_sum), wrong_mac,
                             plain(payload=bytes(1371) + b"\x01"), plain(dport=10)])
    assert (t.frames, t.plain, t.other, t.bad) == (8, 2, 2, 4)
    assert t.reasons == {"UDP checksum": 1, "destination MAC": 1, "UDP payload": 1, "UDP destination port": 1}
    # A flow without IPsec refuses ESP (it cannot check it).
    no_esp = FlowSpec("10.0.0.1", "10.0.0.2", 9, 1372, SINK_MAC)
    t = Checker(no_esp).tally([esp(1)])
    assert (t.esp, t.bad, t.reasons) == (0, 1, {"ESP on a flow without IPsec": 1})


def test_flow_spec_and_tally_survive_the_control_pipe_and_keys_stay_out_of_repr():
    assert FlowSpec.from_json(FLOW.to_json()) == FLOW
    assert KEY.hex() not in repr(FLOW) and SALT.hex() not in repr(FLOW)
    t = Tally(frames=3, esp=2, bad=1, seq_min=1, seq_max=2, reasons={"ESP SPI": 1})
    assert Tally.from_json(t.to_json()) == t


def test_the_sink_process_reads_every_frame_and_starts_afresh_at_each_take(tmp_path):
    path = tmp_path / "sink.sock"
    with WireSink(path, tmp_path / "sink.log") as sink:
        sink.expect(FLOW)
        tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Blocking sends: when the sink's queue is full the sender waits, as the card's wire holds frames.
        frames = [esp(seq) for seq in range(1, 301)] + [plain()] * 50
        for frame in frames:
            tx.sendto(frame, str(path))
        t = sink.take()
        assert (t.frames, t.esp, t.plain, t.bad, t.unverified) == (350, 300, 50, 0, 0)
        assert (t.seq_min, t.seq_max, t.seq_gaps) == (1, 300, 0)
        assert sink.take() == Tally()
        tx.sendto(esp(301), str(path))
        assert sink.take().esp == 1
        tx.close()
        pid = sink.pid
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not path.exists()


def test_the_sink_connects_to_its_sender_so_a_burst_it_cannot_read_yet_is_not_refused(tmp_path):
    """A UNIX datagram receiver queues only net.unix.max_dgram_qlen (10) datagrams from senders that are
    not its peer; the sink connects to the card's socket after its first frame, so a burst sent while it is
    descheduled (here: stopped) waits in the sender's send buffer instead of being refused with EAGAIN."""
    path, card = tmp_path / "sink.sock", tmp_path / "card.sock"
    tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx.bind(str(card))
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    with WireSink(path) as sink:
        sink.expect(FLOW)
        tx.sendto(plain(), str(path))
        assert sink.take().plain == 1  # the sink has seen the card's address and connected to it
        os.kill(sink.pid, signal.SIGSTOP)
        try:
            tx.setblocking(False)
            for _ in range(100):
                tx.sendto(plain(), str(path))  # BlockingIOError after 11 if the sink were not connected
        finally:
            os.kill(sink.pid, signal.SIGCONT)
        t = sink.take()
        assert (t.frames, t.plain) == (100, 100)
    tx.close()
