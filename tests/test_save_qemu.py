"""snapfmt save against real QEMU 7.2 and 10.0: what it writes equals QEMU's own stream
converted, QEMU loads it back, a running guest runs again, deltas of a changed guest are
small and exact, and failures leave no file.  In CI these fail, not skip, without QEMU."""

from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path

import pytest

import snapfmt
from snapfmt.errors import QemuError
from snapfmt.ops import save as save_mod
from snapfmt.ops.convert import convert
from snapfmt.ops.diff import diff
from snapfmt.qemu import qmp
from tests.helpers import QEMUS, Run, need_qemu

MIB = 32


@pytest.fixture(scope="module", params=sorted(QEMUS))
def qemu(request: pytest.FixtureRequest) -> str:
    return need_qemu(request.param)


def machine(ram_file: Path) -> list[str]:
    return [
        "-M", "pc", "-m", f"{MIB}M", "-smp", "2", "-nodefaults",
        "-object", f"memory-backend-file,id=pc.ram,size={MIB}M,mem-path={ram_file},share=off",
        "-machine", "memory-backend=pc.ram",
        "-device", "e1000,id=nic0,addr=05.0", "-device", "virtio-net-pci,addr=06.0",
        "-device", "pci-bridge,id=br1,chassis_nr=1,addr=08.0",
        "-device", "e1000,bus=br1,addr=03.0,romfile=",
        "-rtc", "base=2020-01-01T00:00:00,clock=vm",  # a paused machine's RTC stands still
    ]  # fmt: skip


def random_ram(path: Path, seed: str) -> bytes:
    rng = random.Random(seed)
    ram = bytearray(MIB << 20)
    for _ in range(512):
        at = rng.randrange(len(ram) // 4096) * 4096
        ram[at : at + 4096] = rng.randbytes(4096)
    path.write_bytes(ram)
    return bytes(ram)


def _ram(path: Path) -> bytes:
    with snapfmt.open(path) as snap:
        block = snap.ram_block(snap.select_one("/pc.ram"))
        return block.read(0, block.length)


def test_save_equals_qemus_own_stream_and_restores(qemu: str, tmp_path: Path) -> None:
    ram = random_ram(tmp_path / "ram.img", "save")
    args = machine(tmp_path / "ram.img")
    with qmp.Qemu(args, binary=qemu) as vm:
        assert vm.qmp is not None
        saved = save_mod.save(vm.qmp, str(tmp_path / "saved.snap"))
    with qmp.Qemu(args, binary=qemu) as vm:  # the same paused machine, saved by QEMU
        vm.save(str(tmp_path / "own.mig"))
    assert saved.machine.startswith("pc-i440fx-") and not saved.resumed
    with snapfmt.open(tmp_path / "own.mig") as own:
        convert(own, str(tmp_path / "own.snap"), "native")
    with snapfmt.open(tmp_path / "own.snap") as a, snapfmt.open(tmp_path / "saved.snap") as b:
        result = diff(a, b)
        assert [c.name for c in result.configuration] == ["document qemu"]  # the record
        assert not result.sections  # every device and RAM block the same
        assert b.check().problems == []
        record = b.metadata("qemu")
    assert _ram(tmp_path / "saved.snap") == ram
    nic = next(d for d in record["devices"] if d["id"] == "nic0")
    assert (nic["type"], nic["bus"], nic["addr"]) == ("e1000", "pci.0", "05.0")
    behind = [d for d in record["devices"] if d["bus"] == "br1"]
    assert [(d["type"], d["addr"]) for d in behind] == [("e1000", "03.0")]
    assert record["memory"] == MIB << 20 and record["cpus"]["count"] == 2
    assert record["argv"][1:len(args) + 1] == args and record["version"].startswith(
        qemu_version(qemu))  # fmt: skip
    convert(snapfmt.open(tmp_path / "saved.snap"), str(tmp_path / "back.mig"), "qemu")
    with qmp.Qemu(args, binary=qemu, incoming=f"exec:cat {tmp_path / 'back.mig'}") as vm:
        assert vm.wait_incoming() == "loaded"


def qemu_version(binary: str) -> str:
    return next(v for v, b in QEMUS.items() if b == binary)


def test_a_running_guest_runs_again_after_save(qemu: str, tmp_path: Path, run: Run) -> None:
    random_ram(tmp_path / "ram.img", "running")
    with qmp.Qemu(machine(tmp_path / "ram.img"), binary=qemu) as vm:
        assert vm.qmp is not None
        vm.command("cont")
        vm.qmp.close()  # (a QMP socket takes one client at a time)
        result = run("save", "--qmp", vm._socket, "-o", tmp_path / "vm.snap")
        vm.qmp = qmp.Qmp.connect(vm._socket)
        assert result.code == 0, result.err
        assert "the guest runs again" in result.out
        assert vm.command("query-status")["status"] == "running"
    assert run("verify", tmp_path / "vm.snap").code == 0


def test_a_delta_of_a_changed_guest_is_small_and_exact(qemu: str, tmp_path: Path) -> None:
    image = tmp_path / "ram.img"
    rng = random.Random(3)
    image.write_bytes(rng.randbytes(MIB << 20))  # mostly non-zero, as a used guest is
    with qmp.Qemu(machine(image), binary=qemu) as vm:
        assert vm.qmp is not None
        save_mod.save(vm.qmp, str(tmp_path / "base.snap"))
    with open(image, "r+b") as f:  # the same machine with 1% of its pages changed
        pages = (MIB << 20) // 4096
        for page in rng.sample(range(pages), pages // 100):
            f.seek(page * 4096)
            f.write(rng.randbytes(4096))
    second = image.read_bytes()
    with qmp.Qemu(machine(image), binary=qemu) as vm:
        assert vm.qmp is not None
        save_mod.save(vm.qmp, str(tmp_path / "delta.snap"), parent=str(tmp_path / "base.snap"))
    full, delta = (tmp_path / "base.snap").stat().st_size, (tmp_path / "delta.snap").stat().st_size
    assert delta < 0.03 * full
    assert _ram(tmp_path / "delta.snap") == second
    # restored with no command line, the delta is the second state exactly
    from snapfmt.ops import restore as restore_mod

    with snapfmt.open(tmp_path / "delta.snap") as snap:
        restored = restore_mod.restore(snap, qemu, paused=True)
    conn = qmp.Qmp.connect(restored.socket)
    try:
        save_mod.save(conn, str(tmp_path / "again.snap"))
    finally:
        with contextlib.suppress(QemuError):
            conn.command("quit")
        conn.close()
    assert _ram(tmp_path / "again.snap") == second


def test_failures_are_one_line_and_leave_no_file(qemu: str, tmp_path: Path, run: Run) -> None:
    target = tmp_path / "vm.snap"
    result = run("save", "--qmp", tmp_path / "no.sock", "-o", target)
    assert result.code == 2 and result.err.count("\n") == 1 and "cannot connect" in result.err
    random_ram(tmp_path / "ram.img", "refused")
    with qmp.Qemu(machine(tmp_path / "ram.img"), binary=qemu) as vm:
        assert vm.qmp is not None
        vm.command("migrate-set-capabilities",
                   capabilities=[{"capability": "xbzrle", "state": True}])  # fmt: skip
        vm.qmp.close()
        result = run("save", "--qmp", vm._socket, "-o", target)
        vm.qmp = qmp.Qmp.connect(vm._socket)
        assert result.code == 2 and "xbzrle" in result.err
    result = run("save", "-o", target, "--", qemu, "-M", "no-such-machine")
    assert result.code == 2 and result.err.count("\n") == 1
    assert not target.exists() and not list(tmp_path.glob(".snapfmt*"))
    with pytest.raises(QemuError):
        save_mod.save(qmp.Qmp.connect(str(tmp_path / "no.sock")), str(target))


def test_qemu_gone_mid_save_leaves_no_file(qemu: str, tmp_path: Path) -> None:
    import threading

    from snapfmt.errors import SnapfmtError

    image = tmp_path / "ram.img"
    image.write_bytes(os.urandom(256 << 20))
    args = [a.replace(f"{MIB}M", "256M") for a in machine(image)]
    target = tmp_path / "vm.snap"
    failure: list[BaseException] = []
    with qmp.Qemu(args, binary=qemu) as vm:
        assert vm.qmp is not None and vm._proc is not None

        def saving() -> None:
            try:
                save_mod.save(vm.qmp, str(target))  # type: ignore[arg-type]
            except BaseException as e:
                failure.append(e)

        thread = threading.Thread(target=saving)
        thread.start()
        deadline = time.monotonic() + 20
        while not list(tmp_path.glob(".snapfmt*")) and not list(tmp_path.glob("*.tmp*")):
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.005)
        vm._proc.kill()  # QEMU dies while its RAM is being read
        thread.join(60)
    assert failure and isinstance(failure[0], SnapfmtError), failure
    assert "\n" not in str(failure[0])
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["ram.img"]


def test_a_failed_machine_record_fails_the_save_and_leaves_no_file(
    qemu: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is asked for by a thread while the stream comes (save._stream): if
    that fails, the save does, with the record's error, no file left, and the QMP
    connection still answers (a small guest's migration may have ended by then)."""
    random_ram(tmp_path / "ram.img", "describe")
    asked: list[bool] = []

    def failing(conn: qmp.Qmp) -> dict[str, object]:
        asked.append(bool(conn.command("query-migrate").get("status")))
        raise QemuError("no record today")

    monkeypatch.setattr(save_mod, "describe", failing)
    target = tmp_path / "vm.snap"
    with qmp.Qemu(machine(tmp_path / "ram.img"), binary=qemu) as vm:
        assert vm.qmp is not None
        with pytest.raises(QemuError, match="no record today"):
            save_mod.save(vm.qmp, str(target))
        assert asked == [True]  # (asked once the migration had started)
        assert vm.command("query-status")["status"] in ("paused", "prelaunch", "postmigrate")
    assert [p.name for p in tmp_path.iterdir()] == ["ram.img"]
