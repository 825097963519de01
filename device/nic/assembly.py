"""Assembly of one card from its profile: register file + PCI function + data path + firmware + wire.

The only module that knows every part; the parts know only what they are handed (the register file
knows no data path, the queue engines know the firmware's ``execute`` and a small events interface).
"""

from __future__ import annotations

from device.contract import regs
from device.nic.card import NicCard, firmware_capabilities
from device.nic.datapath import Datapath
from device.nic.wire import wire_from_profile
from device.pci.capabilities import eui64_from_mac
from device.pci.config_space import BarLayout, BarType
from device.pci.function import PciFunction, PciIds
from device.profile import Profile
from firmware_model.firmware import Firmware


class NicFunction(PciFunction):
    """The card as a PCI function; ``card`` is its BAR0 register file."""

    card: NicCard


def build_card(profile: Profile) -> NicFunction:
    """Build the card a profile describes, ready for ``serve(socket_path, build_card(profile))``."""
    caps = firmware_capabilities(profile)
    card = NicCard(profile, caps)
    pci = profile.pci
    function = NicFunction(
        PciIds(pci.vendor_id, pci.device_id, pci.subsystem_vendor_id, pci.subsystem_id, pci.class_code,
               pci.revision),
        bars={0: (BarLayout(0, regs.BAR0_SIZE, BarType.MEM32), card),
              regs.MIRROR_BAR: (BarLayout(regs.MIRROR_BAR, regs.MIRROR_BAR_SIZE, BarType.MEM32), card.mirror_bar)},
        msix_vectors=profile.nic.msix_vectors,
        msix_bar=2,
        msix_table_offset=regs.MSIX_TABLE_OFFSET,
        msix_pba_offset=regs.MSIX_PBA_OFFSET,
        serial_number=eui64_from_mac(profile.nic.mac),
    )
    if function.bar_layouts[2].size != regs.BAR2_SIZE:
        raise AssertionError("BAR2 size disagrees with regs.BAR2_SIZE")
    function.card = card
    card.bind(function)
    # The data path (admin queue, rings, firmware, wire) registers its hooks on the register file.
    card.datapath = Datapath(card, Firmware(caps), wire_from_profile(profile.wire))
    return function
