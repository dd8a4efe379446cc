"""QEMU identities -> device paths: the one function spec/paths.md §3 documents.

A QEMU stream names state by section idstr + instance id (``0000:00:05.0/e1000``, 0) and
RAM by block idstr (``0000:00:05.0/e1000.rom``).  The prefix before the first ``/`` of a
device's idstr is QEMU's device path; for PCI it is ``DDDD:BB:SS.F`` followed by one
``:SS.F`` per bridge.  The stream does not carry QOM type names, so the driver in a path
comes from the section's VMState name through DRIVERS, else the name itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from snapfmt.paths import Component, Path

# VMState description name -> the QOM type that registers it, where they differ.
DRIVERS = {
    "lsiscsi": "lsi53c895a",
    "pci_bridge": "pci-bridge",
    "virtio-net": "virtio-net-pci",
    "virtio-blk": "virtio-blk-pci",
    "virtio-scsi": "virtio-scsi-pci",
    "virtio-balloon": "virtio-balloon-pci",
    "virtio-console": "virtio-serial-pci",
    "virtio-rng": "virtio-rng-pci",
    "ide": "piix3-ide",
    "piix4_pm": "PIIX4_PM",
    "I440FX": "i440FX",
    "ICH9LPC": "ICH9-LPC",
    "ich9_smb": "ICH9-SMB",
    "ich9_pm": "ICH9-LPC",
    "ich9_ahci": "ich9-ahci",
    "mch": "mch",
    "vga": "VGA",
}

# Per-CPU sections: their instance id is the CPU index; they share one /cpu@N node.
CPU_SECTIONS = frozenset({"cpu", "cpu_common", "apic", "kvm-tpr-opt", "kvm-apic", "xen-apic"})

_PCI = re.compile(
    r"^(?P<domain>[0-9a-f]{4}):(?P<bus>[0-9a-f]{2}):(?P<slot>[0-9a-f]{2}\.[0-7])(?P<hops>(?::[0-9a-f]{2}\.[0-7])*)$"
)


class Host(NamedTuple):
    """The PCI host bridge and root bus a machine type implies."""

    bridge: str
    bus: str


def host_for(machine: str) -> Host:
    if "q35" in machine:
        return Host("q35-pcihost", "pcie.0")
    if machine.startswith("pc") or "i440fx" in machine:
        return Host("i440FX-pcihost", "pci.0")
    return Host("pcihost", "pci.0")


class PathMapper:
    """Maps the QEMU identities of one stream to paths.

    It sees every section first, so that a RAM block (``…/e1000.rom``) and a bridge hop
    find the driver of the device section at the same PCI address.
    """

    def __init__(self, machine: str, sections: Iterable[tuple[str, int]]) -> None:
        self.host = host_for(machine)
        self.sections = list(sections)
        self.drivers: dict[str, str] = {}  # PCI device path -> driver
        for idstr, _ in self.sections:
            prefix, sep, name = idstr.partition("/")
            if sep and "/" not in name and _PCI.match(prefix):  # the PCI device's own state
                self.drivers.setdefault(prefix, DRIVERS.get(name, name))
        counts: dict[str, int] = {}
        for idstr, _ in self.sections:
            counts[idstr] = counts.get(idstr, 0) + 1
        self.repeated = {idstr for idstr, n in counts.items() if n > 1}

    def device_node(self, pci: str, fallback_driver: str) -> Path:
        """The device node of PCI device path *pci* (``0000:00:08.0:03.0``)."""
        match = _PCI.match(pci)
        assert match is not None
        root = match["domain"] == "0000" and match["bus"] == "00"
        bus = self.host.bus if root else f"pci-{match['domain']}-{match['bus']}"
        nodes = [Component(self.host.bridge), Component(bus)]
        slots = [match["slot"], *match["hops"].split(":")[1:]]
        prefix = f"{match['domain']}:{match['bus']}"
        for depth, slot in enumerate(slots):
            here = f"{prefix}:{':'.join(slots[: depth + 1])}"
            last = depth == len(slots) - 1
            driver = self.drivers.get(here, fallback_driver if last else "pci-bridge")
            nodes.append(Component(driver, slot))
            if not last:
                nodes.append(Component("pci"))  # a bridge's bus: its name is not in the stream
        return Path(tuple(nodes))

    def section(self, idstr: str, instance_id: int) -> Path:
        prefix, sep, rest = idstr.partition("/")
        if sep and _PCI.match(prefix):
            *between, name = rest.split("/")
            driver = DRIVERS.get(name, name)
            if not between:
                return self.device_node(prefix, driver) / "vmstate"
            # a device on a bus below a PCI device: USB port "1", SCSI "0:0:0", ...
            parent = self.device_node(prefix, self.drivers.get(prefix, "pci-device"))
            return parent / Component(driver, "/".join(between)) / "vmstate"
        if idstr in CPU_SECTIONS:
            return Path((Component("cpu", str(instance_id)), Component(idstr)))
        node = Component(idstr, str(instance_id) if idstr in self.repeated else "")
        return Path((node, Component("vmstate")))

    def ram_block(self, idstr: str) -> Path:
        prefix, sep, name = idstr.partition("/")
        if sep and _PCI.match(prefix):
            base, _, kind = name.partition(".")
            leaf = "rom" if kind == "rom" else name
            return self.device_node(prefix, DRIVERS.get(base, base)) / leaf
        return Path((Component(idstr),))

    @staticmethod
    def fallback_section(idstr: str, instance_id: int) -> Path:
        """A path that cannot collide: the id string itself (used when two identities
        would map to one path)."""
        return Path((Component(idstr, str(instance_id)), Component("vmstate")))

    @staticmethod
    def fallback_ram_block(idstr: str) -> Path:
        return Path((Component("ram"), Component(idstr)))


class PathAssigner:
    """The paths a stream's sections get, one identity after another in stream order:
    the mapped path, or the fallback where another identity has that path already.
    Reader and writer both use it, so that a stream written can be read back."""

    def __init__(self, machine: str, sections: Iterable[tuple[str, int]]) -> None:
        self.mapper = PathMapper(machine, sections)
        self.taken: set[str] = set()

    def _take(self, path: Path, fallback: Path) -> str | None:
        for candidate in (str(path), str(fallback)):
            if candidate not in self.taken:
                self.taken.add(candidate)
                return candidate
        return None

    def section(self, idstr: str, instance_id: int) -> str | None:
        """The path of a device section; None when it and its fallback are both taken."""
        return self._take(self.mapper.section(idstr, instance_id),
                          self.mapper.fallback_section(idstr, instance_id))  # fmt: skip

    def ram_block(self, idstr: str) -> str | None:
        """The path of a RAM block; None when it and its fallback are both taken."""
        return self._take(self.mapper.ram_block(idstr), self.mapper.fallback_ram_block(idstr))
