"""How fields and byte differences look in text: runs of equal array elements folded,
values with what they mean, and differing byte ranges with the bytes around them.
(JSON lists every field; only text folds.)"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, NamedTuple

from snapfmt.vmstate import Field

if TYPE_CHECKING:  # (annotations only: the diff operation is not imported for a dump)
    from snapfmt.ops.diff import Change, Span

SHOWN_BYTES = 32
_COMPARED = itemgetter(1, 4, 5)  # a Field's type, value and display
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
    return _fold(list(zip(map(attrgetter("name"), fields), fields, strict=True)), 0)


def _fold(items: list[tuple[str, Field]], pos: int) -> list[Row]:
    rows: list[Row] = []
    i, count = 0, len(items)
    while i < count:
        name, f = items[i]
        m = _INDEX.search(name, pos)
        if m is None:
            rows.append(Row(name, f))
            i += 1
            continue
        opener, index, cut = name[: m.start(2)], int(m[2]), m.end()
        end = _element_end(items, i, name[:cut])
        signature = _signature(items, i, end, cut)
        run, start = 1, end
        while start < count:  # the elements after it, as long as they are equal to it
            key = f"{opener}{index + run}]"
            if not items[start][0].startswith(key):
                break
            stop = _element_end(items, start, key)
            if stop - start != end - i or _signature(items, start, stop, len(key)) != signature:
                break
            run, start = run + 1, stop
        if run == 1:
            rows.extend(_fold(items[i:end], cut))
        else:
            label = f"{opener}{index}..{index + run - 1}]"
            inner = [(label + n[cut:], g) for n, g in items[i:end]]
            rows.extend(Row(r.name, r.field, r.elements * run) for r in _fold(inner, len(label)))
        i = start
    return rows


def _element_end(items: list[tuple[str, Field]], start: int, key: str) -> int:
    """Where the fields of the array element named *key* (``vq[3]``) end, from *start*."""
    end = start + 1
    while end < len(items) and items[end][0].startswith(key):
        end += 1
    return end


def _signature(items: list[tuple[str, Field]], start: int, end: int, cut: int) -> object:
    """What makes two array elements equal: their members' names, types, values and
    meanings."""
    names, fields = zip(*items[start:end], strict=True)
    return [n[cut:] for n in names], list(map(_COMPARED, fields))


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
