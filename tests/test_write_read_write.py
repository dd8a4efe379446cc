"""What snapfmt writes, it reads, and writes again the same (issue 16): property tests
over generated snapshots with 1 KiB to 64 KiB pages, long names and hostile QEMU ids.

- native -> read -> native: the same bytes;
- native -> `extract --all` -> `write` of its manifest: the same bytes;
- native -> QEMU stream: refused before a byte is written, or read back with the same
  devices and RAM; and stream -> native -> stream gives the same stream again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path as FsPath
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapfmt
from snapfmt.errors import SnapfmtError, WriteError
from snapfmt.native.writer import Writer
from snapfmt.ops import extract, manifest
from snapfmt.ops.convert import convert
from snapfmt.paths import Component, Path

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

# names with spaces, control characters, slashes and long runs; never lone surrogates,
# which no file system path or UTF-8 string can hold
hostile = st.text(
    st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12
) | st.sampled_from(["a b", "x\ny", "0000:00:05.0/e1000", "/", "ram", "é" * 200, "n" * 3000])
plain = st.text("abcdefgh-_.0123456789", min_size=1, max_size=12)
components = st.builds(Component, plain, st.one_of(st.just(""), plain))
paths = st.lists(components, min_size=1, max_size=3).map(lambda cs: Path(tuple(cs)))


@st.composite
def snapshots(draw: st.DrawFn) -> dict[str, Any]:
    page = draw(st.sampled_from([1024, 4096, 65536]))
    chunk = draw(st.sampled_from([c for c in (4096, 65536, 1 << 20) if c >= page]))
    kinds = [bytes(page), os.urandom(page), b"\x01" + bytes(page - 1), b"ab" * (page // 2)]
    block = st.lists(st.sampled_from(kinds), max_size=6).map(b"".join)
    tail = st.binary(max_size=100)
    n_dev = draw(st.integers(0, 4))
    n_ram = draw(st.integers(0, 3))
    chosen = draw(st.lists(paths, min_size=n_dev + n_ram, max_size=n_dev + n_ram,
                           unique_by=str))  # fmt: skip
    devices = [{"path": p / "vmstate", "state": draw(st.binary(max_size=200)),
                "name": draw(hostile), "idstr": draw(st.one_of(st.none(), hostile)),
                "instance": draw(st.integers(0, 3)), "version": draw(st.integers(0, 9))}
               for p in chosen[:n_dev]]  # fmt: skip
    blocks = [{"path": p, "data": draw(block) + draw(tail), "idstr": draw(st.one_of(st.none(), hostile))}
              for p in chosen[n_dev:]]  # fmt: skip
    return {"page": page, "chunk": chunk, "machine": draw(st.sampled_from(["pc-i440fx-7.2", "q35", "x y"])),
            "devices": devices, "blocks": blocks,
            "metadata": draw(st.dictionaries(plain, st.integers() | plain, max_size=3))}  # fmt: skip


def _write(spec: dict[str, Any], target: FsPath) -> None:
    with Writer(target, machine=spec["machine"], page_size=spec["page"],
                chunk_size=spec["chunk"], metadata=spec["metadata"]) as w:  # fmt: skip
        for d in spec["devices"]:
            w.add_device(d["path"], d["state"], vmstate_name=d["name"], instance_id=d["instance"],
                         version_id=d["version"], qemu_idstr=d["idstr"])  # fmt: skip
        for b in spec["blocks"]:
            w.add_ram_block(b["path"], [b["data"]], qemu_idstr=b["idstr"])


def _contents(path: FsPath) -> tuple[dict[str, tuple[Any, ...]], dict[str, bytes]]:
    """Devices (by QEMU id) and RAM blocks (by QEMU id) as a reader sees them.  (Not the
    vmstate name: a stream carries it in the vmdesc, which has an entry only for devices
    with a layout; these have none.)"""
    with snapfmt.open(path) as snap:
        devices = {str(d.qemu_idstr): (d.data, d.instance_id, d.version_id)
                   for d in snap.devices()}  # fmt: skip
        ram = {str(b.qemu_idstr): b.read(0, b.length) for b in snap.ram_blocks()}
    return devices, ram


@SETTINGS
@given(spec=snapshots())
def test_native_read_and_written_again_is_the_same_file(spec: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = FsPath(tmp)
        try:
            _write(spec, folder / "a.snap")
        except WriteError:
            assert not (folder / "a.snap").exists() and not os.listdir(folder)
            return
        with snapfmt.open(folder / "a.snap") as snap:
            convert(snap, str(folder / "b.snap"), "native")
        assert (folder / "b.snap").read_bytes() == (folder / "a.snap").read_bytes()
        with snapfmt.open(folder / "a.snap") as snap:
            extract.extract_all(snap, str(folder / "out"))
        manifest.build(manifest.load(str(folder / "out" / "manifest.toml")), str(folder / "c.snap"))
        assert (folder / "c.snap").read_bytes() == (folder / "a.snap").read_bytes()


@SETTINGS
@given(spec=snapshots())
def test_a_stream_written_is_read_back_and_written_the_same(spec: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = FsPath(tmp)
        try:
            _write(spec, folder / "a.snap")
        except WriteError:
            return
        try:
            with snapfmt.open(folder / "a.snap") as snap:
                convert(snap, str(folder / "a.mig"), "qemu")
        except SnapfmtError:
            assert not (folder / "a.mig").exists()  # refused before a byte was written
            assert sorted(os.listdir(folder)) == ["a.snap"]
            return
        devices, ram = _contents(folder / "a.snap")
        assert _contents(folder / "a.mig") == (devices, ram)
        with snapfmt.open(folder / "a.mig") as snap:
            convert(snap, str(folder / "b.snap"), "native")
        with snapfmt.open(folder / "b.snap") as snap:
            convert(snap, str(folder / "b.mig"), "qemu")
        assert (folder / "b.mig").read_bytes() == (folder / "a.mig").read_bytes()
        shutil.rmtree(folder / "out", ignore_errors=True)
