"""Device state as a person reads it: the understanding layer over decoded fields.

:func:`understand` takes a device's fields as its layout decodes them and

1. decodes what the layout leaves opaque: virtio state (snapfmt/state/virtio.py);
2. names sub-arrays by the register they start at (``mac_reg[RA+1]``, not
   ``mac_reg[0][1]``) and gives a field name QEMU repeats a ``#2`` (``#3``, …) from its
   second appearance on, so that every field has one name;
3. attaches a ``display`` to the values the registry knows (snapfmt/state/registry.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from snapfmt.errors import LayoutError
from snapfmt.model import DeviceState
from snapfmt.state import registry
from snapfmt.state.interpret import Interpreter
from snapfmt.vmstate import Field

__all__ = ["Understood", "field_matches", "understand", "understand_fields"]

_SUBARRAY = re.compile(r"(.*?\])\[(\d+)\]$")


class Understood(NamedTuple):
    fields: list[Field]
    notes: list[str]  # what could not be decoded, and why


def understand(device: DeviceState) -> Understood:
    """The fields of *device*, understood; raises LayoutError as DeviceState.fields does."""
    if device.layout is None:
        return Understood([], [])
    return understand_fields(device.vmstate_name, device.fields())


def understand_fields(vmstate_name: str, fields: Iterable[Field]) -> Understood:
    out: list[Field] = []
    notes: list[str] = []
    for field in fields:
        if field.type in ("virtio", "virtio-gpu") and isinstance(field.value, bytes):
            from snapfmt.state.virtio import decode_gpu, decode_virtio

            found = (decode_virtio(vmstate_name, field.value, field.offset, field.name)
                     if field.type == "virtio" else
                     decode_gpu(field.value, field.offset, field.name))  # fmt: skip
            out.extend(found.fields)
            if found.note:
                notes.append(f"{field.name}: {found.note}")
        else:
            out.append(field)
    return Understood(_displayed(vmstate_name, _unique(_renamed(vmstate_name, out))), notes)


def _renamed(vmstate_name: str, fields: list[Field]) -> list[Field]:
    starts = registry.SUBARRAYS.get(vmstate_name)
    if not starts:
        return fields
    out = []
    for f in fields:
        m = _SUBARRAY.match(f.name)
        start = starts.get(m[1]) if m else None
        out.append(f._replace(name=f"{m[1].rsplit('[', 1)[0]}[{start[0]}+{m[2]}]")
                   if m and start else f)  # fmt: skip
    return out


def _unique(fields: list[Field]) -> list[Field]:
    if len({f.name for f in fields}) == len(fields):  # (nearly always so)
        return fields
    seen: dict[str, int] = {}
    out = []
    for f in fields:
        count = seen.get(f.name, 0) + 1
        seen[f.name] = count
        out.append(f if count == 1 else f._replace(name=f"{f.name}#{count}"))
    return out


class _Rules(NamedTuple):
    exact: dict[str, Interpreter]
    patterns: list[tuple[re.Pattern[str], Interpreter]]
    types: dict[str, Interpreter]


_RULES: dict[str, _Rules] = {}


def _rules(vmstate_name: str) -> _Rules:
    rules = _RULES.get(vmstate_name)
    if rules is None:
        rules = _RULES[vmstate_name] = _Rules({}, [], {})
        for name, key, interpreter in registry.DISPLAYS:
            if name not in (vmstate_name, "*"):
                continue
            if key.startswith("re:"):
                rules.patterns.append((re.compile(key[3:]), interpreter))
            elif key.startswith("type:"):
                rules.types[key[5:]] = interpreter
            else:
                rules.exact[key] = interpreter
    return rules


def _displayed(vmstate_name: str, fields: list[Field]) -> list[Field]:
    rules = _rules(vmstate_name)
    if not (rules.exact or rules.patterns or rules.types):
        return fields
    by_name: dict[str, Field] = {}  # (made when an interpreter first needs it)
    out = []
    for f in fields:
        found: tuple[re.Match[str], Interpreter] | None = None
        exact = rules.exact.get(f.name) or rules.types.get(f.type)
        if exact is not None:
            found = re.match(".*", f.name), exact  # type: ignore[assignment]
        else:
            for pattern, interpreter in rules.patterns:
                m = pattern.fullmatch(f.name)
                if m:
                    found = m, interpreter
                    break
        if found is not None:
            if not by_name:
                by_name.update((g.name, g) for g in fields)
            try:
                text = found[1](found[0], f, by_name)
            except (ValueError, IndexError, TypeError, OverflowError):
                text = None  # a value the interpreter cannot read means nothing to show
            if text is not None:
                f = f._replace(display=text)
        out.append(f)
    return out


_PATTERNS: dict[str, tuple[re.Pattern[str], re.Pattern[str]]] = {}


def _pattern(text: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(within a name, a whole word) for one ``--field`` pattern; ``*`` and ``?`` are
    its only wildcards (brackets are literal, as in field names)."""
    found = _PATTERNS.get(text)
    if found is None:
        body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text)
        found = _PATTERNS[text] = (
            re.compile(rf"(?:^|(?<=[.:]))(?:{body})(?=$|[.\[:])"),
            re.compile(rf"(?:{body})\Z"),
        )
    return found


def field_matches(field: Field, patterns: Iterable[str]) -> bool:
    """Whether a ``--field`` pattern names *field*: a part of its name that starts where
    the name or a component (after ``.`` or ``:``) starts and ends where the name or a
    component ends (before ``.``, ``[`` or ``:``) -- ``env.segs`` and ``base`` name
    ``env.segs[1].base`` -- or the first word of its display (``RAX``, ``MAC``)."""
    word = field.display.split(" ", 1)[0] if field.display else None
    for text in patterns:
        within, whole = _pattern(text)
        if within.search(field.name) or (word is not None and whole.match(word)):
            return True
    return False


def safe_understand(device: DeviceState) -> Understood | None:
    """understand(), or None when the layout does not fit the state."""
    try:
        return understand(device)
    except LayoutError:
        return None
