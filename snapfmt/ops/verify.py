"""verify: check a snapshot's structure and every checksum; returns findings, never prints.

What is checked is the back end's (Snapshot.check): for a native file every checksum,
chunk and that its parts tile the file; for a QEMU stream its vmdesc against its
sections (the walk that opened it checked the rest).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from snapfmt.model import Problem, Snapshot

__all__ = ["Problem", "Report", "verify"]


class Report(NamedTuple):
    file: str
    sections: int
    chunks: int
    bytes: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(snap: Snapshot, progress: Callable[[int], None] | None = None) -> Report:
    """Everything *snap*'s format lets one check, with every problem found."""
    return Report(snap.file, *snap.check(progress))
