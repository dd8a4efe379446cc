"""snapfmt.state: virtio state decoded, names made one per field, values interpreted, on
the real QEMU 7.2 and 10.0 samples and on damaged copies of them."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

import snapfmt
from snapfmt.formats import virtio as vf
from snapfmt.ops.diff import differing_spans
from snapfmt.render_fields import fold
from snapfmt.state import field_matches, interpret, understand, understand_fields
from snapfmt.state.located import Walk
from snapfmt.state.virtio import decode_virtio
from snapfmt.vmstate import Field
from tests.helpers import SAMPLES

DEVICE_SAMPLES = sorted((SAMPLES / "qemu").glob("devices-*.mig.zst"))
MACS = {"a": "52:54:00:12:34:56", "b": "52:54:00:12:34:57"}


def _virtio_net(path: Path) -> tuple[bytes, int]:
    with snapfmt.open(path) as snap:
        field = snap.device(snap.select_one("virtio-net-pci")).fields()[0]
    assert field.type == "virtio" and isinstance(field.value, bytes)
    return field.value, field.offset


@pytest.mark.parametrize("path", DEVICE_SAMPLES, ids=lambda p: p.name)
def test_every_device_of_a_sample_decodes_whole(path: Path) -> None:
    """Every field of every device, virtio ones included, with no byte left over: the
    fields tile each state in offset order, and what QEMU was told is where it belongs."""
    with snapfmt.open(path) as snap:
        for device in snap.devices():
            understood = understand(device)
            assert understood.notes == []
            if not understood.fields:
                continue
            at = device.data_offset
            for f in understood.fields:
                assert f.offset >= at, (device.path, f.name)
                at = f.offset + f.size
            assert at == device.data_offset + len(device.data)
            assert len({f.name for f in understood.fields}) == len(understood.fields)
        net = {f.name: f for f in understand(snap.device(snap.select_one("virtio-net-pci"))).fields}
    version, tag = path.name.split("-")[1], path.name.split("-")[2].split(".")[0]
    assert net["virtio.device.mac"].display == f"MAC {MACS[tag]}"
    assert net["virtio.num_queues"].value == 3  # rx, tx, control
    sizes = [256, 256, 64] if version == "7.2" else [1024] * 3  # (10.0: before the guest sets them)
    assert [net[f"virtio.vq[{i}].num"].value for i in range(3)] == sizes
    assert sum(name.endswith("].address") for name in net) == 4  # vectors=4 (2 * 1 + 2)
    assert net["virtio.pci.config"].display.startswith("1af4:1000 ")
    assert "virtio.virtio_pci/modern_state:vq[1023].used[1]" in net


@pytest.mark.parametrize("path", DEVICE_SAMPLES[:2], ids=lambda p: p.name)
def test_bulk_unpacking_gives_what_construct_gives_leaf_by_leaf(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, base = _virtio_net(path)
    fast = decode_virtio("virtio-net", data, base)
    monkeypatch.setattr(Walk, "bulk", False)
    assert decode_virtio("virtio-net", data, base) == fast


def test_the_declarations_parse_to_the_values_decoded() -> None:
    """construct's own parse of the transport and common part gives the same values."""
    data, base = _virtio_net(DEVICE_SAMPLES[0])
    fields = {f.name: f for f in decode_virtio("virtio-net", data, base).fields}
    params = {"express": False, "msix": 4}
    transport = vf.PciTransport.parse(data, **params)
    common_at = fields["virtio.status"].offset - base
    common = vf.Common.parse(data[common_at:], **params)
    assert transport.config == fields["virtio.pci.config"].value
    assert transport.config_vector == fields["virtio.pci.config_vector"].value
    assert common.num_queues == fields["virtio.num_queues"].value
    assert [q.num for q in common.vq] == [fields[f"virtio.vq[{i}].num"].value for i in range(3)]
    assert common.config[:6] == fields["virtio.config.mac"].value


def test_damaged_virtio_state_keeps_what_decodes() -> None:
    """Cut or flipped anywhere, the state decodes as far as it can and the rest is one
    undecoded field with a note: never an exception, never a byte lost or counted twice."""
    data, base = _virtio_net(DEVICE_SAMPLES[0])
    rng = random.Random(14)
    cuts = [0, 3, 4, 260, 300, 420, len(data) - 1, *rng.sample(range(len(data)), 40)]
    damaged = [data[:cut] for cut in cuts]
    for _ in range(40):
        at = rng.randrange(len(data))
        damaged.append(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    for sample in damaged:
        found = decode_virtio("virtio-net", sample, base)
        at = base  # fields in order, none overlapping (subsection headers lie between)
        for f in found.fields:
            assert f.offset >= at
            at = f.offset + f.size
        assert at == base + len(sample)
        if found.note is not None:
            assert found.note.startswith("decoded up to byte ")


def test_an_unknown_subsection_is_named() -> None:
    data, base = _virtio_net(DEVICE_SAMPLES[0])
    extra = b"\x05\x0cvirtio/later" + (1).to_bytes(4, "big") + b"\x01"
    found = decode_virtio("virtio-net", data + extra, base)
    assert found.note == (
        f"decoded up to byte {len(data)} of {len(data) + len(extra)}: "
        "subsection 'virtio/later' is not one snapfmt knows"
    )
    assert found.fields[-1].name == "virtio.undecoded" and found.fields[-1].value == extra


def test_a_state_cut_short_names_the_field_it_ends_in() -> None:
    data, base = _virtio_net(DEVICE_SAMPLES[0])
    found = decode_virtio("virtio-net", data[:420], base)
    assert found.note == (
        "decoded up to byte 415 of 420: virtio.device.mac at 415: the state ends inside this field"
    )
    assert found.fields[-1] == Field("virtio.undecoded", "buffer", base + 415, 5, data[415:420])


def test_a_queue_count_beyond_the_bytes_is_a_note_not_a_hang() -> None:
    data, base = _virtio_net(DEVICE_SAMPLES[0])
    fields = {f.name: f for f in decode_virtio("virtio-net", data, base).fields}
    at = fields["virtio.num_queues"].offset - base
    hostile = data[:at] + (0xFFFFFFFF).to_bytes(4, "big") + data[at + 4 :]
    found = decode_virtio("virtio-net", hostile, base)
    assert found.note is not None and "more elements than its bytes can hold" in found.note


def test_sub_arrays_are_named_by_their_start_and_repeated_names_get_a_number() -> None:
    with snapfmt.open(DEVICE_SAMPLES[0]) as snap:
        e1000 = [f.name for f in understand(snap.device(snap.select_one("e1000"))).fields]
        pit = [f.name for f in understand(snap.device(snap.select_one("i8254"))).fields]
    assert "mac_reg[RA+0]" in e1000 and "mac_reg[VFTA+127]" in e1000
    assert not any(name.startswith("mac_reg[0][") for name in e1000)
    assert pit.count("channels[0].next_transition_time") == 1
    assert "channels[0].next_transition_time#2" in pit


def test_qemu_10_names_struct_array_elements_as_7_2_does() -> None:
    names = []
    for path in DEVICE_SAMPLES[0], DEVICE_SAMPLES[2]:
        with snapfmt.open(path) as snap:
            ide = snap.device(snap.select_one("piix3-ide"))
            names.append([f.name for f in understand(ide).fields])
    assert "bmdma[1].cmd" in names[0] and "bmdma[1].cmd" in names[1]
    assert "bus[1].ifs[1].status" in names[1]


def test_the_registry_names_registers_and_addresses() -> None:
    with snapfmt.open(DEVICE_SAMPLES[0]) as snap:
        shown = {}
        for selector in ("/cpu@0/cpu", "e1000", "mc146818rtc", "globalstate"):
            for f in understand(snap.device(snap.select_one(selector))).fields:
                if f.display:
                    shown[f.name] = f.display
    assert shown["env.regs[0]"] == "RAX" and shown["env.regs[15]"] == "R15"
    assert shown["env.eip"] == "RIP"
    assert shown["env.segs[1].base"] == "CS.base"
    assert shown["env.segs[1].flags"] == "CS.flags P DPL0 code R A"
    assert shown["env.cr[0]"] == "CR0 ET NW CD"
    assert shown["mac_reg[RA+0]"] == "MAC 52:54:00:12:34:56 (valid)"
    assert shown["mac_reg[RA+1]"] == "MAC 52:54:00:12:34:56 (valid)"
    assert shown["parent_obj.config[0]"].startswith("8086:100e rev 03, class 020000")
    assert shown["cmos_data"] == "2020-01-01 00:00:00 (BCD, 24-hour)"
    assert shown["base_rtc"] == "2020-01-01 00:00:00 UTC"
    assert shown["runstate"] == "'prelaunch'"


def _field(name: str, value: int | bytes, type_name: str = "buffer") -> Field:
    return Field(name, type_name, 0, len(value) if isinstance(value, bytes) else 4, value)


def test_interpreters_on_values_qemu_did_not_write_here() -> None:
    cmos = bytearray(128)
    cmos[0:10] = bytes([59, 0, 30, 0, 0x81, 0, 7, 31, 12, 99])  # binary, 12-hour, 1 PM
    cmos[0x0B], cmos[0x32] = 0x04, 19
    m = re.match(".*", "cmos_data")
    assert m is not None
    assert interpret.rtc_cmos(m, _field("cmos_data", bytes(cmos)), {}) == (
        "1999-12-31 13:30:59 (binary, 12-hour)"
    )
    config = bytearray(256)
    config[0:4] = bytes.fromhex("f41a0010")
    config[4] = 0x07
    config[0x10:0x14] = (0xC001).to_bytes(4, "little")  # I/O at 0xc000
    config[0x18:0x20] = (0x0000_0001_FEB0_000C).to_bytes(8, "little")  # 64-bit prefetchable
    assert interpret.pci_header(m, _field("c", bytes(config)), {}) == (
        "1af4:1000 rev 00, class 000000, command 0x0007 (io mem master), "
        "BAR0 io 0xc000, BAR2 mem64 0x1feb00000"
    )
    assert interpret.mac(m, _field("x", b"\x52\x54"), {}) is None  # too short to be a MAC
    ram = b"\x52\x52\x54\x54\x00\x00\x12\x12\x34\x34\x56\x56"
    assert interpret.mac_doubled(m, _field("mem", ram + bytes(4)), {}) == (
        "PROM MAC 52:54:00:12:34:56"
    )
    understood = understand_fields("cpu", [_field("env.efer", 0x500, "uint64")])
    assert understood.fields[0].display == "EFER LME LMA"


def _fields(*named: tuple[str, object]) -> list[Field]:
    return [Field(n, "uint32", i * 4, 4, v) for i, (n, v) in enumerate(named)]  # type: ignore[arg-type]


def test_fold_runs_of_equal_elements() -> None:
    fields = _fields(("a[0]", 1), ("a[1]", 0), ("a[2]", 0), ("a[3]", 0), ("a[4]", 5), ("b", 0))
    assert [(r.name, r.elements) for r in fold(fields)] == [
        ("a[0]", 1), ("a[1..3]", 3), ("a[4]", 1), ("b", 1),
    ]  # fmt: skip
    structs = _fields(*((f"vq[{i}].{m}", 7 if i == 0 and m == "num" else 0)
                        for i in range(4) for m in ("num", "desc")))  # fmt: skip
    assert [r.name for r in fold(structs)] == ["vq[0].num", "vq[0].desc", "vq[1..3].num",
                                               "vq[1..3].desc"]  # fmt: skip
    nested = _fields(*((f"s[{i}].x[{j}]", 0) for i in range(2) for j in range(3)))
    assert [r.name for r in fold(nested)] == ["s[0..1].x[0..2]"]
    named = _fields(("mac_reg[RA+0]", 1), ("mac_reg[RA+1]", 0), ("mac_reg[RA+2]", 0))
    assert [r.name for r in fold(named)] == ["mac_reg[RA+0]", "mac_reg[RA+1..2]"]
    shown = [f._replace(display=d) for f, d in zip(_fields(("r[0]", 0), ("r[1]", 0)),
                                                    ("RAX", "RCX"), strict=True)]  # fmt: skip
    assert [r.name for r in fold(shown)] == ["r[0]", "r[1]"]  # meanings differ: not folded


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("env.segs", ["env.segs[1].base"]),
        ("env.segs[1]", ["env.segs[1].base"]),
        ("*.base", ["env.segs[1].base"]),
        ("RAX", ["env.regs[0]"]),
        ("virtio.vq", ["virtio.vq[0].num"]),
        ("virtio/virtqueues", ["virtio.virtio/virtqueues:vq[0].avail"]),
        ("env.seg", []),
    ],
)
def test_field_patterns(pattern: str, names: list[str]) -> None:
    fields = [Field("env.segs[1].base", "uint64", 0, 8, 0), Field("env.regs[0]", "uint64", 8, 8, 0, "RAX"),
              Field("virtio.vq[0].num", "uint32", 16, 4, 0),
              Field("virtio.virtio/virtqueues:vq[0].avail", "uint64", 20, 8, 0)]  # fmt: skip
    assert [f.name for f in fields if field_matches(f, [pattern])] == names


def test_differing_spans_join_near_differences_and_count_all() -> None:
    a = bytes(100)
    b = bytearray(a)
    for at in (10, 12, 40, 60, 99):
        b[at] = 1
    spans, count = differing_spans(a, bytes(b), limit=2)
    assert count == 4  # 10 and 12 are one span (3 equal bytes apart at most 8)
    assert [(s.offset, s.length, s.differing) for s in spans] == [(10, 3, 2), (40, 1, 1)]
    assert spans[0].context_at == 2 and spans[0].old_context == a[2:21]
    assert differing_spans(b"ab", b"abcd") == differing_spans(b"ab", b"abcd", 1)
    assert differing_spans(b"ab", b"abcd")[1] == 1


def test_a_long_byte_field_diffs_as_the_ranges_that_differ() -> None:
    from snapfmt.ops.diff import _field_changes
    from snapfmt.render_fields import change_lines

    old = bytes(range(256)) * 4
    new = bytearray(old)
    new[420:426] = b"\x52\x54\x00\xab\xcd\xef"
    a = [Field("virtio.undecoded", "buffer", 0x1000, len(old), old)]
    b = [Field("virtio.undecoded", "buffer", 0x1000, len(new), bytes(new))]
    (change,) = _field_changes(a, b)
    assert (change.offset, change.span_count) == (0x1000, 1)
    assert [(s.offset, s.length, s.differing) for s in change.spans] == [(420, 6, 6)]
    lines = list(change_lines(change, 16))
    assert lines[0] == "    virtio.undecoded  1 range differs, 6 bytes"
    assert lines[1] == "      at +0x1a4 (file 0x11a4), 6 of 6 bytes:"
    assert lines[2].startswith("      - 0x0019c  9c 9d 9e 9f a0 a1 a2 a3 a4 a5 a6 a7 a8 a9")
    assert lines[3] == (
        "      + 0x0019c  9c 9d 9e 9f a0 a1 a2 a3 52 54 00 ab cd ef aa ab ac ad ae af b0 b1"
        "  |........RT............|"
    )


def test_field_patterns_on_dump_and_diff(run: object) -> None:
    from tests.helpers import Result

    invoke = run  # (the conftest fixture)
    a, b = (str(SAMPLES / "qemu" / f"devices-7.2-{tag}.mig.zst") for tag in "ab")
    result: Result = invoke("diff", a, b, "--field", "MAC")  # type: ignore[operator]
    assert result.code == 1
    changed = [line.split()[0] for line in result.out.splitlines() if line.startswith("    ")]
    assert changed == ["mac_reg[RA+1]", "e1000/full_mac_state:mac_reg[5377]", "virtio.device.mac"]
    assert invoke("diff", a, a, "--field", "MAC").code == 0  # type: ignore[operator]
    result = invoke("diff", a, b, "--field", "env.regs")  # type: ignore[operator]
    assert (result.code, result.out.splitlines()[-1]) == (0, "identical")
    result = invoke("dump", a, "--field", "RIP", "--field", "virtio.num_queues")  # type: ignore[operator]
    rows = [line.split()[1] for line in result.out.splitlines() if line.startswith("  0x")]
    assert result.code == 0 and rows == ["env.eip", "virtio.num_queues"]


def test_the_vmxnet3_low_mac_word_a_driver_wrote() -> None:
    word = int.from_bytes(bytes.fromhex("52540012"), "little")
    (shown,) = understand_fields("vmxnet3", [Field("temp_mac", "uint32", 0, 4, word)]).fields
    assert shown.display == "MACL 52:54:00:12"
    (zero,) = understand_fields("vmxnet3", [Field("temp_mac", "uint32", 0, 4, 0)]).fields
    assert zero.display is None


def test_virtio_feature_words_named() -> None:
    """By the device's own names, then the transport's; the modern state's second word
    counts from bit 32."""
    features = (1 << 32) | (1 << 15) | (1 << 5) | (1 << 29)
    fields = [Field("virtio.virtio/64bit_features:guest_features", "uint64", 0, 8, features),
              Field("virtio.virtio_pci/modern_state:guest_features[1]", "uint32", 8, 4, 1),
              Field("virtio.guest_features", "uint32", 12, 4, 0)]  # fmt: skip
    shown = [f.display for f in understand_fields("virtio-net", fields).fields]
    assert shown == ["features MAC MRG_RXBUF EVENT_IDX VERSION_1", "features VERSION_1", None]
    (blk,) = understand_fields("virtio-blk", fields[:1]).fields
    assert blk.display == "features RO LIFETIME EVENT_IDX VERSION_1"
