"""The demo's examples page: which questions it shows and what it says about them."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mocha.demo.examples import EXAMPLES_PAGE, pick_examples, write_examples_page
from mocha.eval.records import answer_record


def _write(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _answers(folder, pope: dict[str, list[str]], mme: list[str]):
    """POPE split 'random' with questions (id, image, label) and MME rows, answered with the
    given texts in order."""
    questions = [{"question_id": i, "image": f"eval_{i:05d}.png", "text": f"Is there a thing {i}?"} for i in range(4)]
    labels = ["no", "yes", "no", "yes"]
    _write(folder, "pope_random_answers.jsonl",
           [answer_record(q, a, "m", label=l) for q, a, l in zip(questions, pope["random"], labels)])
    mme_q = [{"question_id": f"count/{i}", "image": f"eval_{i // 2:05d}.png", "text": f"Count {i}?",
              "category": "count"} for i in range(4)]
    _write(folder, "mme_answers.jsonl",
           [answer_record(q, a, "m", label=l) for q, a, l in zip(mme_q, mme, ["Yes", "No", "Yes", "No"])])


def test_examples_are_the_first_yes_and_no_question_of_each_section_with_both_answers(tmp_path):
    _answers(tmp_path / "before", {"random": ["Red.", "No.", "No.", "No."]}, ["Yes", "Yes", "Yes", "Yes"])
    _answers(tmp_path / "after", {"random": ["No.", "Yes.", "No.", "Yes."]}, ["Yes", "No", "Yes", "No"])
    examples = pick_examples(tmp_path / "before", tmp_path / "after")
    got = [(e.section, e.question, e.reference, e.before, e.after) for e in examples]
    assert got == [("MME count", "Count 0?", "Yes", "Yes", "Yes"), ("MME count", "Count 1?", "No", "Yes", "No"),
                   ("POPE random", "Is there a thing 1?", "yes", "No.", "Yes."),
                   ("POPE random", "Is there a thing 0?", "no", "Red.", "No.")]

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 6), (200, 10 * i, 0)).save(images / f"eval_{i:05d}.png")
    page = write_examples_page(tmp_path / "report", images, examples)
    text = page.read_text()
    assert page.name == EXAMPLES_PAGE
    assert "answers starting with the reference: 1 before, 4 after; 3 answers changed" in text
    assert "| POPE random | ![eval_00000.png](examples/eval_00000.png) | Is there a thing 0? | no | Red. | No. |" in text
    with Image.open(tmp_path / "report" / "examples" / "eval_00000.png") as im:
        assert im.size == (32, 24)  # scaled up 4x, nearest neighbour: the colours stay exact
        assert im.getpixel((31, 23)) == (200, 0, 0)


def test_examples_refuse_runs_that_answered_different_questions(tmp_path):
    _answers(tmp_path / "before", {"random": ["No."] * 4}, ["Yes"] * 4)
    _answers(tmp_path / "after", {"random": ["No."] * 4}, ["Yes"] * 4)
    (tmp_path / "before" / "mme_answers.jsonl").unlink()
    with pytest.raises(ValueError, match="different sections"):
        pick_examples(tmp_path / "before", tmp_path / "after")
    with pytest.raises(FileNotFoundError, match="no POPE or MME answer files"):
        pick_examples(tmp_path / "nothing", tmp_path / "after")
