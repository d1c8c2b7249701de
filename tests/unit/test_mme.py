"""MME scoring against hand-computed numbers, in MME's file layout and from answer JSONL."""

from __future__ import annotations

import pytest

from mocha.eval.mme import (mme_from_answers, mme_to_questions, parse_mme_answer, read_mme_dir, score_mme,
                            write_mme_results)
from mocha.eval.records import EvalDataError

# subtask -> lines (image, question, ground truth, prediction); two consecutive lines per image.
RESULTS = {
    "existence": [
        ("a.png", "Is there a cat? Please answer yes or no.", "Yes", "Yes"),
        ("a.png", "Is there a dog? Please answer yes or no.", "No", "No, it is not."),
        ("b.png", "Is there a cat? Please answer yes or no.", "Yes", "There is"),  # "other": wrong
        ("b.png", "Is there a dog? Please answer yes or no.", "No", "no"),
        ("c.png", "Is there a cat? Please answer yes or no.", "Yes", "yes, yes"),
        ("c.png", "Is there a dog? Please answer yes or no.", "No", "Not really"),  # "not " contains "no"
    ],
    "count": [
        ("d.png", "Are there 2 shapes? Please answer yes or no.", "Yes", "No"),
        ("d.png", "Are there 3 shapes? Please answer yes or no.", "No", "No"),
    ],
    "code_reasoning": [
        ("e.png", "Does it print 1? Please answer yes or no.", "Yes", "yes"),
        ("e.png", "Does it print 2? Please answer yes or no.", "No", "yes"),
    ],
}


@pytest.mark.parametrize("text,expected", [("yes", "yes"), ("No", "no"), ("Yes.", "yes"), ("no,", "no"),
                                           ("Knowing it, yes", "no"), ("I think yes", "other"), ("", "other")])
def test_parse_follows_mme_calculation(text, expected):
    assert parse_mme_answer(text) == expected


def _write_results(directory):
    directory.mkdir()
    for subtask, lines in RESULTS.items():
        (directory / f"{subtask}.txt").write_text("".join("\t".join(line) + "\n" for line in lines))
    return directory


def _check_hand_computed(scores):
    ex = scores.subtasks["existence"]
    # 5 of 6 questions right; images a and c fully right, b not.
    assert (ex.num_questions, ex.num_images, ex.other) == (6, 3, 1)
    assert ex.accuracy == pytest.approx(5 / 6)
    assert ex.accuracy_plus == pytest.approx(2 / 3)
    assert ex.score == pytest.approx(150.0)
    assert scores.subtasks["count"].score == pytest.approx(50.0)
    assert scores.subtasks["code_reasoning"].score == pytest.approx(50.0)
    assert list(scores.subtasks) == ["existence", "count", "code_reasoning"]  # MME's order
    assert scores.totals == pytest.approx({"perception": 200.0, "cognition": 50.0})


def test_scores_from_mme_layout(tmp_path):
    _check_hand_computed(score_mme(read_mme_dir(_write_results(tmp_path / "results"))))


def test_scores_from_answer_jsonl_records_and_layout_round_trip(tmp_path):
    rows = read_mme_dir(_write_results(tmp_path / "results"))
    questions = mme_to_questions(rows)
    assert questions[1] == {"question_id": "existence/1", "image": "a.png", "text": RESULTS["existence"][1][1],
                            "label": "No", "category": "existence"}
    # answer records as the runner writes them: question text in "prompt", answer in "text"
    answers = [{"question_id": q["question_id"], "prompt": q["text"], "text": r.prediction, "model_id": "m",
                **{k: q[k] for k in ("image", "label", "category")}} for q, r in zip(questions, rows)]
    _check_hand_computed(score_mme(mme_from_answers(answers)))
    write_mme_results(mme_from_answers(answers), tmp_path / "written")
    assert (tmp_path / "written" / "count.txt").read_text() == (tmp_path / "results" / "count.txt").read_text()


def test_questions_without_predictions_read_as_unanswered(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "color.txt").write_text("a.png\tRed?\tYes\na.png\tBlue?\tNo\n")
    rows = read_mme_dir(tmp_path / "q")
    assert [r.prediction for r in rows] == [None, None]
    with pytest.raises(EvalDataError, match="no prediction"):
        score_mme(rows)


def test_layout_errors_are_named(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "color.txt").write_text("a.png\tRed?\tYes\tyes\nb.png\tBlue?\tNo\tno\n")
    with pytest.raises(EvalDataError, match="different images"):
        score_mme(read_mme_dir(bad))
    (bad / "color.txt").write_text("a.png\tRed?\tYes\tyes\n")
    with pytest.raises(EvalDataError, match="two per image"):
        score_mme(read_mme_dir(bad))
    (bad / "color.txt").write_text("a.png\tRed?\n")
    with pytest.raises(EvalDataError, match="color.txt:1"):
        read_mme_dir(bad)
    (bad / "color.txt").unlink()
    (bad / "shapes.txt").write_text("a.png\tRed?\tYes\tyes\na.png\tBlue?\tNo\tno\n")
    with pytest.raises(EvalDataError, match="unknown MME subtask 'shapes'"):
        read_mme_dir(bad)
