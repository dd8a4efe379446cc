"""verify: check a snapshot's structure and every checksum; returns findings, never prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from snapfmt.errors import FormatError, LayoutError
from snapfmt.formats import native as nf
from snapfmt.model import SectionInfo, Snapshot
from snapfmt.native.ramblock import NativeRamBlock
from snapfmt.native.reader import NativeSnapshot
from snapfmt.qemu.snapshot import QemuStream


@dataclass(frozen=True)
class Problem:
    section: str | None
    offset: int | None
    message: str
    range: tuple[int, int] | None = None  # bytes of a RAM block, inclusive


@dataclass
class Report:
    file: str
    sections: int = 0
    chunks: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _problem(section: SectionInfo | None, error: FormatError) -> Problem:
    key = section.key if section is not None else None
    return Problem(
        key or ("configuration" if section is not None else None),
        error.offset,
        error.what
        if error.found is None
        else f"{error.what}: found {error.found}"
        + (f", expected {error.expected}" if error.expected is not None else ""),
    )


def verify(snap: Snapshot, progress: Callable[[int], None] | None = None) -> Report:
    """Check every checksum and chunk of a native snapshot and that its parts tile the file.

    The header, footer and index were checked when the file was opened.
    """
    if isinstance(snap, QemuStream):
        return _verify_qemu(snap)
    if not isinstance(snap, NativeSnapshot):
        raise FormatError(f"verify does not support {snap.format_name} files yet", file=snap.file)
    report = Report(snap.file)
    regions: list[tuple[int, int, str]] = [
        (0, nf.HEADER_SIZE, "header"),
        (snap.index_offset, snap.index_length, "index"),
        (snap.index_offset + snap.index_length, nf.FOOTER_SIZE, "footer"),
    ]
    for section in snap.all_sections:
        report.sections += 1
        label = section.key or "configuration"
        regions.append((section.offset, section.length, label))
        if section.data_length:
            regions.append((section.data_offset, section.data_length, f"{label} data"))
        try:
            _check_section(snap, section, report, progress)
        except FormatError as e:
            report.problems.append(_problem(section, e))
    report.problems.extend(_tiling(snap, regions))
    return report


def _check_section(
    snap: NativeSnapshot,
    section: SectionInfo,
    report: Report,
    progress: Callable[[int], None] | None,
) -> None:
    if section.kind == nf.SectionKind.RAM_BLOCK:
        block = NativeRamBlock(snap, section)
        report.bytes += block.length
        for chunk, error in block.verify():
            span = (chunk.offset, chunk.offset + chunk.length - 1) if chunk else None
            report.problems.append(Problem(section.key, error.offset, error.what, span))
        report.chunks += block.chunk_count
        if progress:
            progress(block.length)
        return
    snap.body(section)
    report.bytes += section.length
    path = section.path
    if section.kind == nf.SectionKind.CONFIGURATION:
        _ = snap.configuration
    elif section.kind == nf.SectionKind.METADATA:
        snap.metadata(section.key)
    elif section.kind == nf.SectionKind.DEVICE and path is not None:
        device = snap.device(path)
        try:
            device.fields()
        except LayoutError as e:
            report.problems.append(Problem(section.key, device.data_offset, f"field layout: {e}"))


def _tiling(snap: NativeSnapshot, regions: list[tuple[int, int, str]]) -> list[Problem]:
    """Every byte must belong to exactly one part (spec/format.md §2)."""
    problems = []
    position = 0
    for start, length, label in sorted(regions):
        if start > position:
            problems.append(
                Problem(None, position, f"bytes {position:#x}-{start - 1:#x} belong to no section")
            )
        elif start < position:
            problems.append(Problem(label, start, f"{label} overlaps the part before it"))
        position = max(position, start + length)
    return problems


def _verify_qemu(stream: QemuStream) -> Report:
    """A QEMU stream's structure and footers were checked when it was walked; here the
    vmdesc must agree with the sections: same versions, same page size, every described
    payload decodes to exactly its length, and it describes no section the stream lacks."""
    report = Report(stream.file)
    desc = stream.vmdesc
    described: set[tuple[object, object]] = set()
    if desc is not None:
        if desc.get("page_size", stream.page_size) != stream.page_size:
            report.problems.append(
                Problem(
                    None,
                    stream.vmdesc_offset,
                    f"vmdesc page size {desc.get('page_size')} differs from the stream's {stream.page_size}",
                )
            )
        described = {
            (d.get("name"), d.get("instance_id"))
            for d in desc.get("devices", [])
            if isinstance(d, dict)
        }
    present: set[tuple[object, object]] = set()
    for section in stream.sections:
        report.sections += 1
        report.bytes += section.size
        path = section.path
        if path is not None and section.kind == nf.SectionKind.RAM_BLOCK:
            report.chunks += section.size // stream.page_size  # pages, the stream's unit
        if path is None or section.kind != nf.SectionKind.DEVICE:
            continue
        device = stream.device(path)
        key = (device.qemu_idstr or "", device.instance_id)
        present.add(key)
        entry = stream.layout_entry(path)
        where = f"{path} ({device.qemu_idstr} instance {device.instance_id})"
        if desc is None:
            continue
        if entry is None:  # QEMU describes every device; other writers may not: shown as bytes
            continue
        if entry.get("version") != device.version_id:
            report.problems.append(
                Problem(
                    where,
                    device.data_offset,
                    f"section version {device.version_id} differs from the vmdesc's {entry.get('version')}",
                )
            )
        try:
            device.fields()
        except LayoutError as e:
            report.problems.append(
                Problem(where, device.data_offset, f"payload does not match the vmdesc: {e}")
            )
    for name, instance in sorted(described - present, key=str):
        report.problems.append(
            Problem(
                f"{name} instance {instance}",
                stream.vmdesc_offset,
                "vmdesc describes a section the stream does not have",
            )
        )
    return report
