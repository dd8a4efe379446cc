#!/usr/bin/env python3
"""Rebuild the native sample snapshots from their manifests.

    python samples/make_samples.py           rewrite samples/*.snap
    python samples/make_samples.py --check   exit 1 if a rebuild differs from the committed file

Each samples/manifests/NAME.toml becomes samples/NAME.snap, exactly as
`snapfmt write samples/manifests/NAME.toml -o samples/NAME.snap` writes it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from snapfmt.ops import manifest

HERE = Path(__file__).resolve().parent


def rebuild(name: str, output: Path) -> None:
    manifest.build(manifest.load(str(HERE / "manifests" / f"{name}.toml")), str(output))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    differ = []
    for toml in sorted((HERE / "manifests").glob("*.toml")):
        target = HERE / f"{toml.stem}.snap"
        if not check:
            rebuild(toml.stem, target)
            print(f"wrote {target.relative_to(HERE.parent)}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / target.name
            rebuild(toml.stem, fresh)
            if not target.exists() or fresh.read_bytes() != target.read_bytes():
                differ.append(target.name)
    if differ:
        print(f"differ from a rebuild: {', '.join(differ)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
