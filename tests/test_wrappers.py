"""libvirt save images and whole-file compression around real QEMU streams.

No libvirt here: images are built as libvirt writes them (qemu_saveimage.h: 92-byte
header in host byte order, NUL-terminated domain XML, padding, then the stream)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from pathlib import Path

import pytest
import zstandard

import snapfmt
from tests.helpers import SAMPLES, Run

STREAM = (SAMPLES / "qemu" / "q35.mig").read_bytes()
XML = b"<domain type='kvm'><name>demo</name><memory unit='MiB'>16</memory></domain>"
COMPRESS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress,
            "zstd": lambda d: zstandard.ZstdCompressor().compress(d)}  # fmt: skip
FORMATS = {"raw": 0, "gzip": 1, "bzip2": 2, "xz": 3, "lzop": 4, "zstd": 5, "sparse": 6}


def image(compression: str = "raw", order: str = "<", magic: bytes = b"LibvirtQemudSave") -> bytes:
    data = XML + b"\0" + bytes(4096 - len(XML) - 1)  # libvirt pads the XML area
    head = magic + struct.pack(f"{order}19I", 2, len(data), 1, FORMATS[compression], 0, *[0] * 14)
    payload = STREAM if compression in ("raw", "lzop", "sparse") else COMPRESS[compression](STREAM)
    return head + data + payload


def same_as_stream(path: Path) -> None:
    with snapfmt.open(path) as wrapped, snapfmt.open(SAMPLES / "qemu" / "q35.mig") as plain:
        assert [s.key for s in wrapped.sections] == [s.key for s in plain.sections]
        for s in plain.sections:
            assert s.path is not None
            if s.kind_name == "device":
                assert wrapped.device(s.path).data == plain.device(s.path).data
        ram = wrapped.ram_block(wrapped.select_one("/pc.ram"))
        assert ram.read(0x800000, 256) == bytes(range(256))


@pytest.mark.parametrize("compression", ["raw", "gzip", "bzip2", "xz", "zstd"])
@pytest.mark.parametrize("order", ["<", ">"])
def test_libvirt_images(tmp_path: Path, run: Run, compression: str, order: str) -> None:
    path = tmp_path / "demo.save"
    path.write_bytes(image(compression, order))
    same_as_stream(path)
    with snapfmt.open(path) as snap:
        assert snap.format_name == "libvirt"
        wrapper = snap.wrapper  # type: ignore[attr-defined]
        assert (wrapper.compression, wrapper.domain_xml, wrapper.was_running) == (
            compression,
            XML.decode(),
            True,
        )
        assert wrapper.byte_order == ("little" if order == "<" else "big")
    info = run("info", path)
    assert info.code == 0 and "libvirt save image" in info.out and "demo" in info.out
    assert run("verify", path).code == 0


@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd", "bzip2"])
def test_whole_compressed_streams(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "vm.mig.z"
    path.write_bytes(COMPRESS[compression](STREAM))
    same_as_stream(path)


def test_incomplete_libvirt_image(tmp_path: Path, run: Run) -> None:
    path = tmp_path / "demo.save"
    path.write_bytes(image(magic=b"LibvirtQemudPart"))
    result = run("info", path)
    assert result.code == 2
    assert (
        result.err
        == f"snapfmt: error: {path}: offset 0x0: libvirt save image is incomplete (the save never finished): found LibvirtQemudPart, expected LibvirtQemudSave\n"
    )


@pytest.mark.parametrize("compression", ["lzop", "sparse"])
def test_unsupported_libvirt_formats(tmp_path: Path, run: Run, compression: str) -> None:
    path = tmp_path / "demo.save"
    path.write_bytes(image(compression))
    result = run("info", path)
    assert (
        result.code == 2
        and f"libvirt save images in {compression} format are not supported" in result.err
    )


def test_corrupt_compressed_stream(tmp_path: Path, run: Run) -> None:
    data = bytearray(gzip.compress(STREAM))
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "vm.mig.gz"
    path.write_bytes(data)
    result = run("dump", path)
    assert result.code == 2 and result.err.startswith(
        f"snapfmt: error: {path}: offset 0x0: gzip data does not decompress"
    )
    assert run("info", path).code in (1, 2)  # salvaged as far as it decompresses, if at all


def test_compressed_data_that_is_not_a_stream(tmp_path: Path, run: Run) -> None:
    path = tmp_path / "notes.gz"
    path.write_bytes(gzip.compress(b"hello, world"))
    result = run("info", path)
    assert (
        result.err
        == f"snapfmt: error: {path}: offset 0x0: the gzip-compressed data is not a QEMU stream: found first bytes 68656c6c, expected 5145564d\n"
    )


def test_decompression_bomb_stops(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapfmt import wrappers

    monkeypatch.setattr(wrappers, "MAX_RATIO", 10)
    monkeypatch.setattr(wrappers, "MAX_EXTRA", 0)
    path = tmp_path / "bomb.gz"
    path.write_bytes(
        gzip.compress(STREAM[:8] + bytes(64 << 20))
    )  # 64 MiB of zeros behind a QEVM header
    result = run("info", path)
    assert result.code == 2 and "decompresses to more than" in result.err


def test_no_temporary_file_survives(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = bytearray(gzip.compress(STREAM))
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "vm.mig.gz"
    path.write_bytes(data)
    assert run("dump", path).code == 2
    assert run("info", path).code == 1  # (salvaged: a temporary file held what decompressed)
    good = tmp_path / "good.mig.gz"
    good.write_bytes(gzip.compress(STREAM))
    assert run("info", good).code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.mig.gz", "vm.mig.gz"]


def test_wrapper_replace_makes_a_copy() -> None:
    """The NamedTuple API the opener can move to (then Wrapper becomes a NamedTuple)."""
    from snapfmt.wrappers import Wrapper

    header = Wrapper("libvirt", "gzip", 2, True, "little")
    full = header._replace(domain_xml=XML.decode())
    assert (header.domain_xml, full.domain_xml) == (None, XML.decode())
    assert full._asdict() == {"kind": "libvirt", "compression": "gzip", "version": 2,
                              "was_running": True, "byte_order": "little",
                              "domain_xml": XML.decode(), "extra": {}}  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected field names: \['xml'\]"):
        header._replace(xml="")
