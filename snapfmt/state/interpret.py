"""What a value means, as text: the functions the registry (snapfmt/state/registry.py)
points at.  Each takes the regular-expression match of the field's name, the field, and
every field of the section by name, and returns a short text, or None when it has
nothing to say (a register it does not know, bytes too short to be a MAC)."""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping

from snapfmt.vmstate import Field

Fields = Mapping[str, Field]
Interpreter = Callable[[re.Match[str], Field, Fields], str | None]

GPRS = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
        "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")  # fmt: skip
SEGMENTS = ("ES", "CS", "SS", "DS", "FS", "GS")  # QEMU's R_ES … R_GS order
_RFLAGS = ((0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
           (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"),
           (19, "VIF"), (20, "VIP"), (21, "ID"))  # fmt: skip
_CR0 = ((0, "PE"), (1, "MP"), (2, "EM"), (3, "TS"), (4, "ET"), (5, "NE"), (16, "WP"),
        (18, "AM"), (29, "NW"), (30, "CD"), (31, "PG"))  # fmt: skip
_CR4 = ((0, "VME"), (1, "PVI"), (2, "TSD"), (3, "DE"), (4, "PSE"), (5, "PAE"), (6, "MCE"),
        (7, "PGE"), (8, "PCE"), (9, "OSFXSR"), (10, "OSXMMEXCPT"), (11, "UMIP"), (12, "LA57"),
        (13, "VMXE"), (14, "SMXE"), (16, "FSGSBASE"), (17, "PCIDE"), (18, "OSXSAVE"),
        (20, "SMEP"), (21, "SMAP"), (22, "PKE"))  # fmt: skip
_EFER = ((0, "SCE"), (8, "LME"), (10, "LMA"), (11, "NXE"), (12, "SVME"), (14, "FFXSR"))


def _bits(value: int, names: tuple[tuple[int, str], ...]) -> str:
    return " ".join(name for bit, name in names if value >> bit & 1) or "-"


def named(text: str) -> Interpreter:
    """The register's name, whatever its value (``RIP``)."""
    return lambda m, f, fields: text


def gpr(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    index = int(m[1])
    return GPRS[index] if index < len(GPRS) else None


def rflags(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    return f"RFLAGS {_bits(int(f.value), _RFLAGS)}, IOPL {int(f.value) >> 12 & 3}"


def control_register(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    index, value = int(m[1]), int(f.value)
    if index == 0:
        return f"CR0 {_bits(value, _CR0)}"
    if index == 4:
        return f"CR4 {_bits(value, _CR4)}"
    return f"CR{index}" if index in (2, 3, 8) else None


def efer(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    return f"EFER {_bits(int(f.value), _EFER)}"


def segment(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    """``CS.base``; the flags word as the descriptor bits QEMU keeps in it."""
    which = m[1]
    name = SEGMENTS[int(which)] if which.isdigit() and int(which) < 6 else which.upper()
    if m[2] != "flags":
        return f"{name}.{m[2]}"
    flags = int(f.value)
    kind = (
        ("code" + (" R" if flags >> 9 & 1 else "") + (" C" if flags >> 10 & 1 else ""))
        if flags >> 11 & 1
        else ("data" + (" W" if flags >> 9 & 1 else "") + (" E" if flags >> 10 & 1 else ""))
    )
    parts = [f"{name}.flags", "P" if flags >> 15 & 1 else "not-present", f"DPL{flags >> 13 & 3}"]
    parts.append(kind + (" A" if flags >> 8 & 1 else "") if flags >> 12 & 1
                 else f"system type {flags >> 8 & 0xF:#x}")  # fmt: skip
    parts += [bit for shift, bit in ((21, "L"), (22, "D/B"), (23, "G")) if flags >> shift & 1]
    return " ".join(parts)


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw[:6])


def mac(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    """A MAC address in the first six bytes of a byte field."""
    return f"MAC {mac_text(f.value)}" if isinstance(f.value, bytes) and len(f.value) >= 6 else None


def mac_doubled(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    """The NE2000's address PROM at the start of its memory: each byte twice."""
    raw = f.value
    if not isinstance(raw, bytes) or len(raw) < 12 or raw[0:12:2] != raw[1:12:2]:
        return None
    return f"PROM MAC {mac_text(raw[0:12:2])}"


def mac_bytes(prefix: str) -> Interpreter:
    """A MAC held as six one-byte fields ``PREFIX[0]`` … ``PREFIX[5]``."""

    def show(m: re.Match[str], f: Field, fields: Fields) -> str | None:
        found = [fields.get(f"{prefix}[{i}]") for i in range(6)]
        if any(x is None or not isinstance(x.value, int) for x in found):
            return None
        return f"MAC {mac_text(bytes(int(x.value) for x in found if x is not None))}"

    return show


def receive_address(low: str, high: str) -> Interpreter:
    """An Intel NIC's RAL/RAH register pair: the MAC, and whether it is valid (AV);
    shown on both registers, so that a change of either names the address."""

    def show(m: re.Match[str], f: Field, fields: Fields) -> str | None:
        ral, rah = fields.get(low), fields.get(high)
        if ral is None or rah is None:
            return None
        if not isinstance(ral.value, int) or not isinstance(rah.value, int):
            return None
        raw = ral.value.to_bytes(4, "little") + (rah.value & 0xFFFF).to_bytes(2, "little")
        valid = "valid" if rah.value >> 31 & 1 else "not valid"
        return f"MAC {mac_text(raw)} ({valid})"

    return show


def mac_low_word(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    """The vmxnet3's MACL as a driver last wrote it (its MAC itself is not migrated)."""
    if not isinstance(f.value, int) or not f.value:
        return None
    return f"MACL {':'.join(f'{b:02x}' for b in f.value.to_bytes(4, 'little'))}"


def c_string(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    """A NUL-terminated name (``runstate``)."""
    if not isinstance(f.value, bytes):
        return None
    text = f.value.split(b"\0", 1)[0].decode("ascii", "replace")
    return repr(text)


def epoch_seconds(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    if not isinstance(f.value, int) or not 0 <= f.value < 253402300800:  # year 10000
        return None
    when = datetime.datetime.fromtimestamp(f.value, datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def rtc_cmos(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    """The MC146818's date and time registers, BCD or binary as register B says."""
    cmos = f.value
    if not isinstance(cmos, bytes) or len(cmos) < 0x33:
        return None
    binary, hour24 = cmos[0x0B] & 0x04, cmos[0x0B] & 0x02

    def reg(i: int, mask: int = 0xFF) -> int:
        v = cmos[i] & mask
        return v if binary else (v >> 4) * 10 + (v & 0xF)

    hour = reg(4, 0x7F)
    if not hour24:
        hour = hour % 12 + (12 if cmos[4] & 0x80 else 0)
    year = reg(0x32) * 100 + reg(9)
    text = f"{year:04d}-{reg(8):02d}-{reg(7):02d} {hour:02d}:{reg(2):02d}:{reg(0):02d}"
    return f"{text} ({'binary' if binary else 'BCD'}, {'24' if hour24 else '12'}-hour)"


def pci_header(m: re.Match[str], f: Field, fields: Fields) -> str | None:
    """vendor:device, class, command bits and the BARs of a type 0 config header."""
    config = f.value
    if not isinstance(config, bytes) or len(config) < 0x40:
        return None

    def word(at: int, size: int) -> int:
        return int.from_bytes(config[at : at + size], "little")

    command = word(4, 2)
    bits = [
        n for b, n in ((0, "io"), (1, "mem"), (2, "master"), (10, "intx-off")) if command >> b & 1
    ]
    parts = [f"{word(0, 2):04x}:{word(2, 2):04x} rev {config[8]:02x}",
             f"class {config[0xB]:02x}{config[0xA]:02x}{config[9]:02x}",
             f"command {command:#06x} ({' '.join(bits) or '-'})"]  # fmt: skip
    if config[0x0E] & 0x7F == 0:  # a type 0 header has six BARs
        bar = 0
        while bar < 6:
            low = word(0x10 + 4 * bar, 4)
            kind, address, step = "mem32", low & ~0xF, 1
            if low & 1:
                kind, address = "io", low & ~3
            elif low & 0x6 == 0x4 and bar < 5:  # a 64-bit BAR takes the next one too
                kind, address, step = "mem64", word(0x14 + 4 * bar, 4) << 32 | low & ~0xF, 2
            if address:  # (unprogrammed BARs are left out)
                parts.append(f"BAR{bar} {kind} {address:#x}")
            bar += step
    return ", ".join(parts)


_DEVICE_PREFIX = {"virtio-net": "VIRTIO_NET_F_", "virtio-blk": "VIRTIO_BLK_F_",
                  "virtio-scsi": "VIRTIO_SCSI_F_", "virtio-balloon": "VIRTIO_BALLOON_F_",
                  "virtio-console": "VIRTIO_CONSOLE_F_", "virtio-gpu": "VIRTIO_GPU_F_"}  # fmt: skip


def virtio_features(vmstate_name: str, shift: int = 0) -> Interpreter:
    """The feature bits of a virtio device's features word, by the names the virtio
    specification gives them (the device's own, then the transport's); *shift*: the
    word holds bits from there up (the modern state's second word: 32)."""
    from snapfmt.state.virtio_features import FEATURE_BITS

    prefix = _DEVICE_PREFIX.get(vmstate_name, "")
    names: dict[int, str] = {}
    for name, bit in FEATURE_BITS.items():
        transport = name.startswith(("VIRTIO_F_", "VIRTIO_RING_F_", "VHOST_"))
        if (prefix and name.startswith(prefix)) or (transport and bit >= 24):
            names.setdefault(bit, name.split("_F_", 1)[-1])

    def show(m: re.Match[str], f: Field, fields: Fields) -> str | None:
        if not isinstance(f.value, int) or not f.value:
            return None
        value = f.value << shift
        return "features " + " ".join(names.get(b, f"bit{b}") for b in range(64) if value >> b & 1)

    return show
