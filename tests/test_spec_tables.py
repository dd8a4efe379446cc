"""spec/format.md is normative: its tables must agree with the construct declarations."""

from __future__ import annotations

import re
from pathlib import Path

import construct as c
import pytest

from snapfmt.formats import native as nf

SPEC = Path(__file__).resolve().parent.parent / "spec" / "format.md"
NAMES = {id(con): name for name, con in nf.STRUCTURES.items()}
INTS = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}


def _int(con: c.Construct) -> str:
    assert isinstance(con, c.FormatField) and con.fmtstr.startswith("<"), con
    return INTS[con.length]


def describe(con: c.Construct) -> str:
    """The spec's notation for one field's type (spec/format.md §1)."""
    if id(con) in NAMES:
        return NAMES[id(con)]
    if isinstance(con, c.FormatField):
        return _int(con)
    if isinstance(con, c.Const):
        return f"const[{len(con.value)}]"
    if isinstance(con, c.Bytes):
        return f"bytes[{con.length}]"
    if isinstance(con, c.RawCopy):
        return describe(con.subcon)
    if isinstance(con, c.Checksum):
        return describe(con.checksumfield)
    if isinstance(con, c.StringEncoded):  # PascalString
        return "str" + _int(con.subcon.lengthfield)[1:]
    if isinstance(con, c.FocusedSeq) and [s.name for s in con.subcons] == ["count", "items"]:
        count, items = con.subcons  # how construct spells PrefixedArray
        return f"{describe(items.subcon.subcon)}[{_int(count.subcon.subcon)}]"
    if isinstance(con, c.Array):
        count = re.findall(r"\w+", repr(con.count))[
            -1
        ]  # this['head']['chunk_count'] -> chunk_count
        return f"{describe(con.subcon)}[{count}]"
    raise AssertionError(f"no spec notation for {con!r}")


def size(con: c.Construct) -> str:
    try:
        return str(con.sizeof())
    except c.SizeofError:
        return "var"


def spec_tables() -> dict[str, list[tuple[str, str, str]]]:
    tables: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in SPEC.read_text().splitlines():
        heading = re.match(r"^### (\w+)$", line)
        if heading:
            current = heading.group(1)
            continue
        if current and line.startswith("| ") and not line.startswith("| field "):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            tables.setdefault(current, []).append((cells[0], cells[1], cells[2]))
        elif current and tables.get(current) and not line.startswith("|"):
            current = None
    return tables


TABLES = spec_tables()


def test_every_declared_structure_has_a_table() -> None:
    assert sorted(TABLES) == sorted(nf.STRUCTURES)


@pytest.mark.parametrize("name", sorted(nf.STRUCTURES))
def test_table_matches_declaration(name: str) -> None:
    declared = [
        (sub.name, describe(sub.subcon), size(sub.subcon)) for sub in nf.STRUCTURES[name].subcons
    ]
    assert TABLES[name] == declared


def test_fixed_sizes() -> None:
    assert nf.Header.sizeof() == nf.HEADER_SIZE
    assert nf.Footer.sizeof() == nf.FOOTER_SIZE
    assert nf.ChunkEntry.sizeof() == nf.CHUNK_ENTRY.size


def test_hot_path_struct_equals_chunk_entry() -> None:
    values = (2, 1234, 0x1122334455, 0xDEADBEEFCAFEF00D)
    packed = nf.CHUNK_ENTRY.pack(*values)
    parsed = nf.ChunkEntry.parse(packed)
    assert (parsed.encoding, parsed.stored_length, parsed.offset, parsed.hash) == values
    built = nf.ChunkEntry.build(
        {
            "encoding": 2,
            "reserved": bytes(3),
            "stored_length": 1234,
            "offset": 0x1122334455,
            "hash": 0xDEADBEEFCAFEF00D,
        }
    )
    assert built == packed


SAMPLES = {
    "Configuration": {"machine": "pc", "page_size": 4096, "capabilities": ["a"], "metadata": "{}"},
    "Metadata": {"document": "[1]"},
    "IndexEntry": {
        "kind": 2,
        "flags": 0,
        "reserved": 0,
        "offset": 64,
        "length": 9,
        "checksum": 5,
        "data_offset": 0,
        "data_length": 0,
        "size": 1,
        "key": "/a@b",
    },
    "RamBlockDescriptor": {
        "head": {
            "path": "/pc.ram",
            "qemu_idstr": "pc.ram",
            "length": 8192,
            "page_size": 4096,
            "chunk_size": 4096,
            "chunk_count": 2,
        },
        "chunks": [
            {"encoding": e, "reserved": bytes(3), "stored_length": 9, "offset": 64, "hash": 7}
            for e in (1, 2)
        ],
    },
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_build_parse_symmetry(name: str) -> None:
    """Construct's own test habit: build(parse(build(x))) == build(x); sizes agree."""
    con = nf.STRUCTURES[name]
    data = con.build(SAMPLES[name])
    assert con.build(con.parse(data)) == data
    if size(con) != "var":
        assert len(data) == con.sizeof()


def test_section_citations_name_the_spec_sections() -> None:
    """formats/native.py cites spec/format.md as '§N Title': N and Title must be one of
    the spec's numbered sections."""
    headings = dict(re.findall(r"^## (\d+)\. (.+)$", SPEC.read_text(), re.M))
    source = (Path(nf.__file__)).read_text()
    cited = re.findall(r"§(\d+) ([A-Z][a-z]+(?: [a-z]+)*)", source)
    assert cited
    for number, title in cited:
        assert headings.get(number, "").startswith(title), (number, title)
