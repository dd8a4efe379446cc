"""The snapfmt native container, version 1.0 -- declarations only.

Implements spec/format.md (normative); the section numbers below are that document's.
Every structure is little-endian.  This module declares layouts and constants; reading
and writing policy (offsets, bounds, checksum verification, error messages) lives in
snapfmt/reader.py and snapfmt/writer.py.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Any

import xxhash

# §1 Conventions: constants and limits -------------------------------------------------
from snapfmt.formats import declared

MAGIC = b"\x89SNAPF\r\n"
FOOTER_MAGIC = b"SNAPFEND"
VERSION_MAJOR = 1
VERSION_MINOR = 0
DELTA_VERSION_MINOR = 1  # §7: a delta snapshot is a 1.1 file; every other file stays 1.0
PARENT_DOCUMENT = "parent"  # §7: the metadata document naming a delta's parent

HEADER_SIZE = 64
FOOTER_SIZE = 48

MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 1 << 24
DEFAULT_CHUNK_SIZE = 1 << 16
MIN_PAGE_SIZE = 1024
MAX_PAGE_SIZE = 1 << 21
MAX_BODY = 1 << 28  # a configuration, device or metadata body; RAM lives in RAM blocks
MAX_INDEX = 1 << 26
INDEX_ENTRY_MIN = 58  # an IndexEntry with an empty key (§5 Index and footer)


def xxh3_64(data: bytes | bytearray | memoryview) -> int:
    """The checksum of every checksummed structure and the hash of every chunk (§4 Checksums)."""
    return int(xxhash.xxh3_64_intdigest(data))


class HeaderFlag(IntFlag):
    DELTA = 1  # §7 Delta snapshots: chunks may live in the parent named by parent_id


class SectionKind(IntEnum):
    CONFIGURATION = 1
    DEVICE = 2
    RAM_BLOCK = 3
    METADATA = 4


class SectionFlag(IntFlag):
    OPTIONAL = 1  # §3 Sections: a reader that does not know the kind skips the section


class ChunkEncoding(IntEnum):
    ZERO = 0  # nothing stored: the chunk is all zero bytes
    RAW = 1  # stored as is
    ZSTD = 2  # one zstd frame holding the uncompressed bytes
    PARENT = 3  # §7 Delta snapshots: the parent's chunk at the same index holds the bytes
    PAGES_RAW = 4  # a bitmap of the non-zero pages, then those pages as they are
    PAGES_ZSTD = 5  # a bitmap of the non-zero pages, then one zstd frame of those pages
    PARENT_PAGES = 6  # §7: a bitmap of the pages that differ from the parent's chunk, then
    # one zstd frame of those pages; the other pages are the parent's


# The chunk table is the hot path: read and written with this struct.Struct, which a test
# keeps equal to ChunkEntry (§3 Sections, declared below).
CHUNK_ENTRY = struct.Struct("<B3xIQQ")


def _declare() -> dict[str, Any]:
    """The construct declarations (see snapfmt.formats), by spec section."""
    declared = {**_header(), **_sections(), **_ram_blocks(), **_index_and_footer()}
    declared["STRUCTURES"] = dict(declared)
    return declared


def _strings() -> tuple[Any, Any]:
    """§1 Conventions: strings are a little-endian length, then UTF-8 bytes, no terminator."""
    from construct import Int16ul, Int32ul, PascalString

    return PascalString(Int16ul, "utf8"), PascalString(Int32ul, "utf8")


def _header() -> dict[str, Any]:
    """§2 File layout: the header."""
    from construct import Bytes, Checksum, Const, Int16ul, Int32ul, Int64ul, RawCopy, Struct, this

    HeaderFields = Struct(
        "magic" / Const(MAGIC),
        "version_major" / Int16ul,
        "version_minor" / Int16ul,
        "flags" / Int32ul,
        "parent_id" / Bytes(16),
        "reserved" / Bytes(24),
    )

    Header = Struct(
        "fields" / RawCopy(HeaderFields),
        "header_hash" / Checksum(Int64ul, xxh3_64, this.fields.data),
    )
    return {"Header": Header, "HeaderFields": HeaderFields}


def _sections() -> dict[str, Any]:
    """§3 Sections."""
    from construct import (
        Int16ul,
        Int32ul,
        Int64ul,
        PrefixedArray,
        Struct,
    )

    Str16, Str32 = _strings()

    Configuration = Struct(
        "machine" / Str16,
        "page_size" / Int32ul,
        "capabilities" / PrefixedArray(Int16ul, Str16),
        "metadata" / Str32,
    )

    DeviceState = Struct(
        "path" / Str16,
        "driver" / Str16,
        "vmstate_name" / Str16,
        "instance_id" / Int32ul,
        "version_id" / Int32ul,
        "flags" / Int32ul,
        "qemu_idstr" / Str16,
        "layout" / Str32,
        "state_length" / Int64ul,
    )
    # The state bytes follow DeviceState directly: state_length of them, read as one span.

    Metadata = Struct(
        "document" / Str32,
    )
    return {"Configuration": Configuration, "DeviceState": DeviceState, "Metadata": Metadata}


def _ram_blocks() -> dict[str, Any]:
    """§3 Sections: RAM blocks."""
    from construct import Array, Bytes, Int8ul, Int32ul, Int64ul, Struct, this

    Str16, _ = _strings()

    ChunkEntry = Struct(
        "encoding" / Int8ul,
        "reserved" / Bytes(3),
        "stored_length" / Int32ul,
        "offset" / Int64ul,
        "hash" / Int64ul,
    )

    RamBlockHead = Struct(
        "path" / Str16,
        "qemu_idstr" / Str16,
        "length" / Int64ul,
        "page_size" / Int32ul,
        "chunk_size" / Int32ul,
        "chunk_count" / Int64ul,
    )

    RamBlockDescriptor = Struct(
        "head" / RamBlockHead,
        "chunks" / Array(this.head.chunk_count, ChunkEntry),
    )

    return {
        "ChunkEntry": ChunkEntry,
        "RamBlockHead": RamBlockHead,
        "RamBlockDescriptor": RamBlockDescriptor,
    }


def _index_and_footer() -> dict[str, Any]:
    """§5 Index and footer."""
    from construct import (
        Checksum,
        Const,
        Int16ul,
        Int32ul,
        Int64ul,
        PrefixedArray,
        RawCopy,
        Struct,
        this,
    )

    Str16, _ = _strings()

    IndexEntry = Struct(
        "kind" / Int16ul,
        "flags" / Int16ul,
        "reserved" / Int32ul,
        "offset" / Int64ul,
        "length" / Int64ul,
        "checksum" / Int64ul,
        "data_offset" / Int64ul,
        "data_length" / Int64ul,
        "size" / Int64ul,
        "key" / Str16,
    )

    Index = Struct(
        "entries" / PrefixedArray(Int32ul, IndexEntry),
    )

    FooterFields = Struct(
        "index_offset" / Int64ul,
        "index_length" / Int64ul,
        "index_hash" / Int64ul,
        "version_major" / Int16ul,
        "version_minor" / Int16ul,
        "section_count" / Int32ul,
    )

    Footer = Struct(
        "fields" / RawCopy(FooterFields),
        "footer_hash" / Checksum(Int64ul, xxh3_64, this.fields.data),
        "magic" / Const(FOOTER_MAGIC),
    )
    return {
        "IndexEntry": IndexEntry,
        "Index": Index,
        "FooterFields": FooterFields,
        "Footer": Footer,
    }


def __getattr__(name: str) -> Any:
    return declared(globals(), _declare, name)
