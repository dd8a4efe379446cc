"""The registry of what fields mean, keyed by vmstate name (``*``: any device).

Adding an interpretation is one line: the vmstate name, the field (its exact name, a
regular expression in ``re:`` form matched against the whole name, or ``type:`` and a
field type), and a function of snapfmt/state/interpret.py.  ``SUBARRAYS`` names the sub-arrays QEMU saves of a
larger array by the register they start at, where QEMU's vmdesc only numbers them.
"""

from __future__ import annotations

from snapfmt.state import interpret as i

# vmstate name -> {name QEMU's vmdesc gives a sub-array: (register it starts at, index)}
# (e1000: VMSTATE_UINT32_SUB_ARRAY of mac_reg at RA, MTA and VFTA, hw/net/e1000.c)
SUBARRAYS: dict[str, dict[str, tuple[str, int]]] = {
    "e1000": {"mac_reg[0]": ("RA", 0x5400 >> 2), "mac_reg[1]": ("MTA", 0x5200 >> 2),
              "mac_reg[2]": ("VFTA", 0x5600 >> 2)},
}  # fmt: skip

RA = 0x5400 >> 2  # an Intel NIC's first receive address register (RAL0; RAH0 follows)

_VIRTIO = (
    "virtio-net",
    "virtio-blk",
    "virtio-scsi",
    "virtio-balloon",
    "virtio-console",
    "virtio-rng",
    "virtio-input",
    "virtio-gpu",
)
_FULL = "e1000/full_mac_state:mac_reg"
_RAL_RAH = [("e1000", ("mac_reg[RA+0]", "mac_reg[RA+1]")),
            ("e1000", (f"{_FULL}[{RA}]", f"{_FULL}[{RA + 1}]")),
            ("e1000e", (f"core.mac[{RA}]", f"core.mac[{RA + 1}]"))]  # fmt: skip

# (vmstate name, field name or "re:" or "type:" key, interpreter)
DISPLAYS: list[tuple[str, str, i.Interpreter]] = [
    ("cpu", r"re:env\.regs\[(\d+)\]", i.gpr),
    ("cpu", "env.eip", i.named("RIP")),
    ("cpu", "env.eflags", i.rflags),
    ("cpu", r"re:env\.cr\[(\d)\]", i.control_register),
    ("cpu", "env.efer", i.efer),
    ("cpu", r"re:env\.segs\[(\d)\]\.(selector|base|limit|flags)", i.segment),
    ("cpu", r"re:env\.(ldt|tr|gdt|idt)\.(selector|base|limit|flags)", i.segment),
    *((vmstate, name, i.receive_address(*pair)) for vmstate, pair in _RAL_RAH
      for name in pair),
    ("e1000e", "core.permanent_mac[0]", i.mac_bytes("core.permanent_mac")),
    ("rtl8139", "phys", i.mac),
    ("rtl8139", "conf.macaddr", i.mac),
    ("pcnet", "state.prom", i.mac),
    ("vmxnet3", "temp_mac", i.mac_low_word),  # (QEMU does not migrate its MAC)
    ("ne2000", "ne2000.phys", i.mac),
    ("ne2000", "ne2000.mem", i.mac_doubled),
    ("virtio-net", "virtio.device.mac", i.mac),
    ("virtio-net", "virtio.config.mac", i.mac),
    ("globalstate", "runstate", i.c_string),
    ("mc146818rtc", "cmos_data", i.rtc_cmos),
    ("mc146818rtc", "base_rtc", i.epoch_seconds),
    *((name, field, i.virtio_features(name, shift)) for name in _VIRTIO for field, shift in (
        ("virtio.guest_features", 0), ("virtio.virtio/64bit_features:guest_features", 0),
        ("virtio.virtio_pci/modern_state:guest_features[0]", 0),
        ("virtio.virtio_pci/modern_state:guest_features[1]", 32))),
    ("*", "type:pci config", i.pci_header),
    ("*", "virtio.pci.config", i.pci_header),
]  # fmt: skip
