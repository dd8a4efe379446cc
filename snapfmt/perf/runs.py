"""Arithmetic progressions of fixed-width integers, made and matched in C.

A QEMU stream sent in order is mostly runs of records whose headers go up by one page
(the next page of one block, one kind), and a page map of such a run holds file offsets
that go up by one record.  The walk and the page-map readers check and fill whole runs
at once with these helpers instead of entry by entry; each has a plain version
(``*_plain``) that the tests hold it equal to.
"""

from __future__ import annotations

from typing import Any, Literal

Order = Literal["little", "big"]
_SERIES: dict[tuple[int, int, int], tuple[int, int]] = {}  # (width, stride, terms): (R, stride*S)


def progression(first: int, stride: int, n: int, width: int, order: Order = "big") -> bytes:
    """first, first + stride, ... (n terms, none negative), each *width* bytes in byte
    *order*, made with big-integer arithmetic rather than term by term.  With
    x = 256**width, R = sum(x**i) and S = sum(i * x**i) over at least n terms:
    first * R + stride * S holds the terms from the lowest digit up (little-endian
    bytes in order), and last * R - stride * S holds them from the highest down (so
    big-endian bytes write the first term first); only the low n terms are kept."""
    terms = 1 << max(n - 1, 1).bit_length()  # a few sizes, each kept once made
    series = _SERIES.get((width, stride, terms))
    if series is None:
        ones = int.from_bytes((b"\x01" + bytes(width - 1)) * terms, "little")
        counts = b"".join(i.to_bytes(width, "little") for i in range(terms))
        series = _SERIES[width, stride, terms] = ones, stride * int.from_bytes(counts, "little")
    ones, steps = series
    last = first + (n - 1) * stride
    value = first * ones + steps if order == "little" else last * ones - steps
    return (value & ((1 << (8 * width * n)) - 1)).to_bytes(width * n, order)


def progression_plain(first: int, stride: int, n: int, width: int, order: Order = "big") -> bytes:
    return b"".join((first + i * stride).to_bytes(width, order) for i in range(n))


def run_length(buf: Any, rel: int, word: int, page: int, step: int, limit: int) -> int:
    """How many RAM records from ``buf[rel]`` on continue the one there: headers word,
    word + page, word + 2 * page... each *step* bytes long (8 + page for a whole page;
    9 for a zero page, whose fill byte must then be 0).  At least 1, at most *limit*.

    The headers are gathered by one strided copy (each is touched once: each lies on
    its own memory page) and compared with the expected progression as one byte string;
    where they differ, the XOR of the two as big integers gives the first that does."""
    if step == 9:  # zero records: header and fill byte back to back
        width, found = 9, bytes(buf[rel : rel + limit * step])
        wanted = progression(word << 8, page << 8, limit, 9)
    else:
        width = 8
        with memoryview(buf) as view:
            # (the last record's page may lie past the window: its header is enough)
            found = view[rel : rel + (limit - 1) * step + 8].cast("Q")[:: step // 8].tobytes()
        wanted = progression(word, page, limit, 8)
    if found == wanted:
        return limit
    diff = int.from_bytes(found, "big") ^ int.from_bytes(wanted, "big")
    return max((len(found) - (diff.bit_length() + 7) // 8) // width, 1)


def run_length_plain(buf: Any, rel: int, word: int, page: int, step: int, limit: int) -> int:
    count = 1
    while count < limit:
        at = rel + count * step
        expected = (word + count * page).to_bytes(8, "big") + (b"\0" if step == 9 else b"")
        if bytes(buf[at : at + len(expected)]) != expected:
            break
        count += 1
    return count
