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
            "type 'uint8' needs an integer, got 'zz'",
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
