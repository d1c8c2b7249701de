"""A Python environment without mocha: only the distributions an export promises to need.

:func:`build_isolated_site` links into one folder the installed files of ``torch``,
``transformers``, ``safetensors``, ``timm`` and ``pillow`` (those installed) and of everything
they require (markers evaluated, extras off). A child started with
``python -I -S`` (no site-packages, no PYTHONPATH, no user site) that puts that folder first on
``sys.path`` sees exactly that environment: ``import mocha`` fails there, and so does any import
of a package outside it. It is the "fresh virtual environment with only torch, transformers,
safetensors, timm and pillow" of issue 19, built from this interpreter's own files.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
from pathlib import Path

EXPORT_REQUIREMENTS = ("torch", "transformers", "safetensors", "timm", "pillow")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(roots=EXPORT_REQUIREMENTS) -> dict[str, md.Distribution]:
    """Installed distributions of ``roots`` and, recursively, their unconditional requirements."""
    from packaging.requirements import Requirement

    found: dict[str, md.Distribution] = {}
    queue = list(roots)
    while queue:
        name = _normal(queue.pop())
        if name in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                queue.append(req.name)
    return found


def build_isolated_site(directory: Path) -> Path:
    """Link the closure's top-level files (packages, modules, dist-info, bundled libs) into
    ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for dist in requirement_closure().values():
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or top.endswith(".pth") or top == "__pycache__":
                continue
            link = directory / top
            if not link.exists():
                os.symlink(dist.locate_file(top), link)
    return directory
