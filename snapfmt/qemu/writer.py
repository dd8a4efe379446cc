"""Write a QEMU migration stream (QEVM v3) from any snapshot snapfmt can read.

The stream is what QEMU 7.2 itself writes for a paused machine: the configuration
section, the RAM section (START with the block list, then every page -- zero pages as
ZERO records -- in an END section), every device as a FULL section with its state bytes
exactly as read, EOF, and a vmdesc built from the field layouts.  Every section has a
footer.  Written atomically like native snapshots.

With ``mapped_ram`` it is what QEMU 9.0 and later write to a ``file:`` URI with the
mapped-ram capability (reference §6): each entry of the block list is followed by a
header naming a bitmap and a page area at a 1 MiB boundary where page *i* lies at *i*
pages on; pages that are not zero are written there and marked in the bitmap, the rest
are holes; no page record is written.  QEMU loads it with mapped-ram on, with or without
multifd.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import IO, Any

from snapfmt._io import json_dumps, replace
from snapfmt.errors import WriteError
from snapfmt.formats import qemu as qf
from snapfmt.model import DeviceState, RamBlock, Snapshot, nonzero_runs
from snapfmt.qemu.paths import PathAssigner
from snapfmt.qemu.walk import IDSTR

Progress = Callable[[int], None] | None

# Plain ints: `int | IntFlag` makes (and caches for good) an IntFlag for every distinct
# page offset, which grew memory with the RAM size.
_ZERO, _PAGE, _CONTINUE = int(qf.RamFlag.ZERO), int(qf.RamFlag.PAGE), int(qf.RamFlag.CONTINUE)
_MEM_SIZE, _EOS = int(qf.RamFlag.MEM_SIZE), int(qf.RamFlag.EOS)


def _name(text: str, what: str, target: str) -> str:
    """*text*, checked to fit a counted string (reference §0)."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raise WriteError(
            f"{what} {text!r} has characters a QEMU stream cannot hold", file=target
        ) from None
    if not 0 < len(raw) <= 255:
        raise WriteError(
            f"{what} {text!r} does not fit a counted string (1-255 bytes)", file=target
        )
    return text


def _vmdesc_entry(device: DeviceState) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": device.qemu_idstr,
        "instance_id": device.instance_id,
        "vmsd_name": device.vmstate_name,
        "version": device.version_id,
    }
    assert device.layout is not None
    entry["fields"] = list(device.layout.get("fields", []))
    if device.layout.get("subsections"):
        entry["subsections"] = list(device.layout["subsections"])
    return entry


MAPPED_RAM_ALIGN = 1 << 20  # where QEMU puts each block's page area (mapped-ram)


def write_qemu(
    snap: Snapshot, target: str, progress: Progress = None, mapped_ram: bool = False
) -> None:
    """Write *snap* as a QEMU stream to *target* (temp file beside it, fsync, rename);
    *mapped_ram*: laid out by page offset, as QEMU writes with that capability."""
    devices, blocks = _check(snap, target)
    if mapped_ram and "postcopy-ram" in snap.configuration.capabilities:
        raise WriteError("a mapped-ram stream cannot hold postcopy-ram's block page sizes; "
                         "write an ordinary stream", file=target)  # fmt: skip
    with replace(target, buffering=1 << 20) as f:
        _write(snap, devices, blocks, f, progress, mapped_ram)


def checked_stream(snap: Snapshot, target: str) -> Callable[[IO[bytes], Progress], None]:
    """Check that *snap* fits a QEMU stream (before a byte of *target* is written), and
    return what writes that stream to an open file (a libvirt save image holds one)."""
    devices, blocks = _check(snap, target)
    return lambda f, progress: _write(snap, devices, blocks, f, progress)


HOST_PAGE_SIZE = 4096  # the page size of the hosts QEMU x86 runs on


def _host_page_sizes(config: Any, blocks: list[RamBlock]) -> dict[str, int]:
    """{block id: page size} of the huge-page blocks a postcopy stream names: from the
    blocks (a QEMU stream), else from the configuration (a native file keeps them)."""
    kept = config.metadata.get("host_page_sizes")
    sizes = dict(kept) if isinstance(kept, dict) else {}
    for block in blocks:
        if block.host_page_size:
            sizes[str(block.qemu_idstr)] = block.host_page_size
    return {k: v for k, v in sizes.items() if isinstance(v, int) and v > 0}


def _check(snap: Snapshot, target: str) -> tuple[list[DeviceState], list[RamBlock]]:
    """The devices and RAM blocks to write, checked to fit a stream before a byte is."""
    config = snap.configuration
    if "x-ignore-shared" in config.capabilities:
        raise WriteError("writing streams with x-ignore-shared is not supported", file=target)
    _name(config.machine, "machine type", target)
    for capability in config.capabilities:
        _name(capability, "capability", target)
    devices = list(snap.devices())
    blocks = list(snap.ram_blocks())
    named: list[tuple[str, str, DeviceState | RamBlock]] = [
        *(("device", "section id string", d) for d in devices),
        *(("RAM block", "RAM block name", b) for b in blocks),
    ]
    for what, name, part in named:
        if not part.qemu_idstr:
            raise WriteError(
                f"{what} {part.path} has no QEMU identifier; a QEMU stream cannot name it",
                file=target,
            )
        _name(part.qemu_idstr, name, target)
    _readable(config.machine, devices, blocks, target)
    for block in blocks:
        if not block.length:  # (the block list ends when its lengths reach the total)
            raise WriteError(f"RAM block {block.path} is empty; a QEMU stream's block list "
                             "cannot hold an empty block", file=target)  # fmt: skip
        if block.length % config.page_size:
            raise WriteError(
                f"RAM block {block.path} is not a whole number of {config.page_size}-byte pages",
                file=target,
            )
    return devices, blocks


def _readable(
    machine: str, devices: list[DeviceState], blocks: list[RamBlock], target: str
) -> None:
    """Refuse what a reader of the stream would refuse: a section id string it does not
    take, or two identities that would name one path."""
    for device in devices:
        if not IDSTR.match(str(device.qemu_idstr).encode("latin-1")):
            raise WriteError(f"section id string {device.qemu_idstr!r} holds a space or a "
                             "control character, which a QEMU stream's reader refuses", file=target)  # fmt: skip
        if device.qemu_idstr == "ram":  # (the RAM section's own: a reader takes it for RAM)
            raise WriteError(f"{device.path}: a device section cannot have the id string "
                             "'ram', which names the RAM section", file=target)  # fmt: skip
    names = PathAssigner(machine, [(str(d.qemu_idstr), d.instance_id) for d in devices])
    taken = [names.section(str(d.qemu_idstr), d.instance_id) for d in devices]
    taken += [names.ram_block(str(b.qemu_idstr)) for b in blocks]
    parts: list[DeviceState | RamBlock] = [*devices, *blocks]
    for part, path in zip(parts, taken, strict=True):
        if path is None:
            raise WriteError(f"{part.path} has a QEMU identity ({part.qemu_idstr}) that a "
                             "reader would map to the path of another section", file=target)  # fmt: skip


def _write(
    snap: Snapshot,
    devices: list[DeviceState],
    blocks: list[RamBlock],
    out: IO[bytes],
    progress: Progress,
    mapped_ram: bool = False,
) -> None:
    config = snap.configuration
    page = config.page_size
    out.write(qf.FileHeader.build({"version": qf.VERSION}))
    # A mapped-ram input has all its RAM: unless asked for mapped-ram, it is written as an
    # ordinary stream, whose pages follow one another, so without that capability.
    # postcopy-ram is no configuration capability: QEMU says it with POSTCOPY_ADVISE.
    capabilities = tuple(c for c in config.capabilities if c not in ("mapped-ram", "postcopy-ram"))
    capabilities += ("mapped-ram",) if mapped_ram else ()
    _configuration(out, config.machine, page, capabilities, config.metadata.get("uuid"))
    huge = _host_page_sizes(config, blocks) if "postcopy-ram" in config.capabilities else None
    if huge is not None:
        summary = functools.reduce(operator.or_, [*huge.values(), HOST_PAGE_SIZE])
        advise = qf.PostcopyAdvise.build({"host_page_sizes": summary, "target_page_size": page})
        out.write(bytes([qf.SectionType.COMMAND]))
        out.write(qf.CommandHead.build({"command": qf.Command.POSTCOPY_ADVISE,
                                        "length": len(advise)}) + advise)  # fmt: skip
    # Section ids start at 1: QEMU finds the handler of a PART/END section by its load
    # section id, which is 0 for every handler not loaded yet, so id 0 would be ambiguous.
    ram_id = 1
    if blocks:
        _section_head(out, qf.SectionType.START, ram_id, "ram", 0, 4)
        out.write(qf.RAM_WORD.pack(sum(b.length for b in blocks) | _MEM_SIZE))
        for block in blocks:
            entry = {"idstr": block.qemu_idstr, "used_length": block.length}
            out.write(qf.MemSizeEntry.build(entry))
            size = (huge or {}).get(str(block.qemu_idstr))
            if size is not None and size != HOST_PAGE_SIZE:  # (postcopy: a huge-page block)
                out.write(qf.BlockWord.build({"value": size}))
            if mapped_ram:
                _mapped_ram_block(out, block, page, progress)
        out.write(qf.RAM_WORD.pack(_EOS))
        _footer(out, ram_id)
        out.write(bytes([qf.SectionType.END]) + qf.SectionPartEnd.build({"section_id": ram_id}))
        for block in blocks if not mapped_ram else ():
            _pages(out, block, page, progress)
        out.write(qf.RAM_WORD.pack(_EOS))
        _footer(out, ram_id)
    for number, device in enumerate(devices, start=ram_id + 1):
        _section_head(out, qf.SectionType.FULL, number, str(device.qemu_idstr),
                      device.instance_id, device.version_id)  # fmt: skip
        out.write(device.data)
        _footer(out, number)
    out.write(bytes([qf.SectionType.EOF]))
    # Devices without a field layout are left out of the vmdesc rather than described
    # by a made-up one; readers then show their state as bytes.
    described = [_vmdesc_entry(d) for d in devices if d.layout is not None]
    desc = json_dumps({"page_size": page, "devices": described}, separators=(",", ":"))
    data = desc.encode("utf-8")
    out.write(qf.VmDescriptionHead.build({"length": len(data)}) + data)


def _configuration(
    out: IO[bytes], machine: str, page: int, capabilities: tuple[str, ...], uuid: Any
) -> None:
    out.write(bytes([qf.SectionType.CONFIGURATION]))
    # a be32 length here, but QEMU reads at most 255 bytes of it
    out.write(qf.Configuration.build({"name": machine}))
    if page != 4096:
        _subsection(out, "configuration/target-page-bits")
        out.write(qf.TargetPageBits.build({"page_bits": page.bit_length() - 1}))
    if capabilities:
        _subsection(out, "configuration/capabilities")
        out.write(qf.Capabilities.build({"names": list(capabilities)}))
    if isinstance(uuid, str) and len(uuid) == 32:
        _subsection(out, "configuration/uuid")
        out.write(qf.Uuid.build({"uuid": bytes.fromhex(uuid)}))


def _subsection(out: IO[bytes], name: str) -> None:
    out.write(qf.Subsection.build({"name": name, "version_id": 1}))


def _section_head(
    out: IO[bytes], kind: int, section_id: int, idstr: str, instance_id: int, version_id: int
) -> None:
    head = {"section_id": section_id, "idstr": idstr, "instance_id": instance_id,
            "version_id": version_id}  # fmt: skip
    out.write(bytes([kind]) + qf.SectionStartFull.build(head))


def _footer(out: IO[bytes], section_id: int) -> None:
    out.write(qf.SectionFooter.build({"section_id": section_id}))


def _mapped_ram_block(out: IO[bytes], block: RamBlock, page: int, progress: Progress) -> None:
    """After *block*'s entry in the block list: its mapped-ram header, then (at the
    offsets the header names) its bitmap and its pages that are not zero, each at its
    page's place; the stream goes on after the page area."""
    count = block.length // page
    bitmap = bytearray(-(-count // 64) * 8)  # host unsigned longs (x86: little-endian)
    bitmap_offset = out.tell() + qf.MappedRamHeader.sizeof()
    pages_offset = -(-(bitmap_offset + len(bitmap)) // MAPPED_RAM_ALIGN) * MAPPED_RAM_ALIGN
    out.write(qf.MappedRamHeader.build({"version": 1, "page_size": page,
                                        "bitmap_offset": bitmap_offset,
                                        "pages_offset": pages_offset}))  # fmt: skip
    for offset, span in block.iter_spans():
        for start, stop in nonzero_runs(span, page):
            out.seek(pages_offset + offset + start)
            out.write(span[start:stop])
            for index in range((offset + start) // page, (offset + stop) // page):
                bitmap[index >> 3] |= 1 << (index & 7)
        if progress:
            progress(len(span))
    out.seek(bitmap_offset)
    out.write(bitmap)
    out.seek(pages_offset + block.length)


def _pages(out: IO[bytes], block: RamBlock, page: int, progress: Progress) -> None:
    """Every page of *block*: ZERO records for zero pages, PAGE records for the rest (the
    hot path: RamRecordHead words written with its struct, formats.qemu.RAM_WORD)."""
    zero = bytes(page)
    name = bytes([len(str(block.qemu_idstr))]) + str(block.qemu_idstr).encode("latin-1")
    word = qf.RAM_WORD.pack
    first = True
    for offset, span in block.iter_spans():
        records = bytearray()
        for at in range(0, len(span), page):
            data = span[at : at + page]
            flags = _ZERO if zero.startswith(data) else _PAGE
            if not first:
                flags |= _CONTINUE
            records += word(offset + at | flags)
            if first:
                records += name
                first = False
            records += b"\x00" if flags & _ZERO else data
        out.write(records)
        if progress:
            progress(len(span))
