"""Bytes to model: open a snapshot file.

This is the one place where construct's errors become snapfmt errors (:func:`parse`).
Opening a native snapshot reads the header, the footer and the index only; sections load
on demand and every byte read is checked against its checksum or chunk hash first.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from typing import TYPE_CHECKING, Any, NamedTuple

from snapfmt import wrappers
from snapfmt._parallel import forked_map
from snapfmt.errors import (
    ChecksumError,
    FormatError,
    PathSyntaxError,
    TruncatedError,
    UnsupportedError,
)
from snapfmt.formats import libvirt as libvirt_format
from snapfmt.formats import native as nf
from snapfmt.formats import qemu as qemu_format
from snapfmt.model import Configuration, DeviceState, SectionInfo, Snapshot
from snapfmt.paths import Path
from snapfmt.qemu_reader import QemuStream

_KINDS = frozenset(int(k) for k in nf.SectionKind)


class IndexRow(NamedTuple):
    kind: int
    flags: int
    offset: int
    length: int
    checksum: int
    data_offset: int
    data_length: int
    size: int
    key: str


# IndexEntry up to and including the key's length (a test keeps it equal to the declaration)
INDEX_ENTRY_HEAD = struct.Struct("<HHIQQQQQQH")


def _parse_index(raw: bytes, file: str, offset: int) -> list[IndexRow]:
    """nf.Index, read with struct: construct would take seconds for a large index."""

    def cut(at: int, what: str) -> TruncatedError:
        return TruncatedError(f"index is cut short in {what}", file=file, offset=offset + at)

    if len(raw) < 4:
        raise cut(0, "its entry count")
    (count,) = struct.unpack_from("<I", raw)
    if count > (len(raw) - 4) // INDEX_ENTRY_HEAD.size:
        raise FormatError(
            "index entry count does not fit the index", file=file, offset=offset, found=count
        )
    rows = []
    at = 4
    for number in range(count):
        if at + INDEX_ENTRY_HEAD.size > len(raw):
            raise cut(at, f"entry {number}")
        kind, flags, _reserved, off, length, checksum, doff, dlen, size, key_length = (
            INDEX_ENTRY_HEAD.unpack_from(raw, at)
        )
        at += INDEX_ENTRY_HEAD.size
        if at + key_length > len(raw):
            raise cut(at, f"entry {number}'s key")
        try:
            key = raw[at : at + key_length].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(
                f"index entry {number} has a key that is not UTF-8", file=file, offset=offset + at
            ) from None
        at += key_length
        rows.append(IndexRow(kind, flags, off, length, checksum, doff, dlen, size, key))
    if at != len(raw):
        raise FormatError(
            "index has bytes after its last entry",
            file=file,
            offset=offset + at,
            found=len(raw) - at,
            expected=0,
        )
    return rows


if TYPE_CHECKING:
    import construct

    from snapfmt.ramblock import NativeRamBlock

__all__ = ["detect", "open_pair", "open_snapshot", "parse"]

_PAIR_MIN = 1 << 26  # below 64 MiB a second process costs more than it saves


def parse(con: construct.Construct, data: bytes, *, file: str, offset: int, what: str) -> Any:
    """Parse *data* with *con*; any construct error becomes a located FormatError."""
    import construct  # loaded with the first declaration used (snapfmt.formats)

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

    def __init__(self, path: str, label: str | None = None) -> None:
        self.name = label or path
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self.fd)
            what = "is a directory" if stat.S_ISDIR(info.st_mode) else "is a FIFO, device or socket"
            raise FormatError(f"{what}, not a snapshot file", file=path)
        self.size = info.st_size

    @classmethod
    def from_fd(cls, fd: int, label: str) -> FileReader:
        """A reader over an already open descriptor (which it then owns)."""
        reader = cls.__new__(cls)
        reader.name, reader.fd, reader.size = label, fd, os.fstat(fd).st_size
        return reader

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
    if head.startswith(b"QEVM"):
        return "qemu"
    return None


def open_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Open a snapshot file of any readable format (detected from its first bytes): the
    native container, a QEMU stream, a libvirt save image, or a QEMU stream compressed
    whole with gzip, bzip2, xz or zstd."""
    name = os.fspath(path)
    try:
        reader = FileReader(name)
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror}", file=name) from None
    try:
        return _open(reader, name)
    except BaseException:
        reader.close()
        raise


def open_pair(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> tuple[Snapshot, Snapshot]:
    """Open two snapshots, as :func:`open_snapshot` does.  Two large plain QEMU streams
    are walked at the same time, one of them by a forked process that sends its result
    back (:func:`snapfmt._parallel.forked_map`): opening one is mostly page faults, which
    a second process takes in parallel and a thread would not."""
    readers: list[FileReader] = []
    try:
        for name in (os.fspath(a), os.fspath(b)):
            readers.append(FileReader(name))
    except (OSError, FormatError):  # open_snapshot below says what is wrong
        for reader in readers:
            reader.close()
        readers = []
    if (
        len(readers) == 2
        and min(r.size for r in readers) >= _PAIR_MIN
        and all(r.pread(0, 4, "magic") == qemu_format.MAGIC for r in readers)
    ):
        try:
            streams = list(forked_map(lambda i: QemuStream(readers[i]), [0, 1]))
            for stream, reader in zip(streams, readers, strict=True):
                stream.attach(reader)  # whichever came from the child
        except BaseException:
            for reader in readers:
                reader.close()
            raise
        return streams[0], streams[1]
    for reader in readers:
        reader.close()
    first = open_snapshot(a)
    try:
        return first, open_snapshot(b)
    except BaseException:
        first.close()
        raise


def _open(reader: FileReader, name: str) -> Snapshot:
    head = reader.pread(0, min(reader.size, libvirt_format.HEADER_SIZE), "magic")
    kind = detect(head)
    if kind == "native":
        return NativeSnapshot(reader)
    if kind == "qemu":
        return QemuStream(reader)
    if head.startswith(b"LibvirtQemud"):
        wrapper, start = wrappers.libvirt_header(head, name)
        if start > reader.size:
            raise TruncatedError(
                "libvirt save image ends inside its XML", file=name, offset=reader.size
            )
        wrapper.domain_xml = wrappers.domain_xml(name, start - libvirt_format.HEADER_SIZE)
        if wrapper.compression in ("lzop", "sparse"):
            raise UnsupportedError(
                f"libvirt save images in {wrapper.compression} format are not supported",
                file=name,
                offset=28,
            )
        if wrapper.compression == "raw":
            if reader.pread(start, min(4, reader.size - start), "QEMU stream") != b"QEVM":
                raise FormatError(
                    "no QEMU stream after the libvirt header", file=name, offset=start
                )
            return QemuStream(reader, start, wrapper)
        return _decompressed(reader, name, start, wrapper.compression, wrapper)
    compression = wrappers.compression_of(head)
    if compression:
        return _decompressed(
            reader, name, 0, compression, wrappers.Wrapper(compression, compression)
        )
    if not head:
        raise FormatError("empty file, not a snapshot", file=name)
    raise FormatError(
        "not a snapshot format snapfmt reads",
        file=name,
        offset=0,
        found=f"first bytes {head[:8].hex()}",
        expected=f"native magic {nf.MAGIC.hex()} or QEMU's 5145564d",
    )


def _decompressed(
    reader: FileReader, name: str, start: int, compression: str, wrapper: wrappers.Wrapper
) -> Snapshot:
    """A QEMU stream inside compressed data: decompressed to a temporary file first."""
    fd = wrappers.decompress_to_temp(name, start, compression)
    inner = FileReader.from_fd(fd, f"{name} ({compression}-decompressed)")
    try:
        stream = QemuStream(inner, 0, wrapper)
    except BaseException:
        inner.close()
        raise
    reader.close()
    stream._origin = name
    return stream


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
        entries = _parse_index(raw_index, self.file, footer.index_offset)
        if len(entries) != footer.section_count:
            raise FormatError(
                "section count differs between footer and index",
                file=self.file,
                offset=at + 28,
                found=len(entries),
                expected=footer.section_count,
            )
        self.index_offset = footer.index_offset
        self.index_length = footer.index_length
        self.index_hash = footer.index_hash
        self._sections = self._check_entries(entries)

    def _check_entries(self, entries: list[IndexRow]) -> list[SectionInfo]:
        sections: list[SectionInfo] = []
        self._by_key: dict[tuple[int, str], SectionInfo] = {}
        paths: set[str] = set()
        for number, e in enumerate(entries):
            where = f"section {number} ({e.key or 'configuration'})"

            def bad(
                what: str, cls: type[FormatError] = FormatError, where: str = where
            ) -> FormatError:
                return cls(f"{where} {what}", file=self.file, offset=self.index_offset)

            known = e.kind in _KINDS
            optional = bool(e.flags & nf.SectionFlag.OPTIONAL)
            if not known and not optional:
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
        parsed = self._parse(con, body, section.offset, what)
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
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise self._bad(section, f"{what} is not valid JSON", found=_short(e)) from None

    def device(self, path: Path) -> DeviceState:
        section = self._section(nf.SectionKind.DEVICE, str(path))
        body = self.body(section)
        head = self._parse(nf.DeviceState, body, section.offset, f"device {path}")
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
        from snapfmt.ramblock import NativeRamBlock  # with zstandard and a thread pool

        return NativeRamBlock(self, self._section(nf.SectionKind.RAM_BLOCK, str(path)))

    def metadata(self, name: str) -> Any:
        section = self._section(nf.SectionKind.METADATA, name)
        body = self.body(section)
        doc = self._parse(nf.Metadata, body, section.offset, f"metadata {name}")
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
        parsed = self._parse(con, head, section.offset, f"section {section.key}")
        return str(parsed.qemu_idstr)

    def pread(self, offset: int, length: int, what: str) -> bytes:
        return self._io.pread(offset, length, what)

    @property
    def fd(self) -> int:
        return self._io.fd

    def close(self) -> None:
        self._io.close()
