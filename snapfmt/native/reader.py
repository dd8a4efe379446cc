"""The native container's reader (spec/format.md): bytes to the model.

Opening reads the header, the footer and the index only, each parsed with its
declaration in snapfmt.formats.native; sections load on demand and every byte read is
checked against its checksum or chunk hash first.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import xxhash

from snapfmt._io import FileReader, json_loads, parse, short
from snapfmt.errors import (
    ChecksumError,
    FormatError,
    PathSyntaxError,
    TruncatedError,
    UnsupportedError,
)
from snapfmt.formats import native as nf
from snapfmt.model import CheckResult, Configuration, DeviceState, SectionInfo, Snapshot
from snapfmt.paths import Path

_KINDS = frozenset(int(k) for k in nf.SectionKind)


if TYPE_CHECKING:
    import construct

    from snapfmt.native.ramblock import NativeRamBlock


class NativeSnapshot(Snapshot):
    format_name = "native"

    def __init__(self, reader: FileReader, salvage: bool = False) -> None:
        """*salvage*: a file whose footer or index is lost or damaged opens with the
        sections found again front to back (snapfmt.native.salvage); ``damage`` then
        says where that stopped."""
        self._io = reader
        self.file = self.origin = reader.name
        self._config: Configuration | None = None
        self._aliases: dict[str, Path] | None = None
        self._parent: NativeSnapshot | None = None
        self.depth = 0  # how far down a chain of deltas this file was opened
        self.damage: tuple[int, str] | None = None  # (offset, why) of a salvaged file
        self.salvaging = salvage  # reads give a bad chunk as zeros, noted in lost_chunks
        self.lost_chunks: set[tuple[str, int, int, str]] = set()  # (path, offset, length, why)
        self._by_key: dict[tuple[int, str], SectionInfo] = {}
        self._read_header()
        try:
            self._read_footer_and_index()
        except UnsupportedError:
            raise
        except FormatError as e:
            if not salvage or self.flags & nf.HeaderFlag.DELTA:  # (a delta needs its id)
                raise
            self._salvage(e)

    def _salvage(self, error: FormatError) -> None:
        from snapfmt.native.salvage import salvage

        found = salvage(self._io)
        if not found.sections:
            raise error
        self.damage = (found.end, f"{error.detail}; the sections before this offset were "
                       f"found again without the index ({found.message})")  # fmt: skip
        self.snapshot_id = b""
        self.index_offset, self.index_length, self.index_hash = found.end, 0, 0
        self._by_key = {(int(s.kind), s.key): s for s in found.sections}
        self._sections = found.sections

    # -- opening -------------------------------------------------------------------------

    def parse(self, con: construct.Construct, data: Any, offset: int, what: str) -> Any:
        return parse(con, data, file=self.file, offset=offset, what=what)

    def _read_header(self) -> None:
        if self._io.size < nf.HEADER_SIZE:
            self._check_room()  # (it refuses: one message for any file too short)
        raw = self._io.pread(0, nf.HEADER_SIZE, "header")
        # the version first, before the checksum: a newer major may checksum otherwise
        fields = self.parse(nf.HeaderFields, raw, 0, "header")
        major, minor = fields.version_major, fields.version_minor
        if major != nf.VERSION_MAJOR:
            raise UnsupportedError(
                "native format version not supported",
                file=self.file,
                offset=8,
                found=f"{major}.{minor}",
                expected=f"major version {nf.VERSION_MAJOR}",
            )
        header = self.parse(nf.Header, raw, 0, "header").fields.value
        self.version = f"{major}.{minor}"
        self.version_minor = minor
        self.flags = nf.HeaderFlag(header.flags & 1)
        self.parent_id = bytes(header.parent_id)

    def _check_room(self) -> None:
        """A header and a footer fit: a file cut shorter has lost its footer."""
        if self._io.size < nf.HEADER_SIZE + nf.FOOTER_SIZE:
            raise TruncatedError(
                "file too short for a native snapshot",
                file=self.file,
                offset=0,
                found=f"{self._io.size} bytes",
                expected=f"at least {nf.HEADER_SIZE + nf.FOOTER_SIZE}",
            )

    def _read_footer_and_index(self) -> None:
        self._check_room()
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
        footer = self.parse(nf.Footer, raw, at, "footer").fields.value
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
        entries = self._parse_index(raw_index, footer.index_offset)
        if len(entries) != footer.section_count:
            raise FormatError(
                "section count differs between footer and index",
                file=self.file,
                offset=at + 28,
                found=len(entries),
                expected=footer.section_count,
            )
        self.snapshot_id = xxhash.xxh3_128_digest(raw_index)  # (§7: big-endian digest)
        self.index_offset = footer.index_offset
        self.index_length = footer.index_length
        self.index_hash = footer.index_hash
        self._sections = self._check_entries(entries)

    def _parse_index(self, raw: bytes, offset: int) -> list[Any]:
        """The index's entries (nf.Index: a count, then each IndexEntry, parsed one by
        one so that an error names the entry), the count first checked against the
        index's length."""
        count = struct.unpack_from("<I", raw)[0] if len(raw) >= 4 else 0
        if count * nf.INDEX_ENTRY_MIN > len(raw) - 4:
            raise FormatError(
                "index entry count does not fit the index",
                file=self.file,
                offset=offset,
                found=count,
            )
        stream = io.BytesIO(raw)
        stream.seek(4)
        entries = []
        for number in range(count):
            at = offset + stream.tell()
            entries.append(self.parse(nf.IndexEntry, stream, at, f"index entry {number}"))
        if stream.tell() != len(raw):
            raise FormatError(
                "index has bytes after its last entry",
                file=self.file,
                offset=offset + stream.tell(),
                found=len(raw) - stream.tell(),
                expected=0,
            )
        return entries

    def _check_entry(self, number: int, e: Any, paths: set[str]) -> bool:
        """Check index entry *number* against the rules of spec/format.md §5 (adding its
        path to *paths*); returns whether this reader knows its kind."""
        where = f"section {number} ({e.key or 'configuration'})"

        def bad(what: str, cls: type[FormatError] = FormatError) -> FormatError:
            return cls(f"{where} {what}", file=self.file, offset=self.index_offset)

        known = e.kind in _KINDS
        if not known and not e.flags & nf.SectionFlag.OPTIONAL:
            raise bad(
                f"has kind {e.kind}, unknown to this reader and not optional", UnsupportedError
            )
        for start, length in ((e.offset, e.length), (e.data_offset, e.data_length)):
            if length and (start < nf.HEADER_SIZE or start + length > self.index_offset):
                raise bad(
                    f"lies outside the section area {nf.HEADER_SIZE:#x}-{self.index_offset:#x}: {start:#x}+{length:#x}"
                )
        if e.kind in (nf.SectionKind.DEVICE, nf.SectionKind.RAM_BLOCK):
            try:
                canonical = str(Path.parse(e.key))
            except PathSyntaxError as err:
                raise bad(f"has a bad path: {err}") from None
            if canonical != e.key:
                raise bad(f"has a path not in canonical form, expected {canonical}")
            if e.key in paths:
                raise bad("uses a path another section has")
            paths.add(e.key)
        elif e.kind == nf.SectionKind.CONFIGURATION and e.key:
            raise bad("is a configuration with a key; expected an empty key")
        elif e.kind == nf.SectionKind.METADATA and not e.key:
            raise bad("is a metadata section without a name")
        if (e.kind, e.key) in self._by_key:
            raise bad("appears twice")
        if e.kind != nf.SectionKind.RAM_BLOCK and (e.data_offset or e.data_length):
            raise bad("has a data region, which only RAM blocks have")
        return known

    def _check_entries(self, entries: list[Any]) -> list[SectionInfo]:
        sections: list[SectionInfo] = []
        self._by_key = {}
        paths: set[str] = set()
        for number, e in enumerate(entries):
            known = self._check_entry(number, e, paths)
            optional = bool(e.flags & nf.SectionFlag.OPTIONAL)
            info = SectionInfo(
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
            self._by_key[(e.kind, e.key)] = info
            sections.append(info)
        if (nf.SectionKind.CONFIGURATION, "") not in self._by_key:
            raise FormatError(
                "the snapshot has no configuration section",
                file=self.file,
                offset=self.index_offset,
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
        return self._by_key[(kind, key)]

    def section_for(self, path: Path) -> SectionInfo:
        key = str(path)
        found = self._by_key.get((nf.SectionKind.DEVICE, key)) or self._by_key.get(
            (nf.SectionKind.RAM_BLOCK, key)
        )
        if found is None:
            raise KeyError(key)
        return found

    @property
    def configuration(self) -> Configuration:
        if self._config is None:
            section = self._section(nf.SectionKind.CONFIGURATION, "")
            c = self._parse_body(nf.Configuration, section, "configuration")
            if (
                c.page_size & (c.page_size - 1)
                or not nf.MIN_PAGE_SIZE <= c.page_size <= nf.MAX_PAGE_SIZE
            ):
                raise self._bad(
                    section,
                    "bad page size",
                    found=c.page_size,
                    expected=f"a power of two {nf.MIN_PAGE_SIZE}-{nf.MAX_PAGE_SIZE}",
                )
            metadata = self._json(c.metadata or "{}", section, "configuration metadata")
            if not isinstance(metadata, dict):
                raise self._bad(
                    section,
                    "configuration metadata is not a JSON object",
                    found=type(metadata).__name__,
                )
            self._config = Configuration(c.machine, c.page_size, tuple(c.capabilities), metadata)
        return self._config

    def _bad(self, section: SectionInfo, what: str, **kw: Any) -> FormatError:
        return FormatError(
            what,
            file=self.file,
            offset=section.offset,
            section=section.key or "configuration",
            **kw,
        )

    def _parse_body(self, con: construct.Construct, section: SectionInfo, what: str) -> Any:
        """Parse a whole body (checked against its checksum); trailing bytes are an error."""
        body = self.body(section)
        parsed = self.parse(con, body, section.offset, what)
        used = len(con.build(parsed))
        if used != len(body):
            raise self._bad(
                section,
                f"{what} does not fill its section",
                found=f"{used} bytes",
                expected=f"{len(body)}",
            )
        if section.size != len(body):
            raise self._bad(
                section,
                "index size disagrees with the section",
                found=section.size,
                expected=len(body),
            )
        return parsed

    def _json(self, text: str, section: SectionInfo, what: str) -> Any:
        try:
            return json_loads(text)
        except (ValueError, RecursionError) as e:
            raise self._bad(section, f"{what} is not valid JSON", found=short(e)) from None

    def device(self, path: Path) -> DeviceState:
        section = self._section(nf.SectionKind.DEVICE, str(path))
        body = self.body(section)
        head = self.parse(nf.DeviceState, body, section.offset, f"device {path}")
        head_size = len(nf.DeviceState.build(head))
        if head_size + head.state_length != len(body):
            raise self._bad(
                section,
                "device state length disagrees with the section length",
                found=head.state_length,
                expected=len(body) - head_size,
            )
        if head.state_length != section.size:
            raise self._bad(
                section,
                "index size disagrees with the state length",
                found=section.size,
                expected=head.state_length,
            )
        if head.path != section.key:
            raise self._bad(
                section, "device path differs from the index", found=head.path, expected=section.key
            )
        layout = self._json(head.layout, section, "field layout") if head.layout else None
        if layout is not None and not isinstance(layout, dict):
            raise self._bad(
                section, "field layout is not a JSON object", found=type(layout).__name__
            )
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
        from snapfmt.native.ramblock import NativeRamBlock  # with zstandard and a thread pool

        return NativeRamBlock(self, self._section(nf.SectionKind.RAM_BLOCK, str(path)))

    def metadata(self, name: str) -> Any:
        section = self._section(nf.SectionKind.METADATA, name)
        body = self.body(section)
        doc = self.parse(nf.Metadata, body, section.offset, f"metadata {name}")
        if 4 + len(doc.document.encode("utf-8")) != len(body):
            raise self._bad(section, "metadata document does not fill its section")
        if section.size != len(body) - 4:
            raise self._bad(
                section,
                "index size disagrees with the document",
                found=section.size,
                expected=len(body) - 4,
            )
        return self._json(doc.document, section, f"metadata {name}")

    def aliases(self) -> dict[str, Path]:
        """QEMU identifiers kept on sections; sections that cannot be read are skipped
        here (using them reports the problem)."""
        if self._aliases is None:
            found: dict[str, Path] = {}
            for section in self.sections:
                if section.kind not in (nf.SectionKind.DEVICE, nf.SectionKind.RAM_BLOCK):
                    continue
                try:
                    idstr = self._qemu_idstr(section)
                except FormatError:
                    continue
                if idstr:
                    found.setdefault(idstr, Path.parse(section.key))
            self._aliases = found
        return self._aliases

    def _qemu_idstr(self, section: SectionInfo) -> str:
        """The QEMU id string at the start of a device or RAM block body (not checksummed
        here: only used to find the section, which is checked when it is read)."""
        head = self.pread(section.offset, min(section.length, 3 * (2 + 0xFFFF)), "section head")
        con = nf.DeviceState if section.kind == nf.SectionKind.DEVICE else nf.RamBlockHead
        parsed = self.parse(con, head, section.offset, f"section {section.key}")
        return str(parsed.qemu_idstr)

    def parent(self) -> NativeSnapshot:
        """A delta's parent, opened and checked on first use (snapfmt.native.delta)."""
        if self._parent is None:
            from snapfmt.native.delta import open_parent

            self._parent = open_parent(self)
        return self._parent

    def check(self, progress: Callable[[int], None] | None = None) -> CheckResult:
        from snapfmt.native.check import check

        return check(self, progress)

    def pread(self, offset: int, length: int, what: str) -> bytes:
        return self._io.pread(offset, length, what)

    @property
    def fd(self) -> int:
        return self._io.fd

    def close(self) -> None:
        if self._parent is not None:
            self._parent.close()
        self._io.close()
