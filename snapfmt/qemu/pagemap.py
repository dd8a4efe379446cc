"""Page maps: where each page of a QEMU RAM block lies in the stream, and reading by one.

A page map is an ``array("q")`` with one entry per page: NOT_SENT, ZERO_PAGE, the
file offset of the page's bytes, or, for a page sent encoded, a step of its block's log
at or below ENCODED (snapfmt.qemu.encoded).  Pages sent again later win: the walk
overwrites.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Iterator
from typing import Any

from snapfmt._io import FileReader
from snapfmt.errors import FormatError
from snapfmt.perf.runs import progression
from snapfmt.qemu.encoded import ENCODED, decode

NOT_SENT, ZERO_PAGE = 0, -1
IOV_MAX = 1024  # iovecs per preadv (Linux's IOV_MAX)


def count_sent(pages: Any) -> int:
    """How many entries of a page map are pages sent with their bytes: file offsets and
    encoded pages (not NOT_SENT or ZERO_PAGE)."""
    return int(len(pages) - pages.count(NOT_SENT) - pages.count(ZERO_PAGE))


def count_sent_plain(pages: Any) -> int:
    return sum(1 for where in pages if where > 0 or where <= ENCODED)


def mapped_ram_pages(pages: Any, bitmap: bytes, pages_offset: int, page_size: int) -> None:
    """Fill a page map from a mapped-ram bitmap (host unsigned longs, little-endian on
    x86: bit i is page i) whose pages lie from *pages_offset* on."""
    count = len(pages)
    for byte_index, byte in enumerate(bitmap):
        if byte:
            for bit in range(8):
                index = byte_index * 8 + bit
                if byte >> bit & 1 and index < count:
                    pages[index] = pages_offset + index * page_size


def runs(where: Any, step: int) -> Iterator[tuple[int, int, int]]:
    """Split a page map slice into runs (i, j, w): entries [i, j) are either records
    one after another in the stream, the first at offset w > 0 (each *step* bytes on from
    the one before), or all one of NOT_SENT or ZERO_PAGE (w is that value), or one
    encoded page (w at or below ENCODED: no two are equal).

    Short runs are followed entry by entry; once a run is 8 long it is extended by
    comparing whole stretches of the map's bytes with what the run would hold, in C
    (a diff splits every 4 MiB of both maps: entry by entry that was a fifth of it)."""
    n = len(where)
    raw = b""
    i = 0
    while i < n:
        w, j = where[i], i + 1
        nxt = w + step if w > 0 else w
        while j < n and j - i < 8 and where[j] == nxt:
            j += 1
            nxt = nxt + step if w > 0 else w
        if j - i == 8 and j < n:
            raw = raw or where.tobytes()
            j = _extend(raw, j, n, w, nxt, step)
        yield i, j, w
        i = j


def _extend(raw: bytes, j: int, n: int, w: int, nxt: int, step: int) -> int:
    """Where the run that reached entry *j* (its next entry would be *nxt*) ends, found
    by comparing growing stretches of the map's bytes *raw* with what the run holds."""
    probe = 64
    while j < n:
        size = min(probe, n - j)
        if w > 0:
            expected = progression(nxt, step, size, 8, sys.byteorder)
        else:
            expected = (array("q", [w]) * size).tobytes()
        found = raw[8 * j : 8 * (j + size)]
        if found != expected:
            diff = int.from_bytes(found, "big") ^ int.from_bytes(expected, "big")
            return j + (len(found) - (diff.bit_length() + 7) // 8) // 8
        j += size
        nxt += size * step if w > 0 else 0
        probe *= 8
    return j


def runs_plain(where: Any, step: int) -> Iterator[tuple[int, int, int]]:
    n, i = len(where), 0
    while i < n:
        w, j = where[i], i + 1
        while j < n and where[j] == (w + (j - i) * step if w > 0 else w):
            j += 1
        yield i, j, w
        i = j


class Gather:
    """A reused buffer of *per* pages and the iovecs to scatter page records into it;
    *steps*: the log of the block's encoded pages."""

    def __init__(self, reader: FileReader, page: int, per: int, steps: Any = None) -> None:
        self.reader, self.page, self.step = reader, page, page + 8
        self.steps = steps
        self.view = memoryview(bytearray(per * page))
        self.blank = memoryview(bytes(per * page))
        sink = bytearray(8)  # the header between two pages of a run lands here
        self.iov: list[Any] = []
        for i in range(per):
            self.iov += (self.view[i * page : (i + 1) * page], sink)

    def fill(self, where: Any) -> None:
        """Read the pages *where* names (file offsets, or <= 0 for zero) into the buffer."""
        page, view = self.page, self.view
        for i, j, w in runs(where, self.step):
            if w > 0:
                self.scatter(i, j, w)
            elif w <= ENCODED:
                self.decode(i, w)
            else:
                view[i * page : j * page] = self.blank[: (j - i) * page]

    def decode(self, i: int, entry: int) -> None:
        """Buffer page *i* is the encoded page whose map entry is *entry*."""
        self.view[i * self.page : (i + 1) * self.page] = decode(
            self.reader, self.steps, entry, self.page
        )

    def scatter(self, first: int, stop: int, where: int) -> None:
        """Read the run of page records for buffer pages [first, stop), the first page at
        file offset *where*: one preadv per IOV_MAX iovecs (page, sink, page...)."""
        step = self.step
        for a in range(first, stop, IOV_MAX // 2):
            b = min(a + IOV_MAX // 2, stop)
            offset = where + (a - first) * step
            want = (b - a) * step - 8
            got = os.preadv(self.reader.fd, self.iov[2 * a : 2 * b - 1], offset)
            if got != want:
                raise FormatError(
                    "stream ends inside a RAM page", file=self.reader.name, offset=offset + got
                )
