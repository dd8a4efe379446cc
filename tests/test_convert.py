"""convert: native <-> QEMU stream round trips (real QEMU restoring them: test_real_qemu)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import snapfmt
from snapfmt.native.writer import Writer
from tests.helpers import SAMPLES, Run


def contents(path: Path, by_identity: bool = False) -> dict[object, tuple[object, ...]]:
    """Every device and RAM block, keyed by path or by QEMU identity."""
    with snapfmt.open(path) as snap:
        out: dict[object, tuple[object, ...]] = {}
        for section in snap.sections:
            if section.path is None:  # configuration and metadata: compared elsewhere
                continue
            if section.kind_name == "device":
                d = snap.device(section.path)
                key: object = (d.qemu_idstr, d.instance_id) if by_identity else section.key
                out[key] = (
                    d.data,
                    d.qemu_idstr,
                    d.instance_id,
                    d.version_id,
                    d.vmstate_name,
                    d.layout,
                )
            else:
                b = snap.ram_block(section.path)
                out[b.qemu_idstr if by_identity else section.key] = (
                    b.read(0, b.length),
                    b.qemu_idstr,
                )
        return out


@pytest.mark.parametrize("name", ["pc", "q35"])
def test_qemu_to_native_and_back(tmp_path: Path, run: Run, name: str) -> None:
    source = SAMPLES / "qemu" / f"{name}.mig"
    native, back = tmp_path / "x.snap", tmp_path / "y.mig"
    result = run("convert", source, native)
    assert result.code == 0 and result.out.startswith(f"wrote {native} (native, ")
    assert run("verify", native).code == 0
    assert run("convert", native, back).code == 0  # the default target is the other format
    assert run("verify", back).code == 0
    assert contents(source) == contents(native) == contents(back)
    with snapfmt.open(source) as a, snapfmt.open(back) as b:
        assert a.configuration == b.configuration
        assert a.layout.vmdesc == b.layout.vmdesc  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["basic", "tiny"])
def test_native_samples_to_qemu_and_back(tmp_path: Path, run: Run, name: str) -> None:
    stream, native = tmp_path / "x.mig", tmp_path / "x.snap"
    assert run("convert", SAMPLES / f"{name}.snap", stream, "--to", "qemu").code == 0
    assert run("convert", stream, native, "--to", "native").code == 0
    # paths are the canonical ones for the QEMU identities now; contents are the same
    assert contents(SAMPLES / f"{name}.snap", True) == contents(native, True)


def test_missing_qemu_identity_is_refused(tmp_path: Path, run: Run) -> None:
    source = tmp_path / "s.snap"
    with Writer(source, machine="pc") as w:
        w.add_device("/dev/vmstate", b"\x01")
    target = tmp_path / "s.mig"
    result = run("convert", source, target)
    assert result.code == 2
    assert (
        result.err
        == f"snapfmt: error: {target}: device /dev/vmstate has no QEMU identifier; a QEMU stream cannot name it\n"
    )
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["s.snap"]


def test_converting_a_file_onto_itself_is_refused(tmp_path: Path, run: Run) -> None:
    source = tmp_path / "x.snap"
    source.write_bytes((SAMPLES / "basic.snap").read_bytes())
    link = tmp_path / "y.snap"
    os.link(source, link)
    for target in (source, link, tmp_path / "." / "x.snap"):
        result = run("convert", source, target)
        assert (result.code, result.out) == (2, "")
        assert result.err == (
            f"snapfmt: error: {target}: is the file being converted; name another output\n"
        )
    assert source.read_bytes() == (SAMPLES / "basic.snap").read_bytes()


def test_ignore_shared_streams_are_not_written(tmp_path: Path, run: Run) -> None:
    result = run(
        "convert", SAMPLES / "q35.snap", tmp_path / "x.mig"
    )  # q35.snap has x-ignore-shared
    assert (result.code, result.err) == (
        2,
        f"snapfmt: error: {tmp_path / 'x.mig'}: writing streams with x-ignore-shared is not supported\n",
    )


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        (
            [("/a/vmstate", "bad id")],
            "section id string 'bad id' holds a space or a control character",
        ),
        (
            [("/a/vmstate", "timer"), ("/b/vmstate", "timer")],
            "/b/vmstate has a QEMU identity (timer) that a reader would map to the path",
        ),
    ],
)
def test_what_a_reader_would_refuse_is_not_written(
    tmp_path: Path, run: Run, devices: list[tuple[str, str]], message: str
) -> None:
    source = tmp_path / "s.snap"
    with Writer(source, machine="pc") as w:
        for path, idstr in devices:
            w.add_device(path, b"\x01", qemu_idstr=idstr)
    target = tmp_path / "s.mig"
    result = run("convert", source, target)
    assert result.code == 2 and message in result.err, result.err
    assert not target.exists()


def test_libvirt_images_written_and_read_back(tmp_path: Path, run: Run) -> None:
    """--to libvirt: the header, the domain XML (given, or kept in a native file), the
    stream in each compression; snapfmt reads every one back to the same state."""
    import snapfmt

    source = SAMPLES / "qemu" / "pc.mig"
    refused = run("convert", source, tmp_path / "x.save", "--to", "libvirt")
    assert refused.code == 2
    assert refused.err == (
        f"snapfmt: error: {tmp_path / 'x.save'}: a libvirt save image needs the domain's "
        "XML: the snapshot keeps none; give --xml FILE\n"
    )
    assert not (tmp_path / "x.save").exists()
    xml = tmp_path / "domain.xml"
    xml.write_text("<domain type='qemu'><name>sample</name></domain>\n")
    image = tmp_path / "raw.save"
    assert run("convert", source, image, "--to", "libvirt", "--xml", xml).code == 0
    head = image.read_bytes()[:92]
    assert head[:16] == b"LibvirtQemudSave"
    assert int.from_bytes(head[16:20], "little") == 2  # version
    assert int.from_bytes(head[20:24], "little") == len(xml.read_bytes()) + 1  # XML and NUL
    native = tmp_path / "kept.snap"
    assert run("convert", image, native).code == 0  # the XML goes along
    for compression in ("raw", "gzip", "xz", "zstd"):
        again = tmp_path / f"{compression}.save"
        assert run("convert", native, again, "--to", "libvirt", "--compress", compression).code == 0
        with snapfmt.open(again) as snap:
            assert snap.wrapper is not None
            assert (snap.wrapper.compression, snap.wrapper.domain_xml) == (
                compression,
                xml.read_text(),
            )
        assert run("diff", source, again).code == 0


def test_mapped_ram_output_reads_back_the_same(tmp_path: Path, run: Run) -> None:
    source = SAMPLES / "qemu" / "pc.mig"
    out = tmp_path / "mapped.mig"
    assert run("convert", source, out, "--to", "qemu", "--mapped-ram", "-q").code == 0
    with snapfmt.open(source) as a, snapfmt.open(out) as b:
        assert b.configuration.capabilities == ("mapped-ram",)
        blocks = list(a.ram_blocks())
        assert [x.path for x in blocks] == [y.path for y in b.ram_blocks()]
        for block in blocks:
            assert block.read(0, block.length) == b.ram_block(block.path).read(0, block.length)
    assert run("diff", source, out, "--stat").out.startswith("SECTION")  # (the capability)
    assert run("verify", out).code == 0
    # and back to an ordinary stream: the same bytes as the source's own conversion
    plain, direct = tmp_path / "plain.mig", tmp_path / "direct.mig"
    assert run("convert", out, plain, "--to", "qemu", "-q").code == 0
    assert run("convert", source, direct, "--to", "qemu", "-q").code == 0
    assert plain.read_bytes() == direct.read_bytes()


@pytest.mark.parametrize(
    ("source", "args", "message"),
    [
        ("basic.snap", ["--to", "native", "--mapped-ram"], "--mapped-ram lays out a QEMU stream, not a native file"),
        ("qemu/pc-postcopy.mig", ["--to", "qemu", "--mapped-ram"], "cannot hold postcopy-ram's block page sizes"),
    ],
)  # fmt: skip
def test_mapped_ram_refusals(tmp_path: Path, run: Run, source: str, args: list[str],
                             message: str) -> None:  # fmt: skip
    result = run("convert", SAMPLES / source, tmp_path / "out", *args)
    assert result.code == 2 and message in result.err
    assert not list(tmp_path.iterdir())
