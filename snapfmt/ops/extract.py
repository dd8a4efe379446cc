"""extract: copy sections out of a snapshot into files, never outside the folder named.

Section paths come from the file and are untrusted.  File names are built only from the
canonical (percent-encoded) form of each path component, which holds no ``/`` and is never
``.`` or ``..`` (spec/paths.md); on top of that every directory is created without
following symbolic links and every file is opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, NamedTuple

import tomli_w

from snapfmt._io import replace
from snapfmt.errors import SnapfmtError
from snapfmt.formats.native import DEFAULT_CHUNK_SIZE, SectionKind
from snapfmt.model import Snapshot
from snapfmt.paths import Path, escape

__all__ = ["Extracted", "extract_all", "extract_one"]

Progress = Callable[[int], None] | None


class Extracted(NamedTuple):
    key: str
    kind: str
    file: str
    size: int


def _write_section(
    snap: Snapshot, path: Path, out: IO[bytes], progress: Progress, ours: bool = True
) -> int:
    """Write one section's raw contents to *out*; in a new regular file of ours, zero
    spans become holes."""
    section = snap.section_for(path)
    if section.kind == SectionKind.DEVICE:
        data = snap.device(path).data
        out.write(data)
        return len(data)
    block = snap.ram_block(path)
    block.require_contents()
    if ours and _regular(out):  # a file opened here, empty, at offset 0, not O_APPEND
        out.flush()
        block.write_into(out.fileno(), progress)
        return block.length
    for _offset, view in block.iter_spans():  # standard output: zeros are written out
        out.write(view)
        if progress:
            progress(len(view))
    return block.length


def _regular(out: IO[bytes]) -> bool:
    try:
        return stat.S_ISREG(os.fstat(out.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no descriptor (a test's BytesIO)
        return False


def extract_one(snap: Snapshot, selector: str, output: str, progress: Progress = None) -> Extracted:
    """Write the one section *selector* names to *output* (``-`` for standard output)."""
    path = snap.select_one(selector)
    kind = snap.section_for(path).kind_name
    if output == "-":
        size = _write_section(snap, path, sys.stdout.buffer, progress, ours=False)
        sys.stdout.buffer.flush()
        return Extracted(str(path), kind, output, size)
    with replace(output) as f:
        size = _write_section(snap, path, f, progress)
    return Extracted(str(path), kind, output, size)


class _Folder:
    """Creates files strictly inside *root*."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)

    def _dir(self, parts: Sequence[str]) -> str:
        current = self.root
        for part in parts:
            _check_part(part)
            current = os.path.join(current, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(current)
            if os.path.islink(current) or not os.path.isdir(current):
                raise SnapfmtError(
                    f"{current}: exists and is not a plain directory; not writing through it"
                )
        return current

    def open(self, parts: Sequence[str]) -> tuple[str, IO[bytes]]:
        *dirs, name = parts
        _check_part(name)
        target = os.path.join(self._dir(dirs), name)
        if os.path.commonpath([self.root, os.path.realpath(target)]) != self.root:
            raise SnapfmtError(f"{target}: would be outside {self.root}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        return os.path.relpath(target, self.root), os.fdopen(fd, "wb")

    def save(self, parts: Sequence[str], data: bytes) -> str:
        """Write *data* to a new file at *parts*; its name relative to the folder."""
        name, f = self.open(parts)
        with f:
            f.write(data)
        return name


def _check_part(part: str) -> None:
    if not part or part in (".", "..") or "/" in part or "\0" in part or os.sep in part:
        raise SnapfmtError(f"refusing unsafe file name {part!r}")


def _file_parts(path: Path, suffix: str) -> list[str]:
    parts = ["sections", *(str(c) for c in path.components)]
    parts[-1] += suffix
    return parts


def extract_all(snap: Snapshot, folder: str, progress: Progress = None) -> list[Extracted]:
    """Write every section under *folder*, plus a ``manifest.toml`` that ``snapfmt write``
    turns back into an equivalent snapshot (byte-identical for snapshots snapfmt wrote)."""
    for block in snap.ram_blocks():  # refused before a file is made
        block.require_contents()
    out = _Folder(folder)
    config = snap.configuration
    manifest: dict[str, Any] = {
        "format": 1,
        "machine": config.machine,
        "page_size": config.page_size,
        "capabilities": list(config.capabilities),
    }
    done: list[Extracted] = []
    if config.metadata:
        manifest["metadata_file"] = out.save(["configuration.json"], _json(config.metadata))
    devices, blocks, documents = [], [], []
    for section in snap.sections:
        path = section.path
        if section.kind == SectionKind.METADATA:
            name = out.save(
                ["documents", escape(section.key) + ".json"], _json(snap.metadata(section.key))
            )
            documents.append({"name": section.key, "file": name})
            done.append(Extracted(section.key, "metadata", name, section.size))
        elif section.kind == SectionKind.DEVICE and path is not None:
            devices.append(_device_entry(snap, path, out))
            done.append(Extracted(str(path), "device", devices[-1]["state_file"], section.size))
        elif section.kind == SectionKind.RAM_BLOCK and path is not None:
            blocks.append(_ram_entry(snap, path, out, progress))
            done.append(Extracted(str(path), "ram-block", blocks[-1]["file"], section.size))
    manifest["chunk_size"] = blocks[0]["chunk_size"] if blocks else DEFAULT_CHUNK_SIZE
    for key, items in (("device", devices), ("ram", blocks), ("document", documents)):
        if items:
            manifest[key] = items
    out.save(["manifest.toml"], tomli_w.dumps(manifest).encode("utf-8"))
    return done


def _device_entry(snap: Snapshot, path: Path, out: _Folder) -> dict[str, Any]:
    """Write a device's state (and layout) under *out*; its manifest entry."""
    dev = snap.device(path)
    entry: dict[str, Any] = {"path": str(path), "driver": dev.driver, "vmstate": dev.vmstate_name,
                             "instance_id": dev.instance_id, "version": dev.version_id}  # fmt: skip
    if dev.qemu_idstr:
        entry["qemu_id"] = dev.qemu_idstr
    entry["state_file"] = out.save(_file_parts(path, ".bin"), dev.data)
    if dev.layout is not None:
        entry["layout_file"] = out.save(_file_parts(path, ".layout.json"), _json(dev.layout))
    return entry


def _ram_entry(snap: Snapshot, path: Path, out: _Folder, progress: Progress) -> dict[str, Any]:
    """Write a RAM block's contents under *out*; its manifest entry."""
    block = snap.ram_block(path)
    name, f = out.open(_file_parts(path, ".bin"))
    with f:
        _write_section(snap, path, f, progress)
    ram: dict[str, Any] = {"path": str(path), "size": block.length, "file": name,
                           "chunk_size": block.chunk_size}  # fmt: skip
    if block.qemu_idstr:
        ram["qemu_id"] = block.qemu_idstr
    return ram


def _json(document: Any) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
