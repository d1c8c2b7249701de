"""POPE (Polling-based Object Probing Evaluation) scoring.

Question files are POPE's own format, one JSON object per line with ``question_id``, ``image``,
``text`` and ``label`` (``"yes"``/``"no"``). A benchmark has three splits that differ in how the
absent objects of the "no" questions are drawn: ``random``, ``popular`` and ``adversarial``;
the split comes from the file name (``coco_pope_adversarial.json``, ``pope_random.jsonl``) or,
for a combined file such as LLaVA's ``llava_pope_test.jsonl``, from each question's
``category``.

Answers are parsed as POPE's ``evaluate.py`` (and LLaVA's ``eval_pope.py``) do: keep the text
before the first ``"."``, drop commas, split on single spaces; the answer is "no" when one of
the words is exactly ``No``, ``no`` or ``not``, otherwise "yes" (an empty answer counts as
"yes"). "yes" is the positive class for precision and recall.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from mocha.eval.records import EvalDataError, answer_metadata, load_questions

POPE_SPLITS = ("random", "popular", "adversarial")
_NEGATIVE_WORDS = frozenset({"No", "not", "no"})


def parse_pope_answer(text: str) -> str:
    """Map a free-form answer to ``"yes"``/``"no"`` exactly as POPE's evaluate.py does."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if _NEGATIVE_WORDS.intersection(words) else "yes"


@dataclass(frozen=True)
class PopeScores:
    """Confusion counts and rates of one split ("yes" = positive). Rates with an empty
    denominator (no "yes" predicted, no "yes" label) are 0.0 rather than a division error."""

    num_questions: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def score_pope(predictions: list[str], labels: list[str]) -> PopeScores:
    """Scores of parsed predictions (``"yes"``/``"no"``) against labels (``"yes"``/``"no"``)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no POPE questions to score")
    bad = sorted({x for x in (*predictions, *labels) if x not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels and parsed predictions must be 'yes' or 'no', got {bad}")
    pairs = list(zip(predictions, labels))
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("yes", "no"))
    tn = pairs.count(("no", "no"))
    fn = pairs.count(("no", "yes"))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return PopeScores(
        num_questions=len(pairs), tp=tp, fp=fp, tn=tn, fn=fn,
        accuracy=(tp + tn) / len(pairs),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        yes_ratio=(tp + fp) / len(pairs),
    )


def pope_label(record: dict, source: str) -> str:
    label = record.get("label")
    if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
        raise EvalDataError(f"{source}: question {record.get('question_id')!r} has label {label!r}; "
                            f"POPE labels are 'yes' or 'no'")
    return label.strip().lower()


def score_pope_answers(answers: list[dict], questions: list[dict] | None = None,
                       source: str = "answers") -> PopeScores:
    """Score one split's answer records (``text`` = the model's answer).

    Labels come from ``questions`` joined on ``question_id`` when given (an external answer
    file), else from each answer's own ``label`` (in ``metadata``, where mocha's answer files
    carry it). Every question must have exactly one answer.
    """
    if questions is not None:
        by_id = {q["question_id"]: q for q in questions}
        answered = [a["question_id"] for a in answers]
        missing = [qid for qid in by_id if qid not in set(answered)]
        unknown = [qid for qid in answered if qid not in by_id]
        if missing or unknown or len(answered) != len(set(answered)):
            raise EvalDataError(f"{source}: answers do not match the questions one to one: "
                                f"unanswered {missing[:5]}, unknown {unknown[:5]}, "
                                f"{len(answered) - len(set(answered))} duplicates")
        labels = [pope_label(by_id[a["question_id"]], source) for a in answers]
    else:
        labels = [pope_label({"question_id": a.get("question_id"), "label": answer_metadata(a, "label")}, source)
                  for a in answers]
    predictions = [parse_pope_answer(str(a.get("text", ""))) for a in answers]
    return score_pope(predictions, labels)


def split_name(path: str | Path) -> str:
    """The POPE split a question file holds, from its name (``coco_pope_popular.json`` ->
    ``popular``); the file stem when it names none."""
    stem = Path(path).stem
    found = [s for s in POPE_SPLITS if s in stem]
    return found[0] if len(found) == 1 else stem


def pope_files(paths: list[str | Path]) -> list[Path]:
    """The POPE files named by ``paths``: files as given, and from each folder every
    ``*.json``/``*.jsonl`` whose name contains ``pope``."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl") and "pope" in f.name)
            if not found:
                raise FileNotFoundError(f"{p}: no POPE question files (*pope*.json / *pope*.jsonl)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"POPE question file or folder not found: {p}")
    return files


def discover_pope_files(paths: list[str | Path]) -> dict[str, Path]:
    """POPE question files by split, from files and/or folders (see :func:`pope_files`)."""
    by_split: dict[str, Path] = {}
    for f in pope_files(paths):
        name = split_name(f)
        if name in by_split:
            raise EvalDataError(f"two POPE files for split {name!r}: {by_split[name]} and {f}")
        by_split[name] = f
    return by_split


def load_pope_splits(paths: list[str | Path]) -> dict[str, list[dict]]:
    """Questions by split. A file whose questions carry ``category`` (LLaVA's combined test
    file) is split by it; otherwise the file name gives the split."""
    splits: dict[str, list[dict]] = {}
    for name, path in discover_pope_files(paths).items():
        questions = load_questions(path)
        for q in questions:
            pope_label(q, str(path))
        groups: dict[str, list[dict]] = {}
        for q in questions:
            groups.setdefault(str(q["category"]) if "category" in q else name, []).append(q)
        for split, qs in groups.items():
            if split in splits:
                raise EvalDataError(f"{path}: split {split!r} also comes from another file")
            splits[split] = qs
    return splits
