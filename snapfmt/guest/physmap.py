"""Where QEMU puts a snapshot's RAM blocks in guest-physical memory (spec/memory.md).

The map is built as QEMU's memory API renders the system address space of a pc
(i440FX) or q35 machine, in priority order: the PCI address space under everything
(the firmware below 4 GiB, pc.rom, the ISA BIOS alias, a legacy VGA window), then RAM
split around the PCI hole by the machine type's versioned rule, then the chipset's
overlays as its config space in the snapshot sets them (PAM, SMRAM, q35's TSEG and
SMBASE black holes).  Ranges are merged where QEMU's ``dump-guest-memory`` merges them:
contiguous in guest-physical memory and in the same block.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from snapfmt.errors import GuestMemoryError
from snapfmt.guest.bars import pci_config, ram_bars
from snapfmt.model import DeviceState, RamBlock, Snapshot

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
FOUR_GIB = 4 * GiB
ISA_BIOS_MAX = 128 * KiB  # the top of the BIOS (at most 128 KiB) is also seen below 1 MiB
PC_ROM = 0xC0000  # option ROM space, 128 KiB
VGA_WINDOW = (0xA0000, 0xC0000)  # legacy VGA memory, and SMRAM behind it
PAM_REGIONS = [(0xF0000, 0x100000)] + [
    (0xC0000 + i * 0x4000, 0xC4000 + i * 0x4000) for i in range(12)
]  # QEMU's 13 PAM regions, in the order of their config nibbles
# drivers and vmstate names of display devices with a legacy VGA window at 0xa0000
LEGACY_VGA = {"VGA", "vga", "cirrus-vga", "cirrus_vga", "qxl-vga", "qxl", "virtio-vga",
              "virtio-vga-gl", "isa-vga", "isa-cirrus-vga", "ati-vga", "vmware-svga",
              "vmware_vga"}  # fmt: skip


class Chipset(NamedTuple):
    """The registers of a host bridge's config space that change the memory map."""

    name: str  # the vmstate name: I440FX or mch
    pam: int  # offset of the first PAM register
    smram: int  # offset of the SMRAM register


I440FX = Chipset("I440FX", pam=0x59, smram=0x72)
MCH = Chipset("mch", pam=0x90, smram=0x9D)
SMRAM_D_OPEN, SMRAM_G_SMRAME = 0x40, 0x08
MCH_ESMRAMC, ESMRAMC_H_SMRAME, ESMRAMC_T_EN = 0x9E, 0x80, 0x01
MCH_EXT_TSEG_MBYTES, MCH_F_SMBASE, F_SMBASE_LCK = 0x50, 0x9C, 0x02
HIGH_SMRAM = 0xFEDA0000  # q35: where SMRAM opens above the PCI hole (H_SMRAME)


class Range(NamedTuple):
    """Guest-physical [start, start + length) holds bytes [offset, …) of *block*."""

    start: int
    length: int
    block: str  # the block's QEMU name (pc.ram, pc.bios, pc.rom)
    offset: int

    @property
    def end(self) -> int:
        return self.start + self.length


class PhysicalMap(NamedTuple):
    machine: str
    family: str  # "pc" or "q35"
    below_4g: int  # RAM bytes below 4 GiB
    above_4g: int  # RAM bytes at 4 GiB and up
    ranges: tuple[Range, ...]  # ascending, merged as dump-guest-memory merges
    blocks: dict[str, RamBlock]  # the blocks the ranges read, by QEMU name
    unmapped: tuple[str, ...]  # the snapshot's other RAM blocks (fw_cfg blobs, BARs)
    notes: tuple[str, ...]  # how the chipset state shaped the map

    @property
    def end(self) -> int:
        return self.ranges[-1].end if self.ranges else 0

    def find(self, address: int) -> Range | None:
        """The range holding *address*, None for a hole."""
        for r in self.ranges:
            if r.start <= address < r.end:
                return r
        return None

    def read(self, address: int, length: int) -> bytes:
        """Guest-physical bytes [address, address + length); a hole is an error."""
        out = bytearray()
        while len(out) < length:
            at = address + len(out)
            r = self.find(at)
            if r is None:
                raise GuestMemoryError(f"guest-physical {at:#x} is not RAM or ROM (a hole)")
            n = min(length - len(out), r.end - at)
            out += self.blocks[r.block].read(r.offset + at - r.start, n)
        return bytes(out)


# -- machine types ---------------------------------------------------------------------------

_VERSIONED = re.compile(r"pc-(i440fx|q35)-(\d+)\.(\d+)$")
_OLD_PC = re.compile(r"pc-(\d+)\.(\d+)$")  # pc-1.7 and older: i440FX


def machine_family(machine: str) -> tuple[str, tuple[int, int]]:
    """("pc" or "q35", (major, minor)) of a versioned machine type name."""
    if m := _VERSIONED.match(machine):
        return ("pc" if m[1] == "i440fx" else "q35"), (int(m[2]), int(m[3]))
    if m := _OLD_PC.match(machine):
        return "pc", (int(m[1]), int(m[2]))
    raise GuestMemoryError(
        f"machine type {machine!r}: snapfmt knows the memory map of pc-i440fx-X.Y and "
        "pc-q35-X.Y machines only"
    )


def ram_split(family: str, version: tuple[int, int], ram_size: int) -> int:
    """RAM below 4 GiB by the machine type's rule, without max-ram-below-4g (pc_piix.c,
    pc_q35.c): pc splits at 3.5 GiB, or at 3 GiB once RAM reaches 3.5 GiB (gigabyte
    alignment, machine types 2.0 and later); q35 at 2.75 GiB, or 2 GiB from there."""
    aligned = version >= (2, 0)
    if family == "pc":
        low = 0xC0000000 if aligned and ram_size >= 0xE0000000 else 0xE0000000
    else:
        low = 0x80000000 if aligned and ram_size >= 0xB0000000 else 0xB0000000
    return min(ram_size, low)


def cmos_split(cmos: bytes, ram_size: int) -> int | None:
    """RAM below 4 GiB as QEMU wrote it into the RTC's CMOS (pc_cmos_init), which also
    covers a machine started with max-ram-below-4g; None if the bytes do not add up to
    the RAM size (a guest may rewrite CMOS)."""
    if len(cmos) < 0x5E:
        return None
    above = int.from_bytes(cmos[0x5B:0x5E], "little") * 64 * KiB
    mid = int.from_bytes(cmos[0x34:0x36], "little")
    below = mid * 64 * KiB + 16 * MiB if mid else int.from_bytes(cmos[48:50], "little") * KiB + MiB
    return below if below + above == ram_size and below <= FOUR_GIB else None


# -- painting the address space --------------------------------------------------------------

Target = tuple[str, int] | None  # (block, offset at the segment's start), None: not RAM
Segment = tuple[int, int, Target]


def paint(segments: list[Segment], start: int, end: int, target: Target) -> list[Segment]:
    """*segments* with [start, end) now showing *target* (a higher-priority region)."""
    out: list[Segment] = []
    for s, e, t in segments:
        if e <= start or s >= end:
            out.append((s, e, t))
            continue
        if s < start:
            out.append((s, start, t))
        if e > end:
            out.append((end, e, None if t is None else (t[0], t[1] + end - s)))
    out.append((start, end, target))
    return sorted(out, key=lambda seg: seg[0])


def show(segments: list[Segment], layer: Iterable[Segment], start: int, end: int) -> list[Segment]:
    """*segments* with what *layer* holds in [start, end) on top (an alias of the PCI
    address space: where the layer holds nothing, what is below shows through)."""
    for s, e, t in list(layer):
        lo, hi = max(s, start), min(e, end)
        if lo < hi:
            segments = paint(segments, lo, hi, None if t is None else (t[0], t[1] + lo - s))
    return segments


def merged(segments: list[Segment]) -> tuple[Range, ...]:
    ranges: list[Range] = []
    for s, e, t in segments:
        if t is None or e <= s:
            continue
        last = ranges[-1] if ranges else None
        if last and last.end == s and last.block == t[0] and last.offset + last.length == t[1]:
            ranges[-1] = last._replace(length=last.length + e - s)
        else:
            ranges.append(Range(s, e - s, t[0], t[1]))
    return tuple(ranges)


# -- the snapshot ----------------------------------------------------------------------------


class BackingFile(RamBlock):
    """A RAM block's contents read from the file that backed it in the guest (a block
    x-ignore-shared left out of the stream), the block's offset 0 at the file's start."""

    def __init__(self, block: RamBlock, file: str) -> None:
        self.path, self.length, self.qemu_idstr = block.path, block.length, block.qemu_idstr
        self.page_size = self.chunk_size = block.page_size
        self.file = file
        try:
            size = os.stat(file).st_size
        except OSError as e:
            raise GuestMemoryError(f"{file}: {e.strerror}") from None
        if size < block.length:
            raise GuestMemoryError(
                f"{file}: {size:#x} bytes, less than RAM block {block.path}'s {block.length:#x}"
            )

    def read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.file, os.O_RDONLY)  # (opened at each read: nothing to close)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise GuestMemoryError(f"{self.file}: ends before {offset + length:#x}")
        return data

    def iter_spans(self, span: int = 1 << 22) -> Iterator[tuple[int, memoryview]]:
        for at in range(0, self.length, span):
            yield at, memoryview(self.read(at, min(span, self.length - at)))

    def summary(self) -> tuple[int, int, int]:
        return -(-self.length // self.page_size), 0, 0


def _blocks(snap: Snapshot, supplied: Mapping[str, str]) -> dict[str, RamBlock]:
    blocks: dict[str, RamBlock] = {}
    for block in snap.ram_blocks():
        blocks[block.qemu_idstr or str(block.path).lstrip("/")] = block
    for name, file in supplied.items():
        if name not in blocks:
            known = ", ".join(sorted(blocks))
            raise GuestMemoryError(f"no RAM block {name!r} to read from {file} (blocks: {known})")
        blocks[name] = BackingFile(blocks[name], file)
    return blocks


def _config_of(devices: list[DeviceState], chipset: Chipset) -> bytes:
    """The host bridge's 256-byte PCI config space."""
    for device in devices:
        if device.vmstate_name != chipset.name:
            continue
        config = pci_config(device)
        if config is None:
            raise GuestMemoryError(
                f"{device.path}: no decoded PCI config space (the section has no field "
                "layout), so PAM and SMRAM are unknown"
            )
        if len(config) < 256:
            raise GuestMemoryError(
                f"{device.path}: PCI config space of {len(config)} bytes, expected 256"
            )
        return config
    raise GuestMemoryError(
        f"no {chipset.name} host bridge section: its PAM and SMRAM registers decide the "
        "memory map below 1 MiB"
    )


def _cmos(devices: list[DeviceState]) -> bytes | None:
    for device in devices:
        if device.vmstate_name == "mc146818rtc":
            for field in device.iter_fields():
                if field.name == "cmos_data" and isinstance(field.value, bytes):
                    return field.value
    return None


def _has_legacy_vga(devices: list[DeviceState]) -> bool:
    return any(d.driver in LEGACY_VGA or d.vmstate_name in LEGACY_VGA for d in devices)


def physical_map(
    snap: Snapshot, ram: str = "pc.ram", supplied: Mapping[str, str] | None = None
) -> PhysicalMap:
    """The guest-physical memory map of *snap* (see the module's docstring).  *ram* names
    the machine's RAM block; *supplied* maps block names to files holding their contents
    (for blocks the snapshot does not carry)."""
    machine = snap.configuration.machine
    family, version = machine_family(machine)
    blocks = _blocks(snap, supplied or {})
    if ram not in blocks:
        raise GuestMemoryError(f"no RAM block {ram!r} (the machine's RAM): name it with --ram")
    ram_size = blocks[ram].length
    notes: list[str] = []
    devices = list(snap.devices())  # (each helper below looks through them)
    cmos = _cmos(devices)
    below = ram_split(family, version, ram_size)
    from_cmos = cmos_split(cmos, ram_size) if cmos is not None else None
    if from_cmos is not None and from_cmos != below:
        notes.append(f"RAM below 4 GiB: {from_cmos:#x} as the CMOS records (max-ram-below-4g)")
        below = from_cmos
    above = ram_size - below

    pci = _pci_space(blocks, _has_legacy_vga(devices))
    bars = ram_bars(devices, blocks)
    for bar in bars:
        pci = paint(pci, bar.start, bar.start + bar.length, (bar.block, 0))
    system = paint(list(pci), 0, below, (ram, 0))
    if above:
        system = paint(system, FOUR_GIB, FOUR_GIB + above, (ram, below))
    chipset = I440FX if family == "pc" else MCH
    config = _config_of(devices, chipset)
    system = _overlays(system, pci, config, chipset, ram, below, version, notes)
    used = {name for name in (ram, "pc.bios", "pc.rom") if name in blocks}
    used |= {bar.block for bar in bars}
    unmapped = tuple(sorted(name for name in blocks if name not in used))
    ranges = merged(system)
    return PhysicalMap(machine, family, below, above, ranges,
                       {n: b for n, b in blocks.items() if n in used}, unmapped, tuple(notes))  # fmt: skip


def _pci_space(blocks: dict[str, RamBlock], legacy_vga: bool) -> list[Segment]:
    """What the PCI address space holds below 4 GiB besides the BARs."""
    pci: list[Segment] = []
    bios = blocks.get("pc.bios")
    if bios is not None and 0 < bios.length <= 16 * MiB:
        pci = paint(pci, FOUR_GIB - bios.length, FOUR_GIB, ("pc.bios", 0))
        isa = min(bios.length, ISA_BIOS_MAX)
        pci = paint(pci, MiB - isa, MiB, ("pc.bios", bios.length - isa))
    rom = blocks.get("pc.rom")
    if rom is not None and 0 < rom.length <= 0x20000:
        pci = paint(pci, PC_ROM, PC_ROM + rom.length, ("pc.rom", 0))
    if legacy_vga:
        pci = paint(pci, *VGA_WINDOW, None)
    return pci


def _overlays(
    system: list[Segment],
    pci: list[Segment],
    config: bytes,
    chipset: Chipset,
    ram: str,
    below: int,
    version: tuple[int, int],
    notes: list[str],
) -> list[Segment]:
    """The host bridge's priority-1 regions, as its config space sets them."""
    for i, (start, end) in enumerate(PAM_REGIONS):
        value = config[chipset.pam + (i + 1) // 2]
        mode = (value >> (4 if i % 2 == 0 else 0)) & 3
        if mode == 0:  # reads go to the PCI address space (ROMs), else to RAM
            system = show(system, pci, start, end)
        elif end <= below:
            system = paint(system, start, end, (ram, start))
    smram = config[chipset.smram]
    d_open = bool(smram & SMRAM_D_OPEN)
    if chipset is I440FX:
        if not d_open:  # SMRAM closed: the VGA window of the PCI space shows
            system = show(system, pci, *VGA_WINDOW)
        return system
    esmramc = config[MCH_ESMRAMC]
    h_smrame = bool(esmramc & ESMRAMC_H_SMRAME)
    if not d_open or h_smrame:
        system = show(system, pci, *VGA_WINDOW)
    if d_open and h_smrame:
        notes.append(f"SMRAM open at {HIGH_SMRAM:#x}")
        system = paint(system, HIGH_SMRAM, HIGH_SMRAM + 0x20000, (ram, VGA_WINDOW[0]))
    if esmramc & ESMRAMC_T_EN and smram & SMRAM_G_SMRAME:
        tseg = _tseg_size(config)
        notes.append(f"TSEG: {tseg // MiB} MiB below {below:#x} is SMRAM, not visible")
        system = paint(system, below - tseg, below, None)
    if version >= (5, 0) and config[MCH_F_SMBASE] & F_SMBASE_LCK:
        notes.append("SMRAM at SMBASE: 0x30000-0x4ffff is not visible")
        system = paint(system, 0x30000, 0x50000, None)
    return system


def _tseg_size(config: bytes) -> int:
    size = (config[MCH_ESMRAMC] >> 1) & 3
    if size < 3:
        return (1, 2, 8)[size] * MiB
    # extended TSEG: the size firmware read back from the register, else QEMU's default
    ext = int.from_bytes(config[MCH_EXT_TSEG_MBYTES : MCH_EXT_TSEG_MBYTES + 2], "little")
    return (ext if ext not in (0, 0xFFFF) else 16) * MiB
