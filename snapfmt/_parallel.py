"""Order-keeping parallel maps for the hot paths.

ordered_map runs on threads, for chunk encode and decode: zstandard and xxhash release
the GIL, so threads give real parallelism on that work.  forked_map shares work with one
forked process, for work that threads would serialise: page faults (one address space)
and Python between the C calls (one GIL).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import Future

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
    from concurrent.futures import ThreadPoolExecutor  # (with logging: only when needed)

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


def forked_map(job: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """Yield ``job(item)`` for each item, in order, with every other item done by a
    forked child process at the same time (results come back pickled through a pipe).

    For work whose cost is page faults, or Python between C calls: threads in one
    address space queue for its page-table lock, and for the GIL; a second process has
    neither.  The child sees the parent's objects as they were at the fork, runs
    ahead of it by at most a pipe's worth of results, and its errors are raised here.
    Where fork is missing, or other threads are running (forking them is unsafe),
    everything runs here, one item after another.

    Both processes go through *items* each on its own (a generator is copied by the
    fork): they must come out the same in both, as a list or a range does.  Not a
    generator over a file object: the two processes would share its file offset."""
    rest = iter(items)
    head = list(itertools.islice(rest, 2))
    items = itertools.chain(head, rest)
    if len(head) < 2 or not hasattr(os, "fork") or threading.active_count() > 1:
        yield from map(job, items)
        return
    import pickle  # (here: commands that never fork do not pay for the imports)
    import signal

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the odd items, then leave without any clean-up of the parent's
        os.close(read_end)
        try:
            with os.fdopen(write_end, "wb") as out:
                for item in itertools.islice(items, 1, None, 2):
                    try:
                        message: tuple[str, Any] = ("ok", job(item))
                    except BaseException as e:  # raised again in the parent
                        message = ("error", e)
                    try:
                        data = pickle.dumps(message)
                        pickle.loads(data)  # what will not come back whole is sent as text
                    except Exception as e:
                        what = message[1] if message[0] == "error" else e
                        message = ("error", RuntimeError(f"{type(what).__name__}: {what}"))
                        data = pickle.dumps(message)
                    out.write(data)
                    out.flush()
                    if message[0] == "error":
                        break
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as results:
            for index, item in enumerate(items):
                if index % 2 == 0:
                    yield job(item)
                    continue
                try:
                    kind, value = pickle.load(results)
                except (EOFError, pickle.UnpicklingError):
                    raise RuntimeError("the worker process ended without its results") from None
                if kind == "error":
                    raise value
                yield value
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # reaped already (SIGCHLD ignored)
            os.waitpid(pid, 0)
