from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


@dataclass
class Result:
    code: int
    out: str
    err: str


Run = Callable[..., Result]

# The two QEMU versions the real-QEMU tests run on: Debian 12's, and Debian 13's through
# the wrapper .ci/qemu10 installs (another place with SNAPFMT_QEMU10).
QEMUS = {
    "7.2": "qemu-system-x86_64",
    "10.0": os.environ.get("SNAPFMT_QEMU10", "qemu-system-x86_64-10.0"),
}


def need_qemu(version: str) -> str:
    """The QEMU binary of *version*; the test is skipped where it is missing, and fails
    in CI (CI=true), which must have both."""
    import pytest

    binary = QEMUS[version]
    if shutil.which(binary) is None:
        why = f"QEMU {version} ({binary}) is missing; .ci/run installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return binary
