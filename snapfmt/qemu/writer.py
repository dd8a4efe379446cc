"""Write a QEMU migration stream (QEVM v3) from any snapshot snapfmt can read.

The stream is what QEMU 7.2 itself writes for a paused machine: the configuration
section, the RAM section (START with the block list, then every page -- zero pages as
ZERO records -- in an END section), every device as a FULL section with its state bytes
exactly as read, EOF, and a vmdesc built from the field layouts.  Every section has a
footer.  Written atomically like native snapshots.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any

from snapfmt._io import replace
from snapfmt.errors import SnapfmtError
from snapfmt.formats import qemu as qf
from snapfmt.model import DeviceState, RamBlock, Snapshot

Progress = Callable[[int], None] | None

# Plain ints: `int | IntFlag` makes (and caches for good) an IntFlag for every distinct
# page offset, which grew memory with the RAM size.
_ZERO, _PAGE, _CONTINUE = int(qf.RamFlag.ZERO), int(qf.RamFlag.PAGE), int(qf.RamFlag.CONTINUE)
_MEM_SIZE, _EOS = int(qf.RamFlag.MEM_SIZE), int(qf.RamFlag.EOS)


def _counted(text: str, what: str) -> bytes:
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raise SnapfmtError(f"{what} {text!r} has characters a QEMU stream cannot hold") from None
    if not 0 < len(raw) <= 255:
        raise SnapfmtError(f"{what} {text!r} does not fit a counted string (1-255 bytes)")
    return bytes([len(raw)]) + raw


class _Out:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f

    def u8(self, v: int) -> None:
        self.f.write(bytes([v]))

    def be32(self, v: int) -> None:
        self.f.write(v.to_bytes(4, "big"))

    def be64(self, v: int) -> None:
        self.f.write(v.to_bytes(8, "big"))

    def raw(self, data: bytes | bytearray | memoryview) -> None:
        self.f.write(data)


def _vmdesc_entry(device: DeviceState) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": device.qemu_idstr,
        "instance_id": device.instance_id,
        "vmsd_name": device.vmstate_name,
        "version": device.version_id,
    }
    assert device.layout is not None
    entry["fields"] = list(device.layout.get("fields", []))
    if device.layout.get("subsections"):
        entry["subsections"] = list(device.layout["subsections"])
    return entry


def write_qemu(snap: Snapshot, target: str, progress: Progress = None) -> None:
    """Write *snap* as a QEMU stream to *target* (temp file beside it, fsync, rename)."""
    with replace(target, buffering=1 << 20) as f:
        _write(snap, _Out(f), progress)


def _write(snap: Snapshot, out: _Out, progress: Progress) -> None:
    config = snap.configuration
    page = config.page_size
    if "x-ignore-shared" in config.capabilities or "mapped-ram" in config.capabilities:
        raise SnapfmtError("writing streams with x-ignore-shared or mapped-ram is not supported")
    devices = list(snap.devices())
    blocks = list(snap.ram_blocks())
    for device in devices:
        if not device.qemu_idstr:
            raise SnapfmtError(
                f"device {device.path} has no QEMU identifier; a QEMU stream cannot name it"
            )
    for block in blocks:
        if not block.qemu_idstr:
            raise SnapfmtError(
                f"RAM block {block.path} has no QEMU identifier; a QEMU stream cannot name it"
            )
        if block.length % page:
            raise SnapfmtError(f"RAM block {block.path} is not a whole number of {page}-byte pages")
    out.raw(qf.MAGIC)
    out.be32(qf.VERSION)
    _configuration(out, config.machine, page, config.capabilities, config.metadata.get("uuid"))
    # Section ids start at 1: QEMU finds the handler of a PART/END section by its load
    # section id, which is 0 for every handler not loaded yet, so id 0 would be ambiguous.
    ram_id = 1
    if blocks:
        _section_head(out, qf.SectionType.START, ram_id, "ram", 0, 4)
        out.be64(sum(b.length for b in blocks) | _MEM_SIZE)
        for block in blocks:
            out.raw(_counted(str(block.qemu_idstr), "RAM block name"))
            out.be64(block.length)
        out.be64(_EOS)
        _footer(out, ram_id)
        out.u8(qf.SectionType.END)
        out.be32(ram_id)
        for block in blocks:
            _pages(out, block, page, progress)
        out.be64(_EOS)
        _footer(out, ram_id)
    for number, device in enumerate(devices, start=ram_id + 1):
        _section_head(
            out,
            qf.SectionType.FULL,
            number,
            str(device.qemu_idstr),
            device.instance_id,
            device.version_id,
        )
        out.raw(device.data)
        _footer(out, number)
    out.u8(qf.SectionType.EOF)
    # Devices without a field layout are left out of the vmdesc rather than described
    # by a made-up one; readers then show their state as bytes.
    described = [_vmdesc_entry(d) for d in devices if d.layout is not None]
    desc = json.dumps({"page_size": page, "devices": described}, separators=(",", ":"))
    out.u8(qf.SectionType.VMDESCRIPTION)
    out.be32(len(desc))
    out.raw(desc.encode("utf-8"))


def _configuration(
    out: _Out, machine: str, page: int, capabilities: tuple[str, ...], uuid: Any
) -> None:
    out.u8(qf.SectionType.CONFIGURATION)
    name = _counted(machine, "machine type")[1:]  # a be32 length here, but QEMU reads at most 255
    out.be32(len(name))
    out.raw(name)
    if page != 4096:
        out.raw(
            bytes([qf.SectionType.SUBSECTION]) + _counted("configuration/target-page-bits", "name")
        )
        out.be32(1)
        out.be32(page.bit_length() - 1)
    if capabilities:
        out.raw(bytes([qf.SectionType.SUBSECTION]) + _counted("configuration/capabilities", "name"))
        out.be32(1)
        out.be32(len(capabilities))
        for capability in capabilities:
            out.raw(_counted(capability, "capability"))
    if isinstance(uuid, str) and len(uuid) == 32:
        out.raw(bytes([qf.SectionType.SUBSECTION]) + _counted("configuration/uuid", "name"))
        out.be32(1)
        out.raw(bytes.fromhex(uuid))


def _section_head(
    out: _Out, kind: int, section_id: int, idstr: str, instance_id: int, version_id: int
) -> None:
    out.u8(kind)
    out.be32(section_id)
    out.raw(_counted(idstr, "section id string"))
    out.be32(instance_id)
    out.be32(version_id)


def _footer(out: _Out, section_id: int) -> None:
    out.u8(qf.SectionType.FOOTER)
    out.be32(section_id)


def _pages(out: _Out, block: RamBlock, page: int, progress: Progress) -> None:
    """Every page of *block*: ZERO records for zero pages, PAGE records for the rest."""
    zero = bytes(page)
    name = _counted(str(block.qemu_idstr), "RAM block name")
    first = True
    for offset, span in block.iter_spans():
        records = bytearray()
        for at in range(0, len(span), page):
            data = span[at : at + page]
            flags = _ZERO if zero.startswith(data) else _PAGE
            if not first:
                flags |= _CONTINUE
            records += (offset + at | flags).to_bytes(8, "big")
            if first:
                records += name
                first = False
            records += b"\x00" if flags & _ZERO else data
        out.raw(records)
        if progress:
            progress(len(span))
