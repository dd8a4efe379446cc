"""Binary layouts, declared with construct.

construct is imported when a declaration is first used, not with these modules: it
costs more to import (it pulls in pdb) than opening a QEMU stream takes, and a command
on a QEMU stream needs only the constants and the ``struct`` fast paths declared beside
the layouts.  Each module declares its layouts in ``_declare()``; its ``__getattr__``
runs that once, on the first use of any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def declared(namespace: dict[str, Any], declare: Callable[[], dict[str, Any]], name: str) -> Any:
    """The module attribute *name*, making the module's declarations first if needed."""
    if "_declared" not in namespace and not name.startswith("__"):  # not __path__ & co.
        import construct

        made = declare()
        namespace.update(
            (key, value)
            for key, value in made.items()
            if isinstance(value, construct.Construct) or key in ("STRUCTURES", "SUBSECTIONS")
        )
        namespace["_declared"] = True
        if name in namespace:
            return namespace[name]
    raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
