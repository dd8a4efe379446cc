"""The RAM walk of QEMU streams against a model of the records, for streams built here.

The walk checks runs of records at once (``perf.runs.run_length``), held equal to its
plain version and to the plain reading of the records, across window boundaries and
without mmap; the page maps are split into runs (``pagemap.runs``)."""

from __future__ import annotations

import mmap
import os
import zlib
from array import array
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapfmt
from snapfmt.errors import SnapfmtError
from snapfmt.paths import Path as DevPath
from snapfmt.perf import runs as perf_runs
from snapfmt.qemu import pagemap
from snapfmt.qemu import records as ram_records

PAGE = 4096
CONTINUE, PAGE_FLAG, ZERO, MEM_SIZE, EOS = 0x20, 0x08, 0x02, 0x04, 0x10
XBZRLE, COMPRESS = 0x40, 0x100
# a record's tag: None (a zero page), an int or bytes (a whole page: its contents),
# ("x", seed) (an XBZRLE delta changing a few bytes of the page as sent before) or
# ("z", int) (that page's contents, compressed)
Tag = int | bytes | tuple[str, int] | None


def _page(tag: int | bytes) -> bytes:
    return tag if isinstance(tag, bytes) else tag.to_bytes(4, "big") * (PAGE // 4)


def _changed(old: bytes, seed: int) -> bytes:
    new = bytearray(old)
    for k in range(seed % 5 + 1):
        new[(seed * 37 + k * 613) % len(new)] ^= (seed + k) % 255 + 1
    return bytes(new)


def _uleb(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else bytes([n & 0x7F | 0x80, n >> 7])


def xbzrle(old: bytes, new: bytes) -> bytes:
    """An XBZRLE delta from *old* to *new*: (bytes alike, bytes new, the new bytes)..."""
    out, i, n = bytearray(), 0, len(new)
    while i < n:
        j = i
        while j < n and old[j] == new[j]:
            j += 1
        if j == n:
            break
        k = j
        while k < n and old[k] != new[k]:
            k += 1
        out += _uleb(j - i) + _uleb(k - j) + new[j:k]
        i = k
    return bytes(out)


def contents(old: bytes, tag: Tag) -> bytes:
    """The page after a record of *tag* over a page holding *old*."""
    if tag is None:
        return bytes(PAGE)
    if isinstance(tag, tuple):
        kind, value = tag
        return _changed(old, value) if kind == "x" else _page(value)
    return _page(tag)


def payload(old: bytes, tag: Tag) -> tuple[int, bytes]:
    """(flags, what follows the record's header) of a record of *tag*."""
    if tag is None:
        return ZERO, b"\x00"
    if isinstance(tag, tuple) and tag[0] == "x":
        delta = xbzrle(old, contents(old, tag))
        return XBZRLE, b"\x01" + len(delta).to_bytes(2, "big") + delta
    if isinstance(tag, tuple):
        data = zlib.compress(contents(old, tag))
        return COMPRESS, len(data).to_bytes(4, "big") + data
    return PAGE_FLAG, _page(tag)


def build(blocks: dict[str, int], sections: list[list[tuple[str, int, Tag]]]) -> bytes:
    """A QEVM stream: one RAM section declaring *blocks* (name: pages), then one PART
    per entry of *sections*, each a list of records (block, page index, Tag), then END
    and EOF."""
    image: dict[str, dict[int, bytes]] = {name: {} for name in blocks}  # pages sent so far
    out = bytearray(b"QEVM" + (3).to_bytes(4, "big"))
    out += b"\x07" + (12).to_bytes(4, "big") + b"pc-i440fx-72"
    out += b"\x01" + (1).to_bytes(4, "big") + b"\x03ram" + (0).to_bytes(4, "big")
    out += (4).to_bytes(4, "big")
    total = sum(blocks.values()) * PAGE
    out += (total | MEM_SIZE).to_bytes(8, "big")
    for name, pages in blocks.items():
        out += bytes([len(name)]) + name.encode() + (pages * PAGE).to_bytes(8, "big")
    out += EOS.to_bytes(8, "big") + b"\x7e" + (1).to_bytes(4, "big")
    for records in sections:
        out += b"\x02" + (1).to_bytes(4, "big")
        last = None
        for name, index, tag in records:
            old = image[name].get(index, bytes(PAGE))
            flags, data = payload(old, tag)
            image[name][index] = contents(old, tag)
            if name == last:
                out += (index * PAGE | flags | CONTINUE).to_bytes(8, "big")
            else:
                out += (index * PAGE | flags).to_bytes(8, "big")
                out += bytes([len(name)]) + name.encode()
            last = name
            out += data
        out += EOS.to_bytes(8, "big") + b"\x7e" + (1).to_bytes(4, "big")
    out += b"\x03" + (1).to_bytes(4, "big") + EOS.to_bytes(8, "big")
    out += b"\x7e" + (1).to_bytes(4, "big") + b"\x00"
    return bytes(out)


def expected(
    blocks: dict[str, int], sections: list[list[tuple[str, int, Tag]]]
) -> dict[str, bytes]:
    image = {name: [bytes(PAGE)] * pages for name, pages in blocks.items()}
    for records in sections:
        for name, index, tag in records:
            image[name][index] = contents(image[name][index], tag)
    return {name: b"".join(pages) for name, pages in image.items()}


@st.composite
def streams(draw: st.DrawFn) -> tuple[dict[str, int], list[list[tuple[str, int, Tag]]]]:
    blocks = {"pc.ram": draw(st.integers(1, 300)), "vga.vram": draw(st.integers(1, 40))}
    tag = iter(range(1, 1 << 30))
    sections = []
    for _ in range(draw(st.integers(1, 4))):
        records: list[tuple[str, int, Tag]] = []
        for _ in range(draw(st.integers(0, 6))):
            name = draw(st.sampled_from(sorted(blocks)))
            start = draw(st.integers(0, blocks[name] - 1))
            count = draw(st.integers(1, blocks[name] - start))
            kind = draw(st.sampled_from(["page", "zero", "mixed", "encoded"]))
            for i in range(start, start + count):
                if kind == "mixed":
                    got = draw(st.sampled_from(["page", "zero", "x", "z"]))
                elif kind == "encoded":
                    got = draw(st.sampled_from(["x", "z"]))
                else:
                    got = kind
                value = next(tag)
                record: Tag = {"page": value, "zero": None}.get(got, (got, value))
                records.append((name, i, record))
        sections.append(records)
    return blocks, sections


def check(path: Path, blocks: dict[str, int], sections: list) -> None:
    want = expected(blocks, sections)
    sent_to = {name for records in sections for name, _, _ in records}
    with snapfmt.open(path) as stream:
        for name, data in want.items():
            block = stream.ram_block(DevPath.of(name))
            if name not in sent_to:  # no record: its contents are not in the stream
                assert block.missing and block.summary() == (blocks[name], 0, 0)
                with pytest.raises(SnapfmtError, match="no page of it is in the stream"):
                    block.read(0, block.length)
                continue
            assert not block.missing
            assert block.read(0, block.length) == data
            got = b"".join(bytes(view) for _, view in block.iter_spans(span=5 * PAGE))
            assert got == data
            sent = sum(data[i : i + PAGE] != bytes(PAGE) for i in range(0, len(data), PAGE))
            pages, unsent, stored = block.summary()
            assert pages == blocks[name]
            # a page sent with zero content still counts as sent data
            assert stored >= sent * PAGE
            assert pages - unsent == stored // PAGE
            out = path.parent / f"{name}.bin"
            fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                block.write_into(fd)
            finally:
                os.close(fd)
            assert out.read_bytes() == data


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(streams())
def test_walk_matches_the_records(tmp_path: Path, case: tuple) -> None:
    blocks, sections = case
    target = tmp_path / "s.mig"
    target.write_bytes(build(blocks, sections))
    check(target, blocks, sections)


@pytest.mark.parametrize("window", [1 << 16, 3 << 12])
def test_walk_across_small_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Runs cut by window ends, records straddling them."""
    monkeypatch.setattr(ram_records, "_MAP_WINDOW", window)
    blocks = {"pc.ram": 200, "vga.vram": 9}
    sections = [
        [("pc.ram", i, i + 1) for i in range(200)],
        [("pc.ram", i, None) for i in range(0, 200, 3)] + [("vga.vram", i, 7) for i in range(9)],
        [("pc.ram", i, 900 + i) for i in range(50, 150)],
    ]
    target = tmp_path / "s.mig"
    target.write_bytes(build(blocks, sections))
    check(target, blocks, sections)


def test_walk_without_mmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError("no mmap here")

    monkeypatch.setattr(ram_records.mmap, "mmap", refuse)
    blocks = {"pc.ram": 120, "vga.vram": 3}
    sections = [[("pc.ram", i, i + 1) for i in range(120)], [("vga.vram", 1, None)]]
    target = tmp_path / "s.mig"
    target.write_bytes(build(blocks, sections))
    check(target, blocks, sections)


@pytest.mark.parametrize("page", [0, 20, 60, 99])
def test_stream_cut_inside_a_run_is_refused(tmp_path: Path, page: int) -> None:
    data = build({"pc.ram": 100}, [[("pc.ram", i, i + 1) for i in range(100)]])
    cut = data.index(_page(page + 1)) + 100  # inside a page of a run
    target = tmp_path / "cut.mig"
    target.write_bytes(data[:cut])
    with pytest.raises(
        SnapfmtError, match=r"ram: stream ends inside (a RAM page|the RAM section)"
    ) as e:
        snapfmt.open(target)
    assert e.value.offset is not None and e.value.offset <= cut  # type: ignore[attr-defined]


def test_a_record_breaking_a_run_is_read_as_itself(tmp_path: Path) -> None:
    """A header inside a run that names another offset, or a zero page with a bad fill
    byte, ends the run there."""
    records = [("pc.ram", i, i + 1) for i in range(40)]
    records[25] = ("pc.ram", 39, 500)  # out of order: page 39 first sent here
    target = tmp_path / "s.mig"
    target.write_bytes(build({"pc.ram": 40}, [records]))
    check(target, {"pc.ram": 40}, [records])
    zero = build({"pc.ram": 40}, [[("pc.ram", i, None) for i in range(40)]])
    bad = bytearray(zero)
    first = bad.index(b"\x06pc.ram", 60) + 7  # fill byte of the first zero record
    bad[first + 30 * 9] = 1  # the 31st zero record's fill byte
    target.write_bytes(bad)
    with pytest.raises(SnapfmtError, match="non-zero fill byte"):
        snapfmt.open(target)


def naive_runs(where: array, step: int) -> list[tuple[int, int, int]]:
    out, i = [], 0
    while i < len(where):
        w, j = where[i], i + 1
        while j < len(where) and where[j] == (w + (j - i) * step if w > 0 else w):
            j += 1
        out.append((i, j, w))
        i = j
    return out


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["off", "zero", "unsent"]), st.integers(1, 300), st.integers(0, 3)
        ),
        max_size=12,
    )
)
def test_runs_split_like_the_plain_loop(pieces: list[tuple[str, int, int]]) -> None:
    values, pos = [], 5000
    for kind, length, gap in pieces:
        for _ in range(length):
            if kind == "off":
                values.append(pos)
                pos += 4104
            else:
                values.append(-1 if kind == "zero" else 0)
        pos += gap * 4101
    where = array("q", values)
    assert list(pagemap.runs(where, 4104)) == naive_runs(where, 4104)
    assert list(pagemap.runs_plain(where, 4104)) == naive_runs(where, 4104)


@given(
    st.lists(
        st.one_of(st.just(0), st.just(-1), st.integers(1, 1 << 62), st.integers(-(1 << 40), -2)),
        max_size=500,
    )
)
def test_sent_counts_offsets(values: list[int]) -> None:
    where = array("q", values)
    assert pagemap.count_sent(where) == pagemap.count_sent_plain(where)
    assert pagemap.count_sent(where) == sum(v > 0 or v <= pagemap.ENCODED for v in values)


@given(
    st.integers(0, 1 << 62),
    st.integers(0, 1 << 40),
    st.integers(1, 5000),
    st.sampled_from([8, 9]),
    st.sampled_from(["big", "little"]),
)
def test_progression_is_the_terms_packed(
    first: int, stride: int, n: int, width: int, order: str
) -> None:
    terms = [first + i * stride for i in range(n)]
    if terms[-1] >= 1 << (8 * width):
        return
    packed = b"".join(t.to_bytes(width, order) for t in terms)  # type: ignore[arg-type]
    assert perf_runs.progression(first, stride, n, width, order) == packed  # type: ignore[arg-type]
    assert perf_runs.progression_plain(first, stride, n, width, order) == packed  # type: ignore[arg-type]


_RUNS = build(
    {"pc.ram": 120, "vga.vram": 8},
    [
        [("pc.ram", i, i + 1) for i in range(120)],
        [("pc.ram", i, None) for i in range(0, 120, 2)] + [("vga.vram", i, 9) for i in range(8)],
    ],
)
_HEADERS = [i for i in range(len(_RUNS)) if i < 200 or (i - 200) % (PAGE + 8) < 16]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.tuples(st.sampled_from(_HEADERS), st.integers(0, 255)), min_size=1, max_size=4),
    st.one_of(st.none(), st.integers(len(_RUNS) // 3, len(_RUNS))),
)
def test_mutated_runs_raise_only_snapfmt_errors(
    tmp_path: Path, edits: list[tuple[int, int]], cut: int | None
) -> None:
    """Bytes changed in and around record headers, the stream maybe cut: opening,
    reading every block, writing it out and diffing raise only SnapfmtError."""
    data = bytearray(_RUNS)
    for at, value in edits:
        data[at] = value
    target, original = tmp_path / "m.mig", tmp_path / "o.mig"
    target.write_bytes(bytes(data[:cut]))
    original.write_bytes(_RUNS)
    try:
        with snapfmt.open(target) as stream, snapfmt.open(original) as clean:
            for block in stream.ram_blocks():
                for _ in block.iter_spans(span=7 * PAGE):
                    pass
                out = tmp_path / "block.bin"
                fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
                try:
                    block.write_into(fd)
                finally:
                    os.close(fd)
                assert out.stat().st_size == block.length
            from snapfmt.ops.diff import diff

            diff(stream, clean)
    except SnapfmtError:
        pass


@pytest.mark.parametrize("n", [0, 3, 20, 39])
def test_stream_cut_after_a_zero_record_header(tmp_path: Path, n: int) -> None:
    """The walk's window cannot hold the fill byte: a one-line error, not an IndexError."""
    data = build({"pc.ram": 40}, [[("pc.ram", i, None) for i in range(40)]])
    first = data.index(b"\x06pc.ram", 60) + 7  # the first zero record's fill byte
    target = tmp_path / "cut.mig"
    target.write_bytes(data[: first + n * 9])
    with pytest.raises(SnapfmtError, match="stream ends"):
        snapfmt.open(target)


def test_diff_where_files_cannot_be_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems refuse mmap: the walk reads with preadv and diff compares
    copies, with the same result."""
    from snapfmt.ops.diff import diff

    records = [("pc.ram", i, i + 1) for i in range(60)]
    changed = [*records[:10], ("pc.ram", 10, 999), *records[11:]]
    a, b = tmp_path / "a.mig", tmp_path / "b.mig"
    a.write_bytes(build({"pc.ram": 60}, [records]))
    b.write_bytes(build({"pc.ram": 60}, [changed]))
    with snapfmt.open(a) as sa, snapfmt.open(b) as sb:
        mapped = diff(sa, sb)

    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(19, "No such device")

    monkeypatch.setattr(ram_records.mmap, "mmap", refuse)
    with snapfmt.open(a) as sa, snapfmt.open(b) as sb:
        copied = diff(sa, sb)
    assert (
        [(s.path, s.pages, s.ranges) for s in copied.sections]
        == [(s.path, s.pages, s.ranges) for s in mapped.sections]
        == [("/pc.ram", 1, [(10 * PAGE, 11 * PAGE - 1)])]
    )


@given(
    st.sampled_from([9, PAGE + 8]),
    st.integers(1, 300),
    st.lists(st.tuples(st.integers(0, 299), st.integers(0, 8)), max_size=3),
)
def test_run_length_equals_its_plain_version(
    step: int, limit: int, edits: list[tuple[int, int]]
) -> None:
    """Runs of zero or whole-page records, broken anywhere (a header byte or a zero
    record's fill byte changed)."""
    word = (7 * PAGE) | (CONTINUE | (ZERO if step == 9 else PAGE_FLAG))
    buf = bytearray()
    for i in range(limit):
        buf += (word + i * PAGE).to_bytes(8, "big") + bytes(step - 8)
    for record, byte in edits:
        if 0 < record < limit:
            buf[record * step + byte] ^= 0x40
    fast = perf_runs.run_length(buf, 0, word, PAGE, step, limit)
    assert fast == perf_runs.run_length_plain(buf, 0, word, PAGE, step, limit)


@pytest.mark.parametrize("resent", [0, 1, 2, 60, 99])
def test_a_cut_resent_page_keeps_the_copy_sent_before(tmp_path: Path, resent: int) -> None:
    """A stream cut inside a page it sends a second time (the first record of a
    section, the first few of a run, inside a run, the last): salvaged, that page is
    its earlier copy, the pages re-sent before it their new copies, those after their
    old ones; nothing is lost, since every page came whole once."""
    first = [("pc.ram", i, i + 1) for i in range(100)]
    again = [("pc.ram", i, 1000 + i) for i in range(100)]
    data = build({"pc.ram": 100}, [first, again])
    cut = data.index(_page(1000 + resent)) + 100
    target = tmp_path / "cut.mig"
    target.write_bytes(data[:cut])
    with snapfmt.open(target, salvage=True) as stream:
        block = stream.ram_block(DevPath.of("pc.ram"))
        for index, tag in ((resent, resent + 1), (max(resent - 1, 0), None), (99, 100)):
            if tag is None:  # the page re-sent just before the cut
                tag = 1000 + index if index < resent else index + 1
            assert block.read(index * PAGE, PAGE) == _page(tag), index
        assert stream.metadata("salvage")["lost_ram"] == []


@pytest.mark.parametrize("ended", [True, False])
def test_pages_never_sent_are_lost_only_if_the_ram_section_did_not_end(
    tmp_path: Path, ended: bool
) -> None:
    """A stream whose RAM section sends 6 of 10 pages: cut after its END (before the EOF
    byte), the 4 others are zero as QEMU would load them, not lost; cut before its END,
    they are lost."""
    data = build({"pc.ram": 10}, [[("pc.ram", i, i + 1) for i in range(6)]])
    cut = len(data) - 1 if ended else data.rindex(b"\x03\x00\x00\x00\x01")
    target = tmp_path / "cut.mig"
    target.write_bytes(data[:cut])
    with snapfmt.open(target, salvage=True) as stream:
        lost = stream.metadata("salvage")["lost_ram"]
        assert stream.ram_block(DevPath.of("pc.ram")).read(7 * PAGE, PAGE) == bytes(PAGE)
    assert lost == ([] if ended else [{"path": "/pc.ram", "qemu_id": "pc.ram",
                                       "ranges": [[6 * PAGE, 10 * PAGE - 1]], "bytes": 4 * PAGE}])  # fmt: skip
