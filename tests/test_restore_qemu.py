"""snapfmt save then snapfmt restore with no command line, on real QEMU 7.2 and 10.0, for
a matrix of machines: the restored QEMU's `query-pci` and `info qtree` equal the
original's, and its RAM equals the snapshot's.  In CI these fail, not skip, without QEMU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import snapfmt
from snapfmt.ops import restore as restore_mod
from snapfmt.ops import save as save_mod
from snapfmt.qemu import qmp
from tests.helpers import QEMUS, Run, need_qemu

# name -> QEMU arguments ({tmp}: the test's folder); the matrix of issue 15.
CONFIGS = {
    "pc-defaults": ["-M", "pc", "-m", "64M"],
    "q35-defaults": ["-M", "q35", "-m", "64M"],
    "nics-and-scsi": ["-M", "pc", "-m", "64M", "-nodefaults", "-device", "e1000,id=nic0",
                      "-device", "virtio-net-pci,addr=06.0", "-device", "lsi53c895a"],
    "behind-a-bridge": ["-M", "pc", "-m", "64M", "-nodefaults",
                        "-device", "pci-bridge,id=br1,chassis_nr=1,addr=08.0",
                        "-device", "e1000,bus=br1,addr=03.0",
                        "-device", "pci-bridge,chassis_nr=2,addr=09.0",
                        "-device", "virtio-net-pci,bus=pci.1,addr=04.0"],
    "behind-a-root-port": ["-M", "q35", "-m", "64M", "-nodefaults",
                           "-device", "pcie-root-port,id=rp1,chassis=1,addr=04.0",
                           "-device", "virtio-net-pci,bus=rp1"],
    "usb": ["-M", "pc", "-m", "64M", "-nodefaults", "-device", "qemu-xhci,id=xhci",
            "-device", "usb-tablet,bus=xhci.0", "-device", "usb-kbd,bus=xhci.0",
            "-device", "piix3-usb-uhci,id=uhci", "-device", "usb-mouse,bus=uhci.0"],
    "disks": ["-M", "pc", "-m", "64M", "-nodefaults",
              "-drive", "if=none,id=d0,file={tmp}/d0.img,format=raw",
              "-device", "virtio-blk-pci,drive=d0,id=vd0",
              "-drive", "if=none,id=d1,file={tmp}/d1.img,format=raw,readonly=on",
              "-device", "ide-cd,drive=d1,bus=ide.0"],
    "four-cpus": ["-M", "pc", "-m", "64M", "-nodefaults", "-smp", "4,sockets=2,cores=2",
                  "-device", "e1000"],
    "virtio-misc": ["-M", "pc", "-m", "64M", "-nodefaults", "-device", "virtio-serial-pci",
                    "-chardev", "null,id=con0", "-device", "virtconsole,chardev=con0",
                    "-device", "virtio-rng-pci", "-device", "virtio-balloon-pci"],
    "memory-file": ["-M", "q35", "-m", "64M", "-nodefaults",
                    "-object", "memory-backend-file,id=mem0,size=64M,mem-path={tmp}/ram.img,share=off",
                    "-machine", "memory-backend=mem0", "-smp", "2", "-device", "e1000e"],
    "audio": ["-M", "q35", "-m", "64M", "-nodefaults", "-audiodev", "none,id=snd0",
              "-device", "ich9-intel-hda", "-device", "hda-duplex,audiodev=snd0"],
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(QEMUS))
def qemu(request: pytest.FixtureRequest) -> str:
    return need_qemu(request.param)


def _args(name: str, tmp: Path) -> list[str]:
    for disk in ("d0.img", "d1.img"):
        (tmp / disk).write_bytes(bytes(1 << 20))
    (tmp / "ram.img").write_bytes(bytes(64 << 20))
    return [a.replace("{tmp}", str(tmp)) for a in CONFIGS[name]]


def _normal_qtree(text: str) -> list[str]:
    """`info qtree` with each bus's devices in a fixed order (the order QEMU lists them
    in is the order they were made in, which a rebuilt command line need not keep)."""

    def block(lines: list[str], depth: int) -> list[str]:
        out: list[str] = []
        devices: list[list[str]] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            indent = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines) and len(lines[j]) - len(lines[j].lstrip()) > indent:
                j += 1
            inner = block(lines[i + 1 : j], depth + 1)
            if line.strip().startswith("dev:"):
                devices.append([line, *inner])
            else:
                out += [line, *inner]
            i = j
        for dev in sorted(devices):
            out += dev
        return out

    return block([line.rstrip() for line in text.splitlines() if line.strip()], 0)


def _looks(q: qmp.Qmp) -> tuple[str, list[str]]:
    pci = json.dumps(q.command("query-pci"), sort_keys=True)
    qtree = q.command("human-monitor-command", **{"command-line": "info qtree"})
    return pci, _normal_qtree(qtree)


def _ram(path: Path) -> dict[str, bytes]:
    with snapfmt.open(path) as snap:
        return {
            str(b.qemu_idstr): b.read(0, b.length)
            for b in snap.ram_blocks()
            if b.qemu_idstr in ("pc.ram", "mem0")
        }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_restore_rebuilds_the_machine_from_the_snapshot(
    qemu: str, tmp_path: Path, name: str
) -> None:
    args = _args(name, tmp_path)
    with qmp.Qemu(args, binary=qemu) as vm:
        assert vm.qmp is not None
        vm.command("cont")
        time.sleep(0.2)  # the firmware runs a little
        vm.command("stop")  # (so that what is compared is what is saved)
        before = _looks(vm.qmp)
        save_mod.save(vm.qmp, str(tmp_path / "vm.snap"))
    with snapfmt.open(tmp_path / "vm.snap") as snap:
        restored = restore_mod.restore(snap, qemu, paused=True)
    conn = qmp.Qmp.connect(restored.socket)
    try:
        after = _looks(conn)
        save_mod.save(conn, str(tmp_path / "again.snap"))
    finally:
        try:
            conn.command("quit")
        finally:
            conn.close()
    assert restored.state == "paused"
    assert after[0] == before[0], "query-pci differs"
    assert after[1] == before[1], "info qtree differs"
    assert _ram(tmp_path / "again.snap") == _ram(tmp_path / "vm.snap")


def test_cmdline_and_refusals(qemu: str, tmp_path: Path, run: Run) -> None:
    args = _args("disks", tmp_path)
    with qmp.Qemu(args, binary=qemu) as vm:
        assert vm.qmp is not None
        save_mod.save(vm.qmp, str(tmp_path / "vm.snap"))
    result = run("machine", "cmdline", tmp_path / "vm.snap", "--qemu", qemu)
    assert result.code == 0 and result.out.startswith(qemu + " -machine pc-i440fx-")
    assert f"file={tmp_path / 'd0.img'},format=raw" in result.out
    import tempfile

    folders = set(Path(tempfile.gettempdir()).glob("snapfmt-restore-*"))
    result = run("restore", tmp_path / "vm.snap", "--qemu", qemu, "--", "-device", "no-such")
    assert result.code == 2 and result.err.count("\n") == 1 and "no-such" in result.err
    assert set(Path(tempfile.gettempdir()).glob("snapfmt-restore-*")) == folders
    (tmp_path / "d0.img").unlink()  # a disk file missing on restore
    result = run("restore", tmp_path / "vm.snap", "--qemu", qemu)
    assert result.code == 2 and result.err.count("\n") == 1 and "d0.img" in result.err
    result = run("restore", Path(__file__).parent.parent / "samples" / "qemu" / "pc.mig")
    assert result.code == 2 and "keeps no machine record" in result.err
