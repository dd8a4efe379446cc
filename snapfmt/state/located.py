"""Decoded fields with absolute offsets, from a construct declaration.

construct parses a declaration into values; a dump needs each value's name, offset and
size as well.  :func:`decode` walks the declaration (Struct, Array, If, RepeatUntil)
over the bytes itself, keeping the context construct would keep (``this.x`` of earlier
fields, ``_params``), and lets construct parse every leaf.  Arrays of fixed-size
integers, or of structs made only of them, are unpacked in one ``struct`` call: the
1024-entry queue tables of every virtio device would otherwise cost a construct call per
integer (tests compare both ways, and with construct's own parse).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

from snapfmt.errors import LayoutError
from snapfmt.vmstate import Field

_SIZES = {"b": 1, "B": 1, "h": 2, "H": 2, "i": 4, "I": 4, "l": 4, "L": 4, "q": 8, "Q": 8}


class Walk:
    """One pass over *data*: ``decode(decl, label)`` appends the fields it finds to
    ``fields`` and returns the parsed value, as construct's parse would."""

    bulk = True  # (tests turn it off to compare with construct parsing every leaf)

    def __init__(self, data: bytes, base: int, params: Mapping[str, Any]) -> None:
        import construct

        self.c = construct
        self.data = data
        self.base = base
        self.pos = 0
        self.stream = io.BytesIO(data)
        self.fields: list[Field] = []
        self.root = construct.Container(_params=construct.Container(params), _root=None)
        self.budget = len(data) + 4096  # elements visited; zero-size ones cost none

    def decode(self, decl: Any, label: str, ctx: Any = None) -> Any:
        c = self.c
        ctx = self.root if ctx is None else ctx
        try:
            if isinstance(decl, c.Renamed):
                return self.decode(decl.subcon, label, ctx)
            if isinstance(decl, c.Struct):
                return self._struct(decl, label, ctx)
            if isinstance(decl, c.Array):
                return self._array(decl, label, ctx)
            if isinstance(decl, c.IfThenElse):
                branch = decl.thensubcon if c.evaluate(decl.condfunc, ctx) else decl.elsesubcon
                return self.decode(branch, label, ctx)
            if isinstance(decl, c.RepeatUntil):
                return self._repeat(decl, label, ctx)
            if decl is c.Pass:
                return None
            return self._leaf(decl, label, ctx)
        except (c.ConstructError, ArithmeticError, KeyError, TypeError) as e:
            if isinstance(e, LayoutError):
                raise
            raise LayoutError(f"{label or 'state'} at {self.pos}: {_reason(e)}") from None

    def _visit(self, count: int = 1) -> None:
        self.budget -= count
        if self.budget < 0:
            raise LayoutError("the state describes more elements than its bytes can hold")

    def _context(self, ctx: Any) -> Any:
        inner = self.c.Container(_=ctx, _params=ctx._params, _parsing=True, _building=False,
                                 _sizing=False, _index=ctx.get("_index"))  # fmt: skip
        inner._root = ctx._root if ctx._root is not None else inner
        return inner

    def _struct(self, decl: Any, label: str, ctx: Any) -> Any:
        inner = self._context(ctx)
        dot = f"{label}." if label and not label.endswith(":") else label
        for sub in decl.subcons:
            name = sub.name
            value = self.decode(sub, f"{dot}{name}" if name else label, inner)
            if name:
                inner[name] = value
        return inner

    def _array(self, decl: Any, label: str, ctx: Any) -> list[Any]:
        count = self.c.evaluate(decl.count, ctx)
        if not isinstance(count, int) or count < 0:
            raise LayoutError(f"{label} at {self.pos}: bad element count {count!r}")
        self._visit(count)
        if self.bulk:
            found = self._bulk(decl.subcon, label, count)
            if found is not None:
                return found
        values = []
        for i in range(count):
            ctx._index = i
            values.append(self.decode(decl.subcon, f"{label}[{i}]", ctx))
        return values

    def _bulk(self, element: Any, label: str, count: int) -> list[Any] | None:
        """*count* elements of *element* unpacked at once, if it is an integer or a struct
        of integers and flags; None if it is anything else."""
        members = _flat(self.c, element)
        if members is None:
            return None
        orders = {m[1][0] for m in members if m[1][1:] not in "bB"}
        if not orders <= {">"} and not orders <= {"<"}:
            return None  # mixed byte orders
        order = orders.pop() if orders else ">"
        codes = "".join(m[1][1:] for m in members)
        size = sum(_SIZES[code] for code in codes)
        total = size * count
        if self.pos + total > len(self.data):
            return None  # let the plain path name the field that runs out
        flat = struct.unpack_from(f"{order}{codes * count}", self.data, self.pos)
        start = self.base + self.pos
        self.pos += total
        width = len(members)
        if width == 1 and members[0][0] == "":
            kind = members[0][2]
            values: list[Any] = [bool(v) for v in flat] if kind == "bool" else list(flat)
            self.fields.extend(
                Field(f"{label}[{i}]", kind, start + i * size, size, v)
                for i, v in enumerate(values)
            )
            return values
        names = [m[0] for m in members]
        kinds = [m[2] for m in members]
        sizes = [_SIZES[m[1][1:]] for m in members]
        rels = [sum(sizes[:k]) for k in range(width)]
        flags = [kind == "bool" for kind in kinds]
        extend = self.fields.extend
        out = []
        for i in range(count):
            row = flat[i * width : (i + 1) * width]
            if any(flags):
                row = tuple(bool(v) if f else v for f, v in zip(flags, row, strict=True))
            here = start + i * size
            prefix = f"{label}[{i}]."
            extend(map(Field, [prefix + n for n in names], kinds, [here + r for r in rels],
                       sizes, row))  # fmt: skip
            # (a plain dict per element, keyed like the fields: ``desc[0]``; nothing
            # reads these elements through the context)
            out.append(dict(zip(names, row, strict=True)))
        return out

    def _repeat(self, decl: Any, label: str, ctx: Any) -> list[Any]:
        values: list[Any] = []
        while True:
            self._visit()
            at = self.pos
            ctx._index = len(values)
            value = self.decode(decl.subcon, f"{label}[{len(values)}]", ctx)
            values.append(value)
            if self.pos == at:
                raise LayoutError(f"{label} at {at}: an element of no bytes would repeat forever")
            if decl.predicate(value, values, ctx):
                return values

    def _leaf(self, decl: Any, label: str, ctx: Any) -> Any:
        start = self.pos
        self.stream.seek(start)
        value = decl._parsereport(self.stream, ctx, label)
        self.pos = self.stream.tell()
        if not isinstance(decl, self.c.Const):  # (markers are structure, not fields)
            self.fields.append(Field(label, _type(self.c, decl), self.base + start,
                                     self.pos - start, value))  # fmt: skip
        return value


def decode(
    decl: Any, data: bytes, base: int = 0, label: str = "", params: Mapping[str, Any] = {}
) -> tuple[list[Field], Any, int]:
    """(fields, parsed value, bytes consumed) of *decl* over the start of *data*."""
    walk = Walk(data, base, params)
    value = walk.decode(decl, label)
    return walk.fields, value, walk.pos


def _flat(c: Any, element: Any) -> list[tuple[str, str, str]] | None:
    """[(name, struct format, type name)] of an integer, or of a struct of integers and
    flags with no context-dependent parts; None otherwise."""
    if isinstance(element, c.FormatField) and element.fmtstr[1:] in _SIZES:
        return [("", element.fmtstr, _type(c, element))]
    if element is c.Flag:
        return [("", ">B", "bool")]
    if not isinstance(element, c.Struct):
        return None
    members: list[tuple[str, str, str]] = []
    for sub in element.subcons:
        inner = sub.subcon if isinstance(sub, c.Renamed) else None
        if not sub.name or inner is None:
            return None
        names = [sub.name]
        if isinstance(inner, c.Array) and isinstance(inner.count, int):  # ``desc[2]``
            names = [f"{sub.name}[{i}]" for i in range(inner.count)]
            inner = inner.subcon
        if inner is c.Flag:
            members.extend((name, ">B", "bool") for name in names)
        elif isinstance(inner, c.FormatField) and inner.fmtstr[1:] in _SIZES:
            members.extend((name, inner.fmtstr, _type(c, inner)) for name in names)
        else:
            return None
    return members


def _type(c: Any, decl: Any) -> str:
    """The type name a field shows: QEMU's for big-endian integers (``uint32``), ``le32``
    for little-endian ones, ``bool``, ``buffer`` for bytes."""
    if isinstance(decl, c.FormatField) and decl.fmtstr[1:] in _SIZES:
        code = decl.fmtstr[1:]
        bits = _SIZES[code] * 8
        if decl.fmtstr[0] == "<" and bits > 8:
            return f"le{bits}" if code.isupper() else f"sle{bits}"
        return f"{'u' if code.isupper() else ''}int{bits}"
    if decl is c.Flag:
        return "bool"
    if isinstance(decl, c.Bytes):
        return "buffer"
    if isinstance(decl, c.StringEncoded):
        return "string"
    return type(decl).__name__.lower()


def _reason(e: Exception) -> str:
    """construct's message without the parse path it appends."""
    text = str(e).strip().split("\n")[-1]  # (the first line is "Error in path ...")
    if "stream read less than specified amount" in text:
        return "the state ends inside this field"
    return text.strip() or type(e).__name__
