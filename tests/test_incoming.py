"""The pipe splitter `snapfmt save` reads QEMU's stream with (snapfmt.qemu.incoming):
the pages and skeleton it gives equal the stream's own contents, from a pipe or a file,
read into its one buffer however the pieces are cut, and a cut or unsupported stream is
a clean error."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path

import pytest

import snapfmt
from snapfmt.errors import SnapfmtError, TruncatedError
from snapfmt.opener import open_snapshot
from snapfmt.qemu.incoming import Splitter, pipe_reader
from tests.helpers import SAMPLES

STREAM = SAMPLES / "qemu" / "pc.mig"


def _split(source: object) -> tuple[dict[str, bytes], bytes]:
    """The block contents the pages make, and the skeleton."""
    splitter = Splitter(source)  # type: ignore[arg-type]
    blocks: dict[str, bytearray] = {}
    for page in splitter.pages():
        block = blocks.setdefault(page.block, bytearray(splitter.blocks[page.block]))
        data = page.data if page.data is not None else bytes([page.fill]) * page.length
        block[page.offset : page.offset + page.length] = data
    for name, length in splitter.blocks.items():
        blocks.setdefault(name, bytearray(length))
    return {k: bytes(v) for k, v in blocks.items()}, bytes(splitter.skeleton)


def _piped(data: bytes) -> io.FileIO:
    read_end, write_end = os.pipe()

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), open(write_end, "wb") as f:
            f.write(data)

    threading.Thread(target=feed, daemon=True).start()
    return pipe_reader(read_end)


class _ReadOnly:
    """A stream with read() only (no readinto), giving at most *most* bytes a call."""

    def __init__(self, data: bytes, most: int) -> None:
        self._data, self._at, self._most = data, 0, most

    def read(self, n: int = -1) -> bytes:
        n = min(n if n >= 0 else self._most, self._most)
        piece = self._data[self._at : self._at + n]
        self._at += len(piece)
        return piece


def test_pages_and_skeleton_are_the_stream_from_a_pipe_or_a_file(tmp_path: Path) -> None:
    plain = _split(io.FileIO(STREAM))
    pipe = _piped(STREAM.read_bytes())
    try:
        piped = _split(pipe)
    finally:
        pipe.close()
    assert piped == plain
    with snapfmt.open(STREAM) as snap:  # the pages are the stream's RAM
        for block in snap.ram_blocks():
            assert plain[0][str(block.qemu_idstr)] == block.read(0, block.length)
        devices = {str(d.path): d.data for d in snap.devices()}
    skeleton = tmp_path / "skeleton.mig"
    skeleton.write_bytes(plain[1])
    with open_snapshot(skeleton) as snap:  # the skeleton is the stream less its pages
        assert {str(d.path): d.data for d in snap.devices()} == devices
        assert snap.check().problems == [] or all(
            "page" in p.message for p in snap.check().problems
        )


@pytest.mark.parametrize("read", [4099, 1 << 14])
@pytest.mark.parametrize("most", [1, 777, 5000, None])
def test_the_reused_buffer_keeps_every_byte(
    monkeypatch: pytest.MonkeyPatch, read: int, most: int | None
) -> None:
    """The splitter reads into one buffer again and again, what is left of a record
    moved to its front: small reads, pieces cut anywhere (a pipe gives what it holds),
    with readinto or read only, and a save's heap padding on (perf.heap)."""
    from snapfmt.perf import heap
    from snapfmt.qemu import incoming

    plain = _split(io.FileIO(STREAM))
    monkeypatch.setattr(incoming, "READ", read)
    data = STREAM.read_bytes()
    with heap.kept(64 << 20):
        got = _split(_ReadOnly(data, most) if most else _piped(data))
    assert got == plain


@pytest.mark.parametrize("cut", [4, 9, 200, 5000, 100_000])
def test_a_cut_stream_is_a_clean_error(cut: int) -> None:
    data = STREAM.read_bytes()[:cut]
    with pytest.raises(SnapfmtError):
        _split(io.BytesIO(data))


def test_an_unsupported_record_is_refused() -> None:
    data = bytearray(STREAM.read_bytes())
    listed = data.index(b"\x06pc.ram")  # in the block list; then its first page record
    at = data.index(b"\x06pc.ram", listed + 1) - 8  # that record's word
    assert data[at + 7] & 0x0A  # (a zero or whole page, naming its block)
    data[at + 7] |= 0x40  # XBZRLE
    with pytest.raises(SnapfmtError, match="not supported by save"):
        _split(io.BytesIO(bytes(data)))


def test_the_end_of_the_stream_is_reported_where_it_is() -> None:
    data = STREAM.read_bytes()[:1000]
    with pytest.raises(TruncatedError, match="ends early"):
        _split(io.BytesIO(data))
