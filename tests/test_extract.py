"""extract never writes outside the folder it was given, whatever the section names."""

from __future__ import annotations

import os
from pathlib import Path as FsPath

import pytest

from snapfmt.native.writer import Writer
from snapfmt.paths import Component, Path
from tests.helpers import Run

HOSTILE = [
    Path.of("..", "..", "..", "etc", "passwd"),
    Path.of("/etc/passwd"),
    Path.of("a/../../b"),
    Path.of(".", "x"),
    Path.of("..."),
    Path((Component("..", ".."), Component("vmstate"))),
    Path.of("nul\x00byte"),
    Path.of("~", "home"),
    Path.of("pc.ram"),
    Path.of("pc.ram", "sub"),  # a file and a folder of the same name must not clash
]


def _tree(root: FsPath) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_names_stay_inside(tmp_path: FsPath, run: Run) -> None:
    snap = tmp_path / "hostile.snap"
    with Writer(snap, machine="pc") as w:
        for i, path in enumerate(HOSTILE):
            if i % 2:
                w.add_device(path, b"state")
            else:
                w.add_ram_block(path, [b"ram" * 100])
        w.add_metadata("../../escape", {"x": 1})
    jail = tmp_path / "jail" / "out"
    jail.parent.mkdir()
    before = _tree(tmp_path)
    result = run("extract", snap, "--all", "-d", jail)
    assert result.code == 0, result.err
    created = _tree(tmp_path) - before
    assert created and all(name.startswith("jail/out") for name in created)
    assert os.listdir(jail.parent) == ["out"]
    files = _tree(jail)
    assert "sections/%2E%2E/%2E%2E/%2E%2E/etc/passwd.bin" in files
    assert "sections/%2Fetc%2Fpasswd.bin" in files
    assert "documents/..%2F..%2Fescape.json" in files


def test_symlink_inside_the_folder_is_not_followed(tmp_path: FsPath, run: Run) -> None:
    snap = tmp_path / "s.snap"
    with Writer(snap, machine="pc") as w:
        w.add_device("/dev/vmstate", b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sections").symlink_to(outside)
    result = run("extract", snap, "--all", "-d", out)
    assert result.code == 2
    assert (
        result.err
        == f"snapfmt: error: {out / 'sections'}: exists and is not a plain directory; not writing through it\n"
    )
    assert os.listdir(outside) == []


def test_pwrite_all_goes_on_after_short_writes(
    tmp_path: FsPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapfmt import _io

    real = os.pwrite
    calls = []

    def short(fd: int, data: memoryview, offset: int) -> int:
        calls.append(len(data))
        return real(fd, data[: max(1, len(data) // 3)], offset)  # a third at most

    data = os.urandom(3 * _io.WRITE_PIECE + 12345)
    monkeypatch.setattr(os, "pwrite", short)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        _io.pwrite_all(fd, [memoryview(data)[:1000], memoryview(data)[1000:]], 7)
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == bytes(7) + data
    assert max(calls) <= _io.WRITE_PIECE


@pytest.mark.parametrize("selector", ["e1000", "pci.0/05.0"])
def test_readme_selectors_pick_the_device_state(tmp_path: FsPath, run: Run, selector: str) -> None:
    """A device node's state wins over its ROM where one section is needed (spec/paths.md)."""
    from tests.helpers import SAMPLES

    out = tmp_path / "x"
    result = run("extract", SAMPLES / "basic.snap", selector, "-o", out)
    assert (result.code, result.err) == (0, "")
    assert result.out.splitlines()[1].split()[:2] == [
        "/i440FX-pcihost/pci.0/e1000@05.0/vmstate",
        "device",
    ]
    assert out.stat().st_size == 48
    dumped = run("dump", SAMPLES / "basic.snap", selector)  # several allowed: both are shown
    assert [line.split(":")[0] for line in dumped.out.splitlines()[2:] if line.startswith("/")] == [
        "/i440FX-pcihost/pci.0/e1000@05.0/vmstate",
        "/i440FX-pcihost/pci.0/e1000@05.0/rom",
    ]
