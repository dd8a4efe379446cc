"""Walk a QEMU migration stream (QEVM v3) once, front to back, into a plain layout record.

The walk finds the configuration, every section (iterative ones split over START, PART
and END keep every span of their payload), the commands, EOF and the vmdesc after it;
the RAM section's records go to snapfmt.qemu.records, which keeps a page map per block
rather than the pages.  Every header, footer, command and the vmdesc framing is parsed
with its declaration in snapfmt.formats.qemu.  Device sections carry no length: each ends
at its footer (0x7e + section id) followed by a valid next header.
"""

from __future__ import annotations

import io
import re
from typing import Any, NamedTuple

from snapfmt._io import FileReader, json_loads, parse
from snapfmt.errors import FormatError, TruncatedError, UnsupportedError
from snapfmt.formats import qemu as qf
from snapfmt.qemu.records import Block, RamWalk

WINDOW = 1 << 16  # bytes the cursor holds: every header and small structure fits
_PARSE = 1 << 10  # bytes a parse starts from: most structures are a few bytes
_PARSE_MAX = 1 << 20  # and at most (a configuration's capability names, at worst)
_SEARCH = 1 << 23  # at most this much of a payload is searched for its footer at once
IDSTR = re.compile(rb"^[\x21-\x7e]+$")
_COMMANDS = frozenset(int(c) for c in qf.Command)


class Section(NamedTuple):
    """One section of the stream as the walk found it; ``spans`` are its payload's
    (offset, length) pieces, one per START, PART or END of an iterative section."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    header_offset: int
    iterative: bool
    spans: list[tuple[int, int]]


class Damage(NamedTuple):
    """Where a salvaging walk stopped: the stream is intact before *offset*; what is
    lost past it is unknown but for the sections already started there."""

    offset: int
    message: str  # what was wrong there
    lost_sections: tuple[str, ...]  # id strings of sections started but not complete
    ram_ended: bool = False  # the RAM section's END came before: no page of it is lost


class StreamLayout(NamedTuple):
    """What a walk found: everything a Snapshot needs, no open file."""

    machine: str
    page_size: int
    capabilities: tuple[str, ...]
    uuid: str | None
    sections: list[Section]  # in stream order, RAM included
    blocks: dict[str, Block]  # RAM blocks by QEMU id string, in block-list order
    commands: list[tuple[int, int]]  # (file offset, command)
    footers: bool | None  # whether sections end with footers; None: no section seen
    vmdesc: dict[str, Any] | None
    vmdesc_offset: int | None
    postcopy: int | None = None  # POSTCOPY_ADVISE's page-size summary; -1: its short form
    damage: Damage | None = None  # a salvaging walk's stop, when the stream is damaged


class Cursor:
    """Sequential reads over a file with absolute positions, through a window."""

    def __init__(self, reader: FileReader, start: int = 0) -> None:
        self.io = reader
        self.pos = start
        self._buf = b""
        self._at = 0  # file offset of _buf[0]

    def _window(self, need: int) -> int:
        """Make the window hold [pos, pos + need), and as much after as it can; return
        pos's index in it."""
        rel = self.pos - self._at
        if rel < 0 or rel + need > len(self._buf):
            length = min(max(need, WINDOW), self.io.size - self.pos)
            if length < need:
                raise self.error(
                    "stream ends early",
                    found=f"{self.io.size - self.pos} bytes left",
                    expected=f"{need}",
                )
            self._buf = self.io.pread(self.pos, length, "stream")
            self._at, rel = self.pos, 0
        return rel

    def error(self, what: str, cls: type[FormatError] = FormatError, **kw: Any) -> FormatError:
        return cls(what, file=self.io.name, offset=self.pos, **kw)

    def parse(self, con: Any, what: str) -> Any:
        """The declaration *con* parsed at the cursor, which moves past it.  Parsed from
        what the window holds (at least _PARSE bytes), and again from a larger window,
        up to _PARSE_MAX bytes, while that was too short."""
        left = self.io.size - self.pos
        need = min(_PARSE, left)
        while True:
            rel = self._window(need)
            stream = io.BytesIO(self._buf)
            stream.seek(rel)
            try:
                value = parse(con, stream, file=self.io.name, offset=self.pos, what=what)
            except TruncatedError as e:
                if len(self._buf) - rel >= left:  # the file ends inside it
                    where = f" ({e.field})" if e.field else ""
                    raise self.error(f"stream ends inside {what}{where}", TruncatedError,
                                     found=f"{left} bytes left") from None  # fmt: skip
                if need >= _PARSE_MAX:
                    raise
                need = min(4 * max(need, len(self._buf) - rel), _PARSE_MAX, left)
                continue
            self.pos += stream.tell() - rel
            return value

    def take(self, n: int) -> bytes:
        rel = self._window(n)
        self.pos += n
        return self._buf[rel : rel + n]

    def peek(self, n: int = 1) -> bytes:
        if self.pos + n > self.io.size:
            return b""
        rel = self._window(n)
        return self._buf[rel : rel + n]

    def u8(self) -> int:
        return self.take(1)[0]


def walk(reader: FileReader, start: int = 0, salvage: bool = False) -> StreamLayout:
    """The layout of the stream that starts at *start* of *reader*.  With *salvage*, a
    stream damaged or cut past its header gives the layout of what came before the
    damage, and says where it is (StreamLayout.damage), instead of an error."""
    return _Walk(reader, start, salvage).run()


class _Walk:
    def __init__(self, reader: FileReader, start: int, salvage: bool = False) -> None:
        self.io, self.file, self.base = reader, reader.name, start
        self.salvage = salvage
        self.ended: set[int] = set()  # iterative sections whose END came
        self.cur = Cursor(reader, start)
        self.machine, self.page_size, self.uuid = "", 4096, None
        self.capabilities: tuple[str, ...] = ()
        self.footers: bool | None = None
        self.sections: dict[int, Section] = {}
        self.commands: list[tuple[int, int]] = []
        self.package_end: int | None = None  # where a postcopy package's sections end
        self.ram: RamWalk | None = None
        self.postcopy: int | None = None  # page sizes POSTCOPY_ADVISE gave; -1: not said

    def run(self) -> StreamLayout:
        header = self.cur.parse(qf.FileHeader, "QEMU stream header")
        if header.version == qf.VERSION_COMPAT:
            raise self.cur.error(
                "QEMU savevm v2 streams are obsolete and not supported", UnsupportedError
            )
        if header.version != qf.VERSION:
            raise self.cur.error(
                "QEMU stream version not supported",
                UnsupportedError,
                found=header.version,
                expected=qf.VERSION,
            )
        damage = None
        try:
            self._sections()
            vmdesc, vmdesc_offset = self._after_eof()
        except UnsupportedError:
            raise
        except FormatError as e:
            if not self.salvage:
                raise
            vmdesc, vmdesc_offset = None, None
            damage = self._salvaged(e)
        ram = self.ram or self._ram_walk()
        return StreamLayout(
            self.machine, self.page_size, self.capabilities, self.uuid,
            list(self.sections.values()), ram.blocks, self.commands, self.footers,
            vmdesc, vmdesc_offset, self.postcopy, damage,
        )  # fmt: skip

    def _salvaged(self, error: FormatError) -> Damage:
        """After *error*: keep what is whole.  Device sections whose payload did not end
        (and iterative ones whose END never came) are dropped and named as lost.  (A
        page record is stored only once its bytes are found whole: a cut one is not.)"""
        ram_ended = any(s.idstr == "ram" for i, s in self.sections.items() if i in self.ended)
        lost = []
        for section_id, section in list(self.sections.items()):
            if section.idstr == "ram":
                continue
            if not section.spans or (section.iterative and section_id not in self.ended):
                lost.append(section.idstr)
                del self.sections[section_id]
        offset = error.offset if error.offset is not None else self.cur.pos
        return Damage(offset, error.detail, tuple(lost), ram_ended)

    def _ram_walk(self) -> RamWalk:
        return RamWalk(self.cur, self.page_size, self.capabilities)

    def _sections(self) -> None:
        """Sections up to and including EOF, or up to the end of a packaged stream."""
        cur = self.cur
        while True:
            at = cur.pos
            if at == self.package_end:  # QEMU's postcopy packages end without an EOF
                return
            kind = cur.u8()
            if kind == qf.SectionType.CONFIGURATION and at == self.base + 8:
                self._configuration()
            elif kind in (qf.SectionType.START, qf.SectionType.FULL):
                self._start(at, kind)
            elif kind in (qf.SectionType.PART, qf.SectionType.END):
                self._part(at)
            elif kind == qf.SectionType.COMMAND:
                self._command(at)
            elif kind == qf.SectionType.EOF:
                return
            else:
                cur.pos = at
                raise cur.error(
                    "unknown section type", found=f"{kind:#04x}", expected="0x00-0x04, 0x07 or 0x08"
                )

    def _configuration(self) -> None:
        cur = self.cur
        length = int.from_bytes(cur.peek(4), "big")
        if length > 255:
            cur.pos += 4
            raise cur.error(
                "machine type name too long", found=length, expected="at most 255 bytes"
            )
        self.machine = cur.parse(qf.Configuration, "configuration").name
        while cur.peek() == bytes([qf.SectionType.SUBSECTION]):
            name = cur.parse(qf.Subsection, "configuration subsection").name
            if name == "configuration/target-page-bits":
                bits = cur.parse(qf.TargetPageBits, name).page_bits
                if not 10 <= bits <= 21:
                    raise cur.error("target page bits out of range", found=bits, expected="10-21")
                self.page_size = 1 << bits
            elif name == "configuration/capabilities":
                self.capabilities = tuple(cur.parse(qf.Capabilities, name).names)
            elif name == "configuration/uuid":
                self.uuid = cur.parse(qf.Uuid, name).uuid.hex()
            else:
                raise cur.error(f"unknown configuration subsection {name!r}", UnsupportedError)

    def _start(self, at: int, kind: int) -> None:
        cur = self.cur
        head = cur.parse(qf.SectionStartFull, "section header")
        raw = head.idstr.encode("latin-1")
        if not IDSTR.match(raw):
            cur.pos = at + 6 + len(raw)  # (just after the id string)
            raise cur.error("section id string is not printable", found=raw[:40])
        if head.section_id in self.sections:
            raise cur.error(f"section id {head.section_id} ({head.idstr}) appears twice")
        section = Section(head.section_id, head.idstr, head.instance_id, head.version_id, at,
                          kind == qf.SectionType.START, [])  # fmt: skip
        self.sections[head.section_id] = section
        self._payload(section)

    def _part(self, at: int) -> None:
        section_id = self.cur.parse(qf.SectionPartEnd, "section header").section_id
        section = self.sections.get(section_id)
        if section is None or not section.iterative:
            self.cur.pos = at
            raise self.cur.error("PART/END for a section that has no START", found=section_id)
        self._payload(section)
        if self.io.pread(at, 1, "section type")[0] == qf.SectionType.END:
            self.ended.add(section_id)

    def _payload(self, section: Section) -> None:
        cur = self.cur
        start = cur.pos
        if section.idstr == "ram":
            if section.version_id != 4:
                raise cur.error(
                    "RAM section version not supported",
                    UnsupportedError,
                    section="ram",
                    found=section.version_id,
                    expected=4,
                )
            if self.ram is None:
                self.ram = self._ram_walk()
            self.ram.section(self.postcopy)
            section.spans.append((start, cur.pos - start))
            self._footer(section)
            return
        end = self._find_footer(section, start)
        section.spans.append((start, end - start))
        cur.pos = end
        self._footer(section)

    def _footer(self, section: Section) -> None:
        cur = self.cur
        if self.footers is None:
            self.footers = cur.peek() == bytes([qf.SectionType.FOOTER])
        if not self.footers:
            return
        expected = qf.SectionFooter.build({"section_id": section.section_id})
        if cur.pos + len(expected) > self.io.size:  # a stream cut short: parsing says so
            cur.parse(qf.SectionFooter, "section footer")
        if cur.peek(len(expected)) != expected:
            raise cur.error(
                f"missing section footer for {section.idstr}",
                section=section.idstr,
                expected=expected.hex(" ", 4),
            )
        cur.parse(qf.SectionFooter, "section footer")

    def _find_footer(self, section: Section, start: int) -> int:
        """Where the footer after a device payload starts: 0x7e + section id, then a valid
        next section header (QEMU writes no payload length)."""
        if self.footers is False:
            raise self.cur.error(
                "device sections without footers (machine types up to 2.3) are not supported",
                UnsupportedError,
                section=section.idstr,
            )
        needle = qf.SectionFooter.build({"section_id": section.section_id})
        pos, size = start, self.io.size
        chunk = WINDOW  # most device states are small: start small, then grow
        while pos < size:
            window = self.io.pread(pos, min(chunk, size - pos), "stream")
            chunk = min(2 * chunk, _SEARCH)
            hit = window.find(needle)
            while hit >= 0:
                if self._plausible_next(pos + hit + len(needle)):
                    return pos + hit
                hit = window.find(needle, hit + 1)
            if pos + len(window) >= size:
                break
            pos += len(window) - len(needle) + 1
        raise FormatError(
            "missing section footer",
            file=self.file,
            offset=start,
            section=section.idstr,
            expected=f"{needle.hex(' ', 4)} after the payload",
        )

    def _plausible_next(self, at: int) -> bool:
        """Whether a valid section header, command or EOF starts at *at*."""
        if at == self.package_end:  # the end of a packaged stream: the outer one goes on
            return True
        if at >= self.io.size:
            return False
        head = self.io.pread(at, min(300, self.io.size - at), "stream")
        kind = head[0]
        if kind == qf.SectionType.EOF:
            if at + 1 == self.package_end:  # the EOF that ends a packaged stream
                return True
            rest = head[1:6]
            return not rest or (rest[0] == qf.SectionType.VMDESCRIPTION and head[6:7] == b"{")
        if kind in (qf.SectionType.START, qf.SectionType.FULL):
            if len(head) < 6 or head[5] == 0 or len(head) < 6 + head[5] + 8:
                return False
            start = qf.SectionStartFull.parse(head[1:])
            return (
                bool(IDSTR.match(head[6 : 6 + head[5]])) and start.section_id not in self.sections
            )
        if kind in (qf.SectionType.PART, qf.SectionType.END):
            if len(head) < 5:
                return False
            known = self.sections.get(qf.SectionPartEnd.parse(head[1:]).section_id)
            return known is not None and known.iterative
        if kind == qf.SectionType.COMMAND:
            return len(head) >= 5 and qf.CommandHead.parse(head[1:]).command in _COMMANDS
        return False

    def _command(self, at: int) -> None:
        cur = self.cur
        head = cur.parse(qf.CommandHead, "command")
        if head.command not in _COMMANDS:
            cur.pos = at
            raise cur.error("unknown command", found=head.command)
        data = cur.take(head.length)
        self.commands.append((at, head.command))
        if head.command == qf.Command.POSTCOPY_ADVISE:
            # postcopy-ram is on: the block list may carry page sizes.  The long form says
            # which page sizes the source's blocks use (the OR of them all).
            long = head.length == qf.PostcopyAdvise.sizeof()
            self.postcopy = qf.PostcopyAdvise.parse(data).host_page_sizes if long else -1
        if head.command == qf.Command.PACKAGED:
            self._package(head.length, data)

    def _package(self, length: int, data: bytes) -> None:
        """postcopy: a be32 length, then that many bytes holding sections up to an EOF."""
        cur = self.cur
        if length != qf.Packaged.sizeof():
            raise cur.error("packaged command with a bad length", found=length, expected=4)
        end = cur.pos + qf.Packaged.parse(data).length
        if end > self.io.size:
            raise cur.error("packaged stream runs past the end of the file", found=f"end {end:#x}")
        if self.package_end is not None:
            raise cur.error("packaged stream inside a packaged stream", UnsupportedError)
        self.package_end = end
        self._sections()
        self.package_end = None
        if cur.pos != end:
            raise cur.error(
                "packaged stream does not end at its EOF",
                found=f"{cur.pos:#x}",
                expected=f"{end:#x}",
            )

    def _after_eof(self) -> tuple[dict[str, Any] | None, int | None]:
        cur, size = self.cur, self.io.size
        if cur.pos == size:
            return None, None
        if cur.peek() != bytes([qf.SectionType.VMDESCRIPTION]):
            raise cur.error("bytes after EOF that are not a vmdesc", found=cur.peek().hex())
        length = cur.parse(qf.VmDescriptionHead, "vmdesc header").length
        at = cur.pos
        if length > size - at or length > 1 << 26:
            raise cur.error("vmdesc length runs past the end of the stream", found=length)
        try:
            desc = json_loads(self.io.pread(at, length, "vmdesc"))
        except (ValueError, RecursionError) as e:
            raise FormatError(
                "vmdesc is not valid JSON", file=self.file, offset=at, found=str(e)[:80]
            ) from None
        if not isinstance(desc, dict) or not isinstance(desc.get("devices", []), list):
            where = "$" if not isinstance(desc, dict) else "$.devices"
            raise FormatError(f"vmdesc is not an object with a device list ({where}: "
                              "expected " + ("an object" if where == "$" else "a list") + ")",
                              file=self.file, offset=at)  # fmt: skip
        if at + length != size:
            cur.pos = at + length
            raise cur.error("bytes after the vmdesc", found=f"{size - at - length} bytes")
        return desc, at
