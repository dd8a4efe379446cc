"""The whole exception tree lives in snapfmt/errors.py, and every error is a SnapfmtError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import snapfmt
from snapfmt import errors


def _modules() -> list[str]:
    found = pkgutil.walk_packages(snapfmt.__path__, "snapfmt.")
    return [m.name for m in found if not m.name.endswith("__main__")]  # (that one runs the CLI)


def test_every_exception_class_is_defined_in_errors() -> None:
    stray = []
    for name in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")  # private control flow, never raised to a caller
            ):
                stray.append(f"{name}.{attr}")
    assert [s for s in stray if not s.startswith("snapfmt.errors.")] == []


def test_every_error_is_a_snapfmt_error() -> None:
    classes = [
        value
        for value in vars(errors).values()
        if inspect.isclass(value) and issubclass(value, BaseException)
    ]
    assert len(classes) >= 10
    assert all(issubclass(c, errors.SnapfmtError) for c in classes)


def test_moved_errors_stay_importable_where_they_were() -> None:
    from snapfmt.ops.machine import DescriptionError
    from snapfmt.qemu.qmp import QemuError

    assert DescriptionError is errors.DescriptionError
    assert QemuError is errors.QemuError
