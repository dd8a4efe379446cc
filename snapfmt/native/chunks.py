"""Chunk encodings (spec/format.md §3, "RAM blocks"): the hot path of writer and reader.

A chunk is cut into pages of the block's page size.  An all-zero chunk stores nothing.  A
chunk with some zero pages stores a bitmap of its non-zero pages and only those pages, raw
or as one zstd frame; a chunk with no zero page is stored raw or as one zstd frame.  Each
form is chosen only when it is smaller than the raw chunk.

All work here is on whole buffers handed to C (memcmp, memcpy, zstd, xxh3); Python only
loops over a chunk's pages, never over bytes.  One ChunkCodec per thread.
"""

from __future__ import annotations

from functools import cache, lru_cache

from snapfmt.formats.native import ChunkEncoding, xxh3_64

Encoded = tuple[int, bytes | memoryview | None, int]  # encoding, stored bytes, hash of the chunk
_FRAME_BITS_CLEAR = 0x10 | 0x08 | 0x04 | 0x03  # unused, reserved, checksum, dictionary id

# plain ints: comparing with IntEnum members costs an attribute lookup per chunk
_ZERO, _RAW, _ZSTD = int(ChunkEncoding.ZERO), int(ChunkEncoding.RAW), int(ChunkEncoding.ZSTD)
_PAGES_RAW, _PAGES_ZSTD = int(ChunkEncoding.PAGES_RAW), int(ChunkEncoding.PAGES_ZSTD)
_PARENT_PAGES = int(ChunkEncoding.PARENT_PAGES)


# Bounded: a hostile file may give many chunk lengths, each up to 16 MiB of zeros, and a
# process reading many files (the fuzzer, a service) must not keep them all.
@lru_cache(maxsize=8)
def zeros(length: int) -> bytes:
    return bytes(length)


@lru_cache(maxsize=64)
def zero_hash(length: int) -> int:
    return xxh3_64(zeros(length))


def bitmap_length(chunk_length: int, page_size: int) -> int:
    pages = -(-chunk_length // page_size)
    return (pages + 7) // 8


@cache
def _segments(page_size: int) -> list[tuple[tuple[int, int, bool], ...]]:
    """For each value of a bitmap byte, its eight pages as runs of stored pages and runs
    of zero pages, low bit first: (start, end, stored), in bytes from the byte's first
    page.  Decoding walks a chunk's bitmap through this table a byte at a time."""
    table = []
    for byte in range(256):
        runs, page = [], 0
        while page < 8:
            stored, start = bool(byte >> page & 1), page
            while page < 8 and bool(byte >> page & 1) == stored:
                page += 1
            runs.append((start * page_size, page * page_size, stored))
        table.append(tuple(runs))
    return table


def zero_page_flags(chunk: bytes | memoryview, page_size: int) -> list[bool]:
    """For each page of *chunk* (the last may be short), whether it holds a non-zero
    byte: the plain version, which `_no_zero_page` only ever cuts short."""
    length, page_zero = len(chunk), zeros(page_size)
    return [
        chunk[at : at + page_size] != page_zero[: min(page_size, length - at)]
        for at in range(0, length, page_size)
    ]


def _no_zero_page(chunk: bytes | memoryview, page_size: int) -> bool:
    """True when no page of *chunk* can be all zeros, because each begins with a non-zero
    word: one strided read of a word per page, in place of comparing every page
    (zero_page_flags holds the GIL for 12 us per 64 KiB chunk, this for about 1.6).
    False says only "look closer"."""
    with memoryview(chunk) as view:
        if view.nbytes % 8 or page_size % 8 or not view.c_contiguous:
            return False
        with view.cast("B").cast("Q") as words:
            return 0 not in words[:: page_size // 8].tolist()


class ChunkCodec:
    def __init__(self, page_size: int, level: int = 3) -> None:
        import zstandard  # (here: QEMU streams never need it)

        self.page_size = page_size
        self._zstd = zstandard
        self._cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._dctx = zstandard.ZstdDecompressor()
        self._zero_view = memoryview(b"")

    # -- writing -------------------------------------------------------------------------

    def encode(self, chunk: bytes | memoryview) -> Encoded:
        length = len(chunk)
        if chunk == zeros(length):
            return ChunkEncoding.ZERO, None, zero_hash(length)
        digest = xxh3_64(chunk)
        ps = self.page_size
        flags = None if _no_zero_page(chunk, ps) else zero_page_flags(chunk, ps)
        if flags is None or all(flags):
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

    def encode_against(
        self, chunk: bytes | memoryview, base: bytes | bytearray, digest: int
    ) -> Encoded | None:
        """*chunk* as the pages that differ from *base* (the parent's chunk at the same
        index, of the same length): PARENT_PAGES; None when nothing differs or the
        pages would not be smaller than the chunk."""
        length, ps = len(chunk), self.page_size
        view, theirs = memoryview(chunk), memoryview(base)
        differ = [view[at : at + ps] != theirs[at : at + ps] for at in range(0, length, ps)]
        if not any(differ):
            return None
        bitmap = bytearray(bitmap_length(length, ps))
        for page, changed in enumerate(differ):
            if changed:
                bitmap[page >> 3] |= 1 << (page & 7)
        kept = b"".join(view[p * ps : (p + 1) * ps] for p, changed in enumerate(differ) if changed)
        stored = bytes(bitmap) + self._cctx.compress(kept)
        return (_PARENT_PAGES, stored, digest) if len(stored) < length else None

    # -- reading -------------------------------------------------------------------------

    def _inflate(self, frame: bytes | memoryview, expected: int) -> bytes | str:
        """Decompress one frame of *expected* bytes; a string says what is wrong."""
        # Bits of the frame header descriptor a decoder would ignore or a writer never
        # sets (spec/format.md §3): the unused and reserved bits, the content checksum
        # and dictionary id flags.  A flipped one must not pass unnoticed.
        if len(frame) > 4 and frame[4] & _FRAME_BITS_CLEAR:
            return f"zstd frame header descriptor {frame[4]:#04x} has bits set that must be clear"
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
        what is wrong with the stored bytes.  The caller checks the hash.  For
        PARENT_PAGES, *dest* holds the parent's chunk, whose listed pages are replaced."""
        length = len(dest)
        if encoding < _PAGES_RAW:  # a whole chunk: zero, raw or zstd (the pages kinds after)
            if encoding == _ZERO:
                dest[:] = zeros(length)
            elif encoding == _RAW:
                dest[:] = stored
            else:
                data = self._inflate(stored, length)
                if isinstance(data, str):
                    return data
                dest[:] = data
            return None
        ps = self.page_size
        pages = -(-length // ps)
        nbitmap = (pages + 7) // 8  # (bitmap_length, without the call)
        if len(stored) < nbitmap:
            return "stored bytes are shorter than the page bitmap"
        bitmap = stored[:nbitmap].tobytes()
        bits = int.from_bytes(bitmap, "little")  # page i is bit i
        if bits >> pages:
            return "page bitmap has bits set past the chunk's last page"
        kept = bits.bit_count() * ps  # the stored pages' bytes, a short last page short
        if length % ps and bits >> (pages - 1):
            kept -= ps - length % ps
        payload: bytes | memoryview = stored[nbitmap:]
        if encoding != _PAGES_RAW:
            inflated = self._inflate(payload, kept)
            if isinstance(inflated, str):
                return inflated
            payload = memoryview(inflated)  # slices of a view copy nothing
        elif len(payload) != kept:
            return f"holds {len(payload)} page bytes, its bitmap says {kept}"
        # Each run of stored pages copied into place, each run of zero pages zeroed: the
        # runs of a bitmap byte come from a table (a run over two bytes is two copies).
        zero = self._zeros(length)
        table = _segments(ps)
        at = base = 0
        for byte in bitmap:
            for start, end, stored_run in table[byte]:
                start += base
                end += base
                if end > length:  # the chunk's last pages
                    end = length
                    if start >= end:
                        break
                if stored_run:
                    to = at + end - start
                    dest[start:end] = payload[at:to]
                    at = to
                elif encoding != _PARENT_PAGES:
                    dest[start:end] = zero[: end - start]
            base += 8 * ps
        return None

    def _zeros(self, length: int) -> memoryview:
        view = self._zero_view
        if len(view) < length:
            view = self._zero_view = memoryview(zeros(length))
        return view
