"""convert: native <-> QEMU stream, from any snapshot snapfmt can read."""

from __future__ import annotations

import os
from collections.abc import Callable

from snapfmt.errors import SnapfmtError, WriteError
from snapfmt.formats.native import SectionKind
from snapfmt.model import Snapshot
from snapfmt.native.writer import Writer
from snapfmt.qemu.writer import write_qemu

FORMATS = ("native", "qemu")
Progress = Callable[[int], None] | None


def to_native(snap: Snapshot, target: str, progress: Progress = None) -> None:
    """Every section, in order, with QEMU identities and field layouts kept."""
    iterative = snap.iterative_sections()
    if iterative:
        raise SnapfmtError(
            f"iterative sections other than RAM cannot be converted yet: {', '.join(iterative)}"
        )
    config = snap.configuration
    with Writer(
        target,
        machine=config.machine,
        page_size=config.page_size,
        capabilities=config.capabilities,
        metadata=config.metadata,
    ) as w:
        for section in snap.sections:
            path = section.path
            if section.kind == SectionKind.DEVICE and path is not None:
                d = snap.device(path)
                w.add_device(
                    path,
                    d.data,
                    driver=d.driver,
                    vmstate_name=d.vmstate_name,
                    instance_id=d.instance_id,
                    version_id=d.version_id,
                    layout=d.layout,
                    qemu_idstr=d.qemu_idstr,
                )
            elif section.kind == SectionKind.RAM_BLOCK and path is not None:
                block = snap.ram_block(path)
                spans = (view for _, view in block.iter_spans())
                w.add_ram_block(
                    path, spans, length=block.length, qemu_idstr=block.qemu_idstr, progress=progress
                )
            elif section.kind == SectionKind.METADATA:
                w.add_metadata(section.key, snap.metadata(section.key))


def convert(snap: Snapshot, target: str, to: str | None = None, progress: Progress = None) -> str:
    """Write *snap* to *target* in format *to* (default: the other one); returns it.
    *target* may not be the file *snap* is read from (it would be replaced while read)."""
    if os.path.exists(target) and os.path.samefile(snap.origin, target):
        raise WriteError("is the file being converted; name another output", file=target)
    for block in snap.ram_blocks():  # refused before a byte is written
        block.require_contents()
    to = to or ("qemu" if snap.format_name == "native" else "native")
    if to == "native":
        to_native(snap, target, progress)
    elif to == "qemu":
        write_qemu(snap, target, progress)
    else:
        raise SnapfmtError(f"unknown target format {to!r}, expected one of {', '.join(FORMATS)}")
    return to
