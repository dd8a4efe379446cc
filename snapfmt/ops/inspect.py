"""info and dump: what a snapshot holds, as data (render.py turns it into text or JSON).

The results are NamedTuples: they are made once per command, and defining a NamedTuple
class costs about a tenth of what a dataclass does (a millisecond each, at every start).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from snapfmt.errors import LayoutError
from snapfmt.formats.native import SectionKind
from snapfmt.model import Configuration, DeviceState, SectionInfo, Snapshot
from snapfmt.paths import Path
from snapfmt.state import field_matches, understand
from snapfmt.vmstate import Field


class SectionRow(NamedTuple):
    kind: str
    key: str
    size: int
    stored: int
    driver: str | None = None
    vmstate_name: str | None = None
    version: int | None = None
    instance_id: int | None = None
    qemu_id: str | None = None


class Container(NamedTuple):
    """What wrapped the snapshot: a libvirt save image or whole-file compression."""

    kind: str
    compression: str
    version: int | None = None
    byte_order: str | None = None
    was_running: bool | None = None
    domain_name: str | None = None
    domain_xml: str | None = None


def container(snap: Snapshot) -> Container | None:
    wrapper = snap.wrapper
    if wrapper is None:
        return None
    xml = wrapper.domain_xml
    name = re.search(r"<name>([^<]{1,200})</name>", xml or "")
    return Container(
        wrapper.kind,
        wrapper.compression,
        wrapper.version,
        wrapper.byte_order,
        wrapper.was_running,
        name.group(1) if name else None,
        xml,
    )


class Parent(NamedTuple):
    """One parent up a delta's chain: its file as the child names it, its snapshot id
    and length, and what is wrong with it (None: found, and the file it should be)."""

    file: str
    id: str
    length: int
    problem: str | None


class Info(NamedTuple):
    file: str
    format: str
    version: str
    file_size: int
    configuration: Configuration
    rows: list[SectionRow]
    container: Container | None = None
    parents: list[Parent] = []  # noqa: RUF012  (a NamedTuple default, never changed)
    damage: dict[str, Any] | None = None  # a salvaged stream's salvage document


def damage(snap: Snapshot) -> dict[str, Any] | None:
    """The salvage document of a damaged stream opened to salvage it (where the damage
    is, what is lost), or None for a whole file."""
    from snapfmt.native.reader import NativeSnapshot
    from snapfmt.ops.supplied import Supplied
    from snapfmt.qemu.snapshot import SALVAGE_DOCUMENT, QemuStream

    if isinstance(snap, Supplied):  # (blocks read from files: the file's damage stands)
        snap = snap.inner

    if isinstance(snap, QemuStream) and snap.layout.damage is not None:
        document: dict[str, Any] = snap.metadata(SALVAGE_DOCUMENT)
        return document
    if isinstance(snap, NativeSnapshot) and (snap.damage is not None or snap.lost_chunks):
        return _native_damage(snap)
    return None


def _native_damage(snap: Any) -> dict[str, Any]:
    """A salvaged native file's document: the index lost (where the salvage stopped),
    and the chunks reads found bad (zeros in their place)."""
    lost: dict[str, list[list[int]]] = {}
    for path, offset, length, _ in sorted(snap.lost_chunks):
        lost.setdefault(path, []).append([offset, offset + length - 1])
    ram = [{"path": p, "qemu_id": None, "ranges": r, "bytes": sum(b - a + 1 for a, b in r)}
           for p, r in lost.items()]  # fmt: skip
    notes = []
    if snap.damage is not None:
        offset, message = snap.damage
        notes.append("the index is lost: sections found again front to back; what the file "
                     "held after the damage is unknown; metadata documents are named recovered-N")  # fmt: skip
    else:
        first = min(snap.lost_chunks)
        count = len(snap.lost_chunks)
        offset, message = 0, (f"{count} chunk{'s' if count != 1 else ''} did not decode to "
                              f"their hashes (first: {first[0]} at {first[1]:#x}: {first[3]})")  # fmt: skip
    if snap.lost_chunks:
        notes.append("chunks that did not match their hashes read as zero")
    return {"damage": {"offset": offset, "message": message}, "lost_sections": [],
            "lost_ram": ram, "note": "; ".join(notes)}  # fmt: skip


def damage_lines(document: dict[str, Any], show: Any = str) -> list[str]:
    """What a salvage document says, a line each: where the damage is, then what is lost
    (paths as *show* makes them)."""
    where = document["damage"]
    lines = [f"damaged at offset {where['offset']:#x}: {where['message']}"]
    if document.get("note"):
        lines.append(f"({document['note']})")
    for idstr in document["lost_sections"]:
        lines.append(f"lost section {idstr}: cut before its end")
    for entry in document["lost_ram"]:
        ranges = entry["ranges"]
        shown = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in ranges[:4])
        more = f" and {len(ranges) - 4} more ranges" if len(ranges) > 4 else ""
        lines.append(f"lost RAM {show(entry['path'])}: {entry['bytes']} bytes ({shown}{more})")
    return lines


def parents(snap: Snapshot) -> list[Parent]:
    """A delta snapshot's chain of parents, nearest first (spec/format.md §7)."""
    from snapfmt.native.reader import NativeSnapshot

    if not isinstance(snap, NativeSnapshot):
        return []
    from snapfmt.native.delta import chain

    return [Parent(ref.file, ref.id.hex(), ref.length, problem) for ref, problem in chain(snap)]


def info(snap: Snapshot) -> Info:
    """Summary and section table; reads the index and the small device sections only."""
    rows = []
    for section in snap.sections:
        if section.kind == SectionKind.CONFIGURATION:
            continue
        row = SectionRow(section.kind_name, section.key, section.size, section.stored)
        if section.kind == SectionKind.RAM_BLOCK:
            # its descriptor only (for a native file: head and chunk table, checksummed)
            qemu_id = snap.ram_block(Path.parse(section.key)).qemu_idstr
            row = row._replace(qemu_id=qemu_id)
        elif section.kind == SectionKind.DEVICE:
            dev = snap.device(Path.parse(section.key))
            row = SectionRow(
                row.kind,
                row.key,
                row.size,
                row.stored,
                dev.driver,
                dev.vmstate_name,
                dev.version_id,
                dev.instance_id,
                dev.qemu_idstr,
            )
        rows.append(row)
    return Info(
        snap.origin,
        snap.format_name,
        snap.version,
        os.path.getsize(snap.origin),
        snap.configuration,
        rows,
        container(snap),
        parents(snap),
        damage(snap),
    )


def ram_bytes(snap: Snapshot) -> int:
    """How many RAM bytes *snap* holds (the length of a progress bar over its RAM)."""
    return sum(s.size for s in snap.sections if s.kind == SectionKind.RAM_BLOCK)


class DeviceDump(NamedTuple):
    device: DeviceState
    fields: list[Field] | None  # None: no layout, show the bytes
    layout_error: str | None = None
    notes: tuple[str, ...] = ()  # parts left undecoded (snapfmt.state), and why


class RamDump(NamedTuple):
    path: Path
    qemu_id: str | None
    length: int
    page_size: int
    chunk_size: int
    chunks: int
    zero_chunks: int
    stored: int
    host_page_size: int | None = None
    missing: str | None = None  # why the contents are not in the file


class MetadataDump(NamedTuple):
    name: str
    document: Any


class Dump(NamedTuple):
    file: str
    format: str
    version: str
    configuration: Configuration
    sections: list[DeviceDump | RamDump | MetadataDump]
    container: Container | None = None


def _device(snap: Snapshot, path: Path, patterns: Sequence[str]) -> DeviceDump | None:
    """The device's understood fields (snapfmt.state); with ``--field`` *patterns*, only
    those they name, and None when they name none."""
    dev = snap.device(path)
    if dev.layout is None:
        return None if patterns else DeviceDump(dev, None)
    try:
        understood = understand(dev)
    except LayoutError as e:  # a layout that does not fit is shown, not fatal
        return None if patterns else DeviceDump(dev, None, str(e))
    fields = understood.fields
    if patterns:
        fields = [f for f in fields if field_matches(f, patterns)]
        if not fields:
            return None
    return DeviceDump(dev, fields, None, tuple(understood.notes))


def _ram(snap: Snapshot, path: Path) -> RamDump:
    block = snap.ram_block(path)
    chunks, zeros, stored = block.summary()
    return RamDump(
        path,
        block.qemu_idstr,
        block.length,
        block.page_size,
        block.chunk_size,
        chunks,
        zeros,
        stored,
        block.host_page_size,
        block.missing,
    )


def dump(snap: Snapshot, selectors: Sequence[str] = (), fields: Sequence[str] = ()) -> Dump:
    """Decoded device state, RAM block summaries and metadata, for the selected sections;
    with *fields* (``--field`` glob patterns, snapfmt.state.field_matches), only the
    device fields they name."""
    wanted: set[Path] | None = None
    if selectors:
        wanted = set()
        for selector in selectors:
            found = snap.select(selector)
            if not found:
                snap.select_one(selector)  # raises with the nearest paths
            wanted.update(found)
    configuration, wrapper = snap.configuration, container(snap)  # (first: its errors first)
    sections = []
    for section in snap.sections:
        sections.extend(_dump_section(snap, section, wanted, fields))
    return Dump(snap.origin, snap.format_name, snap.version, configuration, sections, wrapper)


def _dump_section(
    snap: Snapshot, section: SectionInfo, wanted: set[Path] | None, patterns: Sequence[str]
) -> list[Any]:
    path = section.path
    if section.kind == SectionKind.METADATA:
        if wanted is not None or patterns:
            return []
        return [MetadataDump(section.key, snap.metadata(section.key))]
    if path is None or (wanted is not None and path not in wanted):
        return []
    if section.kind == SectionKind.DEVICE:
        found = _device(snap, path, patterns)
        return [] if found is None else [found]
    return [] if patterns else [_ram(snap, path)]
