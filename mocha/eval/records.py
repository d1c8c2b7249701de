"""JSON Lines files of evaluation questions and answers.

Question files follow the LLaVA/POPE convention, one object per line::

    {"question_id": 0, "image": "eval_00000.png", "text": "Is there a red circle in the image?", "label": "yes"}

Answer files are what LLaVA's ``model_vqa_loader`` writes, so external scorers read them as is::

    {"question_id": 0, "prompt": "Is there ...?", "text": "Yes.", "model_id": "mocha-demo", "label": "yes", ...}

(``prompt`` is the question as shown to the model, ``text`` the answer; every other field of
the question — ``label``, ``category``, ``image`` — is passed through.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

QUESTION_FIELDS = ("question_id", "image", "text")


class EvalDataError(ValueError):
    """An evaluation file is malformed; the message names the file and line."""


def read_jsonl(path: str | Path) -> list[dict]:
    """Every non-blank line of ``path`` as a JSON object."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` one JSON object per line, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def validate_questions(questions: list[dict], source: str) -> None:
    """Every question has ``question_id``, ``image`` and a non-empty ``text``."""
    for i, q in enumerate(questions):
        missing = [k for k in QUESTION_FIELDS if k not in q]
        if missing:
            raise EvalDataError(f"{source}: question {i} lacks {missing} (has {sorted(q)})")
        if not isinstance(q["text"], str) or not q["text"].strip():
            raise EvalDataError(f"{source}: question {q['question_id']!r} has an empty 'text'")


def load_questions(path: str | Path) -> list[dict]:
    """A question file, validated (see :func:`validate_questions`)."""
    questions = read_jsonl(path)
    validate_questions(questions, str(path))
    return questions
