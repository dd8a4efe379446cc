"""The check QEMU makes of a PCI device's config space on load (hw/pci/pci.c,
``get_pci_config_device``).

QEMU compares each loaded config byte with the device's own, where the device's check
mask (cmask) is set and neither its write mask (wmask) nor its write-1-to-clear mask
(w1cmask) is: the standard header's read-only registers (``pci_init_cmask``), and every
byte of each capability QEMU adds (``pci_add_capability``) but its writable bits, which
the capability's own init sets in wmask and w1cmask.  The masks are not in a stream; they
follow here from the target device's config space: its header and capability list.
"""

from __future__ import annotations

from typing import NamedTuple

PCI_CAP_ID_PM, PCI_CAP_ID_MSI, PCI_CAP_ID_VNDR = 0x01, 0x05, 0x09
PCI_CAP_ID_EXP, PCI_CAP_ID_MSIX = 0x10, 0x11
PCI_EXP_VER2_SIZEOF = 0x3C
VIRTIO_PCI_CAP_PCI_CFG = 5  # the virtio vendor capability a guest writes through


class Masks(NamedTuple):
    cmask: bytearray
    wmask: bytearray
    w1cmask: bytearray


class BadByte(NamedTuple):
    """The first byte QEMU refuses, with what it prints."""

    offset: int
    read: int  # the snapshot's
    device: int  # the target's
    cmask: int
    wmask: int
    w1cmask: int

    @property
    def qemu(self) -> str:
        return (
            f"get_pci_config_device: Bad config data: i={self.offset:#x} read: {self.read:x} "
            f"device: {self.device:x} cmask: {self.cmask:x} wmask: {self.wmask:x} "
            f"w1cmask:{self.w1cmask:x}"
        )


def masks(config: bytes) -> Masks:
    """The masks QEMU gives a device whose config space is *config*."""
    size = len(config)
    m = Masks(bytearray(size), bytearray(size), bytearray(size))
    for at, value in ((0x00, 0xFF), (0x01, 0xFF), (0x02, 0xFF), (0x03, 0xFF), (0x06, 0x10),
                      (0x08, 0xFF), (0x09, 0xFF), (0x0A, 0xFF), (0x0B, 0xFF), (0x0E, 0xFF),
                      (0x34, 0xFF)):  # fmt: skip
        if at < size:
            m.cmask[at] = value
    for at, cap in capabilities(config):
        length = _length(config, at, cap)
        m.cmask[at : at + length] = b"\xff" * len(m.cmask[at : at + length])
        _writable(config, at, cap, m)
    return m


def capabilities(config: bytes) -> list[tuple[int, int]]:
    """(offset, id) of each capability in a config space's list, in list order; a loop
    or a pointer out of the standard 256 bytes ends it."""
    found: list[tuple[int, int]] = []
    if len(config) < 0x40 or not config[0x06] & 0x10:
        return found
    at, seen = config[0x34] & 0xFC, set[int]()
    while 0x40 <= at < min(len(config), 0x100) - 1 and at not in seen and len(seen) < 48:
        seen.add(at)
        found.append((at, config[at]))
        at = config[at + 1] & 0xFC
    return found


def _length(config: bytes, at: int, cap: int) -> int:
    """The bytes a capability takes, as QEMU adds it."""
    if cap == PCI_CAP_ID_MSIX:
        return 12
    if cap == PCI_CAP_ID_PM:
        return 8
    if cap == PCI_CAP_ID_EXP:
        return PCI_EXP_VER2_SIZEOF
    if cap == PCI_CAP_ID_MSI and at + 3 < len(config):
        flags = int.from_bytes(config[at + 2 : at + 4], "little")
        return 10 + (4 if flags & 0x80 else 0) + (10 if flags & 0x100 else 0)
    if cap == PCI_CAP_ID_VNDR and at + 2 < len(config):
        return max(config[at + 2], 3)
    return 2  # (an id QEMU adds elsewhere: its id and next pointer at least)


def _set(mask: bytearray, at: int, values: bytes) -> None:
    for i, value in enumerate(values):
        if at + i < len(mask):
            mask[at + i] |= value


def _writable(config: bytes, at: int, cap: int, m: Masks) -> None:
    """The bits of a capability a guest may change, which QEMU does not compare."""
    if cap == PCI_CAP_ID_MSIX:  # msix_init: enable and function mask
        _set(m.wmask, at + 3, b"\xc0")
    elif cap == PCI_CAP_ID_MSI:  # msi_init: enable, multiple message enable, address, data
        flags = int.from_bytes(config[at + 2 : at + 4], "little")
        _set(m.wmask, at + 2, b"\x71")
        wide = 4 if flags & 0x80 else 0
        _set(m.wmask, at + 4, b"\xfc\xff\xff\xff" + b"\xff" * wide + b"\xff\xff")
        if flags & 0x100:  # per-vector masking: the mask bits
            _set(m.wmask, at + 12 + wide, b"\xff\xff\xff\xff")
    elif cap == PCI_CAP_ID_PM:  # power state and PME enable; PME status is write-1-to-clear
        _set(m.wmask, at + 4, b"\x03\x01")
        _set(m.w1cmask, at + 5, b"\x80")
    elif cap == PCI_CAP_ID_EXP:  # the control registers; status registers clear on 1
        for control in (0x08, 0x10, 0x18, 0x1C, 0x28, 0x30):
            _set(m.wmask, at + control, b"\xff\xff")
        for status in (0x0A, 0x12, 0x1A):
            _set(m.w1cmask, at + status, b"\xff\xff")
        _set(m.w1cmask, at + 0x20, b"\xff\xff\xff\xff")
    elif (
        cap == PCI_CAP_ID_VNDR
        and at + 3 < len(config)
        and (
            config[at + 3] == VIRTIO_PCI_CAP_PCI_CFG  # its window: bar, offset, length, data
        )
    ):
        _set(m.wmask, at + 4, b"\xff")
        _set(m.wmask, at + 8, b"\xff" * 12)


def first_bad_byte(loaded: bytes, device: bytes) -> BadByte | None:
    """The first byte of *loaded* (a snapshot's config space) that QEMU refuses for a
    device whose own config space is *device*; None when QEMU accepts them all."""
    if len(loaded) != len(device):
        return None  # (QEMU refuses a size mismatch earlier, in the layout)
    m = masks(device)
    for i, (a, b) in enumerate(zip(loaded, device, strict=True)):
        if (a ^ b) & m.cmask[i] & ~m.wmask[i] & ~m.w1cmask[i]:
            return BadByte(i, a, b, m.cmask[i], m.wmask[i], m.w1cmask[i])
    return None
