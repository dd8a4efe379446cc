"""The typed objects users and operations see, whatever format a snapshot came from.

The records are NamedTuples: immutable, quick to make (a ChunkInfo per chunk), and
defining one costs about a tenth of what a dataclass does, at every start.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from snapfmt._io import pwrite_all
from snapfmt.formats.native import SectionKind
from snapfmt.paths import Path, resolve, resolve_one
from snapfmt.vmstate import Field, decode, iter_decode


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

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the block, touching only the chunks needed."""

    @abc.abstractmethod
    def iter_spans(self, span: int = 1 << 22) -> Iterator[tuple[int, memoryview]]:
        """The whole block in order as ``(offset, view)`` pieces of about *span* bytes.

        A view is valid until the next step of the iteration: its buffer is reused."""

    @abc.abstractmethod
    def chunks(self) -> Iterator[ChunkInfo]:
        """The chunk table, in block order."""

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

    def summary(self) -> tuple[int, int, int]:
        """(chunks, all-zero chunks, bytes stored) without reading the contents."""
        chunks = zeros = stored = 0
        for chunk in self.chunks():
            chunks += 1
            zeros += chunk.stored_length == 0
            stored += chunk.stored_length
        return chunks, zeros, stored


class Snapshot(abc.ABC):
    """An open snapshot file.  Sections load on demand; use as a context manager."""

    file: str  # the file read (for a compressed stream: its decompressed copy)
    origin: str  # the file the user named
    format_name: str
    version: str

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
    def close(self) -> None: ...

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
