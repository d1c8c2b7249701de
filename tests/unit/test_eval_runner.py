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
    assert batched[2] == {"question_id": "q2", "prompt": QUESTIONS[2], "text": texts[2], "model_id": "tiny",
                          "image": "img_2.png", "label": "no", "category": "random"}


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
