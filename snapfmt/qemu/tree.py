"""What a running QEMU is, asked over QMP: the record `snapfmt save` keeps to rebuild it.

The record (the `qemu` metadata document, spec/machine.md "Saved machines") holds the QEMU
version and binary, the command line when the QEMU is local, the machine type, memory and
CPU topology, and the device tree from QOM: each device's type, id, QOM path, bus and
address, and the properties whose values differ from the type's defaults; block devices
with their files, and memory backends.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

from snapfmt.errors import QemuError
from snapfmt.qemu.qmp import Qmp

MAX_OBJECTS = 4096  # QOM objects walked at most (a machine has a few hundred)
_SKIPPED_TYPES = ("link<", "child<")


def describe(qmp: Qmp) -> dict[str, Any]:
    """The record of the QEMU behind *qmp* (a few hundred QMP commands, no guest work)."""
    version = qmp.command("query-version")
    q = version.get("qemu", {})
    record: dict[str, Any] = {
        "version": f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}",
        "package": str(version.get("package", "")).strip(),
        **_process(qmp),
        "machine": _strip(
            str(qmp.command("qom-get", path="/machine", property="type")), "-machine"
        ),
        "accel": "kvm" if qmp.command("query-kvm").get("enabled") else "tcg",
        "memory": int(qmp.command("query-memory-size-summary").get("base-memory", 0)),
        "cpus": _cpus(qmp),
        "devices": devices(qmp),
        "blocks": _blocks(qmp),
        "memdevs": _memdevs(qmp),
        "memory_backend": _maybe(qmp, "/machine", "memory-backend"),
        "network": network(_hmp(qmp, "info network")),
    }
    return record


_NET = re.compile(r"^\s*(?:\\ )?(?:(?P<port>hub\d+port\d+): )?(?P<name>[^:\s]+): index=\d+,"
                  r"type=(?P<type>[\w-]+)")  # fmt: skip


def network(text: str) -> list[dict[str, Any]]:
    """The network backends `info network` lists (QOM has no record of them): each
    with its name, type, and the hub and hub port it is on."""
    found, hub = [], None
    for line in text.splitlines():
        head = re.match(r"^hub (\d+)$", line.strip())
        if head:
            hub = int(head.group(1))
            continue
        m = _NET.match(line)
        if m:
            on_hub = hub if m["port"] else None
            found.append({"name": m["name"], "type": m["type"], "hub": on_hub, "port": m["port"]})
        if not line.startswith(" "):
            hub = None if not head else hub
    return found


def _hmp(qmp: Qmp, command: str) -> str:
    return str(qmp.command("human-monitor-command", **{"command-line": command}))


def _maybe(qmp: Qmp, path: str, prop: str) -> Any:
    """A property's value, or None where the object has no such property."""
    try:
        return qmp.command("qom-get", path=path, property=prop)
    except QemuError:
        return None


def _strip(text: str, suffix: str) -> str:
    return text[: -len(suffix)] if text.endswith(suffix) else text


def _process(qmp: Qmp) -> dict[str, Any]:
    """The binary and command line of a local QEMU (from /proc, by the socket's peer)."""
    pid = qmp.peer_pid()
    if pid is None:
        return {"binary": None, "argv": None}
    try:
        binary = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read(1 << 20).split(b"\0")[:-1]]
    except OSError:
        return {"binary": None, "argv": None}
    return {"binary": binary, "argv": argv}


def _cpus(qmp: Qmp) -> dict[str, Any]:
    cpus = qmp.command("query-cpus-fast")
    model = None
    if cpus:
        kind = str(qmp.command("qom-get", path=cpus[0]["qom-path"], property="type"))
        model = kind.rsplit("-", 2)[0] if kind.endswith("-cpu") else kind
    smp: dict[str, Any] = {}
    with contextlib.suppress(QemuError):
        smp = qmp.command("qom-get", path="/machine", property="smp")
    return {"count": len(cpus), "model": model, "topology": smp}


def devices(qmp: Qmp) -> list[dict[str, Any]]:
    """Every device of the QOM tree under /machine, ordered by QOM path (numbers as
    numbers), each with the buses it provides.  A few batches of QMP commands: one per
    level of the tree, then the types, the types' defaults, and every property."""
    listing: dict[str, dict[str, str]] = {}  # QOM path -> its properties and their types
    level = ["/machine"]
    while level and len(listing) < MAX_OBJECTS:
        found = []
        for path, result in zip(level, qmp.batch([("qom-list", {"path": p}) for p in level]),
                                strict=True):  # fmt: skip
            if isinstance(result, QemuError):
                continue
            props = listing[path] = {p["name"]: p["type"] for p in result}
            found += [f"{path.rstrip('/')}/{name}" for name, kind in props.items()
                      if kind.startswith("child<")]  # fmt: skip
        level = found[: MAX_OBJECTS - len(listing)]
    buses: dict[str, list[str]] = {}  # device path -> names of the buses it provides
    for path, props in listing.items():
        if "hotplug-handler" in props and "parent_bus" not in props:  # a bus
            parent, _, name = path.rpartition("/")
            buses.setdefault(parent, []).append(name)
    paths = [p for p, props in listing.items() if "realized" in props and "parent_bus" in props]
    types = [str(t) for t in _gets(qmp, [(p, "type") for p in paths])]
    defaults = _defaults(qmp, sorted({t for t in types if not t.endswith("-cpu")}))
    defaults.update({t: {} for t in types if t.endswith("-cpu")})
    # (not a CPU's hundreds of feature flags: its model and topology say what it is)
    wanted = [(p, prop) for p, t in zip(paths, types, strict=True) if not t.endswith("-cpu")
              for prop in defaults[t] if prop in listing[p]]  # fmt: skip
    values = dict(zip(wanted, _gets(qmp, wanted), strict=True))
    bus_of = dict(zip(paths, _gets(qmp, [(p, "parent_bus") for p in paths]), strict=True))
    out = []
    for path, kind in zip(paths, types, strict=True):
        device = _device(path, kind, bus_of[path], defaults[kind],
                         {prop: values[path, prop] for prop in defaults[kind]
                          if (path, prop) in values})  # fmt: skip
        device["buses"] = sorted(buses.get(path, []))
        out.append(device)
    return sorted(out, key=lambda d: _natural(d["path"]))


def _gets(qmp: Qmp, wanted: list[tuple[str, str]]) -> list[Any]:
    """qom-get of each (path, property); None where QEMU refuses."""
    results = qmp.batch([("qom-get", {"path": p, "property": prop}) for p, prop in wanted])
    return [None if isinstance(r, QemuError) else r for r in results]


def _defaults(qmp: Qmp, kinds: list[str]) -> dict[str, dict[str, Any]]:
    """Each device type's settable properties and their default values."""
    out = {}
    for kind, listed in zip(kinds, qmp.batch([("device-list-properties", {"typename": k})
                                              for k in kinds]), strict=True):  # fmt: skip
        props = [] if isinstance(listed, QemuError) else listed
        out[kind] = {p["name"]: p.get("default-value") for p in props
                     if not p.get("type", "").startswith(_SKIPPED_TYPES)}  # fmt: skip
    return out


def _natural(path: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (-1, part)
            for part in re.split(r"(\d+)", path)]  # fmt: skip


def _device(path: str, kind: str, bus: Any, defaults: dict[str, Any],
            values: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    parent, _, name = path.rpartition("/")
    device: dict[str, Any] = {
        "path": path,
        "type": kind,
        "id": name if parent == "/machine/peripheral" else None,
        "bus": bus.rsplit("/", 1)[-1] if isinstance(bus, str) and bus else None,
        "properties": {},
    }
    for prop, value in values.items():
        if prop == "addr" and isinstance(value, int) and value >= 0:
            device["addr"] = f"{value >> 3:02x}.{value & 7}"
        elif (
            value is not None and value != defaults.get(prop) and not isinstance(value, dict | list)
        ):
            device["properties"][prop] = value
    return device


def _blocks(qmp: Qmp) -> list[dict[str, Any]]:
    out = []
    for b in qmp.command("query-block"):
        inserted = b.get("inserted") or {}
        out.append({"device": b.get("device") or None, "qdev": b.get("qdev"),
                    "file": inserted.get("file"), "format": inserted.get("drv"),
                    "read_only": inserted.get("ro"), "node": inserted.get("node-name")})  # fmt: skip
    return out


def _memdevs(qmp: Qmp) -> list[dict[str, Any]]:
    out = []
    for m in qmp.command("query-memdev"):
        ident = m.get("id")
        entry: dict[str, Any] = {"id": ident, "size": m.get("size"), "share": m.get("share")}
        if ident:
            with contextlib.suppress(QemuError):
                entry["type"] = qmp.command("qom-get", path=f"/objects/{ident}", property="type")
            with contextlib.suppress(QemuError):
                entry["mem-path"] = qmp.command("qom-get", path=f"/objects/{ident}",
                                                property="mem-path")  # fmt: skip
        out.append(entry)
    return out
