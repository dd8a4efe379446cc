"""Open a snapshot file of any readable format, detected from its first bytes.

The native container and QEMU streams open with their back ends; a libvirt save image
or a compressed QEMU stream is unwrapped first (snapfmt.wrappers) and opened as the
stream inside it.
"""

from __future__ import annotations

import os

from snapfmt import wrappers
from snapfmt._io import FileReader
from snapfmt.errors import FormatError, TruncatedError, UnsupportedError
from snapfmt.formats import libvirt as lf
from snapfmt.formats import native as nf
from snapfmt.formats import qemu as qf
from snapfmt.model import Snapshot

__all__ = ["detect", "open_pair", "open_snapshot"]

PAIR_MIN = 1 << 26  # below 64 MiB, a second process for open_pair costs more than it saves


def detect(head: bytes) -> str | None:
    """The format whose magic *head* starts with, or None."""
    if head.startswith(nf.MAGIC):
        return "native"
    if head.startswith(qf.MAGIC):
        return "qemu"
    return None


def open_snapshot(path: str | os.PathLike[str], salvage: bool = False) -> Snapshot:
    """Open a snapshot file of any readable format (detected from its first bytes): the
    native container, a QEMU stream, a libvirt save image, or a QEMU stream compressed
    whole with gzip, bzip2, xz or zstd.  *salvage*: a damaged or cut QEMU stream opens
    as what is whole before the damage (snapfmt.qemu.snapshot.QemuStream), a native
    file whose index is lost as the sections found again front to back, and a native
    chunk that does not match its hash reads as zeros, named (snapfmt.native.reader)."""
    name = os.fspath(path)
    try:
        reader = FileReader(name)
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror}", file=name) from None
    try:
        return _open(reader, name, salvage)
    except BaseException:
        reader.close()
        raise


def open_pair(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> tuple[Snapshot, Snapshot]:
    """Open two snapshots, as :func:`open_snapshot` does.  Two large plain QEMU streams
    are walked at the same time, one by a forked process that sends back its layout
    record (perf.parallel.forked_map): a walk is mostly page faults, which a second
    process takes in parallel and a thread would not."""
    readers: list[FileReader] = []
    try:
        for name in (os.fspath(a), os.fspath(b)):
            readers.append(FileReader(name))
    except (OSError, FormatError):  # open_snapshot below says what is wrong
        for reader in readers:
            reader.close()
        readers = []
    if (
        len(readers) == 2
        and min(r.size for r in readers) >= PAIR_MIN
        and all(r.pread(0, 4, "magic") == qf.MAGIC for r in readers)
    ):
        try:
            return _walked_pair(readers)
        except BaseException:
            for reader in readers:
                reader.close()
            raise
    for reader in readers:
        reader.close()
    first = open_snapshot(a)
    try:
        return first, open_snapshot(b)
    except BaseException:
        first.close()
        raise


def _walked_pair(readers: list[FileReader]) -> tuple[Snapshot, Snapshot]:
    from snapfmt.perf.parallel import forked_map
    from snapfmt.qemu.snapshot import QemuStream
    from snapfmt.qemu.walk import walk

    first, second = forked_map(lambda i: walk(readers[i]), [0, 1])
    return QemuStream(readers[0], layout=first), QemuStream(readers[1], layout=second)


def _open(reader: FileReader, name: str, salvage: bool = False) -> Snapshot:
    head = reader.pread(0, min(reader.size, lf.HEADER_SIZE), "magic")
    kind = detect(head)
    if kind == "native":
        from snapfmt.native.reader import NativeSnapshot

        return NativeSnapshot(reader, salvage)
    if kind == "qemu":
        return _stream(reader, salvage=salvage)
    if head.startswith(b"LibvirtQemud"):
        wrapper, start = wrappers.libvirt_header(head, name, salvage)
        if start > reader.size:
            raise TruncatedError(
                "libvirt save image ends inside its XML", file=name, offset=reader.size
            )
        wrapper = wrapper._replace(domain_xml=wrappers.domain_xml(name, start - lf.HEADER_SIZE))
        if wrapper.compression in ("lzop", "sparse"):
            raise UnsupportedError(
                f"libvirt save images in {wrapper.compression} format are not supported",
                file=name,
                offset=28,
            )
        if wrapper.compression == "raw":
            if reader.pread(start, min(4, reader.size - start), "QEMU stream") != qf.MAGIC:
                raise FormatError(
                    "no QEMU stream after the libvirt header", file=name, offset=start
                )
            return _stream(reader, start, wrapper, salvage=salvage)
        return _decompressed(reader, name, start, wrapper, salvage)
    compression = wrappers.compression_of(head)
    if compression:
        return _decompressed(reader, name, 0, wrappers.Wrapper(compression, compression), salvage)
    if not head:
        raise FormatError("empty file, not a snapshot", file=name)
    raise FormatError(
        "not a snapshot format snapfmt reads",
        file=name,
        offset=0,
        found=f"first bytes {head[:8].hex()}",
        expected=f"native magic {nf.MAGIC.hex()} or QEMU's {qf.MAGIC.hex()}",
    )


def _stream(
    reader: FileReader,
    start: int = 0,
    wrapper: wrappers.Wrapper | None = None,
    origin: str | None = None,
    salvage: bool = False,
) -> Snapshot:
    from snapfmt.qemu.snapshot import QemuStream

    return QemuStream(reader, start, wrapper, origin, salvage=salvage)


def _decompressed(
    reader: FileReader, name: str, start: int, wrapper: wrappers.Wrapper, salvage: bool = False
) -> Snapshot:
    """A QEMU stream inside compressed data: decompressed to a temporary file first."""
    fd = wrappers.decompress_to_temp(name, start, wrapper.compression, salvage)
    inner = FileReader.from_fd(fd, f"{name} ({wrapper.compression}-decompressed)")
    try:
        stream = _stream(inner, 0, wrapper, origin=name, salvage=salvage)
    except BaseException:
        inner.close()
        raise
    reader.close()
    return stream
