#!/usr/bin/env python3
"""Benchmark `snapfmt save` against QEMU's own migrate to a file, in one run.

    python bench/save_bench.py [--gib 1] [--runs 5] [--dir DIR] [--qemu BINARY]

A paused guest of --gib GiB whose RAM is a file of random bytes (memory-backend-file,
share=off: nearly every page is sent whole).  farm-bench times, pair by pair:

  A  snapfmt save: QEMU started, then its state saved into a native snapshot (the
     stream read from a pipe, RAM staged and placed, the machine record asked over QMP)
  B  QEMU's own: the same QEMU started, then `migrate "exec:cat > FILE"` to completion,
     then FILE fsynced: save's output is fsynced before it is renamed into place (a
     file is either the old one or the whole new one, after a crash too), so B's is
     too, as native_bench's copy baseline is.  B without the fsync is printed beside.

Both raise max-bandwidth to unlimited (save does so itself; libvirt does the same when
it saves to a file), so neither is QEMU's 128 MiB/s default.  Each run of A also writes
the peak RSS of snapfmt's own process (not QEMU's, which holds the guest) to a file.

Then the delta: the guest saved, 1% of its pages changed (in the RAM file; a new QEMU
started on it), saved again with --parent; the delta's size against the full file's,
and the delta restored with no command line (`snapfmt restore`), saved again and its
RAM compared with the changed file.

Targets (issue 15): A within 1.3x of B, snapfmt's peak RSS under 150 MB, the delta under
3% of the full file and restored exactly.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine(ram: Path, gib: int) -> list[str]:
    return ["-M", "pc", "-m", f"{gib}G", "-nodefaults",
            "-object", f"memory-backend-file,id=pc.ram,size={gib}G,mem-path={ram},share=off",
            "-machine", "memory-backend=pc.ram", "-device", "e1000"]  # fmt: skip


def one(kind: str, ram: Path, gib: int, out: Path, binary: str, rss_file: Path) -> None:
    """One timed run (a farm-bench command): start QEMU paused, save it one way."""
    from snapfmt.ops import save as save_mod
    from snapfmt.qemu.qmp import Qemu

    with Qemu(machine(ram, gib), binary=binary, timeout=300) as vm:
        assert vm.qmp is not None
        if kind == "save":
            save_mod.save(vm.qmp, str(out))
        else:
            vm.command("migrate-set-parameters", **{"max-bandwidth": save_mod.UNLIMITED})
            vm.save(str(out))
            if kind == "migrate":
                with open(out, "rb+") as f:
                    os.fsync(f.fileno())
    if kind == "save":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (KiB on Linux)
        with open(rss_file, "a") as f:
            f.write(f"{peak:.1f}\n")
    out.unlink()


def delta(work: Path, ram: Path, gib: int, binary: str) -> None:
    """Full save, 1% of the pages changed, delta save; sizes, and the delta restored."""
    import random

    import snapfmt
    from snapfmt.ops import restore as restore_mod
    from snapfmt.ops import save as save_mod
    from snapfmt.qemu.qmp import Qemu, Qmp

    base, changed, again = work / "base.snap", work / "delta.snap", work / "again.snap"
    with Qemu(machine(ram, gib), binary=binary, timeout=300) as vm:
        assert vm.qmp is not None
        save_mod.save(vm.qmp, str(base))
    rng = random.Random(15)
    pages = (gib << 30) // 4096
    with open(ram, "r+b") as f:
        for page in rng.sample(range(pages), pages // 100):
            f.seek(page * 4096)
            f.write(os.urandom(4096))
    with Qemu(machine(ram, gib), binary=binary, timeout=300) as vm:
        assert vm.qmp is not None
        save_mod.save(vm.qmp, str(changed), parent=str(base))
    full, small = base.stat().st_size, changed.stat().st_size
    print(f"delta: full {full / 2**20:.1f} MiB, delta {small / 2**20:.2f} MiB "
          f"= {100 * small / full:.2f}% of the full file (1% of the pages changed)")  # fmt: skip
    with snapfmt.open(changed) as snap:
        restored = restore_mod.restore(snap, binary, paused=True)
    conn = Qmp.connect(restored.socket)
    try:
        save_mod.save(conn, str(again))
    finally:
        conn.command("quit")
        conn.close()
    with snapfmt.open(again) as snap, open(ram, "rb") as f:
        block = snap.ram_block(snap.select_one("/pc.ram"))
        same = all(view == f.read(len(view)) for _, view in block.iter_spans())
    print(f"delta restored with no command line: RAM {'equal to' if same else 'DIFFERENT from'} "
          "the changed guest's")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--one", choices=("save", "migrate", "migrate-nosync"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--rss-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="snapfmt-save-bench-"))
    ram = work / "ram.img"
    if args.one:
        target = work / ("vm.snap" if args.one == "save" else f"{args.one}.mig")
        one(args.one, ram, args.gib, target, args.qemu, args.rss_file or work / "rss.txt")
        return
    import compileall

    # bytecode for every module, as an installed snapfmt has it: else each timed run
    # would compile snapfmt anew where PYTHONDONTWRITEBYTECODE is set (0.08 s here)
    compileall.compile_dir(str(ROOT / "snapfmt"), quiet=1)
    try:
        with open(ram, "wb") as f:
            for _ in range(args.gib * 1024):
                f.write(os.urandom(1 << 20))
        rss = work / "rss.txt"
        me = [sys.executable, str(Path(__file__).resolve()), "--gib", str(args.gib),
              "--dir", str(work), "--qemu", args.qemu, "--rss-file", str(rss)]  # fmt: skip
        a = " ".join([*me, "--one", "save"])
        for kind, label in (("migrate", "QEMU migrate to a file, fsynced"),
                            ("migrate-nosync", "QEMU migrate to a file, not fsynced")):  # fmt: skip
            b = " ".join([*me, "--one", kind])
            print(f"guest: {args.gib} GiB of random RAM; A = snapfmt save, B = {label}")
            subprocess.run(["farm-bench", "-n", str(args.runs), "--timeout", "1800", "--vs", b,
                            "--", *a.split()], check=True)  # fmt: skip
        peaks = [float(x) for x in rss.read_text().split()]
        print(f"snapfmt save peak RSS: median {statistics.median(peaks):.1f} MB "
              f"(min {min(peaks):.1f}, max {max(peaks):.1f}) over {len(peaks)} runs")  # fmt: skip
        delta(work, ram, args.gib, args.qemu)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
