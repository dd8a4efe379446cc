"""Damaged and cut streams salvaged: real QEMU streams (the samples, one compressed
whole, a libvirt image) cut at every structural boundary -- each section's start and
end, its footer, the first, a middle and the last RAM record, inside the vmdesc -- and
at bytes between.  What comes before the cut is whole and equal to the original's; what
is lost is named; info and verify say both (exit 1); extract --salvage and convert
--salvage keep what is whole."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import zstandard

import snapfmt
from snapfmt.errors import SnapfmtError
from snapfmt.formats.native import SectionKind
from snapfmt.qemu.walk import walk
from tests.conftest import Run
from tests.helpers import SAMPLES

SAMPLE = SAMPLES / "qemu" / "pc.mig"


def boundaries(path: Path) -> list[int]:
    """Offsets where the stream's structures start and end."""
    with snapfmt.open(path) as snap:
        layout = snap.layout  # type: ignore[attr-defined]
        cuts = {0, 4, 8, 9, 20, layout.vmdesc_offset - 5, layout.vmdesc_offset + 10,
                snap._io.size - 1}  # fmt: skip
        for section in layout.sections:
            cuts.add(section.header_offset)
            cuts.add(section.header_offset + 3)
            for start, length in section.spans:
                cuts.update((start, start + length, start + length + 2, start + length + 5))
        for at, _ in layout.commands:
            cuts.update((at, at + 2))
        for block in layout.blocks.values():
            sent = sorted(w for w in block.pages if w > 0)
            for w in sent[:1] + sent[len(sent) // 2 : len(sent) // 2 + 1] + sent[-1:]:
                cuts.update((w - 8, w - 1, w + 100, w + 4096))
    return sorted(c for c in cuts if 0 <= c < path.stat().st_size)


CUTS = boundaries(SAMPLE)


def test_there_are_many_boundaries() -> None:
    assert len(CUTS) > 150


def _original() -> dict[str, object]:
    with snapfmt.open(SAMPLE) as snap:
        # (by QEMU identity: a cut stream may lack the sections that name ROM blocks)
        devices = {(d.qemu_idstr, d.instance_id): d.data for d in snap.devices()}
        ram = {b.qemu_idstr: b.read(0, b.length) for b in snap.ram_blocks()}
        eof = snap.layout.vmdesc_offset - 5  # type: ignore[attr-defined]
    return {"devices": devices, "ram": ram, "eof": eof}


ORIGINAL = _original()


@pytest.mark.parametrize("cut", CUTS)
def test_a_cut_stream_keeps_what_came_before_the_cut(tmp_path: Path, run: Run, cut: int) -> None:
    target = tmp_path / "cut.mig"
    target.write_bytes(SAMPLE.read_bytes()[:cut])
    if cut < 8:  # not even the header: nothing to salvage
        result = run("info", target)
        assert result.code == 2 and result.err.count("\n") == 1
        return
    try:
        snapfmt.open(target).close()
    except SnapfmtError:
        pass
    else:  # cut just after EOF: a whole stream without a vmdesc, which QEMU need not write
        assert cut == ORIGINAL["eof"] and run("info", target).code == 0
        return
    with snapfmt.open(target, salvage=True) as snap:
        damage = snap.layout.damage  # type: ignore[attr-defined]
        assert damage is not None and damage.offset <= cut
        document = snap.metadata("salvage")
        lost = {e["qemu_id"]: e["ranges"] for e in document["lost_ram"]}
        for device in snap.devices():  # whole, and the original's
            key = (device.qemu_idstr, device.instance_id)
            assert ORIGINAL["devices"][key] == device.data  # type: ignore[index]
        kept = {b.qemu_idstr: b for b in snap.ram_blocks()}
        known = set(snap.layout.blocks)  # type: ignore[attr-defined]  (the block list read)
        for idstr, data in ORIGINAL["ram"].items():  # type: ignore[attr-defined]
            if idstr not in kept:  # lost whole, or the cut came before the block list
                assert lost[idstr] == [[0, len(data) - 1]] if idstr in known else idstr not in lost
                continue
            block = kept[idstr]
            got = block.read(0, block.length)
            gone = lost.get(idstr, [])
            for lo, hi in gone:  # lost pages read as zero, and nothing else does
                assert got[lo : hi + 1] == bytes(hi + 1 - lo)
            holes = bytearray(got)
            for lo, hi in gone:
                holes[lo : hi + 1] = data[lo : hi + 1]
            assert holes == data
    info = run("info", target)
    assert info.code == 1 and "damaged at offset" in info.out
    verify = run("verify", target, "--json")
    assert verify.code == 1
    problems = json.loads(verify.out)["problems"]
    assert problems[0]["offset"] == damage.offset and problems[0]["message"].startswith("damaged")


@pytest.mark.parametrize("cut", CUTS[8::25])
def test_extract_and_convert_salvage_what_is_whole(tmp_path: Path, run: Run, cut: int) -> None:
    target = tmp_path / "cut.mig"
    target.write_bytes(SAMPLE.read_bytes()[:cut])
    out = tmp_path / "out"
    result = run("extract", target, "--all", "-d", out, "--salvage", "-q")
    assert result.code == 1 and "snapfmt: salvaged: damaged at offset" in result.err
    assert (out / "manifest.toml").exists()
    assert run("extract", target, "--all", "-d", tmp_path / "plain", "-q").code == 2
    native = tmp_path / "cut.snap"
    assert run("convert", target, native, "--salvage", "-q").code == 1
    assert run("verify", native).code == 0  # a whole native file, which says what was lost
    with snapfmt.open(native) as snap, snapfmt.open(target, salvage=True) as cut_stream:
        assert snap.metadata("salvage") == cut_stream.metadata("salvage")
        kinds = [s.kind for s in snap.sections]
        assert kinds.count(SectionKind.DEVICE) == len(list(cut_stream.devices()))


def test_a_whole_stream_is_not_damaged(run: Run) -> None:
    assert run("info", SAMPLE).code == 0
    with snapfmt.open(SAMPLE, salvage=True) as snap:
        assert snap.layout.damage is None  # type: ignore[attr-defined]
        assert "salvage" not in [s.key for s in snap.sections]
    assert walk.__doc__  # (the walk says what salvaging does)


def test_a_corrupted_record_stops_the_salvage_there(tmp_path: Path, run: Run) -> None:
    data = bytearray(SAMPLE.read_bytes())
    with snapfmt.open(SAMPLE) as snap:
        block = snap.layout.blocks["pc.ram"]  # type: ignore[attr-defined]
        at = sorted(w for w in block.pages if w > 0)[1] - 8  # the second page's header
    data[at] = 0xFF  # flags out of range
    target = tmp_path / "bad.mig"
    target.write_bytes(bytes(data))
    with snapfmt.open(target, salvage=True) as snap:
        assert snap.layout.damage.offset == at  # type: ignore[attr-defined]
        assert "RAM page offset past the end" in snap.layout.damage.message  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_a_cut_compressed_stream_salvages_what_decompresses(
    tmp_path: Path, run: Run, kind: str
) -> None:
    raw = SAMPLE.read_bytes()
    packed = zstandard.ZstdCompressor().compress(raw) if kind == "zstd" else _gzip(raw)
    target = tmp_path / f"cut.mig.{kind}"
    target.write_bytes(packed[: len(packed) // 2])
    result = run("info", target)
    assert result.code == 1 and "damaged at offset" in result.out


def _gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(data) + compressor.flush()


def test_an_unfinished_libvirt_save_salvages(tmp_path: Path, run: Run) -> None:
    from snapfmt.formats import libvirt as lf

    xml = b"<domain type='qemu'><name>x</name></domain>\0"
    header = lf.HeaderLE.build({"magic": lf.MAGIC_PARTIAL, "version": 2, "data_len": len(xml),
                                "was_running": 1, "format": 0, "cookie_offset": 0,
                                "unused": [0] * 14})  # fmt: skip
    target = tmp_path / "partial.save"
    target.write_bytes(header + xml + SAMPLE.read_bytes()[:300000])
    plain = run("extract", target, "--all", "-d", tmp_path / "a", "-q")
    assert plain.code == 2 and "incomplete" in plain.err
    assert run("info", target).code == 1
    assert run("extract", target, "--all", "-d", tmp_path / "b", "-q", "--salvage").code == 1


NATIVE = SAMPLES / "basic.snap"


def native_boundaries(path: Path) -> list[int]:
    with snapfmt.open(path) as snap:
        cuts = {snap.index_offset, snap.index_offset + 5,  # type: ignore[attr-defined]
                path.stat().st_size - 48, path.stat().st_size - 1}  # fmt: skip
        for s in snap.sections:
            for at in (s.offset, s.offset + 1, s.offset + s.length - 1, s.offset + s.length,
                       s.data_offset, s.data_offset + s.data_length // 2):  # fmt: skip
                cuts.add(at)
    return sorted(c for c in cuts if c > 64)


@pytest.mark.parametrize("cut", native_boundaries(NATIVE))
def test_a_cut_native_file_keeps_the_sections_before_the_cut(
    tmp_path: Path, run: Run, cut: int
) -> None:
    target = tmp_path / "cut.snap"
    target.write_bytes(NATIVE.read_bytes()[:cut])
    with pytest.raises(SnapfmtError):
        snapfmt.open(target)
    with snapfmt.open(NATIVE) as whole:
        config = next(s for s in whole.sections if s.kind == SectionKind.CONFIGURATION)
    if cut < config.offset + config.length:  # no machine to salvage the rest for
        result = run("info", target)
        assert result.code == 2 and result.err.count("\n") == 1
        return
    with snapfmt.open(NATIVE) as whole, snapfmt.open(target, salvage=True) as snap:
        assert snap.damage is not None  # type: ignore[attr-defined]
        expected = [
            s
            for s in whole.sections
            if max(s.offset + s.length, s.data_offset + s.data_length) <= cut
        ]
        got = snap.sections
        assert [(s.kind, s.key if s.kind != SectionKind.METADATA else "") for s in got] == [
            (s.kind, s.key if s.kind != SectionKind.METADATA else "") for s in expected
        ]
        for s in got:
            if s.kind == SectionKind.DEVICE:
                assert snap.device(s.path).data == whole.device(s.path).data  # type: ignore[arg-type]
            elif s.kind == SectionKind.RAM_BLOCK:
                a, b = snap.ram_block(s.path), whole.ram_block(s.path)  # type: ignore[arg-type]
                assert a.read(0, a.length) == b.read(0, b.length)
    info = run("info", target)
    assert info.code == 1 and "damaged at offset" in info.out
    assert run("verify", target).code == 1
    out = tmp_path / "salvaged.snap"
    assert run("convert", target, out, "--to", "native", "--salvage", "-q").code == 1
    assert run("verify", out).code == 0
    with snapfmt.open(out) as salvaged:
        assert "the index is lost" in salvaged.metadata("salvage")["note"]


def test_a_native_file_cut_in_its_header_is_not_salvaged(tmp_path: Path, run: Run) -> None:
    target = tmp_path / "cut.snap"
    target.write_bytes(NATIVE.read_bytes()[:40])
    result = run("info", target)
    assert result.code == 2 and result.err.count("\n") == 1


def test_a_bad_chunk_is_salvaged_as_zeros_and_named(tmp_path: Path, run: Run) -> None:
    """A native file whose index is whole but one chunk is damaged: extract and convert
    refuse it; with --salvage they keep everything else, the chunk as zeros, and say so
    (the native output carries it in its salvage document)."""
    from snapfmt.paths import Path as DevPath

    ram = DevPath.parse("/pc.ram")
    with snapfmt.open(NATIVE) as whole:
        block = whole.ram_block(ram)
        chunk = [c for c in block.chunks() if c.stored_length > 0][1]
        original = block.read(0, block.length)
    data = bytearray(NATIVE.read_bytes())
    data[chunk.file_offset + chunk.stored_length // 2] ^= 0x55
    target = tmp_path / "flip.snap"
    target.write_bytes(bytes(data))
    assert run("extract", target, "--all", "-d", tmp_path / "plain", "-q").code == 2
    result = run("extract", target, "--all", "-d", tmp_path / "out", "-q", "--salvage")
    assert result.code == 1
    span = f"{chunk.offset:#x}-{chunk.offset + chunk.length - 1:#x}"
    assert f"snapfmt: salvaged: lost RAM /pc.ram: {chunk.length} bytes ({span})" in result.err
    got = (tmp_path / "out" / "sections" / "pc.ram.bin").read_bytes()
    lo, hi = chunk.offset, chunk.offset + chunk.length
    assert got[:lo] == original[:lo] and got[hi:] == original[hi:]
    assert got[lo:hi] == bytes(chunk.length)
    out = tmp_path / "salvaged.snap"
    assert run("convert", target, out, "--to", "native", "--salvage", "-q").code == 1
    assert run("verify", out).code == 0
    with snapfmt.open(out) as snap:
        lost = snap.metadata("salvage")["lost_ram"]
        assert lost == [{"path": "/pc.ram", "qemu_id": None, "ranges": [[lo, hi - 1]],
                         "bytes": chunk.length}]  # fmt: skip
        assert snap.ram_block(ram).read(0, lo) == original[:lo]


def test_a_salvaged_file_damaged_again_says_both_losses(tmp_path: Path, run: Run) -> None:
    """A native file that convert --salvage made from a cut stream, with a chunk damaged
    since: salvaged again, its salvage document says the new loss and keeps the earlier
    one whole ("earlier"); converted with no new damage, the document is kept as it was."""
    cut = tmp_path / "cut.mig"
    data = SAMPLE.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    first = tmp_path / "first.snap"
    assert run("convert", cut, first, "--to", "native", "--salvage", "-q").code == 1
    with snapfmt.open(first) as snap:
        earlier = snap.metadata("salvage")
        block = max(snap.ram_blocks(), key=lambda b: b.length)
        chunk = next(c for c in block.chunks() if c.stored_length > 0)  # type: ignore[attr-defined]
    again = tmp_path / "again.snap"
    assert run("convert", first, again, "--to", "native", "-q").code == 0
    with snapfmt.open(again) as snap:
        assert snap.metadata("salvage") == earlier
    damaged = bytearray(first.read_bytes())
    damaged[chunk.file_offset + chunk.stored_length // 2] ^= 0x55
    (tmp_path / "damaged.snap").write_bytes(bytes(damaged))
    second = tmp_path / "second.snap"
    assert (
        run("convert", tmp_path / "damaged.snap", second, "--to", "native", "--salvage", "-q").code
        == 1
    )
    with snapfmt.open(second) as snap:
        document = snap.metadata("salvage")
    assert document["earlier"] == earlier
    assert [e["ranges"] for e in document["lost_ram"]] == [
        [[chunk.offset, chunk.offset + chunk.length - 1]]
    ]
