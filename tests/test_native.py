"""The native container: write -> read round trips, versions, atomicity, determinism."""

from __future__ import annotations

import io
import os
from pathlib import Path as FsPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapfmt
from snapfmt.errors import ChecksumError, FormatError, SnapfmtError, UnsupportedError
from snapfmt.formats import native as nf
from snapfmt.native.writer import Writer
from snapfmt.paths import Component, Path
from tests.helpers import SAMPLES

FS_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

names = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=10)
paths = st.lists(
    st.builds(Component, names, st.one_of(st.just(""), names)), min_size=1, max_size=4
).map(lambda cs: Path(tuple(cs)))
pages = st.sampled_from(
    [b"", bytes(4096), b"\x00" * 100 + b"\x01", b"text " * 819, os.urandom(4096)]
)
ram = st.lists(pages, max_size=12).map(b"".join)


def devices() -> st.SearchStrategy[list[dict[str, Any]]]:
    one = st.fixed_dictionaries(
        {
            "path": paths,
            "state": st.binary(max_size=300),
            "instance_id": st.integers(0, 2**32 - 1),
            "version_id": st.integers(0, 2**32 - 1),
            "qemu_idstr": st.one_of(st.none(), names),
        }
    )
    return st.lists(one, max_size=5, unique_by=lambda d: d["path"])


@FS_SETTINGS
@given(
    devs=devices(),
    blocks=st.lists(st.tuples(paths, ram), max_size=3, unique_by=lambda b: b[0]),
    chunk_size=st.sampled_from([4096, 8192, 65536]),
    machine=names,
)
def test_round_trip(
    tmp_path: FsPath,
    devs: list[dict[str, Any]],
    blocks: list[tuple[Path, bytes]],
    chunk_size: int,
    machine: str,
) -> None:
    taken = {d["path"] for d in devs}
    blocks = [b for b in blocks if b[0] not in taken]  # a path names one section
    target = tmp_path / "rt.snap"
    with Writer(target, machine=machine, chunk_size=chunk_size, metadata={"k": [1, None]}) as w:
        for d in devs:
            w.add_device(
                d["path"],
                d["state"],
                instance_id=d["instance_id"],
                version_id=d["version_id"],
                qemu_idstr=d["qemu_idstr"],
            )
        for path, data in blocks:
            w.add_ram_block(path, [data[:5000], data[5000:]])
        w.add_metadata("m", {"x": "y"})
    with snapfmt.open(target) as snap:
        assert snap.configuration.machine == machine
        assert snap.configuration.metadata == {"k": [1, None]}
        read = {d.path: d for d in snap.devices()}
        for d in devs:
            got = read[d["path"]]
            assert (got.data, got.instance_id, got.version_id, got.qemu_idstr) == (
                d["state"],
                d["instance_id"],
                d["version_id"],
                d["qemu_idstr"] or None,
            )
        for path, data in blocks:
            block = snap.ram_block(path)
            assert block.length == len(data)
            assert b"".join(piece for _, piece in block.iter_spans()) == data
            if data:
                assert (
                    block.read(len(data) // 3, len(data) // 2)
                    == data[len(data) // 3 : len(data) // 3 + len(data) // 2]
                )
        assert snap.metadata("m") == {"x": "y"}


def test_sources_file_path_file_object_and_buffers(tmp_path: FsPath) -> None:
    data = os.urandom(70000) + bytes(200000) + b"abc" * 1000
    raw = tmp_path / "ram.bin"
    raw.write_bytes(data)
    target = tmp_path / "s.snap"
    with Writer(target, machine="pc") as w:
        w.add_ram_block("/a", str(raw))
        w.add_ram_block("/b", io.BytesIO(data))
        w.add_ram_block("/c", (data[i : i + 777] for i in range(0, len(data), 777)))
    with snapfmt.open(target) as snap:
        for name in "abc":
            assert snap.ram_block(Path.of(name)).read(0, len(data)) == data


def test_read_touches_only_needed_chunks(tmp_path: FsPath) -> None:
    target = tmp_path / "s.snap"
    data = b"".join(bytes([i]) * 4096 for i in range(1, 65))
    with Writer(target, machine="pc", chunk_size=4096) as w:
        w.add_ram_block("/pc.ram", [data])
    with snapfmt.open(target) as snap:
        block = snap.ram_block(Path.of("pc.ram"))
        chunk = next(c for c in block.chunks() if c.index == 10)
    damaged = bytearray(target.read_bytes())
    damaged[chunk.file_offset] ^= 0xFF
    target.write_bytes(damaged)
    with snapfmt.open(target) as snap:
        block = snap.ram_block(Path.of("pc.ram"))
        assert block.read(0, 40960) == data[:40960]  # chunks 0-9 are fine
        with pytest.raises(ChecksumError, match=r"/pc.ram: chunk 10 \(bytes 0xa000-0xafff\)"):
            block.read(40960, 1)


def test_deterministic(tmp_path: FsPath) -> None:
    def build(name: str) -> bytes:
        with Writer(tmp_path / name, machine="pc", threads=1 if name == "a" else 4) as w:
            w.add_device("/d@1/vmstate", b"\x01\x02")
            w.add_ram_block("/pc.ram", [os.urandom(0) + b"x" * 300000 + bytes(300000)])
        return (tmp_path / name).read_bytes()

    assert build("a") == build("b")


def test_atomic_on_error_leaves_old_file_and_no_temp(tmp_path: FsPath) -> None:
    target = tmp_path / "s.snap"
    target.write_bytes(b"old contents")

    def failing() -> Any:
        yield b"x" * 100000
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"), Writer(target, machine="pc") as w:
        w.add_ram_block("/pc.ram", failing())
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["s.snap"]


def test_length_mismatch_is_an_error(tmp_path: FsPath) -> None:
    with (
        pytest.raises(SnapfmtError, match="the source gave 3 bytes, expected 4"),
        Writer(tmp_path / "s.snap", machine="pc") as w,
    ):
        w.add_ram_block("/pc.ram", [b"abc"], length=4)
    assert os.listdir(tmp_path) == []


def test_duplicate_section_refused(tmp_path: FsPath) -> None:
    with (
        pytest.raises(SnapfmtError, match="path '/a/vmstate' is used by two sections"),
        Writer(tmp_path / "s.snap", machine="pc") as w,
    ):
        w.add_device("/a/vmstate", b"")
        w.add_device("/a/vmstate", b"")


def _rewrite_versions(data: bytes, major: int, minor: int) -> bytes:
    """Patch the version in header and footer, recomputing their checksums."""
    out = bytearray(data)
    header = nf.Header.parse(data[: nf.HEADER_SIZE]).fields.value
    header.version_major, header.version_minor = major, minor
    out[: nf.HEADER_SIZE] = nf.Header.build({"fields": {"value": header}})
    footer = nf.Footer.parse(data[-nf.FOOTER_SIZE :]).fields.value
    footer.version_major, footer.version_minor = major, minor
    out[-nf.FOOTER_SIZE :] = nf.Footer.build({"fields": {"value": footer}})
    return bytes(out)


def _with_extra_section(tmp_path: FsPath, kind: int, flags: int) -> FsPath:
    target = tmp_path / f"extra-{kind}-{flags}.snap"
    with Writer(target, machine="pc") as w:
        w.add_device("/d/vmstate", b"\x00")
        w._add_section(kind, "future", b"payload", 7)  # type: ignore[arg-type]
        w._entries[-1]["flags"] = flags
    return target


def test_newer_major_is_refused(tmp_path: FsPath) -> None:
    target = tmp_path / "s.snap"
    with Writer(target, machine="pc"):
        pass
    target.write_bytes(_rewrite_versions(target.read_bytes(), 2, 0))
    with pytest.raises(UnsupportedError) as info:
        snapfmt.open(target)
    assert str(info.value) == (
        f"{target}: offset 0x8: native format version not supported: found 2.0, expected major version 1"
    )


def test_newer_minor_is_read_and_skips_optional_sections(tmp_path: FsPath) -> None:
    target = _with_extra_section(tmp_path, 77, int(nf.SectionFlag.OPTIONAL))
    target.write_bytes(_rewrite_versions(target.read_bytes(), 1, 3))
    with snapfmt.open(target) as snap:
        assert snap.version == "1.3"
        assert [s.key for s in snap.sections] == ["", "/d/vmstate"]
        assert snap.device(Path.of("d", "vmstate")).data == b"\x00"


def test_unknown_required_section_is_refused(tmp_path: FsPath) -> None:
    target = _with_extra_section(tmp_path, 77, 0)
    with pytest.raises(UnsupportedError, match="kind 77, unknown to this reader and not optional"):
        snapfmt.open(target)


def _reseal(data: bytearray) -> bytes:
    """Recompute every section checksum, the index hash and the footer after an edit."""
    footer = nf.Footer.parse(bytes(data[-nf.FOOTER_SIZE :])).fields.value
    start, end = footer.index_offset, footer.index_offset + footer.index_length
    index = nf.Index.parse(bytes(data[start:end]))
    for e in index.entries:
        e.checksum = nf.xxh3_64(bytes(data[e.offset : e.offset + e.length]))
    data[start:end] = nf.Index.build(index)
    footer.index_hash = nf.xxh3_64(bytes(data[start:end]))
    data[-nf.FOOTER_SIZE :] = nf.Footer.build({"fields": {"value": footer}})
    return bytes(data)


def test_a_parent_chunk_outside_a_delta_is_refused(tmp_path: FsPath) -> None:
    target = tmp_path / "s.snap"
    with Writer(target, machine="pc", chunk_size=4096) as w:
        w.add_ram_block("/pc.ram", [bytes(4096)])
    with snapfmt.open(target) as snap:
        table_at = snap.ram_block(Path.of("pc.ram"))._table_offset
    data = bytearray(target.read_bytes())
    data[table_at] = nf.ChunkEncoding.PARENT
    target.write_bytes(_reseal(data))
    with snapfmt.open(target) as snap:
        block = snap.ram_block(Path.of("pc.ram"))
        with pytest.raises(
            FormatError, match="chunk 0 lives in a parent, but the file is not a delta"
        ):
            block.read(0, 1)


def test_hostile_chunk_offsets_are_refused(tmp_path: FsPath) -> None:
    target = tmp_path / "s.snap"
    with Writer(target, machine="pc", chunk_size=4096) as w:
        w.add_ram_block("/pc.ram", [b"x" * 4096])
    with snapfmt.open(target) as snap:
        table_at = snap.ram_block(Path.of("pc.ram"))._table_offset
    data = bytearray(target.read_bytes())
    data[table_at + 8 : table_at + 16] = (1 << 62).to_bytes(8, "little")
    target.write_bytes(_reseal(data))
    with snapfmt.open(target) as snap:
        block = snap.ram_block(Path.of("pc.ram"))
        with pytest.raises(SnapfmtError, match="chunk 0 lies outside the block's data"):
            block.read(0, 1)


def test_bad_parameters(tmp_path: FsPath) -> None:
    with pytest.raises(SnapfmtError, match="page size 3000 is not a power of two"):
        Writer(tmp_path / "x", machine="pc", page_size=3000)
    with pytest.raises(
        SnapfmtError, match="chunk size 2048 is not a power of two, a multiple of the page size"
    ):
        Writer(tmp_path / "x", machine="pc", chunk_size=2048)
    assert os.listdir(tmp_path) == []


def _write_with(tmp_path: FsPath, edit: Any) -> FsPath:
    """A small snapshot whose index entries *edit* changes before they are written."""
    target = tmp_path / "edited.snap"
    with Writer(target, machine="pc") as w:
        w.add_device("/dev/vmstate", b"\x01\x02")
        w.add_ram_block("/ram", [b"\x07" * 5000])
        edit(w._entries)
    return target


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda e: e[1].update(key="/dev/vmst%61te"),
            "has a path not in canonical form, expected /dev/vmstate",
        ),
        (lambda e: e[2].update(key="/dev/vmstate"), "uses a path another section has"),
        (lambda e: e[0].update(key="x"), "is a configuration with a key; expected an empty key"),
        (
            lambda e: e[1].update(data_offset=64, data_length=4),
            "has a data region, which only RAM blocks have",
        ),
    ],
)
def test_index_rules(tmp_path: FsPath, edit: Any, message: str) -> None:
    with pytest.raises(SnapfmtError, match=message):
        snapfmt.open(_write_with(tmp_path, edit))


def test_index_size_must_agree(tmp_path: FsPath) -> None:
    target = _write_with(tmp_path, lambda e: e[1].update(size=99))
    with (
        snapfmt.open(target) as snap,
        pytest.raises(
            SnapfmtError, match="index size disagrees with the state length: found 99, expected 2"
        ),
    ):
        snap.device(Path.of("dev", "vmstate"))
    target = _write_with(tmp_path, lambda e: e[2].update(size=1 << 40))
    with (
        snapfmt.open(target) as snap,
        pytest.raises(SnapfmtError, match="index size disagrees with the block length"),
    ):
        snap.ram_block(Path.of("ram"))


def test_short_last_chunk_with_a_short_zero_page(tmp_path: FsPath) -> None:
    data = os.urandom(8192) + b"\x00"
    target = tmp_path / "s.snap"
    with Writer(target, machine="pc", chunk_size=16384) as w:
        w.add_ram_block("/r", [data])
    with snapfmt.open(target) as snap:
        block = snap.ram_block(Path.of("r"))
        assert block.read(0, len(data)) == data
        assert list(block.verify()) == []


def test_chunks_must_fill_the_data_region_in_order(tmp_path: FsPath) -> None:
    target = tmp_path / "s.snap"
    with Writer(target, machine="pc", chunk_size=4096) as w:
        w.add_ram_block("/r", [os.urandom(4096) * 1 + os.urandom(4096)])
    with snapfmt.open(target) as snap:
        block = snap.ram_block(Path.of("r"))
        table_at = block._table_offset
        first, second = list(block.chunks())
    data = bytearray(target.read_bytes())
    # both entries point at the first chunk's bytes: the second chunk's are unused
    data[table_at + 24 + 8 : table_at + 24 + 16] = first.file_offset.to_bytes(8, "little")
    data[table_at + 24 + 16 : table_at + 24 + 24] = first.hash.to_bytes(8, "little")
    target.write_bytes(_reseal(data))
    with snapfmt.open(target) as snap:
        problems = [e.what for _, e in snap.ram_block(Path.of("r")).verify()]
    assert problems == [
        f"chunk 1 (bytes 0x1000-0x1fff) is stored at {first.file_offset:#x}, expected {second.file_offset:#x} (chunks must fill the data region in order)",
        "stored chunks do not fill the data region",
    ]


def test_configuration_pickles_and_copies_with_its_default_metadata() -> None:
    import copy
    import pickle

    from snapfmt.model import Configuration

    config = Configuration("pc-i440fx-7.2", 4096, ("postcopy-ram",))
    for twin in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config), copy.copy(config)):
        assert twin == config and dict(twin.metadata) == {}


@st.composite
def _chunks(draw: st.DrawFn) -> tuple[int, bytes]:
    """A page size and a chunk of zero, text and random pages, its length any number of
    bytes (a short last page, a page count that is no multiple of 8)."""
    page = draw(st.sampled_from([1024, 4096]))
    # whole bitmap bytes of up to 32 pages (the usual chunks) or any length
    length = draw(
        st.sampled_from([8, 16, 24, 32]).map(lambda n: n * page) | st.integers(1, 40 * page)
    )
    kinds = ["zero", "text", "random", "zero-but-last"]
    kinds = draw(st.lists(st.sampled_from(kinds), min_size=40, max_size=40))
    rng = __import__("random").Random(draw(st.integers(0, 1 << 32)))
    body = b"".join(
        bytes(page) if k == "zero" else (b"page text " * page)[:page] if k == "text"
        else bytes(page - 1) + b"\x01" if k == "zero-but-last"  # begins as a zero page
        else rng.randbytes(page)
        for k in kinds
    )  # fmt: skip
    return page, body[:length]


@given(_chunks())
def test_every_chunk_encoding_decodes_to_its_bytes(chunk: tuple[int, bytes]) -> None:
    """encode -> decode_into is the identity, whichever encoding encode picks (pages with
    zero pages left out, raw or zstd; whole chunks raw or zstd; all zero)."""
    from snapfmt.native.chunks import ChunkCodec

    page, plain = chunk
    codec = ChunkCodec(page)
    encoding, stored, digest = codec.encode(plain)
    dest = bytearray(b"\xee" * len(plain))  # stale bytes, as a reused buffer holds
    assert codec.decode_into(encoding, memoryview(stored or b""), memoryview(dest)) is None
    assert dest == plain and nf.xxh3_64(dest) == digest


@given(_chunks())
def test_the_zero_page_shortcut_changes_no_encoding(chunk: tuple[int, bytes]) -> None:
    """encode's strided first-word check gives what comparing every page gives."""
    from snapfmt.native import chunks

    page, plain = chunk
    flags = chunks.zero_page_flags(plain, page)
    assert flags == [any(plain[at : at + page]) for at in range(0, len(plain), page)]
    if chunks._no_zero_page(plain, page):
        assert all(flags)
    fast = chunks.ChunkCodec(page).encode(plain)
    original = chunks._no_zero_page
    chunks._no_zero_page = lambda chunk, page_size: False  # the plain version only
    try:
        assert chunks.ChunkCodec(page).encode(plain) == fast
    finally:
        chunks._no_zero_page = original


def test_bad_page_bitmaps_are_reported_not_raised() -> None:
    from snapfmt.native.chunks import ChunkCodec

    codec = ChunkCodec(4096)
    dest = memoryview(bytearray(3 * 4096 + 100))  # four pages, the last short
    assert "bits set past" in str(codec.decode_into(4, memoryview(b"\x10" + bytes(4096)), dest))
    assert "shorter than the page bitmap" in str(codec.decode_into(4, memoryview(b""), dest))
    assert "its bitmap says 4196" in str(
        codec.decode_into(4, memoryview(b"\x09" + bytes(10)), dest)
    )


def test_index_errors_name_the_entry(tmp_path: FsPath) -> None:
    """An index entry whose key is not UTF-8: the error names the entry and its offset."""
    data = bytearray((SAMPLES / "basic.snap").read_bytes())
    footer = nf.Footer.parse(bytes(data[-nf.FOOTER_SIZE :])).fields.value
    start = footer.index_offset
    index = nf.Index.parse(bytes(data[start : start + footer.index_length]))
    second = start + 4 + len(nf.IndexEntry.build(index.entries[0]))
    data[second + nf.INDEX_ENTRY_MIN] = 0xFF  # the first byte of entry 1's key
    footer.index_hash = nf.xxh3_64(bytes(data[start : start + footer.index_length]))
    data[-nf.FOOTER_SIZE :] = nf.Footer.build({"fields": {"value": footer}})
    target = tmp_path / "bad.snap"
    target.write_bytes(bytes(data))
    with pytest.raises(SnapfmtError) as caught:
        snapfmt.open(target)
    assert str(caught.value) == (
        f"{target}: offset {second:#x}: index entry 1 holds text that is not UTF-8"
    )


def test_json_is_strict_both_ways(tmp_path: FsPath) -> None:
    """NaN and the infinities are not JSON (RFC 8259): the writer refuses them, and a
    reader refuses a document that holds one (Python's json module takes them)."""
    with (
        pytest.raises(
            SnapfmtError, match=r"metadata 'm' is not a JSON document: Out of range float"
        ),
        Writer(tmp_path / "w.snap", machine="pc") as w,
    ):
        w.add_metadata("m", {"x": float("nan")})
    assert not (tmp_path / "w.snap").exists()
    target = tmp_path / "n.snap"
    with Writer(target, machine="pc") as w:
        w.add_metadata("m", {"x": "NaN_"})
    data = bytearray(target.read_bytes())
    at = data.index(b'"NaN_"')
    data[at : at + 6] = b"NaN   "
    target.write_bytes(_reseal(data))
    with snapfmt.open(target) as snap, pytest.raises(SnapfmtError, match="NaN is not a JSON value"):
        snap.metadata("m")
