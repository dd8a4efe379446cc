"""ELF64 core files of guest-physical memory, as QEMU's ``dump-guest-memory`` writes them
without paging -- declarations only.

Follows the System V ABI's ELF64 file and program headers and notes, Linux's
``elf_prstatus`` for i386 and x86-64 (the register sets gdb and crash read), and QEMU's
``QEMUCPUState`` note of target/i386/arch_dump.c, version 1 with ``kernel_gs_base``
(0x1b8 bytes on QEMU 7.2 and 10.0).  All little-endian.  Policy lives in snapfmt/guest/.
"""

from __future__ import annotations

from typing import Any

from snapfmt.formats import declared

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EV_CURRENT = 2, 1, 1
ET_CORE = 4
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
PF_R, PF_W, PF_X = 4, 2, 1
NT_PRSTATUS = 1
NT_QEMU = 0  # the type of QEMU's "QEMU" note
EHDR_SIZE, PHDR_SIZE = 64, 56
QEMU_NOTE_VERSION = 1

# register names in the order of each structure (the i386 set is 32-bit, x86-64's 64-bit)
I386_REGS = ("ebx", "ecx", "edx", "esi", "edi", "ebp", "eax", "ds", "es", "fs", "gs",
             "orig_eax", "eip", "cs", "eflags", "esp", "ss")  # fmt: skip
X86_64_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
               "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
               "fs_base", "gs_base", "ds", "es", "fs", "gs")  # fmt: skip
QEMU_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags")  # fmt: skip
QEMU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")


def _declare() -> dict[str, Any]:
    declared = {**_headers(), **_notes()}
    declared["STRUCTURES"] = dict(declared)
    return declared


def _headers() -> dict[str, Any]:
    """The ELF64 file header and program header (System V ABI, ELF-64 Object File Format)."""
    from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

    Elf64Header = Struct(
        "e_ident_magic" / Const(ELF_MAGIC),
        "ei_class" / Const(ELFCLASS64, Int8ul),
        "ei_data" / Const(ELFDATA2LSB, Int8ul),
        "ei_version" / Const(EV_CURRENT, Int8ul),
        "ei_osabi" / Int8ul,
        "ei_pad" / Padding(8),
        "e_type" / Int16ul,
        "e_machine" / Int16ul,
        "e_version" / Int32ul,
        "e_entry" / Int64ul,
        "e_phoff" / Int64ul,
        "e_shoff" / Int64ul,
        "e_flags" / Int32ul,
        "e_ehsize" / Int16ul,
        "e_phentsize" / Int16ul,
        "e_phnum" / Int16ul,
        "e_shentsize" / Int16ul,
        "e_shnum" / Int16ul,
        "e_shstrndx" / Int16ul,
    )
    Elf64ProgramHeader = Struct(
        "p_type" / Int32ul,
        "p_flags" / Int32ul,
        "p_offset" / Int64ul,
        "p_vaddr" / Int64ul,
        "p_paddr" / Int64ul,
        "p_filesz" / Int64ul,
        "p_memsz" / Int64ul,
        "p_align" / Int64ul,
    )
    NoteHeader = Struct(
        "n_namesz" / Int32ul,
        "n_descsz" / Int32ul,
        "n_type" / Int32ul,
        "name" / Bytes(8),  # "CORE\0" or "QEMU\0", padded to 4-byte alignment
    )
    return {name: value for name, value in locals().items() if isinstance(value, Struct)}


def _notes() -> dict[str, Any]:
    """The descriptors of the per-CPU notes."""
    from construct import Array, Int32ul, Int64ul, Padding, Struct

    I386Prstatus = Struct(  # Linux i386 struct elf_prstatus, 0x90 bytes
        Padding(24),
        "pid" / Int32ul,
        Padding(44),
        "regs" / Struct(*(name / Int32ul for name in I386_REGS)),
        Padding(4),
    )
    X86_64Prstatus = Struct(  # Linux x86-64 struct elf_prstatus, 0x150 bytes
        Padding(32),
        "pid" / Int32ul,
        Padding(76),
        "regs" / Struct(*(name / Int64ul for name in X86_64_REGS)),
        Padding(8),
    )
    QemuSegment = Struct(
        "selector" / Int32ul, "limit" / Int32ul, "flags" / Int32ul, "pad" / Int32ul,
        "base" / Int64ul,
    )  # fmt: skip
    QemuCpuState = Struct(  # QEMU's QEMUCPUState, 0x1b8 bytes
        "version" / Int32ul,
        "size" / Int32ul,
        *(name / Int64ul for name in QEMU_REGS),
        *(name / QemuSegment for name in QEMU_SEGMENTS),
        "cr" / Array(5, Int64ul),
        "kernel_gs_base" / Int64ul,
    )
    return {name: value for name, value in locals().items() if isinstance(value, Struct)}


def __getattr__(name: str) -> Any:
    return declared(globals(), _declare, name)
