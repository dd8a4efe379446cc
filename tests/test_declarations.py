"""Every construct declaration in snapfmt.formats, checked both ways by one helper
(parse, build and size, as construct's own tests do), the struct layouts of the hot
paths held equal to the declarations they stand for, and the QEMU declarations
against what the walk found in real QEMU streams."""

from __future__ import annotations

import contextlib
from typing import Any

import construct
import pytest

import snapfmt
from snapfmt.formats import elf as ef
from snapfmt.formats import libvirt as lf
from snapfmt.formats import native as nf
from snapfmt.formats import qemu as qf
from snapfmt.formats import virtio as vf
from tests.helpers import SAMPLES

_HEADER = {
    "version_major": 1,
    "version_minor": 0,
    "flags": 0,
    "parent_id": bytes(range(16)),
    "reserved": bytes(24),
}
_FOOTER = {
    "index_offset": 64,
    "index_length": 62,
    "index_hash": 7,
    "version_major": 1,
    "version_minor": 0,
    "section_count": 1,
}
_ENTRY = {
    "kind": 2,
    "flags": 0,
    "reserved": 0,
    "offset": 64,
    "length": 10,
    "checksum": 3,
    "data_offset": 0,
    "data_length": 0,
    "size": 10,
    "key": "/e1000@05.0/vmstate",
}
_CHUNK = {"encoding": 2, "reserved": bytes(3), "stored_length": 100, "offset": 4096, "hash": 9}
_RAM_HEAD = {
    "path": "/pc.ram",
    "qemu_idstr": "pc.ram",
    "length": 8192,
    "page_size": 4096,
    "chunk_size": 4096,
    "chunk_count": 2,
}
_LIBVIRT = {
    "magic": lf.MAGIC,
    "version": 2,
    "data_len": 4096,
    "was_running": 1,
    "format": 5,
    "cookie_offset": 0,
    "unused": [0] * 14,
}

EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("native", "Header"): {"fields": {"value": _HEADER}},
    ("native", "HeaderFields"): _HEADER,
    ("native", "Configuration"): {
        "machine": "pc-q35-7.2",
        "page_size": 4096,
        "capabilities": ["x-ignore-shared"],
        "metadata": "{}",
    },
    ("native", "DeviceState"): {
        "path": "/e1000@05.0/vmstate",
        "driver": "e1000",
        "vmstate_name": "e1000",
        "instance_id": 0,
        "version_id": 2,
        "flags": 0,
        "qemu_idstr": "0000:00:05.0/e1000",
        "layout": "",
        "state_length": 48,
    },
    ("native", "ChunkEntry"): _CHUNK,
    ("native", "RamBlockHead"): _RAM_HEAD,
    ("native", "RamBlockDescriptor"): {"head": _RAM_HEAD, "chunks": [_CHUNK, _CHUNK]},
    ("native", "Metadata"): {"document": '{"a": 1}'},
    ("native", "IndexEntry"): _ENTRY,
    ("native", "Index"): {"entries": [_ENTRY, {**_ENTRY, "key": "/pc.ram", "kind": 3}]},
    ("native", "FooterFields"): _FOOTER,
    ("native", "Footer"): {"fields": {"value": _FOOTER}},
    ("qemu", "FileHeader"): {"version": 3},
    ("qemu", "Configuration"): {"name": "pc-i440fx-7.2"},
    ("qemu", "Subsection"): {"name": "configuration/capabilities", "version_id": 1},
    ("qemu", "TargetPageBits"): {"page_bits": 16},
    ("qemu", "Capabilities"): {"names": ["x-ignore-shared", "mapped-ram"]},
    ("qemu", "Uuid"): {"uuid": bytes(range(16))},
    ("qemu", "SectionStartFull"): {
        "section_id": 3,
        "idstr": "0000:00:05.0/e1000",
        "instance_id": 0,
        "version_id": 2,
    },
    ("qemu", "SectionPartEnd"): {"section_id": 3},
    ("qemu", "SectionFooter"): {"section_id": 3},
    ("qemu", "CommandHead"): {"command": 7, "length": 4},
    ("qemu", "PostcopyAdvise"): {"host_page_sizes": 0x201000, "target_page_size": 4096},
    ("qemu", "Packaged"): {"length": 1000},
    ("qemu", "VmDescriptionHead"): {"length": 12345},
    ("qemu", "RamRecordHead"): {"word": 0x1000 | 0x28},
    ("qemu", "MemSizeEntry"): {"idstr": "pc.ram", "used_length": 1 << 30},
    ("qemu", "BlockWord"): {"value": 0x200000},
    ("qemu", "XbzrleHead"): {"encoding": 1, "length": 4096},
    ("qemu", "CompressedHead"): {"length": 4110},
    ("qemu", "MappedRamHeader"): {
        "version": 1,
        "page_size": 4096,
        "bitmap_offset": 0x1000,
        "pages_offset": 0x100000,
    },
    ("libvirt", "HeaderLE"): _LIBVIRT,
    ("libvirt", "HeaderBE"): _LIBVIRT,
}
_SEGMENT = {"selector": 0xF000, "limit": 0xFFFF, "flags": 0x9B00, "pad": 0, "base": 0xFFFF0000}
EXAMPLES |= {
    ("elf", "Elf64Header"): {
        "ei_osabi": 0, "e_type": ef.ET_CORE, "e_machine": ef.EM_386, "e_version": 1,
        "e_entry": 0, "e_phoff": 64, "e_shoff": 0, "e_flags": 0, "e_ehsize": 64,
        "e_phentsize": 56, "e_phnum": 6, "e_shentsize": 0, "e_shnum": 0, "e_shstrndx": 0,
    },
    ("elf", "Elf64ProgramHeader"): {
        "p_type": ef.PT_LOAD, "p_flags": 7, "p_offset": 4096, "p_vaddr": 0xFFFC0000,
        "p_paddr": 0xFFFC0000, "p_filesz": 0x40000, "p_memsz": 0x40000, "p_align": 4096,
    },
    ("elf", "NoteHeader"): {"n_namesz": 5, "n_descsz": 0x90, "n_type": 1, "name": b"CORE\0\0\0\0"},
    ("elf", "I386Prstatus"): {"pid": 1, "regs": {name: i for i, name in enumerate(ef.I386_REGS)}},
    ("elf", "X86_64Prstatus"): {
        "pid": 2, "regs": {name: 1 << i for i, name in enumerate(ef.X86_64_REGS)},
    },
    ("elf", "QemuSegment"): _SEGMENT,
    ("elf", "QemuCpuState"): {
        "version": 1, "size": 0x1B8, **{name: i for i, name in enumerate(ef.QEMU_REGS)},
        **{name: _SEGMENT for name in ef.QEMU_SEGMENTS}, "cr": [0x60000010, 0, 0, 0, 0],
        "kernel_gs_base": 0,
    },
}  # fmt: skip
_N = vf.VIRTIO_QUEUE_MAX
_ELEMENT = {
    "ndescs": None,
    "index": 3,
    "out_num": 1,
    "in_num": 2,
    "padding": bytes(4),
    "in_addr": [0x1000 + i for i in range(vf.VIRTQUEUE_MAX_SIZE)],
    "out_addr": [0] * vf.VIRTQUEUE_MAX_SIZE,
    "in_sg": [{"base": 0, "len": 512}] * vf.VIRTQUEUE_MAX_SIZE,
    "out_sg": [{"base": 0, "len": 0}] * vf.VIRTQUEUE_MAX_SIZE,
}
_SCANOUT = {
    "resource_id": 1,
    "width": 640,
    "height": 480,
    "x": 0,
    "y": 0,
    "cursor_resource_id": 0,
    "cursor_hot_x": 0,
    "cursor_hot_y": 0,
    "cursor_pos_x": 0,
    "cursor_pos_y": 0,
    "fb_format": None,
    "fb_bytes_pp": None,
    "fb_width": None,
    "fb_height": None,
    "fb_stride": None,
    "fb_offset": None,
}
_NO_PAIRS = {"max_queue_pairs": None, "curr_queue_pairs": None, "tx_waiting_more": None}
EXAMPLES |= {
    ("virtio", "MsixEntry"): {"address": 0xFEE00000, "data": 0x4021, "control": 1},
    ("virtio", "PciTransport"): {
        "version_id": 2, "config": bytes(range(256)), "config_express": None,
        "irq_state": [0, 1, 0, 0],
        "msix_table": [{"address": 0, "data": 0, "control": 1}] * 3,
        "msix_pba": b"\x00", "config_vector": 0xFFFF,
    },
    ("virtio", "Queue"): {"num": 256, "desc": 0x12340000, "last_avail_idx": 7, "vector": 1},
    ("virtio", "Common"): {
        "status": 0xF, "isr": 0, "queue_sel": 1, "guest_features": 0x30000, "config_len": 8,
        "config": bytes(8), "num_queues": 1,
        "vq": [{"num": 128, "desc": 0, "last_avail_idx": 0, "vector": 0}],
    },
    ("virtio", "QueueElement"): _ELEMENT,
    ("virtio", "BlkRequest"): {"more": 1, "queue": 1, "element": _ELEMENT},
    ("virtio", "BlkDevice"): {"rq": [{"more": 0, "queue": None, "element": None}]},
    ("virtio", "NetDevice"): {
        "mac": bytes.fromhex("525400123456"), "tx_waiting": 0, "mergeable_rx_bufs": 1,
        "status": 1, "promisc": 1, "allmulti": 0, "mac_table_in_use": 1,
        "mac_table_macs": bytes(6), "vlans": b"\xff" * 512, "has_vnet_hdr": 0,
        "mac_table_multi_overflow": 0, "mac_table_uni_overflow": 0, "alluni": 0,
        "nomulti": 0, "nouni": 0, "nobcast": 0, "has_ufo": 0, **_NO_PAIRS,
        "curr_guest_offloads": None,
    },
    ("virtio", "BalloonDevice"): {"num_pages": 16, "actual": 8},
    ("virtio", "SerialPort"): {
        "id": 0, "guest_connected": 1, "host_connected": 1, "elem_popped": 0,
        "iov_idx": None, "iov_offset": None, "element": None,
    },
    ("virtio", "SerialDevice"): {
        "cols": 0, "rows": 0, "max_nr_ports": 31, "ports_map": [1], "nr_active_ports": 1,
        "ports": [{"id": 0, "guest_connected": 0, "host_connected": 1, "elem_popped": 0,
                   "iov_idx": None, "iov_offset": None, "element": None}],
    },
    ("virtio", "NetConfig"): {
        "mac": bytes(6), "status": 1, "max_virtqueue_pairs": 1, "mtu": 1500, "speed": 0,
        "duplex": 0, "rss_max_key_size": 40, "rss_max_indirection_table_length": 128,
        "supported_hash_types": 0,
    },
    ("virtio", "BlkConfig"): {
        "capacity": 2048, "size_max": 0, "seg_max": 126, "cylinders": 0, "heads": 0,
        "sectors": 0, "blk_size": 512, "physical_block_exp": 0, "alignment_offset": 0,
        "min_io_size": 0, "opt_io_size": 0, "wce": 1, "unused": 0, "num_queues": 2,
        "max_discard_sectors": 0, "max_discard_seg": 1, "discard_sector_alignment": 1,
        "max_write_zeroes_sectors": 0, "max_write_zeroes_seg": 1,
        "write_zeroes_may_unmap": 1, "unused1": bytes(3),
    },
    ("virtio", "ScsiConfig"): {
        "num_queues": 4, "seg_max": 126, "max_sectors": 0xFFFF, "cmd_per_lun": 128,
        "event_info_size": 16, "sense_size": 96, "cdb_size": 32, "max_channel": 0,
        "max_target": 255, "max_lun": 16383,
    },
    ("virtio", "BalloonConfig"): {
        "num_pages": 0, "actual": 0, "free_page_hint_cmd_id": 0, "poison_val": 0,
    },
    ("virtio", "ConsoleConfig"): {"cols": 80, "rows": 25, "max_nr_ports": 31, "emerg_wr": 0},
    ("virtio", "InputConfig"): {
        "select": 1, "subsel": 0, "size": 5, "reserved": bytes(5), "u": bytes(128),
    },
    ("virtio", "GpuConfig"): {
        "events_read": 0, "events_clear": 0, "num_scanouts": 1, "num_capsets": 0,
    },
    ("virtio", "GpuResource"): {
        "resource_id": 1, "width": 2, "height": 1, "format": 1, "iov_cnt": 1,
        "iov": [{"addr": 0x100000, "len": 8}], "data": bytes(range(8)),
    },
    ("virtio", "GpuScanout"): _SCANOUT,
    ("virtio", "GpuState"): {
        "resources": [{"resource_id": 0, "width": None, "height": None, "format": None,
                       "iov_cnt": None, "iov": None, "data": None}],
        "enable": 1, "max_outputs": 1, "scanout": [_SCANOUT],
    },
    ("virtio", "SubsectionHeader"): {"name": "virtio/started", "version_id": 1},
    ("virtio", "VirtqueueState"): {"avail": 0x2000, "used": 0x3000},
    ("virtio", "PackedVirtqueueState"): {
        "last_avail_idx": 1, "last_avail_wrap_counter": True, "used_idx": 2,
        "used_wrap_counter": False, "inuse": 0,
    },
    ("virtio", "ModernQueueState"): {
        "num": 256, "unused": 0, "enabled": True, "desc": [0x1000, 0], "avail": [0x2000, 0],
        "used": [0x3000, 0],
    },
    ("virtio", "RssState"): {
        "enabled": True, "redirect": 1, "populate_hash": 0, "hash_types": 0x3F,
        "indirections_len": 2, "default_queue": 0, "key": bytes(40),
        "indirections_table": [0, 1],
    },
    ("virtio", "GpuBlob"): {
        "resource_id": 2, "blob_size": 4096, "iov_cnt": 1, "iov": [{"addr": 0, "len": 4096}],
    },
}  # fmt: skip
# what the virtio declarations take from outside the bytes (snapfmt/state/virtio.py)
PARAMS = {
    ("virtio", name): {"express": False, "msix": 3, "packed": False, "max_queue_pairs": 1,
                       "guest_offloads": False, "num_queues": 2, "scanout_version": 1}
    for name in ("PciTransport", "Queue", "Common", "QueueElement", "BlkRequest", "BlkDevice",
                 "NetDevice", "SerialPort", "SerialDevice", "GpuScanout", "GpuState")
}  # fmt: skip
MODULES = {"native": nf, "qemu": qf, "libvirt": lf, "elf": ef, "virtio": vf}
DECLARED = [(module, name) for module, m in MODULES.items() for name in m.STRUCTURES]


def plain(value: Any) -> Any:
    """A parsed Container as plain dicts and lists, without construct's private keys."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def within(given: Any, parsed: Any) -> bool:
    """Whether *parsed* holds everything *given* does (it also holds constants, and the
    raw bytes and checksums RawCopy and Checksum add)."""
    if isinstance(given, dict):
        return all(key in parsed and within(v, parsed[key]) for key, v in given.items())
    if isinstance(given, list):
        return len(given) == len(parsed) and all(map(within, given, parsed))
    return bool(given == parsed)


def check_both_ways(
    con: construct.Construct, value: dict[str, Any], params: dict[str, Any] | None = None
) -> bytes:
    """build(value) parses back to value and builds again to the same bytes; the size is
    the bytes' length (or, for a variable-size structure, sizeof says it cannot tell);
    and any byte less is an error, not a shorter parse.  *params*: the declaration's
    ``_params``."""
    params = params or {}
    data = con.build(value, **params)
    parsed = con.parse(data, **params)
    assert con.build(parsed, **params) == data
    assert within(value, plain(parsed))
    with contextlib.suppress(construct.SizeofError, KeyError):  # variable-size structures
        assert con.sizeof(**params) == len(data)
    with pytest.raises(construct.ConstructError):
        con.parse(data[:-1], **params)
    return data


def test_every_declaration_has_an_example() -> None:
    assert sorted(DECLARED) == sorted(EXAMPLES)


@pytest.mark.parametrize(("module", "name"), sorted(EXAMPLES))
def test_declaration_both_ways(module: str, name: str) -> None:
    check_both_ways(
        MODULES[module].STRUCTURES[name], EXAMPLES[module, name], PARAMS.get((module, name))
    )


def test_hot_path_structs_equal_their_declarations() -> None:
    for word in (0, 0x28, (1 << 40) | 0x10):
        packed = qf.RAM_WORD.pack(word)
        assert packed == qf.RamRecordHead.build({"word": word})
    assert qf.RAM_WORD.size == qf.RamRecordHead.sizeof()
    values = (2, 100, 0x1000, 0xABCD)
    packed = nf.CHUNK_ENTRY.pack(*values)
    parsed = nf.ChunkEntry.parse(packed)
    assert (parsed.encoding, parsed.stored_length, parsed.offset, parsed.hash) == values
    assert nf.CHUNK_ENTRY.size == nf.ChunkEntry.sizeof()
    assert len(nf.IndexEntry.build({**_ENTRY, "key": ""})) == nf.INDEX_ENTRY_MIN


@pytest.mark.parametrize("name", ["pc", "q35", "pc-postcopy"])
def test_declarations_parse_what_the_walk_found(name: str) -> None:
    """Every header, footer and block list entry where the walk of a real QEMU 7.2
    stream placed it."""
    path = SAMPLES / "qemu" / f"{name}.mig"
    data = path.read_bytes()
    with snapfmt.open(path) as stream:
        layout = stream.layout  # type: ignore[attr-defined]
        assert qf.FileHeader.parse(data).version == qf.VERSION
        assert qf.Configuration.parse(data[9:]).name == layout.machine
        for record in layout.sections:
            start = qf.SectionStartFull.parse(data[record.header_offset + 1 :])
            assert (start.section_id, start.idstr, start.instance_id, start.version_id) == (
                record.section_id,
                record.idstr,
                record.instance_id,
                record.version_id,
            )
            offset, length = record.spans[-1]
            assert qf.SectionFooter.parse(data[offset + length :]).section_id == record.section_id
        ram = next(r for r in layout.sections if r.idstr == "ram")
        first = qf.RamRecordHead.parse(data[ram.spans[0][0] :])
        assert first.word & qf.RamFlag.MEM_SIZE
        assert first.word & ~0xFFF == sum(b.length for b in layout.blocks.values())
        assert layout.vmdesc_offset is not None
        head = qf.VmDescriptionHead.parse(data[layout.vmdesc_offset - 5 :])
        assert head.length == len(data) - layout.vmdesc_offset
