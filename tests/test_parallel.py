"""forked_map (a second process for page-fault-bound work), and open_pair and the diffs built on it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import snapfmt
from snapfmt import opener
from snapfmt.errors import FormatError, SnapfmtError
from snapfmt.ops.diff import diff
from snapfmt.perf.parallel import forked_map
from tests.helpers import SAMPLES
from tests.test_qemu_ram_walk import PAGE, build


def square(n: int) -> tuple[int, int]:
    return n * n, os.getpid()


PARENT = os.getpid()
_FLAGS: list[Path] = []  # files the parent and the child make when each starts an item
_DEADLINE: list[float] = []  # when a process stops waiting for the other (once per test)


@pytest.fixture
def meeting(tmp_path: Path) -> Iterator[None]:
    _FLAGS[:] = [tmp_path / "parent-started", tmp_path / "child-started"]
    _DEADLINE[:] = [time.monotonic() + 10]
    yield
    _FLAGS.clear()


def meet() -> None:
    """Each process, on starting an item, waits (10 s at most in a test) until the other
    has started one too, so that both take part however loaded the machine is: with a
    plain delay either one could claim every item before the other ran."""
    mine, theirs = _FLAGS if os.getpid() == PARENT else _FLAGS[::-1]
    mine.touch()
    while not theirs.exists() and time.monotonic() < _DEADLINE[0]:
        time.sleep(0.001)


def met_square(n: int) -> tuple[int, int]:
    meet()
    return square(n)


@pytest.mark.parametrize("count", [0, 1, 2, 5, 40])
def test_results_in_order_shared_with_a_child(count: int, meeting: None) -> None:
    results = list(forked_map(met_square if count >= 2 else square, list(range(count))))
    assert [r for r, _ in results] == [n * n for n in range(count)]
    pids = {pid for _, pid in results}
    if count >= 2:  # the items were shared out between two processes
        assert len(pids) == 2 and os.getpid() in pids
    else:
        assert pids <= {os.getpid()}


@pytest.mark.parametrize("count", [1023, 1024, 1025, 5000])
def test_many_items_are_claimed_a_group_at_a_time(count: int) -> None:
    """Over _TOKENS items, a token stands for a run of them: order still holds."""
    assert [r for r, _ in forked_map(square, range(count))] == [n * n for n in range(count)]


def slow_in_the_child(n: int) -> int:
    if os.getpid() != PARENT:
        time.sleep(0.05)
    return os.getpid()


def test_a_slower_process_takes_fewer_items() -> None:
    """Items go to whichever process is free: with the child five times slower than
    the parent, the parent does most of them (fixed turns would give each half)."""
    pids = list(forked_map(slow_in_the_child, list(range(40))))
    assert pids.count(PARENT) > 30


def fails_on(n: int) -> int:
    if n == 3:
        raise FormatError("bad record", file="x.mig", offset=16)
    return n


def test_a_child_error_is_raised_here_as_itself() -> None:
    seen = []
    with pytest.raises(FormatError, match=r"^x\.mig: offset 0x10: bad record$"):
        for value in forked_map(fails_on, list(range(8))):
            seen.append(value)
    assert seen == [0, 1, 2]


class Unpicklable(Exception):
    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("no")


def fails_oddly(n: int) -> int:
    meet()  # the child has started an item: it fails there
    if os.getpid() == PARENT:
        return n
    raise Unpicklable("lock held")


def test_an_error_that_will_not_pickle_comes_back_as_text(meeting: None) -> None:
    with pytest.raises(RuntimeError, match="Unpicklable: lock held"):
        list(forked_map(fails_oddly, [0, 1, 2]))


def test_stopping_early_leaves_no_child() -> None:
    results = forked_map(square, list(range(100)))
    assert next(results)[0] == 0
    results.close()  # the child is killed and reaped
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_no_fork_while_threads_run() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert {pid for _, pid in forked_map(square, list(range(6)))} == {os.getpid()}
    finally:
        stop.set()
        worker.join()


def test_open_pair_walks_the_second_stream_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opener, "PAIR_MIN", 0)
    pc, q35 = SAMPLES / "qemu" / "pc.mig", SAMPLES / "qemu" / "q35.mig"
    left, right = opener.open_pair(pc, q35)
    with left, right, snapfmt.open(q35) as plain:
        assert [s.key for s in right.sections] == [s.key for s in plain.sections]
        for path in (s.path for s in plain.sections if s.path):
            if plain.section_for(path).kind_name == "device":
                assert right.device(path).data == plain.device(path).data
            else:
                block = right.ram_block(path)
                assert block.read(0, block.length) == plain.ram_block(path).read(0, block.length)
        assert not diff(right, plain).sections


@pytest.mark.parametrize("moved", [{0}, {1}, {0, 1}, set()])
def test_open_pair_takes_layouts_from_either_process(
    monkeypatch: pytest.MonkeyPatch, moved: set[int]
) -> None:
    """Which process walks which stream is not fixed: a layout that came back pickled
    (walked by the child) serves as well as one walked here."""
    import pickle

    from snapfmt.perf import parallel

    def shared(job: Callable[[int], object], items: list[int]) -> Iterator[object]:
        for i in items:
            made = job(i)
            yield pickle.loads(pickle.dumps(made)) if i in moved else made

    monkeypatch.setattr(opener, "PAIR_MIN", 0)
    monkeypatch.setattr(parallel, "forked_map", shared)
    pc, q35 = SAMPLES / "qemu" / "pc.mig", SAMPLES / "qemu" / "q35.mig"
    left, right = opener.open_pair(pc, q35)
    with left, right, snapfmt.open(pc) as a, snapfmt.open(q35) as b:
        assert not diff(left, a).sections and not diff(right, b).sections


def test_open_pair_reports_the_second_file_as_open_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(opener, "PAIR_MIN", 0)
    cut = tmp_path / "cut.mig"
    cut.write_bytes((SAMPLES / "qemu" / "pc.mig").read_bytes()[:500_000])
    with pytest.raises(SnapfmtError) as alone:
        snapfmt.open(cut)
    with pytest.raises(SnapfmtError) as paired:
        opener.open_pair(SAMPLES / "qemu" / "pc.mig", cut)
    assert str(paired.value) == str(alone.value)


def test_diff_of_streams_over_several_spans(tmp_path: Path) -> None:
    """A 12 MiB block is three 4 MiB spans: the middle one is compared by the child."""
    pages = 3 * 1024
    records = [("pc.ram", i, i + 1) for i in range(pages)]
    changed = list(records)
    for i in (5, 1500, 1501, 3000):  # spans 0, 1, 1 and 2
        changed[i] = ("pc.ram", i, 10_000 + i)
    a, b = tmp_path / "a.mig", tmp_path / "b.mig"
    a.write_bytes(build({"pc.ram": pages}, [records]))
    b.write_bytes(build({"pc.ram": pages}, [changed]))
    with snapfmt.open(a) as sa, snapfmt.open(b) as sb:
        (ram,) = diff(sa, sb).sections
    assert ram.pages == 4
    assert ram.ranges == [
        (5 * PAGE, 6 * PAGE - 1),
        (1500 * PAGE, 1502 * PAGE - 1),
        (3000 * PAGE, 3001 * PAGE - 1),
    ]


def test_native_diff_over_several_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk tables of several pieces, each with more differing chunks than one batch:
    every other piece is decoded and compared by the child, and the result is that of a
    byte-by-byte comparison."""
    import random

    from snapfmt.native import ramblock

    monkeypatch.setattr(ramblock, "DIFF_STEP", 64)  # 256 chunks: 4 pieces

    rng = random.Random(3)
    image = bytearray(rng.randbytes(256 * PAGE))
    image[100 * PAGE : 140 * PAGE] = bytes(40 * PAGE)
    edited = bytearray(image)
    touched = sorted(rng.sample(range(256), 120))
    for page in touched:
        edited[page * PAGE + 7] ^= 0xFF
    paths = []
    for name, data in (("a", image), ("b", edited)):
        raw = tmp_path / f"{name}.img"
        raw.write_bytes(data)
        with snapfmt.Writer(tmp_path / f"{name}.snap", machine="pc", chunk_size=PAGE) as w:
            w.add_ram_block("/pc.ram", str(raw))
        paths.append(tmp_path / f"{name}.snap")
    with snapfmt.open(paths[0]) as a, snapfmt.open(paths[1]) as b:
        (ram,) = diff(a, b).sections
    assert (ram.pages, ram.bytes_changed) == (120, 120)
    expected = []
    for page in touched:
        if expected and expected[-1][1] + 1 == page * PAGE:
            expected[-1] = (expected[-1][0], (page + 1) * PAGE - 1)
        else:
            expected.append((page * PAGE, (page + 1) * PAGE - 1))
    assert ram.ranges == expected


class TwoArguments(Exception):
    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first}/{second}")


def fails_twice(n: int) -> int:
    meet()  # the child has started an item: it fails there
    if os.getpid() == PARENT:
        return n
    raise TwoArguments("x", "y")


def test_an_error_that_will_not_unpickle_comes_back_as_text(meeting: None) -> None:
    with pytest.raises(RuntimeError, match="TwoArguments: x/y"):
        list(forked_map(fails_twice, [0, 1, 2]))


def test_open_pair_leaks_no_descriptor_on_a_bad_second_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    monkeypatch.setattr(opener, "PAIR_MIN", 0)
    gc.collect()  # files other tests left for the collector close now, not during the test
    before = set(os.listdir("/proc/self/fd"))
    for bad in (tmp_path / "missing.mig", tmp_path):
        with pytest.raises(SnapfmtError):
            opener.open_pair(SAMPLES / "qemu" / "pc.mig", bad)
    assert not set(os.listdir("/proc/self/fd")) - before


def dies_in_the_child(n: int) -> int:
    meet()  # the child has started an item: it fails there
    if os.getpid() == PARENT:
        return n
    os.kill(os.getpid(), 9)
    return n


def test_a_child_that_dies_is_an_error_not_a_hang(meeting: None) -> None:
    with pytest.raises(RuntimeError, match="ended without its results"):
        list(forked_map(dies_in_the_child, [0, 1, 2]))


STARTED: list[int] = []


def fails_on_two(n: int) -> int:
    STARTED.append(n)
    if n == 2:
        raise ValueError("item 2")
    return n


def test_no_item_after_a_failure_is_started_here() -> None:
    """Once an item fails here, this process starts none after it (the error waits only
    for the items before it)."""
    STARTED.clear()
    with pytest.raises(ValueError, match="item 2"):
        list(forked_map(fails_on_two, list(range(200))))
    if 2 in STARTED:
        assert STARTED[-1] == 2


def test_heap_padding_is_set_and_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """perf.heap.kept sets glibc's M_TOP_PAD for its block only, back to the process's
    own (MALLOC_TOP_PAD_ or glibc's default) after, errors too; without glibc, nothing."""
    from snapfmt.perf import heap

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(heap, "_mallopt", lambda: lambda p, v: calls.append((p, v)) or 1)
    monkeypatch.delenv("MALLOC_TOP_PAD_", raising=False)
    with heap.kept(1 << 26):
        assert calls == [(-2, 1 << 26)]
    assert calls[-1] == (-2, 128 << 10)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "4096")
    with pytest.raises(KeyError), heap.kept(1 << 20):
        raise KeyError
    assert calls[-1] == (-2, 4096)
    monkeypatch.setattr(heap, "_mallopt", lambda: None)
    with heap.kept(1 << 20):
        pass
    assert len(calls) == 4


def test_heap_padding_finds_glibc_here() -> None:
    from snapfmt.perf import heap

    if os.confstr("CS_GNU_LIBC_VERSION"):
        assert heap._mallopt() is not None
