"""Delta snapshots (spec/format.md §7): a file whose RAM chunks may live in a parent.

A delta's header has the `DELTA` flag and its parent's snapshot id; its `parent`
metadata document names the parent's file, relative to the delta's own folder.  The
parent is opened when a chunk first needs it, and must have that id: a parent that was
changed, replaced or lost is a clear error, never other bytes.  A parent may itself be a
delta, up to MAX_CHAIN files deep.
"""

from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

from snapfmt.errors import FormatError, ParentError, WriteError
from snapfmt.formats import native as nf

if TYPE_CHECKING:
    from snapfmt.model import ChunkInfo
    from snapfmt.native.chunks import ChunkCodec, Encoded
    from snapfmt.native.ramblock import NativeRamBlock
    from snapfmt.native.reader import NativeSnapshot

MAX_CHAIN = 32  # files in a chain, the delta included
TABLE_STEP = 8192  # parent chunk table entries read at a time
_ID = re.compile(r"[0-9a-f]{32}")


class Reference(NamedTuple):
    """What a delta says of its parent: its file (as written) and snapshot id."""

    file: str
    id: bytes
    length: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "id": self.id.hex(), "length": self.length}


def reference_for(parent: NativeSnapshot, target: str) -> Reference:
    """The reference a delta written to *target* keeps to *parent*: the parent's file
    relative to the delta's folder (so the two may move together), its id and length."""
    folder = os.path.dirname(os.path.abspath(target))
    return Reference(
        os.path.relpath(os.path.abspath(parent.origin), folder),
        parent.snapshot_id,
        os.path.getsize(parent.origin),
    )


def reference(snap: NativeSnapshot) -> Reference | None:
    """The parent a delta names; None for a standalone file."""
    if not snap.flags & nf.HeaderFlag.DELTA:
        return None
    try:
        document = snap.metadata(nf.PARENT_DOCUMENT)
    except KeyError:
        raise ParentError(
            f"is a delta snapshot without the {nf.PARENT_DOCUMENT!r} document that names "
            "its parent",
            file=snap.origin,
        ) from None
    file, id_text, length = (
        (document.get("file"), document.get("id"), document.get("length"))
        if isinstance(document, dict)
        else (None, None, None)
    )
    if not (
        isinstance(file, str)
        and file
        and "\0" not in file
        and isinstance(id_text, str)
        and _ID.fullmatch(id_text)
        and type(length) is int
        and length >= 0
    ):
        raise ParentError(
            f"the {nf.PARENT_DOCUMENT!r} document is not {{file, id (32 hex digits), length}}",
            file=snap.origin,
        )
    if bytes.fromhex(id_text) != snap.parent_id:
        raise ParentError(
            f"the {nf.PARENT_DOCUMENT!r} document's id differs from the header's",
            file=snap.origin,
            found=id_text,
            expected=snap.parent_id.hex(),
        )
    return Reference(file, snap.parent_id, length)


def open_parent(snap: NativeSnapshot) -> NativeSnapshot:
    """The parent of delta *snap*, checked to be the file the delta was made from."""
    from snapfmt.native.reader import NativeSnapshot
    from snapfmt.opener import open_snapshot

    ref = reference(snap)
    assert ref is not None
    if snap.depth + 1 >= MAX_CHAIN:
        raise ParentError(f"the chain of parents is more than {MAX_CHAIN} files long",
                          file=snap.origin)  # fmt: skip
    where = os.path.join(os.path.dirname(os.path.abspath(snap.origin)), ref.file)
    shown = os.path.normpath(where)
    if not os.path.isfile(where):
        raise ParentError(f"its parent {shown} (id {ref.id.hex()}) is missing", file=snap.origin)
    try:
        parent = open_snapshot(where)
    except FormatError as e:
        raise ParentError(f"its parent {shown} cannot be read: {e}", file=snap.origin) from None
    if not isinstance(parent, NativeSnapshot) or parent.snapshot_id != ref.id:
        found = parent.snapshot_id.hex() if isinstance(parent, NativeSnapshot) else "not native"
        parent.close()
        raise ParentError(
            f"its parent {shown} is not the snapshot it was made from (changed or replaced)",
            file=snap.origin,
            found=f"id {found}",
            expected=f"id {ref.id.hex()}",
        )
    parent.depth = snap.depth + 1
    return parent


def chain(snap: NativeSnapshot) -> list[tuple[Reference, str | None]]:
    """Each parent up the chain with what is wrong with it (None when it opened and is
    the file it should be); stops at the first that is wrong."""
    found: list[tuple[Reference, str | None]] = []
    current = snap
    while True:
        try:
            ref = reference(current)
        except ParentError as e:
            found.append((Reference("?", current.parent_id, 0), e.detail))
            return found
        if ref is None:
            return found
        try:
            current = current.parent()
        except ParentError as e:
            found.append((ref, e.detail))
            return found
        found.append((ref, None))


class ParentChunks:
    """Where a delta's RAM block reads its PARENT chunks: the parent's block of the same
    path and chunk size, opened on first use, its chunk table read a piece at a time."""

    def __init__(self, block: NativeRamBlock) -> None:
        self._block = block
        self._theirs: NativeRamBlock | None = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def _parent(self) -> NativeRamBlock:
        mine = self._block
        with self._lock:
            if self._theirs is None:
                snap = mine._snap.parent()
                try:
                    theirs = snap.ram_block(mine.path)
                except KeyError:
                    raise mine._error(FormatError, f"the parent {snap.origin} has no RAM block "
                                      f"{mine.path}", mine.section.offset) from None  # fmt: skip
                if theirs.chunk_size != mine.chunk_size:
                    raise mine._error(
                        FormatError, f"the parent's {mine.path} has another chunk size",
                        mine.section.offset, found=theirs.chunk_size, expected=mine.chunk_size,
                    )  # fmt: skip
                self._theirs = theirs
            return self._theirs

    def _entry(self, c: ChunkInfo) -> tuple[NativeRamBlock, ChunkInfo]:
        """The parent's block, and its chunk at *c*'s index (of the same length)."""
        theirs, mine = self._parent(), self._block
        if c.index >= theirs.chunk_count:
            raise mine._chunk_error(c, f"lives in the parent, whose {theirs.path} has "
                                    f"{theirs.chunk_count} chunks")  # fmt: skip
        first = c.index - c.index % TABLE_STEP
        cached = getattr(self._local, "table", None)
        if cached is None or cached[0] != first:
            raw = theirs.table_raw(first, min(TABLE_STEP, theirs.chunk_count - first))
            cached = self._local.table = (first, raw)
        entry = theirs.entries_at(first, cached[1], [c.index - first])[0]
        if entry.length != c.length:
            raise mine._chunk_error(c, f"lives in the parent, whose chunk {c.index} has "
                                    f"{entry.length} bytes")  # fmt: skip
        return theirs, entry

    def decode(self, c: ChunkInfo, dest: memoryview | None) -> None:
        """Decode PARENT chunk *c* from the parent's chunk at the same index (which must
        have the same hash) into *dest*, or with no *dest* only check it."""
        theirs, entry = self._entry(c)
        if entry.hash != c.hash:
            raise self._block._chunk_error(c, f"lives in the parent, whose chunk {c.index} is "
                                           f"another (hash {entry.hash:016x}, expected "
                                           f"{c.hash:016x})")  # fmt: skip
        source = theirs._read_at(entry.file_offset, entry.stored_length)
        theirs._decode(theirs._codec(), entry, source, dest)

    def base(self, c: ChunkInfo, dest: memoryview) -> None:
        """The parent's chunk at *c*'s index into *dest*: what a PARENT_PAGES chunk's
        pages replace (the result is checked against *c*'s hash)."""
        theirs, entry = self._entry(c)
        source = theirs._read_at(entry.file_offset, entry.stored_length)
        theirs._decode(theirs._codec(), entry, source, dest)


# -- writing ---------------------------------------------------------------------------


def open_parent_for(parent: str | os.PathLike[str], target: str) -> NativeSnapshot:
    """The parent a delta written to *target* is made against: a native snapshot."""
    from snapfmt.native.reader import NativeSnapshot
    from snapfmt.opener import open_snapshot

    name = os.fspath(parent)
    if os.path.exists(name) and os.path.exists(target) and os.path.samefile(name, target):
        raise WriteError("is the parent named; a delta is written to another file", file=target)
    snap = open_snapshot(name)
    if not isinstance(snap, NativeSnapshot):
        snap.close()
        raise WriteError(f"the parent {name} is a {snap.format_name} snapshot; a delta's "
                         "parent is a native one (convert it first)", file=target)  # fmt: skip
    return snap


def encode_against(
    codec: ChunkCodec, pieces: list[bytes | memoryview], theirs: NativeRamBlock, first: int
) -> list[Encoded]:
    """Chunks *first*, *first* + 1, ... of a delta's block, against the parent's block
    *theirs*: PARENT where the parent's chunk is the same, PARENT_PAGES where only a few
    pages differ and that is smaller, else the chunk's own encoding (spec/format.md §7)."""
    count = max(0, min(len(pieces), theirs.chunk_count - first))
    parents = (
        theirs.entries_at(first, theirs.table_raw(first, count), range(count)) if count else []
    )
    out: list[Encoded] = []
    for i, piece in enumerate(pieces):
        their = parents[i] if i < count else None
        if their is None or their.encoding == nf.ChunkEncoding.ZERO:
            out.append(codec.encode(piece))
            continue
        digest = nf.xxh3_64(piece)
        if their.hash == digest and their.length == len(piece):
            out.append((int(nf.ChunkEncoding.PARENT), None, digest))
            continue
        plain = codec.encode(piece)
        if their.length == len(piece) and plain[1] is not None:
            base = theirs.decode([their], reuse=True)[0]
            pages = codec.encode_against(piece, base, digest)
            if pages is not None and pages[1] is not None and len(pages[1]) < len(plain[1]):
                plain = pages
        out.append(plain)
    return out
