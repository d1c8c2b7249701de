"""Answer generation: prompts, left-padded batches, record format, Ray Data path."""

from __future__ import annotations

import pytest

from mocha.eval.runner import SHORT_ANSWER_SUFFIX, AnswerOptions, VisualQuestionAnswerer, answer_with_ray
from tests.eval_models import save_tiny_pretrained, write_images

QUESTIONS = ["Is there a red circle in the image?", "What colour is the triangle?",
             "Is there a blue square in the image?" + SHORT_ANSWER_SUFFIX, "Yes?", "How many?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_tiny_pretrained(root / "model")
    images = write_images(root / "images", 3)
    questions = [{"question_id": f"q{i}", "image": images[i % 3], "text": text, "label": "yes" if i % 2 else "no",
                  "category": "random"} for i, text in enumerate(QUESTIONS)]
    return root, questions


def test_question_prompt_adds_suffix_once(setup):
    root, _ = setup
    qa = VisualQuestionAnswerer.from_pretrained(root / "model")
    assert qa.question_prompt("Is it red?") == "<image>\nIs it red?" + SHORT_ANSWER_SUFFIX
    assert qa.question_prompt("Is it red?" + SHORT_ANSWER_SUFFIX) == "<image>\nIs it red?" + SHORT_ANSWER_SUFFIX
    bare = VisualQuestionAnswerer(qa.model, qa.tokenizer, AnswerOptions(suffix=""))
    assert bare.question_prompt("Is it red?") == "<image>\nIs it red?"


def test_batched_answers_equal_one_at_a_time(setup):
    root, questions = setup
    options = AnswerOptions(max_new_tokens=6, batch_size=len(questions), model_id="tiny")
    batched = VisualQuestionAnswerer.from_pretrained(root / "model", options).answer(questions, root / "images")
    single = VisualQuestionAnswerer.from_pretrained(root / "model", AnswerOptions(max_new_tokens=6, batch_size=1,
                                                                                   model_id="tiny"))
    one_by_one = single.answer(questions, root / "images")
    assert batched == one_by_one
    texts = [r["text"] for r in batched]
    assert len(set(texts)) > 1, f"the tiny model should answer different questions differently: {texts}"
    # LLaVA's answer format: these keys in this order, the question's other fields in metadata
    assert list(batched[2]) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert {k: v for k, v in batched[2].items() if k != "answer_id"} == {
        "question_id": "q2", "prompt": QUESTIONS[2], "text": texts[2], "model_id": "tiny",
        "metadata": {"image": "img_2.png", "label": "no", "category": "random"}}
    assert len({r["answer_id"] for r in batched}) == len(batched)


def test_missing_image_is_named(setup):
    root, questions = setup
    qa = VisualQuestionAnswerer.from_pretrained(root / "model", AnswerOptions(max_new_tokens=2))
    with pytest.raises(FileNotFoundError, match="question 'q0': image .*nope.png"):
        qa.answer([{**questions[0], "image": "nope.png"}], root / "images")


@pytest.mark.slow
def test_ray_data_path_gives_the_same_answers(setup, ray_cluster):
    root, questions = setup
    options = AnswerOptions(max_new_tokens=6, batch_size=2, model_id="tiny")
    local = VisualQuestionAnswerer.from_pretrained(root / "model", options).answer(questions, root / "images")
    distributed = answer_with_ray(root / "model", questions, root / "images", options, concurrency=1)
    assert distributed == local


def test_eval_cli_writes_answers_and_scores_them(setup, tmp_path, capsys):
    import json

    from mocha.cli import main
    from mocha.demo.synthetic import generate_shapes_dataset
    from mocha.eval.mme import read_mme_dir, score_mme
    from mocha.eval.pope import score_pope_answers
    from mocha.eval.records import read_jsonl

    root, _ = setup
    data = generate_shapes_dataset(tmp_path / "data", num_train=1, num_eval=2)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(root / "model"), "--pope", str(data.root), "--mme", str(data.mme_dir),
                 "--images", str(data.image_dir), "--out", str(out), "--suffix", "", "--max-new-tokens", "3",
                 "--model-id", "tiny"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert sorted(scores["pope"]) == ["adversarial", "popular", "random"]
    for split, path in data.pope.items():
        answers = read_jsonl(out / f"pope_{split}_answers.jsonl")
        questions = read_jsonl(path)
        assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
        assert [a["prompt"] for a in answers] == [q["text"] for q in questions]
        assert {a["model_id"] for a in answers} == {"tiny"}
        assert scores["pope"][split] == score_pope_answers(answers, questions).as_dict()
    # MME answers in MME's own layout: the question files' lines plus a prediction column
    answered = read_mme_dir(out / "mme_results")
    asked = read_mme_dir(data.mme_dir)
    assert [(r.subtask, r.image, r.question, r.label) for r in answered] == \
           [(r.subtask, r.image, r.question, r.label) for r in asked]
    assert scores["mme"] == score_mme(answered).as_dict()
    printed = capsys.readouterr().out
    assert "| split | questions | accuracy % |" in printed and "perception total" in printed


def test_eval_cli_reports_bad_question_file(setup, tmp_path, capsys):
    from mocha.cli import main

    root, _ = setup
    bad = tmp_path / "pope_random.jsonl"
    bad.write_text('{"question_id": 0, "image": "a.png", "text": "Is there a dog?", "label": "no"}\n'
                   '{"question_id": 1, "image": "a.png", "text": "Is there a cat?"}\n')
    args = ["eval", "--model", str(root / "model"), "--pope", str(bad), "--images", str(tmp_path),
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "question 1 has label None" in capsys.readouterr().err
    # no label at all: LLaVA's test file, which needs POPE's annotation files beside it
    bad.write_text('{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "category": "random"}\n')
    assert main(args) == 2
    assert "has no labels: give POPE's annotation files too" in capsys.readouterr().err
    assert main([*args[:3], "--mme", str(bad), *args[5:]]) == 2
    assert "has no labels: give the MME benchmark folder too" in capsys.readouterr().err


def test_eval_cli_on_llava_files_with_limit_then_resume(setup, tmp_path, capsys):
    import json

    from mocha.cli import main
    from mocha.eval.records import read_jsonl
    from tests.llava_eval_files import (calculation_reference, convert_answer_to_mme_reference,
                                        eval_pope_reference, write_llava_eval_files)

    root, _ = setup
    files = write_llava_eval_files(tmp_path / "data", pope_per_category=4)
    # --images serves POPE; MME's images stay those of its benchmark folder
    out = tmp_path / "eval"
    args = ["eval", "--model", str(root / "model"), "--out", str(out), "--max-new-tokens", "3", "--model-id", "tiny",
            "--pope", str(files.pope_questions), str(files.pope_annotations), "--images", str(files.pope_images),
            "--mme", str(files.mme_questions), str(files.mme_root)]
    assert main([*args, "--limit", "2"]) == 0
    err = capsys.readouterr().err
    assert "questions/s" in err  # the progress bar reports its rate
    assert len(read_jsonl(out / "pope_answers.jsonl")) == 6 and len(read_jsonl(out / "mme_answers.jsonl")) == 6

    assert main(args) == 0  # resumes: only the questions the limited run left
    printed = capsys.readouterr().out
    assert "resuming: 12 answers already in" in printed and "12 questions to go" in printed
    scores = json.loads((out / "scores.json").read_text())
    answers, questions = read_jsonl(out / "pope_answers.jsonl"), read_jsonl(files.pope_questions)
    for category in ("adversarial", "random", "popular"):  # in input order within each category
        assert [a["question_id"] for a in answers if a["metadata"]["category"] == category] == \
               [q["question_id"] for q in questions if q["category"] == category]
    reference = eval_pope_reference(files.pope_annotations, files.pope_questions, out / "pope_answers.jsonl")
    assert {c: r["accuracy"] for c, r in reference.items()} == {c: s["accuracy"] for c, s in scores["pope"].items()}
    mme = calculation_reference(convert_answer_to_mme_reference(files.mme_root, out / "mme_answers.jsonl"))
    assert mme == {s: v["score"] for s, v in scores["mme"]["subtasks"].items()}
    assert "| split | questions | accuracy % |" in printed and "perception total" in printed

    assert main([*args, "--max-new-tokens", "4"]) == 2  # other settings: not mixed into these answers
    assert "another model or settings (decoding differ" in capsys.readouterr().err
