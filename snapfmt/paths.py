"""Device paths and selectors (spec/paths.md is normative).

A path such as ``/i440FX-pcihost/pci.0/e1000@05.0/vmstate`` is a sequence of components;
each carries a name (a driver, bus or leaf name) and, where the bus has addresses, the
device's bus address after ``@``.  Characters outside the unreserved set are
percent-encoded, so any name -- QEMU has RAM blocks called ``/rom@etc/acpi/tables`` --
round-trips.

A selector names one or more paths the way a person thinks of them: a full path, a bus
address without a driver (``pci.0/05.0``), a driver without an address (``.../e1000``),
``...`` for any number of components and ``*`` inside a component.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Self

from snapfmt.errors import PathSyntaxError, SelectorError

__all__ = ["Component", "Path", "Selector", "escape", "resolve", "resolve_one", "unescape"]

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._,:+=~")
_HEX = frozenset("0123456789abcdefABCDEF")


def escape(text: str) -> str:
    """Percent-encode *text* so it is one valid name or address (spec/paths.md §Escaping)."""
    if not text:
        raise PathSyntaxError("a name or address cannot be empty")
    if set(text) == {"."}:
        # ".", ".." and "..." would read as file-system or selector syntax.
        return "%2E" * len(text)
    out = []
    for char in text:
        if char in UNRESERVED:
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def unescape(text: str, *, extra: frozenset[str] = frozenset(), where: str = "") -> str:
    """Decode a percent-encoded name or address; *extra* are characters let through raw."""
    raw = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise PathSyntaxError(f"{where}bad escape {text[i : i + 3]!r} in {text!r}")
            raw.append(int(pair, 16))
            i += 3
            continue
        if char not in UNRESERVED and char not in extra:
            raise PathSyntaxError(f"{where}character {char!r} must be percent-encoded in {text!r}")
        raw.extend(char.encode("utf-8"))
        i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PathSyntaxError(f"{where}escapes in {text!r} are not UTF-8") from None


_STRUCTURAL = frozenset("%/@")  # what a readable path keeps escaped inside a component


def _readable(text: str, kept: frozenset[str]) -> str:
    """*text* with the characters in *kept*, a whole-dots name and anything that is not
    printable (or is a space) escaped, the rest as it is."""
    if set(text) == {"."}:
        return escape(text)
    return "".join(
        escape(ch) if ch in kept or not ch.isprintable() or ch.isspace() else ch for ch in text
    )


class _ComponentFields(NamedTuple):
    name: str
    address: str = ""


class Component(_ComponentFields):
    """One step of a path: a name and an optional bus address ("" when there is none).
    Immutable, hashable and ordered by (name, address): a NamedTuple, as a dataclass
    costs a millisecond to define at every start (and its module ten to import)."""

    __slots__ = ()

    def __new__(cls, name: str, address: str = "") -> Component:
        if not name:
            raise PathSyntaxError("a path component needs a name")
        return super().__new__(cls, name, address)

    @classmethod
    def _make(cls, iterable: Iterable[Any]) -> Self:  # type: ignore[override]  # (_replace checks too)
        return cls(*iterable)

    def __str__(self) -> str:
        text = escape(self.name)
        return f"{text}@{escape(self.address)}" if self.address else text

    @classmethod
    def parse(cls, text: str) -> Component:
        name, sep, address = text.partition("@")
        if not name:
            raise PathSyntaxError(f"component {text!r} has no name")
        if sep and not address:
            raise PathSyntaxError(f"component {text!r} has '@' but no address")
        return cls(unescape(name), unescape(address) if sep else "")


class _PathFields(NamedTuple):
    components: tuple[Component, ...]


class Path(_PathFields):
    """An immutable, hashable, ordered device path or section key (a NamedTuple of its
    components, as Component is)."""

    __slots__ = ()

    def __new__(cls, components: tuple[Component, ...]) -> Path:
        if not components:
            raise PathSyntaxError("a path needs at least one component")
        return super().__new__(cls, components)

    @classmethod
    def _make(cls, iterable: Iterable[Any]) -> Self:  # type: ignore[override]  # (see Component)
        return cls(*iterable)

    @classmethod
    def parse(cls, text: str) -> Path:
        """Parse the canonical or any percent-encoding variant of a path string."""
        if not text.startswith("/"):
            raise PathSyntaxError(f"path {text!r} must start with '/'")
        return cls(tuple(Component.parse(part) for part in text[1:].split("/")))

    @classmethod
    def of(cls, *parts: str | Component) -> Path:
        """Build a path from raw (unescaped) names, or ``(name, address)`` components."""
        return cls(tuple(p if isinstance(p, Component) else Component(p) for p in parts))

    def __str__(self) -> str:
        return "/" + "/".join(str(c) for c in self.components)

    def __repr__(self) -> str:
        return f"Path({str(self)!r})"

    def readable(self) -> str:
        """The path as text output shows it (spec/paths.md §Readable form): escapes
        decoded where that cannot change how the text reads, so the RAM block
        ``/%2From%40etc%2Facpi%2Ftables`` shows as ``/rom@etc/acpi/tables``."""
        if len(self.components) == 1 and not self.leaf.address:
            name = self.leaf.name
            if name.startswith("/"):
                return _readable(name, frozenset("%"))
            return "/" + _readable(name, _STRUCTURAL)
        parts = []
        for c in self.components:
            text = _readable(c.name, _STRUCTURAL)
            parts.append(f"{text}@{_readable(c.address, _STRUCTURAL)}" if c.address else text)
        return "/" + "/".join(parts)

    def __truediv__(self, child: str | Component) -> Path:
        return Path((*self.components, child if isinstance(child, Component) else Component(child)))

    @property
    def parent(self) -> Path | None:
        return Path(self.components[:-1]) if len(self.components) > 1 else None

    @property
    def leaf(self) -> Component:
        return self.components[-1]


# -- selectors -------------------------------------------------------------------------

_ANY = "..."
STATE_LEAF = "vmstate"  # the leaf holding a device node's state (its other leaves: rom, …)


class _Glob:
    """A name pattern where ``*`` matches any run of characters; matching is linear in
    practice (``str.find`` per piece), with no regular-expression backtracking."""

    __slots__ = ("pieces",)

    def __init__(self, text: str) -> None:
        self.pieces = [unescape(piece, where="selector: ") for piece in text.split("*")]

    def match(self, text: str) -> bool:
        pieces = self.pieces
        if len(pieces) == 1:
            return text == pieces[0]
        first, last = pieces[0], pieces[-1]
        if len(text) < len(first) + len(last) or not (
            text.startswith(first) and text.endswith(last)
        ):
            return False
        at, end = len(first), len(text) - len(last)
        for piece in pieces[1:-1]:  # leftmost match of each middle piece, in order
            found = text.find(piece, at, end)
            if found < 0:
                return False
            at = found + len(piece)
        return True


class _Pattern(NamedTuple):
    """One selector component; ``None`` means "not constrained"."""

    name: _Glob | None
    address: _Glob | None
    either: bool  # a bare token matches the name or the address

    def matches(self, comp: Component) -> bool:
        if self.either:
            assert self.name is not None
            return self.name.match(comp.name) or (
                bool(comp.address) and self.name.match(comp.address)
            )
        if self.name is not None and not self.name.match(comp.name):
            return False
        return self.address is None or bool(comp.address and self.address.match(comp.address))


def _parse_pattern(text: str) -> _Pattern | str:
    if text == _ANY:
        return _ANY
    if not text:
        raise SelectorError("selector has an empty component")
    name, sep, address = text.partition("@")
    if not sep:
        return _Pattern(_Glob(name), None, either=True)
    if not address:
        raise SelectorError(f"selector component {text!r} has '@' but no address")
    return _Pattern(_Glob(name) if name else None, _Glob(address), either=False)


class Selector(NamedTuple):
    """A parsed selector (spec/paths.md §Selectors)."""

    text: str
    anchored: bool
    parts: tuple[_Pattern | str, ...]

    @classmethod
    def parse(cls, text: str) -> Selector:
        if not text or text == "/":
            raise SelectorError("empty selector")
        anchored = text.startswith("/")
        body = text[1:] if anchored else text
        parts = tuple(_parse_pattern(p) for p in body.rstrip("/").split("/"))
        return cls(text, anchored, parts if anchored else (_ANY, *parts))

    def _match(self, comps: Sequence[Component], whole: bool) -> bool:
        """Run the parts over the components as a set of positions (no recursion)."""
        positions = {0}
        for part in self.parts:
            if part == _ANY:
                positions = set(range(min(positions), len(comps) + 1))
            else:
                assert isinstance(part, _Pattern)
                positions = {j + 1 for j in positions if j < len(comps) and part.matches(comps[j])}
            if not positions:
                return False
        return len(comps) in positions if whole else True

    def matches(self, path: Path) -> bool:
        """True when the selector names *path* itself."""
        return self._match(path.components, whole=True)

    def covers(self, path: Path) -> bool:
        """True when the selector names *path* or a device node above it."""
        return self._match(path.components, whole=False)


Aliases = Mapping[str, Path] | Callable[[], Mapping[str, Path]] | None


def resolve(selector: str, paths: Iterable[Path], aliases: Aliases = None) -> list[Path]:
    """Every path *selector* names, sorted.

    Paths the selector names wholly win over paths it names only through a device node
    above them, so ``/pc.ram`` names ``/pc.ram`` and not also ``/pc.ram/x``.  When it
    names nothing, a path whose readable form (Path.readable) is the selector names that
    section, else a QEMU identifier equal to it (``0000:00:05.0/e1000``) names its
    section; *aliases* may be a function, called only then.
    """
    pool = sorted(set(paths))
    sel: Selector | None = None
    problem: SelectorError | None = None
    try:
        sel = Selector.parse(selector)
    except SelectorError as e:
        problem = e
    if sel is not None:
        found = [p for p in pool if sel.matches(p)] or [p for p in pool if sel.covers(p)]
        if found:
            return found
    shown = [p for p in pool if p.readable() == selector]  # a path as text output shows it
    if shown:
        return shown
    table = aliases() if callable(aliases) else aliases
    if table and selector in table:
        return [table[selector]]
    if problem is not None:
        raise problem
    return []


def _nearest(selector: str, pool: Sequence[Path], count: int = 3) -> list[str]:
    """The paths most like *selector*, comparing it with whole paths and single components."""
    import difflib  # (only when a selector matched nothing)

    wanted = selector.strip("/").lower()

    def score(path: Path) -> float:
        texts = [
            str(path).lower(),
            *(str(c).lower() for c in path.components),
            *(c.name.lower() for c in path.components),
        ]
        best = max(difflib.SequenceMatcher(None, wanted, t).ratio() for t in texts)
        return best + (0.5 if any(t.startswith(wanted) for t in texts[1:]) else 0.0)

    return [str(p) for p in sorted(pool, key=lambda p: (-score(p), p))[:count]]


def _device_state(selector: str, found: Sequence[Path]) -> Path | None:
    """The `vmstate` leaf among *found* when they are all leaves of one device node that
    *selector* names (and it names none of the leaves themselves): ``e1000`` picks the
    e1000's state over its ROM.  None when they are not (several devices, no state)."""
    node = found[0].parent
    if node is None or any(p.parent != node for p in found):
        return None
    state = node / STATE_LEAF
    if state not in found:
        return None
    try:
        sel = Selector.parse(selector)
    except SelectorError:  # a QEMU identifier that is no selector
        return None
    if not sel.matches(node) or any(sel.matches(p) for p in found):
        return None
    return state


def resolve_one(selector: str, paths: Iterable[Path], aliases: Aliases = None) -> Path:
    """The one path *selector* names; an error lists every candidate or the nearest paths.

    Of the leaves of one device node named by the selector, the node's `vmstate` wins
    (spec/paths.md §Resolving, rule 4)."""
    pool = sorted(set(paths))
    found = resolve(selector, pool, aliases)
    if len(found) == 1:
        return found[0]
    state = _device_state(selector, found) if found else None
    if state is not None:
        return state
    if found:
        listed = ", ".join(str(p) for p in found)
        raise SelectorError(
            f"selector {selector!r} is ambiguous: it names {len(found)} sections: {listed}"
        )
    near = _nearest(selector, pool)
    hint = f"; nearest: {', '.join(near)}" if near else "; the snapshot has no sections"
    raise SelectorError(f"selector {selector!r} names no section{hint}")
