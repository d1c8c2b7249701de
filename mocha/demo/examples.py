"""The demo's page of examples: held-out image, question, reference, answer before and after
MoCHA training, taken from the two evaluation runs' answer files (no extra generation).

Which questions: the first question labelled yes and the first labelled no of every POPE split
and every MME subtask, in file order; chosen before looking at any answer, so the page shows
what the scores count, not the best cases. Images are copied beside the page, scaled up with
nearest-neighbour sampling so the pixels the encoders saw stay visible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mocha.eval.records import answer_metadata
from mocha.report.tables import markdown_table

EXAMPLES_PAGE = "examples.md"
EXAMPLE_IMAGES_DIR = "examples"
_SCALE = 4


@dataclass(frozen=True)
class Example:
    section: str  # "POPE adversarial", "MME count", ...
    image: str  # file name in the dataset's image folder
    question: str
    reference: str
    before: str
    after: str


def _answers(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"answer file not found: {path} (run the evaluation first)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sections(answers_dir: Path) -> dict[str, list[dict]]:
    """Answer records by section name: one per POPE split file, one per MME subtask."""
    sections: dict[str, list[dict]] = {}
    for path in sorted(answers_dir.glob("pope_*_answers.jsonl")):
        split = path.name[len("pope_"):-len("_answers.jsonl")]
        sections[f"POPE {split}"] = _answers(path)
    mme = answers_dir / "mme_answers.jsonl"
    if mme.is_file():
        for record in _answers(mme):
            sections.setdefault(f"MME {answer_metadata(record, 'category')}", []).append(record)
    if not sections:
        raise FileNotFoundError(f"no POPE or MME answer files in {answers_dir}")
    return sections


def pick_examples(before_dir: str | Path, after_dir: str | Path) -> list[Example]:
    """The first yes- and the first no-labelled question of every section, with both models'
    answers. The two runs must have answered the same questions (same ids per section)."""
    before, after = _sections(Path(before_dir)), _sections(Path(after_dir))
    if sorted(before) != sorted(after):
        raise ValueError(f"the runs answered different sections: {sorted(before)} vs {sorted(after)}")
    examples = []
    for section in sorted(after):
        by_id = {r["question_id"]: r for r in before[section]}
        for wanted in ("yes", "no"):
            record = next((r for r in after[section]
                           if str(answer_metadata(r, "label")).strip().lower() == wanted), None)
            if record is None:
                continue
            if record["question_id"] not in by_id:
                raise ValueError(f"{section}: question {record['question_id']!r} was answered after training only")
            examples.append(Example(section=section, image=str(answer_metadata(record, "image")),
                                    question=record["prompt"], reference=str(answer_metadata(record, "label")),
                                    before=by_id[record["question_id"]]["text"], after=record["text"]))
    return examples


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_examples_page(root: str | Path, image_dir: str | Path, examples: list[Example]) -> Path:
    """Write ``root/examples.md`` (and the scaled images under ``root/examples/``)."""
    from PIL import Image

    root, image_dir = Path(root), Path(image_dir)
    (root / EXAMPLE_IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for ex in examples:
        target = root / EXAMPLE_IMAGES_DIR / ex.image
        if not target.exists():
            with Image.open(image_dir / ex.image) as im:
                rgb = im.convert("RGB")
                rgb.resize((rgb.width * _SCALE, rgb.height * _SCALE), Image.NEAREST).save(target)
        rows.append([ex.section, f"![{ex.image}]({EXAMPLE_IMAGES_DIR}/{ex.image})", _cell(ex.question),
                     ex.reference, _cell(ex.before), _cell(ex.after)])
    changed = sum(_normalise(ex.before) != _normalise(ex.after) for ex in examples)
    right = [sum(_normalise(getattr(ex, side)).startswith(ex.reference.lower()) for ex in examples)
             for side in ("before", "after")]
    text = "\n".join([
        "# Examples: held-out images, before and after MoCHA training\n",
        "The first question labelled yes and the first labelled no of every POPE split and MME subtask, "
        "taken in file order before looking at any answer (not the best cases). *Before*: the same LLM with "
        "untrained connectors; *after*: stage 1 + stage 2. Greedy decoding, the answers the scores count.\n",
        f"{len(examples)} questions; answers starting with the reference: {right[0]} before, {right[1]} after; "
        f"{changed} answers changed.\n",
        markdown_table(["section", "image", "question", "reference", "before", "after"], rows),
    ])
    page = root / EXAMPLES_PAGE
    page.write_text(text, encoding="utf-8")
    return page


def _normalise(answer: str) -> str:
    return answer.strip().lower()
