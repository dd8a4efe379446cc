"""verify's work for a native snapshot: every checksum and chunk, and that its parts
tile the file (spec/format.md §2).  The header, footer and index were checked when the
file was opened."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from snapfmt.errors import FormatError, LayoutError
from snapfmt.formats import native as nf
from snapfmt.model import CheckResult, Problem, SectionInfo

if TYPE_CHECKING:
    from snapfmt.native.reader import NativeSnapshot

Progress = Callable[[int], None] | None


def check(snap: NativeSnapshot, progress: Progress = None) -> CheckResult:
    regions: list[tuple[int, int, str]] = [
        (0, nf.HEADER_SIZE, "header"),
        (snap.index_offset, snap.index_length, "index"),
        (snap.index_offset + snap.index_length, nf.FOOTER_SIZE, "footer"),
    ]
    problems: list[Problem] = []
    covered = [0, 0]  # chunks, bytes
    for section in snap.all_sections:
        label = section.key or "configuration"
        regions.append((section.offset, section.length, label))
        if section.data_length:
            regions.append((section.data_offset, section.data_length, f"{label} data"))
        try:
            _check_section(snap, section, covered, problems, progress)
        except FormatError as e:
            problems.append(_problem(section, e))
    problems.extend(_tiling(regions))
    return CheckResult(len(snap.all_sections), covered[0], covered[1], problems)


def _problem(section: SectionInfo, error: FormatError) -> Problem:
    message = error.what
    if error.found is not None:
        message += f": found {error.found}"
        if error.expected is not None:
            message += f", expected {error.expected}"
    return Problem(section.key or "configuration", error.offset, message)


def _check_section(
    snap: NativeSnapshot,
    section: SectionInfo,
    covered: list[int],
    problems: list[Problem],
    progress: Progress,
) -> None:
    """Check one section, adding the chunks and bytes it covers to *covered*."""
    if section.kind == nf.SectionKind.RAM_BLOCK:
        from snapfmt.native.ramblock import NativeRamBlock

        block = NativeRamBlock(snap, section)
        covered[1] += block.length
        for chunk, error in block.verify():
            span = (chunk.offset, chunk.offset + chunk.length - 1) if chunk else None
            problems.append(Problem(section.key, error.offset, error.what, span))
        covered[0] += block.chunk_count
        if progress:
            progress(block.length)
        return
    snap.body(section)
    covered[1] += section.length
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
            problems.append(Problem(section.key, device.data_offset, f"field layout: {e}"))


def _tiling(regions: list[tuple[int, int, str]]) -> list[Problem]:
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
