"""A real postcopy migration, recorded: a source QEMU migrates to a destination QEMU
(both 7.2, or both 10.0) through a relay that keeps every byte the source sends; after a
moment of precopy the source switches to postcopy (migrate-start-postcopy), so the
stream holds discard commands, the package (LISTEN, the devices, RUN) and RAM sent after
it.  The destination is the oracle: snapfmt's reading of the recording must equal the
RAM it ended with.  QEMU loads the recording from a file with postcopy-ram on; converted
(to a QEMU stream directly, and through native) it is written as QEMU saves with
postcopy-ram on but postcopy never started (POSTCOPY_ADVISE first, every section in
order: the package and the discards are how the pages travelled, not state), so that
QEMU loads the copy with postcopy-ram on and refuses it without, as it does the
original."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

import snapfmt
from snapfmt.errors import QemuError
from snapfmt.formats import qemu as qf
from snapfmt.ops.convert import convert
from snapfmt.qemu import qmp
from tests.helpers import need_qemu
from tests.test_stream_kinds_qemu import capability, loaded_and_saved_again, machine, same_ram


def _pump(source: socket.socket, sink: socket.socket, record: BinaryIO | None) -> None:
    while data := source.recv(1 << 16):
        if record is not None:
            record.write(data)
        sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _relay(listening: socket.socket, destination: Path, out: Path) -> None:
    """Accept the source, connect to *destination*, pass bytes both ways (the return
    path too) and write what the source sends to *out*."""
    with listening, open(out, "wb") as record:
        source, _ = listening.accept()
        dest = socket.socket(socket.AF_UNIX)
        dest.connect(str(destination))
        with source, dest:
            back = threading.Thread(target=_pump, args=(dest, source, None), daemon=True)
            back.start()
            _pump(source, dest, record)
            back.join(30)


def recorded_postcopy(binary: str, args: list[str], folder: Path) -> tuple[Path, Path]:
    """(the recorded stream, the destination's RAM saved after the migration)."""
    recording, after = folder / "postcopy.mig", folder / "after.mig"
    to_dest, to_relay = folder / "dest.sock", folder / "relay.sock"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(to_relay))
    listening.listen(1)
    listening.settimeout(30)  # (a source that never connects fails the test, not hangs it)
    with qmp.Qemu(args, binary=binary, incoming="defer") as dest:
        capability(dest, "postcopy-ram")
        dest.command("migrate-incoming", uri=f"unix:{to_dest}")
        relay = threading.Thread(target=_relay, args=(listening, to_dest, recording), daemon=True)
        relay.start()
        with qmp.Qemu(args, binary=binary) as source:
            capability(source, "postcopy-ram")
            # a downtime QEMU cannot meet while the guest dirties pages: it never
            # completes in precopy, and switches to postcopy once told to (at once: RAM
            # is what postcopy can send later)
            source.command("migrate-set-parameters",
                           **{"downtime-limit": 1, "max-bandwidth": 32 << 20})  # fmt: skip
            source.command("cont")
            time.sleep(0.2)
            source.command("migrate", uri=f"unix:{to_relay}")
            time.sleep(0.05)
            source.command("migrate-start-postcopy")
            status = source.wait_migration()
            assert status["status"] == "completed", status
        relay.join(30)
        deadline = time.monotonic() + 30
        while dest.command("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline, dest.command("query-migrate")
            time.sleep(0.05)
        dest.command("stop")
        capability(dest, "postcopy-ram", False)
        dest.save(str(after))
    return recording, after


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_a_recorded_postcopy_migration_reads_as_the_destination_loaded_it(
    tmp_path: Path, version: str
) -> None:
    binary = need_qemu(version)
    args = machine(tmp_path)
    stream, after = recorded_postcopy(binary, args, tmp_path)
    with snapfmt.open(stream) as snap:
        layout = snap.layout  # type: ignore[attr-defined]
        commands = [c for _, c in layout.commands]
        listen = next(at for at, c in layout.commands if c == qf.Command.POSTCOPY_LISTEN)
        ram = next(s for s in layout.sections if s.idstr == "ram")
        assert "postcopy-ram" in snap.configuration.capabilities
    for command in ("POSTCOPY_ADVISE", "POSTCOPY_RAM_DISCARD", "PACKAGED", "POSTCOPY_RUN"):
        assert qf.Command[command] in commands, command
    # RAM came after the package as well: postcopy really ran
    assert sum(n for at, n in ram.spans if at > listen) > 1 << 20
    same_ram(stream, after)
    # QEMU loads the recording from a file with postcopy-ram on: the same RAM again
    loaded_and_saved_again(binary, args, stream, tmp_path / "loaded.mig", "postcopy-ram")
    same_ram(tmp_path / "loaded.mig", after)
    # converted, directly and through native: still a postcopy-ram stream
    direct, native, back = (tmp_path / n for n in ("direct.mig", "copy.snap", "back.mig"))
    with snapfmt.open(stream) as snap:
        convert(snap, str(direct), "qemu")
        convert(snap, str(native), "native")
    with snapfmt.open(native) as snap:
        convert(snap, str(back), "qemu")
    for copy in (direct, back):
        with snapfmt.open(copy) as snap:
            kept = {c for _, c in snap.layout.commands}  # type: ignore[attr-defined]
        assert qf.Command.POSTCOPY_ADVISE in kept, copy
        again = tmp_path / f"{copy.stem}-again.mig"
        loaded_and_saved_again(binary, args, copy, again, "postcopy-ram")
        same_ram(again, after)
        with pytest.raises(QemuError):
            loaded_and_saved_again(binary, args, copy, tmp_path / "refused.mig")
