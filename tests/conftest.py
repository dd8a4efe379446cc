from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from snapfmt.cli import main
from tests.helpers import SAMPLES, Result, Run


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run the command line in-process; returns exit code, stdout and stderr."""

    def invoke(*args: str | os.PathLike[str]) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([os.fspath(a) for a in args])
        captured = capsys.readouterr()
        code = exit_info.value.code
        return Result(code if isinstance(code, int) else 0, captured.out, captured.err)

    return invoke


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """A private copy of samples/ so tests may run from any working directory."""
    target = tmp_path / "samples"
    shutil.copytree(SAMPLES, target)
    return target
