from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapfmt.errors import PathSyntaxError, SelectorError
from snapfmt.paths import Component, Path, escape, resolve, resolve_one, unescape

E1000 = "/i440FX-pcihost/pci.0/e1000@05.0"
SECTIONS = [
    Path.parse(p)
    for p in [
        f"{E1000}/vmstate",
        f"{E1000}/rom",
        "/i440FX-pcihost/pci.0/lsi53c895a@07.0/vmstate",
        "/i440FX-pcihost/pci.0/virtio-net-pci@06.0/rom",
        "/pc.ram",
        "/pc.ram/sub",
        "/%2From%40etc%2Facpi%2Ftables",
    ]
]

names = st.text(min_size=1, max_size=12)
components = st.builds(Component, names, st.one_of(st.just(""), names))
paths = st.builds(Path, st.lists(components, min_size=1, max_size=6).map(tuple))


def test_parse_and_format_a_pci_path() -> None:
    path = Path.parse(f"{E1000}/rom")
    assert path.components[2] == Component("e1000", "05.0")
    assert path.leaf == Component("rom")
    assert str(path) == f"{E1000}/rom"
    assert path.parent == Path.parse(E1000)


def test_qemu_rom_name_with_slash_and_at_round_trips() -> None:
    path = Path.of("/rom@etc/acpi/tables")
    assert str(path) == "/%2From%40etc%2Facpi%2Ftables"
    assert Path.parse(str(path)).leaf.name == "/rom@etc/acpi/tables"


def test_dot_only_names_are_escaped() -> None:
    assert escape("..") == "%2E%2E"
    assert str(Path.of("...", "x")) == "/%2E%2E%2E/x"


def test_lower_case_escapes_parse_to_the_canonical_form() -> None:
    assert str(Path.parse("/a%2fb")) == "/a%2Fb"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pc.ram", "must start with '/'"),
        ("/", "has no name"),
        ("/a//b", "has no name"),
        ("/a@", "'@' but no address"),
        ("/a b", "character ' ' must be percent-encoded"),
        ("/a@b@c", "character '@' must be percent-encoded"),
        ("/a%4", "bad escape"),
        ("/a%ff", "not UTF-8"),
    ],
)
def test_malformed_paths_are_refused(text: str, message: str) -> None:
    with pytest.raises(PathSyntaxError, match=message):
        Path.parse(text)


def test_unescape_rejects_reserved() -> None:
    with pytest.raises(PathSyntaxError):
        unescape("a/b")


@given(paths)
def test_parse_format_round_trip(path: Path) -> None:
    text = str(path)
    assert Path.parse(text) == path
    assert str(Path.parse(text)) == text


@given(paths, paths)
def test_order_is_component_wise(a: Path, b: Path) -> None:
    assert (a < b) == (a.components < b.components)
    assert (a == b) == (hash(a) == hash(b)) or a != b


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (f"{E1000}/vmstate", [f"{E1000}/vmstate"]),
        (E1000, [f"{E1000}/rom", f"{E1000}/vmstate"]),
        ("pci.0/05.0", [f"{E1000}/rom", f"{E1000}/vmstate"]),
        ("pci.0/@05.0/vmstate", [f"{E1000}/vmstate"]),
        (".../pci.0/e1000", [f"{E1000}/rom", f"{E1000}/vmstate"]),
        ("/.../e1000/rom", [f"{E1000}/rom"]),
        ("rom", [f"{E1000}/rom", "/i440FX-pcihost/pci.0/virtio-net-pci@06.0/rom"]),
        ("lsi*", ["/i440FX-pcihost/pci.0/lsi53c895a@07.0/vmstate"]),
        ("*@07.*/vmstate", ["/i440FX-pcihost/pci.0/lsi53c895a@07.0/vmstate"]),
        ("/pc.ram", ["/pc.ram"]),
        ("/%2From%40etc%2Facpi%2Ftables", ["/%2From%40etc%2Facpi%2Ftables"]),
        ("nothing", []),
    ],
)
def test_selectors(selector: str, expected: list[str]) -> None:
    assert [str(p) for p in resolve(selector, SECTIONS)] == expected


def test_qemu_identifier_alias() -> None:
    aliases = {"0000:00:05.0/e1000": Path.parse(f"{E1000}/vmstate")}
    assert resolve_one("0000:00:05.0/e1000", SECTIONS, aliases) == Path.parse(f"{E1000}/vmstate")


def test_ambiguous_selector_lists_every_candidate() -> None:
    with pytest.raises(SelectorError) as info:
        resolve_one("rom", SECTIONS)
    assert str(info.value) == (
        f"selector 'rom' is ambiguous: it names 2 sections: {E1000}/rom, "
        "/i440FX-pcihost/pci.0/virtio-net-pci@06.0/rom"
    )


@pytest.mark.parametrize(
    "selector", ["e1000", "pci.0/05.0", "05.0", ".../pci.0/e1000", E1000, "e1000@*"]
)
def test_one_section_of_a_device_node_is_its_state(selector: str) -> None:
    """spec/paths.md §Resolving rule 4: its vmstate leaf wins over its ROM."""
    assert resolve(selector, SECTIONS) == [
        Path.parse(f"{E1000}/rom"),
        Path.parse(f"{E1000}/vmstate"),
    ]
    assert resolve_one(selector, SECTIONS) == Path.parse(f"{E1000}/vmstate")


BRIDGE = "/i440FX-pcihost/pci.0/pci-bridge@08.0"


@pytest.mark.parametrize(
    ("selector", "paths", "count"),
    [
        ("e1000@05.0/*", SECTIONS, 2),  # names both leaves itself
        ("pci.0", SECTIONS, 4),  # the bus: several devices
        ("e1000", [*SECTIONS, Path.parse(f"{BRIDGE}/pci/e1000@03.0/vmstate")], 3),
        (
            "pci-bridge",
            [Path.parse(f"{BRIDGE}/vmstate"), Path.parse(f"{BRIDGE}/pci/e1000@03.0/vmstate")],
            2,
        ),
        ("cpu@0", [Path.parse("/cpu@0/cpu"), Path.parse("/cpu@0/apic")], 2),  # no vmstate leaf
    ],
)
def test_different_devices_stay_ambiguous(selector: str, paths: list[Path], count: int) -> None:
    with pytest.raises(SelectorError, match=f"is ambiguous: it names {count} sections"):
        resolve_one(selector, paths)


def test_selector_naming_nothing_lists_nearest() -> None:
    with pytest.raises(SelectorError, match=r"names no section; nearest: /pc.ram"):
        resolve_one("/pc.rom", SECTIONS)


@given(paths)
def test_full_path_selector_names_the_path(path: Path) -> None:
    assert resolve(str(path), [path]) == [path]


def test_pathological_selectors_finish_quickly() -> None:
    many = [Path.of("a" * 50 + str(i)) for i in range(200)]
    assert resolve("*" * 40 + "q", many) == []
    assert resolve("*a*a*a*a*a*a*a*a*a*a*a*a*a*q", many) == []
    assert len(resolve("/".join(["..."] * 2000), many)) == 200


def test_paths_stay_valid_through_replace_and_pickle() -> None:
    import copy
    import pickle

    from snapfmt.errors import PathSyntaxError

    c = Component("e1000", "05.0")
    assert c._replace(address="06.0") == Component("e1000", "06.0")
    with pytest.raises(PathSyntaxError):
        c._replace(name="")
    p = Path.parse("/i440FX-pcihost/pci.0/e1000@05.0/rom")
    with pytest.raises(PathSyntaxError):
        p._replace(components=())
    assert pickle.loads(pickle.dumps(p)) == p == copy.deepcopy(p)
    assert hash(pickle.loads(pickle.dumps(p))) == hash(p)


@pytest.mark.parametrize(
    ("canonical", "readable"),
    [
        ("/%2From%40etc%2Facpi%2Ftables", "/rom@etc/acpi/tables"),
        ("/pc.ram", "/pc.ram"),
        ("/i440FX-pcihost/pci.0/e1000@05.0/rom", "/i440FX-pcihost/pci.0/e1000@05.0/rom"),
        ("/a%2Fb", "/a%2Fb"),  # no leading '/': the '/' would read as a separator
        ("/x/%2From%40y", "/x/%2From%40y"),  # two components: '/' and '@' stay escaped
        ("/%2E%2E", "/%2E%2E"),
        ("/%2F%0Aa%20b%25", "/%0Aa%20b%25"),  # control characters, spaces and '%' stay
        ("/caf%C3%A9@%C3%A9", "/café@é"),
    ],
)
def test_readable_form(canonical: str, readable: str) -> None:
    path = Path.parse(canonical)
    assert path.readable() == readable
    assert resolve(readable, [path, Path.parse("/other")]) == [path]
