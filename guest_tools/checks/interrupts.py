"""Guest checks of the card's three interrupt paths (run by tests/vm/test_interrupts.py).

    python3 -m guest_tools.checks.interrupts poll SPEC   # no interrupts: sysfs BAR + pagemap DMA, polling
    python3 -m guest_tools.checks.interrupts msix SPEC   # vfio-pci + IOMMU: IOVA DMA, MSI-X eventfds, ITR
    python3 -m guest_tools.checks.interrupts intx SPEC   # uio_pci_generic: INTx through /dev/uioN

SPEC: {"frames": [hex, ...]} Ethernet frames the card sends on its loopback wire and receives back.
For MSI-X and INTx the completion is *waited for on the interrupt* (select on the eventfd or the uio
fd, no register or descriptor polling until it fires), then the descriptor and ICR are read: what
woke us, and was the work really done at that moment.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from typing import Any

from device.contract import ndis, regs
from device.contract.ndis import Opcode
from device.contract.regs import Cause, Ctrl, IntMode, RxWbFlags
from guest_tools import pci
from guest_tools.checks.common import admin_done, admin_result, main, post_admin, recv_n, stats_delta
from guest_tools.dma import PagemapMemory
from guest_tools.driver import Card, HostSaTable, open_card

STATE = "/tmp/ipsec-nic-checks-irq.json"
WAKE_TIMEOUT = 5.0
PCI_COMMAND, PCI_STATUS = 0x04, 0x06
COMMAND_INTX_DISABLE = 1 << 10
PCI_COMMAND_MEM_MASTER = 0x2 | 0x4
STATUS_INTERRUPT = 1 << 3
MSIX_CAP_CONTROL = 0x48 + 2  # datasheet 1.2: MSI-X capability at 0x48
MSIX_ENABLE = 1 << 15
ITR_FRAMES = 20
ITR_PACING = 0.010  # seconds between frames: several fall into one 65 ms ITR gap, none into ITR 0's


def _frames(spec: dict[str, Any]) -> list[bytes]:
    return [bytes.fromhex(f) for f in spec["frames"]]


def _int_mode(card: Card) -> int:
    return (card.mmio.read32(regs.CTRL) & Ctrl.INT_MODE) >> regs.CTRL_INT_MODE_SHIFT


def check_poll(spec: dict[str, Any]) -> dict[str, Any]:
    frames = _frames(spec)
    dev = pci.find_device(regs.VENDOR_ID, regs.DEVICE_ID, spec.get("bdf"))
    _unbind(dev)  # the polling driver maps BAR0 through sysfs: no kernel driver may own the card
    with open_card(dev.bdf, irq="poll", reset=True, state_path=STATE) as card:
        before = card.stats()
        fw_status, response = card.admin(Opcode.GET_CAPS)
        caps = ndis.CapsWire.unpack(response)
        for f in frames:
            card.send_raw(f)
        tx = [c.status for c in card.flush_tx()]
        rx = recv_n(card, len(frames))
        return {"dma": card.memory.kind, "int_mode": _int_mode(card), "irq": card.irq.name,
                "caps_fw_status": fw_status, "sa_capacity": caps.sa_offload_capacity, "tx_status": tx, "rx": rx,
                "stats": stats_delta(before, card.stats())}


# --- MSI-X -----------------------------------------------------------------------------------------------


def _drain(fds: list[int]) -> list[int]:
    """Read (and zero) each eventfd's counter: how many times the vector fired since the last read."""
    counts = []
    for fd in fds:
        try:
            counts.append(os.eventfd_read(fd))
        except BlockingIOError:
            counts.append(0)
    return counts


def _wake(fds: list[int], timeout: float = WAKE_TIMEOUT) -> tuple[list[int], float]:
    t0 = time.monotonic()
    ready, _, _ = select.select(fds, [], [], timeout)
    return [fds.index(fd) for fd in ready], (time.monotonic() - t0) * 1000


def _msix_admin(card: Card, fds: list[int]) -> dict[str, Any]:
    _drain(fds)
    index = post_admin(card, Opcode.GET_CAPS, interrupt=True)
    woke, ms = _wake(fds)
    done_at_wake = admin_done(card, index)  # first look at the descriptor: after the interrupt
    icr = card.mmio.read32(regs.ICR)
    counts = _drain(fds)
    card.mmio.write32(regs.ICR, icr)
    result = admin_result(card, index)
    return {"woke_on": woke, "latency_ms": round(ms, 3), "done_at_wake": done_at_wake, "icr": icr,
            "vector_counts": counts, "status": result["status"], "fw_status": result["fw_status"]}


def _msix_rx(card: Card, fds: list[int], frame: bytes) -> dict[str, Any]:
    _drain(fds)
    card.send_raw(frame)
    woke, ms = _wake(fds)
    rx_at_wake = card._rx_ready()
    icr = card.mmio.read32(regs.ICR)
    counts = _drain(fds)
    card.mmio.write32(regs.ICR, icr)
    got = recv_n(card, 1, timeout=2.0)
    card.flush_tx()
    return {"woke_on": woke, "latency_ms": round(ms, 3), "rx_done_at_wake": rx_at_wake, "icr": icr,
            "vector_counts": counts, "rx": got}


def _msix_itr(card: Card, fds: list[int], frame: bytes, itr: int) -> dict[str, Any]:
    """Paced frames, interrupt-driven receive: wake on vector 1, ack ICR, take every ready frame."""
    rx_fd = fds[1]
    card.mmio.write32(regs.reg("ITR"), itr)
    card.mmio.write32(regs.ICR, 0xFFFF_FFFF)
    _drain(fds)
    rx_cause = regs.cause_rx(card.queue)
    sent = interrupts = wakes = 0
    got: list[bytes] = []
    t0 = time.monotonic()
    next_send = t0
    deadline = t0 + 20.0
    while len(got) < ITR_FRAMES and time.monotonic() < deadline:
        now = time.monotonic()
        if sent < ITR_FRAMES and now >= next_send:
            card.send_raw(frame)
            sent += 1
            next_send += ITR_PACING
        wait = max(0.0, next_send - time.monotonic()) if sent < ITR_FRAMES else deadline - time.monotonic()
        ready, _, _ = select.select([rx_fd], [], [], wait)
        if ready:
            interrupts += _drain([rx_fd])[0]
            wakes += 1
            card.mmio.write32(regs.ICR, rx_cause)  # ack first: a frame landing after this raises a fresh cause
            got += [p.frame for p in card.recv(limit=64)]
            card.poll_tx()
    seconds = time.monotonic() - t0
    time.sleep(max(0.1, 2 * itr * 1e-6))  # a message deferred by ITR may still be on its way
    late = _drain([rx_fd])[0]
    card.flush_tx()
    card.mmio.write32(regs.reg("ITR"), 0)
    return {"itr": itr, "sent": sent, "frames": len(got), "frames_match": sum(g == frame for g in got),
            "interrupts": interrupts, "late_interrupts": late, "wakes": wakes, "seconds": round(seconds, 3)}


def _proc_interrupts(tag: str) -> list[str]:
    try:
        lines = Path("/proc/interrupts").read_text().splitlines()
    except OSError:
        return []
    return [" ".join(line.split()) for line in lines if tag in line]


def check_msix(spec: dict[str, Any]) -> dict[str, Any]:
    frames = _frames(spec)
    with open_card(irq="msix", reset=True, state_path=STATE) as card:
        vdev = card.vfio  # type: ignore[attr-defined]
        fds = list(card.irq.eventfds)
        msix_control = int.from_bytes(vdev.config_read(MSIX_CAP_CONTROL, 2), "little")
        out: dict[str, Any] = {"dma": card.memory.kind, "irq": card.irq.name, "int_mode": _int_mode(card),
                               "vectors": len(fds), "msix_enabled": bool(msix_control & MSIX_ENABLE),
                               "ring_iova": card.txr.mem.iova}
        before = card.stats()
        out["admin"] = _msix_admin(card, fds)
        # TX completions also go to vector 1 (IVAR reset map); mask them so vector 1 means "RX".
        card.mmio.write32(regs.reg("IMC"), regs.cause_tx(card.queue))
        out["rx"] = _msix_rx(card, fds, frames[0])
        out["itr"] = [_msix_itr(card, fds, frames[0], itr) for itr in (0, 65535)]
        out["stats"] = stats_delta(before, card.stats())
        out["proc_interrupts"] = _proc_interrupts("vfio-msix")
        return out


# --- INTx ------------------------------------------------------------------------------------------------


def _bind(bdf: str, driver: str) -> None:
    dev = Path("/sys/bus/pci/devices") / bdf
    current = dev / "driver"
    if current.exists() and os.path.basename(os.readlink(current)) == driver:
        return
    (dev / "driver_override").write_text(driver)
    if current.exists():
        (current / "unbind").write_text(bdf)
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    if not current.exists() or os.path.basename(os.readlink(current)) != driver:
        raise RuntimeError(f"{bdf} did not bind to {driver} (module loaded?)")


def _unbind(dev: pci.PciDevice) -> None:
    (dev.path / "driver_override").write_text("\n")
    if (dev.path / "driver").exists():
        (dev.path / "driver" / "unbind").write_text(dev.bdf)


def _intx_enable(dev: pci.PciDevice) -> None:
    """uio_pci_generic masks INTx (COMMAND.INTX_DISABLE) in its handler; user space re-enables it."""
    cmd = pci.read_config(dev, PCI_COMMAND, 2)
    pci.write_config(dev, PCI_COMMAND, 2, cmd & ~COMMAND_INTX_DISABLE)


def _uio_wait(fd: int) -> tuple[int | None, float]:
    t0 = time.monotonic()
    ready, _, _ = select.select([fd], [], [], WAKE_TIMEOUT)
    ms = (time.monotonic() - t0) * 1000
    if not ready:
        return None, ms
    return int.from_bytes(os.read(fd, 4), "little"), ms  # uio: total interrupts so far


def _intx_step(card: Card, dev: pci.PciDevice, fd: int, kick) -> dict[str, Any]:
    card.mmio.write32(regs.ICR, 0xFFFF_FFFF)
    _intx_enable(dev)
    kick()
    count, ms = _uio_wait(fd)
    icr = card.mmio.read32(regs.ICR)
    seen = {"uio_count": count, "latency_ms": round(ms, 3), "icr": icr,
            "status_int_before_ack": bool(pci.read_config(dev, PCI_STATUS, 2) & STATUS_INTERRUPT),
            "intx_masked_by_handler": bool(pci.read_config(dev, PCI_COMMAND, 2) & COMMAND_INTX_DISABLE)}
    card.mmio.write32(regs.ICR, icr)  # deasserts the line
    seen["status_int_after_ack"] = bool(pci.read_config(dev, PCI_STATUS, 2) & STATUS_INTERRUPT)
    _intx_enable(dev)
    return seen


def check_intx(spec: dict[str, Any]) -> dict[str, Any]:
    frames = _frames(spec)
    dev = pci.find_device(regs.VENDOR_ID, regs.DEVICE_ID, spec.get("bdf"))
    _bind(dev.bdf, "uio_pci_generic")
    uio = sorted((dev.path / "uio").iterdir())[0].name
    fd = os.open(f"/dev/{uio}", os.O_RDWR)
    try:
        # uio_pci_generic enabled the device already (sysfs 'enable' is refused while a driver owns it):
        # set bus mastering, map BAR0 through sysfs, DMA from pagemap memory, as open_card does.
        pci.write_config(dev, PCI_COMMAND, 2, pci.read_config(dev, PCI_COMMAND, 2) | PCI_COMMAND_MEM_MASTER)
        card = Card(pci.Bar(dev, 0), PagemapMemory(), state=HostSaTable(STATE)).init(reset=True)
        with card:
            # The driver set up polling; switch the card to one interrupt (SINGLE) for admin + RX0 only.
            card.mmio.write32(regs.reg("IMC"), 0xFFFF_FFFF)
            card.mmio.write32(regs.reg("IMS"), int(Cause.ADMINQ) | regs.cause_rx(card.queue))
            ctrl = card.mmio.read32(regs.CTRL) & ~int(Ctrl.INT_MODE)
            card.mmio.write32(regs.CTRL, ctrl | (int(IntMode.SINGLE) << regs.CTRL_INT_MODE_SHIFT))
            out: dict[str, Any] = {
                "uio": uio, "dma": card.memory.kind, "int_mode": _int_mode(card),
                "msix_enabled": bool(pci.read_config(dev, MSIX_CAP_CONTROL, 2) & MSIX_ENABLE),
                "driver": os.path.basename(os.readlink(dev.path / "driver")),
            }
            index = -1

            def kick_admin() -> None:
                nonlocal index
                index = post_admin(card, Opcode.GET_CAPS, interrupt=True)

            out["admin"] = _intx_step(card, dev, fd, kick_admin)
            out["admin"]["done"] = admin_result(card, index)["done"]
            out["rx"] = _intx_step(card, dev, fd, lambda: card.send_raw(frames[0]))
            got = recv_n(card, 1, timeout=2.0)
            out["rx"]["frames"] = [g["frame"] for g in got]
            out["rx"]["dd"] = bool(got and got[0]["flags"] & RxWbFlags.DD)
            card.flush_tx()
            return out
    finally:
        os.close(fd)


CHECKS = {"poll": check_poll, "msix": check_msix, "intx": check_intx}

if __name__ == "__main__":
    raise SystemExit(main(CHECKS))
