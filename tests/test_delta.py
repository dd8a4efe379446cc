"""Delta snapshots (spec/format.md §7): chunks kept by reference to a parent, reads
through the chain, a missing or changed parent a clear error, flatten standalone."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path as FsPath

import pytest

import snapfmt
from snapfmt.errors import ChecksumError, ParentError, WriteError
from snapfmt.formats import native as nf
from snapfmt.native.writer import Writer
from snapfmt.paths import Path
from tests.helpers import Run

PAGE = 4096
RAM = Path.parse("/pc.ram")


def _write(target: FsPath, ram: bytes, parent: FsPath | None = None, cpu: bytes = b"\1\2") -> None:
    with Writer(target, machine="pc-i440fx-7.2", parent=parent) as w:
        w.add_device("/cpu@0/cpu", cpu)
        w.add_ram_block(RAM, [ram])


def _changed(ram: bytes, fraction: float, rng: random.Random) -> bytes:
    out = bytearray(ram)
    pages = len(out) // PAGE
    for p in rng.sample(range(pages), max(1, int(pages * fraction))):
        out[p * PAGE : (p + 1) * PAGE] = rng.randbytes(PAGE)
    return bytes(out)


@pytest.fixture
def chain(tmp_path: FsPath) -> tuple[FsPath, list[bytes]]:
    """base.snap <- one.snap <- two.snap, 8 MiB of random RAM, 1% of pages changed each time."""
    rng = random.Random(7)
    states = [rng.randbytes(8 << 20)]
    states += [_changed(states[-1], 0.01, rng) for _ in range(2)]
    _write(tmp_path / "base.snap", states[0])
    _write(tmp_path / "one.snap", states[1], tmp_path / "base.snap")
    _write(tmp_path / "two.snap", states[2], tmp_path / "one.snap", cpu=b"\1\3")
    return tmp_path, states


def _ram(path: FsPath) -> bytes:
    with snapfmt.open(path) as snap:
        block = snap.ram_block(RAM)
        return block.read(0, block.length)


def test_a_delta_stores_only_what_changed_and_reads_back_exactly(chain: tuple) -> None:
    folder, states = chain
    full = os.path.getsize(folder / "base.snap")
    assert os.path.getsize(folder / "one.snap") < 0.02 * full  # 1% of pages changed
    assert _ram(folder / "one.snap") == states[1]
    assert _ram(folder / "two.snap") == states[2]  # through two parents
    with snapfmt.open(folder / "one.snap") as snap:
        assert snap.version == "1.1" and snap.flags & nf.HeaderFlag.DELTA
        with snapfmt.open(folder / "base.snap") as base:
            assert snap.parent_id == base.snapshot_id and base.version == "1.0"
        encodings = {c.encoding for c in snap.ram_block(RAM).chunks()}
        assert {nf.ChunkEncoding.PARENT, nf.ChunkEncoding.PARENT_PAGES} <= encodings
        assert snap.check().problems == []


def test_writing_a_delta_is_deterministic(chain: tuple, tmp_path: FsPath) -> None:
    folder, states = chain
    _write(folder / "again.snap", states[1], folder / "base.snap")
    assert (folder / "again.snap").read_bytes() == (folder / "one.snap").read_bytes()


def test_a_delta_equal_to_its_parent_stores_no_ram(chain: tuple) -> None:
    folder, states = chain
    _write(folder / "same.snap", states[0], folder / "base.snap")
    with snapfmt.open(folder / "same.snap") as snap:
        block = snap.ram_block(RAM)
        assert {c.encoding for c in block.chunks()} == {nf.ChunkEncoding.PARENT}
        assert snap.section_for(RAM).data_length == 0


def test_info_shows_the_chain_and_verify_checks_it(chain: tuple, run: Run) -> None:
    folder, _ = chain
    result = run("info", folder / "two.snap")
    lines = [line for line in result.out.splitlines() if "(id " in line]
    assert lines[0].startswith("parent        one.snap (id ") and lines[0].endswith(": found")
    assert lines[1].startswith("              base.snap (id ") and lines[1].endswith(": found")
    document = json.loads(run("info", folder / "two.snap", "--json").out)
    assert [p["file"] for p in document["parents"]] == ["one.snap", "base.snap"]
    assert all(p["problem"] is None for p in document["parents"])
    assert json.loads(run("info", folder / "base.snap", "--json").out)["parents"] == []
    assert run("verify", folder / "two.snap").code == 0


def test_a_missing_parent_is_one_problem_and_reads_refuse(chain: tuple, run: Run) -> None:
    folder, _ = chain
    (folder / "base.snap").rename(folder / "elsewhere.snap")
    result = run("verify", folder / "two.snap")
    assert result.code == 1
    bad = [line for line in result.out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "base.snap" in bad[0] and "is missing" in bad[0]
    info = run("info", folder / "two.snap")
    assert info.code == 0 and "is missing" in info.out
    out = folder / "ram.bin"
    result = run("extract", folder / "two.snap", "/pc.ram", "-o", out)
    assert result.code == 2 and result.err.count("\n") == 1 and "is missing" in result.err
    assert not out.exists()


def test_a_changed_parent_is_refused_by_its_id(chain: tuple, run: Run) -> None:
    folder, states = chain
    _write(folder / "base.snap", states[0], cpu=rb"\9\9")  # same RAM, other bytes: other id
    result = run("extract", folder / "one.snap", "/pc.ram", "-o", folder / "x.bin")
    assert result.code == 2
    assert "is not the snapshot it was made from" in result.err
    with snapfmt.open(folder / "one.snap") as snap, pytest.raises(ParentError):
        snap.ram_block(RAM).read(0, 1)


def test_the_chain_moves_with_its_folder(chain: tuple, tmp_path: FsPath) -> None:
    folder, states = chain
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(folder, moved)
    shutil.rmtree(folder)
    try:
        assert _ram(moved / "two.snap") == states[2]
    finally:
        shutil.rmtree(moved)


def test_flatten_writes_a_standalone_file(chain: tuple, run: Run) -> None:
    folder, states = chain
    result = run("flatten", folder / "two.snap", folder / "flat.snap")
    assert result.code == 0, result.err
    for name in ("base.snap", "one.snap"):
        (folder / name).unlink()
    with snapfmt.open(folder / "flat.snap") as snap:
        assert snap.version == "1.0" and not snap.flags
        assert snap.check().problems == []
        assert nf.PARENT_DOCUMENT not in {s.key for s in snap.sections}
        assert snap.device(Path.parse("/cpu@0/cpu")).data == b"\1\3"
    assert _ram(folder / "flat.snap") == states[2]


def test_convert_parent_makes_a_delta_of_any_snapshot(chain: tuple, run: Run) -> None:
    folder, _states = chain
    run("flatten", folder / "one.snap", folder / "flat.snap")
    result = run(
        "convert", folder / "flat.snap", folder / "again.snap", "--parent", folder / "base.snap"
    )
    assert result.code == 0 and "native delta" in result.out
    assert (folder / "again.snap").read_bytes() == (folder / "one.snap").read_bytes()
    result = run(
        "convert",
        folder / "flat.snap",
        folder / "x.mig",
        "--to",
        "qemu",
        "--parent",
        folder / "base.snap",
    )
    assert result.code == 2 and "--parent makes a native delta" in result.err


def test_a_parent_must_be_native_and_parent_is_a_kept_name(chain: tuple, samples: FsPath) -> None:
    folder, states = chain
    with pytest.raises(WriteError, match="a delta's parent is a native one"):
        _write(folder / "x.snap", states[0], samples / "qemu" / "pc.mig")
    with pytest.raises(WriteError, match="kept for a delta's parent"), \
            Writer(folder / "y.snap", machine="pc") as w:  # fmt: skip
        w.add_metadata("parent", {})
    assert not (folder / "x.snap").exists() and not (folder / "y.snap").exists()


def test_a_parent_chunk_whose_hash_differs_is_caught(chain: tuple) -> None:
    """A PARENT entry's hash is the chunk's: one the parent does not have is an error,
    never the parent's other bytes."""
    folder, _ = chain
    target = folder / "one.snap"
    with snapfmt.open(target) as snap:
        block = snap.ram_block(RAM)
        chunk = next(c for c in block.chunks() if c.encoding == nf.ChunkEncoding.PARENT)
        at = block._table_offset + chunk.index * nf.CHUNK_ENTRY.size + 16
    data = bytearray(target.read_bytes())
    data[at] ^= 1
    from tests.test_native import _reseal

    target.write_bytes(_reseal(data))
    with snapfmt.open(target) as snap:
        problems = snap.check().problems
        assert len(problems) == 1 and "is another" in problems[0].message
        with pytest.raises(ChecksumError, match="lives in the parent"):
            snap.ram_block(RAM).read(chunk.offset, 1)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (None, "without the 'parent' document"),
        ({"file": "base.snap", "id": "zz", "length": 1}, "is not {file, id"),
        ({"file": "base.snap", "id": "00" * 16, "length": 1}, "id differs from the header's"),
    ],
)
def test_a_hostile_parent_document_is_refused(
    chain: tuple, document: dict | None, message: str
) -> None:
    folder, states = chain
    with snapfmt.open(folder / "base.snap") as base:
        parent_id = base.snapshot_id
    target = folder / "hostile.snap"
    with Writer(target, machine="pc", chunk_size=4096) as w:
        if document is not None:
            w._claim(nf.SectionKind.METADATA, "parent")
            w._metadata("parent", document)
        w.add_ram_block(RAM, [states[0][:4096]])
    data = bytearray(target.read_bytes())
    data[12:16] = (1).to_bytes(4, "little")  # DELTA
    data[16:32] = parent_id
    data[56:64] = nf.xxh3_64(bytes(data[:56])).to_bytes(8, "little")
    from tests.test_native import _reseal

    target.write_bytes(_reseal(data))
    with snapfmt.open(target) as snap:
        with pytest.raises(ParentError, match=message):
            snap.parent()
        assert snap.check().problems[0].section == "parent"
