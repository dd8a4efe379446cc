"""Files that wrap a QEMU stream: libvirt save images and whole-file compression.

Each is unwrapped to (file, offset of the QEMU stream, what was around it).  Compressed
payloads are decompressed, streaming, to a temporary file that is removed on close.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import IO, Any, NamedTuple

from snapfmt.errors import FormatError, UnsupportedError
from snapfmt.formats import libvirt as lf

MAX_RATIO = 1000  # zero-page-heavy streams compress a lot, but not more than this
MAX_EXTRA = 1 << 30

COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


class Wrapper(NamedTuple):
    """What was around a QEMU stream."""

    kind: str  # "libvirt", or a compression name for a whole compressed stream
    compression: str = "raw"
    version: int | None = None
    was_running: bool | None = None
    byte_order: str | None = None
    domain_xml: str | None = None
    extra: Mapping[str, Any] = MappingProxyType({})


def compression_of(head: bytes) -> str | None:
    for magic, name in COMPRESSED.items():
        if head.startswith(magic):
            return name
    return None


def _opener(name: str) -> Callable[[IO[bytes]], Any]:
    # the codecs are imported when a compressed file is met: most files are not
    import bz2
    import gzip
    import lzma

    import zstandard

    if name == "gzip":
        return lambda f: gzip.GzipFile(fileobj=f, mode="rb")
    if name == "bzip2":
        return lambda f: bz2.BZ2File(f, mode="rb")
    if name == "xz":
        return lambda f: lzma.LZMAFile(f, mode="rb")
    if name == "zstd":
        return lambda f: zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    raise UnsupportedError(f"{name} compression is not supported")


def decompress_to_temp(path: str, start: int, name: str, salvage: bool = False) -> int:
    """Decompress *path* from *start* into an anonymous temporary file (unlinked at
    once, so nothing is left behind whatever happens); returns its descriptor.

    The data must start like a QEMU stream, and may grow at most MAX_RATIO times the
    compressed size (plus 1 GiB): a decompression bomb stops there.  With *salvage*,
    data that stops decompressing gives what decompressed before (a cut stream, which
    a salvaging walk then reads up to its cut)."""
    import lzma
    import tempfile
    import zlib

    import zstandard

    limit = (os.path.getsize(path) - start) * MAX_RATIO + MAX_EXTRA
    out = tempfile.TemporaryFile(prefix="snapfmt-")  # noqa: SIM115  (closed in finally)
    try:
        with open(path, "rb") as raw:
            raw.seek(start)
            with _opener(name)(raw) as source:
                first = source.read(4)
                if first != b"QEVM":
                    raise FormatError(f"the {name}-compressed data is not a QEMU stream", file=path, offset=start,
                                      found=f"first bytes {first.hex()}", expected="5145564d")  # fmt: skip
                out.write(first)
                written = len(first)
                # (salvaging: small reads, as a decoder that fails drops the read it was in)
                while piece := source.read(1 << 16 if salvage else 1 << 20):
                    written += len(piece)
                    if written > limit:
                        raise FormatError(f"{name} data decompresses to more than {limit} bytes (a decompression bomb?)",
                                          file=path, offset=start)  # fmt: skip
                    out.write(piece)
        out.flush()
        return os.dup(out.fileno())
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError, zlib.error, ValueError) as e:
        if salvage and out.tell() > 4:
            out.flush()
            return os.dup(out.fileno())
        raise FormatError(
            f"{name} data does not decompress: {e}", file=path, offset=start
        ) from None
    finally:
        out.close()


def libvirt_header(head: bytes, path: str, salvage: bool = False) -> tuple[Wrapper, int]:
    """Parse the 92-byte header (either byte order); returns it and the stream offset.
    *salvage*: an image whose save never finished (its partial magic) is read too."""
    if head.startswith(lf.MAGIC_PARTIAL) and not salvage:
        raise FormatError(
            "libvirt save image is incomplete (the save never finished)",
            file=path,
            offset=0,
            found=lf.MAGIC_PARTIAL.decode(),
            expected=lf.MAGIC.decode(),
        )
    if len(head) < lf.HEADER_SIZE:
        raise FormatError(
            "libvirt save image header is cut short",
            file=path,
            offset=0,
            found=f"{len(head)} bytes",
            expected=f"{lf.HEADER_SIZE}",
        )
    little = lf.HeaderLE.parse(head)
    header, order = (
        (little, "little") if little.version in (1, 2) else (lf.HeaderBE.parse(head), "big")
    )
    if header.version not in (1, 2):
        raise UnsupportedError(
            "libvirt save image version not supported",
            file=path,
            offset=16,
            found=little.version,
            expected="1 or 2",
        )
    try:
        compression = lf.Compression(header.format).name.lower()
    except ValueError:
        raise FormatError(
            "unknown libvirt save image compression", file=path, offset=28, found=header.format
        ) from None
    wrapper = Wrapper("libvirt", compression, header.version, bool(header.was_running), order)
    return wrapper, lf.HEADER_SIZE + header.data_len


def domain_xml(path: str, data_len: int) -> str:
    with open(path, "rb") as f:
        f.seek(lf.HEADER_SIZE)
        data = f.read(min(data_len, 16 << 20))
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")
