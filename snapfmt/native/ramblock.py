"""RAM blocks of native snapshots: chunk table on demand, contents checked chunk by chunk.

Reading decodes chunks straight into reusable buffers on a thread pool (zstd and xxh3
release the GIL), so a full read allocates nothing per chunk and memory stays bounded.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import xxhash
from xxhash import xxh3_64_intdigest

from snapfmt.errors import ChecksumError, FormatError
from snapfmt.formats import native as nf
from snapfmt.model import ChunkInfo, RamBlock, SectionInfo
from snapfmt.native.chunks import ChunkCodec, zero_hash
from snapfmt.native.delta import ParentChunks
from snapfmt.paths import Path
from snapfmt.perf.compare import page_changes
from snapfmt.perf.parallel import WORKERS, forked_map, ordered_map

if TYPE_CHECKING:
    from snapfmt.native.reader import NativeSnapshot

BATCH_BYTES = 1 << 22
DIFF_STEP = 2048  # chunk table entries per piece of a diff (forked_map shares out pieces)
_PAIRS = 32  # differing chunk pairs decoded at a time
_SCREEN = 1 << 14  # bytes of two differing chunks compared at once, then their pages
_NONZERO = re.compile(rb"[^\x00]")
_RING_BUDGET = 1 << 25  # bytes of reusable output buffers iter_spans may hold
_TABLE_STEP = 8192  # chunk table entries read at a time
_ZERO, _RAW = int(nf.ChunkEncoding.ZERO), int(nf.ChunkEncoding.RAW)
_PARENT, _PARENT_PAGES = int(nf.ChunkEncoding.PARENT), int(nf.ChunkEncoding.PARENT_PAGES)
_KNOWN = frozenset(int(e) for e in nf.ChunkEncoding) - {_PARENT, _PARENT_PAGES}  # (any file's)


class NativeRamBlock(RamBlock):
    """A RAM block of a native snapshot."""

    def __init__(self, snapshot: NativeSnapshot, section: SectionInfo) -> None:
        self._snap = snapshot
        self.section = section
        self.file = snapshot.file
        self.path = Path.parse(section.key)
        self._verify_descriptor()
        peek = snapshot.pread(section.offset, min(section.length, 2 * 65535 + 64), "RAM block head")
        head = snapshot.parse(nf.RamBlockHead, peek, section.offset, f"RAM block {self.path}")
        self.qemu_idstr = head.qemu_idstr or None
        self.length: int = head.length
        self.page_size: int = head.page_size
        self.chunk_size: int = head.chunk_size
        self.chunk_count: int = head.chunk_count
        self._table_offset = section.offset + len(nf.RamBlockHead.build(head))
        self._check_head(head)
        self._local = threading.local()
        self._delta = bool(snapshot.flags & nf.HeaderFlag.DELTA)
        self._parents = ParentChunks(self) if self._delta else None

    def _error(self, cls: type[FormatError], what: str, offset: int, **kw: Any) -> FormatError:
        return cls(what, file=self.file, offset=offset, section=str(self.path), **kw)

    def _verify_descriptor(self) -> None:
        hasher = xxhash.xxh3_64()
        s = self.section
        for start in range(s.offset, s.offset + s.length, 1 << 20):
            length = min(1 << 20, s.offset + s.length - start)
            hasher.update(self._snap.pread(start, length, "RAM block descriptor"))
        if hasher.intdigest() != s.checksum:
            raise self._error(
                ChecksumError, "RAM block descriptor checksum does not match its bytes", s.offset
            )

    def _check_head(self, head: Any) -> None:
        def bad(what: str, found: object, expected: object) -> FormatError:
            return self._error(
                FormatError, what, self.section.offset, found=found, expected=expected
            )

        ps, cs = self.page_size, self.chunk_size
        if ps & (ps - 1) or not nf.MIN_PAGE_SIZE <= ps <= nf.MAX_PAGE_SIZE:
            raise bad("bad page size", ps, f"a power of two {nf.MIN_PAGE_SIZE}-{nf.MAX_PAGE_SIZE}")
        if cs & (cs - 1) or cs % ps or not nf.MIN_CHUNK_SIZE <= cs <= nf.MAX_CHUNK_SIZE:
            raise bad(
                "bad chunk size",
                cs,
                f"a power of two, multiple of {ps}, {nf.MIN_CHUNK_SIZE}-{nf.MAX_CHUNK_SIZE}",
            )
        if self.chunk_count != -(-self.length // cs):
            raise bad(
                "chunk count does not fit the block length", self.chunk_count, -(-self.length // cs)
            )
        table_end = self._table_offset + self.chunk_count * nf.CHUNK_ENTRY.size
        if table_end != self.section.offset + self.section.length:
            raise bad(
                "chunk table does not fill the descriptor",
                f"{table_end:#x}",
                f"{self.section.offset + self.section.length:#x}",
            )
        if self.length != self.section.size:
            raise bad("index size disagrees with the block length", self.section.size, self.length)
        if head.path != self.section.key:
            raise bad("descriptor path differs from the index", head.path, self.section.key)

    # -- chunk table -----------------------------------------------------------------------

    def _entries(self, first: int, count: int) -> list[ChunkInfo]:
        return self.entries_at(first, self.table_raw(first, count), range(count))

    def table_raw(self, first: int, count: int) -> bytes:
        """The raw chunk table entries [first, first+count)."""
        return self._snap.pread(
            self._table_offset + first * nf.CHUNK_ENTRY.size,
            count * nf.CHUNK_ENTRY.size,
            "chunk table",
        )

    def entries_at(self, first: int, raw: bytes, picks: Iterable[int]) -> list[ChunkInfo]:
        """Checked ChunkInfo objects for entries *picks* (relative to *first*) of *raw*,
        table entries from chunk *first* on.  A sound entry passes one test per
        encoding; any other goes to _bad_entry for the error that names what is wrong."""
        lo = self.section.data_offset
        hi = lo + self.section.data_length
        out = []
        size = nf.CHUNK_ENTRY.size
        unpack = nf.CHUNK_ENTRY.unpack_from
        chunk_size, block_length = self.chunk_size, self.length
        for pick in picks:
            i = first + pick
            enc, stored, offset, digest = unpack(raw, pick * size)
            start = i * chunk_size
            length = min(chunk_size, block_length - start)
            if enc == _ZERO:
                sound = not stored and not offset
            elif enc == _PARENT:
                sound = self._delta and not stored and not offset
            elif enc == _RAW:
                sound = stored == length and lo <= offset and offset + stored <= hi
            else:
                sound = (
                    (enc in _KNOWN or (enc == _PARENT_PAGES and self._delta))
                    and 0 < stored < length and lo <= offset and offset + stored <= hi
                )  # fmt: skip
            if not sound:
                self._bad_entry(i, enc, stored, offset, length)
            out.append(ChunkInfo(i, start, length, enc, stored, offset, digest))
        return out

    def _bad_entry(self, i: int, enc: int, stored: int, offset: int, length: int) -> None:
        """Raise the error for chunk table entry *i*, which entries_at found unsound."""
        lo = self.section.data_offset
        hi = lo + self.section.data_length
        entry_at = self._table_offset + i * nf.CHUNK_ENTRY.size
        if enc in (_PARENT, _PARENT_PAGES) and not self._delta:
            raise self._error(
                FormatError, f"chunk {i} lives in a parent, but the file is not a delta", entry_at
            )
        if enc == _PARENT:
            raise self._error(
                FormatError, f"chunk {i} lives in the parent but stores bytes", entry_at,
                found=f"{stored} bytes at {offset:#x}", expected="none",
            )  # fmt: skip
        if enc not in _KNOWN and enc != _PARENT_PAGES:
            raise self._error(
                FormatError,
                f"chunk {i} has an unknown encoding",
                entry_at,
                found=enc,
                expected="0-6",
            )
        low, high = {_ZERO: (0, 0), _RAW: (length, length)}.get(enc, (1, length - 1))
        if not low <= stored <= high:
            raise self._error(
                FormatError,
                f"chunk {i} has a bad stored length",
                entry_at,
                found=stored,
                expected=f"{low}-{high}",
            )
        if stored and (offset < lo or offset + stored > hi):
            raise self._error(
                FormatError,
                f"chunk {i} lies outside the block's data",
                entry_at,
                found=f"{offset:#x}+{stored:#x}",
                expected=f"within {lo:#x}-{hi:#x}",
            )
        raise self._error(
            FormatError,
            f"chunk {i} stores nothing but has an offset",
            entry_at,
            found=offset,
            expected=0,
        )

    def chunks(self) -> Iterator[ChunkInfo]:
        """The chunk table, in block order (each entry checked)."""
        for first in range(0, self.chunk_count, _TABLE_STEP):
            yield from self._entries(first, min(_TABLE_STEP, self.chunk_count - first))

    def summary(self) -> tuple[int, int, int]:
        chunks = zeros = stored = 0
        for chunk in self.chunks():
            chunks += 1
            zeros += chunk.encoding == _ZERO
            stored += chunk.stored_length
        return chunks, zeros, stored

    def differing_pages(
        self, other: RamBlock, length: int, progress: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, int, int]]:
        """As RamBlock.differing_pages; against another native block of this chunk size,
        a piece of the chunk tables at a time: chunks with equal hashes are never read,
        differing ones are decoded (each checked against its hash) and compared.  The
        pieces are shared with a forked process: decoding is Python around zstd, so
        threads would queue for the GIL."""
        if not isinstance(other, NativeRamBlock) or other.chunk_size != self.chunk_size:
            yield from super().differing_pages(other, length, progress)
            return
        count = -(-length // self.chunk_size)

        def piece(first: int) -> tuple[int, list[tuple[int, int, int]]]:
            n = min(DIFF_STEP, count - first)
            pairs = self._differing_pairs(other, first, n)
            out = []
            for at in range(0, len(pairs), _PAIRS):
                batch = pairs[at : at + _PAIRS]
                left = self.decode([ca for ca, _ in batch], reuse=True)
                right = other.decode([cb for _, cb in batch], reuse=True)
                for (ca, _), x, y in zip(batch, left, right, strict=True):
                    size = min(len(x), len(y), length - ca.offset)
                    if size < len(x) or size < len(y):
                        x, y = x[:size], y[:size]
                    out += page_changes(ca.offset, x, y, self.page_size, _SCREEN)
            return min(n * self.chunk_size, length - first * self.chunk_size), out

        for covered, changes in forked_map(piece, range(0, count, DIFF_STEP)):
            yield from changes
            if progress:
                progress(covered)

    def _differing_pairs(
        self, other: NativeRamBlock, first: int, n: int
    ) -> list[tuple[ChunkInfo, ChunkInfo]]:
        """The pairs of chunks [first, first + n) whose hashes differ.

        Hashes are compared in the raw tables, in C: byte k of every entry's hash is one
        strided slice, and the OR of the XORs of those planes (as big integers) is
        non-zero exactly at the entries that differ.  Only those become ChunkInfo."""
        size = nf.CHUNK_ENTRY.size
        raw_a, raw_b = self.table_raw(first, n), other.table_raw(first, n)
        merged = 0
        for k in range(size - 8, size):  # the hash ends each entry
            merged |= int.from_bytes(raw_a[k::size], "big") ^ int.from_bytes(raw_b[k::size], "big")
        if not merged:
            return []
        picks = [m.start() for m in _NONZERO.finditer(merged.to_bytes(n, "big"))]
        return list(zip(self.entries_at(first, raw_a, picks),
                        other.entries_at(first, raw_b, picks), strict=True))  # fmt: skip

    # -- contents --------------------------------------------------------------------------

    def _codec(self) -> ChunkCodec:
        codec = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = ChunkCodec(self.page_size)
        return codec

    def _chunk_error(self, chunk: ChunkInfo, what: str) -> ChecksumError:
        end = chunk.offset + chunk.length - 1
        return ChecksumError(
            f"chunk {chunk.index} (bytes {chunk.offset:#x}-{end:#x}) {what}",
            file=self.file,
            offset=chunk.file_offset or self._table_offset + chunk.index * nf.CHUNK_ENTRY.size,
            section=str(self.path),
        )

    def _stored(self, batch: list[ChunkInfo]) -> tuple[memoryview, int] | None:
        """The stored bytes of *batch* as one view, and the file offset it starts at; None
        for chunks too far apart to read in one go (a hand-made file)."""
        kept = [c for c in batch if c.stored_length]
        if not kept:
            return memoryview(b""), 0
        lo = min(c.file_offset for c in kept)
        hi = max(c.file_offset + c.stored_length for c in kept)
        if len(kept) > 1 and hi - lo > 2 * sum(c.stored_length for c in kept) + (1 << 16):
            return None
        return self._read_at(lo, hi - lo), lo

    def _read_at(self, offset: int, length: int) -> memoryview:
        """Bytes [offset, offset + length) of the file, in this thread's buffer (valid
        until its next read)."""
        buf = getattr(self._local, "stored", None)
        if buf is None or len(buf) < length:
            buf = self._local.stored = bytearray(max(length, BATCH_BYTES))
        view = memoryview(buf)[:length]
        if length and os.preadv(self._snap.fd, [view], offset) != length:
            raise self._error(FormatError, "chunk data is cut short", offset)
        return view

    def _decode(
        self, codec: ChunkCodec, c: ChunkInfo, src: memoryview, dest: memoryview | None
    ) -> None:
        """Decode one chunk into *dest* and check its hash; with no *dest*, only check
        (a ZERO chunk then costs nothing)."""
        encoding = c.encoding
        if encoding == _PARENT and self._parents is not None:
            self._parents.decode(c, dest)
            return
        if encoding == _ZERO:
            if c.hash != zero_hash(c.length):
                raise self._chunk_error(c, "zero chunk has a hash other than that of zeros")
            if dest is None:
                return
        if dest is None:
            dest = self._scratch(c.length)
        if encoding == _PARENT_PAGES and self._parents is not None:
            self._parents.base(c, dest)
        problem = codec.decode_into(encoding, src, dest)
        if problem:
            raise self._chunk_error(c, problem)
        if encoding != _ZERO and xxh3_64_intdigest(dest) != c.hash:
            raise self._chunk_error(c, "content does not match its hash")

    def _scratch(self, size: int) -> memoryview:
        buf = getattr(self._local, "scratch", None)
        if buf is None or len(buf) < size:
            buf = self._local.scratch = bytearray(size)
        return memoryview(buf)[:size]

    def _sources(self, batch: list[ChunkInfo]) -> Iterator[tuple[ChunkInfo, memoryview]]:
        """Each chunk of *batch* with its stored bytes, read in one go where possible."""
        together = self._stored(batch)
        if together is None:
            for c in batch:
                alone = self._stored([c])
                assert alone is not None  # (one chunk is never scattered)
                yield c, alone[0]
            return
        stored, base = together
        for c in batch:
            yield c, stored[c.file_offset - base : c.file_offset - base + c.stored_length]

    def decode(self, chunks: list[ChunkInfo], reuse: bool = False) -> list[bytearray]:
        """The plain bytes of *chunks* (any, in any order), each checked against its hash.

        Each chunk is read on its own (one preadv into this thread's buffer): chunks
        picked out of a block, as diff picks them, seldom lie next to one another.
        With *reuse*, the buffers are this thread's own and are filled again by its next
        call with *reuse*: fresh 64 KiB buffers cost a page fault for every 4 KiB, as
        the allocator hands freed memory back to the system between calls."""
        codec = self._codec()
        pool: list[bytearray] = getattr(self._local, "decoded", []) if reuse else []
        out = []
        for i, c in enumerate(chunks):
            if not reuse:
                dest = bytearray(c.length)
            elif i < len(pool) and len(pool[i]) == c.length:
                dest = pool[i]
            else:
                dest = bytearray(c.length)
                pool[i : i + 1] = [dest]
            self._checked(codec, c, self._read_at(c.file_offset, c.stored_length), memoryview(dest))
            out.append(dest)
        if reuse:
            self._local.decoded = pool
        return out

    def _fill(self, batch: list[ChunkInfo], out: memoryview) -> None:
        """Decode consecutive chunks into *out*, checking each against its hash."""
        codec = self._codec()
        first = batch[0].offset
        for c, src in self._sources(batch):
            self._checked(codec, c, src, out[c.offset - first : c.offset - first + c.length])

    def _checked(self, codec: ChunkCodec, c: ChunkInfo, src: memoryview, dest: memoryview) -> None:
        """Decode chunk *c* from its stored bytes *src* into *dest*.  A snapshot opened to
        salvage it gets a bad chunk as zeros, noted in its lost chunks, rather than an
        error.  (A chunk's stored bytes lie inside its section, which lies inside the
        file: they cannot be cut.)"""
        try:
            self._decode(codec, c, src, dest)
        except FormatError as e:
            if not self._snap.salvaging:
                raise
            dest[:] = bytes(c.length)
            self._snap.lost_chunks.add((str(self.path), c.offset, c.length, e.detail))

    def _batches(self, first: int, last: int) -> Iterator[list[ChunkInfo]]:
        per = max(1, BATCH_BYTES // self.chunk_size)
        for start in range(first, last, per):
            yield self._entries(start, min(per, last - start))

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(
                f"range {offset:#x}+{length:#x} is outside {self.path} ({self.length:#x} bytes)"
            )
        if length == 0:
            return b""
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size + 1
        start = first * self.chunk_size
        out = bytearray(min(last * self.chunk_size, self.length) - start)
        view = memoryview(out)
        for batch in self._batches(first, last):
            self._fill(
                batch, view[batch[0].offset - start : batch[-1].offset + batch[-1].length - start]
            )
        skip = offset - start
        return bytes(view[skip : skip + length])

    def iter_spans(self, span: int = BATCH_BYTES) -> Iterator[tuple[int, memoryview]]:
        """The whole block in order.  Each view is valid until the next step of the
        iteration (its buffer is then reused); copy it with ``bytes()`` to keep it."""
        size = max(span, self.chunk_size)
        window = max(1, min(2 * WORKERS + 1, _RING_BUDGET // size))
        ring = [bytearray(size) for _ in range(window + 1)]
        per = max(1, span // self.chunk_size)

        def numbered() -> Iterator[tuple[int, list[ChunkInfo]]]:
            for n, first in enumerate(range(0, self.chunk_count, per)):
                yield n, self._entries(first, min(per, self.chunk_count - first))

        def job(item: tuple[int, list[ChunkInfo]]) -> memoryview:
            n, batch = item
            length = batch[-1].offset + batch[-1].length - batch[0].offset
            view = memoryview(ring[n % len(ring)])[:length]
            self._fill(batch, view)
            return view.toreadonly()

        for (_, batch), view in ordered_map(job, numbered(), window=window):
            yield batch[0].offset, view

    def verify(self, parents: bool = True) -> Iterator[tuple[ChunkInfo | None, FormatError]]:
        """Check every chunk, and that the stored chunks fill the data region in block
        order without gaps; yields each problem instead of raising.  A delta's chunks in
        the parent are checked there too, unless not *parents*."""

        def job(batch: list[ChunkInfo]) -> list[tuple[ChunkInfo, FormatError]]:
            codec = self._codec()
            bad: list[tuple[ChunkInfo, FormatError]] = []
            try:
                sources = list(self._sources(batch))
            except FormatError as e:
                return [(batch[0], e)]
            for c, src in sources:
                if c.encoding in (_PARENT, _PARENT_PAGES) and not parents:
                    continue
                try:
                    self._decode(codec, c, src, None)
                except FormatError as e:
                    bad.append((c, e))
            return bad

        expected = self.section.data_offset
        for batch, errors in ordered_map(job, self._batches(0, self.chunk_count)):
            yield from errors
            for c in batch:
                if c.stored_length and c.file_offset != expected:
                    yield (
                        c,
                        self._chunk_error(
                            c,
                            f"is stored at {c.file_offset:#x}, expected {expected:#x} (chunks must fill the data region in order)",
                        ),
                    )
                expected = max(expected, c.file_offset + c.stored_length)
        end = self.section.data_offset + self.section.data_length
        if expected != end:
            yield (
                None,
                self._error(
                    FormatError,
                    "stored chunks do not fill the data region",
                    expected,
                    found=f"end at {expected:#x}",
                    expected=f"{end:#x}",
                ),
            )
