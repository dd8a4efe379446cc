"""Freed heap memory kept for reuse while a stream passes through large buffers.

glibc hands the free top of its heap back to the kernel as soon as more than a little
is free (128 KiB past its trim threshold, by default); the next large buffer then gets
fresh pages, each zeroed and mapped by a page fault of its own.  A save moves a
guest's RAM through buffers of a few MiB that come and go (runs of pages, the chunks
encoded from them), so nearly half of those pages were faulted in anew (139,000 faults
splitting a 1 GiB stream).  Measured on `snapfmt save` of a 1 GiB guest
(bench/save_bench.py, farm-bench A/B, medians of 7 pairs): with it 0.69 of the wall
time without it, and 0.81 once the splitter read the pipe into a buffer of its own; on
`convert` of a 1 GiB stream to native, no gain (1.05), so only save uses it.  The plain
version is glibc's own behaviour, the bytes the same either way (tests/test_incoming.py).
Inside ``kept``, glibc keeps *pad* bytes when it trims (mallopt M_TOP_PAD), so the same
pages serve again; afterwards the process's own setting comes back.  Elsewhere than
glibc it does nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

_M_TOP_PAD = -2  # mallopt's parameter (malloc.h)
_DEFAULT_PAD = 128 << 10  # glibc's own, unless MALLOC_TOP_PAD_ says otherwise


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        import ctypes

        return ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):  # (not glibc, or no such symbol)
        return None


@contextlib.contextmanager
def kept(pad: int) -> Iterator[None]:
    """Within: up to *pad* bytes of freed heap kept, not handed back to the kernel."""
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    mallopt(_M_TOP_PAD, pad)
    try:
        yield
    finally:
        try:
            before = int(os.environ.get("MALLOC_TOP_PAD_", _DEFAULT_PAD))
        except ValueError:
            before = _DEFAULT_PAD
        mallopt(_M_TOP_PAD, before)
