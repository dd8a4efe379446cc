"""Damaged files: every change is caught, always as a SnapfmtError, never silently."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapfmt
from snapfmt.errors import SnapfmtError
from snapfmt.ops.verify import verify
from tests.helpers import SAMPLES, Run

TINY = (SAMPLES / "tiny.snap").read_bytes()


def outcome(path: Path) -> str:
    """'refused' (open fails: exit 2), 'reported' (verify finds problems: exit 1) or 'ok'."""
    try:
        snap = snapfmt.open(path)
    except SnapfmtError:
        return "refused"
    with snap:
        try:
            report = verify(snap)
        except SnapfmtError:
            return "refused"
    return "ok" if report.ok else "reported"


def test_every_bit_flip_is_caught(tmp_path: Path) -> None:
    target = tmp_path / "flipped.snap"
    missed = []
    for at in range(len(TINY)):
        damaged = bytearray(TINY)
        damaged[at] ^= 0x01
        target.write_bytes(damaged)
        if outcome(target) == "ok":
            missed.append(at)
    assert missed == []


def test_every_byte_flip_gives_exit_1_or_2_and_no_traceback(tmp_path: Path, run: Run) -> None:
    target = tmp_path / "flipped.snap"
    for at in range(len(TINY)):
        damaged = bytearray(TINY)
        damaged[at] ^= 0xFF
        target.write_bytes(damaged)
        result = run("verify", target)
        if result.code == 1:
            assert result.out.startswith("BAD  ") and result.err == "", at
        else:
            assert result.code == 2, (at, result)
            assert result.err.startswith("snapfmt: error: ") and result.err.count("\n") == 1, (
                at,
                result.err,
            )


mutations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, len(TINY) - 1), st.integers(0, 255)),
        st.tuples(st.just("cut"), st.integers(0, len(TINY) - 1), st.integers(1, 64)),
        st.tuples(st.just("insert"), st.integers(0, len(TINY)), st.binary(min_size=1, max_size=16)),
    ),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations)
def test_mutated_files_raise_only_snapfmt_errors(
    tmp_path: Path, edits: list[tuple[str, int, object]]
) -> None:
    data = bytearray(TINY)
    for kind, at, arg in edits:
        if kind == "set":
            data[min(at, len(data) - 1) : min(at, len(data) - 1) + 1] = bytes([arg])  # type: ignore[list-item]
        elif kind == "cut":
            del data[at : at + arg]  # type: ignore[operator]
        else:
            data[at:at] = arg  # type: ignore[assignment]
    target = tmp_path / "mutated.snap"
    target.write_bytes(data)
    result = outcome(target)  # anything but SnapfmtError propagates and fails the test
    if bytes(data) != TINY:
        assert result != "ok"


def test_flip_in_chunk_data_names_path_and_range(tmp_path: Path, run: Run) -> None:
    with snapfmt.open(SAMPLES / "tiny.snap") as snap:
        block = snap.ram_block(snap.select_one("/pc.ram"))
        raw_chunk = next(c for c in block.chunks() if c.encoding == 1)
    damaged = bytearray(TINY)
    damaged[raw_chunk.file_offset + 5] ^= 0x40
    target = tmp_path / "bad.snap"
    target.write_bytes(damaged)
    result = run("verify", target)
    assert result.code == 1
    assert result.out.splitlines() == [
        f"BAD  /pc.ram: chunk 3 (bytes 0x3000-0x3fff) content does not match its hash "
        f"(file offset {raw_chunk.file_offset:#x})",
        f"FAIL {target}: 1 problem in 4 sections, 5 chunks, 20.3 KiB checked",
    ]
    assert result.err == ""


def test_flip_in_header_is_refused_with_one_line(tmp_path: Path, run: Run) -> None:
    damaged = bytearray(TINY)
    damaged[20] ^= 1
    target = tmp_path / "bad.snap"
    target.write_bytes(damaged)
    result = run("verify", target)
    assert result.code == 2
    assert (
        result.err
        == f"snapfmt: error: {target}: offset 0x0: header checksum does not match its bytes\n"
    )


@pytest.mark.parametrize("sample", ["tiny.snap", "q35.snap", "basic.snap"])
@pytest.mark.parametrize("command", ["info", "dump", "verify"])
def test_truncation_at_every_64th_is_a_clear_error(
    tmp_path: Path, run: Run, sample: str, command: str
) -> None:
    data = (SAMPLES / sample).read_bytes()
    target = tmp_path / "cut.snap"
    for k in range(64):
        target.write_bytes(data[: len(data) * k // 64])
        result = run(command, target)
        if result.code == 1 and command != "dump":  # info and verify salvage what they can
            assert result.err == "" and "damaged" in result.out, (k, result)
            continue
        assert result.code == 2, (k, result)
        assert result.out == ""
        lines = result.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"snapfmt: error: {target}: "), (
            k,
            result.err,
        )
        assert "Traceback" not in result.err


def test_truncated_messages(tmp_path: Path, run: Run) -> None:
    target = tmp_path / "cut.snap"
    target.write_bytes(TINY[: len(TINY) // 2])
    assert run("dump", target).err == (
        f"snapfmt: error: {target}: offset {len(TINY) // 2 - 8:#x}: no footer at the end of the file "
        f"(truncated or unfinished): found {TINY[len(TINY) // 2 - 8 : len(TINY) // 2].hex()}, "
        f"expected 534e415046454e44\n"
    )
    target.write_bytes(b"")
    assert run("info", target).err == f"snapfmt: error: {target}: empty file, not a snapshot\n"
    target.write_bytes(TINY[:40])
    assert run("info", target).err == (
        f"snapfmt: error: {target}: offset 0x0: file too short for a native snapshot: "
        f"found 40 bytes, expected at least 112\n"
    )


def test_dump_reports_a_damaged_configuration_before_damaged_devices(
    tmp_path: Path, run: Run
) -> None:
    with snapfmt.open(SAMPLES / "tiny.snap") as snap:
        sections = {s.kind_name: s for s in snap.sections}
    damaged = bytearray(TINY)
    damaged[sections["configuration"].offset] ^= 0xFF
    damaged[sections["device"].offset] ^= 0xFF
    target = tmp_path / "bad.snap"
    target.write_bytes(damaged)
    result = run("dump", target)
    assert result.code == 2
    assert "configuration: section checksum does not match" in result.err


def test_a_flipped_zstd_header_bit_a_decoder_ignores_is_reported(tmp_path: Path) -> None:
    """Bit 0x10 of a zstd frame header descriptor is unused: decoders ignore it, so verify
    checks it (spec/format.md §3), for every zstd chunk of a sample."""
    source = SAMPLES / "basic.snap"
    with snapfmt.open(source) as snap:
        frames = [(str(b.path), c.index, c.file_offset) for b in snap.ram_blocks()
                  for c in b.chunks() if c.encoding == 2]  # type: ignore[attr-defined]  # fmt: skip
    assert frames
    for path, index, at in frames:
        data = bytearray(source.read_bytes())
        data[at + 4] ^= 0x10
        target = tmp_path / "x.snap"
        target.write_bytes(bytes(data))
        with snapfmt.open(target) as snap:
            problems = verify(snap).problems
        assert [(p.section, p.message.split(")")[0]) for p in problems] == [
            (path, f"chunk {index} (bytes {index * 65536:#x}-{index * 65536 + 65535:#x}")
        ], problems
