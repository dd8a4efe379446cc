"""RAM blocks whose path is known only after their bytes: encode now, place later.

`snapfmt save` gets a VM's RAM first and its device sections last, and a RAM block's path
(`/i440FX-pcihost/pci.0/e1000@05.0/rom`) comes from the device at its PCI address.  So
the block's chunks are encoded as they arrive into a staging file beside the output, and
placed into the snapshot once the path is known: the stored bytes are copied in the
kernel (copy_file_range), never decoded again, and the chunk table's offsets moved.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, NamedTuple

from snapfmt.errors import WriteError
from snapfmt.formats import native as nf
from snapfmt.native.sources import RamSource
from snapfmt.native.writer import Out, Writer, _str16
from snapfmt.paths import Path

if TYPE_CHECKING:
    from snapfmt.native.ramblock import NativeRamBlock

_COPY = 1 << 30  # bytes one copy_file_range call is asked for


class Staged(NamedTuple):
    data: IO[bytes]  # the stored chunks, offsets from 0
    table: IO[bytes]  # the chunk table, offsets into *data*
    length: int
    chunk_size: int
    chunks: int
    zeros: int

    def close(self) -> None:
        self.data.close()
        self.table.close()


def stage(
    writer: Writer,
    source: RamSource,
    *,
    chunk_size: int | None = None,
    theirs: NativeRamBlock | None = None,
    progress: Callable[[int], None] | None = None,
) -> Staged:
    """Encode a RAM block from *source* into a staging file in the output's folder (and,
    for a delta, against *theirs*, the parent's block it will replace)."""
    chunk_size = chunk_size or writer.chunk_size
    folder = os.path.dirname(os.path.abspath(writer.target))
    data = tempfile.TemporaryFile(dir=folder, prefix=".snapfmt-stage-")  # noqa: SIM115  (closed by Staged.close)
    table = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115
    try:
        out = Out(data)
        total, chunks, zeros = writer._chunks(source, chunk_size, table, progress, theirs, out)
        data.flush()
    except BaseException:
        data.close()
        table.close()
        raise
    return Staged(data, table, total, chunk_size, chunks, zeros)


def place(writer: Writer, path: Path, staged: Staged, qemu_idstr: str = "") -> None:
    """Write a staged block into the snapshot as the RAM block *path*."""
    key = _str16(str(path), "path", writer.target)
    writer._claim(nf.SectionKind.RAM_BLOCK, key)
    size = staged.data.seek(0, os.SEEK_END)
    writer._file.flush()
    data_offset = writer._pos
    _copy(staged.data.fileno(), writer._file, size, writer.target)
    writer._out.pos += size
    with tempfile.SpooledTemporaryFile(max_size=8 << 20) as table:
        staged.table.seek(0)
        entry = nf.CHUNK_ENTRY
        while piece := staged.table.read(entry.size * 8192):
            moved = bytearray(piece)
            for at in range(0, len(piece), entry.size):
                encoding, stored, offset, digest = entry.unpack_from(piece, at)
                if stored:
                    entry.pack_into(moved, at, encoding, stored, offset + data_offset, digest)
            table.write(moved)
        writer.finish_block(key, _str16(qemu_idstr, "QEMU identifier", writer.target),
                            staged.length, staged.chunk_size, staged.chunks, table, data_offset)  # fmt: skip


def _copy(source: int, target: IO[bytes], size: int, name: str) -> None:
    """*size* bytes of file *source* from its start to the end of *target*, in the kernel
    where it can (reads and writes otherwise)."""
    done = 0
    target.seek(0, os.SEEK_END)
    dest = target.fileno()
    try:
        while done < size:
            n = os.copy_file_range(source, dest, min(_COPY, size - done), done)
            if n <= 0:
                break
            done += n
    except OSError:  # (another file system, or no copy_file_range: plain copies)
        pass
    while done < size:
        piece = os.pread(source, min(1 << 22, size - done), done)
        if not piece:
            raise WriteError("the staged RAM block is cut short", file=name)
        os.write(dest, piece)
        done += len(piece)
    target.seek(0, os.SEEK_END)
