"""A QEMU migration stream as a Snapshot: the layout of one walk (snapfmt.qemu.walk),
its sections and RAM blocks named by device paths (snapfmt.qemu.paths), device state
read on demand and decoded through the vmdesc."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from snapfmt._io import FileReader, json_dumps
from snapfmt.errors import FormatError
from snapfmt.formats.native import SectionKind
from snapfmt.model import CheckResult, Configuration, DeviceState, SectionInfo, Snapshot
from snapfmt.paths import Path
from snapfmt.qemu.pagemap import NOT_SENT, count_sent, runs
from snapfmt.qemu.paths import PathAssigner
from snapfmt.qemu.ramblock import QemuRamBlock
from snapfmt.qemu.records import Block
from snapfmt.qemu.walk import Section, StreamLayout, walk

if TYPE_CHECKING:
    from snapfmt.wrappers import Wrapper


POSTCOPY_RAM = "postcopy-ram"
SALVAGE_DOCUMENT = "salvage"  # a damaged stream opened to salvage it: what is lost
HOST_PAGE_SIZES = "host_page_sizes"  # configuration metadata: {RAM block id: page size}


class QemuStream(Snapshot):
    format_name = "qemu"
    version = "3"

    def __init__(
        self,
        reader: FileReader,
        start: int = 0,
        wrapper: Wrapper | None = None,
        origin: str | None = None,
        layout: StreamLayout | None = None,
        salvage: bool = False,
    ) -> None:
        """The stream at *start* of *reader*, walked here unless its *layout* (the walk
        of that same reader, perhaps done in another process) is given.  With *salvage*,
        a damaged stream gives what is whole before the damage: its complete sections,
        the RAM blocks some of whose pages came (pages that did not read as zero), and
        a metadata document ``salvage`` saying where the damage is and what is lost."""
        self._io = reader
        self.file = reader.name
        self.origin = origin or reader.name
        self.wrapper = wrapper  # a libvirt image or compression the stream came inside
        if wrapper is not None and wrapper.kind == "libvirt":
            self.format_name = "libvirt"
        self.layout = layout if layout is not None else walk(reader, start, salvage)
        self.page_size = self.layout.page_size
        self._index()

    def _index(self) -> None:
        layout = self.layout
        devices = [s for s in layout.sections if s.idstr != "ram"]
        names = PathAssigner(layout.machine, [(s.idstr, s.instance_id) for s in devices])
        self._device_paths: dict[str, Section] = {}
        self._block_paths: dict[str, Block] = {}
        self._sent: dict[str, int] = {}
        described = {}
        for d in (layout.vmdesc or {}).get("devices", []):
            if (
                isinstance(d, dict)
                and isinstance(d.get("name"), str)
                and isinstance(d.get("instance_id"), int)
            ):
                described[(d["name"], d["instance_id"])] = d  # fmt: skip
        self._layouts: dict[int, dict[str, Any]] = {}
        infos = []
        for s in devices:
            path = names.section(s.idstr, s.instance_id)
            if path is None:
                raise FormatError(f"two sections map to {names.mapper.fallback_section(s.idstr, s.instance_id)}",
                                  file=self.file, offset=s.header_offset, section=s.idstr)  # fmt: skip
            self._device_paths[path] = s
            desc = described.get((s.idstr, s.instance_id))
            if desc is not None:
                self._layouts[s.section_id] = desc
            size = sum(n for _, n in s.spans)
            infos.append(SectionInfo(SectionKind.DEVICE, path, s.spans[0][0], size, size, size))
        self._lost: list[dict[str, Any]] = []  # RAM lost to damage, for the salvage document
        for b in layout.blocks.values():
            path = names.ram_block(b.idstr)
            if path is None:
                raise FormatError(f"two sections map to {names.mapper.fallback_ram_block(b.idstr)}",
                                  file=self.file, section=b.idstr)  # fmt: skip
            if layout.damage is not None and self._lost_to_damage(path, b):
                continue
            self._block_paths[path] = b
            self._sent[path] = count_sent(b.pages)
            stored = self._sent[path] * self.page_size
            infos.append(SectionInfo(SectionKind.RAM_BLOCK, path, 0, 0, b.length, stored))
        if layout.damage is not None:
            size = len(json_dumps(self._salvage()))
            infos.append(SectionInfo(SectionKind.METADATA, SALVAGE_DOCUMENT, 0, 0, size, 0))
        self._infos = infos

    def _lost_to_damage(self, path: str, b: Block) -> bool:
        """Note what of block *b* the damage took: the whole block when no page of it
        came (then it is left out: True), else the runs of pages that did not come.
        (A mapped-ram bitmap's clear bits are zero pages, not lost ones; x-ignore-shared
        sends no page of a shared block.)"""
        damage = self.layout.damage
        if damage is not None and damage.ram_ended:
            return False  # (RAM came whole before the damage: a page not sent is zero)
        if not len(b.pages):
            if "x-ignore-shared" in self.layout.capabilities:
                return False  # (a shared block: its pages were never to be sent)
            self._lost.append({"path": path, "qemu_id": b.idstr, "ranges": [[0, b.length - 1]],
                               "bytes": b.length})  # fmt: skip
            return True
        if "mapped-ram" in self.layout.capabilities:
            return False
        page = self.page_size
        ranges = [[i * page, j * page - 1] for i, j, w in runs(b.pages, page + 8) if w == NOT_SENT]
        if ranges:
            self._lost.append({"path": path, "qemu_id": b.idstr, "ranges": ranges,
                               "bytes": sum(hi - lo + 1 for lo, hi in ranges)})  # fmt: skip
        return False

    def _salvage(self) -> dict[str, Any]:
        damage = self.layout.damage
        assert damage is not None
        return {
            "damage": {"offset": damage.offset, "message": damage.message},
            "lost_sections": list(damage.lost_sections),
            "lost_ram": self._lost,
            "note": "the stream is intact before the damage; sections it held after it "
                    "are unknown, lost RAM pages read as zero",
        }  # fmt: skip

    @property
    def configuration(self) -> Configuration:
        meta: dict[str, Any] = {}
        if self.layout.uuid:
            meta["uuid"] = self.layout.uuid
        capabilities = self.layout.capabilities
        if self.layout.postcopy is not None and self.layout.postcopy != -1:
            # saved with postcopy-ram (POSTCOPY_ADVISE's long form): QEMU loads it only
            # with the capability on, so it is one, though the configuration omits it
            capabilities = (*capabilities, POSTCOPY_RAM)
            sizes = {b.idstr: b.host_page_size for b in self.layout.blocks.values()
                     if b.host_page_size}  # fmt: skip
            if sizes:
                meta[HOST_PAGE_SIZES] = sizes
        return Configuration(self.layout.machine, self.page_size, capabilities, meta)

    @property
    def sections(self) -> list[SectionInfo]:
        return list(self._infos)

    def section_record(self, path: Path) -> Section:
        """The walk's record of the device section at *path*."""
        return self._device_paths[str(path)]

    def iterative_sections(self) -> list[str]:
        return [s.idstr for s in self.layout.sections if s.iterative and s.idstr != "ram"]

    def layout_entry(self, path: Path) -> dict[str, Any] | None:
        """The vmdesc entry describing the device section at *path*, if any."""
        return self._layouts.get(self._device_paths[str(path)].section_id)

    def device(self, path: Path) -> DeviceState:
        s = self._device_paths[str(path)]
        data = b"".join(self._io.pread(off, n, "section payload") for off, n in s.spans)
        desc = self._layouts.get(s.section_id)
        name = (
            desc.get("vmsd_name", s.idstr.rpartition("/")[2])
            if desc
            else s.idstr.rpartition("/")[2]
        )
        layout = {"fields": desc.get("fields", []), "subsections": desc.get("subsections", [])} if desc else None  # fmt: skip
        driver = path.parent.leaf.name if path.parent else name
        return DeviceState(path, driver, str(name), s.instance_id, s.version_id, data, layout,
                           s.idstr, s.spans[0][0])  # fmt: skip

    def ram_block(self, path: Path) -> QemuRamBlock:
        key = str(path)
        block = self._block_paths[key]
        return QemuRamBlock(self._io, path, block, self._sent[key], self.page_size)

    def metadata(self, name: str) -> Any:
        if name == SALVAGE_DOCUMENT and self.layout.damage is not None:
            return self._salvage()
        raise KeyError(name)

    def aliases(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path, s in self._device_paths.items():
            found.setdefault(s.idstr, Path.parse(path))
        for path, b in self._block_paths.items():
            found.setdefault(b.idstr, Path.parse(path))
        return found

    def check(self, progress: Callable[[int], None] | None = None) -> CheckResult:
        from snapfmt.qemu.check import check

        return check(self)

    def close(self) -> None:
        self._io.close()
