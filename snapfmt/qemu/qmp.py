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
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any

from snapfmt.errors import QemuError as QemuError  # defined in errors.py; re-exported here

BINARY = "qemu-system-x86_64"


def available(binary: str = BINARY) -> bool:
    return shutil.which(binary) is not None


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
        self._conn: socket.socket | None = None
        self._file: IO[str] | None = None

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
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(self._socket):
            if self._proc.poll() is not None:
                raise QemuError(f"QEMU exited at start: {self.stderr() or 'no message'}")
            if time.monotonic() > deadline:
                raise QemuError("QEMU did not open its QMP socket in time")
            time.sleep(0.01)
        while True:  # the socket file can exist before QEMU listens, or after it died
            self._conn = socket.socket(socket.AF_UNIX)
            self._conn.settimeout(self.timeout)
            try:
                self._conn.connect(self._socket)
                break
            except OSError:
                self._conn.close()
                if self._proc.poll() is not None:
                    raise QemuError(
                        f"QEMU exited at start: {self.stderr() or 'no message'}"
                    ) from None
                if time.monotonic() > deadline:
                    raise QemuError("QEMU did not accept QMP connections in time") from None
                time.sleep(0.01)
        self._file = self._conn.makefile("rw", encoding="utf-8")
        self._read()  # greeting
        self.command("qmp_capabilities")
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
            if self._file is not None and self._proc is not None and self._proc.poll() is None:
                with contextlib.suppress(QemuError, OSError):
                    self.command("quit")
        finally:
            if self._conn is not None:
                self._conn.close()
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

    def _read(self) -> dict[str, Any]:
        assert self._file is not None
        try:
            line = self._file.readline()
        except OSError:
            raise self._gone() from None
        if not line:
            raise self._gone()
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        assert self._file is not None
        request = {"execute": name, **({"arguments": arguments} if arguments else {})}
        try:
            self._file.write(json.dumps(request) + "\n")
            self._file.flush()
        except OSError:
            raise self._gone() from None
        while True:
            message = self._read()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise QemuError(
                    f"QEMU refused {name}: {message['error'].get('desc', message['error'])}"
                )

    def wait_migration(self) -> dict[str, Any]:
        """Poll until the migration in either direction completes or fails."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            status: dict[str, Any] = self.command("query-migrate")
            if status.get("status") in ("completed", "failed", "cancelled"):
                return status
            time.sleep(0.01)
        raise QemuError("migration did not finish in time")

    def save(self, path: str) -> None:
        """Write the paused machine's state as a migration stream to *path*."""
        self.command("migrate", uri=f"exec:cat > {shlex.quote(os.path.abspath(path))}")
        status = self.wait_migration()
        if status.get("status") != "completed":
            raise QemuError(
                f"migration to {path} {status.get('status')}: {status.get('error-desc', '')}"
            )

    def wait_incoming(self) -> str:
        """After ``incoming=``: wait until QEMU has loaded the stream, or refused it.

        Returns "loaded", or raises QemuError with QEMU's own message."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            state = self.command("query-status")["status"]
            if state in ("paused", "prelaunch", "running", "postmigrate"):
                migrate = self.command("query-migrate")
                if migrate.get("status") in (None, "completed") and state != "inmigrate":
                    return "loaded"
            if self._proc is not None and self._proc.poll() is not None:
                break
            time.sleep(0.02)
        raise QemuError(f"QEMU did not load the stream: {self.stderr() or 'no message'}")
