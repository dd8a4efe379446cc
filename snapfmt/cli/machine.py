"""Commands about machines: validate, memory, and the machine group."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from snapfmt import render, render_machine
from snapfmt.cli.base import (
    EXIT_DIFFERENT,
    EXIT_OK,
    cli,
    emit,
    existing_file,
    json_option,
    progress,
    quiet_option,
    supplied,
    write_json,
)
from snapfmt.opener import open_snapshot

if TYPE_CHECKING:
    from snapfmt.guest.physmap import PhysicalMap
    from snapfmt.model import Snapshot


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
        render.to_json(render_machine.validation_json(result))
        if as_json
        else render_machine.validation_text(result)
    )
    return EXIT_OK if result.compatible else EXIT_DIFFERENT


def _address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number (0x… for hex)") from None


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
        layout = physical_map(snap, ram, supplied(block_files))
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
    write_json(output, description.to_json())
    emit(render_machine.machine_written(output, description))
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
    write_json(output, description.to_json())
    emit(render_machine.machine_written(output, description))
    return EXIT_OK


@cli.command(name="save", context_settings={"ignore_unknown_options": True})
@click.option("--qmp", "socket_path", help="The QMP socket of a running or paused QEMU.")
@click.option("-o", "--output", required=True, help="The native snapshot to write.")
@click.option("--parent", type=existing_file, help="Write a delta of this native snapshot.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@quiet_option
def save_cmd(socket_path: str | None, output: str, parent: str | None,
             command: tuple[str, ...], quiet: bool) -> int:  # fmt: skip
    """Save a QEMU straight into a native snapshot, with the machine it ran on.

    Either a QEMU already running (`--qmp SOCKET`: it is stopped for the save and runs
    again after, if it ran), or one started for it (`-- qemu-system-x86_64 ARGS`: it is
    started paused, saved and stopped).  The stream is read as QEMU writes it; nothing
    else is written.  The `qemu` metadata document records the QEMU version and binary,
    the machine type, memory, CPUs and the device tree from QOM.

    \b
    Examples:
      snapfmt save --qmp /run/vm.qmp -o vm.snap
      snapfmt save --qmp /run/vm.qmp -o later.snap --parent vm.snap
      snapfmt save -o fresh.snap -- qemu-system-x86_64 -M pc -m 256M
    """
    from snapfmt.ops import save as save_mod

    if (socket_path is None) == (not command):
        raise click.UsageError("give --qmp SOCKET or -- QEMU COMMAND, one of the two")
    with save_mod.connected(socket_path, command) as qmp:
        saved = save_mod.save(qmp, output, parent)
    emit(render_machine.saved_text(saved))
    return EXIT_OK


@machine_group.command(name="cmdline")
@click.argument("snapshot", type=existing_file)
@click.option("--qemu", "binary", help="The QEMU to rebuild for (default: the saved one).")
def machine_cmdline(snapshot: str, binary: str | None) -> int:
    """Print the QEMU command line that rebuilds a saved machine.

    Rebuilt from the device tree `snapfmt save` records: the machine type, memory and
    CPUs, then each device the bare machine type does not make (asked of the QEMU).

    \b
    Example:
      snapfmt machine cmdline vm.snap
    """
    from snapfmt.ops import restore as restore_mod

    with open_snapshot(snapshot) as snap:
        emit(render_machine.cmdline_text(restore_mod.cmdline(snap, binary)))
    return EXIT_OK


@cli.command(name="restore", context_settings={"ignore_unknown_options": True})
@click.argument("snapshot", type=existing_file)
@click.option("--qemu", "binary", help="The QEMU to start (default: the saved one).")
@click.option("--paused", is_flag=True, help="Leave the guest paused after the load.")
@click.option("--qmp", "socket_path", help="Where QEMU's QMP socket goes.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def restore_cmd(snapshot: str, binary: str | None, paused: bool, socket_path: str | None,
                extra: tuple[str, ...]) -> int:  # fmt: skip
    """Start QEMU from a snapshot's own machine record and load the snapshot into it.

    The command line is rebuilt as `machine cmdline` prints it (plus EXTRA ARGS after
    --), validated against the snapshot first, and QEMU is left running (or paused)
    with its QMP socket printed.

    \b
    Example:
      snapfmt restore vm.snap --paused
    """
    from snapfmt.ops import restore as restore_mod

    with open_snapshot(snapshot) as snap:
        restored = restore_mod.restore(snap, binary, paused, extra, socket_path)
    emit(render_machine.restored_text(restored))
    return EXIT_OK
