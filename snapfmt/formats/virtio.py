"""virtio device state inside a QEMU migration stream -- declarations only.

A virtio device's section holds one field, ``virtio``, whose bytes are what QEMU's
``virtio_save()`` (hw/virtio/virtio.c) writes, in this order:

1. the transport's ``save_config`` -- for virtio-pci (hw/virtio/virtio-pci.c) the
   ``PCIDevice`` state (hw/pci/pci.c: a version word, 256 bytes of config space or 4096
   for a PCI Express device, the four INTx levels), then with MSI-X (hw/pci/msix.c) the
   vector table and pending bits, and the config vector;
2. the common part (:data:`Common`): status, ISR, queue selector, the low 32 feature bits,
   the device config space, and per queue its size, descriptor address, last available
   index and (MSI-X) vector;
3. the device's own part: a legacy ``save`` function or its ``vmsd`` fields;
4. subsections, each a 0x05 byte, a name, a version word and the body declared for that
   name in :data:`SUBSECTIONS`: the device vmsd's first, then those of ``vmstate_virtio``.

Integers are big-endian except where the guest's layout is kept (MSI-X entries, the
device config space of a modern device: little-endian).  The layouts are those QEMU 7.2
and 10.0 write; 10.0 adds ``virtio-net-device/backend`` and virtio-gpu's second scanout
layout.  What the bytes do not say (MSI-X vector count, PCI Express, packed rings, the
negotiated features) comes in as ``_params`` that snapfmt/state/virtio.py works out.
Policy lives there too.
"""

from __future__ import annotations

from typing import Any

from snapfmt.formats import declared

SUBSECTION_MARKER = 0x05
VIRTIO_QUEUE_MAX = 1024  # every per-queue subsection array has this many entries
VIRTQUEUE_MAX_SIZE = 1024  # entries of the address arrays of a saved queue element
PCI_CONFIG_SIZE, PCIE_CONFIG_SIZE = 256, 4096
PCI_CAP_ID_MSIX, PCI_CAP_ID_EXP = 0x11, 0x10
VIRTIO_F_VERSION_1, VIRTIO_F_RING_PACKED = 32, 34
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2


def _declare() -> dict[str, Any]:
    declared = {**_transport(), **_common(), **_devices(), **_subsections()}
    declared = {k: v for k, v in declared.items() if k[0].isupper()}  # (not helpers: sg, iov)
    declared["STRUCTURES"] = {k: v for k, v in declared.items() if k != "SUBSECTIONS"}
    return declared


def _transport() -> dict[str, Any]:
    """virtio-pci's save_config."""
    from construct import Array, Bytes, If, Int16ub, Int32ub, Int32ul, Int64ul, Struct, this

    MsixEntry = Struct("address" / Int64ul, "data" / Int32ul, "control" / Int32ul)
    PciTransport = Struct(
        "version_id" / Int32ub,
        "config" / Bytes(PCI_CONFIG_SIZE),
        "config_express" / If(this._params.express, Bytes(PCIE_CONFIG_SIZE - PCI_CONFIG_SIZE)),
        "irq_state" / Array(4, Int32ub),
        "msix_table" / If(this._params.msix, Array(this._params.msix, MsixEntry)),
        "msix_pba" / If(this._params.msix, Bytes(lambda c: (c._params.msix + 7) // 8)),
        "config_vector" / If(this._params.msix, Int16ub),
    )
    return {"MsixEntry": MsixEntry, "PciTransport": PciTransport}


def _common() -> dict[str, Any]:
    """virtio_save's common part, after the transport's."""
    from construct import Array, Bytes, If, Int8ub, Int16ub, Int32ub, Int64ub, Struct, this

    Queue = Struct(
        "num" / Int32ub,
        "desc" / Int64ub,
        "last_avail_idx" / Int16ub,
        "vector" / If(this._params.msix, Int16ub),
    )
    Common = Struct(
        "status" / Int8ub,
        "isr" / Int8ub,
        "queue_sel" / Int16ub,
        "guest_features" / Int32ub,
        "config_len" / Int32ub,
        "config" / Bytes(this.config_len),
        "num_queues" / Int32ub,
        "vq" / Array(this.num_queues, Queue),
    )
    return {"Queue": Queue, "Common": Common}


def _devices() -> dict[str, Any]:
    """Each device's own part (after the common part), by the device's declaration."""
    element = _element()
    return {**element, **_device_parts(element["QueueElement"]), **_net(), **_configs(),
            **_gpu()}  # fmt: skip


def _element() -> dict[str, Any]:
    """A saved queue element: VirtQueueElementOld as a 64-bit little-endian host lays it
    out (49168 bytes), after a descriptor count with packed rings."""
    from construct import Array, Bytes, If, Int32ub, Int32ul, Int64ul, Struct, this

    sg = Struct("base" / Int64ul, "len" / Int64ul)
    QueueElement = Struct(
        "ndescs" / If(this._params.packed, Int32ub),
        "index" / Int32ul,
        "out_num" / Int32ul,
        "in_num" / Int32ul,
        "padding" / Bytes(4),
        "in_addr" / Array(VIRTQUEUE_MAX_SIZE, Int64ul),
        "out_addr" / Array(VIRTQUEUE_MAX_SIZE, Int64ul),
        "in_sg" / Array(VIRTQUEUE_MAX_SIZE, sg),
        "out_sg" / Array(VIRTQUEUE_MAX_SIZE, sg),
    )
    return {"QueueElement": QueueElement}


def _device_parts(QueueElement: Any) -> dict[str, Any]:
    """virtio-blk's and virtio-serial's legacy save functions, and the vmsd fields of
    virtio-net-device and virtio-balloon-device."""
    from construct import (
        Array,
        If,
        Int8sb,
        Int8ub,
        Int16ub,
        Int32ub,
        Int64ub,
        RepeatUntil,
        Struct,
        this,
    )  # fmt: skip

    BlkRequest = Struct(
        "more" / Int8sb,
        "queue" / If(lambda c: c.more and c._params.num_queues > 1, Int32ub),
        "element" / If(this.more, QueueElement),
    )
    BlkDevice = Struct("rq" / RepeatUntil(lambda x, lst, ctx: not x["more"], BlkRequest))
    BalloonDevice = Struct("num_pages" / Int32ub, "actual" / Int32ub)
    SerialPort = Struct(
        "id" / Int32ub,
        "guest_connected" / Int8ub,
        "host_connected" / Int8ub,
        "elem_popped" / Int32ub,
        "iov_idx" / If(this.elem_popped, Int32ub),
        "iov_offset" / If(this.elem_popped, Int64ub),
        "element" / If(this.elem_popped, QueueElement),
    )
    SerialDevice = Struct(  # virtio_serial_save_device
        "cols" / Int16ub,
        "rows" / Int16ub,
        "max_nr_ports" / Int32ub,
        "ports_map" / Array(lambda c: (c.max_nr_ports + 31) // 32, Int32ub),
        "nr_active_ports" / Int32ub,
        "ports" / Array(this.nr_active_ports, SerialPort),
    )
    return {name: value for name, value in locals().items() if isinstance(value, Struct)}


def _net() -> dict[str, Any]:
    """virtio-net-device's fields (version 11); the queue-pair fields only with more than
    one pair, the offloads only when the guest took them."""
    from construct import Array, Bytes, If, Int8ub, Int16ub, Int32ub, Int64ub, Struct, this

    pairs = this._params.max_queue_pairs > 1
    NetDevice = Struct(  # virtio-net-device, version 11
        "mac" / Bytes(6),
        "tx_waiting" / Int32ub,
        "mergeable_rx_bufs" / Int32ub,
        "status" / Int16ub,
        "promisc" / Int8ub,
        "allmulti" / Int8ub,
        "mac_table_in_use" / Int32ub,
        "mac_table_macs" / Bytes(this.mac_table_in_use * 6),
        "vlans" / Bytes(512),
        "has_vnet_hdr" / Int32ub,
        *(name / Int8ub for name in ("mac_table_multi_overflow", "mac_table_uni_overflow",
                                     "alluni", "nomulti", "nouni", "nobcast", "has_ufo")),
        "max_queue_pairs" / If(pairs, Int16ub),
        "curr_queue_pairs" / If(pairs, Int16ub),
        "tx_waiting_more" / If(pairs, Array(this.curr_queue_pairs - 1, Int32ub)),
        "curr_guest_offloads" / If(this._params.guest_offloads, Int64ub),
    )  # fmt: skip
    return {"NetDevice": NetDevice}


def _configs() -> dict[str, Any]:
    """The device config spaces, little-endian as a modern guest reads them; QEMU saves
    as much of each as the features it offers reach."""
    from construct import Bytes, Int8ub, Int16ul, Int32ul, Int64ul, Struct

    NetConfig = Struct(
        "mac" / Bytes(6), "status" / Int16ul, "max_virtqueue_pairs" / Int16ul,
        "mtu" / Int16ul, "speed" / Int32ul, "duplex" / Int8ub, "rss_max_key_size" / Int8ub,
        "rss_max_indirection_table_length" / Int16ul, "supported_hash_types" / Int32ul,
    )  # fmt: skip
    BlkConfig = Struct(
        "capacity" / Int64ul, "size_max" / Int32ul, "seg_max" / Int32ul,
        "cylinders" / Int16ul, "heads" / Int8ub, "sectors" / Int8ub, "blk_size" / Int32ul,
        "physical_block_exp" / Int8ub, "alignment_offset" / Int8ub, "min_io_size" / Int16ul,
        "opt_io_size" / Int32ul, "wce" / Int8ub, "unused" / Int8ub, "num_queues" / Int16ul,
        "max_discard_sectors" / Int32ul, "max_discard_seg" / Int32ul,
        "discard_sector_alignment" / Int32ul, "max_write_zeroes_sectors" / Int32ul,
        "max_write_zeroes_seg" / Int32ul, "write_zeroes_may_unmap" / Int8ub,
        "unused1" / Bytes(3),
    )  # fmt: skip
    ScsiConfig = Struct(
        "num_queues" / Int32ul, "seg_max" / Int32ul, "max_sectors" / Int32ul,
        "cmd_per_lun" / Int32ul, "event_info_size" / Int32ul, "sense_size" / Int32ul,
        "cdb_size" / Int32ul, "max_channel" / Int16ul, "max_target" / Int16ul,
        "max_lun" / Int32ul,
    )  # fmt: skip
    BalloonConfig = Struct(
        "num_pages" / Int32ul, "actual" / Int32ul, "free_page_hint_cmd_id" / Int32ul,
        "poison_val" / Int32ul,
    )  # fmt: skip
    ConsoleConfig = Struct(
        "cols" / Int16ul, "rows" / Int16ul, "max_nr_ports" / Int32ul, "emerg_wr" / Int32ul
    )
    InputConfig = Struct(
        "select" / Int8ub, "subsel" / Int8ub, "size" / Int8ub, "reserved" / Bytes(5),
        "u" / Bytes(128),
    )  # fmt: skip
    GpuConfig = Struct(
        "events_read" / Int32ul, "events_clear" / Int32ul, "num_scanouts" / Int32ul,
        "num_capsets" / Int32ul,
    )  # fmt: skip
    return {name: value for name, value in locals().items() if isinstance(value, Struct)}


def _gpu() -> dict[str, Any]:
    """virtio-gpu's own field: 2D resources with their pixels, then the scanouts (six
    more words each in QEMU 10.0's scanout version 2)."""
    from construct import Array, Bytes, If, Int32ub, Int64ub, RepeatUntil, Struct, this

    iov = Struct("addr" / Int64ub, "len" / Int32ub)
    GpuResource = Struct(
        "resource_id" / Int32ub,
        "width" / If(this.resource_id, Int32ub),
        "height" / If(this.resource_id, Int32ub),
        "format" / If(this.resource_id, Int32ub),
        "iov_cnt" / If(this.resource_id, Int32ub),
        "iov" / If(this.resource_id, Array(this.iov_cnt, iov)),
        "data" / If(this.resource_id, Bytes(lambda c: c.width * 4 * c.height)),
    )
    scanout = [
        "resource_id" / Int32ub, "width" / Int32ub, "height" / Int32ub, "x" / Int32ub,
        "y" / Int32ub, "cursor_resource_id" / Int32ub, "cursor_hot_x" / Int32ub,
        "cursor_hot_y" / Int32ub, "cursor_pos_x" / Int32ub, "cursor_pos_y" / Int32ub,
    ]  # fmt: skip
    GpuScanout = Struct(
        *scanout,
        *(name / If(this._params.scanout_version >= 2, Int32ub)
          for name in ("fb_format", "fb_bytes_pp", "fb_width", "fb_height", "fb_stride",
                       "fb_offset")),
    )  # fmt: skip
    GpuState = Struct(  # the virtio-gpu field: 2D resources, then the scanouts
        "resources" / RepeatUntil(lambda x, lst, ctx: not x["resource_id"], GpuResource),
        "enable" / Int32ub,
        "max_outputs" / Int32ub,
        "scanout" / Array(this.max_outputs, GpuScanout),
    )
    return {name: value for name, value in locals().items() if isinstance(value, Struct)}


def _subsections() -> dict[str, Any]:
    """The subsection header and the per-queue states; SUBSECTIONS: the bodies by name."""
    states = _queue_states()
    return {**states, **_subsection_bodies(states)}


def _queue_states() -> dict[str, Any]:
    """The subsection header, and the states QEMU keeps for each of VIRTIO_QUEUE_MAX
    queues."""
    from construct import (
        Array,
        Const,
        Flag,
        Int8ub,
        Int16ub,
        Int32ub,
        Int64ub,
        PascalString,
        Struct,
    )

    SubsectionHeader = Struct(
        "marker" / Const(SUBSECTION_MARKER, Int8ub),
        "name" / PascalString(Int8ub, "ascii"),
        "version_id" / Int32ub,
    )
    VirtqueueState = Struct("avail" / Int64ub, "used" / Int64ub)
    PackedVirtqueueState = Struct(
        "last_avail_idx" / Int16ub,
        "last_avail_wrap_counter" / Flag,
        "used_idx" / Int16ub,
        "used_wrap_counter" / Flag,
        "inuse" / Int32ub,
    )
    ModernQueueState = Struct(
        "num" / Int16ub,
        "unused" / Int8ub,  # VMSTATE_UNUSED(1): once the high byte of a 16-bit enabled
        "enabled" / Flag,
        "desc" / Array(2, Int32ub),
        "avail" / Array(2, Int32ub),
        "used" / Array(2, Int32ub),
    )
    return {
        "SubsectionHeader": SubsectionHeader,
        "VirtqueueState": VirtqueueState,
        "PackedVirtqueueState": PackedVirtqueueState,
        "ModernQueueState": ModernQueueState,
    }


def _subsection_bodies(states: dict[str, Any]) -> dict[str, Any]:
    """The body of every subsection QEMU 7.2 and 10.0 write inside the virtio field."""
    from construct import (
        Array,
        Flag,
        Int8ub,
        Int32ub,
        Int64ub,
        RepeatUntil,
        Struct,
    )

    VirtqueueState = states["VirtqueueState"]
    PackedVirtqueueState = states["PackedVirtqueueState"]
    ModernQueueState = states["ModernQueueState"]
    found = _device_subsections()
    RssState, GpuBlob, chunk = found["RssState"], found["GpuBlob"], found["chunk"]
    SUBSECTIONS = {
        "virtio/device_endian": Struct("device_endian" / Int8ub),
        "virtio/64bit_features": Struct("guest_features" / Int64ub),
        "virtio/virtqueues": Struct("vq" / Array(VIRTIO_QUEUE_MAX, VirtqueueState)),
        "virtio/ringsize": Struct("vq" / Array(VIRTIO_QUEUE_MAX, Struct("num_default" / Int32ub))),
        "virtio/broken": Struct("broken" / Flag),
        "virtio/extra_state": Struct(),  # its body is nested subsections
        "virtio/started": Struct("started" / Flag),
        "virtio/packed_virtqueues": Struct("vq" / Array(VIRTIO_QUEUE_MAX, PackedVirtqueueState)),
        "virtio/disabled": Struct("disabled" / Flag),
        "virtio_pci/modern_state": Struct(
            "dfselect" / Int32ub,
            "gfselect" / Int32ub,
            "guest_features" / Array(2, Int32ub),
            "vq" / Array(VIRTIO_QUEUE_MAX, ModernQueueState),
        ),
        "virtio-net-device/rss": RssState,
        "virtio-net-device/backend": Struct(  # QEMU 10.0, vhost-user back ends only
            "chunks" / RepeatUntil(lambda x, lst, ctx: not x["length"], chunk)
        ),
        "virtio-gpu/blob": Struct(
            "blobs" / RepeatUntil(lambda x, lst, ctx: not x["resource_id"], GpuBlob)
        ),
        "virtio-balloon-device/free-page-report": Struct(
            "free_page_hint_cmd_id" / Int32ub, "free_page_hint_status" / Int32ub
        ),
        "virtio-balloon-device/page-poison": Struct("poison_val" / Int32ub),
    }
    return {"RssState": RssState, "GpuBlob": GpuBlob, "SUBSECTIONS": SUBSECTIONS}


def _device_subsections() -> dict[str, Any]:
    """What virtio-net-device's and virtio-gpu's subsections hold."""
    from construct import Array, Bytes, Flag, If, Int8ub, Int16ub, Int32ub, Int64ub, Struct, this

    RssState = Struct(
        "enabled" / Flag,
        "redirect" / Int8ub,
        "populate_hash" / Int8ub,
        "hash_types" / Int32ub,
        "indirections_len" / Int16ub,
        "default_queue" / Int16ub,
        "key" / Bytes(40),
        "indirections_table" / Array(this.indirections_len, Int16ub),
    )
    chunk = Struct("length" / Int32ub, "data" / Bytes(this.length))
    iov = Struct("addr" / Int64ub, "len" / Int32ub)
    GpuBlob = Struct(
        "resource_id" / Int32ub,
        "blob_size" / If(this.resource_id, Int32ub),
        "iov_cnt" / If(this.resource_id, Int32ub),
        "iov" / If(this.resource_id, Array(this.iov_cnt, iov)),
    )
    return {"RssState": RssState, "GpuBlob": GpuBlob, "chunk": chunk}


def __getattr__(name: str) -> Any:
    return declared(globals(), _declare, name)
