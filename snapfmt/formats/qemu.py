"""QEMU's migration stream (QEVM version 3) and its trailing vmdesc -- declarations only.

Follows QEMU's migration/savevm.c, migration/ram.c and migration/vmstate.c as summarised
in shared/reference/qemu-stream.md; the § numbers below are that document's sections
(facts checked against real QEMU 7.2 and 10.0 streams, samples/qemu/).  Every integer is
big-endian.  Walking, bounds and error policy live in snapfmt/qemu/; RAM page records
are the hot path and are read and written there with the ``struct`` layouts below, which
a test keeps equal to their declarations.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Any

from snapfmt.formats import declared

MAGIC = b"QEVM"
VERSION = 3
VERSION_COMPAT = 2  # "SaveVM v2 format is obsolete"


class SectionType(IntEnum):
    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class Command(IntEnum):
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


class RamFlag(IntFlag):
    FULL = 0x01  # obsolete since 2009
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


RAM_FLAGS_MASK = 0x3FF  # flags stay below the smallest target page (1 KiB)
XBZRLE_ENCODING = 0x01  # "XBZRLE": the one encoding an XBZRLE record may name


def compress_bound(length: int) -> int:
    """zlib's compressBound: the most a COMPRESS_PAGE record's data may take (QEMU:
    "Invalid compressed data length")."""
    return length + (length >> 12) + (length >> 14) + (length >> 25) + 13


# The hot path of the RAM walk and writer: RamRecordHead (a test keeps them equal).
RAM_WORD = struct.Struct(">Q")


def _declare() -> dict[str, Any]:
    """The construct declarations (see snapfmt.formats), by reference section."""
    declared = {**_stream(), **_sections(), **_ram()}
    declared["STRUCTURES"] = dict(declared)
    return declared


def _counted_string() -> Any:
    """§0 How values are written: a counted string is a u8 length, then the bytes."""
    from construct import Int8ub, PascalString

    return PascalString(Int8ub, "latin-1")


def _stream() -> dict[str, Any]:
    """§1 The stream as a whole: its header and the configuration section."""
    from construct import (
        Bytes,
        Const,
        Int32ub,
        PascalString,
        PrefixedArray,
        Struct,
    )

    CountedString = _counted_string()

    # the stream starts with the magic and the format version
    FileHeader = Struct(
        "magic" / Const(MAGIC),
        "version" / Int32ub,
    )

    # "Configuration payload": after the type byte 0x07, vmstate_configuration
    # (version 1): the machine type name with a be32 length, then subsections
    Configuration = Struct(
        "name" / PascalString(Int32ub, "latin-1"),
    )

    # "VMState payloads": a subsection header; its fields follow
    Subsection = Struct(
        "marker" / Const(bytes([SectionType.SUBSECTION])),
        "name" / CountedString,
        "version_id" / Int32ub,
    )

    # "Configuration payload": the configuration subsections' fields
    TargetPageBits = Struct("page_bits" / Int32ub)
    Capabilities = Struct("names" / PrefixedArray(Int32ub, CountedString))
    Uuid = Struct("uuid" / Bytes(16))

    return {name: value for name, value in locals().items() if isinstance(value, Struct)}


def _sections() -> dict[str, Any]:
    """§1 The stream as a whole: sections, commands and the vmdesc framing."""
    from construct import Const, Int16ub, Int32ub, Int64ub, Struct

    # "Section header and footer": after the type byte of a START or FULL section ...
    SectionStartFull = Struct(
        "section_id" / Int32ub,
        "idstr" / _counted_string(),
        "instance_id" / Int32ub,
        "version_id" / Int32ub,
    )

    # ... and of a PART or END section
    SectionPartEnd = Struct(
        "section_id" / Int32ub,
    )

    # after every section's payload (when send-section-footer is on)
    SectionFooter = Struct(
        "marker" / Const(bytes([SectionType.FOOTER])),
        "section_id" / Int32ub,
    )

    # "COMMAND": after the type byte 0x08; `length` bytes of data follow
    CommandHead = Struct(
        "command" / Int16ub,
        "length" / Int16ub,
    )

    # COMMAND data: POSTCOPY_ADVISE's long form and PACKAGED's nested stream length
    PostcopyAdvise = Struct(
        "host_page_sizes" / Int64ub,  # the OR of the source's RAM block page sizes
        "target_page_size" / Int64ub,
    )
    Packaged = Struct(
        "length" / Int32ub,
    )

    # after EOF: 0x06 and the vmdesc length; the JSON follows (§3 The trailing vmdesc JSON)
    VmDescriptionHead = Struct(
        "marker" / Const(bytes([SectionType.VMDESCRIPTION])),
        "length" / Int32ub,
    )
    return {name: value for name, value in locals().items() if isinstance(value, Struct)}


def _ram() -> dict[str, Any]:
    """§2 The RAM section, and mapped-ram (§6 How users create these files)."""
    from construct import Int8ub, Int16ub, Int32ub, Int64ub, Struct

    # every RAM record starts with be64 (offset | flags)
    RamRecordHead = Struct(
        "word" / Int64ub,
    )

    # "MEM_SIZE record": one entry of the block list
    MemSizeEntry = Struct(
        "idstr" / _counted_string(),
        "used_length" / Int64ub,
    )

    # "MEM_SIZE record", with postcopy-ram or x-ignore-shared: a be64 after the entry
    BlockWord = Struct(
        "value" / Int64ub,
    )

    # "XBZRLE": after the page header, the encoding and the length of the delta
    XbzrleHead = Struct(
        "encoding" / Int8ub,
        "length" / Int16ub,
    )

    # "COMPRESS_PAGE": after the page header, the length of the zlib data
    CompressedHead = Struct(
        "length" / Int32ub,
    )

    # §6 "mapped-ram": packed, 28 bytes, big-endian
    MappedRamHeader = Struct(
        "version" / Int32ub,
        "page_size" / Int64ub,
        "bitmap_offset" / Int64ub,
        "pages_offset" / Int64ub,
    )
    return {name: value for name, value in locals().items() if isinstance(value, Struct)}


def __getattr__(name: str) -> Any:
    return declared(globals(), _declare, name)
