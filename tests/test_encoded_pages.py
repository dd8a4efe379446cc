"""Pages QEMU sends encoded, in streams built here: XBZRLE deltas over the page as sent
before, and COMPRESS_PAGE zlib data (the walk against the records is in
test_qemu_ram_walk; real QEMU's in test_stream_kinds_qemu).  Each bad record is one
line naming what is wrong, as QEMU's loader would refuse it."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

import snapfmt
from snapfmt.ops.diff import diff
from snapfmt.paths import Path as DevPath
from snapfmt.qemu import encoded
from tests.conftest import Run
from tests.test_qemu_ram_walk import PAGE, Tag, build, xbzrle

RAM = DevPath.of("pc.ram")


def stream(tmp_path: Path, sections: list[list[tuple[str, int, Tag]]], name: str = "s.mig") -> Path:
    target = tmp_path / name
    target.write_bytes(build({"pc.ram": 8}, sections))
    return target


def test_a_page_follows_its_deltas_across_sections(tmp_path: Path) -> None:
    target = stream(tmp_path, [[("pc.ram", 1, 7)], [("pc.ram", 1, ("x", 3))],
                               [("pc.ram", 1, ("x", 11)), ("pc.ram", 2, ("x", 5))]])  # fmt: skip
    page = (7).to_bytes(4, "big") * (PAGE // 4)
    from tests.test_qemu_ram_walk import _changed

    want = _changed(_changed(page, 3), 11)
    with snapfmt.open(target) as snap:
        block = snap.ram_block(RAM)
        assert block.read(PAGE, PAGE) == want
        assert block.read(2 * PAGE, PAGE) == _changed(bytes(PAGE), 5)  # over a page never sent
        assert block.summary() == (8, 6, 2 * PAGE)


def test_diff_decodes_encoded_pages(tmp_path: Path) -> None:
    plain = stream(tmp_path, [[("pc.ram", 0, 9), ("pc.ram", 3, 4)]], "plain.mig")
    same = stream(tmp_path, [[("pc.ram", 0, ("z", 9)), ("pc.ram", 3, ("z", 4))]], "same.mig")
    other = stream(tmp_path, [[("pc.ram", 0, ("z", 9)), ("pc.ram", 3, 4)],
                              [("pc.ram", 3, ("x", 2))]], "other.mig")  # fmt: skip
    with snapfmt.open(plain) as a, snapfmt.open(same) as b, snapfmt.open(other) as c:
        assert not [s for s in diff(a, b).sections if str(s.path) == str(RAM)]
        changed = [s for s in diff(a, c).sections if str(s.path) == str(RAM)]
        assert changed and changed[0].pages == 1


def test_convert_writes_encoded_pages_whole(tmp_path: Path, run: Run) -> None:
    target = stream(
        tmp_path, [[("pc.ram", 0, 9)], [("pc.ram", 0, ("x", 1)), ("pc.ram", 5, ("z", 3))]]
    )
    for kind in ("native", "qemu"):
        out = tmp_path / f"out.{kind}"
        assert run("convert", target, out, "--to", kind).code == 0
        assert run("diff", target, out, "--stat").code in (0, 1)
        with snapfmt.open(target) as a, snapfmt.open(out) as b:
            assert a.ram_block(RAM).read(0, 8 * PAGE) == b.ram_block(RAM).read(0, 8 * PAGE)


def _record(flags: int, body: bytes) -> bytes:
    """A stream whose only page record is pc.ram's page 0 with *flags* and *body*."""
    out = bytearray(build({"pc.ram": 2}, [[("pc.ram", 0, 1)]]))
    at = out.rindex(b"\x06pc.ram") - 8  # the page record (the block list names it first)
    return bytes(out[:at] + (flags).to_bytes(8, "big") + b"\x06pc.ram" + body
                 + out[at + 15 + PAGE :])  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "body", "message"),
    [
        (0x40, b"\x02\x00\x02\x00\x01", "bad XBZRLE page: encoding 0x2, expected 0x1"),
        (0x40, b"\x01\x10\x01" + bytes(4097), "bad XBZRLE page: a delta of 4097 bytes, more than a page"),
        (0x40, b"\x01\x00\x04\x00\x00\x01\x41", "bad XBZRLE page: a run of length 0"),
        (0x40, b"\x01\x00\x04\x80\x80\x01\x41", "a run count takes more than two bytes"),
        (0x40, b"\x01\x00\x04\xff\x7f\x01\x41", "the delta goes past the end of the page"),
        (0x40, b"\x01\x00\x03\x00\x05\x41", "new bytes go past the end of the delta"),
        (0x40, b"\x01\x00\x04\x00\x01\x41\x07", "a run count is cut short"),
        (0x100, (5000).to_bytes(4, "big"), "compressed RAM page longer than zlib makes a page"),
        (0x42, b"\x00", "RAM record of no single page kind"),
    ],
)  # fmt: skip
def test_bad_encoded_records_are_refused_where_they_are(
    tmp_path: Path, run: Run, flags: int, body: bytes, message: str
) -> None:
    target = tmp_path / "bad.mig"
    target.write_bytes(_record(flags, body))
    result = run("dump", target)
    assert result.code == 2 and message in result.err and result.err.count("\n") == 1
    salvaged = run("info", target)  # what came before it, and where it is
    assert salvaged.code == 1 and message in salvaged.out and "damaged at offset" in salvaged.out


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not zlib at all", "compressed RAM page does not inflate"),
        (zlib.compress(bytes(PAGE + 1)), "does not inflate to at most a page"),
        (zlib.compress(b"A" * 100)[:-3], "does not inflate to at most a page"),
    ],
)
def test_bad_compressed_pages_are_refused_when_read(
    tmp_path: Path, run: Run, data: bytes, message: str
) -> None:
    target = tmp_path / "bad.mig"
    target.write_bytes(_record(0x100, len(data).to_bytes(4, "big") + data))
    assert run("info", target).code == 0  # the walk does not inflate pages
    for command in (["extract", target, "pc.ram", "-o", tmp_path / "out.bin"], ["verify", target]):
        result = run(*command)
        assert result.code in (1, 2) and message in result.err + result.out
    assert not (tmp_path / "out.bin").exists()


def test_a_short_compressed_page_leaves_the_rest_as_it_was(tmp_path: Path) -> None:
    """QEMU inflates into the page as it holds it: fewer bytes change only those."""
    target = stream(tmp_path, [[("pc.ram", 0, 9)]])
    data = bytearray(target.read_bytes())
    short = zlib.compress(b"B" * 100)
    at = data.rindex(b"\x06pc.ram") + 7 + PAGE  # after page 0 of pc.ram: the EOS
    record = (0x20 | 0x100).to_bytes(8, "big") + len(short).to_bytes(4, "big") + short
    target.write_bytes(bytes(data[:at] + record + data[at:]))
    with snapfmt.open(target) as snap:
        page = (9).to_bytes(4, "big") * (PAGE // 4)
        assert snap.ram_block(RAM).read(0, PAGE) == b"B" * 100 + page[100:]


def test_xbzrle_checks_agree_with_applying() -> None:
    old, new = bytes(PAGE), b"\x01" * 3 + bytes(PAGE - 6) + b"\x02" * 3
    delta = xbzrle(old, new)
    assert encoded.xbzrle_problem(delta, PAGE) is None
    page = bytearray(old)
    encoded.apply_xbzrle(page, delta)
    assert page == new
    assert encoded.xbzrle_problem(b"", PAGE) is None  # an unchanged page: nothing to do
