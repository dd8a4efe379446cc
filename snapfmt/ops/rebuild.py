"""machine cmdline and restore: a QEMU command line rebuilt from a saved machine record.

The record (`qemu` document, spec/machine.md) lists every device QOM had.  The machine
type makes some of them itself; the rest came from the command line or from QEMU's
defaults.  Which is which is asked of the target QEMU: it is started once with the
machine type and `-nodefaults`, its own devices listed (snapfmt.qemu.tree), and every
recorded device it does not make becomes a `-device` with its bus, address, id and
non-default properties -- parents before the devices on their buses.  The backends QOM
does not describe are made up so that the devices find what they refer to: each network
backend an isolated hub port, each character device `null`, each drive the file the
record names (or an empty one), each audio backend `none`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

from snapfmt.errors import RebuildError

# Properties that are set without a default in device-list-properties but are not
# settable, or are noise: never put on a rebuilt -device.
_UNSET = frozenset({"attached", "bootindex", "busnr", "hotplugged", "hotpluggable", "realized",
                    "legacy-addr", "legacy-multifunction", "failover_pair_id"})  # fmt: skip


def record_of(snap: Any) -> dict[str, Any]:
    """The saved machine record of a snapshot (`snapfmt save` writes it)."""
    try:
        record = snap.metadata("qemu")
    except KeyError:
        raise RebuildError(
            f"{snap.origin}: keeps no machine record (the `qemu` document snapfmt save "
            "writes): give the QEMU command line yourself (machine capture, validate)"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("devices"), list):
        raise RebuildError(f"{snap.origin}: the `qemu` document is not a machine record")
    return record


def base_args(record: dict[str, Any]) -> list[str]:
    """Machine type, accelerator, memory, CPUs: what comes before the devices."""
    machine = [f"{record['machine']}"]
    args = ["-nodefaults"]
    for memdev in record.get("memdevs") or []:
        backend = str(record.get("memory_backend") or "").rpartition("/")[2]  # (a QOM path)
        own = memdev.get("id") and memdev.get("id") == backend
        implicit = memdev.get("type") == "memory-backend-ram" and memdev.get("id") == "pc.ram"
        if own and not implicit:  # (-m alone makes the implicit one)
            args += ["-object", _object(memdev)]
            machine.append(f"memory-backend={memdev['id']}")
    args[:0] = ["-machine", ",".join(machine), "-accel", str(record.get("accel") or "tcg")]
    args += ["-m", _size(int(record["memory"]))]
    cpus = record.get("cpus") or {}
    topology = cpus.get("topology") or {}
    smp = [f"{k}={topology[k]}" for k in ("cpus", "sockets", "dies", "cores", "threads",
                                            "maxcpus") if k in topology]  # fmt: skip
    args += ["-smp", ",".join(smp) or str(cpus.get("count", 1))]
    if cpus.get("model"):
        args += ["-cpu", str(cpus["model"])]
    return args


def _object(memdev: dict[str, Any]) -> str:
    parts = [str(memdev.get("type") or "memory-backend-ram"), f"id={memdev['id']}",
             f"size={memdev['size']}"]  # fmt: skip
    if memdev.get("mem-path"):
        parts.append(f"mem-path={_escape(str(memdev['mem-path']))}")
    if memdev.get("share") is not None:
        parts.append(f"share={'on' if memdev['share'] else 'off'}")
    return ",".join(parts)


def _size(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n}B"


def _escape(value: str) -> str:
    return value.replace(",", ",,")


def _key(d: dict[str, Any]) -> tuple[str, str | None, str | None]:
    return (d["type"], d.get("bus"), d.get("addr"))


def extra_devices(
    record: dict[str, Any], baseline: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The recorded devices the bare machine does not make, parents first; devices that
    are part of another device (its QOM children) come with it."""
    devices = [d for d in record["devices"] if not str(d.get("type", "")).endswith("-cpu")]
    paths = {d["path"] for d in record["devices"]}
    made = collections.Counter(_key(d) for d in baseline)
    extra = []
    for d in devices:
        parent = d["path"].rpartition("/")[0]
        while parent and parent not in paths:
            parent = parent.rpartition("/")[0]
        if parent or d.get("bus") is None:
            continue  # a part of another device, or not on a bus (CPUs, their APICs)
        if made[_key(d)]:
            made[_key(d)] -= 1
            continue
        extra.append(d)
    # the order they were made in, which bus numbers follow: the board's own defaults
    # (VGA, serial, NIC...) first, then the command line's -device options in order
    order = _argv_order(record.get("argv") or [])
    extra.sort(key=lambda d: (not d["path"].startswith("/machine/unattached/"),
                              order.get(d["path"], len(order))))  # fmt: skip
    for d in extra:  # a device provides the buses of its parts too (virtio-serial's)
        inner = [b for o in record["devices"] if o["path"].startswith(d["path"] + "/")
                 for b in o.get("buses", [])]  # fmt: skip
        d["buses"] = [*d.get("buses", []), *inner]
    return _ordered(extra, {b for d in baseline for b in d.get("buses", [])})


def _argv_order(argv: Sequence[str]) -> dict[str, int]:
    """QOM path -> position, for the devices the command line's -device options made: an
    `id=` one is /machine/peripheral/ID, the n-th without an id peripheral-anon/device[n]."""
    order: dict[str, int] = {}
    anon = 0
    devices = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-device", "--device")]
    for position, spec in enumerate(devices):
        ident = next((p[3:] for p in spec.split(",") if p.startswith("id=")), None)
        if ident:
            order[f"/machine/peripheral/{ident}"] = position
        else:
            order[f"/machine/peripheral-anon/device[{anon}]"] = position
            anon += 1
    return order


def _ordered(devices: list[dict[str, Any]], buses: set[str]) -> list[dict[str, Any]]:
    """*devices* so that each comes after the one that provides its bus."""
    out, pending = [], list(devices)
    while pending:
        ready = [d for d in pending if d.get("bus") in buses]
        if not ready:
            missing = sorted({str(d.get("bus")) for d in pending})
            raise RebuildError(f"no device provides bus {', '.join(missing)}")
        for d in ready:
            out.append(d)
            buses.update(d.get("buses", []))
            pending.remove(d)
    return out


def device_arg(d: dict[str, Any]) -> str:
    parts = [str(d["type"]), f"bus={d['bus']}"]
    if d.get("addr"):
        parts.append(f"addr={d['addr']}")
    if d.get("id"):
        parts.append(f"id={d['id']}")
    for name, value in sorted((d.get("properties") or {}).items()):
        if name in _UNSET or value == "" or value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        if name == "netdev":
            value = net_id(str(value))
        parts.append(f"{name}={_escape(str(value))}")
    return ",".join(parts)


def net_id(name: str) -> str:
    """A backend name as a -netdev id (QEMU names the ones it makes itself `#net065`)."""
    return "snapfmt-" + name[1:] if name.startswith("#") else name


def backends(record: dict[str, Any], devices: Sequence[dict[str, Any]]) -> list[str]:
    """-netdev, -chardev and -drive for what the rebuilt devices refer to."""
    blocks = {b.get("device") or b.get("node"): b for b in record.get("blocks") or []}
    args = _network(record.get("network") or [], devices)
    seen: set[tuple[str, str]] = set()
    for d in devices:
        for kind in ("drive", "chardev", "audiodev"):
            name = (d.get("properties") or {}).get(kind)
            if not isinstance(name, str) or not name or (kind, name) in seen:
                continue
            seen.add((kind, name))
            if kind == "chardev":
                args += ["-chardev", f"null,id={name}"]
            elif kind == "audiodev":
                args += ["-audiodev", f"none,id={name}"]
            else:
                args += ["-drive", _drive(name, blocks.get(name), d)]
    return args


def _network(network: list[dict[str, Any]], devices: Sequence[dict[str, Any]]) -> list[str]:
    """The NICs' backends as `info network` listed them: user (slirp) backends, alone or
    on a hub, and hub ports; any other kind (tap, bridge...) becomes an isolated hub port,
    as the host it needs may not be here."""
    ports = {e["port"]: e for e in network if e.get("port")}
    users = {e["name"] for e in network if e.get("type") == "user"}
    args: list[str] = []
    for e in network:  # backends on hubs, then NICs on hubs or on their own backend
        if e.get("port") and e.get("type") == "user":
            args += ["-netdev", f"user,id={net_id(e['name'])}",
                     "-netdev", f"hubport,id={e['port']},hubid={e['hub']},netdev={net_id(e['name'])}"]  # fmt: skip
    isolated = 100
    for d in devices:
        name = (d.get("properties") or {}).get("netdev")
        if not isinstance(name, str) or not name:
            continue
        if name in ports:
            args += ["-netdev", f"hubport,id={name},hubid={ports[name]['hub']}"]
        elif name in users:
            args += ["-netdev", f"user,id={net_id(name)}"]
        else:
            isolated += 1
            args += ["-netdev", f"hubport,id={net_id(name)},hubid={isolated}"]
    return args


def _drive(name: str, block: dict[str, Any] | None, device: dict[str, Any]) -> str:
    parts = ["if=none", f"id={_escape(name)}"]
    if block and block.get("file"):
        parts.append(f"file={_escape(str(block['file']))}")
        if block.get("format"):
            parts.append(f"format={block['format']}")
        if block.get("read_only"):
            parts.append("readonly=on")
    elif device.get("type") in ("ide-cd", "scsi-cd"):
        parts.append("media=cdrom")
    return ",".join(parts)


def missing_files(args: Sequence[str]) -> list[str]:
    """Files the command line names that do not exist here (disks, memory files)."""
    found = []
    for arg in args:
        for part in arg.replace(",,", "\0").split(","):
            key, _, value = part.partition("=")
            if key in ("file", "mem-path") and not os.path.exists(value.replace("\0", ",")):
                found.append(value.replace("\0", ","))
    return found
