"""verify's work for a QEMU stream: its structure and footers were checked when it was
walked; here the vmdesc must agree with the sections (same versions, same page size,
every described payload decodes to exactly its length, no section it describes
missing), and every page sent encoded must decode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapfmt.errors import LayoutError
from snapfmt.formats.native import SectionKind
from snapfmt.model import CheckResult, Problem

if TYPE_CHECKING:
    from snapfmt.qemu.snapshot import QemuStream


def check(stream: QemuStream) -> CheckResult:
    desc, desc_at = stream.layout.vmdesc, stream.layout.vmdesc_offset
    problems: list[Problem] = []
    described: set[tuple[object, object]] = set()
    if desc is not None:
        if desc.get("page_size", stream.page_size) != stream.page_size:
            problems.append(Problem(None, desc_at,
                f"vmdesc page size {desc.get('page_size')} differs from the stream's {stream.page_size}"))  # fmt: skip
        described = {(d.get("name"), d.get("instance_id"))
                     for d in desc.get("devices", []) if isinstance(d, dict)}  # fmt: skip
        for i, d in enumerate(desc.get("devices", [])):
            if not (isinstance(d, dict) and isinstance(d.get("name"), str)
                    and isinstance(d.get("instance_id"), int)):  # fmt: skip
                problems.append(Problem("vmdesc", desc_at, f"$.devices[{i}]: expected an object "
                                        "with a name (a string) and an instance_id (an "
                                        f"integer), found {d!r:.60}"))  # fmt: skip
    present: set[tuple[object, object]] = set()
    sections = chunks = size = 0
    for section in stream.sections:
        sections += 1
        size += section.size
        path = section.path
        if path is not None and section.kind == SectionKind.RAM_BLOCK:
            chunks += section.size // stream.page_size  # pages, the stream's unit
            block = stream.ram_block(path)
            for at, e in block.encoded_problems():
                problems.append(Problem(str(path), e.offset, e.detail,
                                        (at, at + stream.page_size - 1)))  # fmt: skip
        if path is None or section.kind != SectionKind.DEVICE:
            continue
        device = stream.device(path)
        present.add((device.qemu_idstr or "", device.instance_id))
        entry = stream.layout_entry(path)
        if desc is None or entry is None:  # other writers may describe nothing: bytes
            continue
        where = f"{path} ({device.qemu_idstr} instance {device.instance_id})"
        # (sections saved by old-style handlers, such as slirp's, have no version there)
        if "version" in entry and entry.get("version") != device.version_id:
            problems.append(Problem(where, device.data_offset,
                f"section version {device.version_id} differs from the vmdesc's {entry.get('version')}"))  # fmt: skip
        try:
            device.fields()
        except LayoutError as e:
            problems.append(
                Problem(where, device.data_offset, f"payload does not match the vmdesc: {e}")
            )
    for name, instance in sorted(described - present, key=str):
        problems.append(Problem(f"{name} instance {instance}", desc_at,
                                "vmdesc describes a section the stream does not have"))  # fmt: skip
    return CheckResult(sections, chunks, size, _damage(stream) + problems)


_RANGES = 64  # lost ranges reported a block, at most (then how many more)


def _damage(stream: QemuStream) -> list[Problem]:
    """A salvaged stream's damage as problems: where it is, then what it took."""
    damage = stream.layout.damage
    if damage is None:
        return []
    lost = stream.metadata("salvage")
    problems = [Problem(None, damage.offset, f"damaged: {damage.message}; the stream is "
                        "intact before this offset, unknown after it")]  # fmt: skip
    problems += [Problem(idstr, None, "section cut before its end: lost")
                 for idstr in damage.lost_sections]  # fmt: skip
    for entry in lost["lost_ram"]:
        ranges = entry["ranges"]
        problems += [Problem(entry["path"], None, f"RAM {lo:#x}-{hi:#x} lost to the damage", (lo, hi))
                     for lo, hi in ranges[:_RANGES]]  # fmt: skip
        if len(ranges) > _RANGES:
            problems.append(Problem(entry["path"], None,
                                    f"and {len(ranges) - _RANGES} more ranges lost"))  # fmt: skip
    return problems
