"""Pages QEMU sent encoded (reference §2): XBZRLE deltas and COMPRESS_PAGE zlib data.

An XBZRLE record changes the page as the destination holds it -- the block's page as the
stream sent it before -- and a COMPRESS_PAGE record inflates over it.  The walk keeps no
page: such a page's map entry is ``ENCODED - k``, naming step *k* of its block's step
log, two words per record: the page's map entry before that record (an offset, ZERO_PAGE,
NOT_SENT or an earlier step) and where the record's own header lies, times two, plus
its kind.  A read follows the steps back to a page sent whole (or to zeros) and applies
them forwards, so reading a page costs the records sent for it, and the log costs 16
bytes a record (a record takes at least 11 in the file).
"""

from __future__ import annotations

import zlib
from array import array
from typing import Any

from snapfmt._io import FileReader
from snapfmt.errors import FormatError
from snapfmt.formats import qemu as qf

ENCODED = -2  # map entries at or below it name a step: ENCODED - k is step k
XBZRLE, COMPRESSED = 0, 1  # a step's kind: its header offset's lowest bit


def xbzrle_problem(delta: bytes, page: int) -> str | None:
    """Why QEMU's xbzrle_decode_buffer would refuse *delta* for a page of *page* bytes,
    or None.  A delta is pairs of runs: a count of bytes left as they are, then a count
    of new bytes and those bytes; counts are ULEB128 of at most two bytes, every count
    but the first skip is non-zero, and nothing goes past the page."""
    i = done = 0
    first = True
    while i < len(delta):
        for skip in (True, False):
            if len(delta) - i < 2:
                return "a run count is cut short"
            count, i = _uleb128(delta, i)
            if count < 0:
                return "a run count takes more than two bytes"
            if not count and not (skip and first):
                return "a run of length 0"
            if not skip and i + count > len(delta):
                return "new bytes go past the end of the delta"
            done += count
            if done > page:
                return "the delta goes past the end of the page"
            if not skip:
                i += count
        first = False
    return None


def _uleb128(data: bytes, i: int) -> tuple[int, int]:
    """QEMU's uleb128_decode_small at *i*: (value, next index), value -1 if it would take
    a third byte."""
    low = data[i]
    if not low & 0x80:
        return low, i + 1
    high = data[i + 1]
    if high & 0x80:
        return -1, i + 2
    return low & 0x7F | high << 7, i + 2


def apply_xbzrle(page: bytearray, delta: bytes) -> None:
    """Apply a delta xbzrle_problem accepted to *page*, in place."""
    i = at = 0
    while i < len(delta):
        skip, i = _uleb128(delta, i)
        count, i = _uleb128(delta, i)
        at += skip
        page[at : at + count] = delta[i : i + count]
        at += count
        i += count


def step(steps: array, prev: int, header: int, kind: int) -> int:  # type: ignore[type-arg]
    """Log a record (its header at file offset *header*) over a page whose map entry was
    *prev*; returns the page's new map entry."""
    k = len(steps) // 2
    steps.extend((prev, header * 2 + kind))
    return ENCODED - k


def decode(reader: FileReader, steps: Any, entry: int, page: int) -> bytearray:
    """The page whose map entry is *entry* (at or below ENCODED), as QEMU would hold it
    after loading every record logged for it."""
    chain = []
    while entry <= ENCODED:
        k = ENCODED - entry
        entry, where = steps[2 * k], steps[2 * k + 1]
        chain.append(where)
    buf = bytearray(reader.pread(entry, page, "RAM page")) if entry > 0 else bytearray(page)
    for where in reversed(chain):
        header, kind = divmod(where, 2)
        if kind == XBZRLE:
            length = qf.XbzrleHead.parse(reader.pread(header, 3, "XBZRLE header")).length
            apply_xbzrle(buf, reader.pread(header + 3, length, "XBZRLE page"))
        else:
            length = qf.CompressedHead.parse(reader.pread(header, 4, "compressed page")).length
            data = reader.pread(header + 4, length, "compressed page")
            try:
                inflater = zlib.decompressobj()
                out = inflater.decompress(data, page + 1)
            except zlib.error as e:
                raise FormatError(f"compressed RAM page does not inflate: {e}",
                                  file=reader.name, offset=header + 4) from None  # fmt: skip
            if len(out) > page or not inflater.eof:
                raise FormatError(
                    "compressed RAM page does not inflate to at most a page",
                    file=reader.name,
                    offset=header + 4,
                    found=f"{len(out)} bytes" + ("" if inflater.eof else " and more"),
                    expected=f"{page}",
                )
            buf[: len(out)] = out
    return buf
