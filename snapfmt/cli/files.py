"""Commands over snapshot files: info, dump, extract, verify, write, convert, diff."""

from __future__ import annotations

import os
import sys

import click

from snapfmt import render
from snapfmt.cli.base import (
    EXIT_DIFFERENT,
    EXIT_OK,
    block_file_option,
    cli,
    emit,
    existing_file,
    json_option,
    progress,
    quiet_option,
    supplied,
)
from snapfmt.errors import FormatError, UnsupportedError
from snapfmt.model import Snapshot
from snapfmt.opener import open_pair, open_snapshot
from snapfmt.ops import inspect

salvage_option = click.option(
    "--salvage",
    is_flag=True,
    help="Keep what is whole in a damaged or cut file (a QEMU stream, a native file); "
    "say what is lost (exit 1).",
)


def open_or_salvage(file: str) -> Snapshot:
    """*file* opened; a stream or native file too damaged to open is opened to salvage
    it (what is whole before the damage, inspect.damage says where it is).  Any other file that
    cannot be opened raises as open_snapshot does."""
    try:
        return open_snapshot(file)
    except UnsupportedError:
        raise
    except FormatError as e:
        try:
            snap = open_snapshot(file, salvage=True)
        except FormatError:
            raise e from None
        if inspect.damage(snap) is None:  # (not a stream: salvaging changed nothing)
            snap.close()
            raise
        return snap


def with_block_files(snap: Snapshot, block_files: tuple[str, ...]) -> Snapshot:
    """*snap*, its blocks the file does not hold read from the files --block-file names."""
    if not block_files:
        return snap
    from snapfmt.ops.supplied import Supplied

    try:
        return Supplied(snap, supplied(block_files))
    except BaseException:
        snap.close()
        raise


def said_lost(snap: Snapshot) -> int:
    """After --salvage: what was lost, on stderr, a line each; EXIT_DIFFERENT when
    anything was, else EXIT_OK."""
    document = inspect.damage(snap)
    if document is None:
        return EXIT_OK
    for line in inspect.damage_lines(document, render.shown):
        click.echo(f"snapfmt: salvaged: {render.one_line(line)}", file=sys.stderr)
    return EXIT_DIFFERENT


@cli.command()
@click.argument("file", type=existing_file)
@json_option
def info(file: str, as_json: bool) -> int:
    """Summary and section table: path, kind, driver, version, sizes.

    Reads only the index and the small device sections, whatever the file's size.  A
    damaged or cut file (a QEMU stream or a native file) is shown as what is whole
    before the damage, with where the damage is and what is lost (exit 1).

    \b
    Example:
      snapfmt info samples/basic.snap --json
    """
    with open_or_salvage(file) as snap:
        result = inspect.info(snap)
    emit(render.to_json(render.info_json(result)) if as_json else render.info_text(result))
    return EXIT_OK if result.damage is None else EXIT_DIFFERENT


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
@salvage_option
@block_file_option
@quiet_option
def extract_cmd(
    file: str,
    selector: str | None,
    output: str | None,
    everything: bool,
    directory: str | None,
    salvage: bool,
    block_files: tuple[str, ...],
    quiet: bool,
) -> int:
    """Copy sections out: device state bytes, raw RAM block contents.

    With --all, every section goes under DIR (names can never leave it), together with a
    manifest.toml that 'snapfmt write' turns back into the snapshot.

    \b
    Examples:
      snapfmt extract samples/basic.snap /pc.ram -o pc.ram.bin
      snapfmt extract samples/basic.snap --all -d out/
      snapfmt extract cut.mig --all -d out/ --salvage
    """
    from snapfmt.ops import extract

    if everything == bool(selector) or everything != bool(directory) or bool(output) == everything:
        raise click.UsageError("give either SELECTOR -o OUT, or --all -d DIR")
    with (
        with_block_files(open_snapshot(file, salvage), block_files) as snap,
        progress(inspect.ram_bytes(snap), "extracting", quiet) as tick,
    ):
        if directory:
            emit(render.extracted_text(extract.extract_all(snap, directory, tick)))
        elif selector and output:
            item = extract.extract_one(snap, selector, output, tick)
            if output != "-":  # (the section went to standard output)
                emit(render.extracted_text([item]))
        return said_lost(snap)


@cli.command()
@click.argument("file", type=existing_file)
@json_option
@quiet_option
def verify(file: str, as_json: bool, quiet: bool) -> int:
    """Check the structure and every checksum and chunk hash.

    Each bad chunk is reported with its section path and byte range; a damaged or cut
    QEMU stream with where the damage is and what is lost.  Exit 0 when all is well, 1
    when anything is wrong, 2 when the file cannot be opened at all.

    \b
    Example:
      snapfmt verify samples/basic.snap
    """
    from snapfmt.ops.verify import verify as verify_snapshot

    with (
        open_or_salvage(file) as snap,
        progress(inspect.ram_bytes(snap), "verifying", quiet) as tick,
    ):
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
@click.option("--parent", type=existing_file,
              help="Write a native delta: only what differs from this native snapshot.")  # fmt: skip
@click.option("--mapped-ram", is_flag=True,
              help="qemu: lay RAM out by page offset, as QEMU's mapped-ram capability does.")  # fmt: skip
@salvage_option
@block_file_option
@quiet_option
def convert_cmd(
    source: str, target: str, to: str | None, xml_file: str | None, compression: str,
    parent: str | None, mapped_ram: bool, salvage: bool, block_files: tuple[str, ...],
    quiet: bool,
) -> int:  # fmt: skip
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
      snapfmt convert second.mig second.snap --parent first.snap
      snapfmt convert vm.snap vm.mig --to qemu --mapped-ram   # for migrate-incoming file:
    """
    from snapfmt.ops import convert as convert_mod

    xml = convert_mod.read_xml(xml_file) if xml_file is not None else None
    with (
        with_block_files(open_snapshot(source, salvage), block_files) as snap,
        progress(inspect.ram_bytes(snap), "converting", quiet) as tick,
    ):
        made = convert_mod.convert(snap, target, to, tick, xml, compression, parent, mapped_ram)
        emit(f"wrote {target} ({made}{' delta' if parent else ''}, "
             f"{render.human(os.path.getsize(target))})")  # fmt: skip
        return said_lost(snap)


@cli.command()
@click.argument("source", metavar="DELTA", type=existing_file)
@click.argument("target", metavar="OUT")
@quiet_option
def flatten(source: str, target: str, quiet: bool) -> int:
    """Write a delta snapshot as a standalone native file: every chunk its chain of
    parents holds is copied in.  Written atomically.

    \b
    Example:
      snapfmt flatten second.snap second-full.snap
    """
    from snapfmt.ops import convert as convert_mod

    with (
        open_snapshot(source) as snap,
        progress(inspect.ram_bytes(snap), "flattening", quiet) as tick,
    ):
        convert_mod.convert(snap, target, "native", tick)
    emit(f"wrote {target} (native, {render.human(os.path.getsize(target))})")
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
