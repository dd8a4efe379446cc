"""virtio state decoded from what real QEMU 7.2 and 10.0 save: every virtio device they
migrate, on pc and q35 and behind a PCI Express root port, decodes to its last byte, and
what the command line set is where it belongs.  In CI these fail, not skip, without QEMU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import snapfmt
from snapfmt.qemu import qmp
from snapfmt.state import understand
from tests.helpers import QEMUS, need_qemu

MAC = "52:54:00:ab:cd:ef"


@pytest.fixture(scope="module", params=sorted(QEMUS))
def qemu(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, need_qemu(request.param)


def _machine(kind: str, disk: Path) -> list[str]:
    args = [
        "-M", kind, "-m", "16M", "-nodefaults",
        "-device", f"virtio-net-pci,addr=06.0,romfile=,mac={MAC},vectors=6,host_mtu=1400",
        "-drive", f"if=none,id=d0,file={disk},format=raw",
        "-device", "virtio-blk-pci,drive=d0,addr=07.0,num-queues=2,queue-size=128",
        "-device", "virtio-scsi-pci,addr=08.0,num_queues=4",
        "-device", "virtio-balloon-pci,addr=09.0",
        "-chardev", "null,id=c0",
        "-device", "virtio-serial-pci,addr=0a.0,max_ports=7",
        "-device", "virtconsole,chardev=c0",
        "-device", "virtio-rng-pci,addr=0b.0",
        "-device", "virtio-keyboard-pci,addr=0c.0",
        "-device", "virtio-tablet-pci,addr=0d.0",
        "-device", "virtio-gpu-pci,addr=0e.0,max_outputs=2",
    ]  # fmt: skip
    if kind == "q35":
        args += ["-device", "pcie-root-port,id=rp1,addr=10.0,chassis=1",
                 "-device", "virtio-net-pci,bus=rp1,romfile=,mac=52:54:00:00:00:02"]  # fmt: skip
    return args


@pytest.mark.parametrize("kind", ["pc", "q35"])
def test_every_virtio_device_decodes_with_what_the_command_line_set(
    qemu: tuple[str, str], tmp_path: Path, kind: str
) -> None:
    version, binary = qemu
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    stream = tmp_path / "vm.mig"
    with qmp.Qemu(binary=binary, args=_machine(kind, disk)) as vm:
        vm.save(str(stream))
    found: dict[str, dict[str, Any]] = {}
    with snapfmt.open(stream) as snap:
        for device in snap.devices():
            if not device.vmstate_name.startswith("virtio"):
                continue
            understood = understand(device)
            assert understood.notes == [], device.path
            assert understood.fields[-1].offset + understood.fields[-1].size == (
                device.data_offset + len(device.data)
            )
            found[str(device.path)] = {f.name: f for f in understood.fields}
    host = "/q35-pcihost/pcie.0" if kind == "q35" else "/i440FX-pcihost/pci.0"

    def at(slot: str, driver: str) -> dict[str, Any]:
        return found[f"{host}/{driver}@{slot}/vmstate"]

    def value(fields: dict[str, Any], name: str) -> Any:
        return fields[name].value

    net = at("06.0", "virtio-net-pci")
    assert net["virtio.device.mac"].display == f"MAC {MAC}"
    assert sum(n.endswith("].address") for n in net) == 6  # vectors=6
    assert value(net, "virtio.config_len") == 12 and "virtio.config.mtu" in net  # host_mtu
    blk = at("07.0", "virtio-blk-pci")
    assert value(blk, "virtio.num_queues") == 2
    if version == "7.2":  # (10.0 saves the maximum size until a driver sets one)
        assert value(blk, "virtio.vq[0].num") == 128
    assert value(blk, "virtio.device.rq[0].more") == 0  # no request in flight
    assert value(at("08.0", "virtio-scsi-pci"), "virtio.num_queues") == 4 + 2
    serial = at("0a.0", "virtio-serial-pci")
    assert value(serial, "virtio.device.max_nr_ports") == 7
    assert value(serial, "virtio.num_queues") == 2 * (7 + 1)
    assert value(at("0b.0", "virtio-rng-pci"), "virtio.num_queues") == 1
    assert value(at("0c.0", "virtio-input"), "virtio.num_queues") == 2
    gpu = at("0e.0", "virtio-gpu")
    assert value(gpu, "virtio-gpu.max_outputs") == 2
    assert ("virtio-gpu.scanout[1].fb_offset" in gpu) == (version == "10.0")  # scanout v2
    assert "virtio.device.num_pages" in at("09.0", "virtio-balloon-pci")
    for fields in found.values():
        assert fields["virtio.pci.config"].display.startswith("1af4:")
    if kind == "q35":
        behind = found[f"{host}/pcie-root-port@10.0/pci/virtio-net-pci@00.0/vmstate"]
        assert len(value(behind, "virtio.pci.config_express")) == 4096 - 256
        assert behind["virtio.device.mac"].display == "MAC 52:54:00:00:00:02"
