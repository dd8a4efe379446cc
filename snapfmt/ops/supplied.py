"""A snapshot whose RAM blocks missing from the file are read from files the user names.

A stream saved with x-ignore-shared sends no page of a shared block: its contents stay
in the block's backing file (a memory-backend-file with share=on).  Reads of such a block
are refused (RamBlock.missing); with its backing file supplied, the block reads from
that file, offset 0 at the block's start, and extract and convert write it like any
other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from snapfmt.errors import SnapfmtError
from snapfmt.guest.physmap import BackingFile
from snapfmt.model import CheckResult, Configuration, DeviceState, RamBlock, SectionInfo, Snapshot
from snapfmt.paths import Path


class Supplied(Snapshot):
    """*inner* with the blocks *files* names ({QEMU id or path: file}) read from them."""

    def __init__(self, inner: Snapshot, files: Mapping[str, str]) -> None:
        self.inner = inner
        self.file, self.origin = inner.file, inner.origin
        self.format_name, self.version, self.wrapper = (
            inner.format_name,
            inner.version,
            inner.wrapper,
        )
        names: dict[str, RamBlock] = {}
        for block in inner.ram_blocks():
            names[str(block.path)] = block
            if block.qemu_idstr:
                names.setdefault(block.qemu_idstr, block)
        self._files: dict[str, str] = {}
        for name, file in files.items():
            found = names.get(name)
            if found is None:
                known = ", ".join(sorted({b.qemu_idstr or str(b.path) for b in names.values()}))
                raise SnapfmtError(f"no RAM block {name!r} to read from {file} (blocks: {known})")
            if not found.missing:
                raise SnapfmtError(f"RAM block {found.path} is in the file: --block-file is for "
                                   "a block whose contents are not (x-ignore-shared)")  # fmt: skip
            BackingFile(found, file)  # (checks the file now: it exists and is long enough)
            self._files[str(found.path)] = file

    @property
    def configuration(self) -> Configuration:
        return self.inner.configuration

    @property
    def sections(self) -> list[SectionInfo]:
        return self.inner.sections

    def device(self, path: Path) -> DeviceState:
        return self.inner.device(path)

    def ram_block(self, path: Path) -> RamBlock:
        block = self.inner.ram_block(path)
        file = self._files.get(str(path))
        return block if file is None else BackingFile(block, file)

    def metadata(self, name: str) -> Any:
        return self.inner.metadata(name)

    def check(self, progress: Callable[[int], None] | None = None) -> CheckResult:
        return self.inner.check(progress)

    def iterative_sections(self) -> list[str]:
        return self.inner.iterative_sections()

    def aliases(self) -> dict[str, Path]:
        return self.inner.aliases()

    def close(self) -> None:
        self.inner.close()
