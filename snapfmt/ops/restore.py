"""restore: start QEMU from a snapshot's own machine record and load the snapshot into it.

The command line is rebuilt (snapfmt.ops.rebuild) and checked first: every file it names
must exist, and validate must find the rebuilt machine takes the snapshot (the machine
is captured from that very command line).  Then QEMU starts detached with
`-incoming defer`, the stream is written into a pipe it reads (QMP getfd,
`migrate-incoming fd:`), and QEMU is left running -- or paused -- with its QMP socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import IO, NamedTuple

from snapfmt.errors import QemuError, RebuildError, SnapfmtError
from snapfmt.model import Snapshot
from snapfmt.ops import rebuild
from snapfmt.qemu.qmp import BINARY, Qemu, Qmp, connect_started
from snapfmt.qemu.tree import devices

FD_NAME = "snapfmt-restore"


class Restored(NamedTuple):
    pid: int
    socket: str
    argv: list[str]
    state: str


def binary_for(record: dict[str, object], binary: str | None) -> str:
    """The QEMU to run: the one given, else the one the snapshot was saved with when it
    is here, else qemu-system-x86_64."""
    if binary:
        return binary
    saved = record.get("binary")
    return saved if isinstance(saved, str) and os.access(saved, os.X_OK) else BINARY


def cmdline(snap: Snapshot, binary: str | None = None) -> list[str]:
    """The QEMU command line that rebuilds *snap*'s machine (binary first)."""
    record = rebuild.record_of(snap)
    qemu = binary_for(record, binary)
    base = rebuild.base_args(record)
    missing = rebuild.missing_files(base)
    if missing:
        raise RebuildError(f"the machine needs {missing[0]}, which is not here")
    try:
        with Qemu(base, binary=qemu) as vm:
            assert vm.qmp is not None
            baseline = devices(vm.qmp)
    except QemuError as e:
        raise RebuildError(f"{qemu} does not start the saved machine: {e}") from None
    extra = rebuild.extra_devices(record, baseline)
    args = [*base, *rebuild.backends(record, extra)]
    for d in extra:
        args += ["-device", rebuild.device_arg(d)]
    return [qemu, *args]


def check(snap: Snapshot, argv: Sequence[str]) -> None:
    """Refuse a restore that would fail: a missing file, or validate's errors."""
    from snapfmt.ops.machine import capture
    from snapfmt.ops.validate import validate

    missing = rebuild.missing_files(argv)
    if missing:
        raise SnapfmtError(f"{missing[0]}: the restored machine needs it, and it is missing")
    description = capture(argv[1:], argv[0])
    result = validate(snap, description, "the rebuilt machine")
    if not result.compatible:
        first = result.errors[0]
        raise SnapfmtError(f"the rebuilt machine refuses the snapshot ({len(result.errors)} "
                           f"errors; first: {first.code}: {first.message})")  # fmt: skip


def restore(
    snap: Snapshot, binary: str | None = None, paused: bool = False,
    extra: Sequence[str] = (), socket_path: str | None = None,
) -> Restored:  # fmt: skip
    """Start QEMU with *snap*'s rebuilt command line (and *extra*), load *snap*."""
    from snapfmt.qemu.writer import checked_stream

    argv = [*cmdline(snap, binary), *extra]
    check(snap, argv)
    write_stream = checked_stream(snap, "the restored QEMU")
    folder = tempfile.mkdtemp(prefix="snapfmt-restore-")
    socket_path = socket_path or os.path.join(folder, "qmp.sock")
    log = os.path.join(folder, "qemu.log")
    run = [*argv, "-display", "none", "-incoming", "defer",
           "-qmp", f"unix:{socket_path},server=on,wait=off", *(["-S"] if paused else [])]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(run, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip
    try:
        try:
            qmp = connect_started(proc, socket_path, 30, lambda: _said(log))
        except QemuError as e:
            raise QemuError(f"QEMU refused the rebuilt command line: {e}") from None
        try:
            state = _load(qmp, write_stream, proc, log)
        finally:
            qmp.close()
    except BaseException:
        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)  # (a QEMU that runs keeps its folder)
        raise
    return Restored(proc.pid, socket_path, run, state)


def _said(log: str) -> str:
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            return " ".join(f.read().split())[-600:] or "no message"
    except OSError:
        return "no message"


def _load(qmp: Qmp, write_stream: Callable[[IO[bytes], None], None],
          proc: subprocess.Popen[bytes], log: str) -> str:  # fmt: skip
    read_end, write_end = os.pipe()
    try:
        qmp.send_fd(FD_NAME, read_end)
    finally:
        os.close(read_end)
    qmp.command("migrate-incoming", uri=f"fd:{FD_NAME}")
    try:
        with open(write_end, "wb", buffering=1 << 20) as pipe:
            write_stream(pipe, None)
    except BrokenPipeError:
        raise QemuError(f"QEMU stopped reading the snapshot: {_said(log)}") from None
    state = qmp.wait_loaded(proc, lambda: _said(log))
    return "running" if state == "running" else "paused"
