"""POPE scoring against hand-computed numbers, with POPE's own answer parsing."""

from __future__ import annotations

import json

import pytest

from mocha.eval.pope import (discover_pope_files, load_pope_splits, parse_pope_answer, score_pope_answers,
                             split_name)
from mocha.eval.records import EvalDataError

# (answer text, label, what POPE's evaluate.py parses it to)
CASES = [
    ("Yes.", "yes", "yes"),
    ("No, there is not.", "yes", "no"),
    ("There is a red circle. No doubt.", "yes", "yes"),  # only the first sentence counts
    ("No", "no", "no"),
    ("I do not see it.", "no", "no"),  # "not" is a negative word
    ("yes", "no", "yes"),
    ("", "yes", "yes"),  # empty answers count as yes
    ("Nope.", "no", "yes"),  # words must match exactly
]


@pytest.mark.parametrize("text,expected", [(t, p) for t, _, p in CASES] + [("No!", "yes"), ("NO.", "yes"),
                                                                            ("no,", "no")])
def test_parse_follows_pope_evaluate(text, expected):
    assert parse_pope_answer(text) == expected


def _answers():
    return [{"question_id": i, "text": t, "label": label} for i, (t, label, _) in enumerate(CASES)]


def test_scores_match_hand_computed_confusion():
    # predictions: y n y n n y y y ; labels: y y y n n n y n
    s = score_pope_answers(_answers())
    assert (s.tp, s.fn, s.tn, s.fp) == (3, 1, 2, 2)
    assert s.num_questions == 8
    assert s.accuracy == pytest.approx(5 / 8)
    assert s.precision == pytest.approx(3 / 5)
    assert s.recall == pytest.approx(3 / 4)
    assert s.f1 == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert s.yes_ratio == pytest.approx(5 / 8)


def test_labels_from_question_file_join_on_question_id():
    answers = [{"question_id": a["question_id"], "text": a["text"]} for a in reversed(_answers())]
    questions = [{"question_id": i, "image": "x.png", "text": "q", "label": label} for i, (_, label, _) in
                 enumerate(CASES)]
    assert score_pope_answers(answers, questions) == score_pope_answers(_answers())
    with pytest.raises(EvalDataError, match="unanswered \\[0\\]"):
        score_pope_answers(answers[:-1], questions)


def test_bad_label_is_reported_with_its_question():
    with pytest.raises(EvalDataError, match="question 3 has label 'maybe'"):
        score_pope_answers([{"question_id": 3, "text": "yes", "label": "maybe"}])


def test_no_yes_predictions_give_zero_precision_not_an_error():
    s = score_pope_answers([{"question_id": 0, "text": "no", "label": "yes"},
                            {"question_id": 1, "text": "no", "label": "no"}])
    assert (s.precision, s.recall, s.f1, s.accuracy, s.yes_ratio) == (0.0, 0.0, 0.0, 0.5, 0.0)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_splits_from_file_names_and_from_category(tmp_path):
    q = lambda i, label, **kw: {"question_id": i, "image": f"{i}.png", "text": "Is there a cat?", "label": label, **kw}
    for split in ("random", "popular", "adversarial"):
        _write(tmp_path / f"coco_pope_{split}.json", [q(0, "yes"), q(1, "no")])
    (tmp_path / "unrelated.json").write_text("{}")
    assert split_name("coco_pope_adversarial.json") == "adversarial"
    assert sorted(discover_pope_files([tmp_path])) == ["adversarial", "popular", "random"]

    (tmp_path / "combined").mkdir()
    combined = _write(tmp_path / "combined" / "llava_pope_test.jsonl",
                      [q(0, "yes", category="random"), q(1, "no", category="popular"), q(2, "no", category="random")])
    splits = load_pope_splits([combined])
    assert {k: [x["question_id"] for x in v] for k, v in splits.items()} == {"random": [0, 2], "popular": [1]}


def test_missing_pope_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        discover_pope_files([tmp_path / "nothere.jsonl"])
