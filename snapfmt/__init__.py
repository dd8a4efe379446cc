"""snapfmt: read, write, inspect, diff and validate virtual-machine snapshot files."""

from __future__ import annotations

from snapfmt.errors import SnapfmtError
from snapfmt.reader import open_snapshot as open
from snapfmt.writer import Writer

__all__ = ["SnapfmtError", "Writer", "__version__", "open"]
__version__ = "0.1.0"
