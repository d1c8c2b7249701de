"""Demo evaluation: POPE + MME on the held-out split, for the model before and after MoCHA training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mocha.demo.synthetic import DatasetPaths
from mocha.text.conversation import IMAGE_TOKEN

def _answerer(model, tokenizer):
    """Questions are asked as LLaVA-1.5 asks POPE and MME: the question, then "Answer the
    question using a single word or phrase." (the stage-2 short-answer VQA form)."""
    from mocha.eval.runner import SHORT_ANSWER_SUFFIX, AnswerOptions, VisualQuestionAnswerer

    return VisualQuestionAnswerer(model, tokenizer, AnswerOptions(suffix=SHORT_ANSWER_SUFFIX, max_new_tokens=6,
                                                                  batch_size=32, model_id="mocha-demo"))


def load_or_build(export_dir: str | None, model_config=None, tokenizer_dir=None, seed: int = 0):
    """The trained export, or (``export_dir=None``) the same architecture freshly initialised
    exactly as training initialises it (same seed): the before-training baseline."""
    from mocha.export.pretrained import load_pretrained

    if export_dir is not None:
        return load_pretrained(export_dir)
    from mocha.model.mocha import MochaModel
    from mocha.text.tokenizer import load_tokenizer
    from mocha.train.loop import seed_everything

    tokenizer = load_tokenizer(tokenizer_dir)
    seed_everything(seed)
    return MochaModel(model_config, vocab_size=len(tokenizer)).eval(), tokenizer


def example_questions(paths: DatasetPaths, num_images: int = 4) -> list[dict[str, str]]:
    """Questions for the report's page of examples: the short-answer VQA questions of the first
    ``num_images`` held-out images (``stage2_eval.json``), each with its reference answer."""
    records = [r for r in json.loads(Path(paths.stage2_eval).read_text()) if r["id"].endswith("_vqa")][:num_images]
    return [{"image": r["image"], "question": human["value"].replace(f"{IMAGE_TOKEN}\n", ""), "reference": gpt["value"]}
            for r in records for human, gpt in zip(r["conversations"][::2], r["conversations"][1::2])]


def answer_examples(vqa, paths: DatasetPaths, examples: list[dict[str, str]]) -> list[str]:
    """Each example question asked on its own about its image (greedy)."""
    from PIL import Image

    answers: list[str] = []
    for start in range(0, len(examples), 32):
        batch = examples[start:start + 32]
        images = [Image.open(paths.image_dir / e["image"]).convert("RGB") for e in batch]
        answers += vqa.answer_images(images, [vqa.question_prompt(e["question"]) for e in batch])
    return answers


def evaluate_model(export_dir: str | None, model_config, tokenizer_dir, paths: DatasetPaths, out_dir: Path,
                   seed: int = 0, examples: list[dict[str, str]] = ()) -> dict[str, Any]:
    """Answer and score POPE (3 splits) and MME, and answer ``examples``
    (:func:`example_questions`); returns scores, headline numbers and the example answers."""
    from mocha.eval.suite import load_suite, run_suite

    model, tokenizer = load_or_build(export_dir, model_config, tokenizer_dir, seed)
    vqa = _answerer(model, tokenizer)
    example_answers = answer_examples(vqa, paths, list(examples))
    suite = load_suite(pope=[paths.pope[s] for s in sorted(paths.pope)], mme=paths.mme_dir)
    scores = run_suite(suite, lambda questions: vqa.answer(questions, paths.image_dir, progress=True), out_dir)
    splits = scores["pope"]
    overall = sum(s["accuracy"] for s in splits.values()) / len(splits)
    mme_total = sum(t for t in scores["mme"]["totals"].values())
    per_split = ", ".join(f"{name} {split['accuracy']:.1%}" for name, split in splits.items())
    print(f"[demo] POPE accuracy {overall:.1%} ({per_split}); MME total {mme_total:.1f}")
    return {"scores": scores, "pope_accuracy": overall, "mme_total": mme_total, "answers_dir": str(out_dir),
            "example_answers": example_answers}
