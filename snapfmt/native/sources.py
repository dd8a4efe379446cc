"""RAM sources for the writer: a file, a file object or an iterable of buffers (with
runs of zeros that are never made), cut into batches of whole chunks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import IO

__all__ = ["RamSource", "ZeroChunks", "Zeros", "batches", "numbered"]


class Zeros(int):
    """In a RAM source's pieces: that many zero bytes, never made.  A run of them costs
    one chunk table entry per whole chunk and no bytes, however long it is."""

    __slots__ = ()


RamSource = str | os.PathLike[str] | IO[bytes] | Iterable[bytes | bytearray | memoryview | Zeros]


class ZeroChunks(int):
    """A batch of that many all-zero chunks (from a Zeros run), passed through as is."""

    __slots__ = ()


def numbered(
    batches: Iterable[bytes | memoryview | ZeroChunks], chunk_size: int
) -> Iterator[tuple[int, bytes | memoryview | ZeroChunks]]:
    """Each batch with the index of its first chunk (every batch but the last ends on a
    chunk boundary)."""
    first = 0
    for batch in batches:
        yield first, batch
        first += int(batch) if isinstance(batch, ZeroChunks) else len(batch) // chunk_size


def batches(
    source: RamSource, size: int, chunk_size: int
) -> Iterator[bytes | memoryview | ZeroChunks]:
    """The source's bytes as pieces of whole chunks, at most *size* (the last may end
    short); the whole chunks of a Zeros run as one ZeroChunks (the pieces before it then
    end on a chunk).  A piece may be a view of a bytes object the source gave."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            yield from batches(f, size, chunk_size)
        return
    read = getattr(source, "read", None)
    if read is not None:
        pieces: Iterable[bytes | Zeros] = iter(lambda: read(size), b"")
    else:
        pieces = source  # type: ignore[assignment]
    pending = bytearray()
    done = 0  # bytes yielded
    for piece in pieces:
        if isinstance(piece, Zeros):
            run = int(piece)
            lead = min(run, -(done + len(pending)) % chunk_size)
            pending += bytes(lead)
            run -= lead
            whole = run // chunk_size
            if whole and pending:
                done += len(pending)
                yield bytes(pending)
                pending.clear()
            if whole:
                done += whole * chunk_size
                yield ZeroChunks(whole)
            pending += bytes(run - whole * chunk_size)
        else:
            # whole chunks go out as views of the piece, at most *size* at a time: no copy
            # of bytes, which cannot change; one of a buffer the source may reuse (the
            # views of iter_spans); only what does not fill a chunk waits in *pending*
            view = memoryview(piece if isinstance(piece, bytes) else bytes(piece))
            if pending:
                take = min(len(view), -len(pending) % chunk_size)
                pending += view[:take]
                view = view[take:]
                if len(pending) % chunk_size or (not view and len(pending) < size):
                    continue
                done += len(pending)
                yield bytes(pending)
                pending.clear()
            whole = len(view) - len(view) % chunk_size
            for at in range(0, whole, size):
                step = min(size, whole - at)
                done += step
                yield view[at : at + step]
            pending += view[whole:]
            continue
        while len(pending) >= size:
            done += size
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)
