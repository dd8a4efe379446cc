from __future__ import annotations

from pathlib import Path

import pytest

import snapfmt
from snapfmt.paths import Path as DevPath
from tests.helpers import Run


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("machine = 1", "'machine' (a string) is required"),
        ('machine = "pc"\nbogus = 1', "top level: unknown key 'bogus'"),
        ('machine = "pc"\nformat = 2', "manifest format 2 is not supported, expected 1"),
        (
            'machine = "pc"\n[[device]]\npath = "/a"\n',
            "device[0] (/a): give exactly one of 'state', 'state_file', 'field'",
        ),
        (
            'machine = "pc"\n[[device]]\npath = "a"\nstate = ""\n',
            "device[0] (a): bad 'path': path 'a' must start with '/'",
        ),
        ('machine = "pc"\n[[device]]\npath = "/a"\nstate = "zz"\n', "'state' must be hex digits"),
        (
            'machine = "pc"\n[[ram]]\npath = "/r"\nsize = "1M"\nfill = [{offset = 0, length = 8, pattern = "00"}, '
            '{offset = 4, length = 8, text = "x"}]\n',
            "fill regions overlap or pass the size",
        ),
        (
            'machine = "pc"\n[[ram]]\npath = "/r"\nsize = "lots"\n',
            "'size' must be a non-negative integer or a size",
        ),
        ('machine = "pc"\n[[ram]]\npath = "/r"\nfile = "nope.bin"\n', "file 'nope.bin' not found"),
        ('machine = "pc"\npage_size = 3000\n', "page size 3000 is not a power of two"),
        ("machine = [", "not valid TOML"),
    ],
)
def test_manifest_errors(tmp_path: Path, run: Run, text: str, message: str) -> None:
    manifest = write(tmp_path, text)
    result = run("write", manifest, "-o", tmp_path / "out.snap")
    assert result.code == 2
    assert result.err.startswith(f"snapfmt: error: {manifest}: ") and message in result.err, (
        result.err
    )
    assert result.err.count("\n") == 1
    assert not (tmp_path / "out.snap").exists()


def test_fills_and_files(tmp_path: Path, run: Run) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\x01\x02\x03")
    manifest = write(
        tmp_path,
        """
machine = "pc"
[[ram]]
path = "/r"
size = "8K"
fill = [ { offset = 2, length = 5, pattern = "abcd" }, { offset = 4096, length = 3000, random = 9 } ]
[[ram]]
path = "/f"
file = "blob.bin"
""",
    )
    assert run("write", manifest, "-o", tmp_path / "a.snap").code == 0
    assert run("write", manifest, "-o", tmp_path / "b.snap").code == 0
    assert (tmp_path / "a.snap").read_bytes() == (tmp_path / "b.snap").read_bytes()
    with snapfmt.open(tmp_path / "a.snap") as snap:
        data = snap.ram_block(DevPath.of("r")).read(0, 8192)
        assert data[:8] == b"\x00\x00\xab\xcd\xab\xcd\xab\x00"
        assert len(set(data[4096:7096])) > 200 and data[7096:] == bytes(8192 - 7096)
        assert snap.ram_block(DevPath.of("f")).read(0, 3) == b"\x01\x02\x03"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'machine = "pc"\n[[device]]\npath = "/d"\nstate_file = "/etc/hostname"\n',
            "file '/etc/hostname' is outside the manifest's folder",
        ),
        (
            'machine = "pc"\n[[device]]\npath = "/d"\nstate_file = "../x"\n',
            "file '../x' is outside the manifest's folder",
        ),
        (
            'machine = "pc"\nmetadata = {}\nmetadata_file = "x.json"\n',
            "give 'metadata' or 'metadata_file', not both",
        ),
        (
            'machine = "pc"\n[[device]]\npath = "/d"\nfield = [{name = "a", type = "uint8", value = 1, size = 1}]\n',
            "field[0]: unknown key 'size'",
        ),
        (
            'machine = "pc"\n[[device]]\npath = "/d"\nfield = [1]\n',
            "'field' must be an array of tables",
        ),
        (
            'machine = "pc"\n[[device]]\npath = "/d"\ndriver = 5\nstate = ""\n',
            "'driver' must be a string, got 5",
        ),
        (
            'machine = "pc"\n[[device]]\npath = "/d"\nfield = [{name = "a", type = "uint8", value = "zz"}]\n',
            "device[0] (/d): field[0].value ('a'): type 'uint8' needs an integer, got 'zz'",
        ),
        (
            'machine = "pc"\n[[device]]\npath = "/d"\nfield = [{name = "a", type = "uint8", value = 1}, '
            '{name = "b", type = "uint32", value = [1, {x = 1}]}]\n',
            "device[0] (/d): field[1].value[1] ('b'): type 'uint32' needs an integer, got {'x': 1}",
        ),
        (
            'machine = "pc"\n[[device]]\npath = "/d"\nfield = [{name = "a", type = "uint8", value = "'
            + "9" * 100
            + '"}]\n',
            "field[0].value ('a'): value " + "9" * 57 + "... does not fit type 'uint8'",
        ),
        (
            'machine = "pc"\n[[ram]]\npath = "/r"\nsize = 8\nfill = 5\n',
            "'fill' must be an array of tables",
        ),
        (
            'machine = "pc"\n[[document]]\nname = "d"\ncontent = 1979-05-27\n',
            "metadata 'd' is not a JSON document: Object of type date is not JSON serializable",
        ),
        (
            'machine = "pc"\n[[document]]\nname = "d"\ncontent = nan\n',
            "metadata 'd' is not a JSON document: Out of range float values are not JSON compliant",
        ),
        (
            'machine = "pc"\n[[document]]\nname = ""\ncontent = 1\n',
            "a metadata section needs a name",
        ),
    ],
)
def test_manifest_values_are_checked(tmp_path: Path, run: Run, text: str, message: str) -> None:
    test_manifest_errors(tmp_path, run, text, message)


def test_a_huge_sparse_block_costs_its_regions_not_its_size(tmp_path: Path, run: Run) -> None:
    """64 GiB with one page of pattern: the gaps are zero runs, never made (one table
    entry per chunk); a block whose chunk table could not be written is refused first."""
    manifest = tmp_path / "big.toml"
    manifest.write_text(
        'machine = "pc-i440fx-7.2"\n[[ram]]\npath = "/pc.ram"\nsize = "64G"\n'
        'fill = [ { offset = 0x1001, length = 0x1000, pattern = "55aa" } ]\n'
    )
    out = tmp_path / "big.snap"
    assert run("write", manifest, "-o", out).code == 0
    assert out.stat().st_size < 32 << 20  # (its chunk table: 1 Mi entries)
    with snapfmt.open(out) as snap:
        block = snap.ram_block(DevPath.parse("/pc.ram"))
        assert block.length == 64 << 30
        assert block.read(0x1000, 4) == b"\x00\x55\xaa\x55"
        assert block.summary()[:2] == (1 << 20, (1 << 20) - 1)
    assert run("verify", out).code == 0
    for size, hint in (("4096T", "the native format holds at most 0x4000000000000 bytes"),
                       ("8T", "give a chunk size of at least 0x20000")):  # fmt: skip
        manifest.write_text(manifest.read_text().replace('"64G"', f'"{size}"'))
        result = run("write", manifest, "-o", tmp_path / "refused.snap")
        assert result.code == 2 and hint in result.err, result.err
        manifest.write_text(manifest.read_text().replace(f'"{size}"', '"64G"'))
    assert not (tmp_path / "refused.snap").exists()


def test_zero_runs_write_what_zero_bytes_write(tmp_path: Path) -> None:
    """The Zeros fast path against the plain one: the same pieces, as zero runs (whole
    chunks skipped) or as zero bytes, give byte-identical files."""
    from snapfmt.native.writer import Zeros

    pieces = [b"\x01" * 100, 70000, b"\x02" * 5, 3 << 16, b"\x03", 65535, b"\x04" * 65536, 9]
    files = []
    for zeros in (True, False):
        target = tmp_path / f"{zeros}.snap"
        source = [Zeros(p) if isinstance(p, int) and zeros else bytes(p) if isinstance(p, int)
                  else p for p in pieces]  # fmt: skip
        with snapfmt.Writer(target, machine="pc") as w:
            w.add_ram_block("/pc.ram", source, chunk_size=1 << 16)
        files.append(target.read_bytes())
    assert files[0] == files[1]


def test_the_chunk_limit_holds_for_sources_of_unknown_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapfmt.errors import WriteError
    from snapfmt.native import writer

    monkeypatch.setattr(writer, "MAX_CHUNKS", 4)
    with pytest.raises(WriteError, match="more than 4 chunks of 0x10000 bytes"):  # noqa: SIM117
        with snapfmt.Writer(tmp_path / "x.snap", machine="pc") as w:
            w.add_ram_block("/pc.ram", [writer.Zeros(5 << 16)])
    assert not (tmp_path / "x.snap").exists()
