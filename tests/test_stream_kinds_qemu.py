"""Streams real QEMU writes with pages encoded: a live save with xbzrle (QEMU 7.2 and
10.0) and a save with QEMU 7.2's compress.  QEMU itself is the oracle: it loads each
stream and saves its RAM again plainly, and snapfmt's reading of the encoded stream must
equal that; the stream converted to a plain QEMU stream (and to native) loads in QEMU
with the same RAM."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import snapfmt
from snapfmt.ops.convert import convert
from snapfmt.ops.diff import diff
from snapfmt.qemu import encoded, qmp
from tests.conftest import Run
from tests.helpers import QEMUS, need_qemu


def dirtying_bios() -> bytes:
    """A 64 KiB firmware that, in real mode, increments the first byte of each of the
    128 pages from 0x10000 to 0x8f000, round and round: pages dirty again and again by a
    byte, what XBZRLE is for."""
    code = bytes.fromhex(
        "b80010"  # 0: mov ax, 0x1000
        "8ec0"  # 3: mov es, ax
        "26fe060000"  # inc byte [es:0]
        "050001"  # add ax, 0x100 (the next page)
        "3d0090"  # cmp ax, 0x9000
        "72f1"  # jb 3
        "ebec"  # jmp 0
    )
    image = bytearray(0x10000)
    image[: len(code)] = code
    image[0xFFF0:0xFFF3] = b"\xe9\x0d\x00"  # the reset vector: jmp to offset 0
    return bytes(image)


def machine(folder: Path) -> list[str]:
    """32 MiB, the firmware above, 12 MiB of random bytes put in RAM by the loader device
    (so that the first pass takes long enough for QEMU to measure its bandwidth and go
    on iterating), KVM where the machine has it."""
    (folder / "bios.bin").write_bytes(dirtying_bios())
    (folder / "random.bin").write_bytes(os.urandom(12 << 20))
    return ["-M", "pc-i440fx-7.2", "-m", "32M", "-accel", "kvm", "-accel", "tcg",
            "-bios", str(folder / "bios.bin"),
            "-device", f"loader,file={folder / 'random.bin'},addr=0x200000"]  # fmt: skip


def capability(vm: qmp.Qemu, name: str, state: bool = True) -> None:
    vm.command("migrate-set-capabilities", capabilities=[{"capability": name, "state": state}])


def live_save(binary: str, args: list[str], out: Path, cap: str) -> None:
    """Save while the firmware runs.  With xbzrle, a short downtime limit and a modest
    bandwidth keep QEMU iterating; once QEMU says it has sent pages encoded (it can only
    from the third pass: the first fills no cache, the second fills it) the guest stops
    and the save completes.  A save that QEMU finished before then (a pass found nothing
    dirty: a busy host can starve the guest) is made again."""
    said = []
    for _ in range(6):
        said.append(_live_save_once(binary, args, out, cap).get("xbzrle-cache"))
        if cap != "xbzrle" or encoded_steps(out)[encoded.XBZRLE] > 50:
            return
    raise AssertionError(f"no xbzrle save in {len(said)} tries: {said}")


def _live_save_once(binary: str, args: list[str], out: Path, cap: str) -> dict[str, Any]:
    with qmp.Qemu(args, binary=binary) as vm:
        capability(vm, cap)
        if cap == "xbzrle":
            vm.command("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": 64 << 20})
            vm.command("cont")
            time.sleep(0.2)
        vm.command("migrate", uri=f"exec:cat > {out}")
        deadline = time.monotonic() + 30
        while cap == "xbzrle" and time.monotonic() < deadline:
            status = vm.command("query-migrate")
            if status.get("status") in ("completed", "failed"):
                break
            if status.get("xbzrle-cache", {}).get("pages", 0) > 200:
                vm.command("stop")
                break
            time.sleep(0.01)
        status = vm.wait_migration()
        assert status["status"] == "completed", status
        return status


def loaded_and_saved_again(binary: str, args: list[str], stream: Path, out: Path,
                           cap: str | None = None) -> None:  # fmt: skip
    """QEMU loads *stream* (with capability *cap* on where loading needs it) and saves
    what it loaded to *out*, without encoding."""
    with qmp.Qemu(args, binary=binary, incoming="defer") as vm:
        if cap:
            capability(vm, cap)
        vm.command("migrate-incoming", uri=f"exec:cat {stream}")
        vm.wait_incoming()
        if cap:
            capability(vm, cap, False)
        vm.save(str(out))


def encoded_steps(path: Path) -> dict[int, int]:
    """{kind: how many records} of the pages a stream sent encoded."""
    counts = {encoded.XBZRLE: 0, encoded.COMPRESSED: 0}
    with snapfmt.open(path) as snap:
        for block in snap.ram_blocks():
            steps = block.steps  # type: ignore[attr-defined]
            for where in steps[1::2] if steps is not None else ():
                counts[where % 2] += 1
    return counts


def same_ram(a: Path, b: Path) -> None:
    with snapfmt.open(a) as left, snapfmt.open(b) as right:
        changed = [s for s in diff(left, right).sections if s.kind == "ram-block"]
        assert changed == []
        assert len(list(left.ram_blocks())) == len(list(right.ram_blocks()))


CASES = [("7.2", "xbzrle", encoded.XBZRLE), ("10.0", "xbzrle", encoded.XBZRLE),
         ("7.2", "compress", encoded.COMPRESSED)]  # fmt: skip


@pytest.mark.parametrize(("version", "cap", "kind"), CASES)
def test_encoded_streams_read_as_qemu_loads_them(
    tmp_path: Path, run: Run, version: str, cap: str, kind: int
) -> None:
    binary = need_qemu(version)
    args = machine(tmp_path)
    stream, again = tmp_path / "encoded.mig", tmp_path / "again.mig"
    live_save(binary, args, stream, cap)
    counts = encoded_steps(stream)
    assert counts[kind] > (50 if kind == encoded.XBZRLE else 1000), counts
    assert run("verify", stream).code == 0
    # QEMU loads it (the compressed one only with compress on: QEMU refuses its pages
    # otherwise) and saves it again plainly: the same RAM as snapfmt reads
    loaded_and_saved_again(binary, args, stream, again, cap if cap == "compress" else None)
    same_ram(stream, again)
    # converted, it is a plain stream QEMU loads with nothing turned on
    plain, native = tmp_path / "plain.mig", tmp_path / "plain.snap"
    with snapfmt.open(stream) as snap:
        convert(snap, str(plain), "qemu")
        convert(snap, str(native), "native")
    assert encoded_steps(plain) == {encoded.XBZRLE: 0, encoded.COMPRESSED: 0}
    loaded_and_saved_again(binary, args, plain, tmp_path / "plain-again.mig")
    same_ram(stream, tmp_path / "plain-again.mig")
    same_ram(stream, native)


def test_versions_cover_both_qemus() -> None:
    assert {version for version, _, _ in CASES} == set(QEMUS)


def mapped_ram_caps(multifd: bool) -> list[str]:
    return ["mapped-ram", "multifd"] if multifd else ["mapped-ram"]


def loaded_from_file(
    binary: str, args: list[str], stream: Path, out: Path, caps: list[str]
) -> None:
    """QEMU loads a mapped-ram *stream* through a ``file:`` URI with *caps* on and saves
    what it loaded to *out*, as an ordinary stream."""
    with qmp.Qemu(args, binary=binary, incoming="defer") as vm:
        for cap in caps:
            capability(vm, cap)
        vm.command("migrate-incoming", uri=f"file:{stream}")
        vm.wait_incoming()
        for cap in caps:
            capability(vm, cap, False)
        vm.save(str(out))


@pytest.mark.parametrize("multifd", [False, True], ids=["mapped-ram", "mapped-ram+multifd"])
def test_mapped_ram_streams_both_ways(tmp_path: Path, run: Run, multifd: bool) -> None:
    """QEMU 10.0's mapped-ram save (multifd writes the same layout) reads as QEMU loads
    it; converted to an ordinary stream it loads with nothing on; and an ordinary stream
    converted with --mapped-ram loads through file: with the capabilities on."""
    binary = need_qemu("10.0")
    args = machine(tmp_path)
    caps = mapped_ram_caps(multifd)
    theirs, again = tmp_path / "theirs.mig", tmp_path / "again.mig"
    with qmp.Qemu(args, binary=binary) as vm:
        for cap in caps:
            capability(vm, cap)
        vm.command("migrate", uri=f"file:{theirs}")
        assert vm.wait_migration()["status"] == "completed"
    with snapfmt.open(theirs) as snap:
        assert "mapped-ram" in snap.configuration.capabilities
    loaded_from_file(binary, args, theirs, again, caps)
    same_ram(theirs, again)
    plain = tmp_path / "plain.mig"
    assert run("convert", theirs, plain, "--to", "qemu", "-q").code == 0
    loaded_and_saved_again(binary, args, plain, tmp_path / "plain-again.mig")
    same_ram(theirs, tmp_path / "plain-again.mig")
    ours = tmp_path / "ours.mig"
    assert run("convert", again, ours, "--to", "qemu", "--mapped-ram", "-q").code == 0
    loaded_from_file(binary, args, ours, tmp_path / "ours-again.mig", caps)
    same_ram(again, tmp_path / "ours-again.mig")
    assert ours.stat().st_blocks * 512 < ours.stat().st_size // 2  # zero pages are holes
