"""Read QEMU migration streams (QEVM v3) into the snapfmt model.

Opening walks the whole stream once, front to back: the configuration, every section
(iterative ones split over START/PART/END are merged), the RAM records (recorded as a
page map per block, not read into memory), EOF and the vmdesc after it.  Device sections
carry no length: each ends at its footer (0x7e + section id) followed by a valid next
header.  The vmdesc, once found, describes the device payloads for decoding.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import re
import sys
from array import array
from collections.abc import Callable, Iterator
from typing import Any, Literal

from snapfmt._io import pwrite_all
from snapfmt.errors import FormatError, UnsupportedError
from snapfmt.formats import qemu as qf
from snapfmt.formats.native import ChunkEncoding, SectionKind, xxh3_64
from snapfmt.model import (
    ChunkInfo,
    Configuration,
    DeviceState,
    RamBlock,
    SectionInfo,
    Snapshot,
)
from snapfmt.native.chunks import zero_hash
from snapfmt.paths import Path
from snapfmt.perf import compare as _memcmp
from snapfmt.perf.parallel import forked_map
from snapfmt.qemu.paths import PathMapper

_WINDOW = 1 << 23  # footer searches
_MAP_WINDOW = 1 << 25  # RAM walk: every page of it is touched, so this much is resident
_CURSOR_WINDOW = 1 << 16  # headers and small structures
_IDSTR = re.compile(rb"^[\x21-\x7e]+$")
NOT_SENT, ZERO_PAGE = 0, -1
_STREAK = 8  # records in a row that follow one another before a run is checked at once
_RUN_MIN, _RUN_MAX = 64, 4096  # records checked at once: first, and at most
_SCAN_BLOCK = 16  # pages compared by one memcmp before page by page
_COUNT_STEP = 1 << 20  # page map entries counted at a time
_IOV_MAX = 1024  # iovecs per preadv/pwritev (Linux's IOV_MAX)
_ZERO_RUN = array("q", [ZERO_PAGE]) * _RUN_MAX


class _Windows:
    """Read-only windows on a file for the RAM walk.  Mapped where the file allows it, so
    that only the bytes looked at (record headers, 8 in every 4104) are read from the page
    cache; otherwise filled by preadv."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size, self.length = fd, size, _MAP_WINDOW
        self._map: mmap.mmap | None = None
        self._buf: bytearray | None = None

    def cover(self, pos: int, need: int) -> tuple[Any, int]:
        """(buffer, file offset of its first byte) holding at least [pos, pos + need), or
        up to the end of the file."""
        self.release()
        if self._buf is None:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            length = min(self.length, self.size - base)
            try:
                # Not populated (MADV_POPULATE_READ) although every page of it is looked
                # at: populating walks the pages again one by one after mapping them, and
                # a walk of a 1 GiB stream QEMU had just written took 0.17 s that way
                # against 0.11 s with plain faults (median of 11, alternating).
                self._map = mmap.mmap(self.fd, length, offset=base, access=mmap.ACCESS_READ)
                return self._map, base
            except (OSError, ValueError):
                self._buf = bytearray(max(self.length, need))
        got = os.preadv(self.fd, [self._buf], pos)
        return memoryview(self._buf)[:got], pos

    def release(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _run(buf: Any, rel: int, word: int, page: int, step: int, limit: int) -> int:
    """How many records from ``buf[rel]`` on continue the one there: headers word,
    word + page, word + 2 * page... (the next pages of one block, one kind), each *step*
    bytes long, a zero record's fill byte 0.  At least 1, at most *limit*.

    The headers found are gathered by one strided copy (every header is touched once:
    each lies on its own memory page) and compared with the progression expected as
    one byte string; where they differ, the XOR of the two as big integers gives the
    first differing record.  All of it runs in C."""
    if step == 9:  # zero records: header and fill byte back to back
        width, found = 9, bytes(buf[rel : rel + limit * step])
        wanted = _progression(word << 8, page << 8, limit, 9)
    else:
        width = 8
        with memoryview(buf) as view:
            # (the last record's page may lie past the window: its header is enough)
            found = view[rel : rel + (limit - 1) * step + 8].cast("Q")[:: step // 8].tobytes()
        wanted = _progression(word, page, limit, 8)
    if found == wanted:
        return limit
    diff = int.from_bytes(found, "big") ^ int.from_bytes(wanted, "big")
    return max((len(found) - (diff.bit_length() + 7) // 8) // width, 1)


_SERIES: dict[tuple[int, int, int], tuple[int, int]] = {}  # (width, stride, terms): (R, stride * S)


def _progression(
    first: int, stride: int, n: int, width: int, order: Literal["little", "big"] = "big"
) -> bytes:
    """first, first + stride, ... (n terms, none negative), each *width* bytes in byte
    *order*, made with big-integer arithmetic rather than term by term.  With
    x = 256**width, R = sum(x**i) and S = sum(i * x**i) over at least n terms:
    first * R + stride * S holds the terms from the lowest digit up (little-endian
    bytes in order), and last * R - stride * S holds them from the highest down (so
    big-endian bytes write the first term first); only the low n terms are kept."""
    terms = 1 << max(n - 1, 1).bit_length()  # a few sizes, each kept once made
    series = _SERIES.get((width, stride, terms))
    if series is None:
        ones = int.from_bytes((b"\x01" + bytes(width - 1)) * terms, "little")
        counts = b"".join(i.to_bytes(width, "little") for i in range(terms))
        series = _SERIES[width, stride, terms] = ones, stride * int.from_bytes(counts, "little")
    ones, steps = series
    last = first + (n - 1) * stride
    value = first * ones + steps if order == "little" else last * ones - steps
    return (value & ((1 << (8 * width * n)) - 1)).to_bytes(width * n, order)


def _sent(pages: array) -> int:  # type: ignore[type-arg]
    """How many entries of a page map are file offsets (not NOT_SENT or ZERO_PAGE),
    counted over its bytes in C rather than entry by entry.

    An entry is NOT_SENT when all 8 of its bytes are 0: the OR of the 8 byte planes (as
    big integers) has a 0 byte exactly there.  ZERO_PAGE (-1) is 8 bytes of 0xff, and as
    offsets are positive no other entry has a 0xff top byte, so every run of 0xff bytes
    starts on an entry and counting b"\\xff" * 8 counts exactly the -1 entries."""
    sent = 0
    for first in range(0, len(pages), _COUNT_STEP):  # a piece at a time: bounded memory
        piece = pages[first : first + _COUNT_STEP]
        raw = piece.tobytes()
        merged = 0
        for k in range(8):
            merged |= int.from_bytes(raw[k::8], "big")
        unsent = merged.to_bytes(len(piece), "big").count(b"\0")
        sent += len(piece) - unsent - raw.count(b"\xff" * 8)
    return sent


class _Cursor:
    """Sequential big-endian reads over a file with absolute positions."""

    def __init__(self, reader: Any, start: int = 0) -> None:
        self.io = reader
        self.pos = start
        self._buf = b""
        self._at = 0  # file offset of _buf[0]

    def _fill(self, need: int) -> memoryview:
        rel = self.pos - self._at
        if rel < 0 or rel + need > len(self._buf):
            length = max(need, _CURSOR_WINDOW)
            length = min(length, self.io.size - self.pos)
            if length < need:
                raise self.error(
                    "stream ends early",
                    found=f"{self.io.size - self.pos} bytes left",
                    expected=f"{need}",
                )
            self._buf = self.io.pread(self.pos, length, "stream")
            self._at = self.pos
            rel = 0
        return memoryview(self._buf)[rel : rel + need]

    def error(self, what: str, cls: type[FormatError] = FormatError, **kw: Any) -> FormatError:
        return cls(what, file=self.io.name, offset=self.pos, **kw)

    def take(self, n: int) -> bytes:
        data = bytes(self._fill(n))
        self.pos += n
        return data

    def peek(self, n: int = 1) -> bytes:
        return bytes(self._fill(n)) if self.pos + n <= self.io.size else b""

    def u8(self) -> int:
        return self.take(1)[0]

    def be16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def be32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def be64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def counted(self) -> str:
        return self.take(self.u8()).decode("latin-1")


class _Section:
    """One section of the stream as the walk found it.  (This and _Block are plain
    classes: a dataclass costs a millisecond to define at every start.)"""

    __slots__ = ("header_offset", "idstr", "instance_id", "iterative", "section_id", "spans",
                 "version_id")  # fmt: skip

    def __init__(
        self, section_id: int, idstr: str, instance_id: int, version_id: int, header_offset: int
    ) -> None:
        self.section_id, self.idstr = section_id, idstr
        self.instance_id, self.version_id = instance_id, version_id
        self.header_offset = header_offset
        self.spans: list[tuple[int, int]] = []  # payload (offset, length)
        self.iterative = False


class _Block:
    """One RAM block: its page map says, per page, NOT_SENT, ZERO_PAGE or a file offset."""

    __slots__ = ("host_page_size", "idstr", "length", "pages", "sent")

    def __init__(
        self,
        idstr: str,
        length: int,
        pages: array,  # type: ignore[type-arg]
        host_page_size: int | None = None,  # postcopy streams: blocks in huge pages say it
    ) -> None:
        self.idstr, self.length, self.pages = idstr, length, pages
        self.host_page_size = host_page_size
        self.sent = 0  # pages held in the stream, counted once the walk is over


class QemuStream(Snapshot):
    format_name = "qemu"

    def __init__(
        self, reader: Any, start: int = 0, wrapper: Any = None, origin: str | None = None
    ) -> None:
        self._io = reader
        self.origin = origin or reader.name
        self.wrapper = wrapper  # a wrappers.Wrapper when the stream came inside another file
        if wrapper is not None:
            self.format_name = "libvirt" if wrapper.kind == "libvirt" else "qemu"
        self.file = reader.name
        self.version = "3"
        self.page_size = 4096
        self.machine = ""
        self.capabilities: list[str] = []
        self.uuid: str | None = None
        self.footers: bool | None = None
        self.vmdesc: dict[str, Any] | None = None
        self.vmdesc_offset: int | None = None
        self.commands: list[tuple[int, int]] = []
        self._sections: dict[int, _Section] = {}
        self._order: list[_Section] = []
        self._blocks: dict[str, _Block] = {}
        self._last_block: _Block | None = None
        self._package_end: int | None = None
        self._postcopy: int | None = (
            None  # page sizes in use once POSTCOPY_ADVISE is seen; -1: not said
        )
        self._page_budget = reader.size // 9 + (1 << 20)
        self._windows = _Windows(reader.fd, reader.size)
        self._io_size = reader.size
        self._base = start
        self._cur = _Cursor(reader, start)
        self._walk()
        self._index()

    # -- walking -----------------------------------------------------------------------------

    def _walk(self) -> None:
        cur = self._cur
        if cur.take(4) != qf.MAGIC:
            raise FormatError("not a QEMU stream: bad magic", file=self.file, offset=cur.pos - 4)
        version = cur.be32()
        if version == qf.VERSION_COMPAT:
            raise cur.error(
                "QEMU savevm v2 streams are obsolete and not supported", UnsupportedError
            )
        if version != qf.VERSION:
            raise cur.error(
                "QEMU stream version not supported",
                UnsupportedError,
                found=version,
                expected=qf.VERSION,
            )
        self._walk_sections()
        self._after_eof()

    def _walk_sections(self) -> None:
        """Sections up to and including EOF, or up to the end of a packaged stream."""
        cur = self._cur
        while True:
            at = cur.pos
            if at == self._package_end:  # QEMU's postcopy packages end without an EOF
                return
            kind = cur.u8()
            if kind == qf.SectionType.CONFIGURATION and at == self._base + 8:
                self._configuration()
            elif kind in (qf.SectionType.START, qf.SectionType.FULL):
                self._start(at, kind)
            elif kind in (qf.SectionType.PART, qf.SectionType.END):
                self._part(at)
            elif kind == qf.SectionType.COMMAND:
                self._command(at)
            elif kind == qf.SectionType.EOF:
                return
            else:
                cur.pos = at
                raise cur.error(
                    "unknown section type", found=f"{kind:#04x}", expected="0x00-0x04, 0x07 or 0x08"
                )

    def _configuration(self) -> None:
        cur = self._cur
        length = cur.be32()
        if length > 255:
            raise cur.error(
                "machine type name too long", found=length, expected="at most 255 bytes"
            )
        self.machine = cur.take(length).decode("latin-1")
        while cur.peek() == bytes([qf.SectionType.SUBSECTION]):
            cur.u8()
            name = cur.counted()
            cur.be32()  # version
            if name == "configuration/target-page-bits":
                bits = cur.be32()
                if not 10 <= bits <= 21:
                    raise cur.error("target page bits out of range", found=bits, expected="10-21")
                self.page_size = 1 << bits
            elif name == "configuration/capabilities":
                self.capabilities = [cur.counted() for _ in range(min(cur.be32(), 64))]
            elif name == "configuration/uuid":
                self.uuid = cur.take(16).hex()
            else:
                raise cur.error(f"unknown configuration subsection {name!r}", UnsupportedError)

    def _start(self, at: int, kind: int) -> None:
        cur = self._cur
        section_id = cur.be32()
        raw = cur.take(cur.u8())
        if not _IDSTR.match(raw):
            raise cur.error("section id string is not printable", found=raw[:40])
        section = _Section(section_id, raw.decode("ascii"), cur.be32(), cur.be32(), at)
        section.iterative = kind == qf.SectionType.START
        if section_id in self._sections:
            raise cur.error(f"section id {section_id} ({section.idstr}) appears twice")
        self._sections[section_id] = section
        self._order.append(section)
        self._payload(section)

    def _part(self, at: int) -> None:
        section_id = self._cur.be32()
        section = self._sections.get(section_id)
        if section is None or not section.iterative:
            self._cur.pos = at
            raise self._cur.error("PART/END for a section that has no START", found=section_id)
        self._payload(section)

    def _payload(self, section: _Section) -> None:
        cur = self._cur
        start = cur.pos
        if section.idstr == "ram":
            if section.version_id != 4:
                raise cur.error(
                    "RAM section version not supported",
                    UnsupportedError,
                    section="ram",
                    found=section.version_id,
                    expected=4,
                )
            self._ram(section)
            section.spans.append((start, cur.pos - start))
            self._footer(section)
            return
        end = self._find_footer(section, start)
        section.spans.append((start, end - start))
        cur.pos = end
        self._footer(section)

    def _footer(self, section: _Section) -> None:
        cur = self._cur
        if self.footers is None:
            self.footers = cur.peek() == bytes([qf.SectionType.FOOTER])
        if not self.footers:
            return
        at = cur.pos
        if cur.u8() != qf.SectionType.FOOTER or cur.be32() != section.section_id:
            cur.pos = at
            raise cur.error(
                f"missing section footer for {section.idstr}",
                section=section.idstr,
                expected=f"7e {section.section_id:08x}",
            )

    def _find_footer(self, section: _Section, start: int) -> int:
        """Where the footer after a device payload starts: 0x7e + section id, then a valid
        next section header (QEMU writes no payload length)."""
        if self.footers is False:
            raise self._cur.error(
                "device sections without footers (machine types up to 2.3) are not supported",
                UnsupportedError,
                section=section.idstr,
            )
        needle = bytes([qf.SectionType.FOOTER]) + section.section_id.to_bytes(4, "big")
        pos = start
        size = self._io.size
        chunk = _CURSOR_WINDOW  # most device states are small: start small, then grow
        while pos < size:
            window = self._io.pread(pos, min(chunk, size - pos), "stream")
            chunk = min(2 * chunk, _WINDOW)
            hit = window.find(needle)
            while hit >= 0:
                if self._plausible_next(pos + hit + 5):
                    return int(pos + hit)
                hit = window.find(needle, hit + 1)
            if pos + len(window) >= size:
                break
            pos += len(window) - 4
        raise FormatError(
            "missing section footer",
            file=self.file,
            offset=start,
            section=section.idstr,
            expected=f"7e {section.section_id:08x} after the payload",
        )

    def _plausible_next(self, at: int) -> bool:
        size = self._io.size
        if at == self._package_end:  # the end of a packaged stream: the outer one goes on
            return True
        if at >= size:
            return False
        head = self._io.pread(at, min(300, size - at), "stream")
        kind = head[0]
        if kind == qf.SectionType.EOF:
            if at + 1 == self._package_end:  # the EOF that ends a packaged stream
                return True
            rest = head[1:6]
            return not rest or (rest[0] == qf.SectionType.VMDESCRIPTION and head[6:7] == b"{")
        if kind in (qf.SectionType.START, qf.SectionType.FULL):
            if len(head) < 6 or head[5] == 0 or len(head) < 6 + head[5] + 8:
                return False
            return (
                bool(_IDSTR.match(head[6 : 6 + head[5]]))
                and int.from_bytes(head[1:5], "big") not in self._sections
            )
        if kind in (qf.SectionType.PART, qf.SectionType.END):
            known = self._sections.get(int.from_bytes(head[1:5], "big"))
            return known is not None and known.iterative
        if kind == qf.SectionType.COMMAND:
            return (
                len(head) >= 3
                and int.from_bytes(head[1:3], "big") in qf.Command.__members__.values()
            )
        return False

    def _command(self, at: int) -> None:
        cur = self._cur
        command, length = cur.be16(), cur.be16()
        if command not in qf.Command.__members__.values():
            cur.pos = at
            raise cur.error("unknown command", found=command)
        data = cur.take(length)
        self.commands.append((at, command))
        if command == qf.Command.POSTCOPY_ADVISE:
            # postcopy-ram is on: the block list may carry page sizes.  The long form says
            # which page sizes the source's blocks use (the OR of them all).
            self._postcopy = int.from_bytes(data[:8], "big") if length == 16 else -1
        if command == qf.Command.PACKAGED:
            # postcopy: a be32 length, then that many bytes holding sections up to an EOF
            if length != 4:
                raise cur.error("packaged command with a bad length", found=length, expected=4)
            end = cur.pos + int.from_bytes(data, "big")
            if end > self._io.size:
                raise cur.error(
                    "packaged stream runs past the end of the file", found=f"end {end:#x}"
                )
            if self._package_end is not None:
                raise cur.error("packaged stream inside a packaged stream", UnsupportedError)
            self._package_end = end
            self._walk_sections()
            self._package_end = None
            if cur.pos != end:
                raise cur.error(
                    "packaged stream does not end at its EOF",
                    found=f"{cur.pos:#x}",
                    expected=f"{end:#x}",
                )

    def _after_eof(self) -> None:
        cur = self._cur
        if cur.pos == self._io.size:
            return
        if cur.peek() != bytes([qf.SectionType.VMDESCRIPTION]):
            raise cur.error("bytes after EOF that are not a vmdesc", found=cur.peek().hex())
        cur.u8()
        length = cur.be32()
        at = cur.pos
        if length > self._io.size - at or length > 1 << 26:
            raise cur.error("vmdesc length runs past the end of the stream", found=length)
        try:
            desc = json.loads(cur.take(length))
        except (ValueError, RecursionError) as e:
            raise FormatError(
                "vmdesc is not valid JSON", file=self.file, offset=at, found=str(e)[:80]
            ) from None
        if not isinstance(desc, dict) or not isinstance(desc.get("devices", []), list):
            raise FormatError(
                "vmdesc is not an object with a device list", file=self.file, offset=at
            )
        self.vmdesc, self.vmdesc_offset = desc, at
        if cur.pos != self._io.size:
            raise cur.error("bytes after the vmdesc", found=f"{self._io.size - cur.pos} bytes")

    # -- RAM ---------------------------------------------------------------------------------

    def _ram(self, section: _Section) -> None:
        """RAM records up to EOS; pages are recorded by file offset, not read.

        The hot path -- CONTINUE records of a whole or zero page, nearly every record of
        a stream -- reads headers straight from a mapped window with one struct call
        each, and once a few records in a row follow one another (the next page of the
        same block, the same kind) checks a whole run of them at once (:func:`_run`).
        Only the 8-byte headers are looked at, never the pages.  Any other record goes
        through _ram_record."""
        io = self._io
        page = self.page_size
        mask, shift = page - 1, page.bit_length() - 1
        whole = int(qf.RamFlag.CONTINUE | qf.RamFlag.PAGE)
        zero = int(qf.RamFlag.CONTINUE | qf.RamFlag.ZERO)
        unpack = qf.RAM_WORD.unpack_from
        block = self._last_block  # CONTINUE may refer to a block named in an earlier section
        pages = block.pages if block else array("q")
        pos = self._cur.pos
        window = self._windows
        buf, base = window.cover(pos, 9)
        end = base + len(buf)
        expect, streak, probe = -1, 0, _RUN_MIN
        while True:
            if pos > io.size:  # the last page record went past the end of the file
                self._cur.pos = io.size
                raise self._cur.error("stream ends inside the RAM section", section="ram")
            if (pos + 9 > end or pos < base) and pos + 9 <= io.size:
                # (a mapped-ram block list may move the stream on, or back)
                buf, base = window.cover(pos, 9)
                end = base + len(buf)
            # fewer than 9 bytes left (an EOS last, or a cut stream): the careful path
            word = unpack(buf, pos - base)[0] if base <= pos and pos + 9 <= end else -1
            flags = word & mask
            if word >= 0 and (flags == whole or (flags == zero and buf[pos - base + 8] == 0)):
                index = word >> shift
                if index < len(pages):
                    streak = streak + 1 if word == expect else 0
                    if streak < _STREAK:
                        pages[index] = pos + 8 if flags == whole else ZERO_PAGE
                        pos += 8 + page if flags == whole else 9
                        expect = word + page
                        continue
                    # a run: the next records are likely the next pages, same kind
                    step = 8 + page if flags == whole else 9
                    limit = min(probe, len(pages) - index, (end - pos - 9) // step + 1)
                    count = _run(buf, pos - base, word, page, step, limit)
                    if flags == whole:
                        where = _progression(pos + 8, step, count, 8, sys.byteorder)
                        pages[index : index + count] = array("q", where)
                    else:
                        pages[index : index + count] = _ZERO_RUN[:count]  # count <= _RUN_MAX
                    pos += count * step
                    expect = word + count * page
                    probe = min(probe * 2, _RUN_MAX) if count == limit else _RUN_MIN
                    streak = 0
                    continue
            self._cur.pos = pos
            block, done = self._ram_record(block)
            pages = block.pages if block else array("q")
            pos = self._cur.pos
            expect, streak = -1, 0
            if done:
                self._last_block = block
                window.release()
                return

    def _ram_record(self, block: _Block | None) -> tuple[_Block | None, bool]:
        """One RAM record at the cursor, the careful way; returns (block, reached EOS)."""
        cur = self._cur
        page = self.page_size
        at = cur.pos
        word = cur.be64()
        flags, offset = word & (page - 1), word & ~(page - 1)
        unsupported = (
            qf.RamFlag.XBZRLE | qf.RamFlag.COMPRESS_PAGE | qf.RamFlag.HOOK | qf.RamFlag.FULL
        )
        if flags & ~qf.RAM_FLAGS_MASK:
            cur.pos = at
            raise cur.error("RAM record flags out of range", section="ram", found=f"{flags:#x}")
        if flags & qf.RamFlag.MEM_SIZE:
            self._mem_size(offset)
            return block, False
        if flags & qf.RamFlag.EOS:
            return block, True
        if flags == qf.RamFlag.MULTIFD_FLUSH:
            return block, False
        if flags & unsupported:
            cur.pos = at
            name = qf.RamFlag(flags & unsupported).name
            raise cur.error(
                f"RAM records of kind {name} are not supported", UnsupportedError, section="ram"
            )
        if not flags & qf.RamFlag.CONTINUE:
            idstr = cur.counted()
            block = self._blocks.get(idstr)
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
        if flags & qf.RamFlag.ZERO:
            fill = cur.u8()
            if fill:
                raise cur.error("zero page with a non-zero fill byte", section="ram", found=fill)
            block.pages[index] = ZERO_PAGE
        elif flags & qf.RamFlag.PAGE:
            block.pages[index] = cur.pos
            cur.pos += page
            if cur.pos > self._io.size:
                cur.pos = self._io.size  # where the file ends
                raise cur.error("stream ends inside a RAM page", section="ram")
        else:
            cur.pos = at
            raise cur.error(
                "RAM record with neither ZERO nor PAGE", section="ram", found=f"{flags:#x}"
            )
        return block, False

    def _mem_size(self, total: int) -> None:
        """The block list of the RAM section's setup; it ends when the lengths add up to
        the total (not at a zero name length)."""
        cur = self._cur
        mapped = "mapped-ram" in self.capabilities
        seen = 0
        while seen < total:
            at = cur.pos
            idstr = cur.counted()
            length = cur.be64()
            if (
                not idstr
                or length % self.page_size
                or seen + length > total
                or idstr in self._blocks
            ):
                cur.pos = at
                raise cur.error(
                    "bad RAM block list entry", section="ram", found=f"{idstr!r} {length:#x}"
                )
            host_page = self._host_page_size()
            if "x-ignore-shared" in self.capabilities:
                cur.be64()  # the block's guest address (read before a mapped-ram header)
            block = _Block(
                idstr, length, array("q"), host_page
            )  # page map made when a page arrives
            self._blocks[idstr] = block
            if mapped:
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
        cur = self._cur
        ahead = cur.peek(8)
        if len(ahead) < 8:
            return None
        size = int.from_bytes(ahead, "big")
        in_use = self._postcopy if self._postcopy > 0 else size
        if size > self.page_size and size & (size - 1) == 0 and size <= 1 << 34 and size & in_use:
            cur.pos += 8
            return size
        return None

    def _materialize(self, block: _Block) -> None:
        """Make a block's page map (8 bytes a page) when its first page arrives.

        QEMU sends every page of a block it sends at all (or, with mapped-ram, stores
        them in a file as large as the block), so maps beyond what the file could hold
        come from a hostile declaration: refused before allocating.  Blocks that never
        get a page (x-ignore-shared) cost nothing."""
        if len(block.pages) or not block.length:
            return
        count = block.length // self.page_size
        self._page_budget -= count
        if self._page_budget < 0:
            raise self._cur.error(f"RAM block {block.idstr} declares more RAM than the stream could hold", section="ram",
                                  found=f"{block.length:#x} bytes")  # fmt: skip
        block.pages = array("q", bytes(8 * count))

    def _mapped_ram(self, block: _Block) -> None:
        """mapped-ram: a header, a bitmap of the pages present (host unsigned longs,
        little-endian on x86) and every page at a fixed offset; the stream goes on after
        the block's page area."""
        cur = self._cur
        at = cur.pos
        version, page_size, bitmap_offset, pages_offset = qf.MAPPED_RAM_HEADER.unpack(
            cur.take(qf.MAPPED_RAM_HEADER.size)
        )
        where = f"mapped-ram header of {block.idstr}"
        if version != 1:
            cur.pos = at
            raise cur.error(
                f"{where}: version not supported",
                UnsupportedError,
                section="ram",
                found=version,
                expected=1,
            )
        if bitmap_offset == 0 and pages_offset == 0:  # a block skipped by x-ignore-shared
            return
        pages = block.length // self.page_size
        bitmap_length = -(-pages // 64) * 8
        size = self._io.size
        if (
            page_size != self.page_size
            or bitmap_offset + bitmap_length > size
            or pages_offset + block.length > size
        ):
            cur.pos = at
            raise cur.error(
                f"{where} does not fit the stream",
                section="ram",
                found=f"page size {page_size}, bitmap at {bitmap_offset:#x}, pages at {pages_offset:#x}",
            )
        bitmap = self._io.pread(bitmap_offset, bitmap_length, "mapped-ram bitmap")
        self._materialize(block)
        for byte_index, byte in enumerate(bitmap):  # host longs, little-endian: bit i = page i
            if byte:
                for bit in range(8):
                    index = byte_index * 8 + bit
                    if byte >> bit & 1 and index < pages:
                        block.pages[index] = pages_offset + index * page_size
        cur.pos = pages_offset + block.length

    # -- model -------------------------------------------------------------------------------

    def _index(self) -> None:
        mapper = PathMapper(
            self.machine, [(s.idstr, s.instance_id) for s in self._order if s.idstr != "ram"]
        )
        self._device_paths: dict[str, _Section] = {}
        self._block_paths: dict[str, _Block] = {}
        described = {}
        for d in (self.vmdesc or {}).get("devices", []):
            if (
                isinstance(d, dict)
                and isinstance(d.get("name"), str)
                and isinstance(d.get("instance_id"), int)
            ):
                described[(d["name"], d["instance_id"])] = d
        self._layouts: dict[int, dict[str, Any]] = {}
        infos = []
        for s in self._order:
            if s.idstr == "ram":
                continue
            path = str(mapper.section(s.idstr, s.instance_id))
            if path in self._device_paths:  # two identities, one path: keep both apart
                path = str(mapper.fallback_section(s.idstr, s.instance_id))
            if path in self._device_paths:
                raise FormatError(
                    f"two sections map to {path}",
                    file=self.file,
                    offset=s.header_offset,
                    section=s.idstr,
                )
            self._device_paths[path] = s
            desc = described.get((s.idstr, s.instance_id))
            if desc is not None:
                self._layouts[s.section_id] = desc
            size = sum(n for _, n in s.spans)
            infos.append(SectionInfo(SectionKind.DEVICE, path, s.spans[0][0], size, size, size))
        for b in self._blocks.values():
            path = str(mapper.ram_block(b.idstr))
            if path in self._device_paths or path in self._block_paths:
                path = str(mapper.fallback_ram_block(b.idstr))
            if path in self._device_paths or path in self._block_paths:
                raise FormatError(f"two sections map to {path}", file=self.file, section=b.idstr)
            self._block_paths[path] = b
            b.sent = _sent(b.pages)
            stored = b.sent * self.page_size
            infos.append(SectionInfo(SectionKind.RAM_BLOCK, path, 0, 0, b.length, stored))
        self._infos = infos

    @property
    def configuration(self) -> Configuration:
        meta: dict[str, Any] = {}
        if self.uuid:
            meta["uuid"] = self.uuid
        return Configuration(self.machine, self.page_size, tuple(self.capabilities), meta)

    @property
    def sections(self) -> list[SectionInfo]:
        return list(self._infos)

    def section_record(self, path: Path) -> _Section:
        return self._device_paths[str(path)]

    def iterative_devices(self) -> list[str]:
        """Id strings of iterative sections other than RAM (block migration, dirty
        bitmaps): their parts are merged when read, and cannot be written back as one."""
        return [s.idstr for s in self._order if s.iterative and s.idstr != "ram"]

    def layout_entry(self, path: Path) -> dict[str, Any] | None:
        """The vmdesc entry describing the device section at *path*, if any."""
        return self._layouts.get(self._device_paths[str(path)].section_id)

    def device(self, path: Path) -> DeviceState:
        s = self._device_paths[str(path)]
        data = b"".join(self._io.pread(off, n, "section payload") for off, n in s.spans)
        desc = self._layouts.get(s.section_id)
        name = (
            desc.get("vmsd_name", s.idstr.rpartition("/")[2])
            if desc
            else s.idstr.rpartition("/")[2]
        )
        layout = (
            {"fields": desc.get("fields", []), "subsections": desc.get("subsections", [])}
            if desc
            else None
        )
        return DeviceState(
            path,
            path.parent.leaf.name if path.parent else name,
            str(name),
            s.instance_id,
            s.version_id,
            data,
            layout,
            s.idstr,
            s.spans[0][0],
        )

    def ram_block(self, path: Path) -> QemuRamBlock:
        b = self._block_paths[str(path)]
        return QemuRamBlock(self, path, b)

    def metadata(self, name: str) -> Any:
        raise KeyError(name)

    def aliases(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path, s in self._device_paths.items():
            found.setdefault(s.idstr, Path.parse(path))
        for path, b in self._block_paths.items():
            found.setdefault(b.idstr, Path.parse(path))
        return found

    def pread(self, offset: int, length: int, what: str) -> bytes:
        return bytes(self._io.pread(offset, length, what))

    @property
    def fd(self) -> int:
        return int(self._io.fd)

    def close(self) -> None:
        self._io.close()

    def __getstate__(self) -> dict[str, Any]:
        """For a stream walked in another process (reader.open_pair): all but the file,
        which the receiving side attaches again with :meth:`attach`."""
        if self.wrapper is not None:
            raise TypeError("a stream inside another file cannot move between processes")
        state = self.__dict__.copy()
        for key in ("_io", "_cur", "_windows"):
            del state[key]
        return state

    def attach(self, reader: Any) -> None:
        """Give a stream that came from another process its file again: *reader* must be
        the one it was walked over (the same open file, inherited).  A stream that never
        left this process keeps its file."""
        if "_io" in self.__dict__:
            return
        if os.fstat(reader.fd).st_size != self._io_size:
            raise FormatError("the stream changed while it was read", file=reader.name)
        self._io, self._cur, self._windows = (
            reader,
            _Cursor(reader),
            _Windows(reader.fd, reader.size),
        )


class _Unsent:
    """The page map of a block no page was sent for, without allocating one."""

    def __init__(self, count: int) -> None:
        self.count_ = count

    def __len__(self) -> int:
        return self.count_

    def __getitem__(self, index: slice) -> array:  # type: ignore[type-arg]
        return array("q", bytes(8 * len(range(*index.indices(self.count_)))))

    def __iter__(self) -> Iterator[int]:
        return iter(itertools.repeat(NOT_SENT, self.count_))


def _runs(where: array, step: int) -> Iterator[tuple[int, int, int]]:  # type: ignore[type-arg]
    """Split a page map slice into runs (i, j, w): entries [i, j) are either records
    one after another in the stream, the first at offset w > 0 (each *step* bytes on from
    the one before), or all one of NOT_SENT or ZERO_PAGE (w is that value).

    Short runs are followed entry by entry; once a run is 8 long it is extended by
    comparing whole stretches of the map's bytes with what the run would hold, in C."""
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
            probe = 64
            while j < n:
                size = min(probe, n - j)
                if w > 0:
                    expected = _progression(nxt, step, size, 8, sys.byteorder)
                else:
                    expected = (array("q", [w]) * size).tobytes()
                found = raw[8 * j : 8 * (j + size)]
                if found == expected:
                    j += size
                    nxt += size * step if w > 0 else 0
                    probe *= 8
                    continue
                diff = int.from_bytes(found, "big") ^ int.from_bytes(expected, "big")
                j += (len(found) - (diff.bit_length() + 7) // 8) // 8
                break
        yield i, j, w
        i = j


class _Gather:
    """A reused buffer of *per* pages and the iovecs to scatter page records into it."""

    def __init__(self, stream: QemuStream, page: int, per: int) -> None:
        self.stream, self.page, self.step = stream, page, page + 8
        self.view = memoryview(bytearray(per * page))
        self.blank = memoryview(bytes(per * page))
        sink = bytearray(8)  # the header between two pages of a run lands here
        self.iov: list[Any] = []
        for i in range(per):
            self.iov += (self.view[i * page : (i + 1) * page], sink)

    def fill(self, where: array) -> None:  # type: ignore[type-arg]
        """Read the pages *where* names (file offsets, or <= 0 for zero) into the buffer."""
        page, view = self.page, self.view
        for i, j, w in _runs(where, self.step):
            if w > 0:
                self._scatter(i, j, w)
            else:
                view[i * page : j * page] = self.blank[: (j - i) * page]

    def _scatter(self, first: int, stop: int, where: int) -> None:
        """Read the run of page records for buffer pages [first, stop), the first page at
        file offset *where*: one preadv per IOV_MAX iovecs (page, sink, page...)."""
        step = self.step
        for a in range(first, stop, _IOV_MAX // 2):
            b = min(a + _IOV_MAX // 2, stop)
            offset = where + (a - first) * step
            want = (b - a) * step - 8
            got = os.preadv(self.stream.fd, self.iov[2 * a : 2 * b - 1], offset)
            if got != want:
                raise FormatError(
                    "stream ends inside a RAM page", file=self.stream.file, offset=offset + got
                )


class QemuRamBlock(RamBlock):
    """A RAM block of a QEMU stream, read through its page map (pages sent last win)."""

    def __init__(self, stream: QemuStream, path: Path, block: _Block) -> None:
        self._stream = stream
        self._block = block
        # a block no page was sent for (x-ignore-shared) has no map: all of it reads as zero
        self._pages: Any = (
            block.pages if len(block.pages) else _Unsent(block.length // stream.page_size)
        )
        self.path = path
        self.qemu_idstr = block.idstr
        # postcopy streams only: the page size of a block in huge pages, as the source said
        self.host_page_size = block.host_page_size
        self.length = block.length
        self.page_size = stream.page_size
        self.chunk_size = stream.page_size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range {offset:#x}+{length:#x} is outside {self.path}")
        if not length:
            return b""
        page = self.page_size
        first, last = offset // page, (offset + length + page - 1) // page
        gather = _Gather(self._stream, page, last - first)
        gather.fill(self._pages[first:last])
        skip = offset - first * page
        return bytes(gather.view[skip : skip + length])

    def summary(self) -> tuple[int, int, int]:
        pages, sent = self._pages, self._block.sent
        return len(pages), len(pages) - sent, sent * self.page_size

    def iter_spans(self, span: int = 1 << 22) -> Iterator[tuple[int, memoryview]]:
        """The whole block in order, read into one reused buffer: each view is valid
        until the next step of the iteration.

        Pages sent one after another (the usual case) are one run of records, read by
        one scattering preadv per 512 pages: each page lands in its place in the buffer,
        each header between two pages in an 8-byte sink.  No page is copied by Python."""
        page = self.page_size
        per = max(1, span // page)
        gather = _Gather(self._stream, page, per)
        pages = self._pages
        for first in range(0, len(pages), per):
            where = pages[first : first + per]
            gather.fill(where)
            yield first * page, gather.view[: len(where) * page].toreadonly()

    def write_into(self, fd: int, progress: Callable[[int], None] | None = None) -> None:
        """As RamBlock.write_into, with zero and unsent pages known from the page map:
        spans of them are holes without being looked at."""
        page = self.page_size
        per = (1 << 22) // page
        gather = _Gather(self._stream, page, per)
        pages = self._pages
        for first in range(0, len(pages), per):
            where = pages[first : first + per]
            n = len(where)
            if max(where) > 0:
                gather.fill(where)
                pwrite_all(fd, [gather.view[: n * page]], first * page)
            if progress:
                progress(n * page)
        os.ftruncate(fd, self.length)

    def chunks(self) -> Iterator[ChunkInfo]:
        page = self.page_size
        for index, where in enumerate(self._pages):
            if where <= 0:
                yield ChunkInfo(
                    index, index * page, page, ChunkEncoding.ZERO, 0, 0, zero_hash(page)
                )
            else:
                yield ChunkInfo(
                    index,
                    index * page,
                    page,
                    ChunkEncoding.RAW,
                    page,
                    where,
                    xxh3_64(self._stream.pread(where, page, "RAM page")),
                )


def differing_pages(
    a: QemuRamBlock, b: QemuRamBlock, length: int, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, int, int]]:
    """(offset, size, bytes that differ) for each page of [0, *length*) that differs, in
    order, for two blocks of one page size.

    Both page maps are split into runs (:func:`_runs`).  Where both sides are runs of
    records, the runs are compared in the mapped streams with memcmp, 16 pages at a
    time and the headers between them included (within a run they are alike on both
    sides: the next page of the block, of one kind), then page by page where a block
    differs (:func:`_scan`).  A zero page is compared with zeros.  A span whose pages lie
    far apart in either stream is read into buffers instead.

    The cost is page faults and memory reads, so the 4 MiB spans are shared with a
    forked process (:func:`forked_map`); threads were slower here, their page faults
    queueing for one address space."""
    page = a.page_size
    step = page + 8
    per = (1 << 22) // page
    count = length // page

    def span(first: int) -> list[tuple[int, int, int]]:
        n = min(per, count - first)
        runs_a = list(_runs(a._pages[first : first + n], step))
        runs_b = list(_runs(b._pages[first : first + n], step))
        ext_a, ext_b = _extent(runs_a, step), _extent(runs_b, step)
        if ext_a is None and ext_b is None:
            return []  # zero on both sides
        if _memcmp.AVAILABLE and _compact(ext_a, n, step) and _compact(ext_b, n, step):
            try:
                return [
                    (offset, len(pa), _memcmp.changed(pa, pb))
                    for offset, pa, pb in _differing_mapped(
                        a, b, first, runs_a, runs_b, ext_a, ext_b
                    )
                ]
            except OSError:  # a file that cannot be mapped (some FUSE and 9p mounts)
                pass
        return _differing_copies(a, b, first, n)

    starts = range(0, count, per)
    for first, changes in zip(starts, forked_map(span, starts), strict=True):
        yield from changes
        if progress:
            progress(min(per, count - first) * page)


def _extent(runs: list[tuple[int, int, int]], step: int) -> tuple[int, int] | None:
    """The stream range [lo, hi) holding the pages of *runs*, None if none was sent."""
    sent = [(w, w + (j - i) * step - 8) for i, j, w in runs if w > 0]
    return (min(lo for lo, _ in sent), max(hi for _, hi in sent)) if sent else None


def _compact(extent: tuple[int, int] | None, n: int, step: int) -> bool:
    return extent is None or extent[1] - extent[0] <= 4 * n * step


def _differing_mapped(
    a: QemuRamBlock,
    b: QemuRamBlock,
    first: int,
    runs_a: list[tuple[int, int, int]],
    runs_b: list[tuple[int, int, int]],
    ext_a: tuple[int, int] | None,
    ext_b: tuple[int, int] | None,
) -> Iterator[tuple[int, bytes, bytes]]:
    page = a.page_size
    step = page + 8
    zero = bytes(page)
    zero_at = _memcmp.zero_address(page)
    with contextlib.ExitStack() as stack:
        map_a = stack.enter_context(_memcmp.Mapped(a._stream.fd, *ext_a)) if ext_a else None
        map_b = stack.enter_context(_memcmp.Mapped(b._stream.fd, *ext_b)) if ext_b else None
        ia = ib = s = 0
        n = runs_a[-1][1]
        while s < n:
            i0, j0, w0 = runs_a[ia]
            i1, j1, w1 = runs_b[ib]
            e = min(j0, j1)
            at_a = map_a.address(w0 + (s - i0) * step) if map_a and w0 > 0 else None
            at_b = map_b.address(w1 + (s - i1) * step) if map_b and w1 > 0 else None
            if at_a is None and at_b is None:
                pass
            elif at_a is None or at_b is None:
                sent = at_b if at_a is None else at_a
                assert sent is not None
                for k in range(e - s):  # data against zeros: page by page
                    if not _memcmp.memcmp(sent + k * step, zero_at, page):
                        data = _memcmp.string_at(sent + k * step, page)
                        pair = (zero, data) if at_a is None else (data, zero)
                        yield (first + s + k) * page, *pair
            else:
                for k in _scan(at_a, at_b, e - s, page, step):
                    yield (
                        (first + s + k) * page,
                        _memcmp.string_at(at_a + k * step, page),
                        _memcmp.string_at(at_b + k * step, page),
                    )
            s = e
            ia += j0 == e
            ib += j1 == e


def _scan(at_a: int, at_b: int, count: int, page: int, step: int) -> Iterator[int]:
    """Indexes of the pages that differ between two runs of *count* records mapped at
    *at_a* and *at_b*: blocks of 16 pages are compared with one memcmp each (headers
    between their pages included), the 4-page quarters of a differing block, then the
    pages of a differing quarter one by one."""
    for lo in range(0, count, _SCAN_BLOCK):
        hi = min(lo + _SCAN_BLOCK, count)
        if _memcmp.memcmp(at_a + lo * step, at_b + lo * step, (hi - lo) * step - 8):
            continue
        for qlo in range(lo, hi, 4):
            qhi = min(qlo + 4, hi)
            if _memcmp.memcmp(at_a + qlo * step, at_b + qlo * step, (qhi - qlo) * step - 8):
                continue
            for k in range(qlo, qhi):
                if not _memcmp.memcmp(at_a + k * step, at_b + k * step, page):
                    yield k


def _differing_copies(
    a: QemuRamBlock, b: QemuRamBlock, first: int, n: int
) -> list[tuple[int, int, int]]:
    """Pages [first, first + n) of both blocks read into buffers, then compared."""
    page = a.page_size
    left, right = _Gather(a._stream, page, n), _Gather(b._stream, page, n)
    left.fill(a._pages[first : first + n])
    right.fill(b._pages[first : first + n])
    held = left.view.obj
    assert isinstance(held, bytearray)
    return _memcmp.page_changes(first * page, held, right.view, page)
