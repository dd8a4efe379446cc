"""snapfmt: read, write, inspect, diff and validate virtual-machine snapshot files."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from snapfmt.errors import SnapfmtError
from snapfmt.opener import open_snapshot as open

if TYPE_CHECKING:
    from snapfmt.native.writer import Writer

__all__ = ["SnapfmtError", "Writer", "__version__", "open"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``snapfmt.Writer`` is imported on first use: commands that only read skip it."""
    if name == "Writer":
        from snapfmt.native.writer import Writer

        return Writer
    raise AttributeError(f"module 'snapfmt' has no attribute {name!r}")
