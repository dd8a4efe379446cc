#!/usr/bin/env python3
"""Write the real QEMU samples in this folder with the machine's qemu-system-x86_64.

    python samples/qemu/make_qemu_samples.py

Every stream is written by QEMU itself, from a machine started paused (-S, no guest code
runs), with `migrate "exec:cat > FILE"` over QMP. Guest RAM comes from a file of known
contents (memory-backend-file, share=off), so tests can compare pc.ram byte for byte.
The exact command lines are in COMMANDS below and in README.md.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import snapfmt  # noqa: E402
from snapfmt.qemu.qmp import BINARY, Qemu  # noqa: E402

RAM_MIB = 16


def ram_image() -> bytes:
    """16 MiB, zero but for three recognisable pages (see README.md)."""
    ram = bytearray(RAM_MIB << 20)
    ram[0x100000:0x101000] = (b"snapfmt sample page at 1 MiB. " * 200)[:4096]
    ram[0x800000:0x801000] = bytes(range(256)) * 16
    ram[0xFFF000:0x1000000] = b"\x55\xaa" * 2048
    return bytes(ram)


def commands(ram_file: str) -> dict[str, list[str]]:
    memory = [
        "-object",
        f"memory-backend-file,id=pc.ram,size={RAM_MIB}M,mem-path={ram_file},share=off",
        "-machine",
        "memory-backend=pc.ram",
        "-m",
        f"{RAM_MIB}M",
        "-smp",
        "2",
        "-nodefaults",
        # the RTC follows the VM clock, which stands still while paused: saves agree
        "-rtc",
        "base=2020-01-01T00:00:00,clock=vm",
    ]
    nics = [
        "-device",
        "e1000,addr=05.0,mac=52:54:00:12:34:56",
        "-device",
        "virtio-net-pci,addr=06.0,romfile=",
        "-device",
        "lsi53c895a,addr=07.0",
    ]
    return {
        "pc": [
            "-M",
            "pc-i440fx-7.2",
            *memory,
            *nics,
            "-device",
            "pci-bridge,id=br1,chassis_nr=1,addr=08.0",
            "-device",
            "e1000,bus=br1,addr=03.0,romfile=,mac=52:54:00:12:34:57",
        ],
        "q35": ["-M", "pc-q35-7.2", *memory, *nics],
    }


POSTCOPY_TEXT = (b"snapfmt postcopy sample page at 1 MiB. " * 110)[:4096]


def postcopy_machine(page_file: str) -> list[str]:
    """A machine whose RAM is in 2 MiB huge pages, so that a stream saved with
    postcopy-ram on gives pc.ram's page size in the block list; one page of known text
    at 1 MiB, put there by the loader device."""
    return [
        "-M", "pc-i440fx-7.2", "-m", f"{RAM_MIB}M", "-nodefaults",
        "-rtc", "base=2020-01-01T00:00:00,clock=vm",
        "-object", f"memory-backend-memfd,id=pc.ram,size={RAM_MIB}M,hugetlb=on,hugetlbsize=2M",
        "-machine", "memory-backend=pc.ram",
        "-device", f"loader,file={page_file},addr=0x100000,force-raw=on",
    ]  # fmt: skip


def reserve_huge_pages(count: int = RAM_MIB) -> None:
    """At least *count* free 2 MiB huge pages (as root); QEMU needs RAM_MIB / 2."""
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) for line in f if line.startswith("HugePages_Free"))
    if free < count:
        with open("/proc/sys/vm/nr_hugepages", "r+") as f:
            total = int(f.read())
            f.seek(0)
            f.write(str(total + count - free))


def save_postcopy(args: list[str], target: Path) -> None:
    """Save with postcopy-ram on.  With no destination to answer on a return path QEMU
    never calls the migration complete, though it has written the whole stream: wait
    until the file reads as one, vmdesc and all, then stop QEMU."""
    target.unlink(missing_ok=True)
    with Qemu(args) as vm:
        vm.command(
            "migrate-set-capabilities",
            capabilities=[{"capability": "postcopy-ram", "state": True}],
        )
        vm.command("migrate", uri=f"exec:cat > {target}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                with snapfmt.open(target) as stream:
                    if stream.vmdesc is not None:
                        return
            except snapfmt.SnapfmtError:
                continue
    raise SystemExit(f"QEMU did not write a whole stream to {target}")


QEMU10 = os.environ.get("SNAPFMT_QEMU10", "qemu-system-x86_64-10.0")
DEVICE_SAMPLES = {  # tag: (MAC of both NICs, RTC base)
    "a": ("52:54:00:12:34:56", "2020-01-01T00:00:00"),
    "b": ("52:54:00:12:34:57", "2021-03-04T05:06:07"),
}


def device_machine(mac: str, rtc: str) -> list[str]:
    """The machine of the device samples (an e1000 and a virtio-net-pci, of one MAC):
    the version's own pc machine type, RAM all zero, so the file compresses to little."""
    return [
        "-M", "pc", "-m", f"{RAM_MIB}M", "-smp", "1", "-nodefaults",
        "-rtc", f"base={rtc},clock=vm",
        "-device", f"e1000,addr=05.0,romfile=,mac={mac}",
        "-device", f"virtio-net-pci,addr=06.0,romfile=,mac={mac}",
    ]  # fmt: skip


def save_device_samples() -> None:
    """devices-VERSION-TAG.mig.zst, written by QEMU 7.2 and 10.0 (zstd-compressed whole,
    as snapfmt reads them)."""
    import zstandard

    for version, binary in (("7.2", BINARY), ("10.0", QEMU10)):
        for tag, (mac, rtc) in DEVICE_SAMPLES.items():
            args = device_machine(mac, rtc)
            with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
                stream = Path(tmp) / "vm.mig"
                with Qemu(args, binary=binary) as vm:
                    vm.save(str(stream))
                name = f"devices-{version}-{tag}.mig.zst"
                (HERE / name).write_bytes(zstandard.compress(stream.read_bytes(), 19))
            print(f"wrote {name}: {binary} {' '.join(args)}")


def main() -> int:
    save_device_samples()
    with tempfile.TemporaryDirectory() as tmp:
        ram_file = Path(tmp) / "ram.img"
        ram_file.write_bytes(ram_image())
        for name, args in commands(str(ram_file)).items():
            with Qemu(args) as vm:
                vm.save(str(HERE / f"{name}.mig"))
            print(f"wrote {name}.mig: {BINARY} {' '.join(args)}")
            machine = args[1]
            dump = Path(tmp) / "dump.json"
            subprocess.run(
                [
                    BINARY,
                    "-M",
                    machine,
                    "-nodefaults",
                    "-display",
                    "none",
                    "-dump-vmstate",
                    str(dump),
                ],
                check=True,
            )
            (HERE / f"{name}.vmstate.json.gz").write_bytes(
                gzip.compress(dump.read_bytes(), 9, mtime=0)
            )
            print(f"wrote {name}.vmstate.json.gz: {BINARY} -M {machine} -dump-vmstate")
        page_file = Path(tmp) / "page.bin"
        page_file.write_bytes(POSTCOPY_TEXT)
        reserve_huge_pages()
        args = postcopy_machine(str(page_file))
        save_postcopy(args, HERE / "pc-postcopy.mig")
        print(f"wrote pc-postcopy.mig (postcopy-ram on): {BINARY} {' '.join(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
