"""The feature bits a target's virtio devices offer, asked of the running QEMU.

QEMU refuses a loaded virtio state whose guest features include a bit its device does
not offer (``virtio_load``: "Features 0x… unsupported. Allowed features: 0x…").  The
offered (host) features are not in a stream; QMP's ``x-query-virtio-status`` gives them
by name, and the names map to bits by the virtio specification's numbering below.
"""

from __future__ import annotations

from typing import Any

FEATURE_BITS = {
    # transport and ring features (virtio 1.2 §6), and vhost's
    "VIRTIO_F_NOTIFY_ON_EMPTY": 24, "VHOST_F_LOG_ALL": 26, "VIRTIO_F_ANY_LAYOUT": 27,
    "VIRTIO_RING_F_INDIRECT_DESC": 28, "VIRTIO_RING_F_EVENT_IDX": 29,
    "VHOST_USER_F_PROTOCOL_FEATURES": 30, "VIRTIO_F_BAD_FEATURE": 30, "VIRTIO_F_VERSION_1": 32,
    "VIRTIO_F_IOMMU_PLATFORM": 33, "VIRTIO_F_ACCESS_PLATFORM": 33, "VIRTIO_F_RING_PACKED": 34,
    "VIRTIO_F_IN_ORDER": 35, "VIRTIO_F_ORDER_PLATFORM": 36, "VIRTIO_F_SR_IOV": 37,
    "VIRTIO_F_NOTIFICATION_DATA": 38, "VIRTIO_F_NOTIF_CONFIG_DATA": 39,
    "VIRTIO_F_RING_RESET": 40,
    # network device (§5.1.3)
    "VIRTIO_NET_F_CSUM": 0, "VIRTIO_NET_F_GUEST_CSUM": 1, "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS": 2,
    "VIRTIO_NET_F_MTU": 3, "VIRTIO_NET_F_MAC": 5, "VIRTIO_NET_F_GSO": 6,
    "VIRTIO_NET_F_GUEST_TSO4": 7, "VIRTIO_NET_F_GUEST_TSO6": 8, "VIRTIO_NET_F_GUEST_ECN": 9,
    "VIRTIO_NET_F_GUEST_UFO": 10, "VIRTIO_NET_F_HOST_TSO4": 11, "VIRTIO_NET_F_HOST_TSO6": 12,
    "VIRTIO_NET_F_HOST_ECN": 13, "VIRTIO_NET_F_HOST_UFO": 14, "VIRTIO_NET_F_MRG_RXBUF": 15,
    "VIRTIO_NET_F_STATUS": 16, "VIRTIO_NET_F_CTRL_VQ": 17, "VIRTIO_NET_F_CTRL_RX": 18,
    "VIRTIO_NET_F_CTRL_VLAN": 19, "VIRTIO_NET_F_CTRL_RX_EXTRA": 20,
    "VIRTIO_NET_F_GUEST_ANNOUNCE": 21, "VIRTIO_NET_F_MQ": 22, "VIRTIO_NET_F_CTRL_MAC_ADDR": 23,
    "VIRTIO_NET_F_NOTF_COAL": 53, "VIRTIO_NET_F_GUEST_USO4": 54, "VIRTIO_NET_F_GUEST_USO6": 55,
    "VIRTIO_NET_F_HOST_USO": 56, "VIRTIO_NET_F_HASH_REPORT": 57, "VIRTIO_NET_F_GUEST_HDRLEN": 59,
    "VIRTIO_NET_F_RSS": 60, "VIRTIO_NET_F_RSC_EXT": 61, "VIRTIO_NET_F_STANDBY": 62,
    "VIRTIO_NET_F_SPEED_DUPLEX": 63,
    # block device (§5.2.3)
    "VIRTIO_BLK_F_BARRIER": 0, "VIRTIO_BLK_F_SIZE_MAX": 1, "VIRTIO_BLK_F_SEG_MAX": 2,
    "VIRTIO_BLK_F_GEOMETRY": 4, "VIRTIO_BLK_F_RO": 5, "VIRTIO_BLK_F_BLK_SIZE": 6,
    "VIRTIO_BLK_F_SCSI": 7, "VIRTIO_BLK_F_FLUSH": 9, "VIRTIO_BLK_F_TOPOLOGY": 10,
    "VIRTIO_BLK_F_CONFIG_WCE": 11, "VIRTIO_BLK_F_MQ": 12, "VIRTIO_BLK_F_DISCARD": 13,
    "VIRTIO_BLK_F_WRITE_ZEROES": 14, "VIRTIO_BLK_F_LIFETIME": 15,
    "VIRTIO_BLK_F_SECURE_ERASE": 16, "VIRTIO_BLK_F_ZONED": 17,
    # SCSI host, memory balloon, console, GPU devices
    "VIRTIO_SCSI_F_INOUT": 0, "VIRTIO_SCSI_F_HOTPLUG": 1, "VIRTIO_SCSI_F_CHANGE": 2,
    "VIRTIO_SCSI_F_T10_PI": 3,
    "VIRTIO_BALLOON_F_MUST_TELL_HOST": 0, "VIRTIO_BALLOON_F_STATS_VQ": 1,
    "VIRTIO_BALLOON_F_DEFLATE_ON_OOM": 2, "VIRTIO_BALLOON_F_FREE_PAGE_HINT": 3,
    "VIRTIO_BALLOON_F_PAGE_POISON": 4, "VIRTIO_BALLOON_F_REPORTING": 5,
    "VIRTIO_CONSOLE_F_SIZE": 0, "VIRTIO_CONSOLE_F_MULTIPORT": 1,
    "VIRTIO_CONSOLE_F_EMERG_WRITE": 2,
    "VIRTIO_GPU_F_VIRGL": 0, "VIRTIO_GPU_F_EDID": 1, "VIRTIO_GPU_F_RESOURCE_UUID": 2,
    "VIRTIO_GPU_F_RESOURCE_BLOB": 3, "VIRTIO_GPU_F_CONTEXT_INIT": 4,
}  # fmt: skip


def feature_bits(status: dict[str, Any]) -> int | None:
    """The bits of ``x-query-virtio-status``'s ``host-features``; None when a name is not
    one of FEATURE_BITS (the bits would be incomplete)."""
    bits = 0
    for key, value in status.items():
        if key.startswith("unknown") and isinstance(value, int):
            bits |= value
        elif isinstance(value, list):
            for text in value:
                bit = FEATURE_BITS.get(str(text).split(":", 1)[0])
                if bit is None:
                    return None
                bits |= 1 << bit
    return bits


def _pci_path(vm: Any, device: str) -> str | None:
    """QEMU's PCI path (``0000:00:10.0:00.0``) of the PCI device at QOM path *device*."""
    parts = []
    for _ in range(8):  # (bridges nest; a loop of them would be a broken QOM tree)
        devfn = vm.command("qom-get", path=device, property="addr")
        parts.append(f"{devfn >> 3:02x}.{devfn & 7}")
        bus = vm.command("qom-get", path=device, property="parent_bus")
        parent = str(bus).rsplit("/", 1)[0]
        try:
            vm.command("qom-get", path=parent, property="addr")
        except Exception:  # the host bridge: no PCI address, the root bus
            return ":".join(["0000:00", *reversed(parts)])
        device = parent
    return None


def host_features(vm: Any) -> dict[str, int]:
    """{PCI path: offered feature bits} of every virtio-pci device of a running QEMU;
    devices whose features or path cannot be told are left out."""
    found: dict[str, int] = {}
    try:
        listed = vm.command("x-query-virtio")
    except Exception:  # (a QEMU without the command: nothing to check against)
        return found
    for entry in listed:
        backend = str(entry.get("path", ""))
        try:
            status = vm.command("x-query-virtio-status", path=backend)
            path = _pci_path(vm, backend.rsplit("/", 1)[0])
        except Exception:
            continue
        bits = feature_bits(status.get("host-features", {}))
        if path is not None and bits is not None:
            found[path] = bits
    return found
