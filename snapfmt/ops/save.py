"""save: a running or paused QEMU straight into a native snapshot, streamed.

QEMU migrates into a pipe (QMP getfd, then `migrate fd:`); snapfmt.qemu.incoming splits
the stream as it comes: RAM pages go to the native writer's chunk encoder block by block
(snapfmt.native.staging: a block's path is known only from the device sections, which
QEMU sends last), the rest into a small skeleton stream that the ordinary reader opens
for the device state.  Memory stays bounded: pages pass through, the skeleton holds only
device state.  The guest is stopped for the save (so each page comes once, in order) and
runs again after it, if it ran before.  The `qemu` metadata document records the machine
(snapfmt.qemu.tree).  On any error the output is not written.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from snapfmt.errors import QemuError, SnapfmtError
from snapfmt.native.sources import Zeros
from snapfmt.native.staging import Staged, place, stage
from snapfmt.native.writer import Writer
from snapfmt.perf import heap
from snapfmt.qemu.incoming import Page, Splitter, pipe_reader
from snapfmt.qemu.qmp import Qmp
from snapfmt.qemu.tree import describe

if TYPE_CHECKING:
    from snapfmt.model import Snapshot
    from snapfmt.native.ramblock import NativeRamBlock

DOCUMENT = "qemu"  # the metadata document the machine record is kept in
FD_NAME = "snapfmt-save"
# Capabilities that change what the stream holds in ways save does not take apart.
REFUSED = ("xbzrle", "compress", "multifd", "postcopy-ram", "x-ignore-shared", "mapped-ram",
           "rdma-pin-all", "zero-blocks", "block", "dirty-bitmaps", "background-snapshot")  # fmt: skip
Progress = Callable[[int], None] | None
UNLIMITED = 1 << 40  # bytes per second: max-bandwidth during a save
HEAP_PAD = 64 << 20  # freed heap kept while the stream passes (perf.heap)


class Saved(NamedTuple):
    target: str
    machine: str
    devices: int
    ram_blocks: int
    ram_bytes: int
    resumed: bool


@contextlib.contextmanager
def connected(socket_path: str | None, command: Sequence[str]) -> Iterator[Qmp]:
    """A QMP connection to the QEMU at *socket_path*, or to one started paused from
    *command* (stopped again afterwards)."""
    if socket_path is not None:
        qmp = Qmp.connect(socket_path)
        try:
            yield qmp
        finally:
            qmp.close()
        return
    from snapfmt.qemu.qmp import Qemu

    binary, *args = command
    with Qemu(args, binary=binary) as vm:
        assert vm.qmp is not None
        yield vm.qmp


def save(qmp: Qmp, target: str, parent: str | None = None, progress: Progress = None) -> Saved:
    """Save the QEMU behind *qmp* to *target* (a delta of *parent*, if given)."""
    status = qmp.command("query-status")
    if status.get("status") in ("inmigrate", "finish-migrate"):
        raise QemuError(f"QEMU is {status['status']}: it has no state of its own to save")
    enabled = [c["capability"] for c in qmp.command("query-migrate-capabilities")
               if c.get("state") and c["capability"] in REFUSED]  # fmt: skip
    if enabled:
        raise QemuError(f"migration capabilities {', '.join(enabled)} are on; save reads "
                        "the plain stream (turn them off with migrate-set-capabilities)")  # fmt: skip
    running = bool(status.get("running"))
    limit = qmp.command("query-migrate-parameters").get("max-bandwidth")
    if running:
        qmp.command("stop")
    try:
        # unthrottled, as libvirt saves to a file: the guest is stopped, the rate limit
        # (128 MiB/s by default) only makes its pause longer
        qmp.command("migrate-set-parameters", **{"max-bandwidth": UNLIMITED})
        saved = _stream(qmp, target, parent, progress)
    finally:
        if isinstance(limit, int):
            with contextlib.suppress(SnapfmtError, OSError):
                qmp.command("migrate-set-parameters", **{"max-bandwidth": limit})
        if running:
            qmp.command("cont")
    return saved._replace(resumed=running)


def _stream(qmp: Qmp, target: str, parent: str | None, progress: Progress) -> Saved:
    read_end, write_end = os.pipe()
    try:
        qmp.send_fd(FD_NAME, write_end)
    finally:
        os.close(write_end)
    pipe = pipe_reader(read_end)
    # The machine record (qemu.tree.describe) is asked for by a thread while the stream
    # comes: a few hundred QMP round trips that QEMU answers while it migrates (0.33 s
    # for a pc guest, nearly all of it waiting).  The connection is that thread's until
    # the record is taken, or waited for on an error.
    from concurrent.futures import ThreadPoolExecutor, wait

    try:
        qmp.command("migrate", uri=f"fd:{FD_NAME}")
        with ThreadPoolExecutor(1, thread_name_prefix="snapfmt-describe") as pool:
            record = pool.submit(describe, qmp)
            try:
                with heap.kept(HEAP_PAD):
                    saved = _write(pipe, target, parent, record.result, progress)
            except BaseException:
                wait([record])
                with contextlib.suppress(SnapfmtError, OSError):
                    qmp.command("migrate_cancel")
                raise
    finally:
        pipe.close()
    result = qmp.wait_migration(30)  # (its stream has ended: it is finishing)
    if result.get("status") != "completed":
        os.unlink(target)
        raise QemuError(f"the migration {result.get('status')}: {result.get('error-desc', '')}")
    return saved


def _write(pipe: io.FileIO, target: str, parent: str | None,
           record: Callable[[], dict[str, Any]], progress: Progress) -> Saved:  # fmt: skip
    splitter = Splitter(pipe, "the migration stream")
    pages = _Peekable(splitter.pages())
    first = pages.peek()  # the configuration and block list come before any page
    writer = Writer(target, machine=splitter.machine, page_size=splitter.page_size,
                    capabilities=splitter.capabilities,
                    metadata={"uuid": splitter.uuid} if splitter.uuid else {},
                    parent=parent)  # fmt: skip
    staged: dict[str, Staged] = {}
    direct: dict[str, str] = {}  # QEMU id -> path of the blocks written straight away
    try:
        while first is not None:
            block = first.block
            if block in staged or block in direct:
                raise QemuError(f"QEMU sent pages of {block} again after other blocks")
            source = _pieces(pages, block, splitter)
            path = _own_path(splitter.machine, block)
            if path is not None:  # its path does not hang on the devices: no staging
                writer.add_ram_block(path, source, length=splitter.blocks[block],
                                     qemu_idstr=block, progress=progress)  # fmt: skip
                direct[block] = path
            else:
                theirs = _parent_block(writer, block)
                staged[block] = stage(writer, source, theirs=theirs, progress=progress)
            first = pages.peek()
        for block, length in splitter.blocks.items():  # blocks no page was sent for
            if block not in staged and block not in direct:
                staged[block] = stage(writer, [Zeros(length)])
        return _finish(writer, splitter, staged, direct, record)
    except BaseException:
        writer.abort()
        raise
    finally:
        for s in staged.values():
            s.close()


def _own_path(machine: str, idstr: str) -> str | None:
    """The path of a RAM block that names no PCI device (`pc.ram`): the same whatever the
    device sections say (spec/paths.md §3); None for one that does."""
    from snapfmt.qemu.paths import PathMapper

    if "/" in idstr:
        return None
    return str(PathMapper(machine, []).ram_block(idstr))


def _finish(writer: Writer, splitter: Splitter, staged: dict[str, Staged],
            direct: dict[str, str], record: Callable[[], dict[str, Any]]) -> Saved:  # fmt: skip
    """The device sections from the skeleton stream, the staged RAM blocks under the
    paths that stream gives them, the machine record; then the file is closed."""
    from snapfmt.opener import open_snapshot

    fd = os.memfd_create("snapfmt-skeleton")
    try:
        os.write(fd, splitter.skeleton)
        with open_snapshot(f"/proc/self/fd/{fd}") as skeleton:
            saved = _sections(writer, skeleton, staged, direct)
    finally:
        os.close(fd)
    writer.add_metadata(DOCUMENT, record())
    writer.close()
    return saved._replace(machine=splitter.machine)


def _sections(writer: Writer, skeleton: Snapshot, staged: dict[str, Staged],
              direct: dict[str, str]) -> Saved:  # fmt: skip
    from snapfmt.formats.native import SectionKind

    devices = blocks = ram = 0
    for section in skeleton.sections:
        path = section.path
        if section.kind == SectionKind.DEVICE and path is not None:
            d = skeleton.device(path)
            writer.add_device(path, d.data, driver=d.driver, vmstate_name=d.vmstate_name,
                              instance_id=d.instance_id, version_id=d.version_id,
                              layout=d.layout, qemu_idstr=d.qemu_idstr)  # fmt: skip
            devices += 1
        elif section.kind == SectionKind.RAM_BLOCK and path is not None:
            block = skeleton.ram_block(path)
            idstr = block.qemu_idstr or ""
            if idstr in direct:
                if direct[idstr] != str(path):  # (paths.md says they are the same)
                    raise QemuError(f"RAM block {idstr} was written as {direct[idstr]}, "
                                    f"but the stream names it {path}")  # fmt: skip
            else:
                place(writer, path, staged[idstr], idstr)
            blocks, ram = blocks + 1, ram + block.length
    return Saved(writer.target, "", devices, blocks, ram, False)


def _parent_block(writer: Writer, idstr: str) -> NativeRamBlock | None:
    """A delta's parent block for QEMU block *idstr* (found by its QEMU identity: the
    path is not known yet)."""
    parent = writer._parent
    if parent is None:
        return None
    path = parent.aliases().get(idstr)
    return writer._parent_block(path, writer.chunk_size) if path is not None else None


def _pieces(pages: _Peekable, block: str, splitter: Splitter) -> Iterator[bytes | Zeros]:
    """Block *block*'s bytes from its pages, which come in order: zeros for the pages
    not sent, then up to its length."""
    length, at = splitter.blocks[block], 0
    while (page := pages.peek()) is not None and page.block == block:
        if page.offset < at:
            raise QemuError(f"QEMU sent page {page.offset:#x} of {block} again (out of order)")
        if page.offset > at:
            yield Zeros(page.offset - at)
        if page.data is not None:
            yield page.data
        else:
            yield Zeros(page.length) if page.fill == 0 else bytes([page.fill]) * page.length
        at = page.offset + page.length
        pages.next()
    if at < length:
        yield Zeros(length - at)


class _Peekable:
    def __init__(self, it: Iterator[Page]) -> None:
        self._it, self._next = it, next(it, None)

    def peek(self) -> Page | None:
        return self._next

    def next(self) -> None:
        self._next = next(self._it, None)
