"""Guest-physical memory against real QEMU 7.2 and 10.0, libvirt, gdb and volatility3.

The same paused VM is dumped by QMP ``dump-guest-memory`` (paging off) and migrated to a
file; snapfmt's ELF core from the stream must have the same PT_LOAD segments (physical
addresses, sizes, bytes) and the same notes.  A marker the ``loader`` device puts at a
known address must be found there by gdb and by volatility3, in the ELF core and in the
raw image.  In CI every tool must be present: a missing one fails the test."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import snapfmt
from snapfmt.guest.physmap import physical_map
from snapfmt.ops import memory
from snapfmt.ops.convert import convert
from snapfmt.qemu import qmp
from tests.helpers import QEMUS, need_qemu

MARKER = b"SNAPFMT-MARKER-0123456789"
LOW_MARK, HIGH_MARK = 0x2345000, 0x120000000


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        why = f"{name} is missing; .ci/run installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module", params=sorted(QEMUS))
def qemu(request: pytest.FixtureRequest) -> str:
    return need_qemu(request.param)


def segments(core: Path) -> tuple[str, list[tuple[int, int, str]], list[tuple[str, int, bytes]]]:
    """(e_machine, [(paddr, size, sha256 of the bytes)], [(note name, type, desc)])."""
    from elftools.elf.elffile import ELFFile

    loads, notes = [], []
    with open(core, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD":
                digest = hashlib.sha256()
                f.seek(seg["p_offset"])
                left = seg["p_filesz"]
                while left:
                    piece = f.read(min(left, 1 << 24))
                    assert piece, "ELF file ends inside a segment"
                    digest.update(piece)
                    left -= len(piece)
                loads.append((seg["p_paddr"], seg["p_filesz"], digest.hexdigest()))
                f.seek(0)
            elif seg["p_type"] == "PT_NOTE":
                for note in seg.iter_notes():
                    raw = note["n_descdata"]
                    notes.append((note["n_name"], note["n_type"], bytes(raw, "latin-1")
                                  if isinstance(raw, str) else bytes(raw)))  # fmt: skip
        return elf["e_machine"], loads, notes


def saved_and_dumped(
    binary: str, args: list[str], folder: Path, run: bool = False
) -> tuple[Path, Path]:
    stream, dump = folder / "vm.mig", folder / "qemu.core"
    with qmp.Qemu(binary=binary, args=["-display", "none", *args]) as vm:
        if run:  # let the firmware run (tiny_bios ends in hlt), then stop it
            vm.command("cont")
            time.sleep(0.5)
            vm.command("stop")
        vm.command("dump-guest-memory", paging=False, protocol=f"file:{dump}")
        vm.save(str(stream))
    return stream, dump


def marker_args(folder: Path, *addresses: int) -> list[str]:
    (folder / "marker.bin").write_bytes(MARKER)
    out = []
    for address in addresses:
        out += ["-device", f"loader,file={folder / 'marker.bin'},addr={address:#x}"]
    return out


def gdb_registers(core: Path, *names: str) -> dict[str, int]:
    """The registers gdb shows for the core's first thread."""
    shown = subprocess.run(
        [need_tool("gdb"), "-nx", "-batch", "-ex", f"info registers {' '.join(names)}",
         "-c", str(core)], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {line.split()[0]: int(line.split()[1], 16) for line in shown.splitlines()
            if line.split() and line.split()[0] in names}  # fmt: skip


def assert_same_core(ours: Path, theirs: Path) -> None:
    assert segments(ours) == segments(theirs)


CASES = {
    "pc-64M": ["-M", "pc-i440fx-7.2", "-m", "64M"],
    "q35-128M-2cpu": ["-M", "pc-q35-7.2", "-m", "128M", "-smp", "2"],
    "pc-4G": ["-M", "pc-i440fx-7.2", "-m", "4G"],
    "q35-3G": ["-M", "pc-q35-7.2", "-m", "3G"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_elf_equals_dump_guest_memory(qemu: str, tmp_path: Path, case: str) -> None:
    big = "G" in CASES[case][3]
    marks = (LOW_MARK, HIGH_MARK) if big else (LOW_MARK,)
    stream, dump = saved_and_dumped(qemu, CASES[case] + marker_args(tmp_path, *marks), tmp_path)
    ours = tmp_path / "snapfmt.core"
    with snapfmt.open(stream) as snap:
        written = memory.write_elf(snap, str(ours))
        layout = physical_map(snap)
        for address in marks:
            assert memory.read(layout, address, len(MARKER)) == MARKER
    assert written.ranges == (6 if big else 5)
    try:
        assert_same_core(ours, dump)
        # sparse: the zero pages of the guest are holes, not written bytes
        assert os.stat(ours).st_blocks * 512 < written.memory // 4
    finally:  # (gigabytes each)
        for path in (stream, dump, ours):
            path.unlink()


def tiny_bios(writes: list[tuple[int, int]]) -> tuple[bytes, int]:
    """A 64 KiB firmware that writes bytes into the host bridge's config space (00:00.0,
    through ports 0xcf8/0xcfc), loads marks into eax and ebx, and halts; and the eip
    after its hlt."""
    code = bytearray()
    for register, value in writes:
        code += b"\x66\xb8" + (0x80000000 | register & 0xFC).to_bytes(4, "little")  # mov eax
        code += b"\xba\xf8\x0c" + b"\x66\xef"  # mov dx, 0xcf8; out dx, eax
        code += b"\xba" + (0xCFC + (register & 3)).to_bytes(2, "little")  # mov dx, 0xcfc+n
        code += b"\xb0" + bytes([value]) + b"\xee"  # mov al, value; out dx, al
    code += b"\x66\xb8" + (0x12345678).to_bytes(4, "little")  # mov eax, 0x12345678
    code += b"\x66\xbb" + (0x9ABCDEF0).to_bytes(4, "little")  # mov ebx, 0x9abcdef0
    code += b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp to the hlt
    image = bytearray(0x10000)
    image[: len(code)] = code
    image[0xFFF0:0xFFF3] = b"\xe9\x0d\x00"  # the reset vector: jmp to offset 0 (IP wraps)
    return bytes(image), len(code) - 2


def long_mode_bios() -> tuple[bytes, int]:
    """A 64 KiB firmware that goes from real mode straight to long mode (identity-mapped
    2 MiB pages at 0 and below 4 GiB, a 64-bit code segment), loads marks into rax, rbx,
    rsp and r15, and halts; and the rip after its hlt."""
    le = int.to_bytes
    code = bytearray(b"\xfa")  # cli
    for address, value in [
        (0x1000, 0x2003),
        (0x2000, 0x3003),
        (0x2018, 0x4003),
        (0x3000, 0x83),
        (0x4FF8, 0xFFE00083),  # PML4, PDPT, two PDs
        (0x500C, 0x00209A00),
        (0x5014, 0x00009200),
        (0x5022, 0x5000),
    ]:
        code += b"\x66\xc7\x06" + le(address, 2, "little") + le(value, 4, "little")
    code += b"\xc7\x06\x20\x50\x17\x00"  # the GDT's limit, 0x17, at 0x5020
    code += b"\x0f\x01\x16\x20\x50"  # lgdt [0x5020]
    code += b"\x0f\x20\xe0\x66\x83\xc8\x20\x0f\x22\xe0"  # cr4 |= PAE
    code += b"\x66\xb8\x00\x10\x00\x00\x0f\x22\xd8"  # cr3 = 0x1000
    code += b"\x66\xb9\x80\x00\x00\xc0\x0f\x32\x66\x0d\x00\x01\x00\x00\x0f\x30"  # EFER.LME
    code += b"\x0f\x20\xc0\x66\x0d\x01\x00\x00\x80\x0f\x22\xc0"  # cr0 |= PG | PE
    target = len(code) + 8  # after the far jump below (66 ea off32 sel16)
    code += b"\x66\xea" + le(0xFFFF0000 + target, 4, "little") + b"\x08\x00"
    for prefix, value in [
        (b"\x48\xb8", 0x1122334455667788),
        (b"\x48\xbb", 0x99AABBCCDDEEFF00),
        (b"\x48\xbc", 0x7FF0),
        (b"\x49\xbf", 0x0F0F0F0F0F0F0F0F),
    ]:
        code += prefix + le(value, 8, "little")  # mov rax/rbx/rsp/r15, imm64
    code += b"\xf4\xeb\xfd"  # hlt; jmp to the hlt
    image = bytearray(0x10000)
    image[: len(code)] = code
    image[0xFFF0:0xFFF3] = b"\xe9\x0d\x00"
    return bytes(image), 0xFFFF0000 + len(code) - 2


def test_a_cpu_in_long_mode_gives_x86_64_notes(qemu: str, tmp_path: Path) -> None:
    bios = tmp_path / "bios.bin"
    image, halted_at = long_mode_bios()
    bios.write_bytes(image)
    args = ["-M", "pc-q35-7.2", "-m", "64M", "-smp", "2", "-bios", str(bios)]
    stream, dump = saved_and_dumped(qemu, args, tmp_path, run=0.5)
    ours = tmp_path / "snapfmt.core"
    with snapfmt.open(stream) as snap:
        memory.write_elf(snap, str(ours))
    machine, _, notes = segments(ours)
    assert machine == "EM_X86_64" and notes[0][:2] == ("CORE", "NT_PRSTATUS")
    assert len(notes[0][2]) == 0x150
    assert_same_core(ours, dump)
    expected = {"rax": 0x1122334455667788, "rbx": 0x99AABBCCDDEEFF00, "rsp": 0x7FF0,
                "r15": 0x0F0F0F0F0F0F0F0F, "rip": halted_at}  # fmt: skip
    assert gdb_registers(ours, *expected) == expected


CHIPSETS = {
    # PAM: F0000 RAM; C0000 RAM, C4000 PCI (pc.rom); C8000 PCI, CC000 write-only (RAM);
    # E0000-E7FFF RAM, E8000-EFFFF PCI (nothing there: RAM shows); SMRAM open
    "pc": (["-M", "pc-i440fx-7.2", "-m", "64M"],
           [(0x59, 0x30), (0x5A, 0x01), (0x5B, 0x20), (0x5E, 0x33), (0x72, 0x4A)]),
    # the same PAM values; SMRAM enabled and TSEG on (1 MiB below the top of low RAM)
    "q35": (["-M", "pc-q35-7.2", "-m", "128M"],
            [(0x90, 0x30), (0x91, 0x01), (0x92, 0x20), (0x95, 0x33), (0x9D, 0x0A),
             (0x9E, 0x01)]),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(CHIPSETS))
def test_chipset_registers_shape_the_map(qemu: str, tmp_path: Path, family: str) -> None:
    args, writes = CHIPSETS[family]
    bios = tmp_path / "bios.bin"
    image, halted_at = tiny_bios(writes)
    bios.write_bytes(image)
    stream, dump = saved_and_dumped(qemu, [*args, "-bios", str(bios)], tmp_path, run=0.5)
    ours = tmp_path / "snapfmt.core"
    with snapfmt.open(stream) as snap:
        memory.write_elf(snap, str(ours))
        layout = physical_map(snap)
    assert_same_core(ours, dump)
    starts = {r.start: r for r in layout.ranges}
    if family == "pc":  # SMRAM open: RAM from 0 up to the first PAM region in PCI mode
        assert starts[0].length == 0xC4000 and starts[0].block == "pc.ram"
    else:  # TSEG hides the last MiB of low RAM
        assert layout.find(128 * 2**20 - 1) is None and layout.find(127 * 2**20 - 1)
        assert any("TSEG" in note for note in layout.notes)
    registers = gdb_registers(ours, "eax", "ebx", "eip")
    assert registers["eax"] == 0x12345678 and registers["ebx"] == 0x9ABCDEF0
    assert registers["eip"] == halted_at


BOOTED = {
    "pc-128M-vga": ["-M", "pc-i440fx-7.2", "-m", "128M"],
    "q35-256M-2cpu": ["-M", "pc-q35-7.2", "-m", "256M", "-smp", "2"],
    "pc-4G-virtio-vga": [
        "-M",
        "pc-i440fx-7.2",
        "-m",
        "4G",
        "-vga",
        "none",
        "-device",
        "virtio-vga",
    ],
}


@pytest.mark.parametrize("case", sorted(BOOTED))
def test_after_seabios_ran(qemu: str, tmp_path: Path, case: str) -> None:
    """SeaBIOS shadows itself (PAM to RAM), copies option ROMs and programs the BARs:
    the video RAM appears at its BAR, as in QEMU's own dump."""
    stream, dump = saved_and_dumped(qemu, BOOTED[case], tmp_path, run=2.0)
    ours = tmp_path / "snapfmt.core"
    with snapfmt.open(stream) as snap:
        memory.write_elf(snap, str(ours))
        layout = physical_map(snap)
    try:
        assert_same_core(ours, dump)
        assert any(r.block.endswith("/vga.vram") for r in layout.ranges)
    finally:
        for path in (stream, dump, ours):
            path.unlink()


def volatility_finds(image: Path, kind: str) -> list[int]:
    """Where volatility3, stacking the file as it does (an Elf64Layer for a core, the
    file itself for a raw image), finds the marker in the physical address space."""
    from volatility3.framework import contexts
    from volatility3.framework.layers import elf, physical, scanners

    ctx = contexts.Context()
    ctx.config["base.location"] = image.resolve().as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    layer: Any = ctx.layers["base"]
    if kind == "elf":
        layer = elf.Elf64Stacker.stack(ctx, "base")
        assert layer is not None, "volatility3 does not take the file for an ELF core"
        ctx.add_layer(layer)
    return list(layer.scan(ctx, scanners.BytesScanner(MARKER)))


def test_gdb_and_volatility3_open_the_core_and_the_raw_image(tmp_path: Path, run: Any) -> None:
    binary = need_qemu("7.2")
    stream, _ = saved_and_dumped(
        binary, ["-M", "pc-q35-7.2", "-m", "128M", *marker_args(tmp_path, LOW_MARK)], tmp_path
    )
    core, raw = tmp_path / "vm.core", tmp_path / "vm.raw"
    assert run("memory", str(stream), "--elf", str(core)).code == 0
    assert run("memory", str(stream), "--raw", str(raw)).code == 0
    assert raw.stat().st_size == 1 << 32 and raw.stat().st_blocks * 512 < 8 << 20
    assert volatility_finds(core, "elf") == [LOW_MARK]
    assert volatility_finds(raw, "raw") == [LOW_MARK]
    gdb = need_tool("gdb")
    shown = subprocess.run(
        [gdb, "-nx", "-batch", "-ex", f"x/s {LOW_MARK:#x}", "-ex", "info registers eip cs",
         "-c", str(core)], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert MARKER.decode() in shown and "0xfff0" in shown and "0xf000" in shown


def test_native_conversion_gives_the_same_core(tmp_path: Path) -> None:
    binary = need_qemu("10.0")
    args = ["-M", "pc-q35-7.2", "-m", "128M", "-smp", "2", *marker_args(tmp_path, LOW_MARK)]
    stream, dump = saved_and_dumped(binary, args, tmp_path)
    native = tmp_path / "vm.snap"
    with snapfmt.open(stream) as snap:
        convert(snap, str(native), "native")
    ours = tmp_path / "native.core"
    with snapfmt.open(native) as snap:
        memory.write_elf(snap, str(ours))
    assert_same_core(ours, dump)


LIBVIRT_DOMAIN = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>
    <video><model type='vga'/></video>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/><qemu:arg value='loader,file={marker},addr={address:#x}'/>
  </qemu:commandline>
</domain>
"""


def libvirt_domain(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(domain XML file, the folder of its marker file): QEMU under libvirt runs as
    another user, so the marker goes where it may read it (remove the folder after)."""
    shared = Path(tempfile.mkdtemp(prefix="snapfmt-libvirt-"))
    shared.chmod(0o755)
    marker = shared / "marker.bin"
    marker.write_bytes(MARKER)
    marker.chmod(0o644)
    xml = tmp_path / "domain.xml"
    xml.write_text(LIBVIRT_DOMAIN.format(name=name, marker=marker, address=LOW_MARK))
    return xml, shared


def test_libvirt_save_image_gives_the_core_virsh_dump_gives(tmp_path: Path) -> None:
    virsh = need_tool("virsh")
    name = f"snapfmt-memory-{os.getpid()}"
    xml, shared = libvirt_domain(tmp_path, name)
    dump, image = tmp_path / "virsh.core", tmp_path / "vm.save"

    def call(*args: str) -> None:
        done = subprocess.run(
            [virsh, "-c", "qemu:///system", *args], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr

    call("create", str(xml), "--paused")
    try:
        call("dump", name, str(dump), "--memory-only", "--format", "elf")
        call("save", name, str(image))
    finally:
        subprocess.run([virsh, "-c", "qemu:///system", "destroy", name], capture_output=True)
        shutil.rmtree(shared)
    ours = tmp_path / "snapfmt.core"
    with snapfmt.open(image) as snap:
        assert snap.format_name == "libvirt"
        memory.write_elf(snap, str(ours))
    assert_same_core(ours, dump)
    assert volatility_finds(ours, "elf") == [LOW_MARK]


def test_a_shared_block_comes_from_its_backing_file(qemu: str, tmp_path: Path, run: Any) -> None:
    """x-ignore-shared leaves a shared block's pages out of the stream: the ELF is refused
    naming the block, and made from the backing file given with --block-file."""
    ram = tmp_path / "ram.img"
    ram.write_bytes(bytes(64 << 20))
    args = ["-M", "pc-i440fx-7.2,memory-backend=pc.ram", "-m", "64M",
            "-object", f"memory-backend-file,id=pc.ram,size=64M,mem-path={ram},share=on",
            *marker_args(tmp_path, LOW_MARK)]  # fmt: skip
    stream, dump = tmp_path / "vm.mig", tmp_path / "qemu.core"
    with qmp.Qemu(binary=qemu, args=["-display", "none", *args]) as vm:
        vm.command("dump-guest-memory", paging=False, protocol=f"file:{dump}")
        vm.command("migrate-set-capabilities",
                   capabilities=[{"capability": "x-ignore-shared", "state": True}])  # fmt: skip
        vm.save(str(stream))
    core = tmp_path / "snapfmt.core"
    refused = run("memory", stream, "--elf", core)
    assert refused.code == 2 and not core.exists()
    assert "RAM block pc.ram: no page of it is in the stream" in refused.err
    assert "--block-file pc.ram=FILE" in refused.err
    assert run("memory", stream, "--elf", core, "--block-file", f"pc.ram={ram}", "-q").code == 0
    assert_same_core(core, dump)
    # extract and convert likewise: refused, then made from the backing file
    out = tmp_path / "pc.ram.bin"
    refused = run("extract", stream, "pc.ram", "-o", out)
    assert refused.code == 2 and "no page of it is in the stream" in refused.err
    assert run("extract", stream, "pc.ram", "-o", out, "--block-file", f"pc.ram={ram}").code == 0
    assert out.read_bytes() == ram.read_bytes()
    native = tmp_path / "vm.snap"
    assert run("convert", stream, native, "--block-file", f"pc.ram={ram}", "-q").code == 0
    with snapfmt.open(native) as snap:
        block = next(b for b in snap.ram_blocks() if b.qemu_idstr == "pc.ram")
        assert block.read(LOW_MARK, len(MARKER)) == MARKER
    assert run("verify", native).code == 0
    wrong = run("convert", stream, tmp_path / "x.snap", "--block-file", f"pc.bios={ram}")
    assert wrong.code == 2 and "is in the file: --block-file is for a block" in wrong.err
