"""Score tables as Markdown (``report.md`` embeds them; ``mocha eval`` prints them)."""

from __future__ import annotations

from collections.abc import Sequence

from mocha.eval.mme import subtask_group


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table: the first column (names) left-aligned, the rest
    (numbers) right-aligned."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pope_table(pope: dict[str, dict]) -> str:
    """POPE scores per split (percentages), as in the POPE paper: accuracy, precision, recall,
    F1, yes-ratio."""
    rows = [(split, s["num_questions"], _pct(s["accuracy"]), _pct(s["precision"]), _pct(s["recall"]), _pct(s["f1"]),
             _pct(s["yes_ratio"])) for split, s in pope.items()]
    return markdown_table(("split", "questions", "accuracy %", "precision %", "recall %", "F1 %", "yes %"), rows)


def mme_table(mme: dict) -> str:
    """MME per subtask (accuracy, accuracy+, score = (acc + acc+) x 100) and group totals."""
    rows: list[tuple] = [(name, subtask_group(name), s["num_questions"], _pct(s["accuracy"]), _pct(s["accuracy_plus"]),
             f"{s['score']:.1f}") for name, s in mme["subtasks"].items()]
    rows += [(f"**{group} total**", group, "", "", "", f"**{total:.1f}**") for group, total in mme["totals"].items()]
    return markdown_table(("subtask", "group", "questions", "acc %", "acc+ %", "score"), rows)
