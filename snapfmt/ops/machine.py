"""Target machine descriptions (spec/machine.md): what a restore target offers.

A description is JSON.  It comes from `snapfmt machine capture` (a real QEMU, paused,
probed with a migration to a temporary file, plus its -dump-vmstate), from a snapshot
(`snapfmt machine from-snapshot`), or is QEMU's own -dump-vmstate JSON (schema only:
versions and subsections, no topology).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from snapfmt._io import json_loads
from snapfmt.errors import DescriptionError as DescriptionError  # re-exported here
from snapfmt.errors import QemuError, SnapfmtError
from snapfmt.formats.native import SectionKind
from snapfmt.model import DeviceState, Snapshot
from snapfmt.paths import escape
from snapfmt.qemu.qmp import BINARY, Qemu
from snapfmt.state.pci import PCI_CAP_ID_EXP, capabilities
from snapfmt.state.virtio_features import host_features

FORMAT = "snapfmt-machine"
MAX_DESCRIPTION = 64 << 20  # bytes a description may hold, decompressed
VERSION = 1
PCI_IDENTITY = {  # offset, size in PCI config space
    "vendor": (0x00, 2), "device": (0x02, 2), "revision": (0x08, 1), "class": (0x09, 3),
    "header_type": (0x0E, 1), "subsystem_vendor": (0x2C, 2), "subsystem": (0x2E, 2),
}  # fmt: skip
# What QEMU's pci_init_cmask (plus each capability's bytes) makes it compare on load; the
# subsystem ids are recorded but not compared by QEMU.
PCI_COMPARED = frozenset({"vendor", "device", "revision", "class", "header_type", "capabilities"})


class TargetDevice(NamedTuple):
    qemu_id: str
    instance_id: int
    vmstate: str
    version: int
    path: str | None = None
    driver: str | None = None
    minimum_version: int | None = None
    fields: list[Any] | None = None
    subsections: list[str] | None = None  # names the target knows; None: unknown
    pci: dict[str, Any] | None = None
    bus: str | None = None
    subsection_layouts: list[Any] | None = None  # the layouts of the subsections it sent
    values: dict[str, int] | None = None  # its values of the fields QEMU compares on load
    virtio_features: int | None = None  # the feature bits a virtio device offers


class TargetRam(NamedTuple):
    qemu_id: str
    size: int
    path: str | None = None
    max_size: int | None = None  # resizeable blocks accept up to this


class Machine(NamedTuple):
    source: str  # capture, snapshot, dump-vmstate
    machine: str | None
    page_size: int | None
    capabilities: list[str] | None
    cpus: int | None
    topology: bool  # False: schema only (no instances, no RAM)
    devices: list[TargetDevice]
    ram_blocks: list[TargetRam]
    schemas: dict[str, dict[str, Any]]  # vmstate name -> min/subsections

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "source": self.source, "machine": self.machine,
            "page_size": self.page_size, "capabilities": self.capabilities, "cpus": self.cpus,
            "topology": self.topology,
            "devices": [{k: v for k, v in d._asdict().items() if v is not None} for d in self.devices],
            "ram_blocks": [{k: v for k, v in r._asdict().items() if v is not None} for r in self.ram_blocks],
            "schemas": self.schemas,
        }  # fmt: skip


def pci_identity(config: bytes) -> dict[str, Any]:
    """Identity fields, the capability list ([offset, id] pairs) and the whole config
    space (hex: what validate checks as QEMU does, snapfmt.state.pci) of a device."""
    identity: dict[str, Any] = {
        name: int.from_bytes(config[at : at + n], "little")
        for name, (at, n) in PCI_IDENTITY.items()
        if len(config) >= at + n
    }
    identity["capabilities"] = [[at, cap] for at, cap in capabilities(config)]
    identity["config"] = config.hex()
    return identity


def qtree_devices(qtree: str) -> dict[str, tuple[str, str]]:
    """PCI device path (``0000:00:08.0:03.0``) -> (QOM type, bus name), from HMP
    `info qtree`: the real driver names, which a migration stream does not carry."""
    found: dict[str, tuple[str, str]] = {}
    stack: list[tuple[int, str, str]] = []  # (indent, "dev" or "bus", dev path or bus name)
    devices: dict[int, dict[str, str]] = {}
    for line in qtree.splitlines():
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if text.startswith("dev: "):
            bus = next((name for _, kind, name in reversed(stack) if kind == "bus"), "")
            parent = next((name for _, kind, name in reversed(stack) if kind == "dev" and name), "")
            devices[indent] = {"type": text[5:].split(",")[0], "bus": bus, "parent": parent}
            stack.append((indent, "dev", ""))
        elif text.startswith("bus: "):
            stack.append((indent, "bus", text[5:]))
        elif text.startswith("addr = ") and stack and stack[-1][1] == "dev":
            dev = devices[stack[-1][0]]
            address = text[7:].strip().strip('"')
            path = f"{dev['parent']}:{address}" if dev["parent"] else f"0000:00:{address}"
            stack[-1] = (stack[-1][0], "dev", path)
            found[path] = (dev["type"], dev["bus"])
    return found


def ramblock_maxima(table: str) -> dict[str, int]:
    """Block name -> maximum length, from HMP `info ramblock`: name, page size ("4 KiB"),
    then Offset, Used and Total in hex (QEMU 10 adds HVA and RO columns after them)."""
    maxima = {}
    for line in table.splitlines()[1:]:
        parts = line.split()
        first = next((i for i, p in enumerate(parts) if p.startswith("0x")), None)
        if first is not None and first >= 3 and len(parts) >= first + 3:
            maxima[" ".join(parts[: first - 2])] = int(parts[first + 2], 16)
    return maxima


def _pci_config(fields: Iterable[Any]) -> bytes | None:
    """The PCI config space in a device's decoded fields: the `pci config` field, or for virtio-pci devices the start of the opaque `virtio` field, which begins with
    the proxy's PCIDevice state (be32 version, then the config space)."""
    for f in fields:
        if f.type == "pci config" and isinstance(f.value, bytes):  # PCIDevice's config
            return bytes(f.value)
        if f.type == "virtio" and isinstance(f.value, bytes) and len(f.value) >= 260:
            config = bytes(f.value[4:260])
            if any(cap == PCI_CAP_ID_EXP for _, cap in capabilities(config)):
                return bytes(f.value[4:4100])  # a PCI Express device saves 4096 bytes
            return config
    return None


def _is_pci(qemu_id: str) -> bool:
    prefix = qemu_id.partition("/")[0]
    return len(prefix) >= 12 and prefix[4] == ":" and prefix[7] == ":"


def from_snapshot(snap: Snapshot, source: str = "snapshot", *, values: bool = True) -> Machine:
    """A description of the machine a snapshot came from (or a probe of a target);
    *values*: record the fields QEMU compares on load (a target needs them, the
    snapshot validate checks does not)."""
    config = snap.configuration
    devices, ram_blocks = [], []
    for section in snap.sections:
        path = section.path
        if path is None:
            continue
        if section.kind == SectionKind.DEVICE:
            device = _target_device(snap.device(path), str(path), values)
            if device is not None:
                devices.append(device)
        elif section.kind == SectionKind.RAM_BLOCK:
            block = snap.ram_block(path)
            if block.qemu_idstr:
                ram_blocks.append(TargetRam(block.qemu_idstr, block.length, str(path)))
    cpus = len({d.instance_id for d in devices if d.qemu_id == "cpu"}) or None
    return Machine(source, config.machine, config.page_size, list(config.capabilities), cpus,
                   True, devices, ram_blocks, {})  # fmt: skip


def _target_device(d: DeviceState, path: str, values: bool = True) -> TargetDevice | None:
    """What a target offers for the device state *d* (None: a section with no QEMU id)."""
    if not d.qemu_idstr:
        return None
    layout = d.layout or {}
    subsections = [s.get("vmsd_name") for s in layout.get("subsections", [])]
    try:
        # lazily: the config space comes first; e1000 alone has 33,000 fields
        config_space = _pci_config(d.iter_fields()) if _is_pci(d.qemu_idstr) else None
    except SnapfmtError:
        config_space = None
    return TargetDevice(d.qemu_idstr, d.instance_id, d.vmstate_name, d.version_id, path, d.driver,
                        fields=list(layout.get("fields", [])) or None,
                        subsections=subsections if d.layout is not None else None,
                        pci=pci_identity(config_space) if config_space else None,
                        subsection_layouts=list(layout.get("subsections", [])) or None,
                        values=_compared_values(d) if values else None)  # fmt: skip


def _compared_values(d: DeviceState) -> dict[str, int] | None:
    """The values of the fields QEMU compares with the loaded ones (``… equal``, ``int32
    le``), when the layout has any: what a simulated load checks against."""
    if d.layout is None or not _has_compared(d.layout):
        return None
    try:
        return {f.name: f.value for f in d.fields()
                if isinstance(f.value, int) and (f.type.endswith(" equal") or f.type == "int32 le")}  # fmt: skip
    except SnapfmtError:
        return None


def _has_compared(node: Any) -> bool:
    if isinstance(node, dict):
        kind = node.get("type")
        if isinstance(kind, str) and (kind.endswith(" equal") or kind == "int32 le"):
            return True
        return any(_has_compared(v) for v in node.values() if isinstance(v, dict | list))
    if isinstance(node, list):
        return any(_has_compared(v) for v in node)
    return False


def _dump_schemas(dump: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """vmstate name -> {version, minimum_version, subsections} from -dump-vmstate JSON."""
    schemas: dict[str, dict[str, Any]] = {}
    for key, entry in dump.items():
        if key == "vmschkmachine" or not isinstance(entry, dict):
            continue
        desc = entry.get("Description", {})
        if not isinstance(desc, dict):
            continue
        name = desc.get("name") or entry.get("Name")
        if not isinstance(name, str):
            continue
        subsections = desc.get("Subsections", [])
        subs = (
            [s.get("name") for s in subsections if isinstance(s, dict)]
            if isinstance(subsections, list)
            else []
        )
        subs = [s for s in subs if isinstance(s, str)]
        versions = (desc.get("version_id"), desc.get("minimum_version_id"))
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in versions):
            continue
        schemas[name] = {"version": desc.get("version_id"), "minimum_version": desc.get("minimum_version_id"),
                         "subsections": sorted(set(subs) | set(_nested_subsections(desc)))}  # fmt: skip
    return schemas


def _nested_subsections(desc: dict[str, Any], depth: int = 0) -> list[str]:
    """Every subsection a -dump-vmstate description knows: its own, theirs, and those
    of the descriptions of its struct fields (an IDE drive's `ide_drive/identify`)."""
    found: list[Any] = []
    if depth > 32:
        return []
    subsections = desc.get("Subsections", []) or []
    for sub in subsections if isinstance(subsections, list) else []:
        if isinstance(sub, dict):
            found.append(sub.get("name"))
            found.extend(_nested_subsections(sub, depth + 1))
    fields = desc.get("Fields", []) or []
    for field in fields if isinstance(fields, list) else []:
        inner = field.get("Description") if isinstance(field, dict) else None
        if isinstance(inner, dict):
            found.extend(_nested_subsections(inner, depth + 1))
    return list(dict.fromkeys(f for f in found if isinstance(f, str)))


def from_dump_vmstate(dump: dict[str, Any]) -> Machine:
    """QEMU's -dump-vmstate JSON as a (topology-free) target."""
    header = dump.get("vmschkmachine")
    name = (
        header.get("Name")
        if isinstance(header, dict) and isinstance(header.get("Name"), str)
        else None
    )
    return Machine("dump-vmstate", name, None, None, None, False, [], [], _dump_schemas(dump))


def capture(argv: Sequence[str], binary: str = BINARY) -> Machine:
    """Start *argv* paused, probe it with a migration to a temporary file, and add the
    minimum versions and subsections from -dump-vmstate of the same binary and machine."""
    from snapfmt.opener import open_snapshot

    with tempfile.TemporaryDirectory(prefix="snapfmt-capture-") as tmp:
        probe = os.path.join(tmp, "probe.mig")
        try:
            with Qemu(list(argv), binary=binary) as vm:
                qtree = vm.command("human-monitor-command", **{"command-line": "info qtree"})
                ramblocks = vm.command("human-monitor-command", **{"command-line": "info ramblock"})
                offered = host_features(vm)
                vm.save(probe)
        except QemuError as e:
            raise SnapfmtError(f"capture: {e}") from None
        with open_snapshot(probe) as snap:
            probed = from_snapshot(snap, "capture")
        dump = os.path.join(tmp, "dump.json")
        machine_args = _machine_option(argv)
        done = subprocess.run([binary, *machine_args, "-nodefaults", "-display", "none", "-dump-vmstate", dump],
                              capture_output=True, timeout=60, check=False)  # fmt: skip
        schemas: dict[str, dict[str, Any]] = {}
        if done.returncode == 0 and os.path.exists(dump):
            with open(dump, encoding="utf-8") as f:
                schemas = _dump_schemas(json_loads(f.read()))
    names = qtree_devices(qtree)
    devices = [_with_schema(_real_name(d, names), schemas) for d in probed.devices]
    devices = [d._replace(virtio_features=offered.get(d.qemu_id.partition("/")[0]))
               if d.vmstate.startswith("virtio") else d for d in devices]  # fmt: skip
    maxima = ramblock_maxima(ramblocks)
    ram_blocks = [
        block._replace(max_size=maxima[block.qemu_id])  # resizeable: up to this
        if maxima.get(block.qemu_id, block.size) > block.size
        else block
        for block in probed.ram_blocks
    ]
    return probed._replace(devices=devices, ram_blocks=ram_blocks, schemas=schemas)


def _real_name(device: TargetDevice, qtree: dict[str, tuple[str, str]]) -> TargetDevice:
    """A PCI device with the QOM type name from the qtree (in its path and as its driver)."""
    prefix = device.qemu_id.partition("/")[0]
    if prefix not in qtree or not device.path:
        return device
    qom_type, bus = qtree[prefix]
    parts = device.path.split("/")
    node = len(parts) - 2  # the device node is the component before the leaf
    address = parts[node].partition("@")[2]
    parts[node] = f"{escape(qom_type)}@{address}" if address else escape(qom_type)
    return device._replace(path="/".join(parts), driver=qom_type, bus=bus)


def _with_schema(device: TargetDevice, schemas: dict[str, dict[str, Any]]) -> TargetDevice:
    """A device with the minimum version -dump-vmstate gives for its vmstate."""
    schema = schemas.get(device.vmstate)
    return device._replace(minimum_version=schema.get("minimum_version")) if schema else device


def _machine_option(argv: Sequence[str]) -> list[str]:
    for i, arg in enumerate(argv):
        if arg in ("-M", "-machine") and i + 1 < len(argv):
            return [arg, argv[i + 1].split(",")[0]]
    return []


# -- loading ----------------------------------------------------------------------------------


def load(path: str) -> Machine:
    """A description file, or QEMU -dump-vmstate JSON (gzipped or not)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read
            raise DescriptionError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_DESCRIPTION + 1)
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.GzipFile(fileobj=io.BytesIO(raw)).read(MAX_DESCRIPTION + 1)
        if len(raw) > MAX_DESCRIPTION:
            raise DescriptionError(
                f"{path}: larger than {MAX_DESCRIPTION >> 20} MiB (decompressed); "
                "descriptions, even QEMU's whole -dump-vmstate, are far smaller"
            )
        data = json_loads(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DescriptionError(f"{path}: not valid gzip: {e}") from None
    except OSError as e:
        raise DescriptionError(f"{path}: cannot read: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:
        raise DescriptionError(f"{path}: not valid JSON: {e}") from None
    if isinstance(data, dict) and "vmschkmachine" in data:
        return from_dump_vmstate(data)
    return _parse(path, data)


def _need(
    path: str, where: str, value: Any, kind: type | tuple[type, ...], optional: bool = False
) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DescriptionError(f"{path}: {where}: expected {names}, found {json.dumps(value)[:60]}")
    return value


def _parse(path: str, data: Any) -> Machine:
    _need(path, "$", data, dict)
    if data.get("format") != FORMAT:
        raise DescriptionError(
            f"{path}: $.format: expected {FORMAT!r}, found {data.get('format')!r}"
        )
    if type(data.get("version")) is not int or data.get("version") != VERSION:
        raise DescriptionError(
            f"{path}: $.version: expected {VERSION}, found {data.get('version')!r}"
        )
    source = _need(path, "$.source", data.get("source", "hand"), str)
    name = _need(path, "$.machine", data.get("machine"), str, True)
    page_size = _need(path, "$.page_size", data.get("page_size"), int, True)
    capabilities = _need(path, "$.capabilities", data.get("capabilities"), list, True)
    cpus = _need(path, "$.cpus", data.get("cpus"), int, True)
    topology = bool(_need(path, "$.topology", data.get("topology", True), bool))
    schemas = _need(path, "$.schemas", data.get("schemas", {}), dict)
    for i, capability in enumerate(capabilities or []):
        _need(path, f"$.capabilities[{i}]", capability, str)
    for key, schema in schemas.items():
        where = f"$.schemas.{key}"
        _need(path, where, schema, dict)
        _need(path, f"{where}.version", schema.get("version"), int, True)
        _need(path, f"{where}.minimum_version", schema.get("minimum_version"), int, True)
        for j, sub in enumerate(
            _need(path, f"{where}.subsections", schema.get("subsections", []), list)
        ):
            _need(path, f"{where}.subsections[{j}]", sub, str)
    devices = [
        _parse_device(path, f"$.devices[{i}]", d)
        for i, d in enumerate(_need(path, "$.devices", data.get("devices", []), list))
    ]
    ram_blocks = [
        _parse_ram(path, f"$.ram_blocks[{i}]", r)
        for i, r in enumerate(_need(path, "$.ram_blocks", data.get("ram_blocks", []), list))
    ]
    return Machine(
        source, name, page_size, capabilities, cpus, topology, devices, ram_blocks, schemas
    )


def _parse_device(path: str, where: str, d: Any) -> TargetDevice:
    _need(path, where, d, dict)
    return TargetDevice(
        _need(path, f"{where}.qemu_id", d.get("qemu_id"), str),
        _need(path, f"{where}.instance_id", d.get("instance_id"), int),
        _need(path, f"{where}.vmstate", d.get("vmstate"), str),
        _need(path, f"{where}.version", d.get("version"), int),
        _need(path, f"{where}.path", d.get("path"), str, True),
        _need(path, f"{where}.driver", d.get("driver"), str, True),
        _need(path, f"{where}.minimum_version", d.get("minimum_version"), int, True),
        _need(path, f"{where}.fields", d.get("fields"), list, True),
        _need(path, f"{where}.subsections", d.get("subsections"), list, True),
        _need(path, f"{where}.pci", d.get("pci"), dict, True),
        _need(path, f"{where}.bus", d.get("bus"), str, True),
        _need(path, f"{where}.subsection_layouts", d.get("subsection_layouts"), list, True),
        _need(path, f"{where}.values", d.get("values"), dict, True),
        _need(path, f"{where}.virtio_features", d.get("virtio_features"), int, True),
    )


def _parse_ram(path: str, where: str, r: Any) -> TargetRam:
    _need(path, where, r, dict)
    return TargetRam(
        _need(path, f"{where}.qemu_id", r.get("qemu_id"), str),
        _need(path, f"{where}.size", r.get("size"), int),
        _need(path, f"{where}.path", r.get("path"), str, True),
        _need(path, f"{where}.max_size", r.get("max_size"), int, True),
    )
