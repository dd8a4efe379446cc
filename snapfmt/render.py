"""Text tables and JSON for the results operations return.  Only this module and cli.py
decide how things look; the JSON shapes are documented in README.md."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from snapfmt._io import json_dumps
from snapfmt.errors import SnapfmtError
from snapfmt.model import Configuration
from snapfmt.ops.inspect import (
    Container,
    DeviceDump,
    Dump,
    Info,
    MetadataDump,
    Parent,
    RamDump,
    SectionRow,
    damage_lines,
)
from snapfmt.paths import Path
from snapfmt.render_fields import change_lines, fold, shown_value
from snapfmt.vmstate import Field

if TYPE_CHECKING:  # annotations only: importing these costs every command start-up time
    from snapfmt.ops.diff import Diff
    from snapfmt.ops.extract import Extracted
    from snapfmt.ops.verify import Report

HEX_ROW = 16


def human(size: int) -> str:
    """1536 -> '1.5 KiB'; sizes under 1 KiB stay exact."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def one_line(text: str) -> str:
    """*text* with control characters (a newline in a name from a file, say) and lone
    surrogates escaped, so that it prints as one line whatever a file held."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(key: object) -> str:
    """A section path as text output shows it (Path.readable: ``/rom@etc/acpi/tables``);
    JSON keeps the canonical form.  Anything that is not a path is shown as it is."""
    if isinstance(key, Path):
        return key.readable()
    text = str(key)
    if text.startswith("/"):
        try:
            return Path.parse(text).readable()
        except SnapfmtError:
            return text
    return text


def to_json(data: Any) -> str:
    return json_dumps(data, indent=2, sort_keys=False)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart, no trailing spaces; cells
    (names read from files among them) escaped to one line each."""
    everything = [header, *([one_line(cell) for cell in row] for row in rows)]
    if not header:
        return ["" for _ in everything]
    widths = [max(map(len, column)) for column in zip(*everything, strict=True)]
    line = "  ".join([*(f"{{:<{w}}}" for w in widths[:-1]), "{}"])  # the last one unpadded
    return [line.format(*row).rstrip() for row in everything]


def _config_json(config: Configuration) -> dict[str, Any]:
    return {
        "machine": config.machine,
        "page_size": config.page_size,
        "capabilities": list(config.capabilities),
        "metadata": dict(config.metadata),
    }


# -- info ------------------------------------------------------------------------------------


def _damage_lines(document: dict[str, Any] | None) -> list[str]:
    if document is None:
        return []
    return [
        f"{'damage' if i == 0 else '':<14}{line}"
        for i, line in enumerate(damage_lines(document, shown))
    ]


def _parent_lines(parents: list[Parent]) -> list[str]:
    """A delta's chain: each parent as its child names it, and whether it was found."""
    lines = []
    for depth, p in enumerate(parents):
        label = "parent" if depth == 0 else ""
        state = "found" if p.problem is None else p.problem
        lines.append(f"{label:<14}{p.file} (id {p.id}, {human(p.length)}): {state}")
    return lines


def _container_lines(c: Container | None) -> list[str]:
    if c is None:
        return []
    if c.kind != "libvirt":
        return [f"container     {c.compression}-compressed QEMU stream"]
    running = "was running" if c.was_running else "was paused"
    lines = [
        f"container     libvirt save image version {c.version} ({c.byte_order}-endian), "
        f"{c.compression}, {running}"
    ]
    if c.domain_xml is not None:
        lines.append(f"domain        {c.domain_name or '?'} (XML {len(c.domain_xml)} bytes)")
    return lines


def _container_json(c: Container | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {
        "kind": c.kind,
        "compression": c.compression,
        "version": c.version,
        "byte_order": c.byte_order,
        "was_running": c.was_running,
        "domain_name": c.domain_name,
        "domain_xml": c.domain_xml,
    }


def info_text(info: Info) -> list[str]:
    config = info.configuration
    kinds: dict[str, int] = {}
    for row in info.rows:
        kinds[row.kind] = kinds.get(row.kind, 0) + 1
    ram = [r for r in info.rows if r.kind == "ram-block"]
    counts = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
    lines = [
        f"file          {info.file} ({human(info.file_size)})",
        f"format        snapfmt {info.format} {info.version}",
        *_container_lines(info.container),
        *_parent_lines(info.parents),
        f"machine       {config.machine}",
        f"page size     {config.page_size}",
        f"capabilities  {', '.join(config.capabilities) or '-'}",
        f"sections      {len(info.rows)} ({counts})",
        f"RAM           {human(sum(r.size for r in ram))} in {len(ram)} blocks, "
        f"{human(sum(r.stored for r in ram))} stored",
        *_damage_lines(info.damage),
        "",
    ]
    rows = [
        [
            shown(r.key) if r.kind != "metadata" else r.key,
            r.kind,
            r.driver or "-",
            "-" if r.version is None else str(r.version),
            str(r.size),
            str(r.stored),
        ]
        for r in info.rows
    ]
    lines += table(["PATH", "KIND", "DRIVER", "VERSION", "SIZE", "STORED"], rows)
    return lines


def info_json(info: Info) -> dict[str, Any]:
    return {
        "file": info.file,
        "format": info.format,
        "version": info.version,
        "file_size": info.file_size,
        "container": _container_json(info.container),
        "parents": [p._asdict() for p in info.parents],
        "damage": info.damage,
        "configuration": _config_json(info.configuration),
        "sections": [_row_json(r) for r in info.rows],
    }


def _row_json(r: SectionRow) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kind": r.kind,
        "path" if r.kind != "metadata" else "name": r.key,
        "size": r.size,
        "stored": r.stored,
    }
    if r.kind == "device":
        row.update(driver=r.driver, vmstate_name=r.vmstate_name, version=r.version,
                   instance_id=r.instance_id)  # fmt: skip
    if r.kind in ("device", "ram-block"):
        row["qemu_id"] = r.qemu_id
    return row


# -- dump ------------------------------------------------------------------------------------


def hexdump(data: bytes, base: int) -> Iterator[str]:
    for at in range(0, len(data), HEX_ROW):
        row = data[at : at + HEX_ROW]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        left, right = row[:8].hex(" "), row[8:].hex(" ")
        yield f"  {base + at:#010x}  {left:<23}  {right:<23}  |{text}|"


def dump_text(dump: Dump) -> Iterator[str]:
    c = dump.configuration
    yield f"{dump.file}: snapfmt {dump.format} {dump.version}"
    yield from _container_lines(dump.container)
    if dump.container is not None and dump.container.domain_xml:
        yield "domain XML:"
        yield from ("  " + line for line in dump.container.domain_xml.splitlines())
    yield (
        f"configuration: machine {c.machine}, page size {c.page_size}, "
        f"capabilities {', '.join(c.capabilities) or '-'}"
    )
    for section in dump.sections:
        if isinstance(section, DeviceDump):
            yield from _device_text(section)
        elif isinstance(section, RamDump) and section.missing:
            yield (
                f"{shown(section.path)}: RAM block, {human(section.length)} "
                f"({section.length:#x} bytes), page size {section.page_size}: contents not in the file: {section.missing}"
            )
        elif isinstance(section, RamDump):
            nonzero = section.chunks - section.zero_chunks
            yield (
                f"{shown(section.path)}: RAM block, {human(section.length)} "
                f"({section.length:#x} bytes), page size {section.page_size}, chunks of {human(section.chunk_size)}: "
                f"{section.chunks} chunks, {section.zero_chunks} zero, {nonzero} non-zero; "
                f"{human(section.stored)} stored"
                + (
                    f"; host pages of {human(section.host_page_size)}"
                    if section.host_page_size
                    else ""
                )
            )
        else:
            yield f"{section.name}: metadata {json.dumps(section.document, sort_keys=True)}"


def _device_text(section: DeviceDump) -> Iterator[str]:
    d = section.device
    qemu = f", QEMU id {d.qemu_idstr}" if d.qemu_idstr else ""
    yield (
        f"{shown(d.path)}: device {d.driver}, vmstate {d.vmstate_name} version {d.version_id}, "
        f"instance {d.instance_id}{qemu}, {len(d.data)} bytes at {d.data_offset:#x}"
    )
    if section.fields is None:
        if section.layout_error:
            yield f"  (field layout does not fit: {section.layout_error})"
        yield from hexdump(d.data, d.data_offset)
        return
    for note in section.notes:
        yield f"  (not all decoded: {note})"
    rows = [[f"{r.field.offset:#010x}", r.name, r.field.type, shown_value(r.field)]
            for r in fold(section.fields)]  # fmt: skip
    for line in table(["OFFSET", "FIELD", "TYPE", "VALUE"], rows):
        yield "  " + line


def _field_json(f: Field) -> dict[str, Any]:
    value = f.value.hex() if isinstance(f.value, bytes) else f.value
    return {"name": f.name, "type": f.type, "offset": f.offset, "size": f.size, "value": value,
            "display": f.display}  # fmt: skip


def dump_json(dump: Dump) -> dict[str, Any]:
    sections: list[dict[str, Any]] = []
    for s in dump.sections:
        if isinstance(s, DeviceDump):
            d = s.device
            sections.append(
                {
                    "kind": "device",
                    "path": str(d.path),
                    "driver": d.driver,
                    "vmstate_name": d.vmstate_name,
                    "version": d.version_id,
                    "instance_id": d.instance_id,
                    "qemu_id": d.qemu_idstr,
                    "offset": d.data_offset,
                    "size": len(d.data),
                    "fields": None if s.fields is None else [_field_json(f) for f in s.fields],
                    "data": d.data.hex() if s.fields is None else None,
                    "layout_error": s.layout_error,
                    "notes": list(s.notes),
                }
            )
        elif isinstance(s, RamDump):
            sections.append(
                {
                    "kind": "ram-block",
                    "path": str(s.path),
                    "qemu_id": s.qemu_id,
                    "size": s.length,
                    "page_size": s.page_size,
                    "chunk_size": s.chunk_size,
                    "chunks": s.chunks,
                    "zero_chunks": s.zero_chunks,
                    "stored": s.stored,
                    "host_page_size": s.host_page_size,
                    "missing": s.missing,
                }
            )
        elif isinstance(s, MetadataDump):
            sections.append({"kind": "metadata", "name": s.name, "document": s.document})
    return {
        "file": dump.file,
        "format": dump.format,
        "version": dump.version,
        "container": _container_json(dump.container),
        "configuration": _config_json(dump.configuration),
        "sections": sections,
    }


# -- verify, extract ---------------------------------------------------------------------------


def verify_text(report: Report) -> Iterator[str]:
    for p in report.problems:
        where = f"{shown(p.section)}: " if p.section else ""
        at = f" (file offset {p.offset:#x})" if p.offset is not None else ""
        yield f"BAD  {where}{p.message}{at}"
    checked = f"{report.sections} sections, {report.chunks} chunks, {human(report.bytes)} checked"
    if report.ok:
        yield f"OK   {report.file}: {checked}"
    else:
        count = len(report.problems)
        yield f"FAIL {report.file}: {count} problem{'s' if count != 1 else ''} in {checked}"


def verify_json(report: Report) -> dict[str, Any]:
    return {
        "file": report.file,
        "ok": report.ok,
        "checked": {"sections": report.sections, "chunks": report.chunks, "bytes": report.bytes},
        "problems": [
            {
                "section": p.section,
                "offset": p.offset,
                "message": p.message,
                "range": list(p.range) if p.range else None,
            }
            for p in report.problems
        ],
    }


def extracted_text(items: list[Extracted]) -> Iterator[str]:
    rows = [[shown(e.key), e.kind, e.file, str(e.size)] for e in items]
    yield from table(["SECTION", "KIND", "FILE", "SIZE"], rows)


# -- diff --------------------------------------------------------------------------------------


_MARK = {"added": "+", "removed": "-", "changed": "~"}
_COLOUR = {"added": "green", "removed": "red", "changed": "yellow"}


def diff_text(
    d: Diff, *, fields: bool = True, pages: bool = False, colour: bool = False
) -> Iterator[str]:
    def paint(text: str, status: str) -> str:
        return click.style(text, fg=_COLOUR[status]) if colour else text

    yield f"--- {d.a}"
    yield f"+++ {d.b}"
    for change in d.configuration:
        yield paint(f"~ configuration: {change.name} {change.old} -> {change.new}", "changed")
    for s in d.sections:
        yield paint(f"{_MARK[s.status]} {shown(s.path)}: {s.summary}", s.status)
        if fields:
            width = max((len(c.name) for c in s.changes), default=0)
            for c in s.changes:
                yield from change_lines(c, width)
        if pages:
            yield from (f"    {lo:#x}-{hi:#x}" for lo, hi in s.ranges)
            if s.ranges_truncated:
                yield "    … (more ranges not listed)"
    total = len(d.sections) + bool(d.configuration)
    yield (
        "identical"
        if d.identical
        else f"{total} difference{'s' if total != 1 else ''}, {d.same_sections} sections identical"
    )


def diff_stat(d: Diff) -> Iterator[str]:
    rows = [[shown(s.path), s.status, str(len(s.changes) if s.kind == "device" else s.pages),
             str(s.bytes_changed if s.kind == "ram-block" else "-")] for s in d.sections]  # fmt: skip
    rows += (
        [["configuration", "changed", str(len(d.configuration)), "-"]] if d.configuration else []
    )
    yield from table(["SECTION", "STATUS", "FIELDS/PAGES", "BYTES"], rows)
    yield f"{len(rows)} sections differ, {d.same_sections} identical"


def _json_value(value: object) -> object:
    return value.hex() if isinstance(value, bytes | bytearray) else value


def diff_json(d: Diff) -> dict[str, Any]:
    return {
        "a": d.a,
        "b": d.b,
        "identical": d.identical,
        "configuration": [{"name": c.name, "old": c.old, "new": c.new} for c in d.configuration],
        "sections": [
            {
                "path": s.path,
                "kind": s.kind,
                "status": s.status,
                "summary": s.summary,
                "changes": [
                    {
                        "name": c.name,
                        "old": _json_value(c.old),
                        "new": _json_value(c.new),
                        "offset": c.offset,
                        "old_display": c.old_display,
                        "new_display": c.new_display,
                        "ranges": None
                        if not c.spans
                        else [
                            {
                                "offset": r.offset,
                                "length": r.length,
                                "differing": r.differing,
                                "old": r.old.hex(),
                                "new": r.new.hex(),
                            }
                            for r in c.spans
                        ],
                        "range_count": c.span_count if c.spans else None,
                    }
                    for c in s.changes
                ],
                "pages": s.pages,
                "bytes_changed": s.bytes_changed,
                "ranges": [[lo, hi] for lo, hi in s.ranges],
                "ranges_truncated": s.ranges_truncated,
            }
            for s in d.sections
        ],
        "same_sections": d.same_sections,
    }
