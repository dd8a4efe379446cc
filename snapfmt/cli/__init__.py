"""The snapfmt command line: thin click wrappers over the library (DESIGN.md §5).

Exit codes: 0 success; 1 verify found problems; 2 usage error or unreadable input.
Errors are one line on stderr: ``snapfmt: error: FILE: offset 0x…: what``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from snapfmt import render
from snapfmt.cli import files, machine  # noqa: F401  (each registers its commands)
from snapfmt.cli.base import EXIT_BAD_INPUT, EXIT_OK, cli
from snapfmt.errors import SnapfmtError

__all__ = ["cli", "main"]


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: partial output files are removed


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, documented exit codes, no tracebacks."""
    import signal

    code: Any
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = cli.main(args=argv, prog_name="snapfmt", standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        e.show(file=sys.stderr)
        code = EXIT_BAD_INPUT
    except click.exceptions.Abort:
        click.echo("snapfmt: interrupted", file=sys.stderr)
        code = 130
    except SnapfmtError as e:
        click.echo(render.one_line(f"snapfmt: error: {e}"), file=sys.stderr)
        code = EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); point stdout at /dev/null so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    except KeyboardInterrupt:
        click.echo("snapfmt: interrupted", file=sys.stderr)
        code = 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        click.echo(render.one_line(f"snapfmt: error: {where}{e.strerror or e}"), file=sys.stderr)
        code = EXIT_BAD_INPUT
    except Exception as e:  # a case the checks above missed: still one line, never a traceback
        click.echo(
            render.one_line(f"snapfmt: error: unexpected {type(e).__name__}: {e}"), file=sys.stderr
        )
        code = EXIT_BAD_INPUT
    sys.exit(code if isinstance(code, int) else EXIT_OK)
