"""validate and machine descriptions on samples (real-QEMU agreement: test_validate_qemu)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import SAMPLES, Run

PC = SAMPLES / "qemu" / "pc.mig"


def test_a_snapshot_fits_its_own_description(tmp_path: Path, run: Run) -> None:
    description = tmp_path / "pc.json"
    assert run("machine", "from-snapshot", PC, "-o", description).code == 0
    data = json.loads(description.read_text())
    assert (data["machine"], data["cpus"], data["topology"]) == ("pc-i440fx-7.2", 2, True)
    e1000 = next(d for d in data["devices"] if d["qemu_id"] == "0000:00:05.0/e1000")
    assert e1000["pci"]["vendor"] == 0x8086 and e1000["pci"]["device"] == 0x100E
    virtio = next(d for d in data["devices"] if d["qemu_id"] == "0000:00:06.0/virtio-net")
    assert virtio["pci"]["vendor"] == 0x1AF4 and virtio["pci"]["device"] == 0x1000
    result = run("validate", PC, "--target", description)
    assert (result.code, result.out) == (0, "compatible: 0 errors, 0 warnings\n")


def test_the_q35_sample_does_not_fit_the_pc_machine(tmp_path: Path, run: Run) -> None:
    description = tmp_path / "pc.json"
    run("machine", "from-snapshot", PC, "-o", description)
    result = run("validate", SAMPLES / "qemu" / "q35.mig", "--target", description, "--json")
    assert result.code == 1
    findings = json.loads(result.out)["findings"]
    assert findings[0]["code"] == "machine-family"
    assert (
        findings[0]["qemu"] == "Machine type received is 'pc-q35-7.2' and local is 'pc-i440fx-7.2'"
    )


def test_dump_vmstate_is_a_schema_only_target(run: Run) -> None:
    result = run("validate", PC, "--target", SAMPLES / "qemu" / "pc.vmstate.json.gz")
    assert result.code == 0
    assert result.out.splitlines()[0].startswith("INFO    schema-only")


def test_version_above_the_schema(tmp_path: Path, run: Run) -> None:
    description = tmp_path / "pc.json"
    run("machine", "from-snapshot", PC, "-o", description)
    data = json.loads(description.read_text())
    next(d for d in data["devices"] if d["qemu_id"] == "0000:00:05.0/e1000")["version"] = 1
    description.write_text(json.dumps(data))
    result = run("validate", PC, "--target", description)
    assert result.code == 1
    assert (
        "ERROR   version-too-new     /i440FX-pcihost/pci.0/e1000@05.0/vmstate: 0000:00:05.0/e1000: version 2 is above the target's 1"
        in result.out
    )
    assert "QEMU: savevm: unsupported version 2 for '0000:00:05.0/e1000' v1" in result.out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "$.format: expected 'snapfmt-machine', found 'other'"),
        (
            lambda d: d["devices"][3].update(version="2"),
            '$.devices[3].version: expected int, found "2"',
        ),
        (
            lambda d: d["ram_blocks"][0].pop("size"),
            "$.ram_blocks[0].size: expected int, found null",
        ),
        (lambda d: d.update(devices={}), "$.devices: expected list, found {}"),
        (lambda d: d.update(version=True), "$.version: expected 1, found True"),
        (
            lambda d: d["devices"][0].pop("instance_id"),
            "$.devices[0].instance_id: expected int, found null",
        ),
        (lambda d: d.update(capabilities=[1]), "$.capabilities[0]: expected str, found 1"),
        (lambda d: d.update(schemas={"e1000": [1]}), "$.schemas.e1000: expected dict, found [1]"),
    ],
)
def test_bad_descriptions_name_the_json_path(
    tmp_path: Path, run: Run, edit: object, message: str
) -> None:
    description = tmp_path / "pc.json"
    run("machine", "from-snapshot", PC, "-o", description)
    data = json.loads(description.read_text())
    edit(data)  # type: ignore[operator]
    description.write_text(json.dumps(data))
    result = run("validate", PC, "--target", description)
    assert (result.code, result.err) == (2, f"snapfmt: error: {description}: {message}\n")


def test_a_moved_device_is_pointed_out(tmp_path: Path, run: Run) -> None:
    description = tmp_path / "pc.json"
    run("machine", "from-snapshot", PC, "-o", description)
    data = json.loads(description.read_text())
    e1000 = next(d for d in data["devices"] if d["qemu_id"] == "0000:00:05.0/e1000")
    e1000["qemu_id"] = "0000:00:09.0/e1000"
    description.write_text(json.dumps(data))
    result = run("validate", PC, "--target", description, "--json")
    finding = next(f for f in json.loads(result.out)["findings"] if f["code"] == "section-missing")
    assert (
        finding["message"]
        == "0000:00:05.0/e1000 (instance 0) has no device on the target; the target has e1000 at 0000:00:09.0 (moved?)"
    )


@pytest.mark.parametrize("content", [b"\x1f\x8bgarbage", b"\x1f\x8b\x08\x00"])
def test_bad_gzip_targets(tmp_path: Path, run: Run, content: bytes) -> None:
    target = tmp_path / "t.json"
    target.write_bytes(content)
    result = run("validate", PC, "--target", target)
    assert result.code == 2 and result.err.startswith(f"snapfmt: error: {target}: not valid gzip")


def test_fifo_target_does_not_hang(tmp_path: Path, run: Run) -> None:
    import os

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert (
        run("validate", PC, "--target", fifo).err == f"snapfmt: error: {fifo}: not a regular file\n"
    )


def test_the_json_shape_is_the_one_the_readme_documents(run: Run) -> None:
    import re

    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    shape = re.search(r"`validate --json`: `(\{.*?\}\]\})`", readme, re.DOTALL)
    assert shape is not None, "README.md's JSON output section documents validate --json"
    documented = re.findall(r'"(\w+)"', shape.group(1))
    result = run("validate", PC, "--target", SAMPLES / "qemu" / "pc.vmstate.json.gz", "--json")
    data = json.loads(result.out)
    assert data["findings"]
    assert documented == [*data, *data["findings"][0]]
    codes = set(
        re.findall(
            r"^\| `([a-z-]+)`(?:, `([a-z-]+)`)?", (ROOT / "spec" / "machine.md").read_text(), re.M
        )
    )
    assert {f["code"] for f in data["findings"]} <= {c for pair in codes for c in pair if c}


def test_ramblock_maxima_reads_both_qemu_versions_tables() -> None:
    from snapfmt.ops.machine import ramblock_maxima

    v7 = """              Block Name    PSize              Offset               Used              Total
    /rom@etc/acpi/tables    4 KiB  0x0000000001080000 0x0000000000020000 0x0000000000200000
                  pc.ram    4 KiB  0x0000000000000000 0x0000000001000000 0x0000000001000000"""
    v10 = """              Block Name    PSize              Offset               Used              Total                HVA  RO
    /rom@etc/acpi/tables    4 KiB  0x0000000001080000 0x0000000000020000 0x0000000000200000 0x00007fa21a000000  ro
                  pc.ram    4 KiB  0x0000000000000000 0x0000000001000000 0x0000000001000000 0x00007fa21ae00000  rw"""
    expected = {"/rom@etc/acpi/tables": 0x200000, "pc.ram": 0x1000000}
    assert ramblock_maxima(v7) == ramblock_maxima(v10) == expected


def test_a_description_that_inflates_too_far_is_refused(tmp_path: Path, run: Run) -> None:
    import gzip

    from snapfmt.ops import machine

    bomb = tmp_path / "bomb.json.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(b"[" + b" " * (machine.MAX_DESCRIPTION + 10) + b"]")
    assert bomb.stat().st_size < 1 << 20
    result = run("validate", SAMPLES / "basic.snap", "--target", bomb)
    assert result.code == 2
    assert result.err == (
        f"snapfmt: error: {bomb}: larger than 64 MiB (decompressed); "
        "descriptions, even QEMU's whole -dump-vmstate, are far smaller\n"
    )


def _virtio_net_config() -> bytes:
    """The config space of the virtio-net-pci in the QEMU 7.2 device sample."""
    import snapfmt

    with snapfmt.open(SAMPLES / "qemu" / "devices-7.2-a.mig.zst") as snap:
        virtio = snap.device(snap.select_one("virtio-net-pci")).fields()[0].value
    assert isinstance(virtio, bytes)
    return virtio[4:260]


def test_the_config_space_check_is_qemus() -> None:
    """Refused where QEMU refuses (the MSI-X table size), accepted where a guest may have
    written (the command register, MSI-X enable, a BAR) or QEMU does not look (subsystem)."""
    from snapfmt.state.pci import first_bad_byte, masks

    own = _virtio_net_config()
    msix = own[0x34]  # (the MSI-X capability is first)
    assert own[msix] == 0x11
    loaded = bytearray(own)
    loaded[msix + 2] = 5  # 6 vectors where the target has 4
    bad = first_bad_byte(bytes(loaded), own)
    assert bad is not None and bad.offset == msix + 2
    assert bad.qemu == (
        f"get_pci_config_device: Bad config data: i={msix + 2:#x} read: 5 device: 3 "
        "cmask: ff wmask: 0 w1cmask:0"
    )
    written = bytearray(own)
    written[0x04] = 0x07  # command: I/O, memory, bus master
    written[msix + 3] |= 0x80  # MSI-X enable
    written[0x10:0x14] = (0xC001).to_bytes(4, "little")  # BAR0
    written[0x2C] ^= 0xFF  # subsystem vendor
    assert first_bad_byte(bytes(written), own) is None
    m = masks(own)
    assert (m.cmask[0], m.cmask[0x04], m.cmask[0x06], m.wmask[msix + 3]) == (0xFF, 0, 0x10, 0xC0)
    assert first_bad_byte(own, own) is None


def test_validate_names_the_config_byte_and_quotes_qemu(tmp_path: Path, run: Run) -> None:
    sample = SAMPLES / "qemu" / "devices-7.2-a.mig.zst"
    description = tmp_path / "target.json"
    assert run("machine", "from-snapshot", sample, "-o", description).code == 0
    data = json.loads(description.read_text())
    net = next(d for d in data["devices"] if d["qemu_id"].endswith("/virtio-net"))
    config = bytearray.fromhex(net["pci"]["config"])
    config[config[0x34] + 2] = 5
    net["pci"]["config"] = config.hex()
    description.write_text(json.dumps(data))
    result = run("validate", sample, "--target", description, "--json")
    (error,) = [f for f in json.loads(result.out)["findings"] if f["severity"] == "error"]
    assert result.code == 1
    assert error["code"] == "pci-config"
    assert error["message"] == (
        "0000:00:06.0/virtio-net: PCI config byte 0x9a is 0x03, the target's 0x05 "
        "(MSI-X capability at 0x98: message control (table size))"
    )
    assert error["qemu"].startswith("get_pci_config_device: Bad config data: i=0x9a read: 3")


def test_a_load_simulated_with_the_targets_layout() -> None:
    """The snapshot's bytes read with the target's layout, as QEMU reads them."""
    from snapfmt.state.load import simulate

    fields = [{"name": "n", "type": "uint32 equal", "size": 4},
              {"name": "regs", "type": "uint16", "size": 2, "array_len": 2}]  # fmt: skip
    sub = {"vmsd_name": "dev/extra", "version": 1,
           "fields": [{"name": "x", "type": "uint8", "size": 1}]}  # fmt: skip
    body = (4).to_bytes(4, "big") + bytes(4)
    extra = b"\x05\x09dev/extra" + (1).to_bytes(4, "big") + b"\x07"

    def check(data: bytes, **kw: object) -> tuple[str, str] | None:
        args: dict[str, object] = {"subsections": [sub], "known": None, "equal": {"n": 4}}
        args.update(kw)
        found = simulate("0000:00:05.0/dev", "dev", data, fields, **args)  # type: ignore[arg-type]
        return None if found is None else (found.code, found.qemu)

    assert check(body) is None
    assert check(body + extra) is None
    assert check(body + b"\x00") == ("load-footer", "Missing section footer for 0000:00:05.0/dev")
    assert check(body[:6]) == ("load-short", "Missing section footer for 0000:00:05.0/dev")
    assert check(body, equal={"n": 8}) == ("load-equal", "4 != 8; Failed to load dev:n")
    assert check(body + extra, subsections=[]) == (
        "load-subsection",
        "VM subsection 'dev/extra' in 'dev' does not exist",
    )
    # known to the target but sent without a layout: not simulated past it
    assert check(body + extra, subsections=[], known=["dev/extra"]) is None


def test_offered_features_from_their_names() -> None:
    """x-query-virtio-status names features; bits as the virtio specification numbers
    them (QEMU 7.2's virtio-net with mrg_rxbuf=off: 0x10179bf0064, as QEMU prints)."""
    from snapfmt.state.virtio_features import feature_bits

    names = ["VHOST_USER_F_PROTOCOL_FEATURES", "VIRTIO_NET_F_GSO", "VIRTIO_NET_F_CTRL_MAC_ADDR",
             "VIRTIO_NET_F_GUEST_ANNOUNCE", "VIRTIO_NET_F_CTRL_RX_EXTRA", "VIRTIO_NET_F_CTRL_VLAN",
             "VIRTIO_NET_F_CTRL_RX", "VIRTIO_NET_F_CTRL_VQ", "VIRTIO_NET_F_STATUS",
             "VIRTIO_NET_F_MAC", "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS"]  # fmt: skip
    transports = ["VIRTIO_RING_F_EVENT_IDX", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_F_VERSION_1",
                  "VIRTIO_F_ANY_LAYOUT", "VIRTIO_F_NOTIFY_ON_EMPTY"]  # fmt: skip
    status = {"unknown-dev-features": 1 << 40,
              "dev-features": [f"{n}: what it means" for n in names],
              "transports": [f"{n}: what it means" for n in transports]}  # fmt: skip
    assert feature_bits(status) == 0x10179BF0064
    assert feature_bits({"dev-features": ["VIRTIO_NET_F_FROM_THE_FUTURE: ?"]}) is None
