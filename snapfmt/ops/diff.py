"""diff: what changed between two snapshots, from sections down to fields and pages.

Returns data (render.py prints it).  Sections are matched by path.  Device state is
compared field by field through the field layout when both sides decode, else as
differing byte ranges.  RAM blocks are compared page by page (RamBlock.differing_pages: two native blocks skip
chunks of equal hashes unread, two QEMU blocks compare their pages in place).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from snapfmt.formats.native import SectionKind
from snapfmt.model import DeviceState, RamBlock, Snapshot
from snapfmt.paths import Path
from snapfmt.state import field_matches, safe_understand
from snapfmt.vmstate import Field

Progress = Callable[[int], None] | None
MAX_RANGES = 10_000  # differing ranges kept per section; the counts stay exact


SPAN_CONTEXT = 8  # bytes kept either side of a differing range, to show it in place
MAX_SPANS = 64  # differing ranges kept per byte-valued field


class Span(NamedTuple):
    """A range of bytes that differ inside a byte-valued field or a state, with the bytes
    around it on both sides (``context_at`` is where those windows start).  Differing
    bytes at most SPAN_CONTEXT equal bytes apart make one span, as hunks do in diff(1)."""

    offset: int  # within the field (or the state): the first differing byte
    length: int  # to the last differing byte
    differing: int  # bytes in the span that differ
    old: bytes
    new: bytes
    context_at: int
    old_context: bytes
    new_context: bytes


class Change(NamedTuple):
    """One differing value: a configuration item, a field, or a byte range."""

    name: str
    old: object
    new: object
    offset: int | None = None  # file offset (in A, else B) of the field or byte range
    spans: tuple[Span, ...] = ()  # byte values: where they differ
    span_count: int = 0  # how many ranges differ (spans keeps the first MAX_SPANS)
    old_display: str | None = None  # what the values mean (snapfmt.state)
    new_display: str | None = None


def differing_spans(a: bytes, b: bytes, limit: int = MAX_SPANS) -> tuple[list[Span], int]:
    """(the first *limit* ranges where *a* and *b* differ, how many there are); bytes
    one side has and the other does not count as differing."""
    hunks: list[list[int]] = []  # [first, last, differing bytes] of the kept ones
    count, previous = 0, -SPAN_CONTEXT - 2  # (the last differing byte seen)
    for lo, hi in _byte_ranges(a, b):
        joins = lo - previous - 1 <= SPAN_CONTEXT
        previous = hi
        if not joins:
            count += 1
            if count <= limit:
                hunks.append([lo, hi, 0])
        if count <= limit:
            hunks[-1][1] = hi
            hunks[-1][2] += hi - lo + 1
    spans = []
    for lo, hi, differing in hunks:
        at = max(0, lo - SPAN_CONTEXT)
        end = hi + 1 + SPAN_CONTEXT
        spans.append(Span(lo, hi + 1 - lo, differing, a[lo : hi + 1], b[lo : hi + 1], at,
                          a[at:end], b[at:end]))  # fmt: skip
    return spans, count


class SectionDiff:
    """One section that differs.  (The results are plain classes, not dataclasses:
    defining a dataclass costs a millisecond at every start, and importing the module
    ten; see paths.Component.)"""

    __slots__ = (
        "bytes_changed",
        "changes",
        "kind",
        "pages",
        "path",
        "ranges",
        "ranges_truncated",
        "status",
        "summary",
    )

    def __init__(self, path: str, kind: str, status: str, summary: str = "") -> None:
        self.path = path
        self.kind = kind  # device, ram-block
        self.status = status  # added, removed, changed
        self.summary = summary
        self.changes: list[Change] = []
        # RAM blocks
        self.ranges: list[tuple[int, int]] = []  # inclusive byte ranges
        self.pages = 0
        self.bytes_changed = 0
        self.ranges_truncated = False

    def __repr__(self) -> str:
        return f"SectionDiff({self.path!r}, {self.kind!r}, {self.status!r}, {self.summary!r})"


class Diff:
    __slots__ = ("a", "b", "configuration", "same_sections", "sections")

    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = a, b
        self.configuration: list[Change] = []
        self.sections: list[SectionDiff] = []
        self.same_sections = 0

    def __repr__(self) -> str:
        return f"Diff({self.a!r}, {self.b!r}, {len(self.sections)} sections differ)"

    @property
    def identical(self) -> bool:
        return not self.configuration and not self.sections


def diff(
    a: Snapshot,
    b: Snapshot,
    *,
    fields: bool = True,
    patterns: Sequence[str] = (),
    progress: Progress = None,
) -> Diff:
    """What differs between *a* and *b*.  With *patterns* (``--field`` globs,
    snapfmt.state.field_matches) only the device fields they name are compared."""
    result = Diff(a.origin, b.origin)
    if patterns:
        return _named_fields(a, b, patterns, result)
    result.configuration.extend(_configuration_changes(a, b))
    kinds_a = {s.key: s.kind for s in a.sections if s.path is not None}
    kinds_b = {s.key: s.kind for s in b.sections if s.path is not None}
    for key in list(kinds_a) + [k for k in kinds_b if k not in kinds_a]:
        kind = kinds_a.get(key, kinds_b.get(key))
        kind_name = "device" if kind == SectionKind.DEVICE else "ram-block"
        path = Path.parse(key)
        if key not in kinds_b:
            result.sections.append(SectionDiff(key, kind_name, "removed", _describe(a, path, kind)))
        elif key not in kinds_a:
            result.sections.append(SectionDiff(key, kind_name, "added", _describe(b, path, kind)))
        elif kinds_a[key] != kinds_b[key]:
            result.sections.append(
                SectionDiff(
                    key, kind_name, "changed", "device state in one, RAM block in the other"
                )
            )
        else:
            found = (_device(a.device(path), b.device(path), fields) if kind == SectionKind.DEVICE
                     else _ram(a.ram_block(path), b.ram_block(path), progress))  # fmt: skip
            if found is None:
                result.same_sections += 1
            else:
                result.sections.append(found)
    return result


def _configuration_changes(a: Snapshot, b: Snapshot) -> list[Change]:
    changes: list[Change] = []
    ca, cb = a.configuration, b.configuration
    for name, old, new in (
        ("machine", ca.machine, cb.machine),
        ("page size", ca.page_size, cb.page_size),
        ("capabilities", ", ".join(ca.capabilities) or "-", ", ".join(cb.capabilities) or "-"),
    ):
        if old != new:
            changes.append(Change(name, old, new))
    for key in sorted(set(ca.metadata) | set(cb.metadata)):
        if ca.metadata.get(key) != cb.metadata.get(key):
            changes.append(Change(f"metadata {key}", ca.metadata.get(key), cb.metadata.get(key)))
    docs_a = {s.key for s in a.sections if s.kind == SectionKind.METADATA}
    docs_b = {s.key for s in b.sections if s.kind == SectionKind.METADATA}
    for name in sorted(docs_a | docs_b):
        old_doc = a.metadata(name) if name in docs_a else None
        new_doc = b.metadata(name) if name in docs_b else None
        if old_doc != new_doc or (name in docs_a) != (name in docs_b):
            changes.append(
                Change(
                    f"document {name}", _doc(old_doc, name in docs_a), _doc(new_doc, name in docs_b)
                )
            )
    return changes


def _named_fields(a: Snapshot, b: Snapshot, patterns: Sequence[str], result: Diff) -> Diff:
    """The diff of the device fields *patterns* name, in the sections both have."""
    paths_b = {s.key for s in b.sections if s.kind == SectionKind.DEVICE}
    for section in a.sections:
        if section.kind != SectionKind.DEVICE or section.key not in paths_b:
            continue
        path = Path.parse(section.key)
        old, new = a.device(path), b.device(path)
        if old.data == new.data:
            result.same_sections += 1
            continue
        decoded = _fields(old), _fields(new)
        if decoded[0] is None or decoded[1] is None:
            continue
        changed = _field_changes([f for f in decoded[0] if field_matches(f, patterns)],
                                 [f for f in decoded[1] if field_matches(f, patterns)])  # fmt: skip
        if not changed:
            result.same_sections += 1
            continue
        found = SectionDiff(section.key, "device", "changed",
                            f"{len(changed)} field{'s' if len(changed) != 1 else ''} changed")  # fmt: skip
        found.changes.extend(changed)
        result.sections.append(found)
    return result


def _count(n: int, noun: str, plural: str | None = None, singular: str | None = None) -> str:
    """'1 page differs', '2 pages differ'; without the verb forms, '1 byte', '2 bytes'."""
    return f"{n} {(singular or noun) if n == 1 else (plural or noun + 's')}"


def _doc(document: object, present: bool) -> object:
    return json.dumps(document, sort_keys=True) if present else None


def _describe(snap: Snapshot, path: Path, kind: object) -> str:
    if kind == SectionKind.DEVICE:
        d = snap.device(path)
        return f"{d.driver}, vmstate {d.vmstate_name} version {d.version_id}, {len(d.data)} bytes"
    return f"{snap.ram_block(path).length:#x} bytes"


# -- device state ------------------------------------------------------------------------


def _device(a: DeviceState, b: DeviceState, fields: bool) -> SectionDiff | None:
    if a.data == b.data and a.version_id == b.version_id:
        return None
    section = SectionDiff(str(a.path), "device", "changed")
    notes = []
    if a.version_id != b.version_id:
        section.changes.append(Change("version", a.version_id, b.version_id))
        notes.append(f"version {a.version_id} -> {b.version_id}")
    if len(a.data) != len(b.data):
        notes.append(f"{len(a.data)} -> {len(b.data)} bytes")
    decoded = _fields(a), _fields(b)
    if decoded[0] is not None and decoded[1] is not None:
        changed = _field_changes(decoded[0], decoded[1])
        notes.append(f"{len(changed)} field{'s' if len(changed) != 1 else ''} changed")
        if fields:
            section.changes.extend(changed)
    else:
        ranges = list(_byte_ranges(a.data, b.data))
        notes.append(
            f"{_count(sum(hi - lo + 1 for lo, hi in ranges), 'byte', 'bytes differ', 'byte differs')} "
            f"in {_count(len(ranges), 'range')}"
        )
        if fields:
            spans, _ = differing_spans(a.data, b.data, MAX_RANGES)
            section.changes.extend(
                Change(f"bytes {span.offset:#x}-{span.offset + span.length - 1:#x}", span.old,
                       span.new, a.data_offset + span.offset, (span,), 1)
                for span in spans
            )  # fmt: skip
    section.summary = ", ".join(notes)
    return section


def _fields(device: DeviceState) -> list[Field] | None:
    """The device's fields as snapfmt.state understands them (virtio decoded, one name
    per field), or None without a layout that fits."""
    if device.layout is None:
        return None
    understood = safe_understand(device)
    return None if understood is None else understood.fields


def _changed(name: str, old: Field | None, new: Field | None) -> Change:
    either = old if old is not None else new
    assert either is not None
    a = None if old is None else old.value
    b = None if new is None else new.value
    spans: list[Span] = []
    count = 0
    if isinstance(a, bytes) and isinstance(b, bytes):
        spans, count = differing_spans(a, b)
    return Change(name, a, b, either.offset, tuple(spans), count,
                  None if old is None else old.display, None if new is None else new.display)  # fmt: skip


def _subsection(name: str) -> str | None:
    """The subsection a decoded field belongs to (``virtio-net/rss:enabled``), if any."""
    return name.split(":", 1)[0] if ":" in name else None


def _field_changes(a: list[Field], b: list[Field]) -> list[Change]:
    """Fields matched by name; a field only on one side shows as added or removed, and a
    subsection present on one side only shows as one change."""
    old = {f.name: f for f in a}
    new = {f.name: f for f in b}
    changes: list[Change] = []
    subs_a = {_subsection(n) for n in old} - {None}
    subs_b = {_subsection(n) for n in new} - {None}
    for sub in sorted(s for s in subs_a ^ subs_b if s):
        changes.append(Change(f"subsection {sub}", "present" if sub in subs_a else "absent",
                              "present" if sub in subs_b else "absent"))  # fmt: skip
    gone = subs_a ^ subs_b
    for name, f in old.items():
        if _subsection(name) in gone and _subsection(name) is not None:
            continue
        other = new.get(name)
        if other is None or other.value != f.value:
            changes.append(_changed(name, f, other))
    for name, f in new.items():
        if name not in old and not (_subsection(name) in gone and _subsection(name) is not None):
            changes.append(_changed(name, None, f))
    return changes


def _byte_ranges(a: bytes, b: bytes) -> Iterator[tuple[int, int]]:
    """Inclusive ranges of differing bytes (a length change counts as differing)."""
    start = None
    for i in range(max(len(a), len(b))):
        same = i < len(a) and i < len(b) and a[i] == b[i]
        if not same and start is None:
            start = i
        elif same and start is not None:
            yield start, i - 1
            start = None
    if start is not None:
        yield start, max(len(a), len(b)) - 1


# -- RAM -----------------------------------------------------------------------------------


def _ram(a: RamBlock, b: RamBlock, progress: Progress) -> SectionDiff | None:
    section = SectionDiff(str(a.path), "ram-block", "changed")
    if a.missing or b.missing:  # contents not in one file or both: nothing to compare
        return _missing(section, a, b)
    common = min(a.length, b.length)
    run: list[int] = []  # the open range [start, end]

    def note(lo: int, hi: int, nbytes: int) -> None:
        section.pages += 1
        section.bytes_changed += nbytes
        if run and run[1] + 1 == lo:
            run[1] = hi
            return
        if run:
            _close(section, run)
        run[:] = [lo, hi]

    for offset, size, nbytes in a.differing_pages(b, common, progress):
        note(offset, offset + size - 1, nbytes)
    if run:
        _close(section, run)
    notes = []
    if a.length != b.length:
        notes.append(f"size {a.length:#x} -> {b.length:#x}")
        section.changes.append(Change("size", a.length, b.length))
    if section.pages:
        notes.append(
            f"{_count(section.pages, 'page', 'pages differ', 'page differs')} ({_count(section.bytes_changed, 'byte')} changed)"
        )
    if not notes:
        return None
    section.summary = ", ".join(notes)
    return section


def _missing(section: SectionDiff, a: RamBlock, b: RamBlock) -> SectionDiff | None:
    """Two blocks whose contents one file or both do not hold: they differ only in what
    the files say (sizes, and whether the contents are there)."""
    notes = []
    if a.length != b.length:
        notes.append(f"size {a.length:#x} -> {b.length:#x}")
        section.changes.append(Change("size", a.length, b.length))
    if bool(a.missing) != bool(b.missing):
        where = "the first" if a.missing else "the second"
        notes.append(f"contents not in {where} file, so not compared")
        section.changes.append(Change("contents", "missing" if a.missing else "present",
                                      "missing" if b.missing else "present"))  # fmt: skip
    if not notes:
        return None
    section.summary = ", ".join(notes)
    return section


def _close(section: SectionDiff, run: list[int]) -> None:
    if len(section.ranges) < MAX_RANGES:
        section.ranges.append((run[0], run[1]))
    else:
        section.ranges_truncated = True
