"""Guest check of the mirror BAR (run by tests/vm/test_card_probe.py).

    python3 -m guest_tools.checks.mirror DEVICE_ID

Maps BAR0 and the mirror BAR (BAR4) through sysfs and prints, as JSON, STATUS and ERR_CODE read from both
before and after the card changes state (CTRL.ENABLE toggled), after a write into the mirror, and after the
next state change, which must bring the mirror back to the card's value.
Every read is one 32-bit MMIO access (guest_tools.pci.Bar).
"""

from __future__ import annotations

import json
import sys
import time

from device.contract import regs
from guest_tools import pci


def main(argv: list[str]) -> int:
    dev = pci.find_device(regs.VENDOR_ID, int(argv[0], 0) if argv else regs.DEVICE_ID)
    pci.enable_device(dev)
    bar0, bar4 = pci.Bar(dev, 0), pci.Bar(dev, regs.MIRROR_BAR)

    def snap() -> dict[str, int]:
        return {"status": bar0.read32(regs.STATUS), "m_status": bar4.read32(regs.M_STATUS),
                "err": bar0.read32(regs.reg("ERR_CODE")), "m_err": bar4.read32(regs.M_ERR_CODE)}

    out: dict[str, object] = {"bar4_size": bar4.size, "before": snap()}
    bar0.write32(regs.CTRL, bar0.read32(regs.CTRL) ^ regs.Ctrl.ENABLE)
    time.sleep(0.2)  # the card applies CTRL on its loop; the mirror must follow
    out["toggled"] = snap()
    bar4.write32(regs.M_STATUS, 0)  # through QEMU's mapping this lands in the shared page (datasheet §2)
    out["after_write"] = snap()
    bar0.write32(regs.CTRL, bar0.read32(regs.CTRL) ^ regs.Ctrl.ENABLE)
    time.sleep(0.2)
    out["restored"] = snap()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
