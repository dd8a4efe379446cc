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
    if snap.damage is not None:
        return _salvaged(snap, progress)
    regions: list[tuple[int, int, str]] = [
        (0, nf.HEADER_SIZE, "header"),
        (snap.index_offset, snap.index_length, "index"),
        (snap.index_offset + snap.index_length, nf.FOOTER_SIZE, "footer"),
    ]
    problems: list[Problem] = []
    covered = [0, 0]  # chunks, bytes
    parent_ok = _check_parent(snap, problems)
    for section in snap.all_sections:
        label = section.key or "configuration"
        regions.append((section.offset, section.length, label))
        if section.data_length:
            regions.append((section.data_offset, section.data_length, f"{label} data"))
        try:
            _check_section(snap, section, covered, problems, progress, parent_ok)
        except FormatError as e:
            problems.append(_problem(section, e))
    problems.extend(_tiling(regions))
    return CheckResult(len(snap.all_sections), covered[0], covered[1], problems)


def _salvaged(snap: NativeSnapshot, progress: Progress) -> CheckResult:
    """A file whose index was lost: where its salvage stopped, then each section found."""
    assert snap.damage is not None
    offset, message = snap.damage
    problems = [Problem(None, offset, f"damaged: {message}; what the file held from here "
                        "is lost")]  # fmt: skip
    covered = [0, 0]
    for section in snap.all_sections:
        try:
            _check_section(snap, section, covered, problems, progress)
        except FormatError as e:
            problems.append(_problem(section, e))
    return CheckResult(len(snap.all_sections), covered[0], covered[1], problems)


def _check_parent(snap: NativeSnapshot, problems: list[Problem]) -> bool:
    """A delta's parent must be there and be the file the delta was made from; whether
    it is.  Each of its chunks the delta uses is then checked with the delta's."""
    from snapfmt.native.delta import chain

    for _, problem in chain(snap):  # (the whole chain: a grandparent may be missing)
        if problem is not None:
            problems.append(Problem(nf.PARENT_DOCUMENT, None, problem))
            return False
    return True


def _problem(section: SectionInfo, error: FormatError) -> Problem:
    return Problem(section.key or "configuration", error.offset, _message(error))


def _message(error: FormatError) -> str:
    return error.detail


def _check_section(
    snap: NativeSnapshot,
    section: SectionInfo,
    covered: list[int],
    problems: list[Problem],
    progress: Progress,
    parent_ok: bool = True,
) -> None:
    """Check one section, adding the chunks and bytes it covers to *covered*.  Without
    *parent_ok*, a delta's chunks in the parent are left out (its problem is reported)."""
    if section.kind == nf.SectionKind.RAM_BLOCK:
        from snapfmt.native.ramblock import NativeRamBlock

        block = NativeRamBlock(snap, section)
        covered[1] += block.length
        for chunk, error in block.verify(parents=parent_ok):
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
