"""Chunk encodings (spec/format.md §3, "RAM blocks"): the hot path of writer and reader.

A chunk is cut into pages of the block's page size.  An all-zero chunk stores nothing.  A
chunk with some zero pages stores a bitmap of its non-zero pages and only those pages, raw
or as one zstd frame; a chunk with no zero page is stored raw or as one zstd frame.  Each
form is chosen only when it is smaller than the raw chunk.

All work here is on whole buffers handed to C (memcmp, memcpy, zstd, xxh3); Python only
loops over a chunk's pages, never over bytes.  One ChunkCodec per thread.
"""

from __future__ import annotations

from functools import cache

from snapfmt.formats.native import ChunkEncoding, xxh3_64

Encoded = tuple[int, bytes | None, int]  # encoding, stored bytes, hash of the plain chunk

# plain ints: comparing with IntEnum members costs an attribute lookup per chunk
_ZERO, _RAW, _ZSTD = int(ChunkEncoding.ZERO), int(ChunkEncoding.RAW), int(ChunkEncoding.ZSTD)
_PAGES_ZSTD = int(ChunkEncoding.PAGES_ZSTD)
_LAYOUT_CACHE = 4096


@cache
def zeros(length: int) -> bytes:
    return bytes(length)


@cache
def zero_hash(length: int) -> int:
    return xxh3_64(zeros(length))


def bitmap_length(chunk_length: int, page_size: int) -> int:
    pages = -(-chunk_length // page_size)
    return (pages + 7) // 8


def _byte_runs(byte: int) -> tuple[tuple[int, int], ...]:
    """The runs of set bits of one bitmap byte: (first page, pages), low bit first."""
    runs, page = [], 0
    while page < 8:
        if byte >> page & 1:
            start = page
            while page < 8 and byte >> page & 1:
                page += 1
            runs.append((start, page - start))
        else:
            page += 1
    return tuple(runs)


_BYTE_RUNS = [_byte_runs(byte) for byte in range(256)]


def page_runs(
    bitmap: bytes, chunk_length: int, page_size: int
) -> tuple[list[tuple[int, int]], int]:
    """The byte runs ``(start, length)`` of the chunk's stored pages, and their total.

    Each bitmap byte's runs come from a table of all 256; a run that ends a byte and
    one that starts the next are joined.
    """
    runs: list[list[int]] = []  # [first page, pages]
    for index, byte in enumerate(bitmap):
        base = index * 8
        for first, count in _BYTE_RUNS[byte]:
            if runs and runs[-1][0] + runs[-1][1] == base + first:
                runs[-1][1] += count
            else:
                runs.append([base + first, count])
    out: list[tuple[int, int]] = []
    total = 0
    for first, count in runs:
        start = first * page_size
        if start >= chunk_length:
            break
        length = min(count * page_size, chunk_length - start)
        out.append((start, length))
        total += length
    return out, total


class ChunkCodec:
    def __init__(self, page_size: int, level: int = 3) -> None:
        import zstandard  # (here: QEMU streams never need it)

        self.page_size = page_size
        self._zstd = zstandard
        self._cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._dctx = zstandard.ZstdDecompressor()
        self._layouts: dict[tuple[bytes, int], tuple[int, list[tuple[int, int]], int]] = {}

    # -- writing -------------------------------------------------------------------------

    def encode(self, chunk: bytes) -> Encoded:
        length = len(chunk)
        if chunk == zeros(length):
            return ChunkEncoding.ZERO, None, zero_hash(length)
        digest = xxh3_64(chunk)
        ps = self.page_size
        page_zero = zeros(ps)
        flags = [
            chunk[at : at + ps] != page_zero[: min(ps, length - at)] for at in range(0, length, ps)
        ]
        if all(flags):
            packed = self._cctx.compress(chunk)
            if len(packed) < length:
                return ChunkEncoding.ZSTD, packed, digest
            return ChunkEncoding.RAW, chunk, digest
        bitmap = bytearray(bitmap_length(length, ps))
        for page, stored in enumerate(flags):
            if stored:
                bitmap[page >> 3] |= 1 << (page & 7)
        kept = b"".join(chunk[p * ps : (p + 1) * ps] for p, stored in enumerate(flags) if stored)
        packed = self._cctx.compress(kept)
        if len(packed) < len(kept):
            encoding, stored_bytes = ChunkEncoding.PAGES_ZSTD, bytes(bitmap) + packed
        else:
            encoding, stored_bytes = ChunkEncoding.PAGES_RAW, bytes(bitmap) + kept
        if len(stored_bytes) >= length:  # a short chunk whose only zero page is short
            return ChunkEncoding.RAW, chunk, digest
        return encoding, stored_bytes, digest

    # -- reading -------------------------------------------------------------------------

    def _inflate(self, frame: bytes | memoryview, expected: int) -> bytes | str:
        """Decompress one frame of *expected* bytes; a string says what is wrong."""
        try:
            # The frame header's size is untrusted: check it against the chunk table
            # before the decompressor sizes a buffer from it.
            framed = self._zstd.frame_content_size(frame)
            if framed != expected:
                return f"zstd frame says {framed} bytes, expected {expected}"
            # allow_extra_data=False: bytes after the frame would be a change that
            # decompression alone could not notice.
            data: bytes = self._dctx.decompress(
                frame, max_output_size=expected, allow_extra_data=False
            )
        except self._zstd.ZstdError as e:
            return f"zstd frame does not decode ({str(e)[:80]})"
        if len(data) != expected:
            return f"decodes to {len(data)} bytes, expected {expected}"
        return data

    def decode_into(self, encoding: int, stored: memoryview, dest: memoryview) -> str | None:
        """Write the chunk's plain bytes into *dest* (its exact length); return None, or
        what is wrong with the stored bytes.  The caller checks the hash."""
        length = len(dest)
        if encoding == _ZERO:
            dest[:] = zeros(length)
            return None
        if encoding == _RAW:
            dest[:] = stored
            return None
        if encoding == _ZSTD:
            data = self._inflate(stored, length)
            if isinstance(data, str):
                return data
            dest[:] = data
            return None
        layout = self._layout(bytes(stored[: bitmap_length(length, self.page_size)]), length)
        if isinstance(layout, str):
            return layout
        nbitmap, runs, kept = layout
        payload: bytes | memoryview = stored[nbitmap:]
        if encoding == _PAGES_ZSTD:
            inflated = self._inflate(payload, kept)
            if isinstance(inflated, str):
                return inflated
            payload = memoryview(inflated)  # slices of a view copy nothing
        elif len(payload) != kept:
            return f"holds {len(payload)} page bytes, its bitmap says {kept}"
        at = end = 0  # copy each stored run into place, zero the gaps between them
        for start, size in runs:
            if start > end:
                dest[end:start] = zeros(start - end)
            dest[start : start + size] = payload[at : at + size]
            at += size
            end = start + size
        if end < length:
            dest[end:] = zeros(length - end)
        return None

    def _layout(self, bitmap: bytes, length: int) -> tuple[int, list[tuple[int, int]], int] | str:
        """Bitmap length, stored runs and their total; remembered, as bitmaps recur."""
        key = (bitmap, length)
        found = self._layouts.get(key)
        if found is None:
            pages = -(-length // self.page_size)
            if len(bitmap) < (pages + 7) // 8:
                return "stored bytes are shorter than the page bitmap"
            if pages % 8 and bitmap[-1] >> (pages % 8):
                return "page bitmap has bits set past the chunk's last page"
            runs, kept = page_runs(bitmap, length, self.page_size)
            if len(self._layouts) >= _LAYOUT_CACHE:
                self._layouts.clear()
            found = self._layouts[key] = (len(bitmap), runs, kept)
        return found
