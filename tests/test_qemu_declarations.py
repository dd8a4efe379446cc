"""formats/qemu.py declares QEMU's structures; the reader walks streams by hand (a
window and struct on the hot path).  These tests hold the declarations to the reader on
real QEMU 7.2 streams, so the two cannot drift apart."""

from __future__ import annotations

import pytest

import snapfmt
from snapfmt.formats import qemu as qf
from tests.helpers import SAMPLES


@pytest.mark.parametrize("name", ["pc", "q35"])
def test_declarations_parse_what_the_reader_read(name: str) -> None:
    path = SAMPLES / "qemu" / f"{name}.mig"
    data = path.read_bytes()
    with snapfmt.open(path) as stream:
        header = qf.FileHeader.parse(data)
        assert header.version == qf.VERSION
        assert data[8] == qf.SectionType.CONFIGURATION
        config = qf.ConfigurationHead.parse(data[9:])
        assert config.name.decode() == stream.configuration.machine
        records = stream._order  # type: ignore[attr-defined]
        for record in records:
            start = qf.SectionStartFull.parse(data[record.header_offset + 1 :])
            assert (start.section_id, start.idstr, start.instance_id, start.version_id) == (
                record.section_id, record.idstr, record.instance_id, record.version_id)  # fmt: skip
            if record.idstr == "ram":
                continue
            offset, length = record.spans[-1]
            footer = qf.SectionFooter.parse(data[offset + length :])
            assert footer.section_id == record.section_id
        ram = next(r for r in records if r.idstr == "ram")
        payload = ram.spans[0][0]
        first = qf.RamRecordHead.parse(data[payload:])
        assert first.word & qf.RamFlag.MEM_SIZE
        total = first.word & ~0xFFF
        at, seen = payload + 8, 0
        blocks = stream._blocks  # type: ignore[attr-defined]
        while seen < total:
            entry = qf.MemSizeEntry.parse(data[at:])
            assert blocks[entry.idstr].length == entry.used_length
            seen += entry.used_length
            at += len(qf.MemSizeEntry.build(entry))
        assert len(blocks) > 3
        eof = data.rindex(b'{"page_size"') - 6
        assert data[eof] == qf.SectionType.EOF and data[eof + 1] == qf.SectionType.VMDESCRIPTION
        assert qf.VmDescriptionHead.parse(data[eof + 2 :]).length == len(data) - eof - 6


def test_hot_path_structs_equal_their_declarations() -> None:
    assert qf.RAM_WORD.size == qf.RamRecordHead.sizeof()
    values = (1, 4096, 0x1000, 0x100000)
    packed = qf.MAPPED_RAM_HEADER.pack(*values)
    parsed = qf.MappedRamHeader.parse(packed)
    assert (parsed.version, parsed.page_size, parsed.bitmap_offset, parsed.pages_offset) == values
    assert qf.MappedRamHeader.sizeof() == qf.MAPPED_RAM_HEADER.size == 28
    command = qf.CommandHead.build({"command": qf.Command.PACKAGED, "length": 4})
    assert command == b"\x00\x07\x00\x04"
    assert qf.XbzrleHead.sizeof() == 3
