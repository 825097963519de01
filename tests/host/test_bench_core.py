"""The benchmark harness's arithmetic and output (ipsec_nic/bench/core.py), and the vfio-user client's
access accounting against the real server with a sparse-mmapped region (tests/protocol/fake_device.py)."""

from __future__ import annotations

import json
import os
import struct

import pytest

from device.vfio_user.server import VfioUserServer
from ipsec_nic.bench.core import Row, at_least, at_most, format_markdown, format_table, rates, write_json
from ipsec_nic.bench.vfio_client import LinkMmio, VfioUserLink

from ..protocol.fake_device import FakeDevice


def test_ratio_and_target_follow_value_and_reference():
    fast = Row("x", 450.0, "pkt/s", 1000.0, "ref/s", at_least(0.45))
    slow = Row("x", 440.0, "pkt/s", 1000.0, "ref/s", at_least(0.45))
    assert fast.ratio == pytest.approx(0.45) and fast.met is True
    assert slow.met is False
    cpu = Row("cpu", 12.0, "µs", 10.0, "µs", at_most(1.1))
    assert cpu.ratio == pytest.approx(1.2) and cpu.met is False
    assert Row("cpu", 11.0, "µs", 10.0, "µs", at_most(1.1)).met is True


def test_rows_without_value_or_reference_have_no_ratio_and_no_verdict():
    missing = Row("kernel driver", None, "pkt/s", target=at_least(3), note="n/a — needs the kernel driver")
    assert missing.ratio is None and missing.met is None
    report = Row("boot", 12.5, "s")
    assert report.ratio is None and report.met is None
    table = format_table([missing, report])
    assert "n/a — needs the kernel driver" in table and "12.5" in table
    assert "| kernel driver | n/a — needs the kernel driver |" in format_markdown([missing])


def test_json_rows_carry_the_documented_fields(tmp_path):
    path = tmp_path / "bench.json"
    write_json([Row("a", 2.0, "x/s", 4.0, "ref", at_least(0.4))], path, {"quick": True})
    (row,) = json.loads(path.read_text())["rows"]
    assert {"name", "value", "unit", "reference", "ratio", "target", "met"} <= row.keys()
    assert row["ratio"] == pytest.approx(0.5) and row["target"] == "≥ 0.4×" and row["met"] is True


def test_rates_ranks_a_cheaper_call_above_a_dearer_one():
    cheap, dear = rates([(len, b"x"), (lambda n: sum(range(n)), 2000)], seconds=0.06, rounds=3, batch=20)
    assert cheap > 5 * dear > 0


def test_access_accounting_follows_the_servers_sparse_mmap(tmp_path):
    """BAR2 of the fake device: its first page is a sparse-mmap area (no message), the second is not."""
    device = FakeDevice()
    server = VfioUserServer(str(tmp_path / "s.sock"), device)
    thread = server.start_in_thread()
    link = VfioUserLink(server.socket_path)
    try:
        link.negotiate()
        mmio = LinkMmio(link, 2, 8192)
        mmio.write32(0x10, 0xA5A5_0001)  # mapped page
        mmio.write32(0x1010, 0x5A5A_0002)  # trapped page: a posted REGION_WRITE
        assert mmio.read32(0x10) == 0xA5A5_0001
        assert mmio.read32(0x1010) == 0x5A5A_0002  # the read also proves the posted write landed
        c = link.counts
        assert (c.reads, c.writes, c.mapped_reads, c.mapped_writes, c.messages) == (2, 2, 1, 1, 2)
        # Both paths reach the same device memory.
        assert struct.unpack("<I", os.pread(device.bar2_fd, 4, 0x10))[0] == 0xA5A5_0001
        mmio.close()
    finally:
        link.close()
        server.stop()
        thread.join(5)
        os.close(device.bar2_fd)


def test_unknown_benchmark_name_is_refused_with_the_list(capsys):
    from ipsec_nic.cli import main

    assert main(["bench", "--only", "esp,nonsense"]) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err and "vfio-user" in err


def test_kernel_pps_rows_take_the_median_per_mode_and_compare_offload_with_both_references():
    from ipsec_nic.bench.kernel_pps import Slice, kernel_rows

    # Three interleaved rounds; one disturbed round per mode, which the median drops.
    slices = [Slice("offload", 1100, 1000, 2.0, 1000), Slice("packet", 1300, 1300, 2.0, 1300),
              Slice("software", 320, 300, 2.0, 0), Slice("plain", 1300, 1200, 2.0, 0),
              Slice("offload", 1000, 900, 2.0, 900), Slice("packet", 1200, 1200, 2.0, 1200),
              Slice("software", 500, 500, 2.0, 0), Slice("plain", 1600, 1500, 2.0, 0),
              Slice("offload", 300, 100, 2.0, 100), Slice("packet", 200, 200, 2.0, 200),
              Slice("software", 100, 90, 2.0, 0), Slice("plain", 1500, 1400, 2.0, 0)]
    vs_software, vs_plain, packet, packet_vs_plain, software, plain = kernel_rows(slices)
    assert vs_software.value == pytest.approx(450.0) and vs_software.reference == pytest.approx(150.0)
    assert vs_software.ratio == pytest.approx(3.0) and vs_software.met is True
    assert vs_plain.reference == pytest.approx(700.0) and vs_plain.ratio == pytest.approx(450 / 700)
    assert vs_plain.met is False  # 0.64× < 0.7×
    assert (software.value, plain.value) == (pytest.approx(150.0), pytest.approx(700.0))
    # Packet offload: reported against both references, no target of its own (issue 12's are on crypto).
    assert "packet offload" in packet.name and "packet offload vs no IPsec" in packet_vs_plain.name
    assert packet.ratio == pytest.approx(600 / 150) and packet_vs_plain.ratio == pytest.approx(600 / 700)
    assert packet.target is None and packet_vs_plain.target is None and packet.met is None
    assert "CPU per packet" in packet.note
    # Sent but not received: offload 2400 sent, 2000 received.
    assert "offload 17%" in vs_software.note and "packet 0%" in vs_software.note


def test_kernel_pps_cpu_per_packet_is_the_median_over_the_modes_slices():
    from ipsec_nic.bench.kernel_pps import Slice, cpu_per_packet, cpu_seconds, kernel_rows

    slices = [Slice("plain", 100, 100, 1.0, 0, card_cpu=0.01, qemu_cpu=0.02),
              Slice("plain", 100, 200, 1.0, 0, card_cpu=0.01, qemu_cpu=0.08),
              Slice("plain", 100, 100, 1.0, 0, card_cpu=0.03, qemu_cpu=0.05),
              Slice("offload", 100, 100, 1.0, 100, card_cpu=0.04, qemu_cpu=0.01),
              Slice("packet", 100, 100, 1.0, 100, card_cpu=0.02, qemu_cpu=0.005),
              Slice("software", 100, 50, 1.0, 0, card_cpu=0.01, qemu_cpu=0.03)]
    assert cpu_per_packet(slices, "plain") == (pytest.approx(100.0), pytest.approx(400.0))
    assert cpu_per_packet(slices, "offload") == (pytest.approx(400.0), pytest.approx(100.0))
    rows = kernel_rows(slices)
    assert "card server 400 µs, QEMU 100 µs" in rows[0].note and "card server 200 µs, QEMU 600 µs" in rows[4].note
    assert "card server 200 µs, QEMU 50 µs" in rows[2].note
    assert cpu_seconds(None) == 0.0 and cpu_seconds(os.getpid()) > 0.0


def test_kernel_pps_counts_what_the_wire_sink_checked_and_refuses_a_mode_that_did_not_happen():
    from ipsec_nic.bench.kernel_pps import Slice, check_slice, kernel_rows, parse_slice
    from ipsec_nic.bench.wire_sink import Tally

    output = "\n".join([
        "@@kpps card_before", "     ipsec_tx_pkts: 10", "     tx_doorbells: 7", "     queue_irqs: 3",
        "     card_tx_packets: 20", "     tx_ok: 30", "     fw_tx_crypto: 40", "     fw_tx_packet_offload: 5",
        "@@kpps send", "KPPS-SENT 700 0 2.5", "@@kpps card_after", "     ipsec_tx_pkts: 660",
        "     tx_doorbells: 72", "     queue_irqs: 133", "     card_tx_packets: 673", "     tx_ok: 685",
        "     fw_tx_crypto: 690", "     fw_tx_packet_offload: 5"])
    # 650 ESP datagrams checked, 3 other frames (IPv6 neighbour discovery), sequence numbers 1..652.
    tally = Tally(frames=653, esp=650, other=3, seq_min=1, seq_max=652)
    s = parse_slice("offload", output, tally)
    assert (s.sent, s.received, s.seconds, s.card_offloaded) == (700, 650, 2.5, 650)
    assert (s.fw_crypto, s.fw_packet) == (650, 0)
    assert (s.card_wire_tx, s.wire_frames, s.refused, s.seq_gaps) == (653, 653, 0, 2)
    assert s.wire_refused == 2  # completed by the card (tx_ok +655), not taken by its wire (+653)
    assert s.pps == pytest.approx(260.0)
    # The driver's doorbell and interrupt counters, per received packet in the rows' notes.
    assert (s.doorbells, s.irqs) == (65, 130)
    rows = kernel_rows([s, Slice("packet", 1, 1, 1.0, 1), Slice("software", 1, 1, 1.0, 0),
                        Slice("plain", 1, 1, 1.0, 0)])
    assert "0.10 TX doorbells, 0.20 interrupts" in rows[0].note
    assert "the sink did not read: 0" in rows[0].note and "(the sink's queue full): 2" in rows[0].note
    check_slice(s)
    # Without IPsec the clear datagrams count, and ESP of the flow is refused; under IPsec the other way round.
    plain = parse_slice("plain", output, Tally(frames=653, plain=650, esp=1, other=2))
    assert (plain.received, plain.refused, plain.refusals) == (650, 1, "ESP without an SA: 1")
    leaked = parse_slice("software", output, Tally(frames=653, esp=640, plain=10, bad=3,
                                                   reasons={"ESP ICV (does not authenticate)": 3}))
    assert (leaked.received, leaked.refused) == (640, 13)
    with pytest.raises(RuntimeError, match=r"refused 13 .*ICV.*: 3, clear UDP under IPsec: 10"):
        check_slice(leaked)
    # Frames the card's wire took that the sink never read are reported, not hidden.
    lost = kernel_rows([Slice("offload", 5, 5, 1.0, 5, card_wire_tx=9, wire_frames=7), Slice("packet", 1, 1, 1.0, 1),
                        Slice("software", 1, 1, 1.0, 0), Slice("plain", 1, 1, 1.0, 0)])
    assert "the sink did not read: 2" in lost[0].note
    with pytest.raises(RuntimeError, match="driver counted 10 offloaded"):
        check_slice(Slice("offload", 700, 650, 2.5, 10, fw_crypto=650))
    with pytest.raises(RuntimeError, match="offload counters moved"):
        check_slice(Slice("software", 700, 650, 2.5, 650))
    # The firmware's per-kind counters say which offload the card did: each mode must move its own by at
    # least what the sink checked and the other not at all; neither may move without an offload.
    check_slice(Slice("packet", 700, 650, 2.5, 650, fw_packet=650))
    with pytest.raises(RuntimeError, match="firmware counted 0 packet-offload frames"):
        check_slice(Slice("packet", 700, 650, 2.5, 650, fw_crypto=650))  # the card sealed what the guest built
    with pytest.raises(RuntimeError, match="firmware counted 3 crypto-offload frames"):
        check_slice(Slice("packet", 700, 650, 2.5, 653, fw_packet=650, fw_crypto=3))
    with pytest.raises(RuntimeError, match="firmware counted 0 crypto-offload frames"):
        check_slice(Slice("offload", 700, 650, 2.5, 650, fw_packet=650))
    with pytest.raises(RuntimeError, match="firmware crypto 0, packet 4"):
        check_slice(Slice("plain", 700, 650, 2.5, 0, fw_packet=4))
    with pytest.raises(RuntimeError, match="received nothing"):
        check_slice(Slice("plain", 700, 0, 2.5, 0))
    with pytest.raises(RuntimeError, match="printed no result"):
        parse_slice("plain", "@@kpps send\nTraceback", Tally())
    with pytest.raises(ValueError, match="packet, software"):
        kernel_rows([Slice("offload", 1, 1, 1.0, 1), Slice("plain", 1, 1, 1.0, 0)])
    # An IV used twice under the SA's key is refused with the replays (the sink does not count it).
    reused = parse_slice("packet", output, Tally(frames=653, esp=650, iv_reused=2, other=1, seq_min=1, seq_max=652))
    assert (reused.refused, reused.seq_gaps) == (2, 0) and "IV used twice" in reused.refusals


def test_kernel_pps_slices_add_sas_only_under_ipsec_and_the_flow_carries_the_outbound_key():
    from device.contract.sa_file import parse_sa_document
    from guest_tools.scenario import Spec, fill_keys, sa_document
    from ipsec_nic.bench.kernel_pps import SINK_MAC, sink_flow, sink_neighbour, slice_commands

    prepare, send, finish = slice_commands("plain", "eth1", "10.0.0.2", 3.0, "SA-BATCH\n")
    assert "SA-BATCH" not in prepare and "ethtool -S eth1" in prepare and "ip xfrm state flush" in finish
    assert "10.0.0.2 9 3.0 1400" in send
    assert "SA-BATCH" in slice_commands("offload", "eth1", "10.0.0.2", 3.0, "SA-BATCH\n")[0]
    assert "SA-BATCH" in slice_commands("packet", "eth1", "10.0.0.2", 3.0, "SA-BATCH\n")[0]
    assert sink_neighbour("eth1", "10.0.0.2") == f"ip neigh replace 10.0.0.2 lladdr {SINK_MAC} dev eth1 nud permanent"
    sas = parse_sa_document(fill_keys(sa_document(Spec(name="k", alg="aes-gcm-128", mode="transport", family=4))))
    flow = sink_flow(sas, "10.0.0.2")
    out = next(p for p in sas if p.spi == flow.esp.spi)
    assert (flow.src, flow.dst, flow.dport, flow.payload) == (out.src, "10.0.0.2", 9, 1372)
    assert flow.esp.key + flow.esp.salt == out.enc_key and len(flow.esp.key) == 16


def test_kernel_pps_cpu_window_is_the_cpu_of_the_last_seconds_before_the_end():
    import time

    from ipsec_nic.bench.kernel_pps import CpuSampler, cpu_window

    samples = [(0.0, (0.0, 10.0)), (1.0, (0.5, 10.0)), (2.0, (1.0, 10.5)), (3.0, (2.0, 11.5)), (3.2, (2.2, 11.7))]
    # The last 2 s: from the sample at 1.0 (the last one at least 2 s before 3.2) to the end.
    assert cpu_window(samples, 2.0) == pytest.approx((1.7, 1.7))
    assert cpu_window(samples, 10.0) == pytest.approx((2.2, 1.7))  # longer than sampled: from the first
    with CpuSampler((os.getpid(), None), period=0.01) as cpu:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.1:
            pass
    assert len(cpu.samples) >= 3 and cpu.window(5.0)[0] > 0.05 and cpu.window(5.0)[1] == 0.0


def test_kernel_pps_reads_the_guest_qdisc_drops_and_the_host_run_queue_wait():
    from ipsec_nic.bench.kernel_pps import parse_qdisc_drops, run_delay_seconds

    tc = ("qdisc mq 0: root \n Sent 2800 bytes 2 pkt (dropped 7, overlimits 0 requeues 1) \n"
          " backlog 0b 0p requeues 1\nqdisc pfifo_fast 0: parent :1 bands 3 priomap 1 2 2 2 1 2 0 0 1 1 1 1 1 1 1 1\n"
          " Sent 1400 bytes 1 pkt (dropped 3, overlimits 0 requeues 1) \n")
    assert parse_qdisc_drops(tc) == 7  # the root's line (mq sums its children)
    assert parse_qdisc_drops("") == 0
    assert run_delay_seconds(None) == 0.0 and run_delay_seconds(os.getpid()) >= 0.0


def test_kernel_pps_packet_offload_hands_states_and_policies_to_the_card_within_the_same_sending_budget():
    from device.contract.sa_file import parse_sa_document
    from guest_tools.scenario import Spec, fill_keys, sa_document
    from ipsec_nic.bench.kernel_pps import BUDGET_MODES, MODES, card_sa_batches, slice_seconds

    sas = parse_sa_document(fill_keys(sa_document(Spec(name="k", alg="aes-gcm-128", mode="transport", family=4))))
    batches = card_sa_batches(sas, "eth1")
    assert set(batches) == set(MODES) - {"plain"}
    # Two states and two policies each; crypto offload hands only the states to the driver.
    assert batches["offload"].count("offload crypto dev eth1") == 2 and "offload packet" not in batches["offload"]
    assert batches["packet"].count("offload packet dev eth1") == 4 and "offload crypto" not in batches["packet"]
    assert "offload" not in batches["software"]
    # A round's sending time is what it was with three modes, split over four.
    assert slice_seconds(3.0) * len(MODES) == pytest.approx(3.0 * BUDGET_MODES)
    assert slice_seconds(3.0) == pytest.approx(2.25)
