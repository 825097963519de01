"""The card's interrupt paths in a real guest: polling, MSI-X through vfio-pci behind QEMU's virtual IOMMU
(with ITR moderation), and INTx through uio_pci_generic.

One VM for the module: QEMU with ``-device intel-iommu,caching-mode=on`` before the card, guest
``intel_iommu=on iommu=pt`` (pass-through for devices no vfio user owns, so the polling driver's
guest-physical DMA still works), vfio-pci and uio_pci_generic loaded at boot. The card's wire is a
loopback: every frame sent comes back as a received frame. The checks run in the guest
(guest_tools/checks/interrupts.py) and report what they saw; the assertions are here.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from device.contract.regs import AdminStatus, Cause, IntMode, RxWbFlags, TxStatus
from device.contract.status import NdisStatus
from guest_tools.checks.common import run_check

from .card_vm import CardVm, card_vm

pytestmark = pytest.mark.vm

CARD_MAC = "02:1c:0d:00:00:01"
PEER_MAC = "02:1c:0d:00:00:02"
SA_CAPACITY = 96  # not the default: the admin command's answer must come from this card's profile
RX0 = 1 << 16
TX0 = 1 << 8


Rig = CardVm


@pytest.fixture(scope="module")
def rig(toolchain, tmp_path_factory):
    overrides = {"nic": {"mac": CARD_MAC}, "firmware": {"sa_capacity": SA_CAPACITY}, "wire": {"type": "loopback"}}
    with card_vm(toolchain, tmp_path_factory.mktemp("irq-logs"), overrides, intel_iommu=True,
                 cmdline_extra=("iommu=pt",), modules=("vfio-pci", "uio_pci_generic"), timeout_s=240) as rig:
        yield rig


def frames(count: int, size: int = 200) -> list[bytes]:
    return [bytes(Ether(dst=CARD_MAC, src=PEER_MAC) / IP(src="10.9.0.2", dst="10.9.0.1") /
                  UDP(sport=4000 + n, dport=5000) / (bytes([n]) * size)) for n in range(count)]


def check(rig: Rig, name: str, spec: dict) -> dict:
    result = run_check(rig.vm, "interrupts", name, spec)
    assert rig.card.alive(), f"card server died:\n{rig.card.log_tail()}"
    print(f"{name}: {result['_seconds']:.1f} s in the guest")
    return result


def test_polling_path_admin_command_and_loopback_traffic(rig):
    sent = frames(4)
    r = check(rig, "poll", {"frames": [f.hex() for f in sent]})
    assert (r["dma"], r["irq"], r["int_mode"]) == ("pagemap", "poll", IntMode.POLL)
    assert (r["caps_fw_status"], r["sa_capacity"]) == (NdisStatus.SUCCESS, SA_CAPACITY)
    assert r["tx_status"] == [TxStatus.OK] * 4
    assert [bytes.fromhex(p["frame"]) for p in r["rx"]] == sent
    assert all(p["flags"] & RxWbFlags.DD and not p["flags"] & RxWbFlags.CRYPTO_DONE for p in r["rx"])
    s = r["stats"]
    assert (s["tx_packets"], s["rx_packets"]) == (4, 4)
    assert s["tx_bytes"] == s["rx_bytes"] == sum(map(len, sent))


def test_msix_through_vfio_signals_admin_and_rx_and_itr_coalesces(rig):
    sent = frames(1, 300)
    r = check(rig, "msix", {"frames": [f.hex() for f in sent]})
    assert (r["dma"], r["irq"], r["int_mode"], r["msix_enabled"]) == ("vfio", "msix", IntMode.VECTORS, True)
    assert r["ring_iova"] >= 0x1000_0000  # an IOVA the guest chose, not a guest-physical address

    admin = r["admin"]
    # Woken by vector 0 (IVAR reset map: misc causes), exactly one message, command done at that moment.
    assert admin["woke_on"] == [0], admin
    assert admin["vector_counts"] == [1, 0], admin
    assert admin["done_at_wake"] and admin["icr"] & Cause.ADMINQ
    assert (admin["status"], admin["fw_status"]) == (AdminStatus.OK, NdisStatus.SUCCESS)

    rx = r["rx"]
    # RX queue 0 -> vector 1; the frame was in the ring when the interrupt woke us.
    assert rx["woke_on"] == [1], rx
    assert rx["vector_counts"] == [0, 1], rx
    assert rx["rx_done_at_wake"] and rx["icr"] & RX0 and not rx["icr"] & Cause.ADMINQ
    assert [bytes.fromhex(p["frame"]) for p in rx["rx"]] == sent

    no_itr, big_itr = r["itr"]
    print(f"ITR 0: {no_itr}\nITR 65535: {big_itr}")
    for run in (no_itr, big_itr):
        assert run["sent"] == run["frames"] == run["frames_match"] == 20, run
    # ITR 0: every frame (acked before the next one arrives) gets its own message.
    assert no_itr["interrupts"] + no_itr["late_interrupts"] >= 18, no_itr
    # ITR 65.5 ms with frames 10 ms apart: several frames share one message.
    assert big_itr["interrupts"] <= 10, big_itr
    assert big_itr["interrupts"] * 2 <= no_itr["interrupts"], (no_itr, big_itr)
    # The guest kernel took these as MSI-X interrupts of the vfio device.
    assert any("vfio-msix" in line for line in r["proc_interrupts"]), r["proc_interrupts"]
    assert r["stats"]["rx_packets"] == 41


VFIO_SAS = """sas:
  - {spi: 0x1001, direction: outbound, src: 10.9.0.1, dst: 10.9.0.2,
     aead: {alg: aes-gcm-128, key: 00112233445566778899aabbccddeeff, salt: cafebabe}}
  - {spi: 0x1001, direction: inbound, src: 10.9.0.1, dst: 10.9.0.2,
     aead: {alg: aes-gcm-128, key: 00112233445566778899aabbccddeeff, salt: cafebabe}}
"""


def test_vfio_cli_processes_share_sas_through_the_guest_agent(rig):
    """vfio-pci resets the function (FLR) when a process opens the device and when it releases it, and FLR
    clears every SA. In vfio mode the CLI therefore goes through one guest agent that holds the device:
    separate processes share SAs and traffic; `agent stop` releases the card and the SAs are gone."""
    cli = "python3 -m guest_tools.cli --irq msix"

    def run(args: str, expect: int = 0) -> str:
        result = rig.vm.run(f"{cli} {args}", timeout=180)
        assert result.exit_code == expect, f"{args}: exit {result.exit_code}\n{result.output}"
        return result.output

    rig.vm.run(f"cat > /tmp/vfio-sas.yaml <<'EOF'\n{VFIO_SAS}EOF", check=True)
    try:
        added = run("sa add --sa /tmp/vfio-sas.yaml")
        assert "started guest agent" in added and added.count("spi 0x1001") == 2, added
        out_handle = next(line.split()[0] for line in added.splitlines() if "outbound" in line)
        assert "2 SA(s)" in run("sa list")  # another process, same SAs
        sent = run(f"send --count 2 --src 10.9.0.1 --dst 10.9.0.2 --dst-mac {CARD_MAC} --sa {out_handle}")
        assert "OK=2" in sent, sent
        got = run("recv --count 2 --timeout 20")
        assert got.count("crypto_done=1 crypto_status=SUCCESS") == 2, got
        assert "every SA is gone" in run("agent stop")
        # without the agent each process opens the device itself: the kernel's reset on open clears the SAs
        assert "0 SA(s)" in run("--no-agent sa list")
    finally:
        rig.vm.run(f"{cli} agent stop", timeout=120)  # the intx test rebinds the card: release it
    assert "no guest agent running" in run("agent status")


def test_intx_through_uio_pci_generic(rig):
    sent = frames(1, 100)
    r = check(rig, "intx", {"frames": [f.hex() for f in sent]})
    assert (r["driver"], r["dma"], r["int_mode"], r["msix_enabled"]) == ("uio_pci_generic", "pagemap",
                                                                          IntMode.SINGLE, False)
    admin, rx = r["admin"], r["rx"]
    assert admin["uio_count"] is not None and rx["uio_count"] == admin["uio_count"] + 1, (admin, rx)
    assert admin["done"] and admin["icr"] & Cause.ADMINQ
    assert rx["icr"] & RX0 and rx["dd"] and [bytes.fromhex(f) for f in rx["frames"]] == sent
    for step in (admin, rx):
        # PCI 3.0 §6.2.3: STATUS.INTERRUPT shows the level; uio_pci_generic masked it through
        # COMMAND.INTX_DISABLE in its handler; clearing the cause (ICR) drops the level.
        assert step["status_int_before_ack"] and step["intx_masked_by_handler"], step
        assert not step["status_int_after_ack"], step
