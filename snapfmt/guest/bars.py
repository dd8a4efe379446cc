"""RAM blocks that PCI BARs place in the PCI address space (spec/memory.md §3): a
display's video RAM behind BAR 0 (``…/vga.vram``) and option ROMs behind the expansion
ROM BAR (``…/NAME.rom``), once firmware has programmed and enabled them.  The config
space comes from the device's ``pci config`` field, or for a virtio device from the
start of its ``virtio`` field.

A BAR maps as QEMU's pci_bar_address decides: memory decoding on in the command
register, the ROM BAR's enable bit set, the address aligned down to the region's size,
and a 32-bit BAR not reaching 4 GiB.  Only devices on the root bus are placed: behind a
bridge its windows decide too, which snapfmt does not model (such blocks stay unmapped).
"""

from __future__ import annotations

from typing import NamedTuple

from snapfmt.model import DeviceState, RamBlock

PCI_COMMAND, COMMAND_MEMORY = 0x04, 0x02
BAR0, ROM_BAR, ROM_ENABLE = 0x10, 0x30, 0x01
BAR_IO, BAR_64 = 0x01, 0x04
ROOT_BUS = "0000:00:"


class Bar(NamedTuple):
    start: int
    block: str  # the block's QEMU name
    length: int


def pci_config(device: DeviceState) -> bytes | None:
    """The device's PCI config space as its state holds it, None if it holds none."""
    for field in device.iter_fields():
        if not isinstance(field.value, bytes):
            continue
        if field.type == "pci config":
            return field.value
        # a virtio device's state starts with its PCI proxy's (virtio_pci_save_config:
        # vmstate_pci_device, an int32 version and then the 256-byte config space)
        if field.type == "virtio" and len(field.value) >= 4 + 256:
            return field.value[4 : 4 + 256]
    return None


def _configs(devices: list[DeviceState]) -> dict[str, bytes]:
    """Each PCI device's config space, by its address (``0000:00:02.0``)."""
    found: dict[str, bytes] = {}
    for device in devices:
        address, sep, _ = (device.qemu_idstr or "").partition("/")
        if sep and address not in found and (config := pci_config(device)) is not None:
            found[address] = config
    return found


def _address(config: bytes, register: int, size: int) -> int | None:
    if len(config) < 0x40 or not config[PCI_COMMAND] & COMMAND_MEMORY:
        return None
    value = int.from_bytes(config[register : register + 4], "little")
    if register == ROM_BAR:
        if not value & ROM_ENABLE:
            return None
    elif value & BAR_IO:
        return None
    elif value & BAR_64:
        value |= int.from_bytes(config[register + 4 : register + 8], "little") << 32
    wide = register != ROM_BAR and bool(value & BAR_64)
    start = value & ~(size - 1)
    last = start + size - 1
    if last <= start or (not wide and last >= 0xFFFFFFFF):
        return None
    return start


def ram_bars(devices: list[DeviceState], blocks: dict[str, RamBlock]) -> list[Bar]:
    """The RAM blocks BARs map now, with their addresses."""
    configs = _configs(devices)
    bars = []
    for name, block in blocks.items():
        address, sep, leaf = name.partition("/")
        config = configs.get(address)
        if not sep or config is None or not address.startswith(ROOT_BUS):
            continue
        size = block.length
        if size <= 0 or size & (size - 1):
            continue  # (QEMU sizes BAR regions in powers of two)
        if leaf == "vga.vram":
            register = BAR0
        elif leaf.endswith(".rom"):
            register = ROM_BAR
        else:
            continue
        start = _address(config, register, size)
        if start is not None:
            bars.append(Bar(start, name, size))
    return bars
