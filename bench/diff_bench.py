#!/usr/bin/env python3
"""Benchmark `snapfmt diff` with baselines measured in the same run.

    python bench/diff_bench.py [--gib 4] [--qemu-gib 1] [--runs 3] [--dir DIR]

1. Two native snapshots of --gib GiB of mixed pages (as bench/native_bench.py makes
   them) that differ in 1% of their pages, chosen at random over the whole block (the
   hardest case for chunk hashes: about 15% of 64 KiB chunks differ).  Target: < 1 s.
2. Two QEMU streams (real QEMU, paused, RAM from files of random bytes) of --qemu-gib GiB
   that differ in 1% of their pages, against `cat A B > /dev/null`.  Target: within 2x.
   Measured twice: as QEMU just wrote them, and read back from disk (see reread()).
Peak RSS of every diff: target < 150 MB.

snapfmt is installed with pip into a new virtual environment first, as a user installs
it (--in-place: run from this checkout with this interpreter instead; see
native_bench.snapfmt_command).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from native_bench import (  # noqa: E402
    PAGE,
    add_in_place,
    launch,
    make_image,
    reread,
    snapfmt_command,
)

import snapfmt  # noqa: E402
from snapfmt.qemu.qmp import Qemu  # noqa: E402


def changed_copy(source: Path, target: Path, fraction: float, run: int = 1, seed: int = 7) -> int:
    """Copy *source* with *fraction* of its pages altered, in runs of *run* pages
    (aligned); returns how many pages."""
    pages = source.stat().st_size // PAGE
    starts = random.Random(seed).sample(range(pages // run), int(pages * fraction) // run)
    chosen = sorted(start * run + i for start in starts for i in range(run))
    with open(source, "rb") as f, open(target, "wb") as out:
        while data := f.read(1 << 24):
            out.write(data)
    with open(target, "r+b") as out:
        for index in chosen:
            out.seek(index * PAGE + 100)
            out.write(b"\xa5\x5a changed page \x5a\xa5")
    return len(chosen)


def median_of(argv: list[str], runs: int) -> tuple[float, float]:
    results = [launch(argv) for _ in range(runs)]
    if any(code not in (0, 1) for _, _, code in results):
        raise SystemExit(f"{argv} failed")
    return statistics.median(s for s, _, _ in results), max(r for _, r, _ in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=int, default=4, help="native size; 0 skips them")
    parser.add_argument("--qemu-gib", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None)
    add_in_place(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="snapfmt-dbench-") as tmp:
        work = Path(tmp)
        diff = [*snapfmt_command(work, args.in_place), "diff", "--stat"]
        native = clustered = (float("nan"), 0.0)
        if args.gib:  # --gib 0: the QEMU comparison only
            a_img, b_img, c_img = work / "a.img", work / "b.img", work / "c.img"
            make_image(a_img, args.gib << 30)
            n = changed_copy(a_img, b_img, 0.01)  # scattered pages
            changed_copy(a_img, c_img, 0.01, run=16)  # the same share in aligned 64 KiB runs
            for img in (a_img, b_img, c_img):
                with snapfmt.Writer(img.with_suffix(".snap"), machine="pc-i440fx-7.2") as w:
                    w.add_ram_block("/pc.ram", str(img), qemu_idstr="pc.ram")
                img.unlink()
            print(f"native: {args.gib} GiB, {n} pages changed", file=sys.stderr)
            os.sync()
            native = median_of([*diff, str(work / "a.snap"), str(work / "b.snap")], args.runs)
            clustered = median_of([*diff, str(work / "a.snap"), str(work / "c.snap")], args.runs)
            for name in ("a", "b", "c"):  # out of the page cache's way
                (work / f"{name}.snap").unlink()

        qa, qb = work / "qa.img", work / "qb.img"
        with open(qa, "wb") as f:
            for _ in range(args.qemu_gib * 256):
                f.write(os.urandom(4 << 20))
        changed_copy(qa, qb, 0.01)
        for img, out in ((qa, work / "a.mig"), (qb, work / "b.mig")):
            machine = ["-M", "pc-i440fx-7.2", "-m", f"{args.qemu_gib}G", "-nodefaults",
                       "-object", f"memory-backend-file,id=pc.ram,size={args.qemu_gib}G,mem-path={img},share=off",
                       "-machine", "memory-backend=pc.ram", "-rtc", "base=2020-01-01T00:00:00,clock=vm"]  # fmt: skip
            with Qemu(machine, timeout=600) as vm:
                vm.save(str(out))
            img.unlink()
        os.sync()  # the inputs on disk: no writeback of them under the timings
        streams = [str(work / "a.mig"), str(work / "b.mig")]
        cat = median_of(["cat", *streams], args.runs)
        qemu = median_of([*diff, *streams], args.runs)
        reread(streams)
        cat_read = median_of(["cat", *streams], args.runs)
        qemu_read = median_of([*diff, *streams], args.runs)
    print(f"\nmedian of {args.runs} runs\n")
    print(f"{'comparison':<40}{'seconds':>9}{'peak RSS':>10}  target")
    print(
        f"{f'native {args.gib} GiB, 1% of pages differ':<40}{native[0]:>9.3f}{native[1]:>8.0f}MB  < 1 s: {'PASS' if native[0] < 1 else 'FAIL'}"
    )
    print(
        f"{'  the same, changes in 64 KiB runs':<40}{clustered[0]:>9.3f}{clustered[1]:>8.0f}MB  < 1 s: {'PASS' if clustered[0] < 1 else 'FAIL'}"
    )
    for label, base, run in (
        ("as QEMU wrote them", cat, qemu),
        ("read back from disk", cat_read, qemu_read),
    ):
        ratio = run[0] / base[0]
        print(f"{f'cat A B ({label})':<40}{base[0]:>9.3f}{base[1]:>8.0f}MB")
        print(
            f"{f'QEMU streams {args.qemu_gib} GiB, 1% differ':<40}{run[0]:>9.3f}{run[1]:>8.0f}MB  {ratio:.2f}x cat, <= 2x: {'PASS' if ratio <= 2 else 'FAIL'}"
        )
    peak = max(native[1], clustered[1], qemu[1], qemu_read[1])
    print(f"\npeak RSS: {peak:.0f} MB (< 150 MB: {'PASS' if peak < 150 else 'FAIL'})")


if __name__ == "__main__":
    main()
