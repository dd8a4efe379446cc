"""Field layouts: decode and encode VMState bytes.

A layout has the shape of one device entry of QEMU's vmdesc JSON
(``{"fields": [...], "subsections": [...]}``; spec/format.md §6), so a layout taken from a
QEMU stream and one written by snapfmt decode the same way.  Values are big-endian, as
QEMU writes them.  ``"int32 le"`` is big-endian too: QEMU's name means "less or equal"
(the loaded value may not exceed the current one), checked against QEMU 7.2 streams.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any, Literal, NamedTuple

from snapfmt.errors import LayoutError

SUBSECTION_MARKER = 0x05

# type name -> (size, signed, byte order)
_INTEGERS: dict[str, tuple[int, bool, Literal["little", "big"]]] = {}
for _bits in (8, 16, 32, 64):
    for _signed in (True, False):
        _name = f"{'' if _signed else 'u'}int{_bits}"
        _INTEGERS[_name] = (_bits // 8, _signed, "big")
        _INTEGERS[f"{_name} equal"] = (_bits // 8, _signed, "big")
_INTEGERS["int32 le"] = (4, True, "big")
_INTEGERS["uint8_t"] = (1, False, "big")
_INTEGERS["bool"] = (1, False, "big")

Layout = Mapping[str, Any]


class Field(NamedTuple):
    """One decoded value: ``name`` is a field path such as ``mac_reg[12]`` or ``a.b``."""

    name: str
    type: str
    offset: int  # absolute when the caller gave a base offset, else within the state
    size: int
    value: int | bool | bytes
    display: str | None = None  # what the value means, where snapfmt.state knows it


_KINDS = {str: "a string", int: "an integer"}


def _need(node: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """*node*[*key*], which must be of *kind*; *where*: the JSON path of *node*."""
    value = node.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        found = "nothing" if key not in node else f"{value!r:.60}"
        raise LayoutError(
            f"layout {where}.{key}: expected {_KINDS.get(kind, kind.__name__)}, found {found}"
        )
    return value


class _Cursor:
    def __init__(self, data: bytes, base: int) -> None:
        self.data = data
        self.pos = 0
        self.base = base
        # Zero-size fields and structs cost no bytes, so nesting could multiply them
        # without limit: every element visited spends from this budget.
        self.budget = len(data) + 4096
        # by id(field): (field, checked spec) -- the field kept, so an id is never reused
        self.checked: dict[int, tuple[object, tuple[str, str, str, int, int | None]]] = {}

    def visit(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise LayoutError("layout describes more elements than the state can hold")

    def fits(self, elements: int, size: int) -> bool:
        """Whether *elements* more elements of *size* bytes in all fit both the state and
        the budget; if they do, they are charged to the budget."""
        if elements > self.budget or self.pos + size > len(self.data):
            return False
        self.budget -= elements
        return True

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise LayoutError(
                f"state ends at {len(self.data)} bytes but field {what} needs "
                f"{size} bytes at {self.pos}"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk


# integer size and signedness -> struct code, for arrays unpacked at once
_CODES = {(1, True): "b", (1, False): "B", (2, True): "h", (2, False): "H",
          (4, True): "i", (4, False): "I", (8, True): "q", (8, False): "Q"}  # fmt: skip


def _values(type_name: str, raw: bytes, size: int, count: int) -> list[Any]:
    """What _value gives for each of *count* elements of *size* bytes in *raw*."""
    spec = _INTEGERS.get(type_name)
    if spec is None or spec[0] != size:
        return (
            [raw[at : at + size] for at in range(0, size * count, size)] if size else [b""] * count
        )
    if type_name == "bool":
        return [b != 0 for b in raw]
    order = ">" if spec[2] == "big" else "<"
    return list(struct.unpack(f"{order}{count}{_CODES[size, spec[1]]}", raw))


def _value(type_name: str, raw: bytes) -> int | bool | bytes:
    spec = _INTEGERS.get(type_name)
    if spec is None or spec[0] != len(raw):
        return raw
    if type_name == "bool":
        return raw != b"\x00"
    return int.from_bytes(raw, spec[2], signed=spec[1])


def _check(field: object, limit: int, where: str) -> tuple[str, str, str, int, int | None]:
    """(name, index suffix, type, size, array length) of one field of a layout, checked;
    *where*: the field's JSON path in the layout ($.fields[3])."""
    if not isinstance(field, Mapping):
        raise LayoutError(f"layout {where}: expected a field (an object), found {field!r:.60}")
    name = _need(field, "name", str, where)
    type_name = _need(field, "type", str, where)
    size = _need(field, "size", int, where)
    count = field.get("array_len")
    if count is not None and (not isinstance(count, int) or not 0 <= count <= limit):
        raise LayoutError(
            f"layout {where}.array_len: field {name!r} has a bad array_len {count!r:.60}"
        )
    return name, f"[{field['index']}]" if "index" in field else "", type_name, size, count


def _fields(node: Layout, cur: _Cursor, prefix: str, where: str) -> Iterator[Field]:
    fields = node.get("fields", [])
    if not isinstance(fields, list):
        raise LayoutError(f"layout {where}.fields: expected a list, found {fields!r:.60}")
    previous: tuple[str, int] | None = None  # (name, index) of the last indexed entry
    for position, field in enumerate(fields):
        seen = cur.checked.get(id(field))  # (an array of structs comes back to its fields
        if seen is None or seen[0] is not field:  # for every element)
            at = f"{where}.fields[{position}]"
            seen = cur.checked[id(field)] = field, _check(field, len(cur.data), at)
        name, suffix, type_name, size, count = seen[1]
        index = field.get("index")
        if isinstance(index, int):
            previous = name, index
        elif previous is not None and previous[0] == name:
            # QEMU 10.0 leaves the index off the last element of an array of
            # structs (bmdma[0] then bmdma): it is named by its position, as 7.2 names it
            suffix = f"[{previous[1] + 1}]"
            previous = None
        else:
            previous = None
        base = f"{prefix}{name}{suffix}"
        names = [base] if count is None else [f"{base}[{i}]" for i in range(count)]
        total = size * len(names)
        if type_name != "struct" and size >= 0 and len(names) > 1 and cur.fits(len(names), total):
            # an array of scalars, in bounds and within the budget: taken at once
            start = cur.base + cur.pos
            values = _values(type_name, cur.take(total, base), size, len(names))
            offsets = range(start, start + total, size) if size else repeat(start)
            yield from map(Field, names, repeat(type_name), offsets, repeat(size), values)
            continue
        for label in names:
            cur.visit()
            if type_name == "struct":
                inner = field.get("struct")
                at = f"{where}.fields[{position}].struct"
                if not isinstance(inner, Mapping):
                    raise LayoutError(
                        f"layout {at}: struct field {name!r} has no struct (an object)"
                    )
                start = cur.pos
                yield from _fields(inner, cur, f"{label}.", at)
                yield from _subsections(inner, cur, f"{label}.", at)
                if cur.pos - start != size:
                    raise LayoutError(
                        f"layout {at}: struct {label} decoded {cur.pos - start} bytes, "
                        f"its size says {size}"
                    )
                continue
            offset = cur.pos
            raw = cur.take(size, label)
            yield Field(label, type_name, cur.base + offset, size, _value(type_name, raw))


def _subsections(node: Layout, cur: _Cursor, prefix: str, where: str) -> Iterator[Field]:
    subs = node.get("subsections", []) or []
    if not isinstance(subs, list):
        raise LayoutError(f"layout {where}.subsections: expected a list, found {subs!r:.60}")
    for position, sub in enumerate(subs):
        at = f"{where}.subsections[{position}]"
        if not isinstance(sub, Mapping):
            raise LayoutError(f"layout {at}: expected a subsection (an object), found {sub!r:.60}")
        name = _need(sub, "vmsd_name", str, at)
        marker_at = cur.pos
        head = cur.take(2, f"subsection {name}")
        if head[0] != SUBSECTION_MARKER:
            raise LayoutError(
                f"expected subsection {name!r} marker 0x05 at {marker_at}, found {head[0]:#04x}"
            )
        found = cur.take(head[1], f"subsection {name} name").decode("utf-8", "replace")
        if found != name:
            raise LayoutError(f"expected subsection {name!r} at {marker_at}, found {found!r}")
        cur.take(4, f"subsection {name} version")
        yield from _fields(sub, cur, f"{prefix}{name}:", at)
        yield from _subsections(sub, cur, prefix, at)


def iter_decode(layout: Layout, data: bytes, base_offset: int = 0) -> Iterator[Field]:
    """Decode *data* field by field, lazily: stop early to read just the first fields.
    Unlike decode(), it does not check that the layout accounts for every byte."""
    cur = _Cursor(data, base_offset)
    try:
        yield from _fields(layout, cur, "", "$")
        yield from _subsections(layout, cur, "", "$")
    except RecursionError:
        raise LayoutError("layout nests too deeply") from None


def load(
    layout: Layout, data: bytes, subsection: Callable[[str], Layout | None]
) -> tuple[list[Field], int, str | None]:
    """Decode *data* as QEMU's loader reads a section with *layout*: its fields, then
    whatever subsections the bytes hold, each found by name with *subsection* (None: the
    loader does not know it), nested ones too.  Returns (fields, bytes read, the name of
    the first unknown subsection or None); stops there, or where the subsections end.
    Running out of bytes is a LayoutError."""
    cur = _Cursor(data, 0)
    try:
        fields = list(_fields(layout, cur, "", "$"))
        unknown = _load_subsections(cur, "", subsection, fields)
    except RecursionError:
        raise LayoutError("layout nests too deeply") from None
    return fields, cur.pos, unknown


def _load_subsections(
    cur: _Cursor, prefix: str, find: Callable[[str], Layout | None], out: list[Field]
) -> str | None:
    data = cur.data
    while cur.pos + 2 <= len(data) and data[cur.pos] == SUBSECTION_MARKER:
        at = cur.pos
        length = data[at + 1]
        name = bytes(data[at + 2 : at + 2 + length]).decode("utf-8", "replace")
        layout = find(name)
        if layout is None:
            return name
        cur.take(2 + length + 4, f"subsection {name}")
        # (a nested subsection follows its parent's fields as the next one does: found
        # by name alike, the loop takes both)
        out.extend(_fields(layout, cur, f"{prefix}{name}:", f"$(subsection {name})"))
    return None


def decode(layout: Layout, data: bytes, base_offset: int = 0) -> list[Field]:
    """Decode *data* through *layout*; every byte must be accounted for."""
    cur = _Cursor(data, base_offset)
    try:
        fields = list(_fields(layout, cur, "", "$"))
        fields.extend(_subsections(layout, cur, "", "$"))
    except RecursionError:
        raise LayoutError("layout nests too deeply") from None
    if cur.pos != len(data):
        raise LayoutError(f"layout describes {cur.pos} bytes, state has {len(data)}")
    return fields


def _shown(value: object) -> str:
    """*value* as a message shows it: its repr, at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def encode_value(type_name: str, value: object, size: int | None = None) -> bytes:
    """Encode one scalar as QEMU writes it; byte-string types take bytes or hex."""
    spec = _INTEGERS.get(type_name)
    if spec is None:
        try:
            raw = bytes.fromhex(value) if isinstance(value, str) else value
        except ValueError:
            raise LayoutError(f"type {type_name!r} needs hex digits, got {_shown(value)}") from None
        if not isinstance(raw, bytes | bytearray):
            raise LayoutError(
                f"type {type_name!r} needs bytes or a hex string, got {_shown(value)}"
            )
        if size is not None and len(raw) != size:
            raise LayoutError(f"type {type_name!r}: {len(raw)} bytes given, size is {size}")
        return bytes(raw)
    width, signed, order = spec
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise LayoutError(f"type {type_name!r} needs an integer, got {_shown(value)}") from None
    if not isinstance(value, int):
        raise LayoutError(f"type {type_name!r} needs an integer, got {_shown(value)}")
    try:
        return int(value).to_bytes(width, order, signed=signed)
    except OverflowError:
        raise LayoutError(f"value {_shown(value)} does not fit type {type_name!r}") from None


def encode_fields(spec: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], bytes]:
    """Build ``(layout, state bytes)`` from ``[{name, type, value}]`` (manifest fields).

    A list value makes an array (``array_len``); byte-string types take hex strings.
    An error names where it is, as ``field[3].value[2]``.
    """
    fields: list[dict[str, Any]] = []
    out = bytearray()
    for i, item in enumerate(spec):
        where = f"field[{i}]"
        name, type_name = item.get("name"), item.get("type")
        if not isinstance(name, str) or not isinstance(type_name, str):
            raise LayoutError(f"{where}: needs a string 'name' and 'type'")
        if "value" not in item:
            raise LayoutError(f"{where} ({_shown(name)}): has no value")
        value = item["value"]
        values = value if isinstance(value, list) else [value]
        if not values:
            raise LayoutError(
                f"{where}.value ({_shown(name)}): an array needs at least one element"
            )
        encoded = []
        for k, v in enumerate(values):
            try:
                encoded.append(encode_value(type_name, v))
            except LayoutError as e:
                at = f"{where}.value[{k}]" if isinstance(value, list) else f"{where}.value"
                raise LayoutError(f"{at} ({_shown(name)}): {e}") from None
        sizes = {len(e) for e in encoded}
        if len(sizes) != 1:
            raise LayoutError(f"{where}.value ({_shown(name)}): array elements differ in size")
        entry: dict[str, Any] = {"name": name, "type": type_name, "size": sizes.pop()}
        if isinstance(value, list):
            entry["array_len"] = len(values)
        fields.append(entry)
        out.extend(b"".join(encoded))
    return {"fields": fields, "subsections": []}, bytes(out)
