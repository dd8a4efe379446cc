from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapfmt import vmstate
from snapfmt.errors import LayoutError
from snapfmt.vmstate import decode, encode_fields, encode_value

LAYOUT = {
    "fields": [
        {"name": "a", "type": "int16", "size": 2},
        {"name": "b", "type": "int32 le", "size": 4},
        {"name": "flag", "type": "bool", "size": 1},
        {
            "name": "s",
            "type": "struct",
            "size": 3,
            "struct": {"fields": [{"name": "x", "type": "uint8", "size": 1, "array_len": 3}]},
        },
        {"name": "t", "type": "timer", "size": 8},
        {"name": "n", "type": "uint32 equal", "size": 4},
    ],
    "subsections": [
        {
            "vmsd_name": "dev/extra",
            "version": 1,
            "fields": [{"name": "z", "type": "uint16", "size": 2}],
        }
    ],
}
DATA = (
    bytes.fromhex("fffe")
    + (-5).to_bytes(4, "big", signed=True)
    + b"\x01"
    + b"\x07\x08\x09"
    + bytes(range(8))
    + bytes.fromhex("0000002a")
    + b"\x05\x09dev/extra"
    + (1).to_bytes(4, "big")
    + bytes.fromhex("1234")
)


def test_decode_all_kinds() -> None:
    fields = decode(LAYOUT, DATA, base_offset=0x100)
    assert [(f.name, f.offset, f.value) for f in fields] == [
        ("a", 0x100, -2),
        ("b", 0x102, -5),
        ("flag", 0x106, True),
        ("s.x[0]", 0x107, 7),
        ("s.x[1]", 0x108, 8),
        ("s.x[2]", 0x109, 9),
        ("t", 0x10A, bytes(range(8))),
        ("n", 0x112, 42),
        ("dev/extra:z", 0x116 + 15, 0x1234),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (DATA[:-1], r"state ends at 38 bytes but field dev/extra:z needs 2 bytes at 37"),
        (DATA + b"\x00", r"layout describes 39 bytes, state has 40"),
        (
            DATA[:22] + b"\x06" + DATA[23:],
            r"expected subsection 'dev/extra' marker 0x05 at 22, found 0x06",
        ),
        (DATA[:24] + b"X" + DATA[25:], r"expected subsection 'dev/extra' at 22, found 'Xev/extra'"),
    ],
)
def test_decode_errors(data: bytes, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        decode(LAYOUT, data)


def test_struct_size_must_match() -> None:
    layout = {
        "fields": [
            {
                "name": "s",
                "type": "struct",
                "size": 4,
                "struct": {"fields": [{"name": "x", "type": "uint8", "size": 1}]},
            }
        ]
    }
    with pytest.raises(LayoutError, match="struct s decoded 1 bytes, its size says 4"):
        decode(layout, b"\x01")


@pytest.mark.parametrize(
    "bad",
    [
        {"fields": "x"},
        {"fields": [{"name": 1}]},
        {"fields": [{"name": "a", "type": "uint8", "size": 1, "array_len": -1}]},
        {"subsections": [1]},
    ],
)
def test_malformed_layouts(bad: dict[str, object]) -> None:
    with pytest.raises(LayoutError):
        decode(bad, b"\x00")


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["int8", "uint16", "int32", "uint64", "int32 le", "bool"]),
            st.integers(-(2**63), 2**64 - 1),
            st.integers(1, 3),
            st.booleans(),
        ),
        max_size=6,
    )
)
def test_encode_decode_symmetry(spec: list[tuple[str, int, int, bool]]) -> None:
    items = []
    for i, (type_name, number, count, is_array) in enumerate(spec):
        try:
            encode_value(type_name, number)
        except LayoutError:
            continue
        value = bool(number % 2) if type_name == "bool" else number
        items.append(
            {"name": f"f{i}", "type": type_name, "value": [value] * count if is_array else value}
        )
    layout, data = encode_fields(items)
    decoded = decode(layout, data)
    flat = [
        v
        for item in items
        for v in (item["value"] if isinstance(item["value"], list) else [item["value"]])
    ]
    assert [f.value for f in decoded] == flat


_TYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "bool", "int32 le", "uint64 equal", "buffer", "timer"]  # fmt: skip


@given(
    st.lists(
        st.tuples(
            st.sampled_from(_TYPES),
            st.sampled_from([0, 1, 2, 4, 8, 3]),
            st.one_of(st.none(), st.integers(0, 40)),
        ),
        min_size=1,
        max_size=6,
    ),
    st.binary(max_size=600),
)
def test_arrays_taken_at_once_decode_as_element_by_element(
    fields: list[tuple[str, int, int | None]], data: bytes
) -> None:
    """Arrays of scalars are taken in one piece (``_Cursor.fits``); the result, and any
    error, must be what the element-by-element path gives."""
    layout = {"fields": [], "subsections": []}
    for i, (type_name, size, count) in enumerate(fields):
        entry: dict[str, object] = {"name": f"f{i}", "type": type_name, "size": size}
        if count is not None:
            entry["array_len"] = count
        layout["fields"].append(entry)  # type: ignore[attr-defined]

    def outcome() -> object:
        try:
            return decode(layout, data, 0x100)
        except LayoutError as e:
            return str(e)

    fast = outcome()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vmstate._Cursor, "fits", lambda self, elements, size: False)
        slow = outcome()
    assert fast == slow


def test_the_unindexed_last_element_of_a_struct_array_is_named_by_position() -> None:
    """QEMU 10.0 writes ``bmdma`` (index 0) then ``bmdma`` with no index for a 2-array;
    7.2 writes index 1: both name the second element ``bmdma[1]``."""
    element = {"fields": [{"name": "cmd", "type": "uint8", "size": 1}]}
    first = {"name": "bmdma", "index": 0, "type": "struct", "size": 1, "struct": element}
    for second_index in ({}, {"index": 1}):
        second = {"name": "bmdma", "type": "struct", "size": 1, "struct": element}
        other = {"name": "bus", "type": "struct", "size": 1, "struct": element}
        layout = {"fields": [first, second | second_index, other]}
        names = [f.name for f in decode(layout, b"\x01\x02\x03")]
        assert names == ["bmdma[0].cmd", "bmdma[1].cmd", "bus.cmd"]
