"""The guest-physical map's rules, the ELF core's structure, and `snapfmt memory` on the
committed QEMU samples (tests/test_memory_qemu.py holds them against real QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest

import snapfmt
from snapfmt.errors import GuestMemoryError
from snapfmt.formats import elf
from snapfmt.guest import cpu, physmap
from snapfmt.guest.physmap import GiB, MiB, cmos_split, machine_family, merged, paint, ram_split
from snapfmt.native.writer import Writer
from snapfmt.ops import memory
from tests.helpers import SAMPLES, Run

PC = SAMPLES / "qemu" / "pc.mig"


def test_note_structures_have_the_sizes_gdb_and_qemu_use() -> None:
    assert elf.I386Prstatus.sizeof() == 0x90
    assert elf.X86_64Prstatus.sizeof() == 0x150
    assert elf.QemuCpuState.sizeof() == 0x1B8


@pytest.mark.parametrize(
    ("machine", "ram", "below"),
    [
        ("pc-i440fx-7.2", 4 * GiB, 3 * GiB),  # gigabyte-aligned split
        ("pc-i440fx-7.2", 3 * GiB, 3 * GiB),  # fits below 3.5 GiB: not split
        ("pc-i440fx-7.2", 0xE0000000, 3 * GiB),
        ("pc-1.7", 4 * GiB, 0xE0000000),  # before gigabyte alignment: 3.5 GiB
        ("pc-q35-7.2", 3 * GiB, 2 * GiB),
        ("pc-q35-10.0", 0xB0000000 - MiB, 0xB0000000 - MiB),
        ("pc-q35-10.0", 64 * MiB, 64 * MiB),
    ],
)
def test_ram_split_follows_the_machine_type(machine: str, ram: int, below: int) -> None:
    family, version = machine_family(machine)
    assert ram_split(family, version, ram) == below


@pytest.mark.parametrize("machine", ["microvm", "pc-q35-rhel9.2.0", "virt-7.2", "isapc"])
def test_unknown_machine_types_are_refused(machine: str) -> None:
    with pytest.raises(GuestMemoryError, match=r"knows the memory map of pc-i440fx-X\.Y"):
        machine_family(machine)


def cmos(below: int, above: int) -> bytes:
    data = bytearray(128)
    data[0x30:0x32] = min((below - MiB) // 1024, 0xFFFF).to_bytes(2, "little")
    data[0x34:0x36] = ((below - 16 * MiB) // (64 << 10)).to_bytes(2, "little")
    data[0x5B:0x5E] = (above // (64 << 10)).to_bytes(3, "little")
    return bytes(data)


def test_cmos_gives_the_split_max_ram_below_4g_made() -> None:
    # qemu -M pc,max-ram-below-4g=2G -m 4G: 2 GiB low, 2 GiB high
    assert cmos_split(cmos(2 * GiB, 2 * GiB), 4 * GiB) == 2 * GiB
    # bytes that do not add up to the RAM size (a guest rewrote them) are not trusted
    assert cmos_split(cmos(2 * GiB, 1 * GiB), 4 * GiB) is None
    assert cmos_split(b"\0" * 16, 4 * GiB) is None


def test_painting_splits_and_offsets_the_regions_below() -> None:
    segments = paint([], 0, 0x100000, ("pc.ram", 0))
    segments = paint(segments, 0xA0000, 0xC0000, None)
    segments = paint(segments, 0xC0000, 0xE0000, ("pc.rom", 0))
    assert merged(segments) == (
        physmap.Range(0, 0xA0000, "pc.ram", 0),
        physmap.Range(0xC0000, 0x20000, "pc.rom", 0),
        physmap.Range(0xE0000, 0x20000, "pc.ram", 0xE0000),
    )
    # adjacent pieces of one block, contiguous in it, merge as dump-guest-memory merges
    joined = paint(paint([], 0, 0x1000, ("pc.ram", 0)), 0x1000, 0x2000, ("pc.ram", 0x1000))
    assert merged(joined) == (physmap.Range(0, 0x2000, "pc.ram", 0),)


def test_the_map_of_the_pc_sample() -> None:
    with snapfmt.open(PC) as snap:
        layout = physmap.physical_map(snap)
        cpus = cpu.cpus(snap)
    assert layout.machine == "pc-i440fx-7.2" and layout.below_4g == 16 * MiB
    assert [(r.start, r.length, r.block) for r in layout.ranges] == [
        (0, 0xC0000, "pc.ram"),  # no VGA in the sample: RAM shows through 0xa0000
        (0xC0000, 0x20000, "pc.rom"),
        (0xE0000, 0x20000, "pc.bios"),
        (0x100000, 16 * MiB - 0x100000, "pc.ram"),
        (0xFFFC0000, 0x40000, "pc.bios"),
    ]
    assert [c.index for c in cpus] == [0, 1] and cpus[0].regs["rip"] == 0xFFF0
    assert cpus[0].segments["cs"].base == 0xFFFF0000 and not cpus[0].long_mode


def test_cli_map_read_and_elf(tmp_path: Path, run: Run) -> None:
    shown = run("memory", PC)
    assert shown.code == 0 and "0x0000fffc0000  0x0000ffffffff  256.0 KiB  pc.bios" in shown.out
    reset = run("memory", PC, "--read", "0xffff0", "--length", "16")
    assert reset.code == 0 and reset.out.startswith("  0x000ffff0  ea 5b e0 00 f0")
    core = tmp_path / "vm.core"
    done = run("memory", PC, "--elf", core, "-q")
    assert done.code == 0 and done.out.startswith(f"wrote {core}: elf, 5 ranges")
    from elftools.elf.elffile import ELFFile

    with open(core, "rb") as f:
        loads = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
        assert all(s["p_offset"] % 4096 == 0 for s in loads)
        with snapfmt.open(PC) as snap:
            layout = physmap.physical_map(snap)
            for s in loads:
                assert s.data()[:4096] == layout.read(s["p_paddr"], 4096)


def test_raw_image_is_sparse_and_addressed(tmp_path: Path, run: Run) -> None:
    raw = tmp_path / "vm.raw"
    assert run("memory", PC, "--raw", raw, "-q").code == 0
    assert raw.stat().st_size == 1 << 32
    with open(raw, "rb") as f:
        f.seek(0xFFFF0)
        assert f.read(5) == bytes.fromhex("ea5be000f0")
    assert raw.stat().st_blocks * 512 < 4 * MiB  # the sample's RAM is nearly all zeros


def test_bad_requests_get_one_line(tmp_path: Path, run: Run) -> None:
    hole = run("memory", PC, "--read", "0xa0000000")
    assert hole == type(hole)(
        2, "", "snapfmt: error: guest-physical 0xa0000000 is not RAM or ROM (a hole)\n"
    )
    both = run("memory", PC, "--elf", tmp_path / "a", "--raw", tmp_path / "b")
    assert both.code == 2 and "at most one of --elf, --raw and --read" in both.err
    nothing = run("memory", PC, "--block-file", "pc.ram")
    assert nothing.code == 2 and "give BLOCK=FILE" in nothing.err
    assert list(tmp_path.iterdir()) == []


def write_snapshot(path: Path, machine: str, skip_cpus: bool = False) -> None:
    """The pc sample as a native file, optionally without its CPU sections."""
    with snapfmt.open(PC) as snap, Writer(path, machine=machine) as w:
        for device in snap.devices():
            if skip_cpus and device.vmstate_name == "cpu":
                continue
            w.add_device(device.path, device.data, driver=device.driver,
                         vmstate_name=device.vmstate_name, instance_id=device.instance_id,
                         version_id=device.version_id, layout=device.layout,
                         qemu_idstr=device.qemu_idstr)  # fmt: skip
        for block in snap.ram_blocks():
            w.add_ram_block(block.path, [block.read(0, block.length)], qemu_idstr=block.qemu_idstr)


def test_missing_parts_are_named_and_nothing_is_written(tmp_path: Path, run: Run) -> None:
    odd, bare = tmp_path / "odd.snap", tmp_path / "bare.snap"
    write_snapshot(odd, "microvm")
    write_snapshot(bare, "pc-i440fx-7.2", skip_cpus=True)
    out = tmp_path / "out"
    out.mkdir()
    unknown = run("memory", odd, "--elf", out / "x.core")
    assert unknown.code == 2 and "machine type 'microvm'" in unknown.err
    no_cpu = run("memory", bare, "--elf", out / "x.core")
    assert no_cpu.code == 2
    assert (
        no_cpu.err
        == "snapfmt: error: no CPU sections (cpu): the registers are not in the snapshot\n"
    )
    assert run("memory", bare, "--raw", out / "x.raw", "-q").code == 0  # (needs no CPU)
    assert sorted(p.name for p in out.iterdir()) == ["x.raw"]


def test_a_block_missing_from_the_stream_can_come_from_its_file(tmp_path: Path, run: Run) -> None:
    with snapfmt.open(PC) as snap:
        ram = snap.ram_block(snap.select_one("/pc.ram"))
        contents = ram.read(0, ram.length)
    backing = tmp_path / "ram.img"
    backing.write_bytes(contents)
    shown = run("memory", PC, "--block-file", f"pc.ram={backing}", "--read", "0x1000")
    assert shown.code == 0
    short = tmp_path / "short.img"
    short.write_bytes(b"\0" * 4096)
    refused = run("memory", PC, "--block-file", f"pc.ram={short}")
    assert refused.code == 2 and "less than RAM block /pc.ram" in refused.err
    unknown = run("memory", PC, "--block-file", f"nope={backing}")
    assert unknown.code == 2 and "no RAM block 'nope'" in unknown.err


def config(command: int, bar0: int, bar1: int = 0, rom: int = 0) -> bytes:
    data = bytearray(256)
    data[0x04] = command
    data[0x10:0x14] = bar0.to_bytes(4, "little")
    data[0x14:0x18] = bar1.to_bytes(4, "little")
    data[0x30:0x34] = rom.to_bytes(4, "little")
    return bytes(data)


def test_bars_map_as_pci_bar_address_decides() -> None:
    from snapfmt.guest.bars import BAR0, ROM_BAR, _address

    assert _address(config(2, 0xFD000008), BAR0, 16 * MiB) == 0xFD000000
    assert _address(config(0, 0xFD000008), BAR0, 16 * MiB) is None  # decoding off
    assert _address(config(2, 0xC001), BAR0, 0x100) is None  # an I/O BAR
    assert _address(config(2, 0xC, 0x80), BAR0, 16 * MiB) == 0x80_0000_0000  # 64-bit
    assert _address(config(2, 0xFF000000), BAR0, 16 * MiB) is None  # 32-bit reaching 4 GiB
    assert _address(config(2, 0, rom=0xFEB80001), ROM_BAR, 0x40000) == 0xFEB80000
    assert _address(config(2, 0, rom=0xFEB80000), ROM_BAR, 0x40000) is None  # not enabled


def test_started_writeback_writes_the_same_bytes(tmp_path: Path) -> None:
    """perf.writeback only starts flushing early: the files are equal with it and without
    (the ELF core and the raw image share the copying)."""
    from snapfmt.perf import writeback

    outputs = []
    with snapfmt.open(PC) as snap:
        for enabled in (True, False):
            out = tmp_path / f"{enabled}.core"
            memory.write_elf(snap, str(out), writeback=enabled)
            outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert writeback._sync_file_range() is not None  # (Linux: the fast version ran)


def test_a_short_host_bridge_config_is_named(tmp_path: Path, run: Run) -> None:
    short = tmp_path / "short.snap"
    layout = {"fields": [{"name": "config", "type": "pci config", "size": 16}], "subsections": []}
    with snapfmt.open(PC) as snap, Writer(short, machine="pc-i440fx-7.2") as w:
        for device in snap.devices():
            if device.vmstate_name == "I440FX":
                w.add_device(device.path, bytes(16), driver=device.driver,
                             vmstate_name="I440FX", layout=layout)  # fmt: skip
        for block in snap.ram_blocks():
            w.add_ram_block(block.path, [block.read(0, block.length)], qemu_idstr=block.qemu_idstr)
    result = run("memory", short)
    assert result.code == 2 and "PCI config space of 16 bytes, expected 256" in result.err
