"""The committed samples verify, rebuild byte for byte, and survive extract --all -> write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SAMPLES, Run

NAMES = sorted(p.stem for p in (SAMPLES / "manifests").glob("*.toml"))


def test_there_are_samples() -> None:
    assert len(NAMES) >= 2
    assert all((SAMPLES / f"{n}.snap").exists() for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_sample_verifies(run: Run, name: str) -> None:
    assert run("verify", SAMPLES / f"{name}.snap").code == 0


def test_rebuild_gives_identical_bytes() -> None:
    done = subprocess.run(
        [sys.executable, str(SAMPLES / "make_samples.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", NAMES)
def test_write_from_manifest_matches_sample(run: Run, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.snap"
    result = run("write", SAMPLES / "manifests" / f"{name}.toml", "-o", out)
    assert result.code == 0 and result.out.startswith(f"wrote {out} (")
    assert out.read_bytes() == (SAMPLES / f"{name}.snap").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_extract_all_then_write_round_trips(run: Run, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "out"
    result = run("extract", SAMPLES / f"{name}.snap", "--all", "-d", folder)
    assert result.code == 0, result.err
    assert (folder / "manifest.toml").exists()
    again = tmp_path / "again.snap"
    assert run("write", folder / "manifest.toml", "-o", again).code == 0
    assert again.read_bytes() == (SAMPLES / f"{name}.snap").read_bytes()
