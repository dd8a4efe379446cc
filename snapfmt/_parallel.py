"""A bounded, order-keeping parallel map for the hot paths (chunk encode and decode).

zstandard and xxhash release the GIL, so threads give real parallelism on that work.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS = max(1, os.cpu_count() or 1)


def ordered_map(
    job: Callable[[T], R], items: Iterable[T], workers: int = WORKERS, window: int | None = None
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, job(item))`` in input order.

    At most *window* items (default ``2 * workers + 1``) are submitted and not yet
    yielded, counting the one just yielded, so memory stays bounded however many items
    there are; a caller that reuses buffers needs ``window + 1`` of them."""
    window = window or 2 * workers + 1
    items = iter(items)
    head = list(itertools.islice(items, 2))
    if len(head) < 2:  # one item: a pool would cost more than it saves
        for item in head:
            yield item, job(item)
        return
    items = itertools.chain(head, items)
    pending: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(job, item)))
                if len(pending) >= window:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()
        finally:
            for _, future in pending:
                future.cancel()
