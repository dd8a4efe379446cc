"""RAM blocks of QEMU streams, read through their page maps (pages sent last win)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from snapfmt._io import FileReader, pwrite_all
from snapfmt.errors import FormatError
from snapfmt.model import RamBlock
from snapfmt.paths import Path
from snapfmt.perf import compare
from snapfmt.perf.parallel import forked_map
from snapfmt.qemu.encoded import ENCODED, decode
from snapfmt.qemu.pagemap import Gather, runs
from snapfmt.qemu.records import Block

Progress = Callable[[int], None] | None
_SPAN = 1 << 22  # bytes read or compared at a time
_SCAN_BLOCK = 16  # pages compared by one memcmp before page by page


class QemuRamBlock(RamBlock):
    """A RAM block of a QEMU stream, read through its page map."""

    def __init__(self, reader: FileReader, path: Path, block: Block, sent: int, page: int) -> None:
        self._reader, self.file = reader, reader.name
        # a block no page was sent for (x-ignore-shared) has no map: its contents are not
        # in the stream, and reading it is refused
        self.pages: Any = block.pages
        self.steps: Any = block.steps  # the log of pages sent encoded (XBZRLE, compressed)
        if not len(block.pages) and block.length:
            self.missing = "no page of it is in the stream (x-ignore-shared keeps a shared block's pages in its backing file)"
        self.sent = sent
        self.path = path
        self.qemu_idstr = block.idstr
        # postcopy streams only: the page size of a block in huge pages, as the source said
        self.host_page_size = block.host_page_size
        self.length = block.length
        self.page_size = self.chunk_size = page

    @property
    def fd(self) -> int:
        """The stream's descriptor, read at each use: -1 once the snapshot is closed, so
        a block kept past it fails rather than read whatever file took the number."""
        return self._reader.fd

    def _gather(self, per: int) -> Gather:
        return Gather(self._reader, self.page_size, per, self.steps)

    def read(self, offset: int, length: int) -> bytes:
        self.require_contents()
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range {offset:#x}+{length:#x} is outside {self.path}")
        if not length:
            return b""
        page = self.page_size
        first, last = offset // page, (offset + length + page - 1) // page
        gather = self._gather(last - first)
        gather.fill(self.pages[first:last])
        skip = offset - first * page
        return bytes(gather.view[skip : skip + length])

    def encoded_problems(self) -> Iterator[tuple[int, FormatError]]:
        """(offset in the block, why) for each page sent encoded that does not decode:
        verify's look at what reads would otherwise only find on the way."""
        if not self.steps:
            return
        for index, entry in enumerate(self.pages):
            if entry <= ENCODED:
                try:
                    decode(self._reader, self.steps, entry, self.page_size)
                except FormatError as e:
                    yield index * self.page_size, e

    def summary(self) -> tuple[int, int, int]:
        if self.missing:  # (no page is zero: none is known)
            return self.length // self.page_size, 0, 0
        return len(self.pages), len(self.pages) - self.sent, self.sent * self.page_size

    def iter_spans(self, span: int = _SPAN) -> Iterator[tuple[int, memoryview]]:
        """The whole block in order, read into one reused buffer: each view is valid
        until the next step of the iteration.

        Pages sent one after another (the usual case) are one run of records, read by
        one scattering preadv per 512 pages: each page lands in its place in the buffer,
        each header between two pages in an 8-byte sink.  No page is copied by Python."""
        self.require_contents()
        page = self.page_size
        per = max(1, span // page)
        gather = self._gather(per)
        for first in range(0, len(self.pages), per):
            where = self.pages[first : first + per]
            gather.fill(where)
            yield first * page, gather.view[: len(where) * page].toreadonly()

    def write_into(self, fd: int, progress: Progress = None) -> None:
        """As RamBlock.write_into, through write_range_into: no zero page is written."""
        self.write_range_into(fd, 0, self.length, 0, progress)
        os.ftruncate(fd, self.length)

    def write_range_into(
        self, fd: int, offset: int, length: int, at: int, progress: Progress = None
    ) -> None:
        """As RamBlock.write_range_into, the zero and unsent pages known from the page
        map: they are holes without being looked at, and each run of sent pages is
        gathered (4 MiB at most at a time) and written."""
        page = self.page_size
        if offset % page or length % page:
            super().write_range_into(fd, offset, length, at, progress)
            return
        self.require_contents()
        per = _SPAN // page
        gather = self._gather(per)
        first, stop = offset // page, (offset + length) // page
        for lo in range(first, stop, per):
            where = self.pages[lo : min(lo + per, stop)]
            for i, j, w in runs(where, page + 8):
                if w > 0 or w <= ENCODED:
                    if w > 0:
                        gather.scatter(i, j, w)
                    else:
                        gather.decode(i, w)
                    place = at + (lo - first + i) * page
                    pwrite_all(fd, [gather.view[i * page : j * page]], place)
            if progress:
                progress(len(where) * page)

    def differing_pages(
        self, other: RamBlock, length: int, progress: Progress = None
    ) -> Iterator[tuple[int, int, int]]:
        """As RamBlock.differing_pages; against another QEMU block of this page size,
        through both page maps: runs of records are compared where they lie in the
        mapped streams, zero pages with zeros, and spans far apart in either stream as
        copies.  The 4 MiB spans are shared with a forked process (their cost is page
        faults and memory reads, which threads would queue for in one address space)."""
        page = self.page_size
        self.require_contents()
        if not isinstance(other, QemuRamBlock) or other.page_size != page or length % page:
            yield from super().differing_pages(other, length, progress)
            return
        per = _SPAN // page
        count = length // page
        starts = range(0, count, per)
        spans = forked_map(lambda first: _span(self, other, first, min(per, count - first)), starts)
        for first, changes in zip(starts, spans, strict=True):
            yield from changes
            if progress:
                progress(min(per, count - first) * page)


def _span(a: QemuRamBlock, b: QemuRamBlock, first: int, n: int) -> list[tuple[int, int, int]]:
    """The differing pages of [first, first + n)."""
    step = a.page_size + 8
    if a.steps or b.steps:  # pages sent encoded are decoded, not compared in place
        return _copies(a, b, first, n)
    runs_a = list(runs(a.pages[first : first + n], step))
    runs_b = list(runs(b.pages[first : first + n], step))
    ext_a, ext_b = _extent(runs_a, step), _extent(runs_b, step)
    if ext_a is None and ext_b is None:
        return []  # zero on both sides
    if compare.IN_PLACE and _compact(ext_a, n, step) and _compact(ext_b, n, step):
        with contextlib.suppress(OSError):  # a file that cannot be mapped (FUSE, 9p)
            return [
                (offset, len(pa), compare.count_changed(pa, pb))
                for offset, pa, pb in _mapped(a, b, first, runs_a, runs_b, ext_a, ext_b)
            ]
    return _copies(a, b, first, n)


def _extent(runs: list[tuple[int, int, int]], step: int) -> tuple[int, int] | None:
    """The stream range [lo, hi) holding the pages of *runs*, None if none was sent."""
    sent = [(w, w + (j - i) * step - 8) for i, j, w in runs if w > 0]
    return (min(lo for lo, _ in sent), max(hi for _, hi in sent)) if sent else None


def _compact(extent: tuple[int, int] | None, n: int, step: int) -> bool:
    return extent is None or extent[1] - extent[0] <= 4 * n * step


def _mapped(
    a: QemuRamBlock,
    b: QemuRamBlock,
    first: int,
    runs_a: list[tuple[int, int, int]],
    runs_b: list[tuple[int, int, int]],
    ext_a: tuple[int, int] | None,
    ext_b: tuple[int, int] | None,
) -> Iterator[tuple[int, bytes, bytes]]:
    """(offset, bytes of a, bytes of b) of each differing page, compared in place."""
    page = a.page_size
    step = page + 8
    zero = bytes(page)
    zero_at = compare.zero_address(page)
    with contextlib.ExitStack() as stack:
        map_a = stack.enter_context(compare.Mapped(a.fd, *ext_a)) if ext_a else None
        map_b = stack.enter_context(compare.Mapped(b.fd, *ext_b)) if ext_b else None
        ia = ib = s = 0
        n = runs_a[-1][1]
        while s < n:
            i0, j0, w0 = runs_a[ia]
            i1, j1, w1 = runs_b[ib]
            e = min(j0, j1)
            at_a = map_a.address(w0 + (s - i0) * step) if map_a and w0 > 0 else None
            at_b = map_b.address(w1 + (s - i1) * step) if map_b and w1 > 0 else None
            if at_a is not None and at_b is not None:
                for k in _scan(at_a, at_b, e - s, page, step):
                    yield ((first + s + k) * page, compare.string_at(at_a + k * step, page),
                           compare.string_at(at_b + k * step, page))  # fmt: skip
            elif at_a is not None or at_b is not None:
                sent = at_a if at_a is not None else at_b
                assert sent is not None
                for k in range(e - s):  # data against zeros: page by page
                    if not compare.equal(sent + k * step, zero_at, page):
                        data = compare.string_at(sent + k * step, page)
                        pair = (zero, data) if at_a is None else (data, zero)
                        yield (first + s + k) * page, *pair
            s = e
            ia += j0 == e
            ib += j1 == e


def _scan(at_a: int, at_b: int, count: int, page: int, step: int) -> Iterator[int]:
    """Indexes of the pages that differ between two runs of *count* records mapped at
    *at_a* and *at_b*: blocks of 16 pages are compared with one memcmp each (headers
    between their pages included: within a run they are alike on both sides), then the
    pages of a differing block one by one."""
    for lo in range(0, count, _SCAN_BLOCK):
        hi = min(lo + _SCAN_BLOCK, count)
        if compare.equal(at_a + lo * step, at_b + lo * step, (hi - lo) * step - 8):
            continue
        for k in range(lo, hi):
            if not compare.equal(at_a + k * step, at_b + k * step, page):
                yield k


def _copies(a: QemuRamBlock, b: QemuRamBlock, first: int, n: int) -> list[tuple[int, int, int]]:
    """Pages [first, first + n) of both blocks read into buffers, then compared."""
    page = a.page_size
    left, right = a._gather(n), b._gather(n)
    left.fill(a.pages[first : first + n])
    right.fill(b.pages[first : first + n])
    held = left.view.obj
    assert isinstance(held, bytearray)
    return compare.page_changes(first * page, held, right.view, page)
