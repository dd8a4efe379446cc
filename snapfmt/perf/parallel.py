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
    unlike amounts or one core runs slower.  Which process does an item is not fixed.
    The child sees the parent's objects as they were at the fork.  An item's exception
    is raised here when its turn comes, as if raised here; no item after it is started
    here, and the child stops at its own.  At most _AHEAD results are held here (the
    child then waits on a full pipe).  Where fork is missing, or other threads are
    running (forking them is unsafe), everything runs here, one item after another:
    the plain version, ``map(job, items)``, which the tests hold this equal to."""
    items = list(items)
    if len(items) < 2 or not hasattr(os, "fork") or threading.active_count() > 1:
        yield from map(job, items)
        return
    fork = _Fork(job, items)
    try:
        yield from fork.results()
    finally:
        fork.close()


class _Fork:
    """One forked_map: the claims pipe, the results pipe and the child."""

    def __init__(self, job: Callable[[T], R], items: list[T]) -> None:
        self.job, self.items = job, items
        self.per = -(-len(items) // _TOKENS)  # items per token
        self.tokens = -(-len(items) // self.per)
        self.claims, claims_w = os.pipe()
        try:
            tokens = b"".join(t.to_bytes(4, "little") for t in range(self.tokens))
            os.write(claims_w, tokens)
        finally:
            os.close(claims_w)  # once the tokens are gone, a read gets end-of-file
        fds = [self.claims]
        try:
            self.inbox, outbox = os.pipe()
            fds += [self.inbox, outbox]
            self.pid = os.fork()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if self.pid == 0:  # the child: claims until none is left, then leaves
            os.close(self.inbox)
            try:
                self._child(outbox)
            finally:
                os._exit(0)  # (no clean-up: the parent's objects are not the child's)
        os.close(outbox)
        self.done: dict[int, tuple[str, Any]] = {}
        self.ended = False

    def claim(self) -> range:
        """The next claimed run of items; empty once every token is gone."""
        token = os.read(self.claims, 4)
        t = int.from_bytes(token, "little") if token else self.tokens
        return range(t * self.per, min((t + 1) * self.per, len(self.items)))

    def _child(self, outbox: int) -> None:
        import pickle

        with os.fdopen(outbox, "wb") as out:
            while claim := self.claim():
                for index in claim:
                    try:
                        message: tuple[int, str, Any] = (index, "ok", self.job(self.items[index]))
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

    def _read(self, n: int) -> bytes:
        """n bytes from the results pipe (unbuffered, so that select tells the truth),
        or fewer where the child ended first."""
        parts, left = [], n
        while left:
            part = os.read(self.inbox, min(left, 1 << 20))
            if not part:
                break
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def receive(self, block: bool) -> None:
        """Take the child's results: one, waiting for it if *block*, then any more
        already sent while fewer than _AHEAD are held (so that the child seldom waits)."""
        import pickle
        import select

        while not self.ended and (
            block or (len(self.done) < _AHEAD and select.select([self.inbox], [], [], 0)[0])
        ):
            head = self._read(8)
            size = int.from_bytes(head, "little")
            data = self._read(size) if len(head) == 8 else b""
            if not data or len(data) != size:  # (a pickle is never empty)
                self.ended = True
                break
            index, kind, value = pickle.loads(data)
            self.done[index] = (kind, value)
            block = False
        if block and self.ended:
            raise RuntimeError("the worker process ended without its results")

    def results(self) -> Iterator[Any]:
        done = self.done
        work: range = range(0)
        failed = len(self.items)  # no item from here on is started in this process
        for wanted in range(len(self.items)):
            while wanted not in done:
                # Tokens are claimed in order, and each process does its items in order:
                # an item not done, nor in this process's hands, is the child's.
                if work and work[0] < failed and (work[0] == wanted or len(done) < _AHEAD):
                    index, work = work[0], work[1:]
                    try:
                        done[index] = ("ok", self.job(self.items[index]))
                    except Exception as e:
                        done[index] = ("error", e)
                        failed = index
                    self.receive(False)
                elif (
                    not work
                    and failed == len(self.items)
                    and len(done) < _AHEAD
                    and (work := self.claim())
                ):
                    continue
                else:  # the child has it
                    self.receive(True)
            kind, value = done.pop(wanted)
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        import signal

        os.close(self.claims)
        os.close(self.inbox)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # reaped already (SIGCHLD ignored)
            os.waitpid(self.pid, 0)
