"""Model to bytes: write a native snapshot (spec/format.md).

The file is written as a stream -- header, sections, index, footer -- into a temporary
file beside the target, then fsynced and renamed over it, so the target path holds either
the old file or the complete new one.  RAM blocks are read, hashed and compressed in
batches on a thread pool with a bounded number of batches in flight, and their chunk
tables are spooled to a temporary file, so memory does not grow with a block's size.
Output depends only on the input: no timestamps, no thread-timing effects.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import xxhash

from snapfmt import _io as atomic
from snapfmt._io import json_dumps
from snapfmt.errors import WriteError
from snapfmt.formats import native as nf
from snapfmt.native.chunks import ChunkCodec, Encoded, zero_hash
from snapfmt.native.delta import encode_against, open_parent_for, reference_for
from snapfmt.native.sources import RamSource, ZeroChunks, Zeros, batches, numbered
from snapfmt.paths import Path
from snapfmt.perf.parallel import ordered_map

if TYPE_CHECKING:
    from snapfmt.native.ramblock import NativeRamBlock
    from snapfmt.native.reader import NativeSnapshot

__all__ = ["MAX_CHUNKS", "RamSource", "Writer", "WrittenBlock", "Zeros"]


_BATCH_BYTES = 1 << 22
# Chunks one RAM block may have: its chunk table is then at most 1.5 GiB (a 4 TiB block of
# 64 KiB chunks); a larger block takes a larger chunk size (spec/format.md §1).
MAX_CHUNKS = 1 << 26


_STR16_MAX = 0xFFFF


class Out:
    """A file written front to back, and how far: the snapshot itself, or a staged RAM
    block's data (snapfmt.native.staging)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.pos = file, 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.file.write(data)
        self.pos += len(data)


class WrittenBlock(NamedTuple):
    path: Path
    length: int
    chunks: int
    zero_chunks: int
    stored: int


def _as_path(path: Path | str) -> Path:
    return path if isinstance(path, Path) else Path.parse(path)


def _str16(value: str, what: str, target: str) -> str:
    if len(value.encode("utf-8")) > _STR16_MAX:
        raise WriteError(f"{what} is longer than {_STR16_MAX} bytes", file=target)
    return value


class Writer:
    """Write a native snapshot; use as a context manager.

    >>> with Writer("vm.snap", machine="pc-i440fx-7.2") as w:      # doctest: +SKIP
    ...     w.add_device("/i440FX-pcihost/pci.0/e1000@05.0/vmstate", state, version_id=2)
    ...     w.add_ram_block("/pc.ram", "ram.bin")
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        machine: str,
        page_size: int = 4096,
        capabilities: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int = nf.DEFAULT_CHUNK_SIZE,
        level: int = 3,
        threads: int | None = None,
        parent: str | os.PathLike[str] | None = None,
    ) -> None:
        """With *parent* (a native snapshot), the file is a delta (spec/format.md §7):
        each RAM chunk equal to the parent's chunk at the same index is stored as a
        reference to it."""
        if page_size & (page_size - 1) or not nf.MIN_PAGE_SIZE <= page_size <= nf.MAX_PAGE_SIZE:
            raise WriteError(
                f"page size {page_size} is not a power of two from "
                f"{nf.MIN_PAGE_SIZE} to {nf.MAX_PAGE_SIZE}",
                file=os.fspath(path),
            )
        _check_chunk_size(chunk_size, page_size, os.fspath(path))
        self.target = os.fspath(path)
        self.page_size = page_size
        self.chunk_size = chunk_size
        self._level = level
        self._threads = threads or max(1, os.cpu_count() or 1)
        self._entries: list[dict[str, Any]] = []
        self._keys: set[tuple[str, str]] = set()
        fd, self._tmp = atomic.temp_beside(self.target)
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self._out = Out(self._file)
        self._closed = False
        self._local = threading.local()
        self._parent: NativeSnapshot | None = None
        self._minor = nf.VERSION_MINOR
        try:
            self._start(parent)
            body = nf.Configuration.build(
                {
                    "machine": _str16(machine, "machine type", self.target),
                    "page_size": page_size,
                    "capabilities": [_str16(c, "capability", self.target) for c in capabilities],
                    "metadata": self._json(dict(metadata or {}), "configuration metadata"),
                }
            )
            self._add_section(nf.SectionKind.CONFIGURATION, "", body, len(body))
            if self._parent is not None:
                ref = reference_for(self._parent, self.target)
                self._claim(nf.SectionKind.METADATA, nf.PARENT_DOCUMENT)
                self._metadata(nf.PARENT_DOCUMENT, ref.to_json())
        except BaseException:
            self.abort()
            raise

    def _start(self, parent: str | os.PathLike[str] | None) -> None:
        """The header: version 1.0, or for a delta 1.1 with its parent's id."""
        flags, parent_id = 0, bytes(16)
        if parent is not None:
            self._parent = open_parent_for(parent, self.target)
            flags, parent_id = nf.HeaderFlag.DELTA, self._parent.snapshot_id
            self._minor = nf.DELTA_VERSION_MINOR
        fields = {"version_major": nf.VERSION_MAJOR, "version_minor": self._minor,
                  "flags": int(flags), "parent_id": parent_id, "reserved": bytes(24)}  # fmt: skip
        self._write(nf.Header.build({"fields": {"value": fields}}))

    # -- plumbing ----------------------------------------------------------------------------

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self._out.write(data)

    @property
    def _pos(self) -> int:
        return self._out.pos

    def _json(self, document: Any, what: str) -> str:
        """*document* as compact, strict JSON (what a reader accepts)."""
        try:
            return json_dumps(document, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise WriteError(f"{what} is not a JSON document: {e}", file=self.target) from None

    def _claim(self, kind: nf.SectionKind, key: str) -> None:
        """Keys are unique per namespace: one for paths (devices and RAM blocks), one for
        metadata names (spec/format.md §3)."""
        if self._closed:
            raise WriteError("the writer is closed", file=self.target)
        if kind == nf.SectionKind.METADATA and not key:
            raise WriteError("a metadata section needs a name", file=self.target)
        space = "metadata" if kind == nf.SectionKind.METADATA else "path"
        if (space, key) in self._keys:
            raise WriteError(f"{space} {key!r} is used by two sections", file=self.target)
        self._keys.add((space, key))

    def _add_section(self, kind: nf.SectionKind, key: str, body: bytes, size: int) -> None:
        if len(body) > nf.MAX_BODY:
            raise WriteError(
                f"section {key!r} would take {len(body)} bytes, more than {nf.MAX_BODY}",
                file=self.target,
                offset=self._pos,
            )
        offset = self._pos
        self._write(body)
        self._entries.append(
            {
                "kind": kind,
                "flags": 0,
                "reserved": 0,
                "offset": offset,
                "length": len(body),
                "checksum": nf.xxh3_64(body),
                "data_offset": 0,
                "data_length": 0,
                "size": size,
                "key": key,
            }
        )

    # -- sections ----------------------------------------------------------------------------

    def add_device(
        self,
        path: Path | str,
        state: bytes,
        *,
        driver: str | None = None,
        vmstate_name: str | None = None,
        instance_id: int = 0,
        version_id: int = 1,
        layout: Mapping[str, Any] | None = None,
        qemu_idstr: str | None = None,
    ) -> None:
        """Add a device's state.  *driver* defaults to the name of the device node the
        path ends in (``e1000`` for ``…/e1000@05.0/vmstate``), *vmstate_name* to *driver*."""
        path = _as_path(path)
        key = _str16(str(path), "path", self.target)
        self._claim(nf.SectionKind.DEVICE, key)
        if driver is None:
            node = path.parent if path.leaf.name == "vmstate" and path.parent else path
            driver = node.leaf.name
        if not 0 <= instance_id <= 0xFFFFFFFF or not 0 <= version_id <= 0xFFFFFFFF:
            raise WriteError(
                f"device {key}: instance and version ids must fit in 32 bits", file=self.target
            )
        head = nf.DeviceState.build(
            {
                "path": key,
                "driver": _str16(driver, "driver", self.target),
                "vmstate_name": _str16(vmstate_name or driver, "vmstate name", self.target),
                "instance_id": instance_id,
                "version_id": version_id,
                "flags": 0,
                "qemu_idstr": _str16(qemu_idstr or "", "QEMU identifier", self.target),
                "layout": self._json(layout, f"field layout of {key}") if layout else "",
                "state_length": len(state),
            }
        )
        self._add_section(nf.SectionKind.DEVICE, key, head + bytes(state), len(state))

    def add_metadata(self, name: str, document: Any) -> None:
        """Add a free JSON document under *name* (not `parent`: spec/format.md §7)."""
        if name == nf.PARENT_DOCUMENT:
            raise WriteError(f"the metadata name {name!r} is kept for a delta's parent",
                             file=self.target)  # fmt: skip
        self._claim(nf.SectionKind.METADATA, _str16(name, "metadata name", self.target))
        self._metadata(name, document)

    def _metadata(self, name: str, document: Any) -> None:
        text = self._json(document, f"metadata {name!r}")
        body = nf.Metadata.build({"document": text})
        self._add_section(nf.SectionKind.METADATA, name, body, len(text.encode("utf-8")))

    def add_ram_block(
        self,
        path: Path | str,
        source: RamSource,
        *,
        length: int | None = None,
        qemu_idstr: str | None = None,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> WrittenBlock:
        """Add a RAM block read from a file path, a binary file object or an iterable of
        buffers.  With *length*, the source must give exactly that many bytes.  *chunk_size*
        overrides the writer's for this block."""
        path = _as_path(path)
        chunk_size = chunk_size or self.chunk_size
        _check_chunk_size(chunk_size, self.page_size, self.target)
        if length is not None and -(-length // chunk_size) > MAX_CHUNKS:
            larger = _chunk_for(length, self.page_size)
            hint = (f"give a chunk size of at least {larger:#x}" if larger <= nf.MAX_CHUNK_SIZE
                    else f"the native format holds at most {MAX_CHUNKS * nf.MAX_CHUNK_SIZE:#x} "
                    "bytes in one block")  # fmt: skip
            raise WriteError(
                f"RAM block {path}: {length:#x} bytes in chunks of {chunk_size:#x} would be "
                f"{-(-length // chunk_size)} chunks, more than the {MAX_CHUNKS} a block may "
                f"have; {hint}",
                file=self.target,
            )
        key = _str16(str(path), "path", self.target)
        qemu_idstr = _str16(qemu_idstr or "", "QEMU identifier", self.target)
        self._claim(nf.SectionKind.RAM_BLOCK, key)
        data_offset = self._pos
        theirs = self._parent_block(path, chunk_size)
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as table:
            total, chunks, zeros = self._chunks(source, chunk_size, table, progress, theirs)
            if length is not None and total != length:
                raise WriteError(
                    f"RAM block {key}: the source gave {total} bytes, expected {length}",
                    file=self.target,
                    offset=data_offset,
                )
            stored = self.finish_block(
                key, qemu_idstr, total, chunk_size, chunks, table, data_offset
            )
        return WrittenBlock(path, total, chunks, zeros, stored)

    def finish_block(self, key: str, qemu_idstr: str, total: int, chunk_size: int,
                     chunks: int, table: IO[bytes], data_offset: int) -> int:  # fmt: skip
        """After a RAM block's data region: its descriptor (head, then the chunk table
        spooled in *table*) and its index entry; returns the data region's length."""
        data_length = self._pos - data_offset
        head = {"path": key, "qemu_idstr": qemu_idstr, "length": total,
                "page_size": self.page_size, "chunk_size": chunk_size, "chunk_count": chunks}  # fmt: skip
        offset, checksum = self._pos, self._descriptor(nf.RamBlockHead.build(head), table)
        self._entries.append(
            {"kind": nf.SectionKind.RAM_BLOCK, "flags": 0, "reserved": 0, "offset": offset,
             "length": self._pos - offset, "checksum": checksum, "data_offset": data_offset,
             "data_length": data_length, "size": total, "key": key}
        )  # fmt: skip
        return data_length

    def _chunks(
        self,
        source: RamSource,
        chunk_size: int,
        table: IO[bytes],
        progress: Callable[[int], None] | None,
        theirs: NativeRamBlock | None = None,
        out: Out | None = None,
    ) -> tuple[int, int, int]:
        """Encode *source* chunk by chunk on the pool, writing the stored chunks and
        spooling their table entries to *table*; returns (bytes, chunks, zero chunks).
        A chunk equal to the one at its index in *theirs* (a parent's block) is a
        PARENT entry, neither compressed nor stored; one that differs in a few pages may
        store just those (PARENT_PAGES).  The chunks go to *out* (default: the file)."""
        out = out or self._out
        encode = functools.partial(self._encode_batch, chunk_size=chunk_size, theirs=theirs)
        total = chunks = zeros = 0
        pieces = numbered(batches(source, max(_BATCH_BYTES, chunk_size), chunk_size), chunk_size)
        zero_entry = nf.CHUNK_ENTRY.pack(nf.ChunkEncoding.ZERO, 0, 0, zero_hash(chunk_size))
        for (_, batch), results in ordered_map(encode, pieces, self._threads):
            if isinstance(batch, ZeroChunks):
                for first in range(0, batch, 1 << 16):  # (the table in bounded pieces)
                    table.write(zero_entry * min(1 << 16, batch - first))
                chunks, zeros, total = chunks + batch, zeros + batch, total + batch * chunk_size
                self._limit(chunks, chunk_size)
                if progress:
                    progress(batch * chunk_size)
                continue
            for encoding, payload, digest in results:
                stored = len(payload) if payload is not None else 0
                table.write(nf.CHUNK_ENTRY.pack(encoding, stored, out.pos if stored else 0, digest))
                if payload is not None:
                    out.write(payload)
                zeros += encoding == nf.ChunkEncoding.ZERO
            chunks += len(results)
            total += len(batch)
            self._limit(chunks, chunk_size)
            if progress:
                progress(len(batch))
        return total, chunks, zeros

    def _limit(self, chunks: int, chunk_size: int) -> None:
        if chunks > MAX_CHUNKS:
            raise WriteError(
                f"RAM block has more than {MAX_CHUNKS} chunks of {chunk_size:#x} bytes; "
                "a larger chunk size holds it",
                file=self.target,
            )

    def _descriptor(self, head: bytes, table: IO[bytes]) -> int:
        """Write a RAM block's descriptor (its head, then the spooled chunk table);
        returns its checksum."""
        hasher = xxhash.xxh3_64(head)
        self._write(head)
        table.seek(0)
        while piece := table.read(1 << 20):
            hasher.update(piece)
            self._write(piece)
        return int(hasher.intdigest())

    def _encode_batch(
        self, item: tuple[int, bytes | memoryview | ZeroChunks], chunk_size: int,
        theirs: NativeRamBlock | None,
    ) -> list[Encoded]:  # fmt: skip
        """Encode each chunk of a batch, chunk *first* on (runs on a pool thread)."""
        first, batch = item
        if isinstance(batch, ZeroChunks):
            return []
        codec = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = ChunkCodec(self.page_size, self._level)
        pieces = [batch[at : at + chunk_size] for at in range(0, len(batch), chunk_size)]
        if theirs is None or first >= theirs.chunk_count:
            return [codec.encode(piece) for piece in pieces]
        return encode_against(codec, pieces, theirs, first)

    def _parent_block(self, path: Path, chunk_size: int) -> NativeRamBlock | None:
        """The parent's block of *path* when its chunks line up with this block's."""
        if self._parent is None:
            return None
        try:
            block = self._parent.ram_block(path)
        except KeyError:
            return None
        return block if block.chunk_size == chunk_size else None

    # -- finishing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Write the index and footer, fsync, and rename into place."""
        if self._closed:
            return
        try:
            index = nf.Index.build({"entries": self._entries})
            index_offset = self._pos
            self._write(index)
            footer = {
                "fields": {
                    "value": {
                        "index_offset": index_offset,
                        "index_length": len(index),
                        "index_hash": nf.xxh3_64(index),
                        "version_major": nf.VERSION_MAJOR,
                        "version_minor": self._minor,
                        "section_count": len(self._entries),
                    }
                }
            }
            self._write(nf.Footer.build(footer))
            atomic.commit(self._file, self._tmp, self.target)
            self._closed = True
            self._close_parent()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop everything written; the target path is left as it was."""
        self._closed = True
        self._file.close()
        atomic.discard(self._tmp)
        self._close_parent()

    def _close_parent(self) -> None:
        if self._parent is not None:
            self._parent.close()
            self._parent = None

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _check_chunk_size(chunk_size: int, page_size: int, target: str) -> None:
    if (
        chunk_size & (chunk_size - 1)
        or chunk_size % page_size
        or not nf.MIN_CHUNK_SIZE <= chunk_size <= nf.MAX_CHUNK_SIZE
    ):
        raise WriteError(
            f"chunk size {chunk_size} is not a power of two, a multiple of the page size "
            f"{page_size}, from {nf.MIN_CHUNK_SIZE} to {nf.MAX_CHUNK_SIZE}",
            file=target,
        )


def _chunk_for(length: int, page_size: int) -> int:
    """The smallest chunk size that holds *length* bytes within MAX_CHUNKS."""
    size = max(nf.MIN_CHUNK_SIZE, page_size)
    while -(-length // size) > MAX_CHUNKS:
        size *= 2
    return size
