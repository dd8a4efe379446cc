"""QEMU migration streams written by real QEMU 7.2 (samples/qemu/)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import snapfmt
from snapfmt.errors import SnapfmtError
from snapfmt.formats import qemu as qf
from snapfmt.paths import Path as DevPath
from snapfmt.qemu.paths import PathMapper
from tests.helpers import SAMPLES, Run

QEMU = SAMPLES / "qemu"
_spec = importlib.util.spec_from_file_location("make_qemu_samples", QEMU / "make_qemu_samples.py")
assert _spec and _spec.loader
make_qemu_samples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_qemu_samples)

E1000 = "/i440FX-pcihost/pci.0/e1000@05.0"


@pytest.mark.parametrize("name", ["pc", "q35"])
def test_guest_ram_is_read_exactly(name: str) -> None:
    with snapfmt.open(QEMU / f"{name}.mig") as stream:
        block = stream.ram_block(stream.select_one("/pc.ram"))
        assert block.length == 16 << 20
        assert block.read(0, block.length) == make_qemu_samples.ram_image()
        assert block.read(0x100000, 29) == b"snapfmt sample page at 1 MiB."


@pytest.mark.parametrize("name", ["pc", "q35"])
def test_every_device_decodes_through_the_vmdesc(name: str, run: Run) -> None:
    with snapfmt.open(QEMU / f"{name}.mig") as stream:
        assert stream.format_name == "qemu"
        devices = list(stream.devices())
        assert len(devices) > 30
        for device in devices:
            assert device.layout is not None, device.path
            fields = device.fields()  # raises unless the layout covers every byte
            assert sum(f.size for f in fields) <= len(device.data)
    assert run("verify", QEMU / f"{name}.mig").code == 0


def test_paths_of_the_pc_sample() -> None:
    with snapfmt.open(QEMU / "pc.mig") as stream:
        paths = {str(p) for p in stream.section_paths()}
        configuration = stream.configuration
    assert configuration.machine == "pc-i440fx-7.2" and configuration.page_size == 4096
    for expected in [
        f"{E1000}/vmstate",
        f"{E1000}/rom",  # the option ROM shares the device node with the state
        "/i440FX-pcihost/pci.0/virtio-net-pci@06.0/vmstate",
        "/i440FX-pcihost/pci.0/lsi53c895a@07.0/vmstate",
        "/i440FX-pcihost/pci.0/pci-bridge@08.0/vmstate",
        "/i440FX-pcihost/pci.0/pci-bridge@08.0/pci/e1000@03.0/vmstate",
        "/cpu@0/cpu",
        "/cpu@1/apic",
        "/timer/vmstate",
        "/pc.ram",
        "/pc.bios",
        "/%2From%40etc%2Facpi%2Ftables",
    ]:
        assert expected in paths


def test_qemu_identifiers_select_sections(run: Run) -> None:
    with snapfmt.open(QEMU / "pc.mig") as stream:
        assert str(stream.select_one("0000:00:05.0/e1000")) == f"{E1000}/vmstate"
        assert str(stream.select_one("0000:00:05.0/e1000.rom")) == f"{E1000}/rom"
        assert str(stream.select_one("0000:00:08.0:03.0/e1000")).endswith("pci/e1000@03.0/vmstate")
        assert str(stream.select_one("/rom@etc/acpi/tables")) == "/%2From%40etc%2Facpi%2Ftables"
    result = run("dump", QEMU / "pc.mig", "0000:00:07.0/lsiscsi", "--json")
    section = json.loads(result.out)["sections"][0]
    assert section["qemu_id"] == "0000:00:07.0/lsiscsi" and section["driver"] == "lsi53c895a"
    assert section["fields"][0]["name"].startswith("parent_obj.")


def test_mapping_function() -> None:
    mapper = PathMapper(
        "pc-q35-7.2",
        [
            ("0000:00:1f.0/ICH9LPC", 0),
            ("0000:00:02.0:00.0/virtio-net", 0),
            ("cpu", 0),
            ("cpu", 1),
            ("dma", 0),
            ("dma", 1),
            ("timer", 0),
        ],
    )
    assert (
        str(mapper.section("0000:00:1f.0/ICH9LPC", 0))
        == "/q35-pcihost/pcie.0/ICH9-LPC@1f.0/vmstate"
    )
    assert (
        str(mapper.section("0000:00:02.0:00.0/virtio-net", 0))
        == "/q35-pcihost/pcie.0/pci-bridge@02.0/pci/virtio-net-pci@00.0/vmstate"
    )
    assert str(mapper.section("cpu", 1)) == "/cpu@1/cpu"
    assert str(mapper.section("dma", 1)) == "/dma@1/vmstate"
    assert str(mapper.section("timer", 0)) == "/timer/vmstate"
    assert str(mapper.ram_block("0000:00:03.0/mem0")) == "/q35-pcihost/pcie.0/mem0@03.0/mem0"
    assert str(mapper.ram_block("/rom@etc/acpi/rsdp")) == "/%2From%40etc%2Facpi%2Frsdp"


def test_stream_without_vmdesc_still_reads(tmp_path: Path, run: Run) -> None:
    data = (QEMU / "pc.mig").read_bytes()
    cut = data.rindex(b"\x00\x06" + (len(data) - data.rindex(b'{"page_size"')).to_bytes(4, "big"))
    target = tmp_path / "novmdesc.mig"
    target.write_bytes(data[: cut + 1])  # up to and including EOF
    with snapfmt.open(target) as bare, snapfmt.open(QEMU / "pc.mig") as full:
        assert bare.layout.vmdesc is None
        assert [s.key for s in bare.sections] == [s.key for s in full.sections]
        path = DevPath.parse(f"{E1000}/vmstate")
        assert bare.device(path).data == full.device(path).data
        assert bare.device(path).layout is None
        ram = bare.ram_block(DevPath.of("pc.ram"))
        assert ram.read(0x800000, 256) == bytes(range(256))
    result = run("dump", target, "lsi53c895a")
    assert result.code == 0 and "  0x" in result.out  # shown as hex


def test_broken_footer_names_the_section(tmp_path: Path, run: Run) -> None:
    data = bytearray((QEMU / "pc.mig").read_bytes())
    with snapfmt.open(QEMU / "pc.mig") as stream:
        record = stream.section_record(DevPath.parse(f"{E1000}/vmstate"))
        start, length = record.spans[0]
    data[start + length] = 0x7F  # the footer marker after the e1000 payload
    target = tmp_path / "broken.mig"
    target.write_bytes(data)
    result = run("dump", target)
    assert result.code == 2
    assert (
        result.err
        == f"snapfmt: error: {target}: offset {start:#x}: 0000:00:05.0/e1000: missing section footer, expected 7e {record.section_id:08x} after the payload\n"
    )
    salvaged = run("info", target)  # what came before, and the section it took
    assert (
        salvaged.code == 1 and "lost section 0000:00:05.0/e1000: cut before its end" in salvaged.out
    )


def test_raised_section_version_is_reported(tmp_path: Path, run: Run) -> None:
    data = bytearray((QEMU / "pc.mig").read_bytes())
    with snapfmt.open(QEMU / "pc.mig") as stream:
        record = stream.section_record(DevPath.parse(f"{E1000}/vmstate"))
    version_at = record.header_offset + 1 + 4 + 1 + len(record.idstr) + 4
    assert int.from_bytes(data[version_at : version_at + 4], "big") == 2
    data[version_at : version_at + 4] = (3).to_bytes(4, "big")
    target = tmp_path / "raised.mig"
    target.write_bytes(data)
    result = run("verify", target)
    assert result.code == 1
    assert (
        f"BAD  {E1000}/vmstate (0000:00:05.0/e1000 instance 0): section version 3 differs from the vmdesc's 2"
        in result.out
    )


@pytest.mark.parametrize("k", range(1, 64, 3))
def test_truncated_streams_are_one_line_errors(tmp_path: Path, run: Run, k: int) -> None:
    data = (QEMU / "q35.mig").read_bytes()
    target = tmp_path / "cut.mig"
    target.write_bytes(data[: len(data) * k // 64])
    result = run("dump", target)  # (info and verify salvage: tests/test_salvage.py)
    assert (
        result.code == 2
        and result.err.startswith(f"snapfmt: error: {target}: ")
        and result.err.count("\n") == 1
    )


def test_extract_all_keeps_block_names_inside(tmp_path: Path, run: Run) -> None:
    out = tmp_path / "out"
    assert run("extract", QEMU / "pc.mig", "--all", "-d", out).code == 0
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert "sections/%2From%40etc%2Facpi%2Ftables.bin" in files
    assert (out / "sections" / "pc.ram.bin").read_bytes() == make_qemu_samples.ram_image()
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))


def test_unsupported_records_are_clear(tmp_path: Path) -> None:
    data = bytearray((QEMU / "q35.mig").read_bytes())
    at = data.index(b"\x06pc.ram") - 8  # the first record naming pc.ram
    word = int.from_bytes(data[at : at + 8], "big")
    data[at : at + 8] = (word & ~0xFFF | 0x80).to_bytes(8, "big")  # HOOK (RDMA)
    target = tmp_path / "hook.mig"
    target.write_bytes(data)
    with pytest.raises(
        SnapfmtError, match=rf"offset {at:#x}: ram: RAM records of kind HOOK are not supported"
    ):
        snapfmt.open(target)


def _mapped_ram_stream(present: dict[int, bytes], pages: int = 4) -> bytes:
    """A stream laid out as QEMU's mapped-ram writes it (shared/reference §6): QEMU 7.2
    cannot write one, so this follows the documented layout."""
    out = bytearray(b"QEVM" + (3).to_bytes(4, "big"))
    out += b"\x07" + (10).to_bytes(4, "big") + b"pc-q35-9.2"
    out += b"\x05" + bytes([26]) + b"configuration/capabilities" + (1).to_bytes(4, "big")
    out += (1).to_bytes(4, "big") + bytes([10]) + b"mapped-ram"
    out += (
        b"\x01"
        + (2).to_bytes(4, "big")
        + bytes([3])
        + b"ram"
        + (0).to_bytes(4, "big")
        + (4).to_bytes(4, "big")
    )
    length = pages * 4096
    out += (length | 0x04).to_bytes(8, "big") + bytes([6]) + b"pc.ram" + length.to_bytes(8, "big")
    bitmap_offset = len(out) + 28
    pages_offset = -(-(bitmap_offset + 8) // (1 << 20)) * (1 << 20)
    out += (
        (1).to_bytes(4, "big")
        + (4096).to_bytes(8, "big")
        + bitmap_offset.to_bytes(8, "big")
        + pages_offset.to_bytes(8, "big")
    )
    bits = sum(1 << i for i in present)
    out += bits.to_bytes(8, "little")
    out += bytes(pages_offset - len(out))
    for i in range(pages):
        out += present.get(i, bytes(4096))
    out += (0x10).to_bytes(8, "big") + b"\x7e" + (2).to_bytes(4, "big")  # EOS, footer
    out += b"\x00"  # EOF
    return bytes(out)


def test_mapped_ram_layout(tmp_path: Path) -> None:
    target = tmp_path / "mapped.mig"
    target.write_bytes(_mapped_ram_stream({0: b"A" * 4096, 2: b"C" * 4096}))
    with snapfmt.open(target) as stream:
        assert stream.configuration.capabilities == ("mapped-ram",)
        block = stream.ram_block(DevPath.of("pc.ram"))
        assert block.read(0, 4 * 4096) == b"A" * 4096 + bytes(4096) + b"C" * 4096 + bytes(4096)
        assert block.summary() == (4, 2, 8192)


def test_hostile_ram_declaration_is_refused(tmp_path: Path) -> None:
    data = bytearray((QEMU / "q35.mig").read_bytes())
    total_at = data.index(b"\x03ram") + 4 + 8  # the MEM_SIZE word of the RAM section
    length_at = data.index(b"\x06pc.ram", total_at) + 7  # pc.ram's length in the block list
    grow = (1 << 50) - int.from_bytes(data[length_at : length_at + 8], "big")
    total = (int.from_bytes(data[total_at : total_at + 8], "big") & ~0xFFF) + grow
    data[total_at : total_at + 8] = (total | 0x04).to_bytes(8, "big")
    data[length_at : length_at + 8] = (1 << 50).to_bytes(8, "big")
    target = tmp_path / "huge.mig"
    target.write_bytes(data)
    with pytest.raises(
        SnapfmtError, match=r"RAM block pc\.ram declares more RAM than the stream could hold"
    ):
        snapfmt.open(target)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from snapfmt.ops.inspect import dump  # noqa: E402
from snapfmt.ops.verify import verify  # noqa: E402

_Q35 = (QEMU / "q35.mig").read_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(0, len(_Q35) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(_Q35)))  # fmt: skip
def test_mutated_streams_raise_only_snapfmt_errors(
    tmp_path: Path, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_Q35)
    for at, value in edits:
        data[at] = value
    target = tmp_path / "mutated.mig"
    target.write_bytes(bytes(data[: max(cut, len(data) // 2)]))
    try:
        with snapfmt.open(target) as stream:
            dump(stream)
            verify(stream)
            for block in stream.ram_blocks():
                block.read(0, min(block.length, 1 << 16))
    except SnapfmtError:
        pass


def test_packaged_stream(tmp_path: Path) -> None:
    """Postcopy sends device state as a PACKAGED command holding sections up to an EOF;
    built here from the q35 sample (QEMU writes this only to a live destination)."""
    data = (QEMU / "q35.mig").read_bytes()
    with snapfmt.open(QEMU / "q35.mig") as stream:
        records = stream.layout.sections  # type: ignore[attr-defined]
        first_device = next(r for r in records if r.idstr != "ram").header_offset
    eof = data.rindex(b'{"page_size"') - 6  # EOF, then 0x06 and the vmdesc length
    assert data[eof] == 0 and data[eof + 1] == 6
    package = data[first_device : eof + 1]  # device sections and the EOF
    command = (
        b"\x08" + (7).to_bytes(2, "big") + (4).to_bytes(2, "big") + len(package).to_bytes(4, "big")
    )
    target = tmp_path / "packaged.mig"
    target.write_bytes(data[:first_device] + command + package + b"\x00")
    with snapfmt.open(target) as packaged, snapfmt.open(QEMU / "q35.mig") as plain:
        assert [s.key for s in packaged.sections] == [s.key for s in plain.sections]
        path = DevPath.parse("/q35-pcihost/pcie.0/e1000@05.0/vmstate")
        assert packaged.device(path).data == plain.device(path).data


def test_devices_on_buses_below_pci_devices() -> None:
    mapper = PathMapper(
        "pc-i440fx-7.2",
        [
            ("0000:00:0a.0/1/usb-ptr", 0),
            ("0000:00:0a.0/uhci", 0),
            ("0000:00:07.0/0:0:0/scsi-disk", 0),
        ],
    )
    assert (
        str(mapper.section("0000:00:0a.0/1/usb-ptr", 0))
        == "/i440FX-pcihost/pci.0/uhci@0a.0/usb-ptr@1/vmstate"
    )
    assert str(mapper.section("0000:00:0a.0/uhci", 0)) == "/i440FX-pcihost/pci.0/uhci@0a.0/vmstate"
    assert (
        str(mapper.section("0000:00:07.0/0:0:0/scsi-disk", 0))
        == "/i440FX-pcihost/pci.0/pci-device@07.0/scsi-disk@0:0:0/vmstate"
    )


def test_colliding_identities_are_kept_apart(tmp_path: Path) -> None:
    """A second ROM block on the e1000 would map to its `rom` path too: it gets the
    fallback path, and both stay readable."""
    data = (QEMU / "q35.mig").read_bytes()
    assert data.count(b"\x07pc.bios") == 2  # in the block list, and naming its first page
    target = tmp_path / "two.mig"
    target.write_bytes(data.replace(b"\x07pc.bios", b"\x120000:00:05.0/x.rom"))
    with snapfmt.open(target) as stream, snapfmt.open(QEMU / "q35.mig") as plain:
        paths = {str(p) for p in stream.section_paths()}
        assert "/q35-pcihost/pcie.0/e1000@05.0/rom" in paths  # the first block in the list
        assert "/ram/0000:00:05.0%2Fe1000.rom" in paths  # the other: its QEMU name, unmapped
        rom = stream.ram_block(stream.select_one("0000:00:05.0/e1000.rom"))
        original = plain.ram_block(plain.select_one("0000:00:05.0/e1000.rom"))
        assert rom.read(0, rom.length) == original.read(0, original.length)
        moved = stream.ram_block(stream.select_one("0000:00:05.0/x.rom"))
        bios = plain.ram_block(plain.select_one("pc.bios"))
        assert moved.read(0, moved.length) == bios.read(0, bios.length)


def test_packaged_stream_as_postcopy_writes_it(tmp_path: Path) -> None:
    """QEMU's postcopy_start packages LISTEN, the device sections, PING and RUN, with no
    EOF inside; the outer stream then ends with its own EOF."""
    data = (QEMU / "q35.mig").read_bytes()
    with snapfmt.open(QEMU / "q35.mig") as stream:
        first_device = next(r for r in stream.layout.sections if r.idstr != "ram").header_offset  # type: ignore[attr-defined]
    eof = data.rindex(b'{"page_size"') - 6

    def command(number: int, payload: bytes = b"") -> bytes:
        return b"\x08" + number.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload

    package = command(4) + data[first_device:eof] + command(2, (3).to_bytes(4, "big")) + command(5)
    target = tmp_path / "postcopy.mig"
    target.write_bytes(
        data[:first_device] + command(7, len(package).to_bytes(4, "big")) + package + b"\x00"
    )
    with snapfmt.open(target) as packaged, snapfmt.open(QEMU / "q35.mig") as plain:
        assert [s.key for s in packaged.sections] == [s.key for s in plain.sections]
        commands = [c for _, c in packaged.layout.commands]  # type: ignore[attr-defined]
        assert commands == [7, 4, 2, 5]


def test_postcopy_block_list_gives_huge_page_sizes(tmp_path: Path, run: Run) -> None:
    """pc-postcopy.mig: saved with postcopy-ram on, pc.ram in 2 MiB huge pages, so its
    entry in the block list carries a page size (the other blocks' do not)."""
    with snapfmt.open(QEMU / "pc-postcopy.mig") as stream:
        assert qf.Command.POSTCOPY_ADVISE in [c for _, c in stream.layout.commands]  # type: ignore[attr-defined]
        sizes = {b.qemu_idstr: b.host_page_size for b in stream.ram_blocks()}
        assert sizes["pc.ram"] == 2 << 20
        assert {v for k, v in sizes.items() if k != "pc.ram"} == {None}
        ram = stream.ram_block(stream.select_one("/pc.ram"))
        image = bytearray(16 << 20)
        image[0x100000:0x101000] = make_qemu_samples.POSTCOPY_TEXT
        assert ram.read(0, ram.length) == bytes(image)
        assert len(stream.sections) == 36
    native, back = tmp_path / "p.snap", tmp_path / "p.mig"
    assert run("convert", QEMU / "pc-postcopy.mig", native).code == 0
    assert run("convert", native, back, "--to", "qemu").code == 0
    assert run("diff", QEMU / "pc-postcopy.mig", back).code == 0
    shown = run("dump", QEMU / "pc-postcopy.mig", "pc.ram").out
    assert shown.rstrip().endswith("4.0 KiB stored; host pages of 2.0 MiB")


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (6, "offset 0x0: stream ends inside QEMU stream header (version): found 6 bytes left"),
        (11, "offset 0x9: stream ends inside configuration (name): found 2 bytes left"),
        (31, "offset 0x1b: stream ends inside section header (idstr): found 4 bytes left"),
        (223, "offset 0xde: stream ends inside section footer (section_id): found 1 bytes left"),
    ],
)
def test_a_cut_stream_says_where_it_ends(tmp_path: Path, cut: int, message: str) -> None:
    target = tmp_path / "cut.mig"
    target.write_bytes((QEMU / "pc.mig").read_bytes()[:cut])
    with pytest.raises(SnapfmtError) as caught:
        snapfmt.open(target)
    assert str(caught.value) == f"{target}: {message}"


def test_a_long_capability_list_is_read_whole(tmp_path: Path) -> None:
    """Structures larger than the cursor's first window are parsed from a larger one."""
    data = (QEMU / "pc.mig").read_bytes()
    names = [f"cap-{i:03d}-" + "x" * 240 for i in range(300)]  # about 75 KiB
    caps = qf.Subsection.build({"name": "configuration/capabilities", "version_id": 1})
    caps += qf.Capabilities.build({"names": names})
    head = 9 + len(qf.Configuration.build({"name": "pc-i440fx-7.2"}))
    target = tmp_path / "caps.mig"
    target.write_bytes(data[:head] + caps + data[head:])
    with snapfmt.open(target) as stream:
        assert list(stream.configuration.capabilities) == names


def test_a_ram_block_kept_past_close_fails(tmp_path: Path) -> None:
    import os

    stream = snapfmt.open(QEMU / "pc.mig")
    block = stream.ram_block(stream.select_one("/pc.ram"))
    sent = next(i for i, where in enumerate(block.pages) if where > 0)  # type: ignore[attr-defined]
    stream.close()
    other = os.open(QEMU / "q35.mig", os.O_RDONLY)  # may take the stream's descriptor number
    try:
        with pytest.raises(OSError):
            block.read(sent * block.page_size, 16)
    finally:
        os.close(other)


def test_a_block_whose_pages_never_came_is_not_read_as_zeros(tmp_path: Path, run: Run) -> None:
    """A stream declaring a 4 PiB block it never sends (as x-ignore-shared does for a
    shared block): shown as not in the file, refused by extract and convert at once, not
    compared by diff; nothing is written."""
    from tests.test_qemu_ram_walk import build

    target = tmp_path / "huge.mig"
    target.write_bytes(build({"pc.ram": 4, "big": 1 << 40}, [[("pc.ram", 0, 1)]]))
    dump = json.loads(run("dump", target, "--json").out)
    big = next(s for s in dump["sections"] if s["path"] == "/big")
    assert big["missing"].startswith("no page of it is in the stream")
    assert "contents not in the file" in run("dump", target).out
    for args in (["extract", target, "--all", "-d", tmp_path / "out"],
                 ["extract", target, "/big", "-o", tmp_path / "big.bin"],
                 ["convert", target, tmp_path / "x.snap"]):  # fmt: skip
        result = run(*args)
        assert result.code == 2 and "RAM block /big: no page of it is in the stream" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.mig"]
    assert run("diff", target, target).code == 0
