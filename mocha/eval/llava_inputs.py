"""LLaVA's evaluation inputs: POPE's test file with its annotation files, MME's question file
with the MME benchmark folder.

POPE. LLaVA ships ``llava_pope_test.jsonl`` (``question_id``, ``image``, ``text``,
``category``; no labels) and scores it against POPE's annotation files
``coco_pope_{adversarial,popular,random}.json`` (JSON Lines with ``question_id``, ``image``,
``text``, ``label``). Its ``eval_pope.py`` pairs them *by position*: the i-th answer to a
question of category C gets the label on line i of ``coco_pope_C.json`` (the two files number
their questions differently). :func:`pope_labels_by_position` pairs them the same way and
checks every pair names the same image and question.

MME. LLaVA ships ``llava_mme.jsonl`` (``question_id`` like ``code_reasoning/0020.png`` or
``artwork/images/14777.jpg``, shared by the two questions of an image; ``image``, ``text``,
``category``) and takes labels from the ``MME_Benchmark_release_version`` folder: one folder
per subtask, either ``<subtask>/images/<name>.jpg`` with ``<subtask>/questions_answers_YN/<name>.txt``
or ``<subtask>/<name>.png`` beside ``<subtask>/<name>.txt``; each ``.txt`` holds
``question<TAB>Yes|No`` lines. LLaVA's ``convert_answer_to_mme.py`` finds a question's label
under (subtask = the id's first part, file = the id's file name up to its first dot + ``.txt``,
question = the text without the short-answer instruction, followed by
``" Please answer yes or no."`` when it lacks it, or with two spaces when MME's file has two);
:func:`mme_label` looks it up the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mocha.eval.mme import COGNITION_SUBTASKS, PERCEPTION_SUBTASKS
from mocha.eval.records import SHORT_ANSWER_INSTRUCTION, EvalDataError

MME_SUBTASKS = PERCEPTION_SUBTASKS + COGNITION_SUBTASKS
MME_IMAGES_DIR = "images"
MME_QA_DIR = "questions_answers_YN"
MME_YES_NO = "Please answer yes or no."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def strip_short_answer(text: str) -> str:
    """The question without LLaVA's short-answer instruction, surrounding space removed."""
    return text.replace(SHORT_ANSWER_INSTRUCTION, "").strip()


# ----------------------------------------------------------------------------- POPE


def pope_labels_by_position(questions: list[dict], annotations: dict[str, tuple[str, list[dict]]],
                            source: str) -> list[str]:
    """Labels (``"yes"``/``"no"``) for LLaVA's POPE test questions, in question order.

    ``annotations`` maps a category to (file name, its records). Every category of
    ``questions`` needs an annotation file with exactly as many questions, and every annotation
    file needs questions (``eval_pope.py`` scores every file of its annotation folder)."""
    positions: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        category = q.get("category")
        if not isinstance(category, str):
            raise EvalDataError(f"{source}: question {q['question_id']!r} has no 'category' naming its POPE split")
        positions.setdefault(category, []).append(i)
    missing = sorted(set(positions) - set(annotations))
    if missing:
        raise EvalDataError(f"{source}: no POPE annotation file for categories {missing} "
                            f"(expected coco_pope_<category>.json beside the others)")
    unused = sorted(name for c, (name, _) in annotations.items() if c not in positions)
    if unused:
        raise EvalDataError(f"{unused}: no question of that category in {source}; LLaVA's eval_pope.py "
                            f"scores every annotation file of its folder, so they must belong together")
    labels: list[str] = [""] * len(questions)
    for category, indices in positions.items():
        name, records = annotations[category]
        if len(records) != len(indices):
            raise EvalDataError(f"{source} has {len(indices)} questions of category {category!r}, {name} has "
                                f"{len(records)}; eval_pope.py pairs them line by line")
        for n, (i, annotation) in enumerate(zip(indices, records), start=1):
            q = questions[i]
            asked, annotated = strip_short_answer(q["text"]), strip_short_answer(str(annotation.get("text", "")))
            if q["image"] != annotation.get("image") or asked != annotated:
                raise EvalDataError(
                    f"{source}: question {q['question_id']!r} (number {n} of category {category!r}: {q['image']}, "
                    f"{asked!r}) is not line {n} of {name} ({annotation.get('image')}, {annotated!r}); "
                    f"eval_pope.py pairs them by position")
            label = annotation.get("label")
            if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
                raise EvalDataError(f"{name}:{n}: label {label!r}; POPE labels are 'yes' or 'no'")
            labels[i] = label.strip().lower()
    return labels


# ----------------------------------------------------------------------------- MME


@dataclass(frozen=True)
class MMEItem:
    """One question of MME's benchmark folder."""

    subtask: str
    image: str  # path relative to the benchmark folder
    question: str  # as MME's file words it
    label: str  # "Yes" / "No" as written


def is_mme_benchmark(folder: str | Path) -> bool:
    """Whether ``folder`` is laid out as ``MME_Benchmark_release_version`` (subtask folders)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / s).is_dir() for s in MME_SUBTASKS)


class MMEBenchmark:
    """The questions and labels of an ``MME_Benchmark_release_version`` folder.

    ``items`` lists every question: subtasks in MME's order, files by name, lines in file order
    (the two questions of an image stay adjacent). Folders that are not MME subtasks are not read.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not is_mme_benchmark(self.root):
            raise FileNotFoundError(f"{self.root}: not an MME benchmark folder (no subtask folders such as "
                                    f"existence/, count/, code_reasoning/)")
        self.items: list[MMEItem] = []
        self._labels: dict[tuple[str, str], dict[str, str]] = {}  # (subtask, qa file name) -> question -> label
        for subtask in MME_SUBTASKS:
            if (self.root / subtask).is_dir():
                self._read_subtask(subtask)

    def _read_subtask(self, subtask: str) -> None:
        folder = self.root / subtask
        if (folder / MME_IMAGES_DIR).is_dir():
            image_dir, qa_dir = folder / MME_IMAGES_DIR, folder / MME_QA_DIR
            if not qa_dir.is_dir():
                raise EvalDataError(f"{folder}: has {MME_IMAGES_DIR}/ but no {MME_QA_DIR}/")
        else:
            image_dir = qa_dir = folder
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        qa_files = sorted(p for p in qa_dir.iterdir() if p.suffix == ".txt")
        if not qa_files:
            raise EvalDataError(f"{qa_dir}: no question files (<image name>.txt)")
        for qa_file in qa_files:
            image = images.get(qa_file.stem)
            if image is None:
                raise EvalDataError(f"{qa_file}: no image {qa_file.stem}.* in {image_dir}")
            labels = self._labels.setdefault((subtask, qa_file.name), {})
            for line_no, line in enumerate(qa_file.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                cols = line.strip().split("\t")
                if len(cols) != 2 or cols[1].strip().lower() not in ("yes", "no"):
                    raise EvalDataError(f"{qa_file}:{line_no}: expected question<TAB>Yes|No, got {line!r}")
                question, label = cols
                labels[question] = label
                self.items.append(MMEItem(subtask, image.relative_to(self.root).as_posix(), question, label))

    def label(self, question: dict, source: str) -> tuple[str, str]:
        """(label, MME's wording of the question) for a question of LLaVA's ``llava_mme.jsonl``."""
        qid = str(question["question_id"])
        subtask = qid.split("/")[0]
        qa_name = qid.split("/")[-1].split(".")[0] + ".txt"
        if question.get("category", subtask) != subtask:
            raise EvalDataError(f"{source}: question {qid!r} has category {question.get('category')!r}; LLaVA's "
                                f"convert_answer_to_mme.py takes the subtask from the id ({subtask!r})")
        labels = self._labels.get((subtask, qa_name))
        if labels is None:
            raise EvalDataError(f"{source}: question {qid!r}: no {subtask}/.../{qa_name} in {self.root}")
        asked = strip_short_answer(question["text"])
        wordings = [asked] if MME_YES_NO in asked else [f"{asked} {MME_YES_NO}", f"{asked}  {MME_YES_NO}"]
        for wording in wordings:
            if wording in labels:
                return labels[wording], wording
        raise EvalDataError(f"{source}: question {qid!r} {asked!r} is not in {self.root}/{subtask}/.../{qa_name} "
                            f"(which asks {sorted(labels)})")
