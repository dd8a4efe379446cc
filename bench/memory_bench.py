#!/usr/bin/env python3
"""Benchmark `snapfmt memory --elf` (and --raw) on a real QEMU stream against `cp` of
the same stream, in one run.

    python bench/memory_bench.py [--gib 1] [--runs 5] [--dir DIR] [--in-place]

The stream is qemu_bench's: a paused guest whose RAM is random bytes, so nearly all of
it is written.  Each command runs as its own process, timed by wall clock with its peak
RSS (native_bench.launch); the output is deleted and written anew every run.

  cp         cp STREAM COPY: writing the stream's size on this disk (the baseline)
  cp+sync    cp, then `sync COPY`: the same with the copy made durable, as snapfmt's
             atomic output is (it fsyncs the file before renaming it into place)
  elf        snapfmt memory STREAM --elf OUT
  raw        snapfmt memory STREAM --raw OUT

Targets (issue 13): the ELF export within 1.5x of cp, peak RSS under 150 MB.  Writes of
gigabytes depend on the disk's writeback: runs alternate the commands, medians are kept.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native_bench import add_in_place, snapfmt_command
from qemu_bench import random_stream, timed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None)
    add_in_place(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="snapfmt-mbench-") as tmp:
        work = Path(tmp)
        stream = random_stream(work, args.gib)
        out = work / "out"
        snapfmt = snapfmt_command(work, args.in_place)
        steps = {
            "cp": ["cp", str(stream), str(out)],
            "cp+sync": ["sh", "-c", f"cp '{stream}' '{out}' && sync '{out}'"],
            "elf": [*snapfmt, "memory", str(stream), "--elf", str(out), "-q"],
            "raw": [*snapfmt, "memory", str(stream), "--raw", str(out), "-q"],
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
        for run in range(args.runs):
            for name, argv in steps.items():
                results[name].append(timed(argv))
                out.unlink()
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    report(results, args.gib)


def report(results: dict[str, list[tuple[float, float]]], gib: int) -> None:
    med = {name: statistics.median(s for s, _ in r) for name, r in results.items()}
    rss = {name: max(m for _, m in r) for name, r in results.items()}
    print(f"\n{gib} GiB guest of random RAM; median of {len(results['cp'])} runs\n")
    print(f"{'step':<8}{'seconds':>9}{'min':>8}{'max':>8}{'x cp':>7}{'peak RSS':>10}  target")
    for name, runs in results.items():
        times = [s for s, _ in runs]
        ratio = med[name] / med["cp"]
        verdict = f"<= 1.5x cp: {'PASS' if ratio <= 1.5 else 'FAIL'}" if name == "elf" else ""
        if name == "elf":
            verdict += f" ({med[name] / med['cp+sync']:.2f}x cp+sync)"
        if not name.startswith("cp"):
            verdict += f"  RSS < 150 MB: {'PASS' if rss[name] < 150 else 'FAIL'}"
        print(f"{name:<8}{med[name]:>9.3f}{min(times):>8.3f}{max(times):>8.3f}{ratio:>7.2f}"
              f"{rss[name]:>8.0f}MB  {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
