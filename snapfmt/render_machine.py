"""Text and JSON for machines: descriptions written, validate's verdict."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from snapfmt.render import human, one_line, shown

if TYPE_CHECKING:
    from snapfmt.ops.machine import Machine
    from snapfmt.ops.restore import Restored
    from snapfmt.ops.save import Saved
    from snapfmt.ops.validate import Validation


# -- machine descriptions ---------------------------------------------------------------------


def machine_written(output: str, description: Machine) -> str:
    return one_line(
        f"wrote {output}: {description.machine}, {len(description.devices)} device sections, "
        f"{len(description.ram_blocks)} RAM blocks"
    )


# -- validate -----------------------------------------------------------------------------------


def validation_text(v: Validation) -> Iterator[str]:
    for f in v.findings:
        where = f"{shown(f.path)}: " if f.path else ""
        yield f"{f.severity.upper():<8}{f.code:<20}{where}{f.message}"
        if f.severity == "error" and f.qemu:
            yield f"{'':<28}QEMU: {f.qemu}"
    errors = len(v.errors)
    warnings = sum(f.severity == "warning" for f in v.findings)
    verdict = "compatible" if v.compatible else "incompatible"
    yield f"{verdict}: {errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}"


def validation_json(v: Validation) -> dict[str, Any]:
    return {
        "snapshot": v.snapshot,
        "target": v.target,
        "schema_only": v.schema_only,
        "compatible": v.compatible,
        "findings": [
            {
                "code": f.code,
                "severity": f.severity,
                "path": f.path,
                "snapshot": f.snapshot,
                "target": f.target,
                "message": f.message,
                "qemu": f.qemu,
            }
            for f in v.findings
        ],
    }


def saved_text(s: Saved) -> str:
    again = "; the guest runs again" if s.resumed else ""
    return one_line(f"wrote {s.target}: {s.machine}, {s.devices} device sections, "
                    f"{s.ram_blocks} RAM blocks ({human(s.ram_bytes)}){again}")  # fmt: skip


def cmdline_text(argv: list[str]) -> str:
    import shlex

    return shlex.join(argv)


def restored_text(r: Restored) -> list[str]:
    return [f"QEMU {r.pid} has loaded the snapshot and is {r.state}",
            f"QMP socket    {r.socket}"]  # fmt: skip
