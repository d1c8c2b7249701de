"""MME scoring: per-subtask accuracy and accuracy+, perception and cognition totals.

MME asks two yes/no questions about every image (one answered "Yes", one "No"). Its
``eval_tool/calculation.py`` reads one file per subtask, ``<results_dir>/<subtask>.txt``, with
tab-separated lines ``image<TAB>question<TAB>ground_truth<TAB>prediction``; the two questions
of an image are consecutive lines. Per subtask:

- accuracy: fraction of questions answered right;
- accuracy+: fraction of images with *both* questions answered right;
- score = (accuracy + accuracy+) x 100 (at most 200);

and the perception / cognition totals are the sums of their subtasks' scores.

Answers are parsed as ``calculation.py`` does: lower-cased; exactly ``yes``/``no`` as is,
otherwise ``yes`` if the first four characters contain "yes", else ``no`` if they contain
"no", else "other" (always wrong).

Inputs: that layout (question files with three columns, answered files with four), or the
answer JSONL of :mod:`mocha.eval.runner` whose records carry ``category`` (the subtask),
``image`` and ``label``. :func:`write_mme_results` writes answers back in the four-column
layout so MME's own tool can score them too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from mocha.eval.records import EvalDataError, answer_metadata

PERCEPTION_SUBTASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                       "artwork", "OCR")
COGNITION_SUBTASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_GROUPS = {"perception": PERCEPTION_SUBTASKS, "cognition": COGNITION_SUBTASKS}


@dataclass(frozen=True)
class MMEQuestion:
    """One line of MME's layout; ``prediction`` is None for an unanswered question file."""

    subtask: str
    image: str
    question: str
    label: str  # "Yes" / "No" as written in the file
    prediction: str | None = None


def parse_mme_answer(text: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``, exactly as MME's calculation.py decides."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


@dataclass(frozen=True)
class SubtaskScores:
    num_questions: int
    num_images: int
    accuracy: float
    accuracy_plus: float
    score: float  # (accuracy + accuracy_plus) * 100
    other: int  # answers that were neither yes nor no


@dataclass
class MMEScores:
    subtasks: dict[str, SubtaskScores]
    totals: dict[str, float] = field(default_factory=dict)  # "perception"/"cognition" -> summed score

    def as_dict(self) -> dict:
        return {"subtasks": {k: asdict(v) for k, v in self.subtasks.items()}, "totals": dict(self.totals)}


def subtask_group(subtask: str) -> str:
    for group, names in MME_GROUPS.items():
        if subtask in names:
            return group
    raise EvalDataError(f"unknown MME subtask {subtask!r}; MME's subtasks are "
                        f"{list(PERCEPTION_SUBTASKS) + list(COGNITION_SUBTASKS)}")


def _image_pairs(questions: list[MMEQuestion]) -> list[tuple[MMEQuestion, MMEQuestion]]:
    """Consecutive pairs, as calculation.py reads them; both lines must name the same image."""
    subtask = questions[0].subtask
    if len(questions) % 2:
        raise EvalDataError(f"MME subtask {subtask!r} has {len(questions)} questions; MME asks two per image")
    pairs = list(zip(questions[0::2], questions[1::2]))
    for a, b in pairs:
        if a.image != b.image:
            raise EvalDataError(f"MME subtask {subtask!r}: consecutive questions name different images "
                                f"({a.image!r}, {b.image!r}); the two questions of an image must be adjacent")
    return pairs


def score_subtask(questions: list[MMEQuestion]) -> SubtaskScores:
    """Scores of one subtask's answered questions, in file order."""
    if not questions:
        raise ValueError("no MME questions to score")
    correct: list[bool] = []
    other = 0
    for q in questions:
        gt = q.label.strip().lower()
        if gt not in ("yes", "no"):
            raise EvalDataError(f"MME subtask {q.subtask!r}, image {q.image!r}: ground truth {q.label!r} "
                                f"is not Yes/No")
        if q.prediction is None:
            raise EvalDataError(f"MME subtask {q.subtask!r}, image {q.image!r}: question has no prediction")
        pred = parse_mme_answer(q.prediction)
        other += pred == "other"
        correct.append(pred == gt)
    pairs = _image_pairs(questions)
    both = sum(correct[2 * i] and correct[2 * i + 1] for i in range(len(pairs)))
    accuracy = sum(correct) / len(correct)
    accuracy_plus = both / len(pairs)
    return SubtaskScores(num_questions=len(questions), num_images=len(pairs), accuracy=accuracy,
                         accuracy_plus=accuracy_plus, score=(accuracy + accuracy_plus) * 100, other=other)


def score_mme(questions: list[MMEQuestion]) -> MMEScores:
    """Per-subtask scores (subtasks in MME's order) and the group totals over the subtasks
    present (a group with none present gets no total)."""
    by_subtask: dict[str, list[MMEQuestion]] = {}
    for q in questions:
        subtask_group(q.subtask)
        by_subtask.setdefault(q.subtask, []).append(q)
    order = [s for names in MME_GROUPS.values() for s in names if s in by_subtask]
    subtasks = {s: score_subtask(by_subtask[s]) for s in order}
    totals = {group: sum(subtasks[s].score for s in names if s in subtasks)
              for group, names in MME_GROUPS.items() if any(s in subtasks for s in names)}
    return MMEScores(subtasks, totals)


# ----------------------------------------------------------------------------- layouts


def read_mme_file(path: str | Path, subtask: str | None = None) -> list[MMEQuestion]:
    """One subtask file (``<subtask>.txt``): three columns (questions) or four (answered).

    Only the line terminator is removed before splitting, so a prediction keeps its text as
    the model wrote it."""
    path = Path(path)
    subtask = subtask or path.stem
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) not in (3, 4):
                raise EvalDataError(f"{path}:{line_no}: expected image<TAB>question<TAB>answer[<TAB>prediction], "
                                    f"got {len(cols)} columns")
            rows.append(MMEQuestion(subtask, cols[0], cols[1], cols[2], cols[3] if len(cols) == 4 else None))
    if not rows:
        raise EvalDataError(f"{path}: no MME questions")
    return rows


def read_mme_dir(directory: str | Path) -> list[MMEQuestion]:
    """Every ``<subtask>.txt`` of a folder (MME's results layout), subtasks in MME's order."""
    directory = Path(directory)
    files = {p.stem: p for p in directory.glob("*.txt")}
    if not files:
        raise FileNotFoundError(f"{directory}: no MME subtask files (<subtask>.txt)")
    for name in files:
        subtask_group(name)
    order = [s for names in MME_GROUPS.values() for s in names if s in files]
    return [q for s in order for q in read_mme_file(files[s], s)]


def mme_to_questions(rows: list[MMEQuestion]) -> list[dict]:
    """MME rows as question records for the answer runner: ``question_id`` = ``subtask/line``
    (an image has two questions, so the image alone is not an id), ``category`` = subtask."""
    counters: dict[str, int] = {}
    out = []
    for r in rows:
        n = counters[r.subtask] = counters.get(r.subtask, -1) + 1
        out.append({"question_id": f"{r.subtask}/{n}", "image": r.image, "text": r.question, "label": r.label,
                    "category": r.subtask})
    return out


def mme_from_answers(answers: list[dict], source: str = "answers") -> list[MMEQuestion]:
    """Answer records (``prompt``, ``text``; ``category``, ``image``, ``label`` in ``metadata``)
    as MME rows, in record order."""
    rows = []
    for a in answers:
        fields = {k: answer_metadata(a, k) for k in ("category", "image", "label")}
        fields.update(prompt=a.get("prompt"), text=a.get("text"))
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise EvalDataError(f"{source}: answer {a.get('question_id')!r} lacks {missing} needed for MME scoring")
        rows.append(MMEQuestion(fields["category"], fields["image"], fields["prompt"], fields["label"], fields["text"]))
    return rows


def write_mme_results(rows: list[MMEQuestion], directory: str | Path) -> Path:
    """Write answered rows as ``<directory>/<subtask>.txt`` in MME's four-column layout.
    Tabs and newlines inside a prediction are replaced by spaces (they would break the layout)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_subtask: dict[str, list[str]] = {}
    for r in rows:
        if r.prediction is None:
            raise EvalDataError(f"MME subtask {r.subtask!r}, image {r.image!r}: no prediction to write")
        prediction = r.prediction.replace("\t", " ").replace("\n", " ").replace("\r", " ")
        by_subtask.setdefault(r.subtask, []).append("\t".join((r.image, r.question, r.label, prediction)) + "\n")
    for subtask, lines in by_subtask.items():
        (directory / f"{subtask}.txt").write_text("".join(lines), encoding="utf-8")
    return directory
