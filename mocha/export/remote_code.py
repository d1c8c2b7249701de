"""Generate the remote code an export carries: mocha's own modules, flattened into one folder.

transformers loads a ``trust_remote_code`` model by copying the module named in ``auto_map``
(and, recursively, the files it imports *relatively*) into its modules cache and importing it
there, where ``mocha`` is not installed. :func:`bundle` therefore takes the entry modules
(:data:`ENTRY_MODULES`: the transformers config, model and processor classes of
``mocha.export``), follows their ``from mocha... import`` statements to every mocha module they
need (at any depth, in functions too), and writes each module's source unchanged except for
those imports, rewritten to relative imports of the flattened files (``mocha.model.hga`` ->
``mocha_model_hga.py``). The model code in an export is thus always the package's own code of
the version that exported it, never a second copy.

The bundle may import only the standard library and :data:`ALLOWED_IMPORTS` (torch,
transformers, safetensors, timm, pillow and what transformers itself installs); anything else,
``import mocha`` or a ``from mocha.x import module`` (a module, not a name) is refused with the
line that does it, because it would fail in an environment without mocha.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "mocha"

#: mocha module -> file name in the export (the names transformers' auto_map points at).
ENTRY_MODULES: dict[str, str] = {
    "mocha.export.hf_configuration": "configuration_mocha.py",
    "mocha.export.hf_modeling": "modeling_mocha.py",
    "mocha.export.hf_processing": "processing_mocha.py",
}

#: Top-level modules the bundled code may import besides the standard library: the environment
#: the export promises (torch, transformers, safetensors, timm, pillow) and packages transformers
#: 5.22 itself requires (numpy, pyyaml, tokenizers, huggingface_hub, and pydantic through typer).
ALLOWED_IMPORTS = frozenset({"torch", "transformers", "safetensors", "timm", "PIL",
                             "numpy", "yaml", "tokenizers", "huggingface_hub", "pydantic"})


class BundleError(ValueError):
    """A module cannot travel in an export (it imports something the target lacks)."""


@dataclass(frozen=True)
class BundledFile:
    module: str  # mocha module name
    name: str  # file name in the export
    source: str  # rewritten source


def file_name(module: str) -> str:
    return ENTRY_MODULES.get(module) or module.replace(".", "_") + ".py"


def _module_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise BundleError(f"{module} is not a Python source module")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _mocha_imports(module: str, tree: ast.Module) -> list[tuple[ast.ImportFrom, str]]:
    """(statement, imported mocha module) for each ``from mocha... import``; checks the others."""
    found = []
    stdlib = sys.stdlib_module_names
    for node in ast.walk(tree):
        where = f"{module} line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root == PACKAGE:
                    raise BundleError(f"{where}: `import {alias.name}` cannot be bundled; use `from {alias.name} "
                                      f"import <name>`")
                if root not in stdlib and root not in ALLOWED_IMPORTS:
                    raise BundleError(f"{where}: imports {alias.name}, which an export's environment lacks")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise BundleError(f"{where}: relative imports are not supported in bundled modules")
            root = (node.module or "").split(".")[0]
            if root == PACKAGE:
                for alias in node.names:
                    if _is_module(f"{node.module}.{alias.name}"):
                        raise BundleError(f"{where}: `from {node.module} import {alias.name}` imports a module; "
                                          f"import the names it needs instead")
                found.append((node, node.module))
            elif root not in stdlib and root not in ALLOWED_IMPORTS and root != "__future__":
                raise BundleError(f"{where}: imports from {node.module}, which an export's environment lacks")
    return found


def _rewrite(source: str, imports: list[tuple[ast.ImportFrom, str]]) -> str:
    """Replace the module of each ``from mocha.x import`` statement by its relative file name."""
    lines = source.splitlines(keepends=True)
    for node, module in imports:
        line = lines[node.lineno - 1]
        head = f"from {module} import"
        col = line.find(head, node.col_offset)
        if col != node.col_offset:
            raise BundleError(f"line {node.lineno}: expected `{head}` at column {node.col_offset}: {line.strip()!r}")
        relative = f"from .{file_name(module)[:-3]} import"
        lines[node.lineno - 1] = line[:col] + relative + line[col + len(head):]
    return "".join(lines)


def bundle(entries: tuple[str, ...] = tuple(ENTRY_MODULES)) -> list[BundledFile]:
    """The entry modules and every mocha module they import, rewritten; in dependency order of
    discovery (entries first)."""
    from mocha import __version__

    files: dict[str, BundledFile] = {}
    queue = list(entries)
    while queue:
        module = queue.pop(0)
        if module in files:
            continue
        path = _module_path(module)
        source = path.read_text(encoding="utf-8")
        imports = _mocha_imports(module, ast.parse(source, filename=str(path)))
        header = (f"# Generated by `mocha export` (mocha {__version__}) from {module} ({PACKAGE}/"
                  f"{path.relative_to(Path(_module_path(PACKAGE)).parent).as_posix()}); do not edit.\n")
        files[module] = BundledFile(module, file_name(module), header + _rewrite(source, imports))
        queue.extend(m for _, m in imports if m not in files)
    return list(files.values())


def write_bundle(directory: str | Path) -> list[str]:
    """Write the bundle into ``directory``; returns the file names."""
    directory = Path(directory)
    names = []
    for item in bundle():
        (directory / item.name).write_text(item.source, encoding="utf-8")
        names.append(item.name)
    return names
