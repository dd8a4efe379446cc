"""File I/O every back end shares: positioned reads that never pass the end of a file,
construct parsing whose errors become located snapfmt errors, positioned writes that go
on after short writes, and atomic output (write beside the target, fsync, rename over
it; on any error the target keeps what it had and the temporary file is removed)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from snapfmt.errors import ChecksumError, FormatError, SnapfmtError, TruncatedError

if TYPE_CHECKING:
    import construct

WRITE_PIECE = 1 << 20  # bytes per pwrite: much larger writes go slower through the page cache


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


def parse(con: construct.Construct, data: Any, *, file: str, offset: int, what: str) -> Any:
    """Parse *data* (bytes, or a binary stream positioned at *offset* of *file*) with the
    declaration *con*: the one place where construct's errors become snapfmt errors.
    An error names the field where parsing stopped (``error.field``) in its message."""
    import construct  # loaded with the first declaration used (snapfmt.formats)

    try:
        return con.parse(data) if isinstance(data, bytes | bytearray) else con.parse_stream(data)
    except (construct.ConstructError, UnicodeDecodeError) as e:
        raise _located(e, construct, file, offset, what) from None


def _located(error: Exception, construct: Any, file: str, offset: int, what: str) -> FormatError:
    # construct's path reads "(parsing) -> names -> items": the field is the last name
    steps = str(getattr(error, "path", "") or "").split(" -> ")
    names = [step for step in steps if step and not step.startswith("(") and step != "items"]
    field = names[-1] if names else None
    where = f" ({field})" if field else ""
    found: str | None = short(error)
    made: FormatError
    if isinstance(error, construct.ChecksumError):
        made = ChecksumError(f"{what} checksum does not match its bytes", file=file, offset=offset)
    elif isinstance(error, construct.ConstError):
        made = FormatError(f"{what}: bad magic", file=file, offset=offset, found=found)
    elif isinstance(error, construct.StreamError):
        made = TruncatedError(f"{what} is cut short{where}", file=file, offset=offset)
    elif isinstance(error, construct.StringError | UnicodeDecodeError):
        made = FormatError(f"{what} holds text that is not UTF-8{where}", file=file, offset=offset)
    else:
        made = FormatError(f"{what} is malformed{where}", file=file, offset=offset, found=found)
    made.field = field
    return made


def short(error: Exception) -> str:
    """The last line of an error message (construct's first names the path), at most
    120 characters."""
    lines = str(error).splitlines()
    return (lines[-1] if lines else type(error).__name__)[:120]


def json_loads(data: str | bytes) -> Any:
    """A JSON document, strictly (RFC 8259): NaN, Infinity and -Infinity, which Python's
    json module takes by default, are refused with ValueError like any other bad JSON."""
    return json.loads(data, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def json_dumps(document: Any, **options: Any) -> str:
    """*document* as strict JSON (ValueError on a NaN or infinite float)."""
    return json.dumps(document, allow_nan=False, **options)


def pwrite_all(fd: int, buffers: list[Any], offset: int) -> None:
    """Write *buffers* one after another at *offset*, going on after short writes."""
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        at = 0
        while at < len(view):
            done = os.pwrite(fd, view[at : at + WRITE_PIECE], offset)
            if done <= 0:
                raise OSError("pwrite wrote nothing")
            at += done
            offset += done


def file_mode() -> int:
    """What a plain open() would give a new file: 0o666 less the umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temp_beside(target: str) -> tuple[int, str]:
    """A new temporary file in the target's folder: (descriptor, name)."""
    folder = os.path.dirname(os.path.abspath(target))
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(
            dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp"
        )
    except OSError as e:
        raise SnapfmtError(f"{target}: cannot write there: {e.strerror}") from None
    os.fchmod(fd, file_mode())
    return fd, tmp


def commit(f: IO[bytes] | IO[str], tmp: str, target: str) -> None:
    """Flush and fsync *f*, close it, rename *tmp* over *target*, fsync the folder."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, target)
    fd = os.open(os.path.dirname(os.path.abspath(target)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(tmp: str) -> None:
    if os.path.exists(tmp):
        os.unlink(tmp)


@contextmanager
def replace(target: str, mode: str = "wb", buffering: int = -1) -> Iterator[IO[Any]]:
    """``with replace(path) as f:`` -- *target* gets the new contents only if the block
    finishes without an error."""
    fd, tmp = temp_beside(target)
    f = os.fdopen(fd, mode, buffering=buffering)
    try:
        yield f
        commit(f, tmp, target)
    except BaseException:
        f.close()
        discard(tmp)
        raise
