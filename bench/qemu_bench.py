#!/usr/bin/env python3
"""Benchmark snapfmt on a real QEMU stream against `cat` of the same file, in one run.

    python bench/qemu_bench.py [--gib 1] [--runs 3] [--dir DIR]

QEMU (qemu-system-x86_64, paused, no guest code) saves a guest whose RAM is a file of
random bytes (memory-backend-file, share=off), so nearly every page is a PAGE record.
snapfmt is installed with pip into a new virtual environment first, as a user installs
it (--in-place: run from this checkout with this interpreter instead; see
native_bench.snapfmt_command).  Each command then runs as its own process, timed by wall
clock with its peak RSS:

  baseline   cat FILE > /dev/null
  cp         cp FILE COPY: what writing the file's size costs on this disk, to read
             extract against (not a target)
  info       snapfmt info FILE
  dump       snapfmt dump FILE
  extract    snapfmt extract FILE --all -d DIR
  convert    snapfmt convert FILE OUT --to native

With --reread the stream is first dropped from the page cache and read back: a save
read from disk rather than one just written (snapfmt maps streams, and mapping pages that
readahead brought in takes fewer faults).

Targets (issue 3): dump within 1.5x of cat, extract --all within 3x, convert at least
300 MB/s of guest RAM, peak RSS under 150 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapfmt.qemu.qmp import Qemu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native_bench import add_in_place, launch, reread, snapfmt_command


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command (see native_bench.launch)."""
    wall, rss, code = launch(argv)
    if code:
        raise SystemExit(f"{argv} failed with {code}")
    return wall, rss


def random_stream(work: Path, gib: int) -> Path:
    """A stream QEMU saves of a paused *gib* GiB guest whose RAM is random bytes (nearly
    every page a PAGE record), synced to disk so no writeback runs under the timings."""
    ram, stream = work / "ram.img", work / "vm.mig"
    with open(ram, "wb") as f:
        for _ in range(gib * 256):
            f.write(os.urandom(4 << 20))
    machine = ["-M", "pc-i440fx-7.2", "-m", f"{gib}G", "-nodefaults",
               "-object", f"memory-backend-file,id=pc.ram,size={gib}G,mem-path={ram},share=off",
               "-machine", "memory-backend=pc.ram"]  # fmt: skip
    t = time.perf_counter()
    with Qemu(machine, timeout=600) as vm:
        vm.save(str(stream))
    print(
        f"QEMU wrote a {stream.stat().st_size / 1e9:.2f} GB stream in {time.perf_counter() - t:.1f} s",
        file=sys.stderr,
    )
    ram.unlink()
    os.sync()
    return stream


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument(
        "--reread",
        action="store_true",
        help="drop the stream from the page cache and read it back before timing",
    )
    add_in_place(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="snapfmt-qbench-") as tmp:
        work = Path(tmp)
        stream = random_stream(work, args.gib)
        if args.reread:  # an older save rather than one just made (see reread())
            reread([str(stream)])
        snapfmt = snapfmt_command(work, args.in_place)
        steps = {
            "cat": ["cat", str(stream)],
            "cp": ["cp", str(stream), str(work / "copy.mig")],
            "info": [*snapfmt, "info", str(stream)],
            "dump": [*snapfmt, "dump", str(stream)],
            "extract --all": [*snapfmt, "extract", str(stream), "--all", "-d", str(work / "out")],
            "convert": [*snapfmt, "convert", str(stream), str(work / "vm.snap"), "--to", "native"],
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
        for run in range(args.runs):
            for name, argv in steps.items():
                results[name].append(timed(argv))
                shutil.rmtree(work / "out", ignore_errors=True)
                (work / "vm.snap").unlink(missing_ok=True)
                (work / "copy.mig").unlink(missing_ok=True)
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        report(results, args.gib)


def report(results: dict[str, list[tuple[float, float]]], gib: int) -> None:
    med = {name: statistics.median(s for s, _ in r) for name, r in results.items()}
    rss = {name: max(m for _, m in r) for name, r in results.items()}
    mb = gib * (1 << 30) / 1e6
    goals = {"dump": ("x cat", 1.5), "extract --all": ("x cat", 3.0)}
    print(f"\n{gib} GiB guest of random RAM; median of {len(results['cat'])} runs\n")
    print(f"{'step':<15}{'seconds':>9}{'x cat':>8}{'MB/s':>9}{'peak RSS':>10}  target")
    for name in results:
        ratio = med[name] / med["cat"]
        verdict = ""
        if name in goals:
            verdict = f"<= {goals[name][1]}x cat: {'PASS' if ratio <= goals[name][1] else 'FAIL'}"
        if name == "extract --all":
            verdict += f" ({med[name] / med['cp']:.2f}x cp)"
        if name == "convert":
            verdict = f">= 300 MB/s: {'PASS' if mb / med[name] >= 300 else 'FAIL'}"
        print(
            f"{name:<15}{med[name]:>9.3f}{ratio:>8.2f}{mb / med[name]:>9.0f}{rss[name]:>8.0f}MB  {verdict}"
        )
    peak = max(v for k, v in rss.items() if k not in ("cat", "cp"))
    print(
        f"\npeak RSS of any snapfmt step: {peak:.0f} MB (< 150 MB: {'PASS' if peak < 150 else 'FAIL'})"
    )


if __name__ == "__main__":
    main()
