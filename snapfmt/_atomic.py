"""Atomic output: write beside the target, fsync, rename over it; on any error nothing is
left at the target path (it keeps what it had) and the temporary file is removed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from snapfmt.errors import SnapfmtError


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
