"""An evaluation run: POPE splits and MME subtasks answered in one pass, written and scored.

Output folder::

    pope_<split>_answers.jsonl   answer records per POPE split (LLaVA's answer format)
    mme_answers.jsonl            answer records of every MME question
    mme_results/<subtask>.txt    the same in MME's layout (MME's calculation.py reads it)
    scores.json                  {"pope": {split: PopeScores}, "mme": MMEScores}

All questions go through the answer function at once, so a Ray pool starts once per run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mocha.eval.mme import MMEQuestion, mme_from_answers, mme_to_questions, read_mme_dir, score_mme, write_mme_results
from mocha.eval.pope import load_pope_splits, score_pope_answers
from mocha.eval.records import EvalDataError, load_questions, write_jsonl

#: Answers a list of question records, returning one answer record per question, in order.
AnswerFn = Callable[[list[dict]], list[dict]]


@dataclass
class EvalSuite:
    """The questions of one evaluation run."""

    pope: dict[str, list[dict]] = field(default_factory=dict)  # split -> questions
    mme: list[dict] = field(default_factory=list)  # question records with category + label

    def __len__(self) -> int:
        return sum(len(q) for q in self.pope.values()) + len(self.mme)


def load_mme_questions(path: str | Path) -> list[dict]:
    """MME questions from a folder in MME's layout (``<subtask>.txt``) or a JSONL question file
    whose records carry ``category`` (the subtask) and ``label``."""
    path = Path(path)
    if path.is_dir():
        return mme_to_questions(read_mme_dir(path))
    questions = load_questions(path)
    for q in questions:
        missing = [k for k in ("category", "label") if k not in q]
        if missing:
            raise EvalDataError(f"{path}: MME question {q['question_id']!r} lacks {missing}")
    return questions


def load_suite(pope: list[str | Path] | None = None, mme: str | Path | None = None) -> EvalSuite:
    if not pope and mme is None:
        raise ValueError("nothing to evaluate: give POPE question files and/or MME questions")
    return EvalSuite(pope=load_pope_splits(list(pope)) if pope else {},
                     mme=load_mme_questions(mme) if mme is not None else [])


def run_suite(suite: EvalSuite, answer: AnswerFn, out_dir: str | Path) -> dict:
    """Answer every question, write the answer files and ``scores.json``; returns the scores
    (``{"pope": {split: {...}}, "mme": {"subtasks": ..., "totals": ...}}``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = [(("pope", split), qs) for split, qs in suite.pope.items()]
    if suite.mme:
        batches.append((("mme", None), suite.mme))
    questions = [q for _, qs in batches for q in qs]
    answers = answer(questions)
    if len(answers) != len(questions):
        raise RuntimeError(f"{len(answers)} answers for {len(questions)} questions")

    scores: dict = {}
    start = 0
    for (kind, split), qs in batches:
        part, start = answers[start:start + len(qs)], start + len(qs)
        if kind == "pope":
            path = write_jsonl(out_dir / f"pope_{split}_answers.jsonl", part)
            scores.setdefault("pope", {})[split] = score_pope_answers(part, source=str(path)).as_dict()
        else:
            path = write_jsonl(out_dir / "mme_answers.jsonl", part)
            rows: list[MMEQuestion] = mme_from_answers(part, source=str(path))
            write_mme_results(rows, out_dir / "mme_results")
            scores["mme"] = score_mme(rows).as_dict()
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores
