"""The fuzz harness (tests/fuzz.py) catches what it is for, and every input it ever kept
(tests/fuzz_corpus/) still behaves."""

from __future__ import annotations

import contextlib
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from snapfmt.cli import main
from tests import fuzz

KEPT = sorted(p for p in fuzz.CORPUS.glob("*") if p.is_file()) if fuzz.CORPUS.exists() else []


def test_the_harness_flags_what_is_not_a_clean_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    import snapfmt.render as render
    from snapfmt.errors import FormatError

    tiny = str(fuzz.SEEDS[0])
    assert fuzz.run_one(["info", tiny]) is None
    assert fuzz.run_one(["info", "/nonexistent/file"]) is None  # a clean one-line refusal

    def crash(*args: object, **kwargs: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(render, "info_text", crash)
    assert fuzz.run_one(["info", tiny]) == "snapfmt: error: unexpected ValueError: boom"

    def two_lines(*args: object, **kwargs: object) -> None:
        raise FormatError("first line\nsecond line")

    monkeypatch.setattr(render, "info_text", two_lines)
    problem = fuzz.run_one(["info", tiny])
    assert problem is None or "lines" in problem  # (one_line escapes it: still one line)

    def hang(*args: object, **kwargs: object) -> None:
        raise fuzz.Hang("over 20 s")

    monkeypatch.setattr(render, "info_text", hang)
    assert (fuzz.run_one(["info", tiny]) or "").startswith("Hang: over 20 s")


def test_mutations_of_every_kind(tmp_path: Path) -> None:
    """A few dozen inputs of both kinds, fixed seed: every command behaves on each."""
    rng = random.Random(16)
    blobs = {seed: fuzz.seed_bytes(seed) for seed in fuzz.SEEDS}
    states = fuzz._states(fuzz.SEEDS[4])
    targets = fuzz.descriptions(tmp_path)
    for n in range(24):
        if n % 2:
            seed = fuzz.SEEDS[n % len(fuzz.SEEDS)]
            case = tmp_path / ("case" + fuzz.suffix(seed))
            case.write_bytes(fuzz.mutate(blobs[seed], rng, list(blobs.values())))
        else:
            seed = fuzz.SEEDS[4]
            case = tmp_path / "case.snap"
            fuzz.mutate_state(states, rng, case, list(blobs.values()))
        for argv in fuzz.commands(case, seed, tmp_path, targets[seed]):
            assert fuzz.run_one(argv) is None, (n, argv)


def test_every_kept_input_behaves(tmp_path: Path) -> None:
    assert KEPT, "tests/fuzz_corpus holds the inputs that once failed"
    for path in KEPT:
        assert fuzz.replay(path, tmp_path) == [], path.name


def test_commands_run_in_process_keep_no_output_alive() -> None:
    """A process that runs many commands, swapping sys.stdout for each (the fuzzer, a
    service), must not keep their output: click's default-stream cache once kept every
    captured stream alive (10 MB a `dump --json` of a large device)."""
    import gc
    import weakref

    tiny = str(fuzz.SEEDS[1])
    refs = []
    for _ in range(3):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(["dump", tiny, "--json"])
        refs.append(weakref.ref(out))
        del out
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_the_coverage_guided_harness_runs_and_flags_a_crash(tmp_path: Path) -> None:
    """tests/fuzz_atheris.py: libFuzzer runs it over the seeds and grows a corpus; an
    input on which a command fails (here: a reader made to raise a plain ValueError) is
    a crash, written out, with a non-zero exit."""
    corpus = tmp_path / "corpus"
    ran = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_atheris", "-runs=30", str(corpus)],
        cwd=fuzz.ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "Done 30 runs" in ran.stderr and len(list(corpus.iterdir())) >= 3
    planted = tmp_path / "planted.py"  # the harness with one reader broken
    planted.write_text(
        "import sys, runpy\n"
        "import snapfmt.ops.inspect as inspect\n"
        "def broken(*a, **k):\n    raise ValueError('planted')\n"
        "inspect.damage = broken\n"
        "sys.argv[0] = 'fuzz_atheris'\n"
        "runpy.run_module('tests.fuzz_atheris', run_name='__main__')\n"
    )
    crashed = subprocess.run(
        [sys.executable, str(planted), "-runs=5", f"-artifact_prefix={tmp_path}/crash-",
         str(tmp_path / "corpus2")],
        cwd=fuzz.ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(fuzz.ROOT)},
    )  # fmt: skip
    said = crashed.stdout + crashed.stderr
    assert crashed.returncode != 0 and "unexpected ValueError: planted" in said, said[-2000:]
    assert list(tmp_path.glob("crash-*"))
