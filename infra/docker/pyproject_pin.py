"""Read the project's pins out of ``pyproject.toml`` so the GPU image cannot drift from it.

The Dockerfile installs torch and DeepSpeed in their own layers (torch first so the CUDA build
is the one DeepSpeed compiles its ops against) and then the project itself. Rather than repeat
version numbers, every install step asks this script for the requirement string; the last step
(and the cluster launcher's setup commands) runs ``--check`` to prove that what is installed
satisfies every ``[project].dependencies`` entry.

Usage::

    python pyproject_pin.py PYPROJECT NAME [NAME ...]   # the dependency entries for NAMEs
    python pyproject_pin.py PYPROJECT --build-system     # [build-system].requires
    python pyproject_pin.py PYPROJECT --check            # installed versions satisfy the pins

Standard library only (``tomllib``), except ``--check``, which needs ``packaging``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name (``Ray`` == ``ray``, ``py_cpuinfo`` == ``py-cpuinfo``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    return normalize(match.group(1))


def load_pyproject(path: str | Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def project_dependencies(pyproject: dict) -> dict[str, str]:
    """``[project].dependencies`` as {normalised name: requirement string}."""
    return {requirement_name(req): req for req in pyproject["project"]["dependencies"]}


def build_requires(pyproject: dict) -> list[str]:
    return list(pyproject["build-system"]["requires"])


def pins_for(pyproject: dict, names: list[str]) -> list[str]:
    """The requirement strings for ``names``; raises naming every package pyproject lacks."""
    deps = project_dependencies(pyproject)
    missing = [n for n in names if normalize(n) not in deps]
    if missing:
        raise KeyError(f"not in [project].dependencies of pyproject.toml: {', '.join(missing)}")
    return [deps[normalize(n)] for n in names]


def unsatisfied(pyproject: dict) -> list[str]:
    """Dependencies whose installed version does not satisfy pyproject (empty list = all good)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    problems = []
    for req_text in project_dependencies(pyproject).values():
        req = Requirement(req_text)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{req_text}: not installed")
            continue
        # A local version label (torch 2.13.0+cu130) still satisfies ==2.13.0.
        if not req.specifier.contains(installed.split("+")[0], prereleases=True):
            problems.append(f"{req_text}: installed {installed}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("names", nargs="*", default=[], help="dependency names to print")
    group.add_argument("--build-system", action="store_true", help="print [build-system].requires")
    group.add_argument("--check", action="store_true", help="verify installed versions satisfy the pins")
    args = parser.parse_args(argv)
    pyproject = load_pyproject(args.pyproject)
    if args.check:
        problems = unsatisfied(pyproject)
        for problem in problems:
            print(f"pin mismatch: {problem}", file=sys.stderr)
        return 1 if problems else 0
    try:
        lines = build_requires(pyproject) if args.build_system else pins_for(pyproject, args.names)
    except KeyError as e:
        print(f"{args.pyproject}: {e.args[0]}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
