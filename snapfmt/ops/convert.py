"""convert: native <-> QEMU stream, from any snapshot snapfmt can read."""

from __future__ import annotations

import os
from collections.abc import Callable

from snapfmt.errors import SnapfmtError, WriteError
from snapfmt.formats.native import SectionKind
from snapfmt.model import Snapshot
from snapfmt.native.writer import Writer
from snapfmt.ops import inspect
from snapfmt.qemu.snapshot import SALVAGE_DOCUMENT
from snapfmt.qemu.writer import write_qemu

FORMATS = ("native", "qemu", "libvirt")
COMPRESSIONS = ("raw", "gzip", "xz", "zstd")  # of a libvirt save image's stream
LIBVIRT_DOCUMENT = "libvirt"  # the metadata document a native file keeps a domain in
Progress = Callable[[int], None] | None


def to_native(
    snap: Snapshot, target: str, progress: Progress = None, parent: str | None = None
) -> None:
    """Every section, in order, with QEMU identities and field layouts kept.  With
    *parent* (a native snapshot), a delta of it (spec/format.md §7).  A delta read is
    resolved through its chain: without *parent*, the output stands alone (flatten)."""
    iterative = snap.iterative_sections()
    if iterative:
        raise SnapfmtError(
            f"iterative sections other than RAM cannot be converted yet: {', '.join(iterative)}"
        )
    config = snap.configuration
    native = snap.format_name == "native"
    with Writer(
        target,
        machine=config.machine,
        page_size=config.page_size,
        capabilities=config.capabilities,
        metadata=config.metadata,
        parent=parent,
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
                w.add_ram_block(path, spans, length=block.length, qemu_idstr=block.qemu_idstr,
                                # a native block keeps its chunk size (write, read, write
                                # again: the same file)
                                chunk_size=block.chunk_size if native else None,
                                progress=progress)  # fmt: skip
            elif section.kind == SectionKind.METADATA and _copied(snap, section.key):
                w.add_metadata(section.key, snap.metadata(section.key))
        damage = inspect.damage(snap)  # (known once everything was read)
        earlier = snap.metadata(SALVAGE_DOCUMENT) if _has_document(snap, SALVAGE_DOCUMENT) else None
        if damage is not None and earlier is not None and damage != earlier:
            # a file salvaged before and damaged since: both losses are said
            damage = {**damage, "earlier": earlier}
        if damage is not None or earlier is not None:
            w.add_metadata(SALVAGE_DOCUMENT, damage if damage is not None else earlier)
        wrapper = snap.wrapper
        if wrapper is not None and wrapper.domain_xml is not None and not _has_document(snap):
            # a libvirt save image's domain, kept: `convert --to libvirt` writes it back
            w.add_metadata(LIBVIRT_DOCUMENT, {"domain_xml": wrapper.domain_xml,
                                              "was_running": bool(wrapper.was_running)})  # fmt: skip


def _copied(snap: Snapshot, name: str) -> bool:
    """Whether metadata document *name* is copied as it is (a salvage document is
    written after everything else is read, with any new damage)."""
    return name != SALVAGE_DOCUMENT and not _own_parent(snap, name)


def _own_parent(snap: Snapshot, name: str) -> bool:
    """Whether *name* is the document in which a delta names its parent (the output
    names its own, if any)."""
    from snapfmt.formats import native as nf
    from snapfmt.native.reader import NativeSnapshot

    return (
        name == nf.PARENT_DOCUMENT
        and isinstance(snap, NativeSnapshot)
        and bool(snap.flags & nf.HeaderFlag.DELTA)
    )


def read_xml(path: str) -> str:
    """A domain XML file (`convert --xml`): UTF-8, at most 16 MiB."""
    try:
        with open(path, "rb") as f:
            data = f.read((16 << 20) + 1)
        if len(data) > 16 << 20:
            raise SnapfmtError(f"{path}: larger than 16 MiB; a domain XML is far smaller")
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SnapfmtError(f"{path}: offset {e.start:#x}: the domain XML is not UTF-8") from None


def _has_document(snap: Snapshot, name: str = LIBVIRT_DOCUMENT) -> bool:
    return any(s.kind == SectionKind.METADATA and s.key == name for s in snap.sections)


def _domain(snap: Snapshot, xml: str | None, target: str) -> tuple[str, bool]:
    """(domain XML, was running) for a libvirt save image of *snap*: the XML given, else
    the one the snapshot keeps (a save image's own, or a native file's document)."""
    kept: dict[str, object] = {}
    if _has_document(snap):
        document = snap.metadata(LIBVIRT_DOCUMENT)
        kept = document if isinstance(document, dict) else {}
    elif snap.wrapper is not None and snap.wrapper.domain_xml is not None:
        kept = {"domain_xml": snap.wrapper.domain_xml, "was_running": snap.wrapper.was_running}
    text = xml if xml is not None else kept.get("domain_xml")
    if not isinstance(text, str) or not text.strip():
        raise WriteError("a libvirt save image needs the domain's XML: the snapshot keeps "
                         "none; give --xml FILE", file=target)  # fmt: skip
    if "\0" in text:
        raise WriteError("the domain XML holds a NUL character", file=target)
    return text, bool(kept.get("was_running", False))


def to_libvirt(
    snap: Snapshot, target: str, xml: str | None = None, compression: str = "raw",
    progress: Progress = None,
) -> None:  # fmt: skip
    """A save image `virsh restore` takes: libvirt's header, the domain XML, then the QEMU
    stream, compressed as *compression* says (formats/libvirt.py)."""
    import gzip
    import lzma

    import zstandard

    from snapfmt._io import replace
    from snapfmt.formats import libvirt as lf
    from snapfmt.qemu.writer import checked_stream

    if compression not in COMPRESSIONS:
        raise WriteError(
            f"unknown compression {compression!r}, expected one of {', '.join(COMPRESSIONS)}",
            file=target,
        )
    text, was_running = _domain(snap, xml, target)
    write_stream = checked_stream(snap, target)
    data = text.encode("utf-8") + b"\0"
    header = lf.HeaderLE.build({"magic": lf.MAGIC, "version": 2, "data_len": len(data),
                                "was_running": int(was_running),
                                "format": int(lf.Compression[compression.upper()]),
                                "cookie_offset": 0, "unused": [0] * 14})  # fmt: skip
    with replace(target, buffering=1 << 20) as f:
        f.write(header + data)
        if compression == "raw":
            write_stream(f, progress)
        elif compression == "gzip":
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0) as packed:
                write_stream(packed, progress)  # type: ignore[arg-type]
        elif compression == "xz":
            with lzma.LZMAFile(f, "wb", preset=0) as packed:
                write_stream(packed, progress)
        else:
            with zstandard.ZstdCompressor(level=3).stream_writer(f, closefd=False) as packed:
                write_stream(packed, progress)


def convert(
    snap: Snapshot, target: str, to: str | None = None, progress: Progress = None,
    xml: str | None = None, compression: str = "raw", parent: str | None = None,
    mapped_ram: bool = False,
) -> str:  # fmt: skip
    """Write *snap* to *target* in format *to* (default: the other one); returns it.
    *target* may not be the file *snap* is read from (it would be replaced while read).
    *xml* and *compression* are for a libvirt save image, *parent* for a native delta,
    *mapped_ram* for a QEMU stream laid out by page offset."""
    if os.path.exists(target) and os.path.samefile(snap.origin, target):
        raise WriteError("is the file being converted; name another output", file=target)
    if parent is not None and (to or "native") != "native":
        raise WriteError(f"--parent makes a native delta, not a {to} file", file=target)
    for block in snap.ram_blocks():  # refused before a byte is written
        block.require_contents()
    to = to or ("native" if parent or snap.format_name != "native" else "qemu")
    if mapped_ram and to != "qemu":
        raise WriteError(f"--mapped-ram lays out a QEMU stream, not a {to} file", file=target)
    if to == "native":
        to_native(snap, target, progress, parent)
    elif to == "qemu":
        write_qemu(snap, target, progress, mapped_ram)
    elif to == "libvirt":
        to_libvirt(snap, target, xml, compression, progress)
    else:
        raise SnapfmtError(f"unknown target format {to!r}, expected one of {', '.join(FORMATS)}")
    return to
