"""The typed objects users and operations see, whatever format a snapshot came from.

The records are NamedTuples: immutable, quick to make (a ChunkInfo per chunk), and
defining one costs about a tenth of what a dataclass does, at every start.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from snapfmt._io import pwrite_all
from snapfmt.errors import FormatError
from snapfmt.formats.native import SectionKind
from snapfmt.paths import Path, resolve, resolve_one
from snapfmt.perf.compare import page_changes
from snapfmt.vmstate import Field, decode, iter_decode

if TYPE_CHECKING:
    from snapfmt.wrappers import Wrapper

Buffer = bytes | bytearray | memoryview


class Configuration(NamedTuple):
    machine: str
    page_size: int
    capabilities: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = MappingProxyType({})

    def __reduce__(self) -> tuple[Any, ...]:  # (a mappingproxy does not pickle or copy)
        return Configuration, (self.machine, self.page_size, self.capabilities, dict(self.metadata))


class SectionInfo(NamedTuple):
    """One row of a snapshot's section table (for native files: one index entry)."""

    kind: SectionKind | int
    key: str  # the path string of a device or RAM block, a metadata name, "" for config
    offset: int  # where the section's body starts in the file
    length: int  # stored bytes of the body (for a RAM block: its descriptor)
    size: int  # logical size: state bytes, RAM block length, or document length
    stored: int  # bytes the section occupies in the file, data included
    checksum: int = 0
    data_offset: int = 0
    data_length: int = 0
    optional: bool = False

    @property
    def path(self) -> Path | None:
        if self.kind in (SectionKind.DEVICE, SectionKind.RAM_BLOCK):
            return Path.parse(self.key)
        return None

    @property
    def kind_name(self) -> str:
        try:
            return SectionKind(self.kind).name.lower().replace("_", "-")
        except ValueError:
            return f"unknown-{int(self.kind)}"


class DeviceState(NamedTuple):
    """A device's saved state: raw VMState bytes plus what is needed to decode them."""

    path: Path
    driver: str
    vmstate_name: str
    instance_id: int
    version_id: int
    data: bytes
    layout: Mapping[str, Any] | None = None
    qemu_idstr: str | None = None
    data_offset: int = 0  # absolute file offset of ``data``

    def fields(self) -> list[Field]:
        """The decoded fields, offsets absolute in the file; [] without a layout."""
        if self.layout is None:
            return []
        return decode(self.layout, self.data, self.data_offset)

    def iter_fields(self) -> Iterator[Field]:
        """The decoded fields one at a time (for reading the first few cheaply)."""
        return (
            iter_decode(self.layout, self.data, self.data_offset)
            if self.layout is not None
            else iter(())
        )


class Problem(NamedTuple):
    """One thing wrong in a file, as a snapshot's check finds it."""

    section: str | None  # the section's path or name; None for the file as a whole
    offset: int | None
    message: str
    range: tuple[int, int] | None = None  # bytes of a RAM block, inclusive


class CheckResult(NamedTuple):
    """What a snapshot's check covered, and what it found."""

    sections: int
    chunks: int  # RAM chunks (for QEMU streams: pages, the stream's unit)
    bytes: int
    problems: list[Problem]


class ChunkInfo(NamedTuple):
    index: int  # type: ignore[assignment]  # (shadows tuple.index, as it should here)
    offset: int  # within the block
    length: int  # uncompressed
    encoding: int
    stored_length: int
    file_offset: int
    hash: int


class RamBlock(abc.ABC):
    """A RAM block's contents, read on demand."""

    path: Path
    length: int
    page_size: int
    chunk_size: int
    qemu_idstr: str | None = None
    host_page_size: int | None = None  # QEMU postcopy streams: a huge-page block's page
    # Why the block's contents are not in the file (None: they are).  A QEMU stream saved
    # with x-ignore-shared sends no page of a shared block: its bytes are in the block's
    # backing file.  Reading such a block is an error, never a block of zeros.
    missing: str | None = None
    file: str = ""  # the file the block is read from

    def require_contents(self) -> None:
        """Raise FormatError when the block's contents are not in the file (``missing``)."""
        if self.missing:
            raise FormatError(f"RAM block {self.path}: {self.missing}", file=self.file or None,
                              section=self.qemu_idstr)  # fmt: skip

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the block, touching only the chunks needed."""

    @abc.abstractmethod
    def iter_spans(self, span: int = 1 << 22) -> Iterator[tuple[int, memoryview]]:
        """The whole block in order as ``(offset, view)`` pieces of about *span* bytes.

        A view is valid until the next step of the iteration: its buffer is reused."""

    @abc.abstractmethod
    def summary(self) -> tuple[int, int, int]:
        """(chunks, all-zero chunks, bytes stored) without reading the contents."""

    def write_into(self, fd: int, progress: Callable[[int], None] | None = None) -> None:
        """Write the whole block into the regular file *fd* from its offset 0, leaving
        all-zero spans as holes, and size the file to the block's length."""
        for offset, view in self.iter_spans():
            # startswith on a same-length zero string is one memcmp (memoryview == is
            # per item), and stops at the first non-zero byte
            if not bytes(len(view)).startswith(view):
                pwrite_all(fd, [view], offset)
            if progress:
                progress(len(view))
        os.ftruncate(fd, self.length)

    def write_range_into(
        self, fd: int, offset: int, length: int, at: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:  # fmt: skip
        """Write bytes [offset, offset + length) of the block into *fd* at *at*, never
        writing a page of zeros (those stay holes)."""
        self.require_contents()
        page, span = self.page_size, 1 << 22
        for lo in range(offset, offset + length, span):
            data = memoryview(self.read(lo, min(span, offset + length - lo)))
            for start, stop in nonzero_runs(data, page):
                pwrite_all(fd, [data[start:stop]], at + lo - offset + start)
            if progress:
                progress(len(data))

    def differing_pages(
        self, other: RamBlock, length: int, progress: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, int, int]]:
        """(offset, size, bytes that differ) for each page of [0, *length*) that differs
        from *other*'s, in order.  This reads both blocks whole; back ends compare blocks
        of their own kind more cheaply (chunk hashes, page maps)."""
        scratch = bytearray()
        for offset, span_a, span_b in _paired_spans(self, other, length):
            n = len(span_a)
            if len(scratch) != n:
                scratch = bytearray(n)
            yield from page_changes(
                offset, _whole_bytearray(span_a, scratch), span_b, self.page_size
            )
            if progress:
                progress(n)


def nonzero_runs(data: Buffer, page: int) -> Iterator[tuple[int, int]]:
    """[start, stop) of each run of pages of *data* holding a non-zero byte."""
    view = memoryview(data)
    zero = bytes(page)
    if bytes(len(view)).startswith(view):
        return
    start = None
    for at in range(0, len(view), page):
        if zero.startswith(view[at : at + page]):
            if start is not None:
                yield start, at
                start = None
        elif start is None:
            start = at
    if start is not None:
        yield start, len(view)


def _paired_spans(a: RamBlock, b: RamBlock, common: int) -> Iterator[tuple[int, Buffer, Buffer]]:
    """Both blocks over [0, common) in equal pieces."""
    step = 1 << 22
    if max(a.chunk_size, b.chunk_size) > step:  # spans would not line up: read both alike
        for lo in range(0, common, step):
            n = min(step, common - lo)
            yield lo, a.read(lo, n), b.read(lo, n)
        return
    # Both yield 4 MiB spans from offset 0 (chunks and pages divide 4 MiB), so they pair up.
    for (offset, span_a), (_, span_b) in zip(a.iter_spans(step), b.iter_spans(step), strict=False):
        if offset >= common:
            break
        n = min(len(span_a), len(span_b), common - offset)
        yield offset, span_a[:n], span_b[:n]


def _whole_bytearray(view: Buffer, scratch: bytearray) -> bytearray:
    """A bytearray holding the bytes of *view*: the one the view covers whole (its
    ``obj``), else *scratch* (of the same length) filled with a copy."""
    if isinstance(view, bytearray):
        return view
    if (
        isinstance(view, memoryview)
        and isinstance(view.obj, bytearray)
        and view.contiguous
        and view.nbytes == len(view.obj)
    ):
        return view.obj
    scratch[:] = view
    return scratch


class Snapshot(abc.ABC):
    """An open snapshot file.  Sections load on demand; use as a context manager."""

    file: str  # the file read (for a compressed stream: its decompressed copy)
    origin: str  # the file the user named
    format_name: str
    version: str
    wrapper: Wrapper | None = None  # a libvirt save image or compression around the stream

    @property
    @abc.abstractmethod
    def configuration(self) -> Configuration: ...

    @property
    @abc.abstractmethod
    def sections(self) -> list[SectionInfo]: ...

    @abc.abstractmethod
    def device(self, path: Path) -> DeviceState: ...

    @abc.abstractmethod
    def ram_block(self, path: Path) -> RamBlock: ...

    @abc.abstractmethod
    def metadata(self, name: str) -> Any: ...

    @abc.abstractmethod
    def check(self, progress: Callable[[int], None] | None = None) -> CheckResult:
        """Check the structure and every checksum the format has (verify's work)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def iterative_sections(self) -> list[str]:
        """QEMU id strings of iterative sections other than RAM (block migration, dirty
        bitmaps): their parts are merged when read, and cannot be written back as one."""
        return []

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conveniences shared by every format -------------------------------------------

    def section_paths(self) -> list[Path]:
        return [p for p in (s.path for s in self.sections) if p is not None]

    def aliases(self) -> dict[str, Path]:
        """QEMU identifiers that name a section (selectors accept them)."""
        return {}

    def section_for(self, path: Path) -> SectionInfo:
        key = str(path)
        for section in self.sections:
            if section.key == key and section.path is not None:
                return section
        raise KeyError(key)

    def select(self, selector: str) -> list[Path]:
        return resolve(selector, self.section_paths(), self.aliases)

    def select_one(self, selector: str) -> Path:
        return resolve_one(selector, self.section_paths(), self.aliases)

    def devices(self) -> Iterator[DeviceState]:
        for section in self.sections:
            if section.kind == SectionKind.DEVICE:
                yield self.device(Path.parse(section.key))

    def ram_blocks(self) -> Iterator[RamBlock]:
        for section in self.sections:
            if section.kind == SectionKind.RAM_BLOCK:
                yield self.ram_block(Path.parse(section.key))
