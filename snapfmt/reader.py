"""Bytes to model: open a snapshot file.

This is the one place where construct's errors become snapfmt errors (:func:`parse`).
Opening a native snapshot reads the header, the footer and the index only; sections load
on demand and every byte read is checked against its checksum or chunk hash first.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import construct

from snapfmt.errors import (
    ChecksumError,
    FormatError,
    PathSyntaxError,
    TruncatedError,
    UnsupportedError,
)
from snapfmt.formats import native as nf
from snapfmt.model import Configuration, DeviceState, SectionInfo, Snapshot
from snapfmt.paths import Path
from snapfmt.ramblock import NativeRamBlock

__all__ = ["detect", "open_snapshot", "parse"]

_BATCH_BYTES = 1 << 22


def parse(con: construct.Construct, data: bytes, *, file: str, offset: int, what: str) -> Any:
    """Parse *data* with *con*; any construct error becomes a located FormatError."""
    try:
        return con.parse(data)
    except construct.ChecksumError:
        raise ChecksumError(
            f"{what} checksum does not match its bytes", file=file, offset=offset
        ) from None
    except construct.ConstError as e:
        raise FormatError(f"{what}: bad magic", file=file, offset=offset, found=_short(e)) from None
    except construct.StreamError as e:
        raise TruncatedError(
            f"{what} is cut short", file=file, offset=offset, found=_short(e)
        ) from None
    except (construct.ConstructError, UnicodeDecodeError) as e:
        raise FormatError(
            f"{what} is malformed", file=file, offset=offset, found=_short(e)
        ) from None


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:120]


class FileReader:
    """Positioned reads that never pass the end of the file silently."""

    def __init__(self, path: str) -> None:
        self.name = path
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self.fd)
            what = "is a directory" if stat.S_ISDIR(info.st_mode) else "is a FIFO, device or socket"
            raise FormatError(f"{what}, not a snapshot file", file=path)
        self.size = info.st_size

    def pread(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TruncatedError(
                f"{what} runs past the end of the file",
                file=self.name,
                offset=offset,
                found=f"{max(0, self.size - offset)} bytes",
                expected=f"{length}",
            )
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise TruncatedError(f"{what} is cut short", file=self.name, offset=offset)
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def detect(head: bytes) -> str | None:
    """The format whose magic *head* starts with, or None."""
    if head.startswith(nf.MAGIC):
        return "native"
    return None


def open_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Open a snapshot file of any readable format (detected from its first bytes)."""
    name = os.fspath(path)
    try:
        reader = FileReader(name)
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror}", file=name) from None
    try:
        head = reader.pread(0, min(reader.size, 16), "magic")
        kind = detect(head)
        if kind == "native":
            return NativeSnapshot(reader)
        if not head:
            raise FormatError("empty file, not a snapshot", file=name)
        raise FormatError(
            "not a snapshot format snapfmt reads",
            file=name,
            offset=0,
            found=f"first bytes {head[:8].hex()}",
            expected=f"native magic {nf.MAGIC.hex()}",
        )
    except BaseException:
        reader.close()
        raise


class NativeSnapshot(Snapshot):
    format_name = "native"

    def __init__(self, reader: FileReader) -> None:
        self._io = reader
        self.file = reader.name
        self._config: Configuration | None = None
        self._aliases: dict[str, Path] | None = None
        self._read_header()
        self._read_footer_and_index()

    # -- opening -------------------------------------------------------------------------

    def _parse(self, con: construct.Construct, data: bytes, offset: int, what: str) -> Any:
        return parse(con, data, file=self.file, offset=offset, what=what)

    def _read_header(self) -> None:
        if self._io.size < nf.HEADER_SIZE + nf.FOOTER_SIZE:
            raise TruncatedError(
                "file too short for a native snapshot",
                file=self.file,
                offset=0,
                found=f"{self._io.size} bytes",
                expected=f"at least {nf.HEADER_SIZE + nf.FOOTER_SIZE}",
            )
        raw = self._io.pread(0, nf.HEADER_SIZE, "header")
        major = int.from_bytes(raw[8:10], "little")
        minor = int.from_bytes(raw[10:12], "little")
        if major != nf.VERSION_MAJOR:
            raise UnsupportedError(
                "native format version not supported",
                file=self.file,
                offset=8,
                found=f"{major}.{minor}",
                expected=f"major version {nf.VERSION_MAJOR}",
            )
        header = self._parse(nf.Header, raw, 0, "header").fields.value
        self.version = f"{major}.{minor}"
        self.version_minor = minor
        self.flags = nf.HeaderFlag(header.flags & 1)
        self.parent_id = bytes(header.parent_id)

    def _read_footer_and_index(self) -> None:
        at = self._io.size - nf.FOOTER_SIZE
        raw = self._io.pread(at, nf.FOOTER_SIZE, "footer")
        if raw[-8:] != nf.FOOTER_MAGIC:
            raise TruncatedError(
                "no footer at the end of the file (truncated or unfinished)",
                file=self.file,
                offset=at + nf.FOOTER_SIZE - 8,
                found=raw[-8:].hex(),
                expected=nf.FOOTER_MAGIC.hex(),
            )
        footer = self._parse(nf.Footer, raw, at, "footer").fields.value
        if f"{footer.version_major}.{footer.version_minor}" != self.version:
            raise FormatError(
                "footer version differs from the header's",
                file=self.file,
                offset=at + 24,
                found=f"{footer.version_major}.{footer.version_minor}",
                expected=self.version,
            )
        if footer.index_offset < nf.HEADER_SIZE or footer.index_offset + footer.index_length != at:
            raise FormatError(
                "index does not end where the footer starts",
                file=self.file,
                offset=at,
                found=f"index {footer.index_offset:#x}+{footer.index_length:#x}",
                expected=f"end at {at:#x}",
            )
        if footer.index_length > nf.MAX_INDEX:
            raise FormatError(
                "index is larger than any snapshot needs",
                file=self.file,
                offset=at,
                found=f"{footer.index_length} bytes",
                expected=f"at most {nf.MAX_INDEX}",
            )
        raw_index = self._io.pread(footer.index_offset, footer.index_length, "index")
        if nf.xxh3_64(raw_index) != footer.index_hash:
            raise ChecksumError(
                "index checksum does not match its bytes",
                file=self.file,
                offset=footer.index_offset,
            )
        index = self._parse(nf.Index, raw_index, footer.index_offset, "index")
        if len(index.entries) != footer.section_count:
            raise FormatError(
                "section count differs between footer and index",
                file=self.file,
                offset=at + 28,
                found=len(index.entries),
                expected=footer.section_count,
            )
        self.index_offset = footer.index_offset
        self.index_length = footer.index_length
        self.index_hash = footer.index_hash
        self._sections = self._check_entries(index.entries)

    def _check_entries(self, entries: Any) -> list[SectionInfo]:
        sections: list[SectionInfo] = []
        seen: set[tuple[int, str]] = set()
        for number, e in enumerate(entries):
            where = f"section {number} ({e.key or 'configuration'})"
            known = e.kind in nf.SectionKind.__members__.values()
            optional = bool(e.flags & nf.SectionFlag.OPTIONAL)
            if not known and not optional:
                raise UnsupportedError(
                    f"{where} has kind {e.kind}, unknown to this reader and not optional",
                    file=self.file,
                    offset=self.index_offset,
                )
            spans = [(e.offset, e.length), (e.data_offset, e.data_length)]
            for start, length in spans:
                if length and (start < nf.HEADER_SIZE or start + length > self.index_offset):
                    raise FormatError(
                        f"{where} lies outside the section area",
                        file=self.file,
                        offset=self.index_offset,
                        found=f"{start:#x}+{length:#x}",
                        expected=f"within {nf.HEADER_SIZE:#x}-{self.index_offset:#x}",
                    )
            if known and e.kind in (nf.SectionKind.DEVICE, nf.SectionKind.RAM_BLOCK):
                try:
                    Path.parse(e.key)
                except PathSyntaxError as err:
                    raise FormatError(
                        f"{where} has a bad path: {err}", file=self.file, offset=self.index_offset
                    ) from None
            if (e.kind, e.key) in seen:
                raise FormatError(
                    f"{where} appears twice", file=self.file, offset=self.index_offset
                )
            seen.add((e.kind, e.key))
            sections.append(
                SectionInfo(
                    kind=nf.SectionKind(e.kind) if known else e.kind,
                    key=e.key,
                    offset=e.offset,
                    length=e.length,
                    size=e.size,
                    stored=e.length + e.data_length,
                    checksum=e.checksum,
                    data_offset=e.data_offset,
                    data_length=e.data_length,
                    optional=optional,
                )
            )
        configs = [s for s in sections if s.kind == nf.SectionKind.CONFIGURATION]
        if len(configs) != 1:
            raise FormatError(
                "a snapshot needs exactly one configuration section",
                file=self.file,
                offset=self.index_offset,
                found=len(configs),
            )
        return sections

    # -- sections --------------------------------------------------------------------------

    @property
    def sections(self) -> list[SectionInfo]:
        return [s for s in self._sections if isinstance(s.kind, nf.SectionKind)]

    @property
    def all_sections(self) -> list[SectionInfo]:
        """Every index entry, unknown optional kinds included."""
        return list(self._sections)

    def body(self, section: SectionInfo) -> bytes:
        """A section's body, checked against its checksum."""
        if section.length > nf.MAX_BODY:
            raise FormatError(
                "section is larger than any non-RAM section may be",
                file=self.file,
                offset=section.offset,
                section=section.key or "configuration",
                found=f"{section.length} bytes",
                expected=f"at most {nf.MAX_BODY}",
            )
        data = self._io.pread(section.offset, section.length, f"section {section.key}")
        if nf.xxh3_64(data) != section.checksum:
            raise ChecksumError(
                "section checksum does not match its bytes",
                file=self.file,
                offset=section.offset,
                section=section.key or "configuration",
            )
        return data

    def _section(self, kind: nf.SectionKind, key: str) -> SectionInfo:
        for s in self._sections:
            if s.kind == kind and s.key == key:
                return s
        raise KeyError(key)

    @property
    def configuration(self) -> Configuration:
        if self._config is None:
            section = self._section(nf.SectionKind.CONFIGURATION, "")
            c = self._parse(nf.Configuration, self.body(section), section.offset, "configuration")
            self._config = Configuration(
                machine=c.machine,
                page_size=c.page_size,
                capabilities=tuple(c.capabilities),
                metadata=self._json(c.metadata or "{}", section, "configuration metadata"),
            )
        return self._config

    def _json(self, text: str, section: SectionInfo, what: str) -> Any:
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise FormatError(
                f"{what} is not valid JSON",
                file=self.file,
                offset=section.offset,
                section=section.key or None,
                found=_short(e),
            ) from None

    def device(self, path: Path) -> DeviceState:
        section = self._section(nf.SectionKind.DEVICE, str(path))
        body = self.body(section)
        head = self._parse(nf.DeviceState, body, section.offset, f"device {path}")
        head_size = len(nf.DeviceState.build(head))
        if head_size + head.state_length != len(body):
            raise FormatError(
                "device state length disagrees with the section length",
                file=self.file,
                offset=section.offset,
                section=str(path),
                found=head.state_length,
                expected=len(body) - head_size,
            )
        layout = self._json(head.layout, section, "field layout") if head.layout else None
        return DeviceState(
            path=path,
            driver=head.driver,
            vmstate_name=head.vmstate_name,
            instance_id=head.instance_id,
            version_id=head.version_id,
            data=body[head_size:],
            layout=layout,
            qemu_idstr=head.qemu_idstr or None,
            data_offset=section.offset + head_size,
        )

    def ram_block(self, path: Path) -> NativeRamBlock:
        return NativeRamBlock(self, self._section(nf.SectionKind.RAM_BLOCK, str(path)))

    def metadata(self, name: str) -> Any:
        section = self._section(nf.SectionKind.METADATA, name)
        doc = self._parse(nf.Metadata, self.body(section), section.offset, f"metadata {name}")
        return self._json(doc.document, section, f"metadata {name}")

    def aliases(self) -> dict[str, Path]:
        if self._aliases is None:
            found: dict[str, Path] = {}
            for device in self.devices():
                if device.qemu_idstr:
                    found.setdefault(device.qemu_idstr, device.path)
            for block in self.ram_blocks():
                if block.qemu_idstr:
                    found.setdefault(block.qemu_idstr, block.path)
            self._aliases = found
        return self._aliases

    def pread(self, offset: int, length: int, what: str) -> bytes:
        return self._io.pread(offset, length, what)

    @property
    def fd(self) -> int:
        return self._io.fd

    def close(self) -> None:
        self._io.close()
