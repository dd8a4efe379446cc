"""Salvage a native file whose index or footer is lost (a copy or a write cut short).

A writer lays the file down front to back (spec/format.md §2): the header, the
configuration body, then each section's body -- a device's DeviceState and state, a RAM
block's data region followed by its descriptor, a metadata document -- then the index
and the footer.  Without the index, the bodies are found again in that order, each
recognised by its own structure and taken only when every field is what a writer
writes:

- a device: a canonical path, reserved flags zero, a layout that is empty or JSON, and
  its state inside the file;
- a RAM block: its descriptor right there (no chunk stored), or found after its data
  region by the first stored chunk's offset, which is where the region starts; its
  chunks then tile the region exactly;
- a metadata document: JSON.  Its name was in the index only: it becomes
  ``recovered-N``.

Where nothing fits, the salvage stops: the file is intact up to there.  Each body found
gets its checksum computed here, so reads check it against itself only; RAM chunks keep
their own hashes.
"""

from __future__ import annotations

import io
import mmap
import struct
from typing import Any, NamedTuple

import construct

from snapfmt._io import FileReader, json_loads
from snapfmt.errors import PathSyntaxError
from snapfmt.formats import native as nf
from snapfmt.model import SectionInfo
from snapfmt.paths import Path

_LOOKBACK = 1 << 13  # bytes before a chunk table searched for its head's two strings
_ENTRY = nf.CHUNK_ENTRY.size


class Salvaged(NamedTuple):
    sections: list[SectionInfo]
    end: int  # where the salvage stopped: the file is intact before it
    message: str  # why it stopped there


class _Bounded(io.RawIOBase):
    """A read-only view of [start, end) of a file that refuses reads past *end*, so a
    garbage length never reads more than the file holds."""

    def __init__(self, reader: FileReader, start: int, end: int) -> None:
        self.reader, self.pos, self.end = reader, start, end

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        data = self.reader.pread(self.pos, max(n, 0), "salvage")
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos


def salvage(reader: FileReader) -> Salvaged:
    """The sections of *reader* found again front to back (its header is intact)."""
    found: list[SectionInfo] = []
    pos = nf.HEADER_SIZE
    config = _parse(reader, nf.Configuration, pos)
    if config is None:
        return Salvaged(found, pos, "the configuration is damaged")
    _, end = config
    found.append(_info(reader, nf.SectionKind.CONFIGURATION, "", pos, end, end - pos))
    pos, documents = end, 0
    paths: set[str] = set()
    while pos < reader.size:
        section = _device(reader, pos, paths) or _ram_block(reader, pos, paths)
        if section is None:
            documents += 1
            section = _metadata(reader, pos, f"recovered-{documents}")
        if section is None:
            break
        found.append(section)
        if section.path is not None:
            paths.add(section.key)
        pos = section.offset + section.length
    message = ("nothing a writer lays down starts here (the index, or a body cut short)"
               if pos < reader.size else "the file ends here")  # fmt: skip
    return Salvaged(found, pos, message)


def _parse(
    reader: FileReader, con: Any, pos: int, limit: int = nf.MAX_BODY
) -> tuple[Any, int] | None:
    stream = _Bounded(reader, pos, min(reader.size, pos + limit))
    try:
        value = con.parse_stream(stream)
    except (construct.ConstructError, UnicodeDecodeError, ValueError, OverflowError):
        return None  # (whatever garbage makes of the declaration: not this structure)
    return value, stream.tell()


def _info(reader: FileReader, kind: nf.SectionKind, key: str, start: int, end: int,
          size: int, data: tuple[int, int] = (0, 0)) -> SectionInfo:  # fmt: skip
    body = reader.pread(start, end - start, "salvage")
    return SectionInfo(kind, key, start, end - start, size, end - start + data[1],
                       nf.xxh3_64(body), data[0], data[1])  # fmt: skip


def _canonical(path: str, paths: set[str]) -> bool:
    try:
        return str(Path.parse(path)) == path and path not in paths
    except (PathSyntaxError, ValueError):
        return False


def _device(reader: FileReader, pos: int, paths: set[str]) -> SectionInfo | None:
    if pos + 3 > reader.size or reader.pread(pos + 2, 1, "salvage") != b"/":
        return None
    parsed = _parse(reader, nf.DeviceState, pos)
    if parsed is None:
        return None
    head, end = parsed
    if head.flags or not _canonical(head.path, paths) or end + head.state_length > reader.size:
        return None
    if head.layout:
        try:
            if not isinstance(json_loads(head.layout.encode()), dict):
                return None
        except (ValueError, RecursionError):
            return None
    return _info(reader, nf.SectionKind.DEVICE, head.path, pos, end + head.state_length,
                 head.state_length)  # fmt: skip


def _metadata(reader: FileReader, pos: int, name: str) -> SectionInfo | None:
    parsed = _parse(reader, nf.Metadata, pos)
    if parsed is None:
        return None
    value, end = parsed
    try:
        json_loads(value.document.encode())
    except (ValueError, RecursionError):
        return None
    return _info(reader, nf.SectionKind.METADATA, name, pos, end, len(value.document.encode()))


def _ram_block(reader: FileReader, pos: int, paths: set[str]) -> SectionInfo | None:
    """A RAM block whose data region starts at *pos*: its descriptor there (nothing
    stored), or after the region, found by the first stored chunk's offset (*pos*)."""
    here = _descriptor(reader, pos, pos, paths)
    if here is not None:
        return here
    needle = pos.to_bytes(8, "little")
    try:
        with mmap.mmap(reader.fd, 0, access=mmap.ACCESS_READ) as view:
            hit = view.find(needle, pos)
            while hit >= 0:
                entry_at = hit - 8
                for head_end in _head_ends(view, entry_at, pos):
                    found = _descriptor_ending(reader, view, head_end, pos, paths)
                    if found is not None:
                        return found
                hit = view.find(needle, hit + 1)
    except (OSError, ValueError):  # a file that cannot be mapped: no search
        return None
    return None


def _head_ends(view: Any, entry_at: int, pos: int) -> list[int]:
    """Where a RAM block head may end before the chunk entry at *entry_at*: right
    before it, or before a run of entries that store nothing (ZERO, PARENT)."""
    ends, at = [], entry_at
    while at - pos >= 24:
        ends.append(at)
        before = at - _ENTRY
        encoding, stored, offset, _ = nf.CHUNK_ENTRY.unpack_from(view, before)
        if stored or offset or encoding not in (nf.ChunkEncoding.ZERO, nf.ChunkEncoding.PARENT):
            break
        at = before
    return ends


def _descriptor_ending(reader: FileReader, view: Any, end: int, pos: int,
                       paths: set[str]) -> SectionInfo | None:  # fmt: skip
    """A descriptor whose head ends at *end*: its two strings found backwards, once the
    fixed fields before *end* are what a head holds (cheap: most candidates stop here)."""
    if end - 24 < pos:
        return None
    length, page, chunk, count = struct.unpack_from("<QIIQ", view, end - 24)
    if (
        not nf.MIN_PAGE_SIZE <= page <= nf.MAX_PAGE_SIZE or page & (page - 1)
        or not nf.MIN_CHUNK_SIZE <= chunk <= nf.MAX_CHUNK_SIZE or chunk & (chunk - 1)
        or count != -(-length // chunk)
    ):  # fmt: skip
        return None
    low = max(pos, end - 24 - _LOOKBACK)
    for qlen in range(0, end - 24 - 2 - low + 1):
        q_at = end - 24 - qlen - 2
        if int.from_bytes(view[q_at : q_at + 2], "little") != qlen:
            continue
        for plen in range(1, q_at - 2 - low + 1):
            p_at = q_at - plen - 2
            if view[p_at + 2] == 0x2F and int.from_bytes(view[p_at : p_at + 2], "little") == plen:
                found = _descriptor(reader, p_at, pos, paths)
                if found is not None:
                    return found
    return None


def _descriptor(reader: FileReader, at: int, pos: int, paths: set[str]) -> SectionInfo | None:
    """The RAM block whose descriptor starts at *at* and data region at *pos*, if every
    field is what a writer writes and its stored chunks tile [pos, at) exactly."""
    if at + 3 > reader.size or reader.pread(at + 2, 1, "salvage") != b"/":
        return None
    parsed = _parse(reader, nf.RamBlockHead, at, 1 << 17)
    if parsed is None:
        return None
    head, table = parsed
    chunk, page = head.chunk_size, head.page_size
    if (
        not _canonical(head.path, paths)
        or not nf.MIN_PAGE_SIZE <= page <= nf.MAX_PAGE_SIZE or page & (page - 1)
        or not nf.MIN_CHUNK_SIZE <= chunk <= nf.MAX_CHUNK_SIZE or chunk & (chunk - 1)
        or chunk % page or head.chunk_count != -(-head.length // chunk)
        or table + head.chunk_count * _ENTRY > reader.size
    ):  # fmt: skip
        return None
    raw = reader.pread(table, head.chunk_count * _ENTRY, "salvage")
    next_at = pos
    for i in range(head.chunk_count):
        encoding, stored, offset, _ = nf.CHUNK_ENTRY.unpack_from(raw, i * _ENTRY)
        if encoding not in tuple(nf.ChunkEncoding):
            return None
        if stored == 0:
            if offset:
                return None
            continue
        if offset != next_at:
            return None
        next_at += stored
    if next_at != at:
        return None
    end = table + head.chunk_count * _ENTRY
    return _info(reader, nf.SectionKind.RAM_BLOCK, head.path, at, end, head.length,
                 (pos, at - pos))  # fmt: skip
