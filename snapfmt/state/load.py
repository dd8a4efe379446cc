"""A device section loaded as QEMU would load it into the target (validate's simulation).

QEMU has no lengths per field: it reads a section's bytes with its **own** layout, field
after field, then whatever subsections follow, each by name, then expects the section
footer.  So the snapshot's bytes are decoded here with the target's layout: a layout
that does not take exactly the section's bytes is QEMU's "Missing section footer", a
subsection the target does not know is its "does not exist", an ``… equal`` field
whose loaded value differs from the target's is refused.  A layout that differs but
reads the same bytes the same way passes, as it does in QEMU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from snapfmt.errors import LayoutError
from snapfmt.model import DeviceState
from snapfmt.vmstate import Field, load


class LoadProblem(NamedTuple):
    code: str  # load-footer, load-short, load-subsection, load-equal
    message: str
    qemu: str


def simulate(
    idstr: str,
    vmstate: str,
    data: bytes,
    fields: Sequence[Any],
    subsections: Sequence[Any],
    known: Sequence[str] | None,
    equal: Mapping[str, int] | None,
) -> LoadProblem | None:
    """What goes wrong when QEMU loads *data* (a snapshot's section of *idstr*) with the
    target's layout (*fields*, and the layouts of *subsections* it has); *known* names
    every subsection the target knows (None: those it has), *equal* the target's values
    of its ``equal`` fields.  None: QEMU takes the section."""
    by_name = {s.get("vmsd_name"): s for s in subsections if isinstance(s, Mapping)}
    names = set(by_name) if known is None else set(known) | set(by_name)

    def find(name: str) -> Any:
        return by_name.get(name) if name in names else None

    try:
        decoded, used, unknown = load({"fields": list(fields)}, data, find)
    except LayoutError:
        # (QEMU reads on into the footer and the next section, and then misses the footer)
        return LoadProblem("load-short", f"{idstr}: the target's layout reads past the end "
                           f"of the section's {len(data)} bytes",
                           f"Missing section footer for {idstr}")  # fmt: skip
    for f in decoded:
        problem = _compared(idstr, vmstate, f, equal or {})
        if problem is not None:
            return problem
    if unknown is not None and unknown not in names:
        return LoadProblem("load-subsection", f"{idstr}: subsection {unknown} is unknown to "
                           "the target", f"VM subsection '{unknown}' in '{vmstate}' does not exist")  # fmt: skip
    if unknown is not None:
        return None  # a subsection the target knows but gave no layout for: not simulated
    if used != len(data):
        return LoadProblem("load-footer", f"{idstr}: the target's layout takes {used} of the "
                           f"section's {len(data)} bytes", f"Missing section footer for {idstr}")  # fmt: skip
    return None


def _compared(idstr: str, vmstate: str, f: Field, values: Mapping[str, int]) -> LoadProblem | None:
    """QEMU's check of one loaded ``… equal`` or ``int32 le`` field against the target's."""
    own = values.get(f.name)
    if own is None or not isinstance(f.value, int):
        return None
    if f.type == "int32 le" and not 0 <= f.value <= own:
        return LoadProblem("load-equal", f"{idstr}: {f.name} is {f.value} in the snapshot, "
                           f"above the target's {own}",
                           f"{vmstate}:{f.name}: loaded {f.value} > current {own}")  # fmt: skip
    if f.type.endswith(" equal") and f.value != own:
        return LoadProblem("load-equal", f"{idstr}: {f.name} is {f.value} in the snapshot, "
                           f"{own} on the target, which requires them equal",
                           f"{f.value:x} != {own:x}; Failed to load {vmstate}:{f.name}")  # fmt: skip
    return None


def compared_values(
    idstr: str, vmstate: str, state: DeviceState, values: Mapping[str, int]
) -> LoadProblem | None:
    """The compared fields of a section whose layout is the target's: decoded only as far
    as the last of them."""
    wanted = set(values)
    if not wanted:
        return None
    try:
        for f in state.iter_fields():
            problem = _compared(idstr, vmstate, f, values)
            if problem is not None:
                return problem
            wanted.discard(f.name)
            if not wanted:
                break
    except LayoutError:
        return None  # (a layout that does not fit the state is shown by dump, not here)
    return None
