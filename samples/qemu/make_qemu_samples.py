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
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from snapfmt.qmp import BINARY, Qemu  # noqa: E402

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


def main() -> int:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
