"""JSON Lines files of evaluation questions and answers.

Question files follow the LLaVA/POPE convention, one object per line::

    {"question_id": 0, "image": "eval_00000.png", "text": "Is there a red circle in the image?", "label": "yes"}

Answer files are exactly what LLaVA's ``model_vqa_loader`` writes, so LLaVA's and MME's scripts
read them unchanged::

    {"question_id": 0, "prompt": "Is there ...?", "text": "Yes.", "answer_id": "...", "model_id": "mocha-demo",
     "metadata": {"image": "eval_00000.png", "label": "yes"}}

(``question_id`` and ``prompt`` are the question's own ``question_id`` and ``text``, ``text`` is
the answer; ``metadata`` keeps the question's other fields and its ground-truth label.)

:class:`AnswerFile` appends answers as they are produced (one flushed line each) and reads
back what an interrupted run left, so an evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

QUESTION_FIELDS = ("question_id", "image", "text")
#: LLaVA's short-answer instruction; its POPE and MME question files end every question with
#: it (on a line of its own).
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


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


# ----------------------------------------------------------------------------- answers


def answer_record(question: dict, answer: str, model_id: str, label: str | None = None) -> dict:
    """LLaVA's answer record for ``question`` (``question_id`` and ``prompt`` = the question's
    ``question_id`` and ``text``). ``metadata`` holds the question's other fields and, when
    given, its ground-truth ``label``. ``answer_id`` is derived from the rest (LLaVA draws a
    random one; a derived one makes reruns byte-identical)."""
    metadata = {k: v for k, v in question.items() if k not in ("question_id", "text")}
    if label is not None:
        metadata["label"] = label
    key = json.dumps([model_id, question["question_id"], question["text"], answer], ensure_ascii=False)
    return {"question_id": question["question_id"], "prompt": question["text"], "text": answer,
            "answer_id": hashlib.sha1(key.encode()).hexdigest()[:22], "model_id": model_id, "metadata": metadata}


def answer_metadata(answer: dict, key: str) -> Any:
    """A question field carried by an answer record: from ``metadata`` (LLaVA's layout), else
    from the record itself (answer files written before the metadata layout)."""
    metadata = answer.get("metadata")
    if isinstance(metadata, dict) and key in metadata:
        return metadata[key]
    return answer.get(key)


QuestionKey = tuple[str, str, int]


def question_keys(pairs: Iterable[tuple[Any, str]]) -> list[QuestionKey]:
    """A key per (question_id, question text) pair that tells repeated pairs apart by their
    occurrence: LLaVA's MME file gives both questions of an image the same question_id, so the
    id alone does not identify a question."""
    seen: Counter = Counter()
    keys = []
    for question_id, text in pairs:
        base = (json.dumps(question_id), text)
        keys.append((*base, seen[base]))
        seen[base] += 1
    return keys


class AnswerFile:
    """An answer file that grows one flushed line per answer.

    Opening it reads the answers an earlier run left. A last line cut short by an interruption
    (bytes after the last newline) is removed from the file; any other bad line is an error.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.answers: list[dict] = []
        self.repaired = False
        if self.path.exists():
            self._read_existing()
        self._handle = None

    def _read_existing(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: what an interrupted write left after the last newline
        for line_no, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise EvalDataError(f"{self.path}:{line_no}: not valid JSON; not an answer file this "
                                    f"evaluation can resume (use another --out)") from None
            if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
                raise EvalDataError(f"{self.path}:{line_no}: not an answer record (question_id, prompt, text)")
            self.answers.append(row)
        if tail:
            keep = sum(len(line) + 1 for line in complete)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            self.repaired = True

    def append(self, record: dict) -> None:
        """Append one answer and flush it to the operating system."""
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.answers.append(record)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "AnswerFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
