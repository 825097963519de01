"""A pure-Python vfio-user server library (knows nothing of PCI or NICs).

Devices implement :class:`VfioUserDevice` (device_api.py); :func:`serve` or
:class:`VfioUserServer` attach them to a vfio-user client such as QEMU's ``vfio-user-pci``.
"""

from .connection import VfioUserConnection
from .device_api import (
    DeviceContext,
    DmaAccess,
    DmaError,
    IrqInfo,
    MmapArea,
    RegionInfo,
    VfioUserDevice,
    VfioUserError,
)
from .dma import DmaTable
from .irq import IrqTable
from .protocol import Command, ProtocolError
from .server import VfioUserServer, serve

__all__ = [
    "Command",
    "DeviceContext",
    "DmaAccess",
    "DmaError",
    "DmaTable",
    "IrqInfo",
    "IrqTable",
    "MmapArea",
    "ProtocolError",
    "RegionInfo",
    "VfioUserConnection",
    "VfioUserDevice",
    "VfioUserError",
    "VfioUserServer",
    "serve",
]
