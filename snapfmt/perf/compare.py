"""Compare buffers, and ranges of files in place (mapped, with libc's memcmp).

Python cannot compare two buffers without copying one of them: ``bytes`` and
``bytearray`` comparisons take a memcmp but need one side to be that type, and comparing
two memoryviews goes item by item.  Diffing two QEMU streams compares every page, so
copying them costs as much as the comparison and the walk together.  Through ctypes the
mapped pages are compared where they are (IN_PLACE says whether that works here; where
it does not, callers compare copies).  Mappings are private (copy-on-write) only
because ctypes takes addresses of writable buffers; nothing is ever written to them.
count_changed and page_changes have plain versions the tests hold them equal to.
"""

from __future__ import annotations

import mmap
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ctypes

__all__ = [  # and IN_PLACE, made on first use (see __getattr__)
    "Mapped",
    "count_changed",
    "count_changed_plain",
    "equal",
    "page_changes",
    "page_changes_plain",
    "string_at",
    "zero_address",
]


@cache
def _libc_memcmp() -> Any:
    """libc's memcmp through ctypes, or None where there is no libc to load (TypeError:
    Windows).  Loaded on first use: commands that compare nothing in place never
    import ctypes."""
    import ctypes

    try:
        function = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return function


def __getattr__(name: str) -> Any:
    if name == "IN_PLACE":  # whether memcmp in place works here; else compare copies
        return _libc_memcmp() is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Mapped:
    """Bytes [lo, hi) of the file *fd*, mapped; ``address(offset)`` of a file offset."""

    def __init__(self, fd: int, lo: int, hi: int) -> None:
        import ctypes

        base = lo - lo % mmap.ALLOCATIONGRANULARITY
        self.lo, self.hi = lo, hi
        self._map = mmap.mmap(fd, hi - base, access=mmap.ACCESS_COPY, offset=base)
        try:
            self._view = (ctypes.c_char * (hi - base)).from_buffer(self._map)
        except BaseException:
            self._map.close()
            raise
        self._origin = ctypes.addressof(self._view) - base

    def address(self, offset: int) -> int:
        if not self.lo <= offset <= self.hi:
            raise ValueError(f"offset {offset:#x} is outside [{self.lo:#x}, {self.hi:#x})")
        return self._origin + offset

    def close(self) -> None:
        del self._view  # the export must go before the mapping can
        self._map.close()

    def __enter__(self) -> Mapped:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def equal(a: int, b: int, length: int) -> bool:
    """Whether *length* bytes at addresses *a* and *b* are equal."""
    return length == 0 or _libc_memcmp()(a, b, length) == 0


_NARROW = 512  # bytes: the piece by which count_changed trims equal ends


def count_changed(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int:
    """How many bytes differ between two pieces of one length.

    Equal pieces at either end are trimmed first (a memcmp each, _NARROW bytes at a
    time: a changed page mostly holds a few changed words); the bytes between are
    counted in C: the zero bytes of a XOR b (as big integers) are the equal ones."""
    if not isinstance(a, bytes | bytearray):
        a = bytes(a)
    b = memoryview(b)
    lo, hi = 0, len(a)
    while lo < hi and a.startswith(b[lo : lo + _NARROW], lo):
        lo += _NARROW
    if lo >= hi:
        return 0
    while (end := lo + (hi - lo - 1) // _NARROW * _NARROW) > lo:  # the last piece: [end, hi)
        if not a.startswith(b[end:hi], end):
            break
        hi = end
    size = hi - lo
    xor = int.from_bytes(a[lo:hi], "big") ^ int.from_bytes(b[lo:hi], "big")
    return size - xor.to_bytes(size, "big").count(b"\0")  # (bytes, not int: faster)


def count_changed_plain(
    a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview
) -> int:
    return sum(x != y for x, y in zip(bytes(a), bytes(b), strict=True))


def page_changes(
    offset: int,
    held: bytearray,
    other: bytes | bytearray | memoryview,
    page: int,
    block: int = 1 << 16,
) -> list[tuple[int, int, int]]:
    """(offset, size, bytes that differ) for the differing pages of two pieces of one
    length, *offset* being where they start.  A bytearray compared with any buffer is
    one memcmp, no copy, and held.startswith(piece of other, at) compares held[at:]
    with the piece the same way: the whole first, then blocks, then the pages of
    differing blocks."""
    if held == other:
        return []
    other = memoryview(other)  # slices without copies
    out = []
    block = max(block, page)  # whole pages per block, also for pages over 64 KiB
    whole = len(held) <= block  # one block (a chunk): just found to differ
    for lo in range(0, len(held), block):
        if not whole and held.startswith(other[lo : lo + block], lo):
            continue
        for at in range(lo, min(lo + block, len(held)), page):
            pb = other[at : at + page]
            if not held.startswith(pb, at):
                out.append((offset + at, len(pb), count_changed(held[at : at + len(pb)], pb)))
    return out


def page_changes_plain(
    offset: int, held: bytes | bytearray, other: bytes | bytearray | memoryview, page: int
) -> list[tuple[int, int, int]]:
    other = bytes(other)
    return [
        (
            offset + at,
            len(other[at : at + page]),
            count_changed_plain(held[at : at + page], other[at : at + page]),
        )
        for at in range(0, len(held), page)
        if held[at : at + page] != other[at : at + page]
    ]


def string_at(address: int, length: int) -> bytes:
    import ctypes

    return ctypes.string_at(address, length)


_ZEROS: dict[int, ctypes.Array[ctypes.c_char]] = {}


def zero_address(length: int) -> int:
    """The address of *length* zero bytes (kept for the life of the process)."""
    import ctypes

    if length not in _ZEROS:
        _ZEROS[length] = ctypes.create_string_buffer(length)
    return ctypes.addressof(_ZEROS[length])
