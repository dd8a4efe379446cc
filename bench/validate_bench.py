#!/usr/bin/env python3
"""Time `snapfmt validate` on a native snapshot of 100 devices and 8 GiB of RAM, and
`snapfmt machine capture` of a small machine.

    python bench/validate_bench.py [--gib 8] [--devices 100] [--runs 5] [--dir DIR]

Devices copy the real e1000 state (with its vmdesc layout) of samples/qemu/pc.mig under
100 PCI addresses; RAM is one block of zero pages plus one random page per MiB.  The
target is the snapshot's own description.  validate reads no RAM contents, so the time
should not grow with the RAM size.  Target (issue 4): under 0.2 s.

capture starts the target paused, saves it to a probe, asks QMP for its qtree and RAM
blocks and runs -dump-vmstate (spec/machine.md); its baseline, in the same run, is QEMU
alone starting paused and saving the same machine over QMP.  Target (issue 12): under
5 s, for QEMU 7.2 and, where its wrapper is installed, 10.0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import snapfmt  # noqa: E402
from snapfmt.ops import machine, validate  # noqa: E402


def ram(gib: int) -> object:
    page = os.urandom(4096)
    piece = bytearray(1 << 20)
    piece[:4096] = page
    for _ in range(gib << 10):
        yield bytes(piece)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=int, default=8)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="snapfmt-vbench-") as tmp:
        snap_path, desc_path = Path(tmp) / "vm.snap", Path(tmp) / "target.json"
        with snapfmt.open(ROOT / "samples" / "qemu" / "pc.mig") as source:
            e1000 = source.device(source.select_one("0000:00:05.0/e1000"))
        with snapfmt.Writer(snap_path, machine="pc-i440fx-7.2") as w:
            for n in range(args.devices):
                slot = f"{n // 8 + 1:02x}.{n % 8}"
                w.add_device(f"/i440FX-pcihost/pci.0/e1000@{slot}/vmstate", e1000.data, driver="e1000",
                             vmstate_name="e1000", version_id=2, layout=e1000.layout,
                             qemu_idstr=f"0000:00:{slot}/e1000")  # fmt: skip
            w.add_ram_block("/pc.ram", ram(args.gib), qemu_idstr="pc.ram")
        subprocess.run([sys.executable, "-m", "snapfmt", "machine", "from-snapshot", str(snap_path), "-o", str(desc_path)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        target = machine.load(str(desc_path))
        inside = []
        for _ in range(args.runs):
            start = time.perf_counter()
            with snapfmt.open(snap_path) as snap:
                result = validate.validate(snap, target)
            inside.append(time.perf_counter() - start)
        assert result.compatible
        whole = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "snapfmt", "validate", str(snap_path), "--target", str(desc_path)],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            whole.append(time.perf_counter() - start)
    median = statistics.median(inside)
    print(f"{args.devices} devices, {args.gib} GiB RAM; median of {args.runs}")
    print(
        f"validate (open + check): {median * 1000:.0f} ms  (< 200 ms: {'PASS' if median < 0.2 else 'FAIL'})"
    )
    print(f"as a command, interpreter start included: {statistics.median(whole) * 1000:.0f} ms")
    for version, binary in (("7.2", "qemu-system-x86_64"), ("10.0", "qemu-system-x86_64-10.0")):
        if shutil.which(binary):
            capture_times(version, binary, args.runs, args.dir)


SMALL = ["-M", "pc", "-m", "64M", "-smp", "2", "-nodefaults",
         "-device", "e1000,addr=05.0", "-device", "virtio-net-pci,addr=06.0,romfile=",
         "-device", "qemu-xhci,addr=07.0"]  # fmt: skip


def capture_times(version: str, binary: str, runs: int, folder: str | None) -> None:
    from snapfmt.qemu.qmp import Qemu

    captures, saves = [], []
    with tempfile.TemporaryDirectory(dir=folder or "/tmp", prefix="snapfmt-cbench-") as tmp:
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "snapfmt", "machine", "capture", "-o",
                            str(Path(tmp) / "t.json"), "--", binary, *SMALL],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            captures.append(time.perf_counter() - start)
            start = time.perf_counter()
            with Qemu(SMALL, binary=binary) as vm:
                vm.save(str(Path(tmp) / "probe.mig"))
            saves.append(time.perf_counter() - start)
    capture, save = statistics.median(captures), statistics.median(saves)
    print(f"capture of a small machine, QEMU {version}: {capture:.2f} s "
          f"(QEMU's own start and save: {save:.2f} s; < 5 s: {'PASS' if capture < 5 else 'FAIL'})")  # fmt: skip


if __name__ == "__main__":
    main()
