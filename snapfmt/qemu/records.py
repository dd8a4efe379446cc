"""The RAM section's records (reference §2): the block list, and where every page is.

Pages are never read here: each block gets a page map (snapfmt.qemu.pagemap) of where
its pages lie in the file.  The MEM_SIZE block list and the mapped-ram headers are
parsed with their declarations; the page records themselves, nearly every byte of a
stream, are read straight from a mapped window with the ``struct`` layout declared
beside them (formats.qemu.RAM_WORD).
"""

from __future__ import annotations

import mmap
import os
import sys
from array import array
from typing import TYPE_CHECKING, Any, NamedTuple

from snapfmt.errors import UnsupportedError
from snapfmt.formats import qemu as qf
from snapfmt.perf.runs import progression, run_length
from snapfmt.qemu import encoded
from snapfmt.qemu.pagemap import ZERO_PAGE, mapped_ram_pages

if TYPE_CHECKING:
    from snapfmt.qemu.walk import Cursor

_MAP_WINDOW = 1 << 25  # RAM walk: every page of it is touched, so this much is resident
_STREAK = 8  # records in a row that follow one another before a run is checked at once
_RUN_MIN, _RUN_MAX = 64, 4096  # records checked at once: first, and at most
_ZERO_RUN = array("q", [ZERO_PAGE]) * _RUN_MAX
_WHOLE = int(qf.RamFlag.CONTINUE | qf.RamFlag.PAGE)  # plain ints for the hot loop
_ZERO = int(qf.RamFlag.CONTINUE | qf.RamFlag.ZERO)
_UNSUPPORTED = qf.RamFlag.HOOK | qf.RamFlag.FULL
# what a page record holds: exactly one of these, maybe with CONTINUE
_PAGE_KINDS = frozenset(int(f) for f in (qf.RamFlag.ZERO, qf.RamFlag.PAGE, qf.RamFlag.XBZRLE,
                                          qf.RamFlag.COMPRESS_PAGE))  # fmt: skip


class Block(NamedTuple):
    """One RAM block: its page map holds, per page, NOT_SENT, ZERO_PAGE, the file
    offset of the page's bytes, or for a page sent encoded (XBZRLE, COMPRESS_PAGE) its
    last step in *steps* (snapfmt.qemu.encoded).  The map stays empty until the block's
    first page comes (a block no page is sent for costs nothing)."""

    idstr: str
    length: int
    pages: array  # type: ignore[type-arg]
    host_page_size: int | None = None  # postcopy streams: blocks in huge pages say it
    steps: array | None = None  # type: ignore[type-arg]  # the log of encoded pages


class _Windows:
    """Read-only windows on a file for the RAM walk.  Mapped where the file allows it, so
    that only the bytes looked at (record headers, 8 in every 4104) are read from the page
    cache; otherwise filled by preadv."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self._map: mmap.mmap | None = None
        self._buf: bytearray | None = None

    def cover(self, pos: int, need: int) -> tuple[Any, int]:
        """(buffer, file offset of its first byte) holding at least [pos, pos + need), or
        up to the end of the file."""
        self.release()
        if self._buf is None:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            length = min(_MAP_WINDOW, self.size - base)
            try:
                # Not populated ahead (MADV_POPULATE_READ): that walks the pages again one
                # by one after mapping them, slower than the plain faults it saves.  Nor
                # by a thread mapping the next window with MAP_POPULATE (libc through
                # ctypes, the GIL released) and unmapping the last: measured slower
                # (opening a 1 GiB stream just written: 0.33-0.58 s against 0.26-0.32 s),
                # the two threads most likely queuing for the GIL and the address space.
                self._map = mmap.mmap(self.fd, length, offset=base, access=mmap.ACCESS_READ)
                return self._map, base
            except (OSError, ValueError):  # some file systems cannot be mapped
                self._buf = bytearray(max(_MAP_WINDOW, need))
        got = os.preadv(self.fd, [self._buf], pos)
        return memoryview(self._buf)[:got], pos

    def release(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class RamWalk:
    """The RAM records of every START, PART and END of the ``ram`` section."""

    def __init__(self, cursor: Cursor, page_size: int, capabilities: tuple[str, ...]) -> None:
        self.cur, self.io = cursor, cursor.io
        self.page_size, self.capabilities = page_size, capabilities
        self.blocks: dict[str, Block] = {}
        self._last: Block | None = None  # CONTINUE may name a block of an earlier section
        self._budget = self.io.size // 9 + (1 << 20)  # page map entries a file could need
        self._postcopy: int | None = None
        self._windows = _Windows(self.io.fd, self.io.size)

    def section(self, postcopy: int | None) -> None:
        """One section's records, up to and including EOS."""
        self._postcopy = postcopy
        try:
            self._records()
        finally:
            self._windows.release()

    def _records(self) -> None:
        """The hot path -- CONTINUE records of a whole or zero page, nearly every record
        of a stream -- reads headers from a mapped window with one struct call each, and
        once a few records in a row follow one another (the next page of the same block,
        the same kind) checks a whole run of them at once (perf.runs.run_length).  Any
        other record goes through _record."""
        size, page = self.io.size, self.page_size
        mask, shift = page - 1, page.bit_length() - 1
        unpack = qf.RAM_WORD.unpack_from
        block = self._last
        pages = block.pages if block else array("q")
        pos = self.cur.pos
        buf, base = self._windows.cover(pos, 9)
        end = base + len(buf)
        expect, streak, probe = -1, 0, _RUN_MIN
        while True:
            if (pos + 9 > end or pos < base) and pos + 9 <= size:
                # (a mapped-ram block list may move the stream on, or back)
                buf, base = self._windows.cover(pos, 9)
                end = base + len(buf)
            # fewer than 9 bytes left (an EOS last, or a cut stream): the careful path
            word = unpack(buf, pos - base)[0] if base <= pos and pos + 9 <= end else -1
            flags = word & mask
            if word >= 0 and (flags == _WHOLE or (flags == _ZERO and buf[pos - base + 8] == 0)):
                index = word >> shift
                step = 8 + page if flags == _WHOLE else 9
                if index < len(pages) and pos + step <= size:  # (a cut page: the careful path)
                    streak = streak + 1 if word == expect else 0
                    if streak < _STREAK:
                        pages[index] = pos + 8 if flags == _WHOLE else ZERO_PAGE
                        pos += step
                        expect = word + page
                        continue
                    limit = min(
                        probe, len(pages) - index, (end - pos - 9) // step + 1, (size - pos) // step
                    )  # (headers in the window, pages in the file)
                    count = run_length(buf, pos - base, word, page, step, limit)
                    if flags == _WHOLE:
                        where = progression(pos + 8, step, count, 8, sys.byteorder)
                        pages[index : index + count] = array("q", where)
                    else:
                        pages[index : index + count] = _ZERO_RUN[:count]  # count <= _RUN_MAX
                    pos += count * step
                    expect = word + count * page
                    probe = min(probe * 2, _RUN_MAX) if count == limit else _RUN_MIN
                    streak = 0
                    continue
            self.cur.pos = pos
            block, done = self._record(block)
            pages = block.pages if block else array("q")
            pos = self.cur.pos
            expect, streak = -1, 0
            if done:
                self._last = block
                return

    def _record(self, block: Block | None) -> tuple[Block | None, bool]:
        """One RAM record at the cursor, the careful way; returns (block, reached EOS)."""
        cur, page = self.cur, self.page_size
        at = cur.pos
        word = cur.parse(qf.RamRecordHead, "RAM record").word
        flags, offset = word & (page - 1), word & ~(page - 1)
        if flags & ~qf.RAM_FLAGS_MASK:
            cur.pos = at
            raise cur.error("RAM record flags out of range", section="ram", found=f"{flags:#x}")
        if flags & qf.RamFlag.MEM_SIZE:
            self._block_list(offset)
            return block, False
        if flags & qf.RamFlag.EOS:
            return block, True
        if flags == qf.RamFlag.MULTIFD_FLUSH:
            return block, False
        if flags & _UNSUPPORTED:
            cur.pos = at
            name = qf.RamFlag(flags & _UNSUPPORTED).name
            raise cur.error(
                f"RAM records of kind {name} are not supported", UnsupportedError, section="ram"
            )
        if not flags & qf.RamFlag.CONTINUE:
            idstr = cur.take(cur.u8()).decode("latin-1")
            block = self.blocks.get(idstr)
            if block is None:
                raise cur.error(f"RAM record for unknown block {idstr!r}", section="ram")
        elif block is None:
            raise cur.error("RAM record continues no block", section="ram")
        self._materialize(block)
        index = offset // page
        if index >= len(block.pages):
            cur.pos = at
            raise cur.error(
                f"RAM page offset past the end of block {block.idstr}",
                section="ram",
                found=f"{offset:#x}",
                expected=f"below {block.length:#x}",
            )
        kind = flags & ~qf.RamFlag.CONTINUE
        if kind not in _PAGE_KINDS:
            cur.pos = at
            raise cur.error("RAM record of no single page kind", section="ram",
                            found=f"{flags:#x}")  # fmt: skip
        if kind == qf.RamFlag.ZERO:
            fill = cur.u8()
            if fill:
                raise cur.error("zero page with a non-zero fill byte", section="ram", found=fill)
            block.pages[index] = ZERO_PAGE
        elif kind == qf.RamFlag.PAGE:
            if cur.pos + page > self.io.size:  # (checked first: the page's earlier copy stays)
                cur.pos = self.io.size  # where the file ends
                raise cur.error("stream ends inside a RAM page", section="ram")
            block.pages[index] = cur.pos
            cur.pos += page
        else:
            self._encoded(block, index, kind)
        return block, False

    def _encoded(self, block: Block, index: int, kind: int) -> None:
        """An XBZRLE or COMPRESS_PAGE record's header and data, checked as QEMU's loader
        checks them (a delta also as xbzrle_decode_buffer does), and logged."""
        cur, page = self.cur, self.page_size
        at = cur.pos
        if kind == qf.RamFlag.XBZRLE:
            head = cur.parse(qf.XbzrleHead, "XBZRLE header")
            problem = None
            if head.encoding != qf.XBZRLE_ENCODING:
                problem = f"encoding {head.encoding:#x}, expected {qf.XBZRLE_ENCODING:#x}"
            elif head.length > page:
                problem = f"a delta of {head.length} bytes, more than a page"
            else:
                problem = encoded.xbzrle_problem(self._data(head.length, "XBZRLE page"), page)
            if problem:
                cur.pos = at
                raise cur.error(f"bad XBZRLE page: {problem}", section="ram")
            step = encoded.XBZRLE
        else:
            length = cur.parse(qf.CompressedHead, "compressed page header").length
            if length > qf.compress_bound(page):
                cur.pos = at
                raise cur.error("compressed RAM page longer than zlib makes a page",
                                section="ram", found=length, expected=f"at most {qf.compress_bound(page)}")  # fmt: skip
            self._data(length, "compressed RAM page")
            step = encoded.COMPRESSED
        assert block.steps is not None
        block.pages[index] = encoded.step(block.steps, block.pages[index], at, step)

    def _data(self, length: int, what: str) -> bytes:
        """The *length* bytes at the cursor, which moves past them."""
        if self.cur.pos + length > self.io.size:
            self.cur.pos = self.io.size
            raise self.cur.error(f"stream ends inside {what}", section="ram")
        return self.cur.take(length)

    def _block_list(self, total: int) -> None:
        """The MEM_SIZE block list; it ends when the lengths add up to the total (not at
        a zero name length)."""
        cur = self.cur
        seen = 0
        while seen < total:
            at = cur.pos
            entry = cur.parse(qf.MemSizeEntry, "RAM block list entry")
            idstr, length = entry.idstr, entry.used_length
            if (
                not idstr
                or length % self.page_size
                or seen + length > total
                or idstr in self.blocks
            ):
                cur.pos = at
                raise cur.error(
                    "bad RAM block list entry", section="ram", found=f"{idstr!r} {length:#x}"
                )
            block = Block(idstr, length, array("q"), self._host_page_size(), array("q"))
            if "x-ignore-shared" in self.capabilities:  # the guest address: not needed here
                cur.parse(qf.BlockWord, "RAM block address")
            self.blocks[idstr] = block
            if "mapped-ram" in self.capabilities:
                self._mapped_ram(block)
            seen += length

    def _host_page_size(self) -> int | None:
        """With postcopy-ram on, QEMU writes a block's host page size after its length
        when it differs from the usual one (max of host and target page: hugepage-backed
        RAM).  The stream does not say which blocks: a page size is a power of two above
        the target page, among the sizes POSTCOPY_ADVISE listed, and its first byte is 0,
        which neither the next entry (a name length of at least 1) nor what follows the
        list (EOS 0x10, MULTIFD_FLUSH 0x200) can be.  None when it is not there."""
        if self._postcopy is None:
            return None
        ahead = self.cur.peek(qf.BlockWord.sizeof())
        if not ahead:
            return None
        size: int = qf.BlockWord.parse(ahead).value
        in_use = self._postcopy if self._postcopy > 0 else size
        if size > self.page_size and size & (size - 1) == 0 and size <= 1 << 34 and size & in_use:
            self.cur.pos += len(ahead)
            return size
        return None

    def _materialize(self, block: Block) -> None:
        """Make a block's page map (8 bytes a page) when its first page arrives.

        QEMU sends every page of a block it sends at all (or, with mapped-ram, stores
        them in a file as large as the block), so maps beyond what the file could hold
        come from a hostile declaration: refused before allocating."""
        if len(block.pages) or not block.length:
            return
        count = block.length // self.page_size
        self._budget -= count
        if self._budget < 0:
            raise self.cur.error(
                f"RAM block {block.idstr} declares more RAM than the stream could hold",
                section="ram",
                found=f"{block.length:#x} bytes",
            )
        block.pages.frombytes(bytes(8 * count))

    def _mapped_ram(self, block: Block) -> None:
        """mapped-ram (reference §6): a header, a bitmap of the pages present and every
        page at a fixed offset; the stream goes on after the block's page area."""
        cur = self.cur
        at = cur.pos
        header = cur.parse(qf.MappedRamHeader, f"mapped-ram header of {block.idstr}")
        where = f"mapped-ram header of {block.idstr}"
        if header.version != 1:
            cur.pos = at
            raise cur.error(
                f"{where}: version not supported",
                UnsupportedError,
                section="ram",
                found=header.version,
                expected=1,
            )
        if header.bitmap_offset == 0 and header.pages_offset == 0:  # skipped: ignore-shared
            return
        pages = block.length // self.page_size
        bitmap_length = -(-pages // 64) * 8  # host unsigned longs
        size = self.io.size
        if (
            header.page_size != self.page_size
            or header.bitmap_offset + bitmap_length > size
            or header.pages_offset + block.length > size
        ):
            cur.pos = at
            raise cur.error(
                f"{where} does not fit the stream",
                section="ram",
                found=f"page size {header.page_size}, bitmap at {header.bitmap_offset:#x}, pages at {header.pages_offset:#x}",
            )
        bitmap = self.io.pread(header.bitmap_offset, bitmap_length, "mapped-ram bitmap")
        self._materialize(block)
        mapped_ram_pages(block.pages, bitmap, header.pages_offset, self.page_size)
        cur.pos = header.pages_offset + block.length
