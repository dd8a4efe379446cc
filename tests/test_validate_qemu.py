"""validate against real QEMU 7.2 and 10.0: for each source/target pair, save on the source,
capture the target, validate, then really restore into the target.  validate's verdict
must be QEMU's, and for a refusal its first error must name what QEMU names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from snapfmt.qemu import qmp
from tests.helpers import QEMUS, Run, need_qemu

E1000 = "e1000,addr=05.0,mac=52:54:00:00:00:05"
VIRTIO = "virtio-net-pci,addr=06.0,mac=52:54:00:00:00:06"
LSI = "lsi53c895a,addr=07.0"


AUDIO = ["-audiodev", "none,id=a0"]
BRIDGE = "pci-bridge,id=br1,chassis_nr=1,addr=08.0"
ROOT_PORT = "pcie-root-port,id=rp1,addr=10.0,chassis=1"
DISK = "/tmp/snapfmt-validate-disk.img"  # (in /tmp: QEMU 10.0's root sees it)
BLK = f"if=none,id=d0,file={DISK},format=raw"


def machine(
    kind: str = "pc-i440fx-7.2",
    mem: str = "16M",
    cpus: str = "2",
    devices: tuple[str, ...] = (E1000, VIRTIO, LSI),
    drive: bool = False,
) -> list[str]:
    args = [
        "-M",
        kind,
        "-m",
        mem,
        "-smp",
        cpus,
        "-nodefaults",
        "-rtc",
        "base=2020-01-01T00:00:00,clock=vm",
    ]
    if drive:
        args += ["-drive", BLK]
    for device in devices:
        args += ["-device", device]
    return args


def virtio(source: str, target: str) -> tuple[list[str], list[str]]:
    """A pair that differs in one virtio device's properties."""
    return (
        machine(devices=(E1000, source), drive=True),
        machine(devices=(E1000, target), drive=True),
    )


def replace(devices: tuple[str, ...], old: str, new: str | None) -> tuple[str, ...]:
    return tuple(d for d in (new if d == old else d for d in devices) if d is not None)


BASE = (E1000, VIRTIO, LSI)
PAIRS = {
    "identical pc": (machine(), machine()),
    "identical q35": (machine("pc-q35-7.2"), machine("pc-q35-7.2")),
    "e1000 swapped for e1000e": (
        machine(),
        machine(devices=replace(BASE, E1000, "e1000e,addr=05.0,mac=52:54:00:00:00:05")),
    ),
    "e1000 moved to slot 9": (
        machine(),
        machine(devices=replace(BASE, E1000, "e1000,addr=09.0,mac=52:54:00:00:00:05")),
    ),
    "lsi missing on target": (machine(), machine(devices=replace(BASE, LSI, None))),
    "lsi swapped for virtio-scsi": (
        machine(),
        machine(devices=replace(BASE, LSI, "virtio-scsi-pci,addr=07.0,romfile=")),
    ),
    "device added on target": (
        machine(),
        machine(devices=(*BASE, "e1000,addr=09.0,mac=52:54:00:00:00:09")),
    ),
    "RAM 16M to 32M": (machine(), machine(mem="32M")),
    "machine type 7.2 to 7.1": (machine(), machine("pc-i440fx-7.1")),
    "machine family pc to q35": (machine(), machine("pc-q35-7.2")),
    "option ROM absent": (machine(), machine(devices=replace(BASE, E1000, f"{E1000},romfile="))),
    "option ROM of another size": (
        machine(),
        machine(devices=replace(BASE, E1000, f"{E1000},romsize=524288")),
    ),
    "virtio-net PCI identity (modern only)": (
        machine(),
        machine(devices=replace(BASE, VIRTIO, f"{VIRTIO},disable-legacy=on")),
    ),
    "CPUs 2 to 4": (machine(), machine(cpus="4")),
    "CPUs 2 to 1": (machine(), machine(cpus="1")),
    "MAC address changed": (
        machine(),
        machine(devices=replace(BASE, E1000, "e1000,addr=05.0,mac=52:54:00:00:00:55")),
    ),
    "e1000 made multifunction (header type)": (
        machine(),
        machine(devices=replace(BASE, E1000, f"{E1000},multifunction=on")),
    ),
    "virtio-net MSI-X vectors 4 to 6": virtio(VIRTIO, f"{VIRTIO},vectors=6"),
    "virtio-net MSI-X vectors 4 to 8": virtio(VIRTIO, f"{VIRTIO},vectors=8"),
    "virtio-net mergeable buffers off": virtio(VIRTIO, f"{VIRTIO},mrg_rxbuf=off"),
    "virtio-blk queues 2 to 1": virtio(
        "virtio-blk-pci,drive=d0,addr=07.0,num-queues=2",
        "virtio-blk-pci,drive=d0,addr=07.0,num-queues=1",
    ),
    "virtio-blk queue size 128 to 256": virtio(
        "virtio-blk-pci,drive=d0,addr=07.0,queue-size=128",
        "virtio-blk-pci,drive=d0,addr=07.0,queue-size=256",
    ),
    "virtio-scsi queues 1 to 4": virtio(
        "virtio-scsi-pci,addr=08.0,num_queues=1", "virtio-scsi-pci,addr=08.0,num_queues=4"
    ),
    "xhci USB 2 and 3 ports 4 to 8": (
        machine(devices=(E1000, "qemu-xhci,addr=09.0")),
        machine(devices=(E1000, "qemu-xhci,addr=09.0,p2=8,p3=8")),
    ),
    "identical xhci": (
        machine(devices=(E1000, "qemu-xhci,addr=09.0")),
        machine(devices=(E1000, "qemu-xhci,addr=09.0")),
    ),
    "HDA codec duplex to output": (
        [*machine(devices=(E1000, "intel-hda,addr=0a.0", "hda-duplex,audiodev=a0")), *AUDIO],
        [*machine(devices=(E1000, "intel-hda,addr=0a.0", "hda-output,audiodev=a0")), *AUDIO],
    ),
    "identical HDA": (
        [*machine(devices=(E1000, "intel-hda,addr=0a.0", "hda-duplex,audiodev=a0")), *AUDIO],
        [*machine(devices=(E1000, "intel-hda,addr=0a.0", "hda-duplex,audiodev=a0")), *AUDIO],
    ),
    "USB tablet to mouse on UHCI": (
        machine(devices=(E1000, "piix3-usb-uhci,addr=0b.0", "usb-tablet")),
        machine(devices=(E1000, "piix3-usb-uhci,addr=0b.0", "usb-mouse")),
    ),
    "identical AHCI on q35": (
        machine("pc-q35-7.2", devices=(E1000, "ich9-ahci,addr=0c.0")),
        machine("pc-q35-7.2", devices=(E1000, "ich9-ahci,addr=0c.0")),
    ),
    "CPU model qemu64 to max": ([*machine(), "-cpu", "qemu64"], [*machine(), "-cpu", "max"]),
    "e1000 behind a bridge, MAC changed": (
        machine(devices=(BRIDGE, "e1000,bus=br1,addr=03.0,mac=52:54:00:00:00:31")),
        machine(devices=(BRIDGE, "e1000,bus=br1,addr=03.0,mac=52:54:00:00:00:32")),
    ),
    "e1000 behind a bridge moved to slot 4": (
        machine(devices=(BRIDGE, "e1000,bus=br1,addr=03.0")),
        machine(devices=(BRIDGE, "e1000,bus=br1,addr=04.0")),
    ),
    "virtio-net behind a root port, vectors 4 to 6": (
        machine("pc-q35-7.2", devices=(ROOT_PORT, "virtio-net-pci,bus=rp1,romfile=")),
        machine("pc-q35-7.2", devices=(ROOT_PORT, "virtio-net-pci,bus=rp1,romfile=,vectors=6")),
    ),
    "identical root port and virtio-net": (
        machine("pc-q35-7.2", devices=(ROOT_PORT, "virtio-net-pci,bus=rp1,romfile=")),
        machine("pc-q35-7.2", devices=(ROOT_PORT, "virtio-net-pci,bus=rp1,romfile=")),
    ),
    "virtio-blk queues 2 to 1, vectors fixed": virtio(
        "virtio-blk-pci,drive=d0,addr=07.0,num-queues=2,vectors=4",
        "virtio-blk-pci,drive=d0,addr=07.0,num-queues=1,vectors=4",
    ),
    "virtio-scsi queues 1 to 4, vectors fixed": virtio(
        "virtio-scsi-pci,addr=08.0,num_queues=1,vectors=8",
        "virtio-scsi-pci,addr=08.0,num_queues=4,vectors=8",
    ),
    "identical virtio machine": virtio(
        "virtio-blk-pci,drive=d0,addr=07.0", "virtio-blk-pci,drive=d0,addr=07.0"
    ),
}

NAMES = [  # what QEMU names when it refuses, most specific first
    re.compile(r"Machine type received is '([^']+)'"),
    re.compile(r'Unknown ramblock "([^"]+)"'),
    re.compile(r"Size mismatch: ([^:]+):"),
    re.compile(r"Unknown savevm section or instance '([^']+)'"),
    re.compile(r"Missing section footer for (\S+)"),
    re.compile(r"of device '([^']+)'"),
]


@pytest.fixture(scope="module", params=sorted(QEMUS))
def qemu(request: pytest.FixtureRequest) -> str:
    """The QEMU binary of one version (skipped, or in CI failed, where it is missing)."""
    return need_qemu(request.param)


def judged(
    run: Run, tmp_path: Path, source_qemu: str, source: list[str], target_qemu: str,
    target: list[str],
) -> tuple[Any, str, str]:  # fmt: skip
    """(validate's verdict, "loaded" or "refused", QEMU's words): the source saved, the
    target captured, validated, and really restored into."""
    if not Path(DISK).exists():
        Path(DISK).write_bytes(bytes(1 << 20))
    stream, description = tmp_path / "vm.mig", tmp_path / "target.json"
    with qmp.Qemu(binary=source_qemu, args=source) as vm:
        vm.save(str(stream))
    assert run("machine", "capture", "-o", description, "--", target_qemu, *target).code == 0
    verdict = run("validate", stream, "--target", description, "--json")
    assert verdict.code in (0, 1), verdict.err
    try:
        with qmp.Qemu(binary=target_qemu, args=target, incoming=f"exec:cat {stream}") as vm:
            return verdict, vm.wait_incoming(), ""
    except qmp.QemuError as e:
        return verdict, "refused", str(e)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_validate_agrees_with_qemu(qemu: str, tmp_path: Path, run: Run, name: str) -> None:
    source, target = PAIRS[name]
    verdict, qemu_says, refusal = judged(run, tmp_path, qemu, source, qemu, target)
    assert (verdict.code == 0) == (qemu_says == "loaded"), (name, verdict.out, refusal)
    import json

    findings = json.loads(verdict.out)["findings"]
    if name.startswith("identical"):  # an identical target: not even a warning
        assert [f for f in findings if f["severity"] != "info"] == [], findings
    if qemu_says == "refused":
        first = next(f for f in findings if f["severity"] == "error")
        if "Bad config data" in refusal or "Missing section footer" in refusal:  # its words
            assert first["qemu"] in refusal, (first, refusal)
        named = next((m.group(1) for pattern in NAMES if (m := pattern.search(refusal))), None)
        if named is None:  # QEMU aborted (an assertion, as with an HDA codec swapped)
            assert "Assertion" in refusal, refusal
            return
        assert named in f"{first['message']} {first['qemu']} {first['snapshot']}", (
            name,
            named,
            first,
        )


def test_capture_records_real_names_buses_and_resizeable_blocks(
    qemu: None, tmp_path: Path, run: Run
) -> None:
    import json

    description = tmp_path / "target.json"
    target = [
        *machine(),
        "-device",
        "pci-bridge,id=br1,chassis_nr=1,addr=08.0",
        "-device",
        "e1000,bus=br1,addr=03.0",
    ]
    assert run("machine", "capture", "-o", description, "--", qemu, *target).code == 0
    data = json.loads(description.read_text())
    devices = {d["qemu_id"]: d for d in data["devices"]}
    behind = devices["0000:00:08.0:03.0/e1000"]
    assert (behind["driver"], behind["bus"]) == ("e1000", "br1")
    assert devices["0000:00:07.0/lsiscsi"]["driver"] == "lsi53c895a"
    assert devices["0000:00:06.0/virtio-net"]["pci"]["capabilities"][0] == [
        0x98,
        0x11,
    ]  # MSI-X first
    blocks = {b["qemu_id"]: b for b in data["ram_blocks"]}
    assert blocks["/rom@etc/acpi/tables"]["max_size"] > blocks["/rom@etc/acpi/tables"]["size"]
    assert "max_size" not in blocks["pc.ram"]
    assert not [
        p
        for p in Path("/tmp").glob("snapfmt-q*")
        if p.is_dir() and p.stat().st_mtime > description.stat().st_mtime - 60
    ]


CROSS: dict[str, tuple[Any, ...]] = {
    # name: (source version, target version, machine, devices[, the target's devices])
    "forward pc 7.2 to 10.0": ("7.2", "10.0", "pc-i440fx-7.2", BASE),
    "forward q35 7.2 to 10.0": ("7.2", "10.0", "pc-q35-7.2", BASE),
    "forward with xhci and virtio-blk": (
        "7.2", "10.0", "pc-i440fx-7.2",
        (E1000, "qemu-xhci,addr=09.0", "virtio-blk-pci,drive=d0,addr=07.0"),
    ),
    "forward, the target's virtio-net with 6 vectors": (
        "7.2", "10.0", "pc-i440fx-7.2", BASE, replace(BASE, VIRTIO, f"{VIRTIO},vectors=6"),
    ),
    "backward, the target's xhci with 8 ports": (
        "10.0", "7.2", "pc-i440fx-7.2", (E1000, "qemu-xhci,addr=09.0"),
        (E1000, "qemu-xhci,addr=09.0,p2=8,p3=8"),
    ),
    "backward pc 10.0 to 7.2": ("10.0", "7.2", "pc-i440fx-7.2", BASE),
    "backward q35 10.0 to 7.2": ("10.0", "7.2", "pc-q35-7.2", BASE),
    "backward with xhci and virtio-blk": (
        "10.0", "7.2", "pc-i440fx-7.2",
        (E1000, "qemu-xhci,addr=09.0", "virtio-blk-pci,drive=d0,addr=07.0"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CROSS))
def test_validate_agrees_with_qemu_across_versions(tmp_path: Path, run: Run, name: str) -> None:
    """Saved by one version, restored by the other on the same machine type: validate's
    verdict is the restoring QEMU's."""
    source_version, target_version, kind, devices, *target_devices = CROSS[name]
    source_qemu, target_qemu = need_qemu(source_version), need_qemu(target_version)
    args = machine(kind, devices=devices, drive=True)
    target = machine(kind, devices=target_devices[0], drive=True) if target_devices else args
    verdict, qemu_says, refusal = judged(run, tmp_path, source_qemu, args, target_qemu, target)
    assert (verdict.code == 0) == (qemu_says == "loaded"), (name, verdict.out, refusal)


@pytest.mark.parametrize("target", ["", ",mrg_rxbuf=off"])
def test_guest_features_the_target_does_not_offer(
    qemu: str, tmp_path: Path, run: Run, target: str
) -> None:
    """A save whose guest took mergeable receive buffers (bit 15; written into the stream
    here, as no guest runs): a target without them refuses it, in QEMU's words."""
    import snapfmt
    from snapfmt.state import understand

    args = machine(devices=(VIRTIO,))
    stream, taken = tmp_path / "vm.mig", tmp_path / "taken.mig"
    with qmp.Qemu(binary=qemu, args=args) as vm:
        vm.save(str(stream))
    with snapfmt.open(stream) as snap:
        fields = {
            f.name: f for f in understand(snap.device(snap.select_one("virtio-net-pci"))).fields
        }
    features = 1 << 32 | 1 << 15  # VERSION_1, MRG_RXBUF
    data = bytearray(stream.read_bytes())
    for name, size in (
        ("virtio.guest_features", 4),
        ("virtio.virtio/64bit_features:guest_features", 8),
    ):
        at = fields[name].offset
        data[at : at + size] = (features & (1 << 8 * size) - 1).to_bytes(size, "big")
    taken.write_bytes(data)
    description = tmp_path / "target.json"
    target_args = machine(devices=(f"{VIRTIO}{target}",))
    assert run("machine", "capture", "-o", description, "--", qemu, *target_args).code == 0
    verdict = run("validate", taken, "--target", description, "--json")
    try:
        with qmp.Qemu(binary=qemu, args=target_args, incoming=f"exec:cat {taken}") as vm:
            qemu_says, refusal = vm.wait_incoming(), ""
    except qmp.QemuError as e:
        qemu_says, refusal = "refused", str(e)
    assert qemu_says == ("refused" if target else "loaded")
    assert verdict.code == (1 if target else 0), verdict.out
    if target:
        import json

        (error,) = [f for f in json.loads(verdict.out)["findings"] if f["severity"] == "error"]
        assert error["code"] == "virtio-features" and error["qemu"] in refusal, (error, refusal)


@pytest.mark.parametrize("direction", ["7.2 stream, 10.0 schema", "10.0 stream, 7.2 schema"])
def test_a_dump_vmstate_schema_of_the_other_version(
    tmp_path: Path, run: Run, direction: str
) -> None:
    """QEMU's -dump-vmstate of one version as a schema-only target for a stream of the
    other: versions and subsections are checked, and an unknown subsection is an error."""
    import json

    source, target = ("7.2", "10.0") if direction.startswith("7.2") else ("10.0", "7.2")
    source_qemu, target_qemu = need_qemu(source), need_qemu(target)
    args = machine("pc-i440fx-7.2")
    stream, schema = tmp_path / "vm.mig", tmp_path / "dump.json"
    with qmp.Qemu(binary=source_qemu, args=args) as vm:
        vm.save(str(stream))
    import subprocess

    subprocess.run([target_qemu, "-M", "pc-i440fx-7.2", "-nodefaults", "-display", "none",
                    "-dump-vmstate", str(schema)], check=True, capture_output=True)  # fmt: skip
    result = run("validate", stream, "--target", schema, "--json")
    findings = json.loads(result.out)["findings"]
    assert findings[0]["code"] == "schema-only"
    assert result.code == 0, findings  # this machine migrates both ways
    dump = json.loads(schema.read_text())
    for entry in dump.values():  # (e1000, e1000-82544gc, e1000-82545em: one vmsd)
        described = entry.get("Description", {}) if isinstance(entry, dict) else {}
        if described.get("name") == "e1000":
            described["Subsections"] = [s for s in described["Subsections"]
                                        if s.get("name") != "e1000/full_mac_state"]  # fmt: skip
    schema.write_text(json.dumps(dump))
    result = run("validate", stream, "--target", schema, "--json")
    errors = [f for f in json.loads(result.out)["findings"] if f["severity"] == "error"]
    assert result.code == 1 and errors[0]["code"] == "subsection-unknown", errors
    assert errors[0]["qemu"] == "VM subsection 'e1000/full_mac_state' in 'e1000' does not exist"
