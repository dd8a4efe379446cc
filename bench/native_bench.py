#!/usr/bin/env python3
"""Benchmark the native container against a raw copy of the same bytes, in the same run.

    python bench/native_bench.py [--gib 1] [--runs 3] [--info-gib 8] [--dir DIR]

It generates a RAM image of mixed pages (about 60% zero, 25% text-like, 15% random), then
for each run, each step in its own process (so peak RSS is the step's own):

  baseline copy   copy the image to a new file with 4 MiB reads and writes, then fsync
  baseline read   read that copy back in 4 MiB pieces
  write           snapfmt.Writer.add_ram_block(image) -> native snapshot (fsync included)
  read            read the whole block back through RamBlock.iter_spans (every chunk checked)
  verify          snapfmt.ops.verify.verify (every checksum and chunk)
  info            open + inspect.info on a snapshot of --info-gib GiB (the image repeated)

and prints the median of the runs with the targets of issue 2: write >= 40% of the copy's
throughput, read >= 50% of the raw read's, info < 50 ms on 8 GiB, peak RSS < 150 MB.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAGE = 4096
PIECE = 4 << 20
WORDS = [
    "the",
    "kernel",
    "process",
    "memory",
    "page",
    "table",
    "entry",
    "device",
    "driver",
    "interrupt",
    "handler",
    "buffer",
    "queue",
    "packet",
    "network",
    "socket",
    "file",
    "inode",
    "block",
    "request",
    "scheduler",
    "thread",
    "mutex",
    "lock",
    "timer",
    "clock",
    "event",
    "error",
    "warning",
    "info",
    "debug",
    "return",
    "value",
    "status",
    "ready",
    "pending",
]


def precompile() -> None:
    """Compile snapfmt's bytecode once, as an installed package has it: with
    PYTHONDONTWRITEBYTECODE set (as on CI machines) every timed command would otherwise
    compile the package again, a cost no installed copy pays."""
    package = Path(__file__).resolve().parent.parent / "snapfmt"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)


def add_in_place(parser: argparse.ArgumentParser) -> None:
    """The --in-place option of the benchmarks that run snapfmt_command."""
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="run snapfmt from this checkout with this interpreter, not installed in a venv",
    )


def snapfmt_command(work: Path, in_place: bool = False) -> list[str]:
    """How the benchmarks run snapfmt: by default installed as users install it, with
    pip into a new virtual environment under *work* (a wheel, its bytecode compiled),
    so that the times are snapfmt's own.  The interpreter a checkout runs with may load
    more at every start: an editable install's import hook, and .pth files such as the
    proxy certificate hook of this machine's Python (about 30 ms a start here).  With
    *in_place*: this interpreter and this checkout (bytecode compiled first)."""
    if in_place:
        precompile()
        return [sys.executable, "-m", "snapfmt"]
    venv, source = work / "venv", work / "source"
    # from a copy: a build in the checkout would leave build/ and egg-info there, and
    # setuptools would take stale modules from an old build/
    shutil.copytree(
        Path(__file__).resolve().parent.parent,
        source,
        ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                      ".*_cache", ".hypothesis", "samples", "tests", "bench"),
    )  # fmt: skip
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)]
    subprocess.run(pip, check=True)
    return [str(venv / "bin" / "snapfmt")]


def reread(paths: list[str]) -> None:
    """Drop *paths* from the page cache and read them back in.  Files just written sit
    in the cache in small pieces, files read from disk in the large ones readahead
    makes; mapping the large ones takes fewer page faults (snapfmt maps QEMU streams), while
    cat hardly notices.  Both states are measured: a save just made, and an older one."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)


def make_image(path: Path, size: int, seed: int = 1) -> None:
    """Mixed pages, deterministic for a seed: 60% zero, 25% text-like, 15% random."""
    rng = random.Random(seed)
    corpus = bytearray()
    while len(corpus) < 16 << 20:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        corpus += f"[{rng.randint(0, 99999):5d}.{rng.randint(0, 999999):06d}] {line}\n".encode()
    zero = bytes(PAGE)
    with open(path, "wb") as f:
        for _ in range(0, size, PIECE):
            out = bytearray()
            for _ in range(PIECE // PAGE):
                kind = rng.random()
                if kind < 0.60:
                    out += zero
                elif kind < 0.85:
                    at = rng.randrange(0, len(corpus) - PAGE)
                    out += corpus[at : at + PAGE]
                else:
                    out += rng.randbytes(PAGE)
            f.write(out)


# -- steps, each run in a child process -------------------------------------------------------


def step_copy(src: str, dst: str) -> None:
    buf = bytearray(PIECE)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            fout.write(view[:n])
        os.fsync(fout.fileno())


def step_rawread(src: str) -> None:
    buf = bytearray(PIECE)
    with open(src, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def step_write(src: str, dst: str, repeat: int = 1) -> None:
    import snapfmt

    def pieces() -> object:
        for _ in range(repeat):
            with open(src, "rb") as f:
                while piece := f.read(PIECE):
                    yield piece

    with snapfmt.Writer(dst, machine="pc-i440fx-7.2") as w:
        w.add_ram_block("/pc.ram", src if repeat == 1 else pieces())  # type: ignore[arg-type]


def step_read(snap_file: str) -> None:
    import snapfmt
    from snapfmt.paths import Path as DevPath

    with snapfmt.open(snap_file) as snap:
        total = sum(len(data) for _, data in snap.ram_block(DevPath.of("pc.ram")).iter_spans())
    assert total > 0


def step_verify(snap_file: str) -> None:
    import snapfmt
    from snapfmt.ops.verify import verify

    with snapfmt.open(snap_file) as snap:
        assert verify(snap).ok


def step_info(snap_file: str) -> float:
    import snapfmt
    from snapfmt.ops.inspect import info

    times = []
    for _ in range(21):
        start = time.perf_counter()
        with snapfmt.open(snap_file) as snap:
            info(snap)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child(args: list[str]) -> None:
    name, *rest = args
    if name not in ("copy", "rawread"):
        import snapfmt.ops.inspect
        import snapfmt.ops.verify  # noqa: F401  (import time is not the step's time)
    start = time.perf_counter()
    result = {
        "copy": step_copy,
        "rawread": step_rawread,
        "read": step_read,
        "verify": step_verify,
        "write": lambda s, d, r="1": step_write(s, d, int(r)),
        "info": step_info,
    }[name](*rest)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": result if name == "info" else seconds}))


_LAUNCHER = """
import json, os, sys, time
for line in sys.stdin:
    argv, out = json.loads(line)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # (0 is the launcher's own pipe)
            fd = os.open(out or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    print(json.dumps([seconds, usage.ru_maxrss, os.waitstatus_to_exitcode(status)]), flush=True)
"""


@functools.cache
def _launcher() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-S", "-c", _LAUNCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def launch(argv: list[str], out: str | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one command, its stdout to the file
    *out* (default: /dev/null).

    The command is started by a small process of its own (a Python without site, about
    8 MB resident; the environment and working directory it had when first used; stdin
    /dev/null), never forked from this one: a child forked from a process counts the
    parent's resident pages in its own peak RSS, even after exec, and a benchmark holds
    large buffers (forked from a 500 MB process, `true` reported 513 MB)."""
    proc = _launcher()
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps([argv, out]) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the benchmark's launcher process ended ({proc.wait()}) running {argv}")
    seconds, rss, code = json.loads(line)
    return float(seconds), rss / 1024, int(code)


def run_step(*args: str) -> tuple[float, float]:
    """(seconds measured inside the child, peak RSS of the child in MB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        _, rss, code = launch([sys.executable, __file__, "--step", *args], out.name)
        if code:
            raise SystemExit(f"step {args[0]} failed with {code}")
        return float(json.loads(out.read())["seconds"]), rss


def command_times(argv: list[str], runs: int) -> float:
    """Median wall time of a whole command."""
    times = []
    for _ in range(max(3, runs)):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--info-gib", type=int, default=8)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--step", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        child(args.step)
        return
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="snapfmt-bench-") as tmp:
        work = Path(tmp)
        image, copy, snap, big = (
            str(work / n) for n in ("ram.img", "copy.img", "ram.snap", "big.snap")
        )
        size = int(args.gib * (1 << 30)) // PIECE * PIECE
        t = time.perf_counter()
        make_image(Path(image), size)
        print(
            f"generated {size / (1 << 30):.2f} GiB image in {time.perf_counter() - t:.1f} s",
            file=sys.stderr,
        )
        results: dict[str, list[tuple[float, float]]] = {}
        for run in range(args.runs):
            for name, step in (
                ("baseline copy", ("copy", image, copy)),
                ("baseline read", ("rawread", copy)),
                ("write", ("write", image, snap)),
                ("read", ("read", snap)),
                ("verify", ("verify", snap)),
            ):
                results.setdefault(name, []).append(run_step(*step))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        os.unlink(copy)
        repeat = max(1, round(args.info_gib / args.gib))
        t = time.perf_counter()
        _, big_rss = run_step("write", image, big, str(repeat))
        print(
            f"wrote {repeat * size / (1 << 30):.1f} GiB snapshot in {time.perf_counter() - t:.1f} s "
            f"(peak RSS {big_rss:.0f} MB)",
            file=sys.stderr,
        )
        big_read = run_step("read", big)
        info = [run_step("info", big) for _ in range(args.runs)]
        cli = command_times([sys.executable, "-m", "snapfmt", "info", big], args.runs)
        bare = command_times([sys.executable, "-c", "pass"], args.runs)
        print(
            f"`snapfmt info` on it as a command: {cli * 1000:.0f} ms wall, of which the "
            f"interpreter's own start is {bare * 1000:.0f} ms",
            file=sys.stderr,
        )
        report(
            results,
            size,
            repeat,
            big_rss,
            big_read,
            info,
            os.path.getsize(snap),
            os.path.getsize(big),
        )


def report(
    results: dict[str, list[tuple[float, float]]],
    size: int,
    repeat: int,
    big_rss: float,
    big_read: tuple[float, float],
    info: list[tuple[float, float]],
    snap_size: int,
    big_size: int,
) -> None:
    mb = size / 1e6

    def med(name: str) -> tuple[float, float]:
        return statistics.median(s for s, _ in results[name]), max(r for _, r in results[name])

    copy_s, copy_rss = med("baseline copy")
    raw_s, raw_rss = med("baseline read")
    print(
        f"\nimage {size / (1 << 30):.2f} GiB, snapshot {snap_size / 1e6:.1f} MB "
        f"({snap_size / size:.1%}); median of {len(results['write'])} runs; MB/s of RAM bytes\n"
    )
    print(f"{'step':<14}{'seconds':>9}{'MB/s':>9}{'vs base':>9}{'peak RSS':>10}  target")
    print(f"{'baseline copy':<14}{copy_s:>9.3f}{mb / copy_s:>9.0f}{'':>9}{copy_rss:>8.0f}MB")
    print(f"{'baseline read':<14}{raw_s:>9.3f}{mb / raw_s:>9.0f}{'':>9}{raw_rss:>8.0f}MB")
    for name, base, goal in (
        ("write", copy_s, 0.40),
        ("read", raw_s, 0.50),
        ("verify", raw_s, None),
    ):
        s, rss = med(name)
        ratio = base / s
        verdict = (
            ""
            if goal is None
            else f">= {goal:.0%} of baseline: {'PASS' if ratio >= goal else 'FAIL'}"
        )
        print(f"{name:<14}{s:>9.3f}{mb / s:>9.0f}{ratio:>9.0%}{rss:>8.0f}MB  {verdict}")
    info_ms = statistics.median(s for s, _ in info) * 1000
    print(
        f"\n{repeat * size / (1 << 30):.1f} GiB snapshot ({big_size / 1e6:.0f} MB): info {info_ms:.1f} ms "
        f"(< 50 ms: {'PASS' if info_ms < 50 else 'FAIL'}); write peak RSS {big_rss:.0f} MB, "
        f"read peak RSS {big_read[1]:.0f} MB, read {repeat * mb / big_read[0]:.0f} MB/s"
    )
    peak = max([r for v in results.values() for _, r in v] + [big_rss, big_read[1]])
    print(
        f"peak RSS of any snapfmt step: {peak:.0f} MB (< 150 MB: {'PASS' if peak < 150 else 'FAIL'})"
    )


if __name__ == "__main__":
    main()
