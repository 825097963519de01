"""Two ipsec-nic cards in one VM, cabled back to back (wire type ``cable``: each card's server binds its
own datagram socket and sends to the other's). The guest puts the outbound SA on one card and the
inbound SA on the other, sends through the first and receives on the second, for crypto offload and
packet offload, in both directions (guest_tools/checks/two_cards.py).

Each card also records its wire to a pcap; the ESP on the cable is decrypted here with scapy, an
implementation independent of the card's firmware, so the test shows the cards speak RFC 4303/4106 to
each other and not merely something they both agree on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from device.contract.regs import CryptoStatus, RxWbFlags, TxStatus
from guest_tools.checks.common import run_check
from ipsec_nic.runner import CardServer, run_dir, write_profile
from qemu.launch import VfioUserCard, Vm, VmConfig

pytestmark = pytest.mark.vm

MACS = {"a": "02:1c:0d:00:02:0a", "b": "02:1c:0d:00:02:0b"}
IPS = {"a": "10.20.0.1", "b": "10.20.0.2"}
FRAMES_PER_FLOW = 3


@dataclass
class Rig:
    vm: Vm
    cards: dict[str, CardServer]
    pcaps: dict[str, Path]


@pytest.fixture(scope="module")
def rig(toolchain, tmp_path_factory):
    logs = tmp_path_factory.mktemp("two-cards-logs")
    with run_dir() as d:
        servers: dict[str, CardServer] = {}
        pcaps = {n: logs / f"wire-{n}.pcap" for n in MACS}
        try:
            for name, other in (("a", "b"), ("b", "a")):
                profile = write_profile(d / f"{name}.yaml", overrides={
                    "nic": {"mac": MACS[name]},
                    "wire": {"type": "cable", "path": str(d / f"wire-{name}.sock"),
                             "peer": str(d / f"wire-{other}.sock"), "pcap": str(pcaps[name])}})
                servers[name] = CardServer(d / f"{name}.sock", profile, logs / f"card-{name}.log")
                servers[name].start()
            cfg = VmConfig(cards=tuple(VfioUserCard(d / f"{n}.sock") for n in MACS), timeout_s=240,
                           log_dir=logs / "vm")
            with Vm(cfg, toolchain) as vm:
                print(f"VM up in {vm.boot_seconds:.1f} s")
                yield Rig(vm, servers, pcaps)
            for s in servers.values():
                assert s.alive(), s.log_tail()
        finally:
            for s in servers.values():
                s.stop()


def key(n: int) -> bytes:
    return bytes((n * 7 + i) & 0xFF for i in range(16)) + bytes.fromhex(f"5a17{n:04x}")


def flow(src: str, dst: str, mode: str, spi: int) -> dict:
    k = key(spi).hex()
    sa = {"spi": spi, "src": IPS[src], "dst": IPS[dst], "key": k}
    frames = [bytes(Ether(dst=MACS[dst], src=MACS[src]) / IP(src=IPS[src], dst=IPS[dst]) /
                    UDP(sport=6000 + n, dport=6001) / (f"{mode} {src}->{dst} #{n} ".encode() * 8))
              for n in range(FRAMES_PER_FLOW)]
    return {"from": src, "to": dst, "mode": mode, "out": {**sa, "dir": "out"}, "in": {**sa, "dir": "in"},
            "frames": [f.hex() for f in frames]}


FLOWS = [flow("a", "b", "crypto", 0x4001), flow("a", "b", "packet", 0x4002),
         flow("b", "a", "crypto", 0x4003), flow("b", "a", "packet", 0x4004)]


@pytest.fixture(scope="module")
def result(rig):
    r = run_check(rig.vm, "two_cards", "flows", {"macs": {v: k for k, v in MACS.items()}, "flows": FLOWS})
    for s in rig.cards.values():
        assert s.alive(), s.log_tail()
    print(f"4 flows x {FRAMES_PER_FLOW} frames: {r['_seconds']:.1f} s in the guest")
    return r


def test_both_cards_are_up_and_cabled(result):
    assert sorted(result["cards"]) == ["a", "b"] and result["cards"]["a"] != result["cards"]["b"]
    assert result["link_up"] == {"a": True, "b": True}


@pytest.mark.parametrize("index", range(len(FLOWS)), ids=[f"{f['from']}-to-{f['to']}-{f['mode']}" for f in FLOWS])
def test_flow_delivers_the_original_payload(result, index):
    spec, got = FLOWS[index], result["flows"][index]
    sent = [bytes.fromhex(f) for f in spec["frames"]]
    assert got["tx_status"] == [TxStatus.OK] * FRAMES_PER_FLOW
    assert (got["tx_stats"]["tx_crypto_ok"], got["tx_stats"]["tx_packets"]) == (FRAMES_PER_FLOW, FRAMES_PER_FLOW)
    assert (got["rx_stats"]["rx_crypto_ok"], got["rx_stats"]["rx_packets"]) == (FRAMES_PER_FLOW, FRAMES_PER_FLOW)
    rx = got["rx"]
    assert len(rx) == FRAMES_PER_FLOW
    in_handle = got["handles"][1]
    for p, original in zip(rx, sent, strict=True):
        assert p["flags"] & RxWbFlags.CRYPTO_DONE and p["crypto_status"] == CryptoStatus.SUCCESS, p
        assert p["handle"] == in_handle
        if spec["mode"] == "crypto":
            # Crypto offload: decrypted in place (ESP kept); the host strips ESP and has the sent frame.
            assert not p["flags"] & RxWbFlags.DECAPSULATED
            assert bytes.fromhex(p["inner"]) == original
        else:
            # Packet offload: the card removed ESP itself.
            assert p["flags"] & RxWbFlags.DECAPSULATED
            decap, orig = Ether(bytes.fromhex(p["frame"])), Ether(original)
            assert bytes(decap[UDP].payload) == bytes(orig[UDP].payload)
            assert (decap[IP].src, decap[IP].dst, decap.dst) == (orig[IP].src, orig[IP].dst, orig.dst)


def test_the_cable_carries_rfc4303_esp_that_scapy_decrypts(rig, result):
    for index, spec in enumerate(FLOWS):
        wire = [Ether(bytes(p)) for p in rdpcap(str(rig.pcaps[spec["from"]]))]
        esp = [p for p in wire if ESP in p and p[ESP].spi == spec["out"]["spi"]]
        esp_bytes = [bytes(p) for p in esp]
        assert len(esp) == FRAMES_PER_FLOW, (index, [p.summary() for p in wire])
        sa = SecurityAssociation(ESP, spi=spec["out"]["spi"], crypt_algo="AES-GCM",
                                 crypt_key=bytes.fromhex(spec["out"]["key"]))
        for n, (p, sent) in enumerate(zip(esp, spec["frames"], strict=True)):
            assert p[ESP].seq == n + 1  # RFC 4303 §3.3.3: the first packet of an SA carries 1
            inner = sa.decrypt(p[IP])
            assert bytes(inner[UDP].payload) == bytes(Ether(bytes.fromhex(sent))[UDP].payload)
        # The receiving card saw the very same bytes (its pcap records what arrived).
        arrived = [bytes(p) for p in rdpcap(str(rig.pcaps[spec["to"]]))]
        assert all(raw in arrived for raw in esp_bytes)
