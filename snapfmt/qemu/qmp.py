"""Drive a real QEMU over QMP: start it paused, save its state, restore, stop it.

Used by `samples/qemu/make_qemu_samples.py`, the real-QEMU tests and (later) `snapfmt
machine capture`.  The process and its private socket folder are always cleaned up, also
on errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import IO, Any

from snapfmt.errors import QemuError as QemuError  # defined in errors.py; re-exported here

BINARY = "qemu-system-x86_64"
_BATCH = 64  # commands sent before their answers are read
# QEMU's states once an incoming stream is loaded: with -S, the source's own state comes
# back (a guest saved before it ever ran is "prelaunch")
LOADED = ("running", "paused", "prelaunch", "postmigrate")


def available(binary: str = BINARY) -> bool:
    return shutil.which(binary) is not None


class Qmp:
    """A QMP connection to a QEMU's socket: ``Qmp.connect(path).command("query-status")``.

    Our own client rather than the QEMU project's `qemu.qmp`: that one is asyncio, and
    snapfmt's uses are a handful of synchronous commands and one passed file descriptor
    (send_fd, for `migrate fd:`), which this does in 60 lines with no dependency."""

    def __init__(self, conn: socket.socket, gone: Callable[[], QemuError] | None = None) -> None:
        self._conn = conn
        self._file: IO[str] = conn.makefile("rw", encoding="utf-8")
        self._gone = gone or (lambda: QemuError("QEMU went away (its QMP socket closed)"))

    @classmethod
    def connect(cls, path: str, timeout: float = 30.0) -> Qmp:
        """Connect to the QMP socket at *path* and leave the greeting's capability mode."""
        conn = socket.socket(socket.AF_UNIX)
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except OSError as e:
            conn.close()
            raise QemuError(f"{path}: cannot connect to QMP: {e.strerror or e}") from None
        qmp = cls(conn)
        try:
            qmp.greet()
        except BaseException:
            qmp.close()
            raise
        return qmp

    def greet(self) -> None:
        greeting = self._read()
        if "QMP" not in greeting:
            raise QemuError("the socket does not speak QMP (no greeting)")
        self.command("qmp_capabilities")

    def peer_pid(self) -> int | None:
        """The process on the other end (a local QEMU), from the socket's credentials."""
        try:
            raw = self._conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return None
        pid = int.from_bytes(raw[:4], sys.byteorder)
        return pid or None

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except (OSError, UnicodeDecodeError):
            raise self._gone() from None
        if not line:
            raise self._gone()
        try:
            message = json.loads(line)
        except ValueError:
            raise QemuError(f"QMP sent what is not JSON: {line[:80]!r}") from None
        if not isinstance(message, dict):
            raise QemuError(f"QMP sent what is not an object: {line[:80]!r}")
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        result = self.batch([(name, arguments)])[0]
        if isinstance(result, QemuError):
            raise result
        return result

    def batch(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Several commands sent at once, their results in order (a QemuError in the
        place of each one QEMU refused): one round trip instead of one each.  QEMU
        answers a connection's commands in the order they came."""
        results: list[Any] = []
        for first in range(0, len(requests), _BATCH):
            piece = requests[first : first + _BATCH]
            text = "".join(json.dumps({"execute": name, **({"arguments": args} if args else {})})
                           + "\n" for name, args in piece)  # fmt: skip
            try:
                self._file.write(text)
                self._file.flush()
            except OSError:
                raise self._gone() from None
            for name, _ in piece:
                results.append(self._reply(name))
        return results

    def _reply(self, name: str) -> Any:
        while True:  # (events come in between: skipped)
            message = self._read()
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                return QemuError(f"QEMU refused {name}: {desc}")

    def send_fd(self, name: str, fd: int) -> None:
        """Pass file descriptor *fd* to QEMU under *name* (QMP getfd)."""
        request = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}) + "\n"
        try:
            self._file.flush()
            socket.send_fds(self._conn, [request.encode()], [fd])
        except OSError:
            raise self._gone() from None
        while True:
            message = self._read()
            if "return" in message:
                return
            if "error" in message:
                raise QemuError(f"QEMU refused getfd: {message['error']}")

    def wait_migration(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll until the migration in either direction completes or fails."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status: dict[str, Any] = self.command("query-migrate")
            if status.get("status") in ("completed", "failed", "cancelled"):
                return status
            time.sleep(0.01)
        raise QemuError("migration did not finish in time")

    def wait_loaded(self, proc: subprocess.Popen[bytes], said: Callable[[], str],
                    timeout: float = 60.0) -> str:  # fmt: skip
        """After an incoming migration: wait until QEMU has loaded the stream (its state
        then: QEMU takes the source's own back with -S, "prelaunch" for a guest saved
        before it ran), or raise QemuError with QEMU's message (*said*)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = str(self.command("query-status")["status"])
            if state in LOADED:
                migrate = self.command("query-migrate")
                if migrate.get("status") in (None, "completed"):
                    return state
                if migrate.get("status") == "failed":
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        raise QemuError(f"QEMU did not load the stream: {said() or 'no message'}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._conn.close()


def connect_started(
    proc: subprocess.Popen[bytes], path: str, timeout: float, said: Callable[[], str],
    gone: Callable[[], QemuError] | None = None,
) -> Qmp:  # fmt: skip
    """The QMP connection of a QEMU just started as *proc*, once it listens on *path*
    (the socket file can exist before QEMU listens, or after it died); *said* gives
    QEMU's own words when it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise QemuError(f"QEMU exited at start: {said() or 'no message'}")
        if os.path.exists(path):
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(timeout)
            try:
                conn.connect(path)
            except OSError:
                conn.close()
            else:
                qmp = Qmp(conn, gone)
                qmp.greet()
                return qmp
        if time.monotonic() > deadline:
            raise QemuError("QEMU did not open its QMP socket in time")
        time.sleep(0.01)


class Qemu:
    """``with Qemu(["-M", "pc", ...]) as vm: vm.save("x.mig")``; QEMU starts with ``-S``."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        binary: str = BINARY,
        incoming: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.args = list(args)
        self.binary = binary
        self.incoming = incoming
        self.timeout = timeout
        self._folder = tempfile.mkdtemp(prefix="snapfmt-qmp-")
        self._socket = os.path.join(self._folder, "qmp.sock")
        self._log = os.path.join(self._folder, "stderr")
        self._proc: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> Qemu:
        if "-daemonize" in self.args:
            raise QemuError(
                "-daemonize is not supported: the QEMU snapfmt starts must stay its child"
            )
        argv = [
            self.binary,
            *self.args,
            "-S",
            "-display",
            "none",
            "-qmp",
            f"unix:{self._socket},server=on,wait=off",
        ]
        if self.incoming:
            argv += ["-incoming", self.incoming]
        with open(self._log, "wb") as log:
            try:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
                )
            except OSError as e:
                raise QemuError(f"cannot start {self.binary}: {e.strerror}") from None
        self.qmp = connect_started(self._proc, self._socket, self.timeout, self.stderr, self._gone)
        return self

    def stderr(self) -> str:
        try:
            with open(self._log, encoding="utf-8", errors="replace") as f:
                return " ".join(f.read().split())[-1500:]  # the end says why it stopped
        except OSError:
            return ""

    def close(self) -> None:
        """Stop QEMU (quit, then kill) and remove the socket folder."""
        try:
            if self.qmp is not None and self._proc is not None and self._proc.poll() is None:
                with contextlib.suppress(QemuError, OSError):
                    self.command("quit")
        finally:
            if self.qmp is not None:
                self.qmp.close()
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> Qemu:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- QMP ---------------------------------------------------------------------------------

    def _gone(self) -> QemuError:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        return QemuError(f"QEMU went away: {self.stderr() or 'no message'}")

    def command(self, name: str, **arguments: Any) -> Any:
        assert self.qmp is not None
        return self.qmp.command(name, **arguments)

    def wait_migration(self) -> dict[str, Any]:
        assert self.qmp is not None
        return self.qmp.wait_migration(self.timeout)

    def save(self, path: str) -> None:
        """Write the paused machine's state as a migration stream to *path*."""
        uri = f"exec:cat > {shlex.quote(os.path.abspath(path))}"
        for attempt in range(50):
            try:
                self.command("migrate", uri=uri)
                break
            except QemuError as e:
                # Just after an incoming migration QEMU may not yet have dropped its
                # yank instance (a bottom half does) and refuses another migration.
                if "duplicate yank instance" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.02)
        status = self.wait_migration()
        if status.get("status") != "completed":
            raise QemuError(
                f"migration to {path} {status.get('status')}: {status.get('error-desc', '')}"
            )

    def wait_incoming(self) -> str:
        """After ``incoming=``: wait until QEMU has loaded the stream, or refused it.

        Returns "loaded", or raises QemuError with QEMU's own message."""
        assert self.qmp is not None and self._proc is not None
        self.qmp.wait_loaded(self._proc, self.stderr, self.timeout)
        return "loaded"
