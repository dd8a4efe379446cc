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


_TOKENS = 1024  # claims at most: 4 KiB of 4-byte tokens, within any pipe's capacity
_AHEAD = 64  # results the parent holds at most before it waits for the child's


def forked_map(job: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """Yield ``job(item)`` for each item, in order, sharing the items with one forked
    child process (results come back pickled through a pipe).

    For work whose cost is page faults, or Python between C calls: threads in one
    address space queue for its page-table lock, and for the GIL; a second process has
    neither.  Items are claimed as the two processes come to them (each reads the next
    token from one pipe, an atomic read), so neither waits on the other when items cost
    unlike amounts or one core runs slower: with every other item fixed to the child,
    the parent (which also handles the results) often finished 0.1 s after it.  Which
    process does an item is not fixed.  The child sees the parent's objects as they
    were at the fork.  An item's exception is raised here when its turn comes, as if
    raised here; no item after it is started here, and the child stops at its own.  At
    most _AHEAD results are held here (the child then waits on a full pipe).  Where fork
    is missing, or other threads are running (forking them is unsafe), everything runs
    here, one item after another."""
    items = list(items)
    if len(items) < 2 or not hasattr(os, "fork") or threading.active_count() > 1:
        yield from map(job, items)
        return
    import pickle  # (here: commands that never fork do not pay for the imports)
    import select
    import signal

    per = -(-len(items) // _TOKENS)  # items per token
    tokens = -(-len(items) // per)
    claims_r, claims_w = os.pipe()
    try:
        os.write(claims_w, b"".join(t.to_bytes(4, "little") for t in range(tokens)))
    finally:
        os.close(claims_w)  # once the tokens are gone, a read gets end-of-file

    def claimed() -> range:
        token = os.read(claims_r, 4)
        t = int.from_bytes(token, "little") if token else tokens
        return range(t * per, min((t + 1) * per, len(items)))

    try:
        results_r, results_w = os.pipe()
    except BaseException:
        os.close(claims_r)
        raise
    try:
        pid = os.fork()
    except BaseException:
        for fd in (claims_r, results_r, results_w):
            os.close(fd)
        raise
    if pid == 0:  # the child: claims until none is left, then leaves without clean-up
        os.close(results_r)
        try:
            with os.fdopen(results_w, "wb") as out:
                while claim := claimed():
                    for index in claim:
                        try:
                            message: tuple[int, str, Any] = (index, "ok", job(items[index]))
                        except BaseException as e:  # raised again in the parent
                            message = (index, "error", e)
                        try:
                            data = pickle.dumps(message)
                            pickle.loads(data)  # what will not come back whole is sent as text
                        except Exception as e:
                            what = message[2] if message[1] == "error" else e
                            text = RuntimeError(f"{type(what).__name__}: {what}")
                            data = pickle.dumps((index, "error", text))
                        out.write(len(data).to_bytes(8, "little") + data)
                        out.flush()
                        if message[1] == "error":
                            return
        finally:
            os._exit(0)
    os.close(results_w)
    done: dict[int, tuple[str, Any]] = {}
    ended = False

    def read_exactly(n: int) -> bytes:
        """n bytes from the results pipe (unbuffered, so that select tells the truth),
        or fewer where the child ended first."""
        parts, left = [], n
        while left:
            part = os.read(results_r, min(left, 1 << 20))
            if not part:
                break
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def receive(block: bool) -> None:
        """Take the child's results: one, waiting for it if *block*, then any more
        already sent while fewer than _AHEAD are held (so that the child seldom waits)."""
        nonlocal ended
        while not ended and (
            block or (len(done) < _AHEAD and select.select([results_r], [], [], 0)[0])
        ):
            head = read_exactly(8)
            size = int.from_bytes(head, "little")
            data = read_exactly(size) if len(head) == 8 else b""
            if not data or len(data) != size:  # (a pickle is never empty)
                ended = True
                break
            index, kind, value = pickle.loads(data)
            done[index] = (kind, value)
            block = False
        if block and ended:
            raise RuntimeError("the worker process ended without its results")

    try:
        work: range = range(0)
        failed = len(items)  # no item from here on is started in this process
        for wanted in range(len(items)):
            while wanted not in done:
                # Tokens are claimed in order, and each process does its items in order:
                # an item not done, nor in the parent's hands, is the child's.
                if work and work[0] < failed and (work[0] == wanted or len(done) < _AHEAD):
                    index, work = work[0], work[1:]
                    try:
                        done[index] = ("ok", job(items[index]))
                    except Exception as e:
                        done[index] = ("error", e)
                        failed = index
                    receive(False)
                elif (
                    not work and failed == len(items) and len(done) < _AHEAD and (work := claimed())
                ):
                    continue
                else:  # the child has it
                    receive(True)
            kind, value = done.pop(wanted)
            if kind == "error":
                raise value
            yield value
    finally:
        os.close(claims_r)
        os.close(results_r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # reaped already (SIGCHLD ignored)
            os.waitpid(pid, 0)
