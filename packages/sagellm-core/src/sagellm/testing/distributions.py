"""Throw-away installed distributions, for testing plugin discovery without pip.

A directory holding ``<name>-<version>.dist-info/`` (``METADATA`` + ``entry_points.txt``) and the
plugin's modules is, once on ``sys.path`` or ``PYTHONPATH``, indistinguishable from a pip install
to ``importlib.metadata``.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from pathlib import Path

from sagellm.hookspecs import ENTRY_POINT_GROUP


def make_distribution(root: str | Path, name: str, entry_points: Mapping[str, str],
                      modules: Mapping[str, str] | None = None, version: str = "0.1.0") -> Path:
    """Create distribution ``name`` under ``root`` and return ``root``.

    ``entry_points`` maps backend entry-point names to module paths (group ``sagellm.backends``);
    ``modules`` maps module names (``pkg.mod`` allowed) to their source, dedented.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for mod, source in (modules or {}).items():
        parts = mod.split(".")
        target = root.joinpath(*parts[:-1])
        for depth in range(1, len(parts)):
            init = root.joinpath(*parts[:depth], "__init__.py")
            init.parent.mkdir(parents=True, exist_ok=True)
            init.touch()
        (target / f"{parts[-1]}.py").write_text(textwrap.dedent(source))
    dist_dir = root / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    dist_dir.mkdir(exist_ok=True)
    (dist_dir / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{ep} = {target}" for ep, target in entry_points.items()]
    (dist_dir / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root
