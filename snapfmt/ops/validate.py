"""validate: will a target machine accept a snapshot?  Findings, in the order QEMU loads.

QEMU reads the configuration first, then the RAM block list, then each device section in
stream order; it stops at the first thing it cannot accept.  Findings follow that order,
so the first error is the one QEMU would report, named as QEMU names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from snapfmt.model import Snapshot
from snapfmt.ops.machine import PCI_COMPARED, Machine, TargetDevice, from_snapshot
from snapfmt.paths import Path
from snapfmt.state.load import compared_values, simulate
from snapfmt.state.pci import capabilities, first_bad_byte


class Finding(NamedTuple):
    code: str
    severity: str  # error, warning, info
    path: str | None
    snapshot: object
    target: object
    message: str
    qemu: str | None = None  # for errors: what QEMU would do


class Validation(NamedTuple):
    snapshot: str
    target: str
    schema_only: bool
    findings: list[Finding]  # in the order QEMU would meet them

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def compatible(self) -> bool:
        return not self.errors


def validate(snap: Snapshot, target: Machine, target_name: str = "") -> Validation:
    source = from_snapshot(snap, values=False)
    findings: list[Finding] = []
    add = findings.append
    if not target.topology:
        add(Finding("schema-only", "info", None, None, target.machine,
                    "the target is a -dump-vmstate schema: versions and subsections are checked, topology is not"))  # fmt: skip
    _configuration(source, target, add)
    if target.topology:
        _ram(source, target, add)
    _devices(snap, source, target, add)
    return Validation(snap.origin, target_name, not target.topology, findings)


def _configuration(source: Machine, target: Machine, add: Any) -> None:
    if target.machine and source.machine != target.machine:
        family = _family(source.machine) == _family(target.machine)
        add(Finding("machine-type" if family else "machine-family", "error" if target.topology else "warning", None,
                    source.machine, target.machine,
                    f"machine type {source.machine} differs from the target's {target.machine}"
                    + ("" if family else " (another machine family)"),
                    f"Machine type received is '{source.machine}' and local is '{target.machine}'"))  # fmt: skip
    if target.page_size and source.page_size != target.page_size:
        add(Finding("page-size", "error", None, source.page_size, target.page_size,
                    f"page size {source.page_size} differs from the target's {target.page_size}",
                    "Received TARGET_PAGE_BITS differs: the load fails"))  # fmt: skip
    if target.capabilities is not None and sorted(source.capabilities or []) != sorted(
        target.capabilities
    ):
        add(Finding("capabilities", "error", None, source.capabilities, target.capabilities,
                    "migration capabilities differ", "Capability … is …, but received capability is …"))  # fmt: skip


def _family(machine: str | None) -> str:
    name = machine or ""
    return "q35" if "q35" in name else "i440fx" if name.startswith("pc") else name.split("-")[0]


def _ram(source: Machine, target: Machine, add: Any) -> None:
    offered = {r.qemu_id: r for r in target.ram_blocks}
    for block in source.ram_blocks:
        there = offered.get(block.qemu_id)
        if there is None:
            add(Finding("ram-missing", "error", block.path, block.size, None,
                        f"RAM block {block.qemu_id} does not exist on the target",
                        f'Unknown ramblock "{block.qemu_id}", cannot accept migration'))  # fmt: skip
        elif there.size != block.size and not (there.max_size and block.size <= there.max_size):
            add(Finding("ram-size", "error", block.path, block.size, there.size,
                        f"RAM block {block.qemu_id} is {block.size:#x} bytes, the target's {there.size:#x}",
                        f"Size mismatch: {block.qemu_id}: {block.size:#x} != {there.size:#x}"))  # fmt: skip


def _devices(snap: Snapshot, source: Machine, target: Machine, add: Any) -> None:
    offered = {(d.qemu_id, d.instance_id): d for d in target.devices}
    by_address = {d.qemu_id.rpartition("/")[0]: d for d in target.devices if "/" in d.qemu_id}
    target_cpus = {d.instance_id for d in target.devices if d.qemu_id == "cpu"}
    for device in source.devices:
        key = (device.qemu_id, device.instance_id)
        there = offered.get(key) if target.topology else None
        if target.topology and there is None:
            add(_missing(device, by_address, target_cpus, _unclaimed(source, target)))
            continue
        schema = target.schemas.get(device.vmstate)
        _version(device, there, schema, add)
        if there is not None:
            _pci(device, there, add)
            _features(snap, device, there, add)
            if not _load(snap, device, there, schema, add):
                _layout(device, there, add)
    if target.topology:
        present = {(d.qemu_id, d.instance_id) for d in source.devices}
        for d in target.devices:
            if (d.qemu_id, d.instance_id) not in present:
                add(Finding("target-extra", "warning", d.path, None, d.qemu_id,
                            f"the target's {d.qemu_id} (instance {d.instance_id}) has no state in the snapshot: it keeps its reset state"))  # fmt: skip
        source_cpus = {d.instance_id for d in source.devices if d.qemu_id == "cpu"}
        if target_cpus and source_cpus and len(target_cpus) > len(source_cpus):
            add(Finding("cpu-count", "warning", None, len(source_cpus), len(target_cpus),
                        f"the target has {len(target_cpus)} CPUs, the snapshot {len(source_cpus)}: the others keep their reset state"))  # fmt: skip


def _unclaimed(source: Machine, target: Machine) -> list[TargetDevice]:
    """Target devices no snapshot section is for: where a missing device may have moved."""
    wanted = {(d.qemu_id, d.instance_id) for d in source.devices}
    return [d for d in target.devices if (d.qemu_id, d.instance_id) not in wanted]


def _missing(
    device: TargetDevice,
    by_address: dict[str, TargetDevice],
    target_cpus: set[int],
    unclaimed: list[TargetDevice],
) -> Finding:
    qemu = f"Unknown savevm section or instance '{device.qemu_id}' {device.instance_id}"
    prefix = device.qemu_id.rpartition("/")[0]
    other = by_address.get(prefix) if prefix else None
    if other is not None:
        return Finding("driver-mismatch", "error", device.path, device.driver or device.vmstate,
                       other.driver or other.vmstate,
                       f"{device.qemu_id}: the target has {other.driver or other.vmstate} at {prefix}, not {device.driver or device.vmstate}",
                       qemu)  # fmt: skip
    if device.qemu_id in ("cpu", "cpu_common", "apic", "kvm-tpr-opt") and target_cpus:
        return Finding("cpu-count", "error", device.path, device.instance_id, len(target_cpus),
                       f"CPU {device.instance_id} does not exist on the target (it has {len(target_cpus)})", qemu)  # fmt: skip
    moved = [
        d.qemu_id.rpartition("/")[0]
        for d in unclaimed
        if d.vmstate == device.vmstate and "/" in d.qemu_id
    ]
    hint = (
        f"; the target has {device.vmstate} at {', '.join(moved)} (moved?)"
        if moved and prefix
        else ""
    )
    return Finding("section-missing", "error", device.path, device.qemu_id, None,
                   f"{device.qemu_id} (instance {device.instance_id}) has no device on the target{hint}", qemu)  # fmt: skip


def _version(
    device: TargetDevice, there: TargetDevice | None, schema: dict[str, Any] | None, add: Any
) -> None:
    version = there.version if there is not None else (schema or {}).get("version")
    minimum = (there.minimum_version if there is not None else None) or (schema or {}).get(
        "minimum_version"
    )
    qemu = f"savevm: unsupported version {device.version} for '{device.qemu_id}' v{version}"
    if isinstance(version, int) and device.version > version:
        add(Finding("version-too-new", "error", device.path, device.version, version,
                    f"{device.qemu_id}: version {device.version} is above the target's {version}", qemu))  # fmt: skip
    elif isinstance(minimum, int) and device.version < minimum:
        add(Finding("version-too-old", "error", device.path, device.version, minimum,
                    f"{device.qemu_id}: version {device.version} is below the target's minimum {minimum}", qemu))  # fmt: skip
    known = there.subsections if there is not None and there.subsections is not None else None
    if schema and schema.get("subsections") is not None:
        known = sorted(set(known or []) | set(schema["subsections"]))
    for name in device.subsections or []:
        if known is not None and name not in known and schema is not None:
            add(Finding("subsection-unknown", "error", device.path, name, None,
                        f"{device.qemu_id}: subsection {name} is unknown to the target",
                        f"VM subsection '{name}' in '{device.vmstate}' does not exist"))  # fmt: skip


def _pci(device: TargetDevice, there: TargetDevice, add: Any) -> None:
    if not device.pci or not there.pci or device.pci == there.pci:
        return
    # keys on both sides only: a hand-written target may give identity but no capabilities
    differ = sorted(
        k for k in device.pci
        if k in there.pci and k != "config" and device.pci.get(k) != there.pci.get(k)
    )  # fmt: skip
    compared = [k for k in differ if k in PCI_COMPARED]
    loaded, own = _config(device.pci), _config(there.pci)
    if loaded is not None and own is not None and len(loaded) == len(own):
        # both config spaces: the bytes QEMU compares, as it compares them
        bad = first_bad_byte(loaded, own)
        if bad is not None:
            add(Finding("pci-config", "error", device.path, bad.read, bad.device,
                        f"{device.qemu_id}: PCI config byte {bad.offset:#x} is {bad.read:#04x}, "
                        f"the target's {bad.device:#04x} ({_register(bad.offset, own)})",
                        bad.qemu))  # fmt: skip
        compared = []
    if compared:
        add(Finding("pci-identity", "error", device.path, {k: device.pci[k] for k in compared},
                    {k: there.pci.get(k) for k in compared},
                    f"{device.qemu_id}: PCI {', '.join(compared)} differ from the target's",
                    "get_pci_config_device: Bad config data"))  # fmt: skip
    elif differ:
        add(Finding("pci-subsystem", "warning", device.path, {k: device.pci[k] for k in differ},
                    {k: there.pci.get(k) for k in differ},
                    f"{device.qemu_id}: PCI {', '.join(differ)} differ (QEMU does not compare them on load)"))  # fmt: skip


def _features(snap: Snapshot, device: TargetDevice, there: TargetDevice, add: Any) -> None:
    """Guest features the target's virtio device does not offer (QEMU's virtio_load)."""
    if there.virtio_features is None or device.path is None:
        return
    from snapfmt.state import safe_understand

    understood = safe_understand(snap.device(Path.parse(device.path)))
    if understood is None:
        return
    by_name = {f.name: f.value for f in understood.fields}
    guest = by_name.get("virtio.virtio/64bit_features:guest_features",
                        by_name.get("virtio.guest_features"))  # fmt: skip
    if not isinstance(guest, int) or not guest & ~there.virtio_features:
        return
    extra = guest & ~there.virtio_features
    bits = ", ".join(str(b) for b in range(64) if extra >> b & 1)
    add(Finding("virtio-features", "error", device.path, guest, there.virtio_features,
                f"{device.qemu_id}: the guest uses feature bits the target's device does not "
                f"offer ({bits})",
                f"Features {guest:#x} unsupported. Allowed features: {there.virtio_features:#x}"))  # fmt: skip


def _config(pci: dict[str, Any]) -> bytes | None:
    text = pci.get("config")
    if not isinstance(text, str):
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


_HEADER = {0x00: "vendor id", 0x02: "device id", 0x06: "status", 0x08: "revision",
           0x09: "class", 0x0E: "header type", 0x34: "capability pointer"}  # fmt: skip
_CAPABILITIES = {0x01: "power management", 0x05: "MSI", 0x09: "vendor-specific",
                 0x10: "PCI Express", 0x11: "MSI-X"}  # fmt: skip


def _register(offset: int, config: bytes) -> str:
    """Where *offset* lies in a config space: a header register or a capability."""
    for at in sorted(_HEADER, reverse=True):
        if offset >= at and offset < 0x40:
            return _HEADER[at] if offset < at + (3 if at == 0x09 else 2) else "header"
    caps = [(at, cap) for at, cap in capabilities(config) if at <= offset]
    if caps:
        at, cap = max(caps)
        name = _CAPABILITIES.get(cap, f"capability {cap:#04x}")
        if cap == 0x11 and offset in (at + 2, at + 3):
            return f"{name} capability at {at:#x}: message control (table size)"
        return f"{name} capability at {at:#x}, byte {offset - at}"
    return "config space"


def _load(snap: Snapshot, device: TargetDevice, there: TargetDevice, schema: Any, add: Any) -> bool:
    """Load the section's bytes with the target's layout, as QEMU will (snapfmt.state.load);
    True when that was simulated (so no layout warning is needed)."""
    if there.fields is None or device.path is None or device.version != there.version:
        return False
    if any(isinstance(f, dict) and f.get("type") in _OPAQUE for f in there.fields):
        return False  # read by QEMU's own code, not by layout (its PCI config is checked)
    state = snap.device(Path.parse(device.path))
    same_subsections = (device.subsections or []) == (there.subsections or [])
    if same_subsections and (device.fields == there.fields
                             or _fewer_fields(there.fields, device.fields or [])):  # fmt: skip
        # the same layout reads the same bytes the same way; only the compared values
        # can differ, read as far as the last of them (the e1000's is its first field).
        # So does a target's layout that only lacks fields: those QEMU writes when a test
        # of the state holds (an IDE drive's identify_data once the firmware asked for
        # it); QEMU's loader tests the loaded state, so it reads them as they were sent
        problem = compared_values(device.qemu_id, device.vmstate, state, there.values or {})
        if problem is not None:
            add(Finding(problem.code, "error", device.path, None, None, problem.message,
                        problem.qemu))  # fmt: skip
        return True
    known = (schema or {}).get("subsections")
    # a subsection the target knows but did not send has no layout of its own there:
    # the snapshot's is taken for it (one vmsd, one layout within a version)
    theirs = {s.get("vmsd_name") for s in there.subsection_layouts or [] if isinstance(s, dict)}
    layouts = [*(there.subsection_layouts or []),
               *(s for s in _all_subsections(state.layout or {})
                 if s.get("vmsd_name") not in theirs
                 and (known is None or s.get("vmsd_name") in known))]  # fmt: skip
    problem = simulate(device.qemu_id, device.vmstate, state.data, there.fields, layouts,
                       known, there.values)  # fmt: skip
    if problem is not None:
        add(Finding(problem.code, "error", device.path, None, None, problem.message,
                    problem.qemu))  # fmt: skip
    return True


def _fewer_fields(theirs: list[Any], ours: list[Any]) -> bool:
    """Whether layout *theirs* is layout *ours* with some fields left out (at any depth:
    a struct of the same name may lack some of its fields too)."""
    return theirs != ours and _drops(theirs, ours, 0)


def _drops(theirs: list[Any], ours: list[Any], depth: int) -> bool:
    if depth > 32 or len(theirs) > len(ours):
        return False
    i = 0
    for mine in ours:
        if i == len(theirs):
            break
        other = theirs[i]
        if not isinstance(mine, dict) or not isinstance(other, dict):
            return False
        if mine == other or _same_struct(other, mine, depth):
            i += 1
    return i == len(theirs)


def _same_struct(other: dict[str, Any], mine: dict[str, Any], depth: int) -> bool:
    """Two struct fields of one name whose layouts differ only by fields left out."""
    if other.get("type") != "struct" or mine.get("type") != "struct":
        return False
    if {k: v for k, v in other.items() if k not in ("size", "struct")} != {
            k: v for k, v in mine.items() if k not in ("size", "struct")}:  # fmt: skip
        return False  # (another name, another array length: not the same struct)
    inner_theirs, inner_ours = other.get("struct") or {}, mine.get("struct") or {}
    return (inner_theirs.get("subsections") == inner_ours.get("subsections")
            and _drops(inner_theirs.get("fields", []), inner_ours.get("fields", []), depth + 1))  # fmt: skip


def _all_subsections(layout: Mapping[str, Any], depth: int = 0) -> list[dict[str, Any]]:
    """Every subsection layout in a device's layout: its own, theirs, and those inside its
    struct fields, outermost first."""
    found: list[dict[str, Any]] = []
    if depth > 32:
        return found
    for sub in layout.get("subsections", []) or []:
        if isinstance(sub, dict):
            found += [sub, *_all_subsections(sub, depth + 1)]
    for field in layout.get("fields", []) or []:
        if isinstance(field, dict) and isinstance(field.get("struct"), dict):
            found += _all_subsections(field["struct"], depth + 1)
    return found


def _layout(device: TargetDevice, there: TargetDevice, add: Any) -> None:
    if device.version != there.version or device.fields is None or there.fields is None:
        return
    if _shape(device.fields) != _shape(there.fields):
        add(Finding("layout-changed", "warning", device.path, None, None,
                    f"{device.qemu_id}: field layout differs within version {device.version}"))  # fmt: skip


# Fields QEMU writes with a put function of their own rather than by layout: their size is
# what the state takes (virtio: queues, vectors, subsections), not part of the layout.
# What QEMU checks in them is checked where it checks it (the PCI config space).
_OPAQUE = frozenset({"virtio", "virtio-gpu"})


def _shape(fields: list[Any]) -> list[tuple[object, ...]]:
    return [
        (f.get("name"), f.get("type"), None if f.get("type") in _OPAQUE else f.get("size"),
         f.get("array_len"))
        for f in fields
        if isinstance(f, dict)
    ]  # fmt: skip
