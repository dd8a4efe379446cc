"""What every command shares: the click group, common options, output and progress."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import click

from snapfmt import __version__, render

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT = 0, 1, 2

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (shape in README.md)."
)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
existing_file = click.Path(path_type=str)  # checked by the library, for one-line errors


def emit(lines: Iterable[str] | str) -> None:
    """Print one text (JSON, or a line) as it is, or text lines each escaped to one line:
    a control character in a name read from a file cannot split or forge a line."""
    text = lines if isinstance(lines, str) else "\n".join(map(render.one_line, lines))
    # file given: without it click caches each sys.stdout it meets, and keeps alive every
    # one a caller swapped in (with all it holds: a process running commands in-process,
    # as the fuzzer does, grew 10 MB a `dump --json` until its address space ran out)
    click.echo(text, file=sys.stdout)


@contextmanager
def progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr, only when stderr is a terminal and not --quiet."""
    if quiet or total <= 0 or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="snapfmt")
def cli() -> None:
    """Inspect, verify, extract and write VM snapshot files.

    \b
    Example:
      snapfmt info samples/basic.snap
    """


block_file_option = click.option(
    "--block-file", "block_files", multiple=True, metavar="BLOCK=FILE",
    help="Read RAM block BLOCK (QEMU id or path), which the file does not hold "
    "(x-ignore-shared), from FILE. Repeatable.",
)  # fmt: skip


def supplied(pairs: tuple[str, ...]) -> dict[str, str]:
    """--block-file BLOCK=FILE pairs as {BLOCK: FILE}."""
    found = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not name or not file:
            raise click.BadParameter(f"{pair!r}: give BLOCK=FILE", param_hint="--block-file")
        found[name] = file
    return found


def write_json(path: str, data: object) -> None:
    from snapfmt import _io as atomic

    with atomic.replace(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
