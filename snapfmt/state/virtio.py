"""virtio device state decoded: the ``virtio`` field QEMU's vmdesc leaves opaque.

The layouts are snapfmt/formats/virtio.py's.  What they cannot read from the bytes in
order is worked out here first, as QEMU knows it from the device it loads into:

- the PCI config space at the start says whether the device is PCI Express (then 4096
  bytes of it are saved) and how many MSI-X vectors it has (then the table, the pending
  bits and a vector per queue are saved);
- a ``virtio/packed_virtqueues`` subsection means packed rings, whose saved queue
  elements carry a descriptor count;
- the device config space gives virtio-net's queue pairs, the common part the features
  and the queue count the device parts depend on.

A part snapfmt does not know (a subsection of a later QEMU, a transport other than PCI)
ends the decoding there: the fields decoded so far stay, and the rest is one
``undecoded`` buffer field with a note saying why.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from snapfmt.errors import LayoutError
from snapfmt.formats import virtio as vf
from snapfmt.state.located import Walk
from snapfmt.state.pci import capabilities
from snapfmt.vmstate import Field

PCI_DEVICE_VERSION = 2  # the version word virtio-pci's PCIDevice state starts with

# vmstate name -> (device config declaration, device part declaration)
_DEVICES = {
    "virtio-net": ("NetConfig", "NetDevice"),
    "virtio-blk": ("BlkConfig", "BlkDevice"),
    "virtio-scsi": ("ScsiConfig", None),
    "virtio-balloon": ("BalloonConfig", "BalloonDevice"),
    "virtio-console": ("ConsoleConfig", "SerialDevice"),
    "virtio-rng": (None, None),
    "virtio-input": ("InputConfig", None),
    "virtio-gpu": ("GpuConfig", None),
}


class Decoded(NamedTuple):
    fields: list[Field]
    note: str | None  # why part of the state stayed undecoded; None when all of it decoded


def _params(data: bytes) -> dict[str, Any]:
    config = data[4 : 4 + vf.PCI_CONFIG_SIZE]
    caps: dict[int, int] = {}  # capability id -> offset of its first instance
    for at, cap in capabilities(config):
        caps.setdefault(cap, at)
    msix = 0
    if vf.PCI_CAP_ID_MSIX in caps and caps[vf.PCI_CAP_ID_MSIX] + 4 <= len(config):
        at = caps[vf.PCI_CAP_ID_MSIX]
        msix = (int.from_bytes(config[at + 2 : at + 4], "little") & 0x7FF) + 1
    return {
        "express": vf.PCI_CAP_ID_EXP in caps,
        "msix": msix,
        "packed": b"\x05\x18virtio/packed_virtqueues" in data,
        "max_queue_pairs": 1,
        "guest_offloads": False,
        "num_queues": 0,
        "scanout_version": 2,
    }


def decode_virtio(vmstate_name: str, data: bytes, base: int, label: str = "virtio") -> Decoded:
    """The fields of a ``virtio`` field's *data* (at file offset *base*)."""
    if data[:4] != PCI_DEVICE_VERSION.to_bytes(4, "big") or len(data) < 4 + vf.PCI_CONFIG_SIZE:
        return _rest([], data, base, 0, label, "not a virtio-pci device's state")
    params = _params(data)
    walk = Walk(data, base, params)
    config_decl, device_decl = _DEVICES.get(vmstate_name, (None, None))
    known = vmstate_name in _DEVICES
    try:
        walk.decode(vf.PciTransport, f"{label}.pci")
        common = walk.decode(vf.Common, label)
        _config(walk, config_decl, label)
        params.update(_device_params(vmstate_name, common, walk))
        if device_decl is not None:
            walk.decode(getattr(vf, device_decl), f"{label}.device")
        last = _subsections(walk, label)
    except LayoutError as e:
        return _rest(walk.fields, data, base, walk.pos, label, str(e))
    if walk.pos < len(data):
        why = (f"subsection {last!r} is not one snapfmt knows" if last
               else f"the device part of {vmstate_name!r} is not one snapfmt knows" if not known
               else "bytes after the last subsection")  # fmt: skip
        return _rest(walk.fields, data, base, walk.pos, label, why)
    return Decoded(walk.fields, None)


def _config(walk: Walk, decl_name: str | None, label: str) -> None:
    """The config space buffer replaced by its fields, as far as config_len reaches."""
    where = next(i for i in range(len(walk.fields) - 1, -1, -1)
                 if walk.fields[i].name == f"{label}.config")  # fmt: skip
    raw = walk.fields.pop(where)
    found: list[Field] = []
    rest = raw.value
    assert isinstance(rest, bytes)
    at = raw.offset
    if decl_name is not None and rest:
        inner = Walk(rest, at, {})
        for sub in getattr(vf, decl_name).subcons:
            size = sub.sizeof()
            if inner.pos + size > len(rest):
                break
            inner.decode(sub, f"{label}.config.{sub.name}")
        found = inner.fields
        at += inner.pos
        rest = rest[inner.pos :]
    if rest:
        found.append(Field(f"{label}.config.rest", "buffer", at, len(rest), rest))
    walk.fields[where:where] = found  # (in the place of the buffer, in offset order)


def _device_params(vmstate_name: str, common: Any, walk: Walk) -> dict[str, Any]:
    config = {f.name.rsplit(".", 1)[1]: f.value for f in walk.fields if ".config." in f.name}
    pairs = config.get("max_virtqueue_pairs", 1) if vmstate_name == "virtio-net" else 1
    return {
        "num_queues": common.num_queues,
        "max_queue_pairs": pairs if isinstance(pairs, int) else 1,
        "guest_offloads": bool(common.guest_features >> vf.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS & 1),
    }


def _subsections(walk: Walk, label: str) -> str | None:
    """Decode subsections while their names are known; the name of the first one that
    is not (None if every one was)."""
    data = walk.data
    while walk.pos < len(data) and data[walk.pos] == vf.SUBSECTION_MARKER:
        if walk.pos + 2 > len(data):
            raise LayoutError(f"subsection header at {walk.pos} is cut off")
        head_size = 2 + data[walk.pos + 1] + 4
        try:
            head = vf.SubsectionHeader.parse(data[walk.pos : walk.pos + head_size])
        except Exception:  # construct's errors, a name that is not ASCII
            raise LayoutError(f"bad subsection header at {walk.pos}") from None
        body = vf.SUBSECTIONS.get(head.name)
        if body is None:
            return str(head.name)
        walk.pos += head_size
        walk.decode(body, f"{label}.{head.name}:")
    return None


def _rest(fields: list[Field], data: bytes, base: int, pos: int, label: str, why: str) -> Decoded:
    rest = data[pos:]
    out = list(fields)
    if rest:
        out.append(Field(f"{label}.undecoded", "buffer", base + pos, len(rest), rest))
    return Decoded(out, f"decoded up to byte {pos} of {len(data)}: {why}")


def decode_gpu(data: bytes, base: int, label: str = "virtio-gpu") -> Decoded:
    """virtio-gpu's own field: resources and scanouts, in QEMU 10.0's scanout layout
    (x-scanout-vmstate-version 2) or 7.2's (1), whichever takes the bytes exactly."""
    problem = ""
    for version in (2, 1):
        walk = Walk(data, base, {"scanout_version": version})
        try:
            walk.decode(vf.GpuState, label)
        except LayoutError as e:
            problem = str(e)
            continue
        if walk.pos == len(data):
            return Decoded(walk.fields, None)
        problem = f"{len(data) - walk.pos} bytes after the scanouts"
    return _rest([], data, base, 0, label, problem)
