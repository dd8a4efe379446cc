"""A mutation fuzzer over every command's core, run as users run them (the CLI, in-process).

    python -m tests.fuzz [--seconds 120] [--seed N] [--keep DIR]

Each case mutates a seed file (the samples: native, QEMU streams plain and compressed,
a postcopy stream) -- bits flipped, bytes set to edge values, a cut, a piece deleted,
repeated or spliced in from another seed -- and runs every reading command on it: info,
dump (text and JSON), verify, diff against its seed, extract --all and convert (each
also with --salvage), memory (the map, a read, an ELF core), validate.  A command may
succeed or refuse the input; it must not

- raise anything but a clean exit (the CLI turns SnapfmtError into one line and exit 2),
- print a refusal of more than one line,
- take more than TIMEOUT seconds (a hang), or memory beyond the address-space limit the
  harness sets (a MemoryError is a failure like any other exception).

A failing input is written to --keep (tests/fuzz_corpus by default), where
tests/test_fuzz_corpus.py replays every kept input on every test run.  The exit status is
the number of failures (capped at 100).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [
    ROOT / "samples" / "tiny.snap",
    ROOT / "samples" / "basic.snap",
    ROOT / "samples" / "q35.snap",
    ROOT / "samples" / "qemu" / "pc-postcopy.mig",
    ROOT / "samples" / "qemu" / "devices-7.2-a.mig.zst",
    ROOT / "samples" / "qemu" / "devices-10.0-a.mig.zst",
]
CORPUS = ROOT / "tests" / "fuzz_corpus"
TIMEOUT = 20.0  # seconds one command may take on one input
MEMORY = 3 << 30  # bytes of address space the harness may use
EDGES = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE, 0x05, 0x7E]


class Hang(BaseException):  # (not an Exception: the CLI must not turn it into a refusal)
    pass


def _where(rng: random.Random, size: int) -> int:
    """A position: anywhere, or (as often) near the start or the end, where the headers,
    device state, vmdesc and index are -- RAM pages fill the middle of the seeds."""
    if size <= 1:
        return 0
    region = rng.randrange(4)
    if region == 0:
        return rng.randrange(size)
    if region == 1:
        return rng.randrange(min(size, 4096))
    return size - 1 - rng.randrange(min(size, 256 << 10 if region == 2 else 4096))


def seed_bytes(seed: Path) -> bytes:
    """A seed's bytes; a compressed stream decompressed (mutating compressed bytes tests
    little but the decompressor)."""
    data = seed.read_bytes()
    if seed.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
    return data


def suffix(seed: Path) -> str:
    return ".mig" if seed.suffix == ".zst" else seed.suffix


def mutate(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        kind = rng.randrange(7)
        at = _where(rng, len(out))
        if not out:
            break
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at] = rng.choice(EDGES)
        elif kind == 2:  # a big-endian length made huge or zero
            width = rng.choice((2, 4, 8))
            out[at : at + width] = rng.choice((b"\xff", b"\x00", b"\x7f")) * width
        elif kind == 3:
            del out[at:]
        elif kind == 4:
            del out[at : at + rng.randrange(1, 4096)]
        elif kind == 5:
            piece = out[at : at + rng.randrange(1, 256)]
            out[at:at] = piece * rng.randrange(1, 4)
        else:
            other = rng.choice(others)
            start = rng.randrange(max(1, len(other)))
            out[at : at + rng.randrange(1, 512)] = other[start : start + rng.randrange(1, 512)]
    return bytes(out)


def _states(seed: Path) -> list[object]:
    import snapfmt

    with snapfmt.open(seed) as snap:
        return list(snap.devices())


def mutate_state(devices: list[object], rng: random.Random, out: Path, others: list[bytes]) -> None:
    """A native snapshot of a seed's devices, one device's state bytes or layout mutated:
    checksums valid, so the decoders (vmstate, virtio, the registry) are what is tried."""
    import json

    import snapfmt

    chosen = rng.randrange(len(devices))
    with snapfmt.Writer(out, machine="pc-i440fx-7.2") as w:
        for i, d in enumerate(devices):
            data, layout = d.data, d.layout  # type: ignore[attr-defined]
            if i == chosen and (layout is None or rng.random() < 0.7):
                data = mutate(data, rng, others)
            elif i == chosen:
                text = json.dumps(layout)
                numbers = [m for m in range(len(text)) if text[m].isdigit()]
                if numbers:
                    at = rng.choice(numbers)
                    text = (
                        text[:at]
                        + str(rng.choice((0, 1, 7, 255, 4096, 1 << 20, 1 << 40)))
                        + text[at + 1 :]
                    )
                with contextlib.suppress(ValueError):
                    layout = json.loads(text)
            w.add_device(str(d.path), data, driver=d.driver, vmstate_name=d.vmstate_name,  # type: ignore[attr-defined]
                         version_id=d.version_id, layout=layout, qemu_idstr=d.qemu_idstr)  # type: ignore[attr-defined]  # fmt: skip
        w.add_ram_block("/pc.ram", [bytes(1 << 20)], qemu_idstr="pc.ram")


def commands(case: Path, seed: Path, work: Path, description: Path) -> Iterator[list[str]]:
    yield ["info", str(case)]
    yield ["info", str(case), "--json"]
    yield ["dump", str(case)]
    yield ["dump", str(case), "--json"]
    yield ["verify", str(case)]
    yield ["diff", str(seed), str(case), "-q"]
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    yield ["extract", str(case), "--all", "-d", str(out), "-q"]
    shutil.rmtree(out, ignore_errors=True)
    yield ["extract", str(case), "--all", "-d", str(out), "-q", "--salvage"]
    yield ["convert", str(case), str(work / "converted"), "-q"]
    yield ["convert", str(case), str(work / "salvaged"), "-q", "--salvage"]
    yield ["memory", str(case)]
    yield ["memory", str(case), "--read", "0xffff0", "--length", "64"]
    yield ["memory", str(case), "--elf", str(work / "converted.elf"), "-q"]
    yield ["validate", str(case), "--target", str(description)]


def run_one(argv: list[str]) -> str | None:
    """None when the command behaved; else what went wrong, in one paragraph."""
    from snapfmt.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()

    def alarm(signum: int, frame: object) -> None:
        raise Hang(f"over {TIMEOUT:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    code: object = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-8)}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    err = stderr.getvalue()
    if code not in (0, 1, 2, None):
        return f"exit {code}: {err[-2000:]}"
    if "snapfmt: error: unexpected " in err:  # the CLI's net for what no check caught
        return err.strip()[-2000:]
    if code == 2 and (err.count("\n") != 1 or not err.startswith("snapfmt: error: ")):
        return f"a refusal of {err.count(chr(10))} lines: {err[-2000:]!r}"
    return None


def descriptions(work: Path) -> dict[Path, Path]:
    """Each seed's own machine description (validate's target)."""
    from snapfmt.cli import main

    found = {}
    for seed in SEEDS:
        target = work / f"{seed.name}.json"
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            main(["machine", "from-snapshot", str(seed), "-o", str(target)])
        found[seed] = target
    return found


def replay(path: Path, work: Path) -> list[str]:
    """Every failure of the commands on one kept input (tests/test_fuzz_corpus.py)."""
    seed = next((s for s in SEEDS if path.name.startswith(s.name.split(".")[0])), SEEDS[0])
    target = descriptions(work)[seed]
    case = work / "case"
    shutil.copyfile(path, case)
    failures = []
    for argv in commands(case, seed, work, target):
        problem = run_one(argv)
        if problem:
            failures.append(f"snapfmt {' '.join(argv[:1])}: {problem}")
    return failures


def limit_memory() -> None:
    """Cap this process's address space at MEMORY: a blow-up is a MemoryError, caught
    as a failure, not the machine's memory gone."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=CORPUS)
    args = parser.parse_args()
    limit_memory()
    seed_value = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed_value)
    blobs = {seed: seed_bytes(seed) for seed in SEEDS}
    failures = cases = commands_run = 0
    deadline = time.monotonic() + args.seconds
    with tempfile.TemporaryDirectory(prefix="snapfmt-fuzz-") as tmp:
        work = Path(tmp)
        targets = descriptions(work)
        states = {seed: _states(seed) for seed in SEEDS if seed.name.startswith("devices")}
        while time.monotonic() < deadline and failures < 100:
            if rng.random() < 0.5:
                seed = rng.choice(SEEDS)
                data = mutate(blobs[seed], rng, list(blobs.values()))
                case = work / ("case" + suffix(seed))
                case.write_bytes(data)
            else:
                seed = rng.choice(sorted(states))
                case = work / "case.snap"
                mutate_state(states[seed], rng, case, list(blobs.values()))
                data = case.read_bytes()
            cases += 1
            for argv in commands(case, seed, work, targets[seed]):
                commands_run += 1
                problem = run_one(argv)
                if problem is None:
                    continue
                failures += 1
                args.keep.mkdir(parents=True, exist_ok=True)
                kept = args.keep / f"{seed.name.split('.')[0]}-{seed_value}-{cases}{case.suffix}"
                kept.write_bytes(data)
                print(f"FAIL {kept.name}: snapfmt {' '.join(argv[:1])}: {problem}", file=sys.stderr)
                break
            for leftover in [*work.glob("converted*"), *work.glob("salvaged*")]:
                leftover.unlink()
    print(f"fuzz: seed {seed_value}, {cases} inputs, {commands_run} commands, "
          f"{failures} failures in {args.seconds:.0f} s")  # fmt: skip
    return min(failures, 100)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
