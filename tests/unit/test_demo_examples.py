"""The demo report's page of examples: held-out questions with their reference answers, and the
page that shows each image with the answers before and after training."""

from __future__ import annotations

import re

import pytest

from mocha.demo.evaluate import example_questions
from mocha.demo.report import write_examples_page
from mocha.demo.synthetic import SHORT_ANSWER_PROMPT, generate_shapes_dataset


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return generate_shapes_dataset(tmp_path_factory.mktemp("examples") / "data" / "raw", num_train=8, num_eval=6)


def test_example_questions_are_the_held_out_short_answer_questions(paths):
    examples = example_questions(paths, num_images=3)
    images = list(dict.fromkeys(e["image"] for e in examples))
    assert images == ["eval_00000.png", "eval_00001.png", "eval_00002.png"]
    for e in examples:
        assert "<image>" not in e["question"] and e["question"].endswith(SHORT_ANSWER_PROMPT)
        assert re.fullmatch(r"Yes|No|\d|[A-Z][a-z]+", e["reference"])
    for image in images:  # every image's yes/no questions come in balanced pairs
        answers = [e["reference"] for e in examples if e["image"] == image]
        assert answers.count("Yes") == answers.count("No") >= 2


def test_examples_page_shows_each_image_with_answers_before_and_after(paths):
    examples = example_questions(paths, num_images=2)
    answered = [e | {"before": "Red", "after": e["reference"] if i % 2 == 0 else "No idea"}
                for i, e in enumerate(examples)]
    root = paths.root.parent.parent
    page = write_examples_page(root, paths, answered).read_text()
    for image in ("eval_00000.png", "eval_00001.png"):
        assert f"## {image}" in page and f"(data/raw/images/{image})" in page
    assert "| question | reference | before training | after training |" in page
    assert SHORT_ANSWER_PROMPT not in page  # the instruction is left out of the table
    rows = [line for line in page.splitlines() if line.startswith("| ") and "Red" in line]
    assert len(rows) == len(examples)
    first = [e for e in answered if e["image"] == "eval_00000.png"]
    assert f"{sum(e['after'] == e['reference'] for e in first)} of {len(first)} answered as the reference" in page
