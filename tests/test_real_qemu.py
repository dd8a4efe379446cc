"""Real QEMU as the oracle, in two versions: 7.2 (Debian 12's qemu-system-x86) and 10.0
(Debian 13's, in the root .ci/qemu10 makes).  Every test runs on both.  In CI they must
run: they fail, not skip, when CI=true and either QEMU is missing."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

import snapfmt
from snapfmt.ops.diff import diff
from snapfmt.ops.verify import verify
from snapfmt.qemu import qmp
from tests.helpers import QEMUS, need_qemu


@pytest.fixture(scope="module", params=sorted(QEMUS))
def qemu(request: pytest.FixtureRequest) -> str:
    """The QEMU binary of one version (skipped, or in CI failed, where it is missing)."""
    return need_qemu(request.param)


def machine(ram_file: Path, kind: str) -> list[str]:
    return [
        "-M", kind, "-m", "16M", "-smp", "2", "-nodefaults",
        "-object", f"memory-backend-file,id=pc.ram,size=16M,mem-path={ram_file},share=off",
        "-machine", "memory-backend=pc.ram",
        "-device", "e1000,addr=05.0", "-device", "virtio-net-pci,addr=06.0,romfile=",
        "-device", "lsi53c895a,addr=07.0",
        "-rtc", "base=2020-01-01T00:00:00,clock=vm",  # a paused machine's RTC stands still
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["pc", "q35"])
def test_fresh_save_reads_back_exactly(qemu: str, tmp_path: Path, kind: str) -> None:
    rng = random.Random(kind)
    ram = bytearray(16 << 20)
    for _ in range(64):  # scattered random pages, the rest zero
        at = rng.randrange(0, len(ram) // 4096) * 4096
        ram[at : at + 4096] = rng.randbytes(4096)
    ram_file = tmp_path / "ram.img"
    ram_file.write_bytes(ram)
    stream = tmp_path / "vm.mig"
    with qmp.Qemu(binary=qemu, args=machine(ram_file, kind)) as vm:
        vm.save(str(stream))
    with snapfmt.open(stream) as snap:
        block = snap.ram_block(snap.select_one("/pc.ram"))
        assert block.read(0, block.length) == bytes(ram)
        assert verify(snap).ok
        e1000 = snap.device(snap.select_one("0000:00:05.0/e1000"))
        assert e1000.driver == "e1000" and e1000.version_id == 2
        assert {f.name for f in e1000.fields()} >= {"rxbuf_size", "eecd_state.val_in"}


def test_qemu_restores_its_own_stream(qemu: str, tmp_path: Path) -> None:
    ram_file = tmp_path / "ram.img"
    ram_file.write_bytes(bytes(16 << 20))
    stream = tmp_path / "vm.mig"
    with qmp.Qemu(binary=qemu, args=machine(ram_file, "pc")) as vm:
        vm.save(str(stream))
    with qmp.Qemu(binary=qemu, args=machine(ram_file, "pc"), incoming=f"exec:cat {stream}") as vm:
        assert vm.wait_incoming() == "loaded"


def test_qemu_and_snapfmt_agree_on_a_raised_version(qemu: str, tmp_path: Path) -> None:
    ram_file = tmp_path / "ram.img"
    ram_file.write_bytes(bytes(16 << 20))
    stream = tmp_path / "vm.mig"
    with qmp.Qemu(binary=qemu, args=machine(ram_file, "pc")) as vm:
        vm.save(str(stream))
    data = bytearray(stream.read_bytes())
    with snapfmt.open(stream) as snap:
        record = snap.section_record(snap.select_one("0000:00:05.0/e1000"))  # type: ignore[attr-defined]
    at = record.header_offset + 1 + 4 + 1 + len(record.idstr) + 4
    data[at : at + 4] = (3).to_bytes(4, "big")
    stream.write_bytes(data)
    with snapfmt.open(stream) as snap:
        problems = verify(snap).problems
    assert [p.message for p in problems] == ["section version 3 differs from the vmdesc's 2"]
    with pytest.raises(qmp.QemuError, match=r"unsupported version 3 for '0000:00:05.0/e1000' v2"):  # noqa: SIM117
        with qmp.Qemu(
            binary=qemu, args=machine(ram_file, "pc"), incoming=f"exec:cat {stream}"
        ) as vm:
            vm.wait_incoming()


SAMPLE_SCRIPT = Path(__file__).resolve().parent.parent / "samples" / "qemu" / "make_qemu_samples.py"


def _sample_commands(ram_file: Path) -> dict[str, list[str]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_qemu_samples", SAMPLE_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ram_file.write_bytes(module.ram_image())
    commands: dict[str, list[str]] = module.commands(str(ram_file))
    return commands


def _contents(path: Path) -> dict[str, bytes]:
    with snapfmt.open(path) as snap:
        out = {}
        for section in snap.sections:
            assert section.path is not None
            if section.kind_name == "device":
                out[section.key] = snap.device(section.path).data
            else:
                block = snap.ram_block(section.path)
                out[section.key] = block.read(0, block.length)
        return out


@pytest.mark.parametrize("kind", ["pc", "q35"])
def test_qemu_restores_what_snapfmt_wrote(qemu: str, tmp_path: Path, run: Any, kind: str) -> None:
    """QEMU saves -> native -> QEMU stream -> QEMU restores it with the same command line
    -> QEMU saves again: every RAM byte and every device state equals the original's."""
    args = _sample_commands(tmp_path / "ram.img")[kind]
    original, native, back, again = (tmp_path / n for n in ("a.mig", "a.snap", "b.mig", "c.mig"))
    with qmp.Qemu(binary=qemu, args=args) as vm:
        vm.save(str(original))
    assert run("convert", original, native).code == 0
    assert run("verify", native).code == 0
    assert run("convert", native, back, "--to", "qemu").code == 0
    with qmp.Qemu(binary=qemu, args=args, incoming=f"exec:cat {back}") as vm:
        assert vm.wait_incoming() == "loaded"
        vm.save(str(again))
    first, second = _contents(original), _contents(again)
    assert list(first) == list(second)
    assert [key for key in first if first[key] != second[key]] == []


def test_diff_names_the_e1000_mac_fields(qemu: str, tmp_path: Path) -> None:
    """Two paused machines whose e1000 differs only in its MAC address."""
    ram_file = tmp_path / "ram.img"
    ram_file.write_bytes(bytes(16 << 20))
    base = [*machine(ram_file, "pc")]
    base[base.index("e1000,addr=05.0")] = "e1000,addr=05.0,mac=52:54:00:12:34:56"
    base[base.index("virtio-net-pci,addr=06.0,romfile=")] = (
        "virtio-net-pci,addr=06.0,romfile=,mac=52:54:00:00:00:06"
    )
    other = [a.replace("mac=52:54:00:12:34:56", "mac=52:54:00:ab:cd:ef") for a in base]
    for name, args in (("a.mig", base), ("b.mig", other)):
        with qmp.Qemu(binary=qemu, args=args) as vm:
            vm.save(str(tmp_path / name))
    with snapfmt.open(tmp_path / "a.mig") as a, snapfmt.open(tmp_path / "b.mig") as b:
        result = diff(a, b)
    assert [s.path for s in result.sections] == ["/i440FX-pcihost/pci.0/e1000@05.0/vmstate"]
    changed = {c.name: (c.old, c.new) for c in result.sections[0].changes}
    # receive address registers RAL0/RAH0 (0x5400, 0x5404) in the full MAC state, little-endian MAC
    assert changed["e1000/full_mac_state:mac_reg[5376]"][0] == int.from_bytes(
        bytes.fromhex("52540012"), "little"
    )
    assert changed["e1000/full_mac_state:mac_reg[5376]"][1] == int.from_bytes(
        bytes.fromhex("525400ab"), "little"
    )
    assert {"eeprom_data[1]", "eeprom_data[2]"} <= set(changed)  # the MAC's words in the EEPROM


def test_diff_of_a_running_vm_saved_twice(qemu: str, tmp_path: Path) -> None:
    """Firmware runs between two saves: timers and RAM change (the CPU may be halted)."""
    ram_file = tmp_path / "ram.img"
    ram_file.write_bytes(bytes(16 << 20))
    with qmp.Qemu(binary=qemu, args=machine(ram_file, "pc")) as vm:
        vm.command("cont")
        time.sleep(1.0)
        vm.save(str(tmp_path / "a.mig"))
        vm.command("cont")
        time.sleep(1.0)
        vm.save(str(tmp_path / "b.mig"))
    with snapfmt.open(tmp_path / "a.mig") as a, snapfmt.open(tmp_path / "b.mig") as b:
        result = diff(a, b)
    changed = {s.path for s in result.sections}
    assert {"/timer/vmstate", "/pc.ram"} <= changed
    assert all(s.status == "changed" for s in result.sections)


def test_qemu_restores_the_postcopy_sample(qemu: str, tmp_path: Path) -> None:
    """The postcopy-ram sample (pc.ram in 2 MiB huge pages, its page size in the block
    list): QEMU restores it with postcopy-ram on, saves it again without, and the RAM and
    device state snapfmt reads from both are the same."""
    samples = Path(__file__).resolve().parent.parent / "samples" / "qemu"
    make = _load(samples / "make_qemu_samples.py")
    try:
        make.reserve_huge_pages()
    except OSError as e:  # not root, or no huge pages on this kernel
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot reserve 2 MiB huge pages: {e}")
        pytest.skip(f"cannot reserve 2 MiB huge pages: {e}")
    page = tmp_path / "page.bin"
    page.write_bytes(make.POSTCOPY_TEXT)
    stream = tmp_path / "pc-postcopy.mig"  # (where QEMU 10, in its own root, sees it too)
    stream.write_bytes((samples / "pc-postcopy.mig").read_bytes())
    again = tmp_path / "again.mig"
    with qmp.Qemu(
        binary=qemu, args=[*make.postcopy_machine(str(page)), "-incoming", "defer"]
    ) as vm:
        postcopy = [{"capability": "postcopy-ram", "state": True}]
        vm.command("migrate-set-capabilities", capabilities=postcopy)
        vm.command("migrate-incoming", uri=f"exec:cat {stream}")
        assert vm.wait_incoming() == "loaded"
        postcopy[0]["state"] = False
        vm.command("migrate-set-capabilities", capabilities=postcopy)
        vm.save(str(again))
    with snapfmt.open(samples / "pc-postcopy.mig") as a, snapfmt.open(again) as b:
        result = diff(a, b)
        # QEMU 10 records the runstate of a machine that was loaded, not the one it
        # was saved in (and a few fields beside it): global state, not the restore's
        differing = [s for s in result.sections
                     if not (qemu == QEMUS["10.0"] and s.path == "/globalstate/vmstate")]  # fmt: skip
        assert not differing, [(s.summary, s.changes) for s in differing]
        assert b.ram_block(b.select_one("/pc.ram")).host_page_size is None


def _load(path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("saver", "loader"), [("7.2", "10.0"), ("10.0", "7.2")])
def test_a_save_converted_twice_restores_in_the_other_version(
    tmp_path: Path, run: Any, saver: str, loader: str
) -> None:
    """QEMU of one version saves a versioned machine type; snapfmt converts it to native
    and back; QEMU of the other version restores it."""
    binaries = {version: need_qemu(version) for version in (saver, loader)}
    args = _sample_commands(tmp_path / "ram.img")["pc"]
    original, native, back = (tmp_path / n for n in ("a.mig", "a.snap", "b.mig"))
    with qmp.Qemu(args, binary=binaries[saver]) as vm:
        vm.save(str(original))
    assert run("convert", original, native).code == 0
    assert run("convert", native, back, "--to", "qemu").code == 0
    with qmp.Qemu(args, binary=binaries[loader], incoming=f"exec:cat {back}") as vm:
        assert vm.wait_incoming() == "loaded"


def test_a_mapped_ram_save_converts_to_a_stream_both_versions_load(tmp_path: Path) -> None:
    """QEMU 10.0 saves with mapped-ram (pages at fixed file offsets); converted, it is an
    ordinary stream without that capability, and QEMU 7.2 and 10.0 load it with their
    defaults, the RAM what the mapped-ram file held."""
    save, plain = tmp_path / "mapped.mig", tmp_path / "plain.mig"
    ram = bytearray(16 << 20)
    ram[0x200000:0x201000] = b"mapped-ram page " * 256
    ram_file = tmp_path / "ram.img"
    ram_file.write_bytes(ram)
    args = machine(ram_file, "pc-i440fx-7.2")
    with qmp.Qemu(binary=need_qemu("10.0"), args=args) as vm:
        vm.command("migrate-set-capabilities",
                   capabilities=[{"capability": "mapped-ram", "state": True}])  # fmt: skip
        vm.command("migrate", uri=f"file:{save}")
        assert vm.wait_migration()["status"] == "completed"
    with snapfmt.open(save) as snap:
        assert "mapped-ram" in snap.configuration.capabilities
        from snapfmt.ops.convert import convert

        convert(snap, str(plain), "qemu")
    with snapfmt.open(plain) as snap:
        assert "mapped-ram" not in snap.configuration.capabilities
        block = snap.ram_block(snap.select_one("/pc.ram"))
        assert block.read(0, block.length) == bytes(ram)
        with snapfmt.open(save) as original:
            found = diff(original, snap)
        assert [c.name for c in found.configuration] == ["capabilities"] and not found.sections
    for version in ("7.2", "10.0"):
        with qmp.Qemu(binary=need_qemu(version), args=args, incoming=f"exec:cat {plain}") as vm:
            assert vm.wait_incoming() == "loaded"


def test_a_postcopy_save_keeps_postcopy_through_native(qemu: str, tmp_path: Path) -> None:
    """The postcopy-ram sample converted to native and back keeps its POSTCOPY_ADVISE and
    its huge-page block size: QEMU refuses the copy without postcopy-ram, as it refuses
    the original, and loads it with the capability on."""
    from snapfmt.ops.convert import convert

    samples = Path(__file__).resolve().parent.parent / "samples" / "qemu"
    make = _load(samples / "make_qemu_samples.py")
    try:
        make.reserve_huge_pages()
    except OSError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot reserve 2 MiB huge pages: {e}")
        pytest.skip(f"cannot reserve 2 MiB huge pages: {e}")
    page = tmp_path / "page.bin"
    page.write_bytes(make.POSTCOPY_TEXT)
    original, native, copy = (
        tmp_path / "pc-postcopy.mig",
        tmp_path / "pc.snap",
        tmp_path / "copy.mig",
    )
    original.write_bytes((samples / "pc-postcopy.mig").read_bytes())
    with snapfmt.open(original) as snap:
        convert(snap, str(native), "native")
    with snapfmt.open(native) as snap:
        assert "postcopy-ram" in snap.configuration.capabilities
        convert(snap, str(copy), "qemu")
    with snapfmt.open(copy) as snap:
        assert snap.ram_block(snap.select_one("/pc.ram")).host_page_size == 2 << 20
    for stream in (original, copy):
        for enabled in (False, True):
            with qmp.Qemu(
                binary=qemu, args=[*make.postcopy_machine(str(page)), "-incoming", "defer"]
            ) as vm:
                vm.command("migrate-set-capabilities",
                           capabilities=[{"capability": "postcopy-ram", "state": enabled}])  # fmt: skip
                vm.command("migrate-incoming", uri=f"exec:cat {stream}")
                try:
                    outcome = vm.wait_incoming()
                except qmp.QemuError:
                    outcome = "refused"
            assert outcome == ("loaded" if enabled else "refused"), (stream.name, enabled)
