"""The whole snapfmt exception tree.

Every error snapfmt raises derives from :class:`SnapfmtError`.  Errors about a file's
contents carry where they were found (file, offset, section path) and what was found
against what was expected, so the command line can print them as one line.
"""

from __future__ import annotations


class SnapfmtError(Exception):
    """Base of every error snapfmt raises on purpose."""


class FormatError(SnapfmtError):
    """A file's bytes are not what its format requires.

    The message reads ``FILE: offset 0x…: SECTION: what was found, what was expected``;
    every part but *what* is optional.
    """

    field: str | None = None  # the declared field where parsing stopped, if known

    def __init__(
        self,
        what: str,
        *,
        file: str | None = None,
        offset: int | None = None,
        section: str | None = None,
        found: object = None,
        expected: object = None,
    ) -> None:
        self.what = what
        self.file = file
        self.offset = offset
        self.section = section
        self.found = found
        self.expected = expected
        super().__init__(self._compose())

    @property
    def detail(self) -> str:
        """What is wrong, with what was found and expected, but not where."""
        detail = self.what
        if self.found is not None:
            detail += f": found {self.found}"
        if self.expected is not None:
            detail += f", expected {self.expected}"
        return detail

    def _compose(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if self.offset is not None:
            parts.append(f"offset {self.offset:#x}")
        if self.section:
            parts.append(self.section)
        parts.append(self.detail)
        return ": ".join(parts)


class TruncatedError(FormatError):
    """The file ends before a structure it promises."""


class ChecksumError(FormatError):
    """Stored bytes do not match their checksum or content hash."""


class UnsupportedError(FormatError):
    """A structurally valid file uses a feature or version this snapfmt cannot read."""


class ParentError(FormatError):
    """A delta snapshot's parent is missing, is another file, or cannot be read."""


class RebuildError(SnapfmtError):
    """A saved machine record cannot be turned into a QEMU command line."""


class WriteError(SnapfmtError):
    """What was to be written cannot be: the message reads ``FILE: offset 0x…: what``,
    FILE being the file being written and the offset where the refused part would go."""

    def __init__(self, what: str, *, file: str, offset: int | None = None) -> None:
        self.what, self.file, self.offset = what, file, offset
        where = f"{file}: offset {offset:#x}" if offset is not None else file
        super().__init__(f"{where}: {what}")


class SelectorError(SnapfmtError):
    """A path or selector is malformed, or names no section, or several where one is needed."""


class PathSyntaxError(SelectorError):
    """A device path string does not follow the grammar of spec/paths.md."""


class ManifestError(SnapfmtError):
    """A write manifest is malformed or refers to something that cannot be used."""


class LayoutError(SnapfmtError):
    """A field layout is malformed, or state bytes do not fit it."""


class DescriptionError(SnapfmtError):
    """A machine description is malformed; the message names the JSON path."""


class GuestMemoryError(SnapfmtError):
    """A snapshot's guest-physical memory or CPU state cannot be laid out: a machine type
    whose memory map snapfmt does not know, or a section the layout needs is missing."""


class QemuError(SnapfmtError):
    """QEMU could not be started, or refused a command."""
