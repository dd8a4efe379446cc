"""libvirt's save image header (`virsh save`), which wraps a QEMU migration stream.

Follows libvirt's src/qemu/qemu_saveimage.h (virQEMUSaveHeader) as summarised in
shared/reference/qemu-stream.md §6: 92 bytes in the byte order of the host that wrote
it, then `data_len` bytes of domain XML (NUL-terminated), an optional cookie and
padding, then the QEMU stream, compressed as `format` says.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from snapfmt.formats import declared

MAGIC = b"LibvirtQemudSave"
MAGIC_PARTIAL = b"LibvirtQemudPart"  # written first, replaced when the save completes
HEADER_SIZE = 92


class Compression(IntEnum):
    RAW = 0
    GZIP = 1
    BZIP2 = 2
    XZ = 3
    LZOP = 4
    ZSTD = 5
    SPARSE = 6  # mapped-ram


def _declare() -> dict[str, Any]:
    """The construct declarations (see snapfmt.formats)."""
    from construct import Array, Bytes, Int32ub, Int32ul, Struct

    def _header(u32: Any) -> Any:
        return Struct(
            "magic" / Bytes(16),
            "version" / u32,
            "data_len" / u32,
            "was_running" / u32,
            "format" / u32,
            "cookie_offset" / u32,
            "unused" / Array(14, u32),
        )

    HeaderLE = _header(Int32ul)
    HeaderBE = _header(Int32ub)
    STRUCTURES = {"HeaderLE": HeaderLE, "HeaderBE": HeaderBE}
    return locals()


def __getattr__(name: str) -> Any:
    return declared(globals(), _declare, name)
