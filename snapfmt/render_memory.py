"""Text and JSON for `snapfmt memory` (the rest of the presentation is in render.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from snapfmt.render import human, table

if TYPE_CHECKING:
    from snapfmt.guest.physmap import PhysicalMap
    from snapfmt.ops.memory import Written


def memory_text(m: PhysicalMap) -> Iterator[str]:
    yield f"machine       {m.machine} ({m.family})"
    yield f"RAM           {human(m.below_4g)} below 4 GiB, {human(m.above_4g)} above"
    for note in m.notes:
        yield f"note          {note}"
    yield ""
    rows = [[f"{r.start:#014x}", f"{r.end - 1:#014x}", human(r.length), r.block,
             f"{r.offset:#x}" + (" (not in the file)" if m.blocks[r.block].missing else "")]
            for r in m.ranges]  # fmt: skip
    yield from table(["START", "END", "SIZE", "BLOCK", "OFFSET"], rows)
    if m.unmapped:
        yield ""
        yield "not mapped    " + ", ".join(m.unmapped)


def memory_json(m: PhysicalMap) -> dict[str, Any]:
    return {
        "machine": m.machine,
        "family": m.family,
        "below_4g": m.below_4g,
        "above_4g": m.above_4g,
        "ranges": [
            {
                "start": r.start,
                "length": r.length,
                "block": r.block,
                "offset": r.offset,
                "missing": m.blocks[r.block].missing,
            }
            for r in m.ranges
        ],
        "unmapped": list(m.unmapped),
        "notes": list(m.notes),
    }


def memory_written(w: Written) -> str:
    return (f"wrote {w.output}: {w.kind}, {w.ranges} ranges, {human(w.memory)} of guest "
            f"memory, {human(w.size)} file")  # fmt: skip
