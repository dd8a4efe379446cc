"""How fields and byte differences look in text: runs of equal array elements folded,
values with what they mean, and differing byte ranges with the bytes around them.
(JSON lists every field; only text folds.)"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from snapfmt.vmstate import Field

if TYPE_CHECKING:  # (annotations only: the diff operation is not imported for a dump)
    from snapfmt.ops.diff import Change, Span

SHOWN_BYTES = 32
_INDEX = re.compile(r"\[(\w+\+)?(\d+)\]")  # [12], or [RA+12] (snapfmt.state's names)


class Row(NamedTuple):
    """One line of a dump: a field, or a run of array elements of equal value."""

    name: str
    field: Field  # (the first of the run)
    elements: int = 1


def value_text(value: object) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:#x} ({value})"
    if isinstance(value, bytes | bytearray):
        shown = bytes(value[:SHOWN_BYTES]).hex(" ")
        return shown + (f" … ({len(value)} bytes)" if len(value) > SHOWN_BYTES else "")
    return str(value)


def shown_value(f: Field) -> str:
    """The value, then what it means after ``#`` where snapfmt.state knows."""
    return value_text(f.value) + (f"  # {f.display}" if f.display else "")


def fold(fields: Sequence[Field]) -> list[Row]:
    """*fields* as rows, each run of two or more consecutive array elements that are
    equal (same members, types, values and meanings) folded into one:
    ``mac_reg[24..1023]``, ``vq[3..1023].avail`` (an array of structs folds by element)."""
    return _fold([(f.name, f) for f in fields], 0)


def _fold(items: list[tuple[str, Field]], pos: int) -> list[Row]:
    # (opener such as "mac_reg[" or "mac_reg[RA+", index, where the name goes on, members)
    groups: list[tuple[str, int, int, list[tuple[str, Field]]]] = []
    for name, f in items:
        m = _INDEX.search(name, pos)
        if m is None:
            groups.append((name, -1, len(name), [(name, f)]))
            continue
        opener, index = name[: m.start(2)], int(m[2])
        last = groups[-1] if groups else None
        if last is not None and last[0] == opener and last[1] == index:
            last[3].append((name, f))
        else:
            groups.append((opener, index, m.end(), [(name, f)]))
    rows: list[Row] = []
    i = 0
    while i < len(groups):
        opener, index, cut, members = groups[i]
        if index < 0:
            rows.append(Row(members[0][0], members[0][1]))
            i += 1
            continue
        signature = _signature(members, cut)
        j = i + 1
        while (j < len(groups) and groups[j][0] == opener and groups[j][1] == index + j - i
               and _signature(groups[j][3], groups[j][2]) == signature):  # fmt: skip
            j += 1
        if j - i == 1:
            rows.extend(_fold(members, cut))
        else:
            label = f"{opener}{index}..{index + j - i - 1}]"
            inner = [(label + name[cut:], f) for name, f in members]
            rows.extend(
                Row(r.name, r.field, r.elements * (j - i)) for r in _fold(inner, len(label))
            )
        i = j
    return rows


def _signature(members: list[tuple[str, Field]], cut: int) -> tuple[object, ...]:
    return tuple((name[cut:], f.type, f.value, f.display) for name, f in members)


def change_lines(change: Change, width: int) -> Iterator[str]:
    """A changed value: ``name  old -> new``, what both mean, and for long byte values
    the ranges that differ, each with the bytes around it, instead of their first bytes."""
    old, new = change.old, change.new
    long_bytes = change.spans and max(len(old or b""), len(new or b"")) > SHOWN_BYTES  # type: ignore[arg-type]
    if not long_bytes:
        left = value_text(old) + (f"  # {change.old_display}" if change.old_display else "")
        right = value_text(new) + (f"  # {change.new_display}" if change.new_display else "")
        yield f"    {change.name:<{width}}  {left} -> {right}"
        return
    total = sum(span.differing for span in change.spans)
    more = change.span_count - len(change.spans)
    count = change.span_count
    meaning = ""
    if change.old_display or change.new_display:
        meaning = f"  # {change.old_display or '-'} -> {change.new_display or '-'}"
    yield (f"    {change.name:<{width}}  {count} range{'s' if count != 1 else ''} "
           f"differ{'s' if count == 1 else ''}"
           + ("" if more else f", {total} byte{'s' if total != 1 else ''}") + meaning)  # fmt: skip
    for span in change.spans:
        yield from span_lines(span, change.offset)
    if more:
        yield f"      … {more} more range{'s' if more != 1 else ''}"


def span_lines(span: Span, base: int | None) -> Iterator[str]:
    """A differing range as its offset and two hex-and-ASCII lines of the bytes around it
    (``-`` the first snapshot, ``+`` the second); *base* is the file offset of the value."""
    where = f"+{span.offset:#x}" + (f" (file {base + span.offset:#x})" if base is not None else "")
    yield (f"      at {where}, {span.differing} of {span.length} "
           f"byte{'s' if span.length != 1 else ''}:")  # fmt: skip
    width = 3 * max(len(span.old_context), len(span.new_context)) - 1
    for mark, window in (("-", span.old_context), ("+", span.new_context)):
        text = "".join(chr(c) if 32 <= c < 127 else "." for c in window)
        yield f"      {mark} {span.context_at:#07x}  {window.hex(' '):<{width}}  |{text}|"
