"""Write manifests: a TOML description of a snapshot to build (spec/manifest.md)."""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from snapfmt._io import json_loads
from snapfmt.errors import LayoutError, ManifestError, PathSyntaxError, SnapfmtError
from snapfmt.formats import native as nf
from snapfmt.native.writer import RamSource, Writer, Zeros
from snapfmt.paths import Path
from snapfmt.vmstate import encode_fields

__all__ = ["build", "load"]

_TOP = {
    "format",
    "machine",
    "page_size",
    "chunk_size",
    "capabilities",
    "metadata",
    "metadata_file",
    "device",
    "ram",
    "document",
}
_DEVICE = {
    "path",
    "driver",
    "vmstate",
    "instance_id",
    "version",
    "qemu_id",
    "state",
    "state_file",
    "field",
    "layout_file",
}
_RAM = {"path", "size", "qemu_id", "file", "fill", "chunk_size"}
_FILL = {"offset", "length", "pattern", "text", "random"}
_DOC = {"name", "file", "content"}
_FIELD = {"name", "type", "value"}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_PIECE = 1 << 20


class Manifest(NamedTuple):
    folder: str  # files it names are relative to this, and must stay inside it
    data: dict[str, Any]  # the TOML, as read
    name: str  # the manifest's file name, for messages


def load(path: str) -> Manifest:
    """Read and check a manifest; errors name the manifest and the offending entry."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ManifestError(f"{path}: nests too deeply") from None
    manifest = Manifest(os.path.dirname(os.path.abspath(path)), data, path)
    _check_keys(manifest, data, _TOP, "top level")
    if not isinstance(data.get("machine"), str):
        raise ManifestError(f"{path}: 'machine' (a string) is required")
    if data.get("format", 1) != 1:
        raise ManifestError(
            f"{path}: manifest format {data['format']!r} is not supported, expected 1"
        )
    _exclusive(manifest, data, ("metadata", "metadata_file"), "top level")
    for i, dev in enumerate(_tables(manifest, data, "device", "top level")):
        where = f"device[{i}]"
        _check_keys(manifest, dev, _DEVICE, where)
        _strings(
            manifest,
            dev,
            ("path", "driver", "vmstate", "qemu_id", "state_file", "layout_file"),
            where,
        )
        for j, item in enumerate(_tables(manifest, dev, "field", where)):
            _check_keys(manifest, item, _FIELD, f"{where}.field[{j}]")
    for i, ram in enumerate(_tables(manifest, data, "ram", "top level")):
        where = f"ram[{i}]"
        _check_keys(manifest, ram, _RAM, where)
        _strings(manifest, ram, ("path", "qemu_id", "file"), where)
        for j, fill in enumerate(_tables(manifest, ram, "fill", where)):
            _check_keys(manifest, fill, _FILL, f"{where}.fill[{j}]")
    for i, doc in enumerate(_tables(manifest, data, "document", "top level")):
        _check_keys(manifest, doc, _DOC, f"document[{i}]")
        _strings(manifest, doc, ("name", "file"), f"document[{i}]")
        _exclusive(manifest, doc, ("content", "file"), f"document[{i}]")
    return manifest


def _strings(m: Manifest, table: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if key in table and not isinstance(table[key], str):
            raise ManifestError(f"{m.name}: {where}: '{key}' must be a string, got {table[key]!r}")


def _exclusive(m: Manifest, table: Mapping[str, Any], keys: tuple[str, str], where: str) -> None:
    if all(k in table for k in keys):
        raise ManifestError(f"{m.name}: {where}: give '{keys[0]}' or '{keys[1]}', not both")


def _check_keys(m: Manifest, table: Any, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise ManifestError(f"{m.name}: {where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ManifestError(
            f"{m.name}: {where}: unknown key {unknown[0]!r} "
            f"(expected one of {', '.join(sorted(allowed))})"
        )


def _tables(m: Manifest, table: Mapping[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ManifestError(f"{m.name}: {where}: '{key}' must be an array of tables")
    return value


def _int(
    m: Manifest, table: Mapping[str, Any], key: str, where: str, default: int | None = None
) -> int:
    value = table.get(key, default)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ManifestError(
        f"{m.name}: {where}: '{key}' must be a non-negative integer or a size "
        f'such as "16M", got {value!r}'
    )


def _file(m: Manifest, name: Any, where: str) -> str:
    """A file named relative to the manifest, which must stay inside its folder."""
    if not isinstance(name, str):
        raise ManifestError(f"{m.name}: {where}: a file name must be a string")
    path = os.path.realpath(os.path.join(m.folder, name))
    if os.path.isabs(name) or os.path.commonpath(
        [os.path.realpath(m.folder), path]
    ) != os.path.realpath(m.folder):
        raise ManifestError(f"{m.name}: {where}: file {name!r} is outside the manifest's folder")
    if not os.path.isfile(path):
        raise ManifestError(f"{m.name}: {where}: file {name!r} not found")
    return path


def _read(m: Manifest, name: Any, where: str) -> bytes:
    with open(_file(m, name, where), "rb") as f:
        return f.read()


def _json_file(m: Manifest, name: Any, where: str) -> Any:
    try:
        return json_loads(_read(m, name, where))
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{m.name}: {where}: {name!r} is not valid JSON: {e}") from None


def _path(m: Manifest, table: Mapping[str, Any], where: str) -> Path:
    try:
        return Path.parse(table.get("path", ""))
    except (PathSyntaxError, TypeError, AttributeError) as e:
        raise ManifestError(f"{m.name}: {where}: bad 'path': {e}") from None


def _device_state(m: Manifest, dev: Mapping[str, Any], where: str) -> tuple[bytes, Any]:
    given = [k for k in ("state", "state_file", "field") if k in dev]
    if len(given) != 1:
        raise ManifestError(
            f"{m.name}: {where}: give exactly one of 'state', 'state_file', 'field'"
        )
    layout = _json_file(m, dev["layout_file"], where) if "layout_file" in dev else None
    if "field" in dev:
        if layout is not None:
            raise ManifestError(
                f"{m.name}: {where}: 'field' builds its own layout; drop 'layout_file'"
            )
        try:
            return encode_fields(dev["field"])[::-1]
        except LayoutError as e:
            raise ManifestError(f"{m.name}: {where}: {e}") from None
    if "state_file" in dev:
        return _read(m, dev["state_file"], where), layout
    try:
        return bytes.fromhex(str(dev["state"])), layout
    except ValueError:
        raise ManifestError(f"{m.name}: {where}: 'state' must be hex digits") from None


def _fill_source(
    m: Manifest, ram: Mapping[str, Any], size: int, where: str
) -> Iterator[bytes | Zeros]:
    regions = []
    for j, fill in enumerate(_tables(m, ram, "fill", where)):
        at = f"{where}.fill[{j}]"
        offset, length = _int(m, fill, "offset", at), _int(m, fill, "length", at)
        kinds = [k for k in ("pattern", "text", "random") if k in fill]
        if len(kinds) != 1:
            raise ManifestError(f"{m.name}: {at}: give exactly one of 'pattern', 'text', 'random'")
        regions.append((offset, length, _generator(m, kinds[0], fill[kinds[0]], at)))
    regions.sort(key=lambda r: r[0])
    end = 0
    for offset, length, _ in regions:
        if offset < end or offset + length > size:
            raise ManifestError(
                f"{m.name}: {where}: fill regions overlap or pass the size {size:#x}"
            )
        end = offset + length
    return _fill_pieces(regions, size)


def _generator(m: Manifest, kind: str, value: Any, where: str) -> Callable[[int, int], bytes]:
    """A function (position within the region, length) -> bytes."""
    if kind == "random":
        if not isinstance(value, int):
            raise ManifestError(f"{m.name}: {where}: 'random' takes an integer seed")
        seed = value.to_bytes(8, "little", signed=True)

        def random_bytes(pos: int, length: int) -> bytes:
            # SHAKE-128 of (seed, 1 MiB piece number): deterministic and seekable.
            out = bytearray()
            while len(out) < length:
                piece, skip = divmod(pos + len(out), _PIECE)
                block = hashlib.shake_128(seed + piece.to_bytes(8, "little")).digest(_PIECE)
                out += block[skip : skip + length - len(out)]
            return bytes(out)

        return random_bytes
    try:
        unit = bytes.fromhex(value) if kind == "pattern" else str(value).encode("utf-8")
    except (ValueError, TypeError):
        raise ManifestError(f"{m.name}: {where}: 'pattern' must be hex digits") from None
    if not unit:
        raise ManifestError(f"{m.name}: {where}: '{kind}' must not be empty")

    def repeat(pos: int, length: int) -> bytes:
        start = pos % len(unit)
        reps = (start + length) // len(unit) + 1
        return (unit * reps)[start : start + length]

    return repeat


def _fill_pieces(
    regions: list[tuple[int, int, Callable[[int, int], bytes]]], size: int
) -> Iterator[bytes | Zeros]:
    pos = 0
    for offset, length, gen in regions:
        if pos < offset:  # the gaps are zero runs, never made (work follows the regions)
            yield Zeros(offset - pos)
            pos = offset
        done = 0
        while done < length:
            step = min(_PIECE, length - done)
            yield gen(done, step)
            done += step
        pos += length
    if pos < size:
        yield Zeros(size - pos)


def ram_bytes(manifest: Manifest) -> int:
    """How many RAM bytes *manifest* describes (for a progress bar); 0 where unknown."""
    total = 0
    for ram in _tables(manifest, manifest.data, "ram", "top level"):
        size = ram.get("size")
        if isinstance(size, int):
            total += size
        elif isinstance(ram.get("file"), str):
            path = os.path.join(manifest.folder, ram["file"])
            total += os.path.getsize(path) if os.path.isfile(path) else 0
    return total


def build(manifest: Manifest, output: str, progress: Callable[[int], None] | None = None) -> None:
    """Write the snapshot *manifest* describes to *output* (atomically)."""
    m, data = manifest, manifest.data
    metadata = data.get("metadata", {})
    if "metadata_file" in data:
        metadata = _json_file(m, data["metadata_file"], "metadata_file")
    if not isinstance(metadata, dict):
        raise ManifestError(f"{m.name}: 'metadata' must be a table (a JSON object)")
    caps = data.get("capabilities", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ManifestError(f"{m.name}: 'capabilities' must be a list of strings")
    page_size = _int(m, data, "page_size", "top level", 4096)
    chunk_size = _int(m, data, "chunk_size", "top level", nf.DEFAULT_CHUNK_SIZE)
    try:
        with Writer(
            output,
            machine=data["machine"],
            page_size=page_size,
            capabilities=caps,
            metadata=metadata,
            chunk_size=chunk_size,
        ) as w:
            _add_devices(m, w)
            _add_ram_blocks(m, w, chunk_size, progress)
            _add_documents(m, w)
    except ManifestError:
        raise
    except SnapfmtError as e:
        raise ManifestError(f"{m.name}: {e}") from None
    except (TypeError, ValueError, RecursionError) as e:
        # e.g. a TOML date in a JSON document: name the manifest, never a traceback
        raise ManifestError(f"{m.name}: a value cannot be used: {e}") from None


def _add_devices(m: Manifest, w: Writer) -> None:
    for i, dev in enumerate(_tables(m, m.data, "device", "top level")):
        where = f"device[{i}] ({dev.get('path')})"
        state, layout = _device_state(m, dev, where)
        w.add_device(
            _path(m, dev, where),
            state,
            driver=dev.get("driver"),
            vmstate_name=dev.get("vmstate"),
            instance_id=_int(m, dev, "instance_id", where, 0),
            version_id=_int(m, dev, "version", where, 1),
            layout=layout,
            qemu_idstr=dev.get("qemu_id"),
        )


def _add_ram_blocks(
    m: Manifest, w: Writer, chunk_size: int, progress: Callable[[int], None] | None
) -> None:
    for i, ram in enumerate(_tables(m, m.data, "ram", "top level")):
        where = f"ram[{i}] ({ram.get('path')})"
        path = _path(m, ram, where)
        source: RamSource
        if "file" in ram:
            if "fill" in ram:
                raise ManifestError(f"{m.name}: {where}: give 'file' or 'fill', not both")
            source = _file(m, ram["file"], where)
            size = _int(m, ram, "size", where, os.path.getsize(source))
        else:
            size = _int(m, ram, "size", where)
            source = _fill_source(m, ram, size, where)
        w.add_ram_block(
            path,
            source,
            length=size,
            qemu_idstr=ram.get("qemu_id"),
            chunk_size=_int(m, ram, "chunk_size", where, chunk_size),
            progress=progress,
        )


def _add_documents(m: Manifest, w: Writer) -> None:
    for i, doc in enumerate(_tables(m, m.data, "document", "top level")):
        where = f"document[{i}]"
        if not isinstance(doc.get("name"), str):
            raise ManifestError(f"{m.name}: {where}: 'name' (a string) is required")
        content = _json_file(m, doc["file"], where) if "file" in doc else doc.get("content")
        w.add_metadata(doc["name"], content)
