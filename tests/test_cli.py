"""The command line: exact output, exit codes, help for every command."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from snapfmt.cli import cli
from snapfmt.native.writer import Writer
from tests.helpers import ROOT, SAMPLES, Run

GOLDEN = Path(__file__).resolve().parent / "golden"


def _commands() -> list[tuple[str, ...]]:
    found = []
    for name, command in cli.commands.items():
        found.append((name,))
        if isinstance(command, click.Group):
            found.extend((name, sub) for sub in command.commands)
    return sorted(found)


@pytest.mark.parametrize("words", _commands())
def test_every_command_has_help_with_an_example(run: Run, words: tuple[str, ...]) -> None:
    result = run(*words, "--help")
    assert result.code == 0
    assert "Example" in result.out and f"snapfmt {' '.join(words)}" in result.out


def test_every_command_and_option_says_what_it_does() -> None:
    """A command's help starts with what it does, before its example; every option has help."""
    for command in _registered():
        summary = (command.help or "").strip().splitlines()
        assert summary and summary[0] and not summary[0].startswith(("Example", "\b")), command.name
        assert "Example" in (command.help or ""), command.name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{command.name} {param.opts[0]}"


READ_ONLY = ("info", "dump", "verify")


@pytest.mark.parametrize(
    "example",
    [
        line.strip()
        for name in READ_ONLY
        for line in (cli.commands[name].help or "").splitlines()
        if line.strip().startswith("snapfmt ")
    ],
)
def test_read_only_examples_work_on_the_samples(
    run: Run, monkeypatch: pytest.MonkeyPatch, example: str
) -> None:
    monkeypatch.chdir(ROOT)
    result = run(*example.split()[1:])
    assert (result.code, result.err) == (0, "")


def test_convert_choices_match_the_library() -> None:
    from snapfmt.ops.convert import FORMATS

    choice = next(p for p in cli.commands["convert"].params if p.name == "to")
    assert tuple(choice.type.choices) == FORMATS  # type: ignore[attr-defined]


def test_group_help_lists_commands(run: Run) -> None:
    result = run("--help")
    assert result.code == 0
    for name in ("info", "dump", "extract", "verify", "write"):
        assert name in result.out


@pytest.mark.parametrize(
    ("args", "golden"),
    [
        (["info", "samples/basic.snap"], "info_basic.txt"),
        (["dump", "samples/basic.snap"], "dump_basic.txt"),
        (["dump", "samples/q35.snap"], "dump_q35.txt"),
    ],
)
def test_golden_output(
    run: Run, samples: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], golden: str
) -> None:
    monkeypatch.chdir(samples.parent)
    result = run(*args)
    assert (result.code, result.err) == (0, "")
    assert result.out == (GOLDEN / golden).read_text()


def test_info_json(run: Run, samples: Path) -> None:
    result = run("info", samples / "basic.snap", "--json")
    data = json.loads(result.out)
    assert data["format"] == "native" and data["version"] == "1.0"
    assert data["configuration"]["machine"] == "pc-i440fx-7.2"
    assert data["sections"][0] == {
        "kind": "device",
        "path": "/i440FX-pcihost/pci.0/e1000@05.0/vmstate",
        "size": 48,
        "stored": 631,
        "driver": "e1000",
        "vmstate_name": "e1000",
        "version": 2,
        "instance_id": 0,
        "qemu_id": "0000:00:05.0/e1000",
    }
    assert data["sections"][-1] == {
        "kind": "metadata",
        "name": "provenance",
        "size": 66,
        "stored": 70,
    }


@pytest.mark.parametrize("name", ["basic.snap", "qemu/pc.mig"])
def test_info_json_gives_qemu_id_on_ram_blocks(run: Run, samples: Path, name: str) -> None:
    import snapfmt

    result = run("info", samples / name, "--json")
    rows = [s for s in json.loads(result.out)["sections"] if s["kind"] == "ram-block"]
    with snapfmt.open(samples / name) as snap:
        expected = [snap.ram_block(snap.select_one(r["path"])).qemu_idstr for r in rows]
    assert rows and [r["qemu_id"] for r in rows] == expected
    assert list(rows[0]) == ["kind", "path", "size", "stored", "qemu_id"]
    if name == "basic.snap":
        assert rows[0] == {"kind": "ram-block", "path": "/pc.ram", "size": 8388608,
                           "stored": 266054, "qemu_id": "pc.ram"}  # fmt: skip


def test_dump_json_and_selectors(run: Run, samples: Path) -> None:
    result = run("dump", samples / "q35.snap", "virtio-net-pci", "/pc.bios", "--json")
    assert result.code == 0
    sections = json.loads(result.out)["sections"]
    assert [s["path"] for s in sections] == [
        "/q35-pcihost/pcie.0/virtio-net-pci@02.0/vmstate",
        "/pc.bios",
    ]
    mac = [f["value"] for f in sections[0]["fields"] if f["name"].startswith("config.mac")]
    assert mac == [0x52, 0x54, 0x00, 0xAB, 0xCD, 0xEF]
    assert sections[1] == {
        "kind": "ram-block",
        "path": "/pc.bios",
        "qemu_id": "pc.bios",
        "size": 262144,
        "page_size": 4096,
        "chunk_size": 16384,
        "chunks": 16,
        "zero_chunks": 12,
        "stored": 76,
        "host_page_size": None,
        "missing": None,
    }


def test_dump_by_qemu_identifier(run: Run, samples: Path) -> None:
    result = run("dump", samples / "basic.snap", "0000:00:07.0/lsiscsi")
    assert result.code == 0
    assert "lsi53c895a@07.0/vmstate: device lsi53c895a" in result.out
    assert "de ad be ef ca fe f0 0d" in result.out


def test_verify_ok(run: Run, samples: Path) -> None:
    result = run("verify", samples / "basic.snap")
    assert (result.code, result.err) == (0, "")
    assert result.out == f"OK   {samples / 'basic.snap'}: 8 sections, 134 chunks, 8.4 MiB checked\n"
    data = json.loads(run("verify", samples / "basic.snap", "--json").out)
    assert data["ok"] is True and data["problems"] == []


def test_extract_one_section(run: Run, samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "e1000.bin"
    result = run("extract", samples / "basic.snap", "pci.0/05.0/vmstate", "-o", out)
    assert result.code == 0
    assert out.read_bytes()[:8] == bytes.fromhex("0000080000000001")
    ram = tmp_path / "ram.bin"
    assert run("extract", samples / "basic.snap", "/pc.ram", "-o", ram).code == 0
    data = ram.read_bytes()
    assert len(data) == 8 << 20
    assert data[:5] == bytes.fromhex("ea5be000f0") and data[0x100000:0x100005] == b"Linux"
    assert data[0x7FF000:0x7FF002] == b"\x55\xaa" and data[0x400000:0x500000] == bytes(0x100000)


def test_extract_to_stdout(samples: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "snapfmt", "extract", samples / "tiny.snap", "e1000", "-o", "-"],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout == bytes.fromhex("00000800525400123456")


def test_extract_ambiguous_selector(run: Run, samples: Path, tmp_path: Path) -> None:
    result = run("extract", samples / "basic.snap", "pci.0", "-o", tmp_path / "x")
    assert result.code == 2
    assert result.err == (
        "snapfmt: error: selector 'pci.0' is ambiguous: it names 3 sections: "
        "/i440FX-pcihost/pci.0/e1000@05.0/rom, /i440FX-pcihost/pci.0/e1000@05.0/vmstate, "
        "/i440FX-pcihost/pci.0/lsi53c895a@07.0/vmstate\n"
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["extract", "F"],
        ["extract", "F", "sel"],
        ["extract", "F", "--all"],
        ["extract", "F", "s", "--all", "-d", "x"],
    ],
)
def test_extract_usage_errors(run: Run, samples: Path, args: list[str]) -> None:
    args = [str(samples / "tiny.snap") if a == "F" else a for a in args]
    result = run(*args)
    assert result.code == 2
    assert "Error: give either SELECTOR -o OUT, or --all -d DIR" in result.err


def test_bad_inputs_exit_2_with_one_line(run: Run, tmp_path: Path) -> None:
    missing = tmp_path / "missing.snap"
    assert (
        run("info", missing).err
        == f"snapfmt: error: {missing}: cannot open: No such file or directory\n"
    )
    text = tmp_path / "notes.txt"
    text.write_text("hello, world\n")
    result = run("dump", text)
    assert result.code == 2
    assert result.err == (
        f"snapfmt: error: {text}: offset 0x0: not a snapshot format snapfmt reads: "
        f"found first bytes 68656c6c6f2c2077, expected native magic 89534e4150460d0a or QEMU's 5145564d\n"
    )
    assert (
        run("verify", tmp_path).err
        == f"snapfmt: error: {tmp_path}: is a directory, not a snapshot file\n"
    )


def test_unknown_command_and_option(run: Run) -> None:
    assert run("frobnicate").code == 2
    assert run("info", "--bogus", "x").code == 2


def test_python_dash_m_and_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "snapfmt", "--version"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0 and done.stdout.startswith("snapfmt, version ")


MAX_STATEMENTS = 12  # in a command body, at every depth, docstring and imports aside
LOOPS = (
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)


def _registered(group: click.Group = cli) -> list[click.Command]:
    found: list[click.Command] = [group]
    for command in group.commands.values():
        if isinstance(command, click.Group):
            found += _registered(command)
        else:
            found.append(command)
    return found


def _body(function: ast.FunctionDef) -> list[ast.AST]:
    """Every node of a command function's body, docstring and imports aside."""
    statements = function.body[1:] if ast.get_docstring(function) else function.body
    return [
        node
        for statement in statements
        if not isinstance(statement, ast.Import | ast.ImportFrom)
        for node in ast.walk(statement)
    ]


CLI_MODULES = {f"snapfmt.cli.{p.stem}": p for p in (ROOT / "snapfmt" / "cli").glob("*.py")}


def cli_sources(**replaced: str) -> dict[str, str]:
    """The text of each module of snapfmt.cli, by module name (some replaced)."""
    return {name: replaced.get(name.rsplit(".", 1)[1], path.read_text())
            for name, path in CLI_MODULES.items()}  # fmt: skip


def fat_parts(sources: dict[str, str]) -> list[str]:
    """What makes the commands in *sources* (snapfmt.cli's modules) more than thin
    wrappers over the library: work over data (loops, comprehensions), printing past emit,
    bodies longer than MAX_STATEMENTS, or a command that calls neither an operation nor
    render."""
    functions = {
        (module, n.name): n
        for module, source in sources.items()
        for n in ast.parse(source).body
        if isinstance(n, ast.FunctionDef)
    }
    problems = []
    for command in _registered():
        assert command.callback is not None and command.callback.__module__ in sources
        function = functions[command.callback.__module__, command.callback.__name__]
        nodes = _body(function)
        statements = sum(isinstance(n, ast.stmt) for n in nodes)
        if statements > MAX_STATEMENTS:
            problems.append(f"{function.name}: {statements} statements")
        problems += [
            f"{function.name}: a loop at line {n.lineno}" for n in nodes if isinstance(n, LOOPS)
        ]
        names = {n.id for n in nodes if isinstance(n, ast.Name)}
        if "print" in names:
            problems.append(f"{function.name}: print (use emit)")
        imported = {
            alias.asname or alias.name
            for statement in function.body
            if isinstance(statement, ast.ImportFrom) and statement.module
            and statement.module.startswith("snapfmt.ops")
            for alias in statement.names
        }  # fmt: skip
        library = {"render", "inspect", *imported}
        if not isinstance(command, click.Group) and not names & library:
            problems.append(f"{function.name}: calls no operation and no render function")
    return problems


def test_commands_are_thin() -> None:
    """Commands are thin click wrappers over the library (sqlite-utils habit; DESIGN.md §2)."""
    assert fat_parts(cli_sources()) == []


def test_a_fat_command_is_caught() -> None:
    source = cli_sources()["snapfmt.cli.files"]
    thin = "        result = inspect.info(snap)\n"
    assert thin in source
    looping = (
        thin
        + "        rows = [s.key for s in snap.sections]\n        for row in rows:\n            print(row)\n"
    )
    long = thin + "        x = 1\n" * MAX_STATEMENTS
    line = source[: source.index(thin)].count("\n") + 2  # where the comprehension goes
    assert sorted(fat_parts(cli_sources(files=source.replace(thin, looping)))) == [
        f"info: a loop at line {line}",
        f"info: a loop at line {line + 1}",
        "info: print (use emit)",
    ]
    assert fat_parts(cli_sources(files=source.replace(thin, long))) == [
        f"info: {MAX_STATEMENTS + 4} statements"
    ]
    bare = source.replace("render.", "shown.").replace(thin, "        result = snap.sections\n")
    assert "info: calls no operation and no render function" in fat_parts(cli_sources(files=bare))


def test_write_into_missing_folder_is_one_line(run: Run, samples: Path, tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "x.snap"
    result = run("write", samples / "manifests" / "tiny.toml", "-o", target)
    assert result.code == 2
    assert (
        result.err
        == f"snapfmt: error: {samples / 'manifests' / 'tiny.toml'}: {target}: cannot write there: No such file or directory\n"
    )


def test_errors_stay_one_line_whatever_a_name_holds(tmp_path: Path, run: Run) -> None:
    """A newline or a lone surrogate in a file name or a selector is escaped."""
    weird = tmp_path / "we\nird\udcff.snap"
    result = run("info", weird)
    assert result.code == 2 and result.err.count("\n") == 1
    assert "we\\x0aird\\udcff.snap: cannot open" in result.err
    result = run("dump", SAMPLES / "basic.snap", "zz\nyy")
    assert result.code == 2 and result.err.count("\n") == 1 and "zz\\x0ayy" not in result.out


def test_names_with_control_characters_are_escaped_in_text_not_in_json(
    tmp_path: Path, run: Run
) -> None:
    """A newline, an escape sequence or a bidi override in a name read from a file
    cannot split, forge or recolour a line of text output; --json keeps it exact."""
    path = tmp_path / "names.snap"
    with Writer(path, machine="pc\x1b[31m") as w:
        w.add_device("/dev/vmstate", b"\x01", driver="d\nrv", vmstate_name="v\x07s",
                     qemu_idstr="q\rid")  # fmt: skip
        w.add_metadata("m\ne\u202e", {"a": "b\n"})
    info = run("info", path)
    assert info.code == 0 and "\x1b" not in info.out and "\r" not in info.out
    assert "/dev/vmstate  device    d\\x0arv  1" in info.out
    assert "m\\x0ae\\u202e  metadata" in info.out and "machine       pc\\x1b[31m" in info.out
    dump = run("dump", path)
    assert "device d\\x0arv, vmstate v\\x07s version 1, instance 0, QEMU id q\\x0did" in dump.out
    assert len(dump.out.splitlines()) == 5
    exact = json.loads(run("dump", path, "--json").out)
    assert exact["sections"][0]["driver"] == "d\nrv"
    assert exact["sections"][1]["name"] == "m\ne\u202e"


def test_a_terminated_write_leaves_no_partial_file(tmp_path: Path) -> None:
    """SIGTERM (what timeout and service managers send) unwinds like Ctrl-C: the
    temporary output is removed, nothing half-written stays in the folder."""
    import signal
    import time

    manifest = tmp_path / "big.toml"
    manifest.write_text(  # (a region of 64 GiB: minutes of writing)
        'machine = "pc"\n[[ram]]\npath = "/pc.ram"\nsize = "64G"\n'
        'fill = [ { offset = 0, length = "64G", pattern = "55aa" } ]\n'
    )
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfmt", "write", str(manifest), "-o", str(out / "x.snap"), "-q"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not any(out.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and err.strip() == "snapfmt: interrupted"
    assert list(out.iterdir()) == []


def test_a_path_shown_readably_selects_its_section(run: Run, samples: Path) -> None:
    """Text shows fw_cfg blocks as /rom@etc/acpi/tables; typed back, it selects the block,
    and JSON keeps the canonical path."""
    result = run("dump", samples / "basic.snap", "/rom@etc/acpi/tables")
    assert result.code == 0
    assert result.out.splitlines()[2].startswith("/rom@etc/acpi/tables: RAM block, 128.0 KiB")
    result = run("dump", samples / "basic.snap", "/rom@etc/acpi/tables", "--json")
    assert [s["path"] for s in json.loads(result.out)["sections"]] == [
        "/%2From%40etc%2Facpi%2Ftables"
    ]
