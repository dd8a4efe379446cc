"""The registers of each CPU, from the decoded ``cpu`` sections (target/i386/machine.c),
and the ELF notes QEMU's dump-guest-memory makes of them (target/i386/arch_dump.c)."""

from __future__ import annotations

from typing import Any, NamedTuple

from snapfmt.errors import GuestMemoryError
from snapfmt.formats import elf
from snapfmt.model import Snapshot

HF_LMA = 1 << 14  # hflags: long mode active
# QEMU's env.regs[] order, and env.segs[] order
REGS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
SEGS = ("es", "cs", "ss", "ds", "fs", "gs")
SEGMENT_PARTS = ("selector", "base", "limit", "flags")
TABLES = ("ldt", "tr", "gdt", "idt")


class Segment(NamedTuple):
    selector: int
    base: int
    limit: int
    flags: int


class Cpu(NamedTuple):
    """One CPU's state as dump-guest-memory reports it."""

    index: int  # type: ignore[assignment]  # the section's instance id (QEMU's cpu_index)
    regs: dict[str, int]  # rax..r15, rip, rflags
    segments: dict[str, Segment]  # es cs ss ds fs gs ldt tr gdt idt
    cr: tuple[int, int, int, int, int]  # cr0..cr4 (cr1 is never saved: 0)
    kernel_gs_base: int
    hflags: int

    @property
    def long_mode(self) -> bool:
        return bool(self.hflags & HF_LMA)


def cpus(snap: Snapshot) -> list[Cpu]:
    """Every CPU of the snapshot, in index order."""
    found = []
    for device in snap.devices():
        if device.vmstate_name != "cpu":
            continue
        if device.layout is None:
            raise GuestMemoryError(f"{device.path}: the CPU state has no field layout to decode")
        values = {f.name: f.value for f in device.iter_fields()}
        found.append(_cpu(device.instance_id, values, str(device.path)))
    if not found:
        raise GuestMemoryError("no CPU sections (cpu): the registers are not in the snapshot")
    return sorted(found, key=lambda c: c.index)


def _cpu(index: int, values: dict[str, Any], where: str) -> Cpu:
    def get(name: str) -> int:
        value = values.get("env." + name)
        if not isinstance(value, int):
            what = "no field" if value is None else "not an integer:"
            raise GuestMemoryError(f"{where}: {what} env.{name} in the CPU state")
        return value

    regs = {name: get(f"regs[{i}]") for i, name in enumerate(REGS)}
    regs["rip"], regs["rflags"] = get("eip"), get("eflags")
    segments = {
        name: Segment(*(get(f"segs[{i}].{part}") for part in SEGMENT_PARTS))
        for i, name in enumerate(SEGS)
    }
    for name in TABLES:
        segments[name] = Segment(*(get(f"{name}.{part}") for part in SEGMENT_PARTS))
    cr = (get("cr[0]"), 0, get("cr[2]"), get("cr[3]"), get("cr[4]"))
    kernel_gs_base = get("kernelgsbase") if "env.kernelgsbase" in values else 0
    return Cpu(index, regs, segments, cr, kernel_gs_base, get("hflags"))


# -- notes -----------------------------------------------------------------------------------


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    head = elf.NoteHeader.build(
        {
            "n_namesz": len(name) + 1,
            "n_descsz": len(desc),
            "n_type": kind,
            "name": name.ljust(8, b"\0"),
        }
    )
    return bytes(head) + desc + bytes(-len(desc) % 4)


def prstatus(cpu: Cpu) -> bytes:
    """The NT_PRSTATUS note: x86-64 registers when the first CPU is in long mode, else
    i386 ones (QEMU picks by the first CPU; the caller passes that choice in cpu)."""
    r, s = cpu.regs, cpu.segments
    pid = cpu.index + 1
    if cpu.long_mode:
        regs = {name: r.get(name, 0) for name in elf.X86_64_REGS}
        regs.update(orig_rax=0, eflags=r["rflags"], fs_base=s["fs"].base, gs_base=s["gs"].base)
        regs.update({seg: s[seg].selector for seg in ("cs", "ss", "ds", "es", "fs", "gs")})
        desc = elf.X86_64Prstatus.build({"pid": pid, "regs": regs})
    else:
        low = {"e" + name[1:]: r[name] & 0xFFFFFFFF for name in REGS[:8]}
        regs = {**low, "eip": r["rip"] & 0xFFFFFFFF, "eflags": r["rflags"] & 0xFFFFFFFF,
                "orig_eax": 0}  # fmt: skip
        regs.update({seg: s[seg].selector for seg in ("cs", "ss", "ds", "es", "fs", "gs")})
        desc = elf.I386Prstatus.build({"pid": pid, "regs": regs})
    return _note(b"CORE", elf.NT_PRSTATUS, desc)


def qemu_note(cpu: Cpu) -> bytes:
    """QEMU's own "QEMU" note: QEMUCPUState, every register and segment in full."""
    state: dict[str, Any] = {"version": elf.QEMU_NOTE_VERSION,
                             "size": elf.QemuCpuState.sizeof()}  # fmt: skip
    state.update(cpu.regs)
    for name in elf.QEMU_SEGMENTS:
        seg = cpu.segments[name]
        state[name] = {"selector": seg.selector, "limit": seg.limit, "flags": seg.flags,
                       "pad": 0, "base": seg.base}  # fmt: skip
    state["cr"], state["kernel_gs_base"] = list(cpu.cr), cpu.kernel_gs_base
    return _note(b"QEMU", elf.NT_QEMU, elf.QemuCpuState.build(state))


def notes(all_cpus: list[Cpu]) -> bytes:
    """Every CPU's NT_PRSTATUS, then every CPU's QEMU note, as QEMU orders them; the
    register set (i386 or x86-64) follows the first CPU, as QEMU's does."""
    lma = all_cpus[0].long_mode
    as_first = [c._replace(hflags=(c.hflags | HF_LMA) if lma else (c.hflags & ~HF_LMA))
                for c in all_cpus]  # fmt: skip
    return b"".join(map(prstatus, as_first)) + b"".join(map(qemu_note, all_cpus))
