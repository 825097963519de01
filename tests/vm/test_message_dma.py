"""The card in a VM whose guest RAM is not shared (plain ``-m``, no memfd backend): QEMU maps RAM without an
fd, so every DMA the card does is a DMA_READ/DMA_WRITE message that QEMU serves (hw/vfio-user/pci.c). The
guest's root and the project come over virtio-9p (qemu/initrd_9p.py): virtiofs needs shared RAM. The guest
tools add SAs, send and receive over a loopback wire, and read the statistics, one process per command."""

from __future__ import annotations

import json
import re

import pytest

from .card_vm import card_vm
from .test_guest_cli import CARD_MAC, CLI, SA_FILE

pytestmark = pytest.mark.vm


def test_guest_tools_without_shared_guest_ram(toolchain, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    with card_vm(toolchain, logs, {"wire": {"type": "loopback"}}, guest_ram="private", timeout_s=300) as rig:
        vm = rig.vm
        argv = (logs / "vm" / "qemu.argv").read_text()
        assert "memory-backend" not in argv and "virtio-9p-pci" in argv  # nothing shared with anyone

        def cli(args: str) -> str:
            result = vm.run(f"{CLI} {args}", timeout=120)
            assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}"
            return result.output

        vm.run(f"cat > /tmp/sas.yaml <<'EOF'\n{SA_FILE}EOF", check=True)
        assert "all SAs cleared" in cli("reset")
        assert "CRYPTO_OFFLOAD" in cli("caps")
        added = cli("sa add --sa /tmp/sas.yaml")
        handles = dict((d, int(h, 16)) for h, d in re.findall(r"^(0x[0-9a-f]{8}) spi 0x1001 (outbound|inbound)",
                                                                added, re.M))
        assert set(handles) == {"outbound", "inbound"}, added
        sent = cli(f"send --count 3 --size 100 --src 10.0.0.1 --dst 10.0.0.2 --dst-mac {CARD_MAC} "
                   f"--sa {handles['outbound']:#x}")
        assert "sent 3 frame(s)" in sent and "OK=3" in sent
        got = [json.loads(line) for line in cli("recv --count 3 --timeout 20 --json").splitlines()
               if line.startswith("{")]
        assert len(got) == 3
        assert all(p["crypto_done"] and p["crypto_status"] == "SUCCESS" and p["handle"] == handles["inbound"]
                   for p in got)
        stats = cli("stats")
        assert re.search(r"tx_crypto_ok: 3\b", stats, re.I) and re.search(r"rx_crypto_ok: 3\b", stats, re.I), stats
        assert re.search(r"dma_error: 0\b", stats, re.I), stats
    # QEMU has gone: the card server logged how many DMA messages it sent to it
    log = (logs / "card.log").read_text()
    counts = [int(n) for n in re.findall(r"client disconnected: .* \((\d+) DMA_READ/DMA_WRITE messages", log)]
    # at least a read and a write per frame (3 TX, 3 RX); with a memfd backend this count is 0
    assert counts and counts[-1] >= 12, log[-2000:]
