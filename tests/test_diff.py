"""diff on samples (no QEMU needed); real-QEMU diffs are in test_real_qemu.py."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapfmt
from snapfmt.ops.diff import diff
from snapfmt.perf import compare
from tests.helpers import SAMPLES, Run
from tests.test_qemu_ram_walk import PAGE, build


def test_identical_files_and_mixed_formats(tmp_path: Path, run: Run) -> None:
    result = run("diff", SAMPLES / "basic.snap", SAMPLES / "basic.snap")
    assert (result.code, result.out.splitlines()[-1]) == (0, "identical")
    native = tmp_path / "pc.snap"
    assert run("convert", SAMPLES / "qemu" / "pc.mig", native).code == 0
    result = run("diff", SAMPLES / "qemu" / "pc.mig", native)  # a QEMU stream against native
    assert result.code == 0 and result.out.endswith("identical\n")


def _edited_basic(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(SAMPLES / "manifests", folder)
    text = (folder / "basic.toml").read_text()
    text = text.replace("value = 2048 }", "value = 4096 }", 1)  # rxbuf_size
    text = text.replace(
        '{ offset = 0x7ff000, length = 0x1000, pattern = "55aa" },',
        '{ offset = 0x7fe000, length = 0x2000, pattern = "55ab" },',
    )
    text = text.replace('state = "00010203 04050607', 'state = "00010203 04ff0607')
    (folder / "basic.toml").write_text(text)
    return folder / "basic.toml"


def test_fields_bytes_and_pages(tmp_path: Path, run: Run) -> None:
    edited = tmp_path / "edited.snap"
    assert run("write", _edited_basic(tmp_path), "-o", edited).code == 0
    result = run("diff", SAMPLES / "basic.snap", edited, "--pages")
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[:2] == [f"--- {SAMPLES / 'basic.snap'}", f"+++ {edited}"]
    assert lines[-1] == "3 differences, 3 sections identical"
    assert "~ /i440FX-pcihost/pci.0/e1000@05.0/vmstate: 1 field changed" in lines
    assert "    rxbuf_size  0x800 (2048) -> 0x1000 (4096)" in lines
    assert "~ /i440FX-pcihost/pci.0/lsi53c895a@07.0/vmstate: 1 byte differs in 1 range" in lines
    assert "    bytes 0x5-0x5  05 -> ff" in lines
    assert "~ /pc.ram: 2 pages differ (6144 bytes changed)" in lines
    assert "    0x7fe000-0x7fffff" in lines
    data = json.loads(run("diff", SAMPLES / "basic.snap", edited, "--json").out)
    ram = next(s for s in data["sections"] if s["path"] == "/pc.ram")
    assert (ram["pages"], ram["ranges"]) == (2, [[0x7FE000, 0x7FFFFF]])
    assert ram["bytes_changed"] == 4096 + 2048  # the new page, and every other byte of the old
    assert {s["path"] for s in data["sections"]} == {
        "/i440FX-pcihost/pci.0/e1000@05.0/vmstate",
        "/i440FX-pcihost/pci.0/lsi53c895a@07.0/vmstate",
        "/pc.ram",
    }


def test_native_diff_reads_only_differing_chunks(tmp_path: Path) -> None:
    edited = tmp_path / "edited.snap"
    from snapfmt.ops import manifest

    manifest.build(manifest.load(str(_edited_basic(tmp_path))), str(edited))
    with snapfmt.open(SAMPLES / "basic.snap") as a, snapfmt.open(edited) as b:
        block_a = a.ram_block(a.select_one("/pc.ram"))
        decoded: list[int] = []
        original = type(block_a).decode

        def counting(self: object, chunks: list, **options: bool) -> list:  # type: ignore[type-arg]
            decoded.extend(c.offset for c in chunks)
            return original(self, chunks, **options)  # type: ignore[arg-type]

        type(block_a).decode = counting  # type: ignore[method-assign]
        try:
            result = diff(a, b)
        finally:
            type(block_a).decode = original  # type: ignore[method-assign]
    assert not result.identical
    assert decoded == [0x7F0000, 0x7F0000]  # the one 64 KiB chunk that differs, from each side


def test_configuration_and_sections_only_on_one_side(run: Run) -> None:
    result = run("diff", SAMPLES / "qemu" / "pc.mig", SAMPLES / "qemu" / "q35.mig", "--no-fields")
    assert result.code == 1
    lines = result.out.splitlines()
    assert "~ configuration: machine pc-i440fx-7.2 -> pc-q35-7.2" in lines
    assert any(
        line.startswith("- /i440FX-pcihost/pci.0/e1000@05.0/vmstate: e1000") for line in lines
    )
    assert any(line.startswith("+ /q35-pcihost/pcie.0/e1000@05.0/vmstate: e1000") for line in lines)
    stat = run("diff", SAMPLES / "qemu" / "pc.mig", SAMPLES / "qemu" / "q35.mig", "--stat")
    assert stat.code == 1 and stat.out.splitlines()[0].split() == [
        "SECTION",
        "STATUS",
        "FIELDS/PAGES",
        "BYTES",
    ]


def test_bad_input_is_exit_2(tmp_path: Path, run: Run) -> None:
    missing = tmp_path / "nope.snap"
    result = run("diff", SAMPLES / "basic.snap", missing)
    assert (result.code, result.err) == (
        2,
        f"snapfmt: error: {missing}: cannot open: No such file or directory\n",
    )


@st.composite
def _edits(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A RAM image and an edited copy: some pages changed in a few bytes or whole, in
    places and runs hypothesis chooses."""
    pages = draw(st.integers(1, 80))
    rng = random.Random(draw(st.integers(0, 1 << 32)))
    kinds = [rng.choice([b"", bytes(PAGE), rng.randbytes(PAGE)]) for _ in range(pages)]
    a = bytearray(b"".join(k or (b"\x11" * PAGE) for k in kinds))
    b = bytearray(a)
    for _ in range(draw(st.integers(0, 12))):
        page = draw(st.integers(0, pages - 1))
        how = draw(st.sampled_from(["byte", "whole", "zero", "run"]))
        if how == "byte":
            at = page * PAGE + draw(st.integers(0, PAGE - 1))
            b[at] ^= draw(st.integers(1, 255))
        elif how == "whole":
            b[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
        elif how == "zero":
            b[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
        else:
            end = min(pages, page + draw(st.integers(1, 20)))
            b[page * PAGE : end * PAGE] = b"\x5a" * ((end - page) * PAGE)
    return bytes(a), bytes(b)


available = compare.IN_PLACE


def _expected(a: bytes, b: bytes) -> tuple[int, int, list[tuple[int, int]]]:
    pages, changed, ranges = 0, 0, []
    for lo in range(0, len(a), PAGE):
        pa, pb = a[lo : lo + PAGE], b[lo : lo + PAGE]
        if pa != pb:
            pages += 1
            changed += sum(x != y for x, y in zip(pa, pb, strict=True))
            if ranges and ranges[-1][1] + 1 == lo:
                ranges[-1] = (ranges[-1][0], lo + PAGE - 1)
            else:
                ranges.append((lo, lo + PAGE - 1))
    return pages, changed, ranges


def _native(path: Path, image: bytes) -> Path:
    raw = path.with_suffix(".img")
    raw.write_bytes(image)
    with snapfmt.Writer(path, machine="pc-i440fx-7.2", chunk_size=PAGE * 4) as w:
        w.add_ram_block("/pc.ram", str(raw), qemu_idstr="pc.ram")
    return path


def _qemu(path: Path, image: bytes) -> Path:
    pages = len(image) // PAGE
    records = [
        (
            "pc.ram",
            i,
            image[i * PAGE : (i + 1) * PAGE] if any(image[i * PAGE : (i + 1) * PAGE]) else None,
        )
        for i in range(pages)
    ]
    path.write_bytes(build({"pc.ram": pages}, [records[: pages // 2], records[pages // 2 :]]))
    return path


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_edits(), st.sampled_from(["native", "qemu", "mixed"]), st.booleans())
def test_ram_differences_are_exact(
    tmp_path: Path, images: tuple[bytes, bytes], kinds: str, in_place: bool
) -> None:
    """Pages, bytes and ranges of a RAM diff equal a byte-by-byte comparison, whatever
    the formats (native chunk hashes, QEMU runs of records compared in place or read
    into buffers, or one of each)."""
    a, b = images
    compare.IN_PLACE = in_place
    left = (_native if kinds != "qemu" else _qemu)(tmp_path / "a.x", a)
    right = (_qemu if kinds != "native" else _native)(tmp_path / "b.y", b)
    try:
        with snapfmt.open(left) as sa, snapfmt.open(right) as sb:
            result = diff(sa, sb)
    finally:
        compare.IN_PLACE = available
    ram = [s for s in result.sections if s.path == "/pc.ram"]
    pages, changed, ranges = _expected(a, b)
    if not pages:
        assert not ram
        return
    assert (ram[0].pages, ram[0].bytes_changed, ram[0].ranges) == (pages, changed, ranges)


@given(st.binary(max_size=3000), st.data())
def test_count_changed_equals_its_plain_version(a: bytes, data: st.DataObject) -> None:
    """Any lengths, changes anywhere, any buffer types."""
    b = bytearray(a)
    for at in data.draw(st.lists(st.integers(0, max(0, len(a) - 1)), max_size=8 if a else 0)):
        b[at] = data.draw(st.integers(0, 255))
    expected = compare.count_changed_plain(a, b)
    assert expected == sum(x != y for x, y in zip(a, b, strict=True))
    assert compare.count_changed(a, b) == expected
    assert compare.count_changed(memoryview(b), memoryview(a)) == expected
    assert compare.count_changed(bytearray(a), bytes(b)) == expected


@given(st.binary(max_size=5000), st.data(), st.sampled_from([1, 7, 1024]))
def test_page_changes_equals_its_plain_version(a: bytes, data: st.DataObject, page: int) -> None:
    b = bytearray(a)
    for at in data.draw(st.lists(st.integers(0, max(0, len(a) - 1)), max_size=8 if a else 0)):
        b[at] = data.draw(st.integers(0, 255))
    plain = compare.page_changes_plain(16, bytearray(a), b, page)
    assert compare.page_changes(16, bytearray(a), memoryview(b), page, block=2048) == plain
