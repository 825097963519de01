"""The card under bad input and bad timing, driven from a real guest (guest_tools/checks/robustness.py).

One card server (loopback wire, SA table of 8) and one VM for the module; the last test kills that VM's
QEMU mid-traffic and attaches a fresh client and a fresh VM to the same card server. ESP frames the card
receives are built here with scapy (an implementation nobody on this project wrote) and sent by the
guest unchanged through the loopback, so they reach the card's receive path exactly as built.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether

from device.contract import ndis, regs
from device.contract.ndis import Opcode, SaListFlags
from device.contract.regs import (
    ADMIN_DESC,
    AdminFlags,
    AdminStatus,
    CryptoStatus,
    ErrCode,
    RxWbFlags,
    Status,
    TxStatus,
)
from device.contract.status import NdisStatus
from guest_tools.checks.common import encode_spec, run_check
from qemu.launch import VfioUserCard, Vm, VmConfig
from tests.protocol.client import VfioUserClient

from .card_vm import CardVm, card_vm

pytestmark = pytest.mark.vm

CARD_MAC = "02:1c:0d:00:01:01"
PEER_MAC = "02:1c:0d:00:01:02"
CARD_IP, PEER_IP = "192.0.2.1", "192.0.2.2"
CAPACITY = 8
GUEST_RAM_END = 1 << 30  # VmConfig's default 1 GiB sits below 4 GiB on q35: [0, 1 GiB)
KEYS = {name: bytes(range(i, i + 16)) + bytes.fromhex(f"c0ffee{i:02x}") for i, name in
        enumerate(("tamper", "replay", "out", "in", "req_out", "req_in", "cap", "flood"), 1)}


Rig = CardVm


@pytest.fixture(scope="module")
def rig(toolchain, tmp_path_factory):
    overrides = {"nic": {"mac": CARD_MAC}, "firmware": {"sa_capacity": CAPACITY}, "wire": {"type": "loopback"}}
    with card_vm(toolchain, tmp_path_factory.mktemp("robustness-logs"), overrides, timeout_s=240) as rig:
        yield rig


def check(rig: Rig, name: str, spec: dict, vm: Vm | None = None) -> dict:
    result = run_check(vm or rig.vm, "robustness", name, spec)
    assert rig.card.alive(), f"card server died:\n{rig.card.log_tail()}"
    print(f"{name}: {result['_seconds']:.1f} s in the guest")
    return result


def sa_spec(name: str, spi: int, direction: str, **extra) -> dict:
    src, dst = (CARD_IP, PEER_IP) if direction == "out" else (PEER_IP, CARD_IP)
    return {"spi": spi, "dir": direction, "src": src, "dst": dst, "key": KEYS[name].hex(), **extra}


def plain_ip(n: int, src: str = PEER_IP, dst: str = CARD_IP, size: int = 80) -> IP:
    return IP(src=src, dst=dst) / UDP(sport=7000 + n, dport=7001) / (b"%04d" % n * (size // 4))


def eth(payload) -> bytes:
    return bytes(Ether(dst=CARD_MAC, src=PEER_MAC) / payload)


def esp_frames(name: str, spi: int, seqs: list[int], ips: list[IP]) -> list[bytes]:
    """What a peer sends: ESP (RFC 4106 AES-GCM-128, scapy) from PEER_IP to CARD_IP."""
    sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=KEYS[name])
    return [eth(sa.encrypt(ip, seq_num=seq)) for seq, ip in zip(seqs, ips, strict=True)]


def test_tampered_esp_is_indicated_with_auth_failure(rig):
    ips = [plain_ip(n) for n in range(3)]
    frames = esp_frames("tamper", 0x3001, [1, 2, 3], ips)
    tampered = bytearray(frames[1])
    tampered[14 + 20 + 8 + 8 + 5] ^= 0x40  # a ciphertext byte (Ethernet, IPv4, ESP header, GCM IV)
    frames[1] = bytes(tampered)
    r = check(rig, "tamper", {"sa": sa_spec("tamper", 0x3001, "in"), "frames": [f.hex() for f in frames]})
    rx = r["rx"]
    assert len(rx) == 3
    for n in (0, 2):  # intact: decrypted, and the host recovers the peer's exact packet
        assert rx[n]["flags"] & RxWbFlags.CRYPTO_DONE and rx[n]["crypto_status"] == CryptoStatus.SUCCESS
        assert rx[n]["handle"] == r["handle"]
        assert bytes.fromhex(rx[n]["inner"])[14:] == bytes(ips[n])
    bad = rx[1]
    # NDIS v2: a failed check is still indicated, with CryptoDone and the failure status.
    assert bad["flags"] & RxWbFlags.CRYPTO_DONE and bad["flags"] & RxWbFlags.DD
    assert bad["crypto_status"] == CryptoStatus.TRANSPORT_ESP_AUTH_FAILED
    assert bad["handle"] == r["handle"] and bad["inner"] is None
    assert bytes.fromhex(bad["frame"]) == frames[1] and bad["length"] == len(frames[1])
    s = r["stats"]
    assert (s["rx_auth_fail"], s["rx_crypto_ok"], s["rx_packets"]) == (1, 2, 3)
    assert r["sa_stats"][0]["auth_failures"] == 1


def test_packet_offload_drops_replays(rig):
    seqs = [1, 2, 2, 1, 40, 5, 41]  # window 32: the repeats and seq 5 (< 41 - 32 + 1 once 40 is seen) go
    ips = [plain_ip(n) for n in range(len(seqs))]
    frames = esp_frames("replay", 0x3002, seqs, ips)
    r = check(rig, "replay", {"sa": sa_spec("replay", 0x3002, "in", replay_window=32),
                              "frames": [f.hex() for f in frames]})
    rx = r["rx"]
    expected = [ips[i] for i in (0, 1, 4, 6)]
    assert len(rx) == 4, rx
    for got, ip in zip(rx, expected, strict=True):
        assert got["flags"] & RxWbFlags.DECAPSULATED and got["crypto_status"] == CryptoStatus.SUCCESS
        inner = Ether(bytes.fromhex(got["frame"]))
        assert bytes(inner[UDP].payload) == bytes(ip[UDP].payload)
        assert (inner[IP].src, inner[IP].dst, inner[UDP].sport) == (ip.src, ip.dst, ip[UDP].sport)
    s = r["stats"]
    assert (s["rx_replay_drop"], s["rx_crypto_ok"], s["rx_packets"]) == (3, 4, 4)
    assert r["sa_stats"][0]["replay_drops"] == 3


def test_deleted_sa_fails_tx_with_bad_handle_and_rx_passes_unprocessed(rig):
    plain = eth(plain_ip(1, src=CARD_IP, dst=PEER_IP))
    inbound = esp_frames("in", 0x3004, [1, 2], [plain_ip(2), plain_ip(3)])
    r = check(rig, "sa_delete", {"out": sa_spec("out", 0x3003, "out"), "in": sa_spec("in", 0x3004, "in"),
                                 "plain": plain.hex(), "inbound": [f.hex() for f in inbound]})
    out_h, in_h = r["handles"]
    assert r["tx_before"] == [TxStatus.OK]
    before = r["rx_before"][0]
    assert before["crypto_status"] == CryptoStatus.SUCCESS and before["handle"] == in_h
    assert r["sas_after_delete"] == []
    assert r["tx_after"] == {"done": True, "status": TxStatus.BAD_HANDLE}
    after = r["rx_after"][0]
    # No SA any more: indicated as an ordinary frame, bytes untouched, no IPsec metadata.
    assert not after["flags"] & (RxWbFlags.CRYPTO_DONE | RxWbFlags.DECAPSULATED)
    assert after["handle"] == 0 and bytes.fromhex(after["frame"]) == inbound[1]
    s = r["stats"]
    assert (s["tx_offload_error"], s["tx_crypto_ok"], s["tx_packets"]) == (1, 0, 1)
    assert (s["rx_crypto_ok"], s["rx_auth_fail"], s["rx_packets"]) == (0, 0, 1)
    assert r["alive"] == {"caps_fw_status": 0, "echo_ok": True, "status": r["alive"]["status"], "fatal": False}


def test_sa_capacity_exhaustion_reports_resources_and_adds_nothing_half(rig):
    r = check(rig, "capacity", {"key": KEYS["cap"].hex()})
    assert r["capacity"] == CAPACITY and len(set(r["first"])) == CAPACITY - 2 and 0 not in r["first"]
    partial = r["list_partial"]
    # V2 list add: partial success; entries past the capacity get a NULL handle (and their status).
    assert partial["fw_status"] == NdisStatus.SUCCESS
    (h1, s1), (h2, s2), *rest = partial["results"]
    assert h1 and h2 and s1 == s2 == NdisStatus.SUCCESS
    assert rest == [[0, NdisStatus.RESOURCES], [0, NdisStatus.RESOURCES]]
    assert r["single_full"] == {"fw_status": NdisStatus.RESOURCES, "response": ""}
    udp = r["v1_udpesp_full"]
    # v1 UDP-ESP add is all or nothing: no SA and no parser entry left behind.
    assert (udp["fw_status"], udp["response"]) == (NdisStatus.RESOURCES, "")
    assert udp["parsers_before"] == udp["parsers_after"] == 0
    assert r["list_all_fail"] == {"fw_status": NdisStatus.RESOURCES,
                                  "results": [[0, NdisStatus.RESOURCES], [0, NdisStatus.RESOURCES]]}
    assert sorted(e["handle"] for e in r["sas_full"]) == sorted([*r["first"], h1, h2])
    assert sorted(e["spi"] for e in r["sas_full"]) == [*range(0x5001, 0x5007), 0x5101, 0x5102]
    fw = r["fw_stats_full"]
    assert (fw["sa_bundles"], fw["sa_capacity"], fw["reject_capacity"]) == (CAPACITY, CAPACITY, 6)
    assert r["deleted"] == CAPACITY
    room = r["v1_udpesp_room"]
    assert room["fw_status"] == NdisStatus.SUCCESS and room["parsers"] == 1
    handle, parser = struct.unpack("<II", bytes.fromhex(room["response"])[:8])
    assert handle and parser


def test_sa_delete_request_is_raised_and_honoured(rig):
    inbound = esp_frames("req_in", 0x3006, [1, 2, 3, 4, 5, 6], [plain_ip(n) for n in range(6)])
    outbound = [eth(plain_ip(n, src=CARD_IP, dst=PEER_IP)) for n in range(4)]
    r = check(rig, "sa_delete_req", {
        "out": sa_spec("req_out", 0x3005, "out", soft_packets=3),
        "in": sa_spec("req_in", 0x3006, "in", soft_packets=3),
        "inbound": [f.hex() for f in inbound], "outbound": [f.hex() for f in outbound]})
    out_h, in_h = r["handles"]
    paired = {e["handle"]: e["paired"] for e in r["sas_before"]}
    assert paired == {out_h: in_h, in_h: out_h}  # mirrored endpoints: one SA pair
    rx = r["rx"]
    assert len(rx) == 5 and all(p["flags"] & RxWbFlags.DECAPSULATED for p in rx)
    assert all(p["crypto_status"] == CryptoStatus.SUCCESS and p["handle"] == in_h for p in rx)
    # Soft limit 3 packets: the third packet and every later one carry SaDeleteReq.
    assert [bool(p["flags"] & RxWbFlags.SA_DELETE_REQ) for p in rx] == [False, False, True, True, True]
    assert r["tx"] == [TxStatus.OK] * 4  # a soft limit asks; only a hard limit refuses
    assert r["icr_sa_delete_req_seen"] >= 1  # the SA_DELETE_REQ interrupt cause was latched
    flagged = {e["handle"]: e["flags"] for e in r["sas_flagged"]}
    assert all(flagged[h] & SaListFlags.DELETE_REQUESTED for h in (out_h, in_h)), flagged
    assert r["sas_after"] == []
    after = r["rx_after"][0]
    assert not after["flags"] & RxWbFlags.CRYPTO_DONE and bytes.fromhex(after["frame"]) == inbound[5]


def test_reset_while_rings_are_busy(rig):
    echo = [eth(plain_ip(1000 + n)) for n in range(5)]
    # 180 frames: more than the 127 the RX ring holds, so the card has a backlog when the reset comes.
    r = check(rig, "reset", {"sa": sa_spec("out", 0x3007, "out"), "frame": eth(plain_ip(0, size=300)).hex(),
                             "count": 180, "echo": [f.hex() for f in echo]})
    print(f"at reset: {r['tx_outstanding_at_reset']} TX descriptors outstanding, stats {r['stats_before_reset']}")
    assert r["sas_before"] == 1
    assert r["stats_before_reset"]["rx_packets"] == 127  # ring full; the rest wait in the card's backlog
    regs_after = r["regs_after_reset"]
    assert regs_after["status"] & Status.READY and not regs_after["status"] & (Status.ENABLED | Status.FATAL)
    assert {k: v for k, v in regs_after.items() if k != "status"} == {
        "ctrl": 0, "icr": 0, "ims": 0, "scratch": 0, "err_code": ErrCode.NONE}
    assert r["rings_after_reset"] == {"aq_ctrl": 0, "txq_ctrl": 0, "rxq_ctrl": 0, "txq_head": 0, "rxq_head": 0}
    assert set(r["stats_after_reset"].values()) == {0}
    # Stopped: nothing written to the old rings and nothing counted after the reset.
    assert r["tx_done_1s_later"] == r["tx_done_at_reset"]
    assert set(r["stats_1s_later"].values()) == {0}
    assert r["sas_after_reinit"] == 0  # CTRL.RESET deletes every SA (datasheet CTRL.RESET)
    # Usable again, and the frames held at reset time are gone: only the new ones come back.
    assert [bytes.fromhex(f) for f in r["received_after_reinit"]] == echo
    assert (r["stats_after_reinit"]["tx_packets"], r["stats_after_reinit"]["rx_packets"]) == (5, 5)


def test_malicious_descriptors_fail_cleanly_and_the_card_keeps_serving(rig):
    probe = eth(plain_ip(7))
    r = check(rig, "malicious", {"plain": probe.hex(), "ram_end": GUEST_RAM_END})
    tx = r["tx_outside_ram"]
    assert (tx["done"], tx["status"]) == (True, TxStatus.DMA_ERROR)
    assert (tx["err_code"], tx["err_info"]) == (ErrCode.DMA_FAULT, regs.QueueId.TX | 0)
    assert r["tx_huge_length"] == {"done": True, "status": TxStatus.BAD_LENGTH}
    assert r["tx_across_ram_end"]["status"] == TxStatus.DMA_ERROR
    rx = r["rx_outside_ram"]
    assert [(p["flags"], p["length"]) for p in rx["rx"]] == [(RxWbFlags.DD | RxWbFlags.ERROR, 0)]
    assert (rx["err_code"], rx["err_info"]) == (ErrCode.DMA_FAULT, regs.QueueId.RX | 0)
    for name, status in (("admin_request_outside_ram", AdminStatus.DMA_ERROR),
                         ("admin_request_too_long", AdminStatus.REQUEST_TOO_LONG),
                         ("admin_response_outside_ram", AdminStatus.DMA_ERROR)):
        a = r[name]
        assert a["done"] and a["status"] == status and a["flags"] & AdminFlags.ERROR, (name, a)
    assert r["admin_response_outside_ram"]["err_info"] == regs.QueueId.ADMIN
    s = r["stats"]
    assert (s["dma_error"], s["bad_descriptor"]) == (5, 2)
    # Only the probe went out. Its first RX buffer was unreachable: the frame waited in the card's backlog
    # (datasheet §7.8) and landed in the next good descriptor the check posted, instead of being lost.
    assert (s["tx_packets"], s["rx_packets"]) == (1, 1)
    assert not any(r[k]["card_status"] & Status.FATAL for k in ("tx_outside_ram", "rx_outside_ram"))
    alive = r["alive"]
    assert (alive["caps_fw_status"], alive["echo_ok"], alive["fatal"]) == (0, True, False)


def _client_admin(client: VfioUserClient, opcode: int) -> tuple[int, bytes]:
    """One admin command from the host: ring + buffers in a memfd the server maps (DMA_MAP with an fd)."""
    iova, size = 0x10_0000, 0x4000
    fd = os.memfd_create("admin-dma")
    try:
        os.ftruncate(fd, size)
        mem = mmap.mmap(fd, size)
        assert not client.dma_map(iova, size, fd).is_error
        aq = regs.ADMINQ_BASE
        client.write32(0, aq + regs.QREG_CTRL, 0)
        for off, value in ((regs.QREG_BASE_LO, iova), (regs.QREG_BASE_HI, 0), (regs.QREG_LEN, 4),
                           (regs.QREG_TAIL, 0), (regs.QREG_CTRL, 1)):
            client.write32(0, aq + off, value)
        mem[:ADMIN_DESC.size] = ADMIN_DESC.pack(opcode=opcode, resp_addr=iova + 0x1000, resp_len=0x1000, cookie=7)
        client.write32(0, aq + regs.QREG_TAIL, 1)
        deadline = time.monotonic() + 5
        while not ADMIN_DESC.get(mem, 0, "flags") & AdminFlags.DONE:
            assert time.monotonic() < deadline, "admin command from the test client never completed"
            client.read32(0, regs.ICR)  # keep the server's loop turning
        d = ADMIN_DESC.unpack(mem, 0)
        return d.fw_status, bytes(mem[0x1000:0x1000 + d.resp_len])
    finally:
        os.close(fd)


def test_qemu_killed_mid_traffic_card_survives_and_serves_a_new_vm(rig, toolchain):
    flood = {"plain": eth(plain_ip(9)).hex(), "sa": sa_spec("flood", 0x3008, "out"), "scratch": 0xC0FFEE,
             "seconds": 60}
    rig.vm.run(f"setsid python3 -m guest_tools.checks.robustness flood {encode_spec(flood)} "
               "> /tmp/flood.log 2>&1 < /dev/null &", timeout=30)
    deadline = time.monotonic() + 40
    while True:
        log = rig.vm.run("tail -n 1 /tmp/flood.log", timeout=30).output
        if "flood sent=" in log and int(log.split("sent=")[1].split()[0]) >= 300:
            break
        assert time.monotonic() < deadline, f"guest traffic did not start: {log}"
        time.sleep(0.5)
    qemu = rig.vm._boot.qemu  # the running QEMU (qemu.launch keeps it there); killed like a crash would
    assert qemu is not None
    os.killpg(qemu.pid, signal.SIGKILL)
    qemu.wait(10)
    time.sleep(1.0)
    assert rig.card.alive(), rig.card.log_tail()

    # vfio-user "Client Disconnection": DMA maps and irq fds are dropped, device state is kept; a new
    # client (here the tests' own vfio-user client playing QEMU's part) finds it.
    client = VfioUserClient(str(rig.socket))
    try:
        assert not client.negotiate().is_error
        assert client.read32(0, regs.reg("SCRATCH")) == 0xC0FFEE
        assert client.read32(0, regs.STATUS) & Status.ENABLED
        tx = client.read32(0, regs.stat_offset("TX_PACKETS"))
        assert tx >= 300
        assert client.read32(0, regs.txq_reg(0, regs.QREG_CTRL)) == 1  # the dead guest's ring is still on
        command = struct.unpack("<H", client.region_read(7, 4, 2))[0]
        assert command & 0x4, "COMMAND.BUS_MASTER kept"
        fw_status, response = _client_admin(client, Opcode.GET_STATS)
        stats = ndis.GlobalStats.unpack(response)
        assert (fw_status, stats.sa_bundles) == (NdisStatus.SUCCESS, 1)  # the flood's SA survived
    finally:
        client.close()

    # A new VM attaches to the same server. QEMU resets the device at machine start (DEVICE_RESET), so
    # the new guest finds a clean card that works.
    cfg = VmConfig(cards=(VfioUserCard(rig.socket),), timeout_s=240, log_dir=rig.logs / "vm2")
    with Vm(cfg, toolchain) as vm2:
        r = check(rig, "state", {"plain": eth(plain_ip(10)).hex()}, vm=vm2)
    assert r["regs"]["scratch"] == 0 and r["sas"] == []
    assert r["echo_ok"] and r["regs"]["err_code"] == ErrCode.NONE
    assert (r["stats"]["tx_packets"], r["stats"]["rx_packets"]) == (0, 0)
