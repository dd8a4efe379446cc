"""libvirt save images round trip: `virsh save` → native (the domain XML kept) → a save
image snapfmt writes (raw and compressed) → `virsh restore` takes it, and the restored
guest's RAM, saved again, is the original's.  Real libvirtd, TCG domains; in CI these
fail, not skip, without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import snapfmt
from tests.helpers import Run
from tests.test_memory_qemu import libvirt_domain, need_tool


@pytest.mark.parametrize("compression", ["raw", "gzip"])
def test_a_save_image_through_native_restores(tmp_path: Path, run: Run, compression: str) -> None:
    virsh = need_tool("virsh")
    name = f"snapfmt-roundtrip-{os.getpid()}-{compression}"
    xml, shared = libvirt_domain(tmp_path, name)
    saved, native, back, again = (tmp_path / n for n in ("vm.save", "vm.snap", "back.save",
                                                          "again.save"))  # fmt: skip
    images = Path(tempfile.mkdtemp(prefix="snapfmt-libvirt-images-"))  # (libvirt's user reads)
    images.chmod(0o777)

    def call(*args: str) -> None:
        done = subprocess.run(
            [virsh, "-c", "qemu:///system", *args], capture_output=True, text=True
        )
        assert done.returncode == 0, (args, done.stderr)

    try:
        call("create", str(xml), "--paused")
        call("save", name, str(saved))
        assert run("convert", saved, native).code == 0
        document = json.loads(run("dump", native, "--json").out)["sections"]
        kept = next(s["document"] for s in document if s.get("name") == "libvirt")
        assert f"<name>{name}</name>" in kept["domain_xml"] and kept["was_running"] is False
        result = run("convert", native, back, "--to", "libvirt", "--compress", compression)
        assert result.code == 0, result.err
        shutil.copyfile(back, images / "back.save")
        (images / "back.save").chmod(0o644)
        call("restore", str(images / "back.save"), "--paused")
        call("save", name, str(again))
    finally:
        subprocess.run([virsh, "-c", "qemu:///system", "destroy", name], capture_output=True)
        shutil.rmtree(shared)
        shutil.rmtree(images)
    with snapfmt.open(back) as snap:
        assert snap.wrapper is not None and snap.wrapper.compression == compression
    result = run("diff", saved, again, "--json")
    ram = [s for s in json.loads(result.out)["sections"] if s["kind"] == "ram-block"]
    assert ram == [], ram  # the guest's memory came back whole
