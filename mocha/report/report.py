"""``report.md``: a run's scores as tables and its plots embedded as relative PNG links.

A report is a title and a list of :class:`ReportSection`; the file lives in ``out_dir`` and
every image is linked relative to it, so the folder can be moved or browsed on GitHub as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mocha.report.tables import mme_table, pope_table

REPORT_NAME = "report.md"


@dataclass
class ReportSection:
    """A ``##`` section: Markdown text, then tables, then images (PNG paths)."""

    title: str
    text: str = ""
    tables: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)


def score_sections(scores: dict, label: str = "") -> list[ReportSection]:
    """POPE and MME sections from a ``scores.json`` dict (see :mod:`mocha.eval.suite`).
    ``label`` names the model in the titles (e.g. "after stage 2")."""
    suffix = f" ({label})" if label else ""
    sections = []
    if "pope" in scores:
        sections.append(ReportSection(
            f"POPE{suffix}",
            "Yes/no object-existence questions; answers parsed as POPE's evaluate.py, \"yes\" is the positive class.",
            [pope_table(scores["pope"])]))
    if "mme" in scores:
        sections.append(ReportSection(
            f"MME{suffix}",
            "Two yes/no questions per image; score = (accuracy + accuracy+) x 100 per subtask, at most 200.",
            [mme_table(scores["mme"])]))
    return sections


def _relative(image: Path, out_dir: Path) -> str:
    image = Path(image)
    if not image.is_file():
        raise FileNotFoundError(f"report image not found: {image}")
    return Path(os.path.relpath(image.resolve(), out_dir.resolve())).as_posix()


def render_report(out_dir: str | Path, *sections: ReportSection, title: str = "MoCHA run report") -> str:
    """The Markdown text of a report written into ``out_dir``."""
    out_dir = Path(out_dir)
    parts = [f"# {title}\n"]
    for section in sections:
        parts.append(f"## {section.title}\n")
        if section.text:
            parts.append(section.text.strip() + "\n")
        parts += section.tables
        parts += [f"![{Path(image).stem}]({_relative(image, out_dir)})\n" for image in section.images]
    return "\n".join(parts)


def write_report(out_dir: str | Path, *sections: ReportSection, title: str = "MoCHA run report") -> Path:
    """Write ``out_dir/report.md``; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    path.write_text(render_report(out_dir, *sections, title=title), encoding="utf-8")
    return path
