"""QEMU's migration stream (QEVM version 3) and its trailing vmdesc -- declarations only.

Follows QEMU's migration/savevm.c, migration/ram.c and migration/vmstate.c as summarised
in shared/reference/qemu-stream.md (facts checked against QEMU 7.2 streams in
samples/qemu/).  Every integer is big-endian.  Walking, bounds and error policy live in
snapfmt/qemu_reader.py; RAM page records are the hot path and are read there with
``struct``, following the declarations below.
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

# The hot paths of qemu_reader, kept equal to RamRecordHead and MappedRamHeader by a test.
RAM_WORD = struct.Struct(">Q")
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")  # = MappedRamHeader (packed, 28 bytes)


def _declare() -> dict[str, Any]:
    """The construct declarations (see snapfmt.formats)."""
    from construct import (
        Bytes,
        Const,
        Int8ub,
        Int16ub,
        Int32ub,
        Int64ub,
        PascalString,
        PrefixedArray,
        Struct,
    )

    # Counted strings: a u8 length, then the bytes, no terminator.
    CountedString = PascalString(Int8ub, "latin-1")

    FileHeader = Struct(
        "magic" / Const(MAGIC),
        "version" / Int32ub,
    )

    # The configuration section: u8 0x07, then vmstate_configuration (version 1).
    ConfigurationHead = Struct(
        "name_length" / Int32ub,
        "name" / Bytes(lambda this: this.name_length),
    )

    SubsectionHead = Struct(
        "marker" / Const(bytes([SectionType.SUBSECTION])),
        "name" / CountedString,
        "version_id" / Int32ub,
    )

    Capabilities = PrefixedArray(Int32ub, CountedString)

    SectionStartFull = Struct(
        "section_id" / Int32ub,
        "idstr" / CountedString,
        "instance_id" / Int32ub,
        "version_id" / Int32ub,
    )

    SectionPartEnd = Struct(
        "section_id" / Int32ub,
    )

    SectionFooter = Struct(
        "marker" / Const(bytes([SectionType.FOOTER])),
        "section_id" / Int32ub,
    )

    CommandHead = Struct(
        "command" / Int16ub,
        "length" / Int16ub,
    )

    VmDescriptionHead = Struct(
        "length" / Int32ub,
    )

    # RAM: every record starts with be64 (offset | flags).
    RamRecordHead = Struct(
        "word" / Int64ub,
    )

    # One entry of the MEM_SIZE block list.
    MemSizeEntry = Struct(
        "idstr" / CountedString,
        "used_length" / Int64ub,
    )

    MappedRamHeader = Struct(
        "version" / Int32ub,
        "page_size" / Int64ub,
        "bitmap_offset" / Int64ub,
        "pages_offset" / Int64ub,
    )

    XbzrleHead = Struct(
        "encoding" / Int8ub,
        "length" / Int16ub,
    )
    return locals()


def __getattr__(name: str) -> Any:
    return declared(globals(), _declare, name)
