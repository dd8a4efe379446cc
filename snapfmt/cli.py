"""The snapfmt command line: thin click wrappers over the library (DESIGN.md §5).

Exit codes: 0 success; 1 verify found problems; 2 usage error or unreadable input.
Errors are one line on stderr: ``snapfmt: error: FILE: offset 0x…: what``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from snapfmt import __version__, render
from snapfmt.errors import SnapfmtError
from snapfmt.opener import open_pair, open_snapshot
from snapfmt.ops import inspect

if TYPE_CHECKING:
    from snapfmt.guest.physmap import PhysicalMap
    from snapfmt.model import Snapshot

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
    click.echo(text)


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


@cli.command()
@click.argument("file", type=existing_file)
@json_option
def info(file: str, as_json: bool) -> int:
    """Summary and section table: path, kind, driver, version, sizes.

    Reads only the index and the small device sections, whatever the file's size.

    \b
    Example:
      snapfmt info samples/basic.snap --json
    """
    with open_snapshot(file) as snap:
        result = inspect.info(snap)
    emit(render.to_json(render.info_json(result)) if as_json else render.info_text(result))
    return EXIT_OK


field_option = click.option(
    "--field",
    "patterns",
    multiple=True,
    metavar="PATTERN",
    help="Only device fields this glob names: a whole name, a part before '.', '[' or "
    "':' (env.segs), or the first word of what the value means (RAX, MAC). Repeatable.",
)


@cli.command()
@click.argument("file", type=existing_file)
@click.argument("selectors", nargs=-1)
@field_option
@json_option
def dump(file: str, selectors: tuple[str, ...], patterns: tuple[str, ...], as_json: bool) -> int:
    """Decoded device state and RAM block summaries.

    Device fields are decoded through their field layout, with absolute file offsets,
    virtio state included, and what values mean beside them (# RAX, # MAC ...); text
    folds runs of equal array elements (mac_reg[24..1023]).  State without a layout is
    shown as hex.  SELECTORS (spec/paths.md) limit the sections, --field the fields.

    \b
    Examples:
      snapfmt dump samples/basic.snap
      snapfmt dump samples/basic.snap e1000 pci.0/07.0 --json
      snapfmt dump samples/qemu/pc.mig --field 'virtio.vq' --field RIP
    """
    with open_snapshot(file) as snap:
        result = inspect.dump(snap, selectors, patterns)
    emit(render.to_json(render.dump_json(result)) if as_json else render.dump_text(result))
    return EXIT_OK


@cli.command(name="extract")
@click.argument("file", type=existing_file)
@click.argument("selector", required=False)
@click.option("-o", "--output", help="File to write the one selected section to ('-': stdout).")
@click.option("--all", "everything", is_flag=True, help="Extract every section.")
@click.option("-d", "--directory", help="With --all: the folder to write into.")
@quiet_option
def extract_cmd(
    file: str,
    selector: str | None,
    output: str | None,
    everything: bool,
    directory: str | None,
    quiet: bool,
) -> int:
    """Copy sections out: device state bytes, raw RAM block contents.

    With --all, every section goes under DIR (names can never leave it), together with a
    manifest.toml that 'snapfmt write' turns back into the snapshot.

    \b
    Examples:
      snapfmt extract samples/basic.snap /pc.ram -o pc.ram.bin
      snapfmt extract samples/basic.snap --all -d out/
    """
    from snapfmt.ops import extract

    if everything == bool(selector) or everything != bool(directory) or bool(output) == everything:
        raise click.UsageError("give either SELECTOR -o OUT, or --all -d DIR")
    with (
        open_snapshot(file) as snap,
        progress(inspect.ram_bytes(snap), "extracting", quiet) as tick,
    ):
        if directory:
            emit(render.extracted_text(extract.extract_all(snap, directory, tick)))
        elif selector and output:
            item = extract.extract_one(snap, selector, output, tick)
            if output != "-":  # (the section went to standard output)
                emit(render.extracted_text([item]))
    return EXIT_OK


@cli.command()
@click.argument("file", type=existing_file)
@json_option
@quiet_option
def verify(file: str, as_json: bool, quiet: bool) -> int:
    """Check the structure and every checksum and chunk hash.

    Each bad chunk is reported with its section path and byte range.  Exit 0 when all is
    well, 1 when anything is wrong, 2 when the file cannot be opened at all.

    \b
    Example:
      snapfmt verify samples/basic.snap
    """
    from snapfmt.ops.verify import verify as verify_snapshot

    with open_snapshot(file) as snap, progress(inspect.ram_bytes(snap), "verifying", quiet) as tick:
        report = verify_snapshot(snap, tick)
    emit(render.to_json(render.verify_json(report)) if as_json else render.verify_text(report))
    return EXIT_OK if report.ok else EXIT_DIFFERENT


@cli.command()
@click.argument("manifest_file", metavar="MANIFEST", type=existing_file)
@click.option("-o", "--output", required=True, help="The snapshot file to write.")
@quiet_option
def write(manifest_file: str, output: str, quiet: bool) -> int:
    """Build a native snapshot from a TOML manifest (spec/manifest.md).

    The output is written atomically: on any error nothing is left at OUTPUT.

    \b
    Example:
      snapfmt write samples/manifests/basic.toml -o basic.snap
    """
    from snapfmt.ops import manifest

    loaded = manifest.load(manifest_file)
    with progress(manifest.ram_bytes(loaded), "writing", quiet) as tick:
        manifest.build(loaded, output, tick)
    emit(f"wrote {output} ({render.human(os.path.getsize(output))})")
    return EXIT_OK


@cli.command(name="convert")
@click.argument("source", metavar="IN", type=existing_file)
@click.argument("target", metavar="OUT")
@click.option(
    "--to",
    "to",
    type=click.Choice(("native", "qemu", "libvirt")),  # convert.FORMATS (not imported at start)
    help="Output format (default: the other one of native and qemu).",
)
@click.option("--xml", "xml_file", type=existing_file,
              help="libvirt: the domain XML (default: the one the snapshot keeps).")  # fmt: skip
@click.option("--compress", "compression", default="raw",
              type=click.Choice(("raw", "gzip", "xz", "zstd")),
              help="libvirt: how the stream in the image is compressed.")  # fmt: skip
@quiet_option
def convert_cmd(
    source: str, target: str, to: str | None, xml_file: str | None, compression: str, quiet: bool
) -> int:
    """Convert between the native container, QEMU migration streams and libvirt save
    images.

    A QEMU stream keeps every section identity, so converting to native and back gives a
    stream QEMU restores; a libvirt save image's domain XML is kept in the native file,
    and `--to libvirt` writes an image `virsh restore` takes.  Written atomically.

    \b
    Examples:
      snapfmt convert samples/qemu/pc.mig pc.snap
      snapfmt convert pc.snap pc.mig --to qemu
      snapfmt convert vm.save vm.snap && snapfmt convert vm.snap back.save --to libvirt
    """
    from snapfmt.ops import convert as convert_mod

    xml = convert_mod.read_xml(xml_file) if xml_file is not None else None
    with (
        open_snapshot(source) as snap,
        progress(inspect.ram_bytes(snap), "converting", quiet) as tick,
    ):
        made = convert_mod.convert(snap, target, to, tick, xml, compression)
    emit(f"wrote {target} ({made}, {render.human(os.path.getsize(target))})")
    return EXIT_OK


@cli.command(name="diff")
@click.argument("a", type=existing_file)
@click.argument("b", type=existing_file)
@json_option
@click.option("--stat", is_flag=True, help="A table of counts per section.")
@click.option("--no-fields", is_flag=True, help="Summary lines only, no field or byte details.")
@click.option("--pages", is_flag=True, help="List the differing RAM ranges.")
@field_option
@quiet_option
def diff_cmd(a: str, b: str, as_json: bool, stat: bool, no_fields: bool, pages: bool,
             patterns: tuple[str, ...], quiet: bool) -> int:  # fmt: skip
    """What changed between two snapshots of any format, mixed.

    Sections are matched by path; device state is compared field by field, RAM page by
    page.  Exit 0 when identical, 1 when different, 2 on bad input (as diff(1)).

    \b
    Examples:
      snapfmt diff before.snap after.mig
      snapfmt diff a.mig b.mig --stat
      snapfmt diff a.mig b.mig --field MAC --field 'virtio.vq'
    """
    from snapfmt.ops import diff as diff_mod

    left, right = open_pair(a, b)
    with left, right, progress(inspect.ram_bytes(left), "comparing", quiet) as tick:
        result = diff_mod.diff(left, right, fields=not no_fields, patterns=patterns, progress=tick)
    if as_json:
        emit(render.to_json(render.diff_json(result)))
    elif stat:
        emit(render.diff_stat(result))
    else:
        emit(
            render.diff_text(result, fields=not no_fields, pages=pages, colour=sys.stdout.isatty())
        )
    return EXIT_OK if result.identical else EXIT_DIFFERENT


@cli.command(name="validate")
@click.argument("snapshot", type=existing_file)
@click.option(
    "--target",
    "target",
    required=True,
    type=existing_file,
    help="Machine description or -dump-vmstate JSON.",
)
@json_option
def validate_cmd(snapshot: str, target: str, as_json: bool) -> int:
    """Will the target machine accept the snapshot?  Checked before a restore is tried.

    Findings come in the order QEMU loads, each with what QEMU would say; exit 0 with no
    errors, 1 with any, 2 on bad input.  Reads no RAM contents.

    \b
    Example:
      snapfmt machine capture -o target.json -- qemu-system-x86_64 -M pc -m 1G
      snapfmt validate vm.mig --target target.json
    """
    from snapfmt.ops import machine as machine_mod
    from snapfmt.ops import validate as validate_mod

    description = machine_mod.load(target)
    with open_snapshot(snapshot) as snap:
        result = validate_mod.validate(snap, description, target)
    emit(
        render.to_json(render.validation_json(result))
        if as_json
        else render.validation_text(result)
    )
    return EXIT_OK if result.compatible else EXIT_DIFFERENT


def _address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number (0x… for hex)") from None


def _supplied(pairs: tuple[str, ...]) -> dict[str, str]:
    supplied = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not name or not file:
            raise click.BadParameter(f"{pair!r}: give BLOCK=FILE", param_hint="--block-file")
        supplied[name] = file
    return supplied


@cli.command(name="memory")
@click.argument("file", type=existing_file)
@click.option("--elf", "elf_out", help="Write an ELF core (as dump-guest-memory) to this file.")
@click.option("--raw", "raw_out", help="Write a flat image: file offset = physical address.")
@click.option("--read", "address", help="Print a hexdump at this guest-physical address.")
@click.option("--length", default="256", show_default=True, help="Bytes --read shows.")
@click.option("--ram", default="pc.ram", show_default=True, help="The machine's RAM block.")
@click.option("--block-file", "block_files", multiple=True, metavar="BLOCK=FILE",
              help="Read BLOCK from FILE (a block the snapshot does not carry).")  # fmt: skip
@json_option
@quiet_option
def memory_cmd(file: str, elf_out: str | None, raw_out: str | None, address: str | None,
               length: str, ram: str, block_files: tuple[str, ...], as_json: bool,
               quiet: bool) -> int:  # fmt: skip
    """Guest-physical memory: its map, an ELF core, a raw image, or bytes at an address.

    Lays the RAM blocks out where QEMU maps them for the machine type (spec/memory.md).
    The ELF core opens in gdb, crash and volatility3, with each CPU's registers.

    \b
    Examples:
      snapfmt memory vm.mig
      snapfmt memory vm.mig --elf vm.core
      snapfmt memory vm.mig --read 0xffff0 --length 16
    """
    from snapfmt import render_memory
    from snapfmt.guest.physmap import physical_map

    if [elf_out, raw_out, address].count(None) < 2:
        raise click.UsageError("give at most one of --elf, --raw and --read")
    with open_snapshot(file) as snap:
        layout = physical_map(snap, ram, _supplied(block_files))
        if address is not None:
            emit(_hexdump(layout, _address(address), _address(length)))
        elif elf_out or raw_out:
            emit(_write_memory(snap, layout, elf_out, raw_out, quiet))
        else:
            emit(render.to_json(render_memory.memory_json(layout)) if as_json
                 else render_memory.memory_text(layout))  # fmt: skip
    return EXIT_OK


def _hexdump(layout: PhysicalMap, address: int, length: int) -> Iterator[str]:
    from snapfmt.ops import memory

    return render.hexdump(memory.read(layout, address, length), address)


def _write_memory(
    snap: Snapshot, layout: PhysicalMap, elf_out: str | None, raw_out: str | None, quiet: bool
) -> str:
    from snapfmt import render_memory
    from snapfmt.ops import memory

    write = memory.write_elf if elf_out else memory.write_raw
    with progress(memory.guest_bytes(layout), "writing", quiet) as tick:
        return render_memory.memory_written(write(snap, elf_out or raw_out or "", layout, tick))


@cli.group(name="machine")
def machine_group() -> None:
    """Target machine descriptions (spec/machine.md).

    \b
    Example:
      snapfmt machine capture -o target.json -- qemu-system-x86_64 -M q35 -m 2G
    """


@machine_group.command(name="capture", context_settings={"ignore_unknown_options": True})
@click.option("-o", "--output", required=True, help="The description file to write.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def machine_capture(output: str, command: tuple[str, ...]) -> int:
    """Describe the machine a QEMU command line makes, from that QEMU itself.

    QEMU starts paused (-S, QMP on a private socket; no guest code runs); a probe
    migration gives its devices, versions and RAM blocks, and -dump-vmstate of the same
    binary its minimum versions.  No process or temporary file is left behind.

    \b
    Example:
      snapfmt machine capture -o target.json -- qemu-system-x86_64 -M pc -m 1G -device e1000
    """
    from snapfmt.ops import machine as machine_mod

    binary, *args = command
    description = machine_mod.capture(args, binary=binary)
    _write_json(output, description.to_json())
    emit(render.machine_written(output, description))
    return EXIT_OK


@machine_group.command(name="from-snapshot")
@click.argument("snapshot", type=existing_file)
@click.option("-o", "--output", required=True, help="The description file to write.")
def machine_from_snapshot(snapshot: str, output: str) -> int:
    """Describe the machine a snapshot was taken on.

    \b
    Example:
      snapfmt machine from-snapshot samples/qemu/pc.mig -o pc.json
    """
    from snapfmt.ops import machine as machine_mod

    with open_snapshot(snapshot) as snap:
        description = machine_mod.from_snapshot(snap)
    _write_json(output, description.to_json())
    emit(render.machine_written(output, description))
    return EXIT_OK


def _write_json(path: str, data: object) -> None:
    from snapfmt import _io as atomic

    with atomic.replace(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


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
        e.show()
        code = EXIT_BAD_INPUT
    except click.exceptions.Abort:
        click.echo("snapfmt: interrupted", err=True)
        code = 130
    except SnapfmtError as e:
        click.echo(render.one_line(f"snapfmt: error: {e}"), err=True)
        code = EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); point stdout at /dev/null so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    except KeyboardInterrupt:
        click.echo("snapfmt: interrupted", err=True)
        code = 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        click.echo(render.one_line(f"snapfmt: error: {where}{e.strerror or e}"), err=True)
        code = EXIT_BAD_INPUT
    except Exception as e:  # a case the checks above missed: still one line, never a traceback
        click.echo(render.one_line(f"snapfmt: error: unexpected {type(e).__name__}: {e}"), err=True)
        code = EXIT_BAD_INPUT
    sys.exit(code if isinstance(code, int) else EXIT_OK)
