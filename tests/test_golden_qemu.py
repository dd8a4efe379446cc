"""Golden output of dump and diff, text and JSON, on the real QEMU 7.2 and 10.0 samples
(samples/qemu/devices-*.mig.zst): an e1000, a virtio-net, a CPU and the RTC, and the
differences between two machines that differ in MAC and RTC base.

SNAPFMT_UPDATE_GOLDEN=1 pytest tests/test_golden_qemu.py rewrites the golden files;
review what changed before committing them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import ROOT, Run

GOLDEN = Path(__file__).resolve().parent / "golden" / "qemu"
DEVICES = ["e1000", "virtio-net-pci", "/cpu@0/cpu", "mc146818rtc"]
# JSON lists every field: these keep the files short (not the 1024-entry queue tables)
JSON_FIELDS = ["parent_obj.config*", "mac_reg[RA+*", "eeprom_data", "virtio.pci",
               "virtio.status", "virtio.guest_features", "virtio.config", "virtio.vq",
               "virtio.device", "virtio/64bit_features", "env.regs", "env.eip", "env.eflags",
               "env.segs", "env.cr", "cmos_data", "base_rtc"]  # fmt: skip


def _sample(version: str, tag: str) -> str:
    return f"samples/qemu/devices-{version}-{tag}.mig.zst"


def _cases() -> list[tuple[str, list[str]]]:
    cases = []
    for version in ("7.2", "10.0"):
        a, b = _sample(version, "a"), _sample(version, "b")
        fields = [arg for name in JSON_FIELDS for arg in ("--field", name)]
        cases += [
            (f"dump-{version}.txt", ["dump", a, *DEVICES]),
            (f"dump-{version}.json", ["dump", a, *DEVICES, *fields, "--json"]),
            (f"diff-{version}.txt", ["diff", a, b]),
            (f"diff-{version}.json", ["diff", a, b, "--json"]),
        ]
    return cases


@pytest.mark.parametrize(("golden", "args"), _cases(), ids=[c[0] for c in _cases()])
def test_golden(run: Run, monkeypatch: pytest.MonkeyPatch, golden: str, args: list[str]) -> None:
    monkeypatch.chdir(ROOT)
    result = run(*args)
    assert result.err == ""
    assert result.code == (1 if args[0] == "diff" else 0)
    path = GOLDEN / golden
    if os.environ.get("SNAPFMT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(result.out)
    assert result.out == path.read_text()
