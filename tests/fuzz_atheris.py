"""Coverage-guided fuzzing with atheris (libFuzzer for Python) over the readers and the
commands' cores: each input is a whole file, which snapfmt detects as it detects any
(native, QEMU stream, libvirt image, a stream compressed whole), and the commands of
tests/fuzz.py that read it run in-process.  snapfmt's modules are instrumented, so that
libFuzzer keeps the inputs that reach new code and mutates those further; tests/fuzz.py
is the other half (structured mutations of whole seeds, every command).

    python -m tests.fuzz_atheris [libFuzzer flags] [CORPUS_DIR ...]

e.g. ``python -m tests.fuzz_atheris -max_total_time=90 -rss_limit_mb=3072 -timeout=20
-artifact_prefix=/tmp/crash- /tmp/corpus``.  The seeds (the small samples, and the
inputs kept in tests/fuzz_corpus) are put in the first corpus folder given.  An input
that makes a command raise anything but SnapfmtError, refuse in more than one line or
hang is a crash: libFuzzer writes it out (artifact_prefix) and exits non-zero; keep it
in tests/fuzz_corpus (named after its seed, as tests/fuzz.py names them), where
tests/test_fuzz_corpus.py replays it on every test run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["snapfmt"]):
    import snapfmt.cli  # noqa: F401  (every module the commands use, instrumented)

from tests import fuzz

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [ROOT / "samples" / "tiny.snap", ROOT / "samples" / "q35.snap",
         ROOT / "samples" / "qemu" / "pc-postcopy.mig"]  # fmt: skip
MAX_LEN = 400_000  # bytes of an input: the largest seed, and room to grow

_work = Path(tempfile.mkdtemp(prefix="snapfmt-atheris-"))
_case = _work / "case"


def commands(case: Path) -> list[list[str]]:
    """What runs on every input: the reading commands of tests/fuzz.py but for diff and
    validate (which need the seed the input came from, unknown here)."""
    out = str(_work / "out")
    return [
        ["info", str(case), "--json"],
        ["dump", str(case)],
        ["dump", str(case), "--json"],
        ["verify", str(case)],
        ["extract", str(case), "--all", "-d", out, "-q", "--salvage"],
        ["convert", str(case), str(_work / "converted"), "-q", "--salvage"],
        ["memory", str(case), "--read", "0xffff0", "--length", "64"],
    ]


def one_input(data: bytes) -> None:
    _case.write_bytes(data)
    for argv in commands(_case):
        shutil.rmtree(_work / "out", ignore_errors=True)
        problem = fuzz.run_one(argv)
        if problem:
            raise RuntimeError(f"snapfmt {argv[0]}: {problem}")


def seeded(argv: list[str]) -> list[str]:
    """*argv* with the seeds copied into its first corpus folder (one is made when none
    is given)."""
    folders = [a for a in argv[1:] if not a.startswith("-")]
    if not folders:
        folders = [str(_work / "corpus")]
        argv = [*argv, folders[0]]
    corpus = Path(folders[0])
    corpus.mkdir(parents=True, exist_ok=True)
    kept = sorted(fuzz.CORPUS.glob("*")) if fuzz.CORPUS.is_dir() else []
    for seed in SEEDS + [k for k in kept if k.stat().st_size <= MAX_LEN]:
        shutil.copyfile(seed, corpus / f"seed-{seed.name}")
    return [*argv, f"-max_len={MAX_LEN}"]


def main() -> None:
    fuzz.limit_memory()
    atheris.Setup(seeded(sys.argv), one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
