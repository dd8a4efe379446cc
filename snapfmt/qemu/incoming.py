"""Split a QEMU migration stream read once from a pipe: RAM pages out as they come, the
rest kept as a small stream of its own.

`snapfmt save` reads the stream QEMU migrates into a pipe.  The RAM section's records --
nearly every byte -- are parsed here as they arrive and handed on page by page, in the
order QEMU sends them (block by block, each block's pages in order, for a stopped VM);
everything else (header, configuration, the RAM section's block list, commands, device
sections, EOF and vmdesc) is copied into a **skeleton**: a valid stream with no pages,
which the ordinary reader (snapfmt.qemu.snapshot) then opens for the device state.
Every structure is parsed with its declaration in snapfmt.formats.qemu.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
from collections.abc import Iterator
from typing import Any, NamedTuple

from snapfmt._io import parse
from snapfmt.errors import FormatError, TruncatedError, UnsupportedError
from snapfmt.formats import qemu as qf

MAX_SKELETON = 1 << 28  # bytes of non-RAM stream kept: device state is far smaller
READ = 1 << 22  # bytes read from the pipe at a time
_F_SETPIPE_SZ = 1031  # fcntl: a pipe's capacity (Linux)
_WORD = qf.RAM_WORD  # a record's be64 (offset | flags)
# plain ints for the hot path (IntFlag operations cost a method call each)
_FLAGS = qf.RAM_FLAGS_MASK
_REFUSED = int(qf.RamFlag.XBZRLE | qf.RamFlag.COMPRESS_PAGE | qf.RamFlag.HOOK | qf.RamFlag.FULL)
_ZERO, _PAGE, _MEM_SIZE = int(qf.RamFlag.ZERO), int(qf.RamFlag.PAGE), int(qf.RamFlag.MEM_SIZE)
_EOS, _CONTINUE = int(qf.RamFlag.EOS), int(qf.RamFlag.CONTINUE)
_MULTIFD_FLUSH = int(qf.RamFlag.MULTIFD_FLUSH)
_WHOLE, _ZEROES = _CONTINUE | _PAGE, _CONTINUE | _ZERO


class Page(NamedTuple):
    """A run of page records of one block: its offset, and its bytes (None: *length*
    bytes of *fill*, zero pages)."""

    block: str
    offset: int
    data: bytes | None
    length: int
    fill: int = 0


class Splitter:
    """``for page in Splitter(pipe).pages(): ...`` then ``.skeleton`` and ``.blocks``."""

    def __init__(self, stream: io.RawIOBase | io.BufferedReader[Any] | io.BytesIO,
                 name: str = "the migration stream") -> None:  # fmt: skip
        self._in = stream
        self._buf = bytearray(READ)  # read and not yet taken: _buf[_at:_end]; reused
        self._at = self._end = 0
        self.name = name
        self.pos = 0
        self.skeleton = bytearray()
        self.blocks: dict[str, int] = {}  # RAM block id string -> length, in list order
        self.page_size = 4096
        self.machine = ""
        self.capabilities: list[str] = []
        self.uuid: str | None = None
        self._ram_id: int | None = None
        self._block: str | None = None

    # -- reading -----------------------------------------------------------------------------

    def _more(self, n: int) -> bool:
        """At least *n* bytes ready in the buffer, read straight into it (what is left
        of the last read moved to its front first: less than a record); False when the
        stream ends first."""
        while self._end - self._at < n:
            left = self._end - self._at
            if self._at:
                self._buf[:left] = self._buf[self._at : self._end]
                self._at, self._end = 0, left
            if len(self._buf) < n:  # (a page larger than a read: pages of up to 2 MiB)
                self._buf.extend(bytes(n - len(self._buf)))
            got = self._fill(memoryview(self._buf)[self._end :])
            if not got:
                return False
            self._end += got
        return True

    def _fill(self, space: memoryview) -> int:
        """Read into *space* (released after: the buffer may grow later)."""
        with space:
            readinto = getattr(self._in, "readinto", None)
            if readinto is not None:
                return int(readinto(space) or 0)
            piece = self._in.read(len(space))[: len(space)]
            space[: len(piece)] = piece
            return len(piece)

    def _take(self, n: int, keep: bool = True) -> bytes:
        if not self._more(n):
            raise TruncatedError("the stream ends early (did QEMU stop?)", file=self.name,
                                 offset=self.pos + self._end - self._at)  # fmt: skip
        data = bytes(self._buf[self._at : self._at + n])
        self._at += n
        self.pos += n
        if keep:
            self._keep(data)
        return data

    def _peek(self) -> int | None:
        return self._buf[self._at] if self._more(1) else None

    def _keep(self, data: bytes | memoryview) -> None:
        self.skeleton += data
        if len(self.skeleton) > MAX_SKELETON:
            raise FormatError(f"more than {MAX_SKELETON} bytes of device state", file=self.name,
                              offset=self.pos)  # fmt: skip

    def _parse(self, con: Any, size: int, what: str, keep: bool = True) -> Any:
        return parse(con, self._take(size, keep), file=self.name, offset=self.pos - size, what=what)

    def _counted(self, keep: bool = True) -> str:
        length = self._take(1, keep)[0]
        return self._take(length, keep).decode("latin-1")

    def _error(self, what: str, cls: type[FormatError] = FormatError, **kw: Any) -> FormatError:
        return cls(what, file=self.name, offset=self.pos, **kw)

    # -- the stream --------------------------------------------------------------------------

    def pages(self) -> Iterator[Page]:
        """Every page record, in stream order; the skeleton is complete when it ends."""
        head = self._parse(qf.FileHeader, 8, "stream header")
        if head.version != qf.VERSION:
            raise self._error("stream version not supported", UnsupportedError,
                              found=head.version, expected=qf.VERSION)  # fmt: skip
        while True:
            kind = self._take(1)[0]
            if kind == qf.SectionType.CONFIGURATION:
                self._configuration()
            elif kind == qf.SectionType.START:
                yield from self._start()
            elif kind in (qf.SectionType.PART, qf.SectionType.END):
                section_id = self._parse(qf.SectionPartEnd, 4, "section header").section_id
                if section_id != self._ram_id:
                    raise self._error("an iterative section other than RAM", UnsupportedError)
                yield from self._records()
                self._footer()
            elif kind == qf.SectionType.COMMAND:
                head = self._parse(qf.CommandHead, 4, "command")
                self._take(head.length)
            else:  # FULL sections, EOF and the vmdesc: no RAM follows; kept as they are
                rest: bytes | memoryview = bytes(self._buf[self._at : self._end])
                self._at = self._end = 0
                while rest:
                    self.pos += len(rest)
                    self._keep(rest)
                    rest = self._in.read(READ)
                return

    def _configuration(self) -> None:
        length = int.from_bytes(self._take(4), "big")
        if length > 255:
            raise self._error("machine type name too long", found=length)
        self.machine = self._take(length).decode("latin-1")
        while True:
            if self._peek() != qf.SectionType.SUBSECTION:
                return
            self._take(1)
            name = self._counted()
            self._take(4)  # version
            if name == "configuration/target-page-bits":
                bits = int.from_bytes(self._take(4), "big")
                if not 10 <= bits <= 21:
                    raise self._error("target page bits out of range", found=bits)
                self.page_size = 1 << bits
            elif name == "configuration/capabilities":
                for _ in range(int.from_bytes(self._take(4), "big")):
                    self.capabilities.append(self._counted())
            elif name == "configuration/uuid":
                self.uuid = self._take(16).hex()
            else:
                raise self._error(f"unknown configuration subsection {name!r}", UnsupportedError)

    def _start(self) -> Iterator[Page]:
        section_id = int.from_bytes(self._take(4), "big")
        idstr = self._counted()
        self._take(8)  # instance and version ids
        if idstr != "ram":
            raise self._error(f"iterative section {idstr!r}: only RAM is supported",
                              UnsupportedError)  # fmt: skip
        self._ram_id = section_id
        yield from self._records()
        self._footer()

    def _footer(self) -> None:
        if self._peek() == qf.SectionType.FOOTER:
            self._take(5)

    def _records(self) -> Iterator[Page]:
        """RAM records up to EOS: the block list and EOS are kept, pages handed on, a run
        of CONTINUE records of whole or zero pages at once (nearly every record)."""
        page = self.page_size
        while True:
            self._more(8 + page)  # (as much as is there: _take says when it is too little)
            if self._block is not None:
                run = self._run(page)
                if run is not None:
                    yield run
                    continue
            raw = self._take(8, keep=False)
            word = int.from_bytes(raw, "big")
            flags, address = word & _FLAGS, word & ~_FLAGS
            if flags & _REFUSED:
                raise self._error(f"RAM record flags {flags:#x} (xbzrle, compression or RDMA) "
                                  "are not supported by save", UnsupportedError)  # fmt: skip
            if flags & _MEM_SIZE:
                self._keep(raw)
                self._block_list(address)
                continue
            if flags & _EOS:
                self._keep(raw)
                return
            if flags & _MULTIFD_FLUSH:
                continue
            if not flags & (_ZERO | _PAGE):
                raise self._error(f"RAM record with flags {flags:#x}")
            if not flags & _CONTINUE:
                self._block = self._counted(keep=False)
            if self._block not in self.blocks:
                raise self._error(f"a page of {self._block!r}, a block not in the list")
            self._check(address, page)
            if flags & _PAGE:
                yield Page(self._block, address, self._take(page, keep=False), page)
            else:
                yield Page(self._block, address, None, page, self._take(1, keep=False)[0])

    def _check(self, address: int, length: int) -> None:
        assert self._block is not None
        if address + length > self.blocks[self._block]:
            raise self._error(f"page {address:#x} is past the end of {self._block}")

    def _run(self, page: int) -> Page | None:
        """The CONTINUE records of whole pages, or of zero pages, that follow one another
        from here in the buffer, as one Page; None when the next record is another kind."""
        buf, at, end = self._buf, self._at, self._end
        if end - at < 9:
            return None
        word = _WORD.unpack_from(buf, at)[0]
        kind, start = word & _FLAGS, word & ~_FLAGS
        whole = kind == _WHOLE
        if whole:
            step = 8 + page
        elif kind == _ZEROES and buf[at + 8] == 0:
            step = 9
        else:
            return None
        first, expect = at, start
        while at + step <= end:
            word = _WORD.unpack_from(buf, at)[0]
            if word != expect | kind or (not whole and buf[at + 8]):
                break
            at += step
            expect += page
        if expect == start:
            return None
        self._check(start, expect - start)
        self.pos += at - self._at
        self._at = at
        assert self._block is not None
        data = None
        if whole:  # the pages without their headers, copied once
            with memoryview(buf) as view:
                data = b"".join([view[i + 8 : i + step] for i in range(first, at, step)])
        return Page(self._block, start, data, expect - start)

    def _block_list(self, total: int) -> None:
        while total > 0:
            name = self._counted()
            length = int.from_bytes(self._take(8), "big")
            if length > total:
                raise self._error(f"block {name} is longer than the list's total")
            self.blocks[name] = length
            total -= length


def pipe_reader(fd: int) -> io.FileIO:
    """The read end of the pipe QEMU migrates into, enlarged where the kernel allows (to
    1 MiB: QEMU waits less often while a piece is split), read straight into the
    splitter's buffer.  (Measured against 1 MiB, save of a 1 GiB guest, farm-bench A/B:
    a 256 KiB pipe 1.20x the time, 2 MiB 1.46x, 8 MiB 1.56x.)"""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
    return io.FileIO(fd, "rb")
