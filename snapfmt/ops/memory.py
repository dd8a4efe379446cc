"""Guest-physical memory out of a snapshot: an ELF core as QEMU's ``dump-guest-memory``
writes it without paging, a flat raw image, or bytes at an address (spec/memory.md).

Output is sparse: a page of zeros is never written, and the data of the ELF core starts
page-aligned so that those pages are holes in the file.  Memory use does not grow with
the guest: blocks are copied 4 MiB at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from snapfmt._io import replace
from snapfmt.errors import GuestMemoryError, SnapfmtError
from snapfmt.formats import elf
from snapfmt.guest import cpu as cpu_state
from snapfmt.guest.physmap import PhysicalMap, physical_map
from snapfmt.model import Snapshot
from snapfmt.perf.writeback import Writeback

Progress = Callable[[int], None] | None
ALIGN = 4096  # where the ELF core's memory starts, and each PT_LOAD's alignment
MAX_READ = 1 << 20  # --read shows at most this many bytes


class Written(NamedTuple):
    output: str
    kind: str  # "elf" or "raw"
    ranges: int
    memory: int  # guest bytes covered
    size: int  # the file's length (sparse: its zero pages are holes)


def guest_bytes(memory: PhysicalMap) -> int:
    return sum(r.length for r in memory.ranges)


def _require(memory: PhysicalMap, names: set[str]) -> None:
    """Refuse blocks of *names* whose contents are not in the snapshot, with the way out."""
    for name in sorted(names):
        block = memory.blocks[name]
        if block.missing:
            raise GuestMemoryError(
                f"RAM block {name}: {block.missing}; give its contents with --block-file "
                f"{name}=FILE"
            )


def elf_headers(memory: PhysicalMap, cpus: list[cpu_state.Cpu]) -> tuple[bytes, list[int]]:
    """The ELF header, program headers and notes, and each range's file offset."""
    count = 1 + len(memory.ranges)
    if count >= 0xFFFF:
        raise GuestMemoryError(f"{count} program headers do not fit an ELF64 header")
    notes = cpu_state.notes(cpus)
    notes_at = elf.EHDR_SIZE + count * elf.PHDR_SIZE
    data_at = -(-(notes_at + len(notes)) // ALIGN) * ALIGN
    offsets, at = [], data_at
    for r in memory.ranges:
        offsets.append(at)
        at += r.length
    machine = elf.EM_X86_64 if cpus[0].long_mode else elf.EM_386
    header = elf.Elf64Header.build({
        "ei_osabi": 0, "e_type": elf.ET_CORE, "e_machine": machine, "e_version": 1,
        "e_entry": 0, "e_phoff": elf.EHDR_SIZE, "e_shoff": 0, "e_flags": 0,
        "e_ehsize": elf.EHDR_SIZE, "e_phentsize": elf.PHDR_SIZE, "e_phnum": count,
        "e_shentsize": 0, "e_shnum": 0, "e_shstrndx": 0,
    })  # fmt: skip
    phdrs = [_phdr(elf.PT_NOTE, 0, notes_at, 0, len(notes), 0)]
    for r, offset in zip(memory.ranges, offsets, strict=True):
        phdrs.append(_phdr(elf.PT_LOAD, elf.PF_R | elf.PF_W | elf.PF_X, offset, r.start,
                           r.length, ALIGN))  # fmt: skip
    head = header + b"".join(phdrs) + notes
    return head, offsets


def _phdr(kind: int, flags: int, offset: int, address: int, size: int, align: int) -> bytes:
    return bytes(elf.Elf64ProgramHeader.build({
        "p_type": kind, "p_flags": flags, "p_offset": offset, "p_vaddr": address,
        "p_paddr": address, "p_filesz": size, "p_memsz": size, "p_align": align,
    }))  # fmt: skip


def _copy(
    memory: PhysicalMap, fd: int, places: list[int], progress: Progress, writeback: bool
) -> None:
    started = Writeback(fd, enabled=writeback)

    def tick(size: int) -> None:
        started.wrote(size)
        if progress:
            progress(size)

    for r, at in zip(memory.ranges, places, strict=True):
        memory.blocks[r.block].write_range_into(fd, r.offset, r.length, at, tick)


def write_elf(snap: Snapshot, output: str, memory: PhysicalMap | None = None,
              progress: Progress = None, writeback: bool = True) -> Written:  # fmt: skip
    """Write the ELF core of *snap*'s guest-physical memory and CPUs to *output*
    (*writeback*: start flushing it to disk while writing, perf.writeback)."""
    memory = memory or physical_map(snap)
    cpus = cpu_state.cpus(snap)
    _require(memory, {r.block for r in memory.ranges})
    head, offsets = elf_headers(memory, cpus)
    size = offsets[-1] + memory.ranges[-1].length if memory.ranges else len(head)
    with replace(output) as f:
        fd = f.fileno()
        os.pwrite(fd, head, 0)
        _copy(memory, fd, offsets, progress, writeback)
        os.ftruncate(fd, size)
    return Written(output, "elf", len(memory.ranges), guest_bytes(memory), size)


def write_raw(snap: Snapshot, output: str, memory: PhysicalMap | None = None,
              progress: Progress = None, writeback: bool = True) -> Written:  # fmt: skip
    """Write a flat image of *snap*'s guest-physical memory: byte N of the file is the
    byte at address N; holes and zero pages are holes of the file."""
    memory = memory or physical_map(snap)
    _require(memory, {r.block for r in memory.ranges})
    with replace(output) as f:
        fd = f.fileno()
        _copy(memory, fd, [r.start for r in memory.ranges], progress, writeback)
        os.ftruncate(fd, memory.end)
    return Written(output, "raw", len(memory.ranges), guest_bytes(memory), memory.end)


def read(memory: PhysicalMap, address: int, length: int) -> bytes:
    """Guest-physical bytes at *address* (a hole is an error)."""
    if address < 0 or length < 0:
        raise SnapfmtError("an address and a length are not negative")
    if length > MAX_READ:
        raise SnapfmtError(f"--length is at most {MAX_READ:#x} (write an image for more)")
    _require(memory, {r.block for r in memory.ranges
                      if r.start < address + length and address < r.end})  # fmt: skip
    return memory.read(address, length)
