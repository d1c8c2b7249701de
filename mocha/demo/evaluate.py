"""Demo evaluation: POPE + MME on the held-out split, for the model before and after MoCHA training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mocha.demo.synthetic import DatasetPaths

#: The demo's questions are asked exactly as its stage-2 conversations ask them (no
#: "Answer ... single word" suffix, which the tiny model never saw).
DEMO_SUFFIX = ""


def _answerer(model, tokenizer):
    from mocha.eval.runner import AnswerOptions, VisualQuestionAnswerer

    return VisualQuestionAnswerer(model, tokenizer, AnswerOptions(suffix=DEMO_SUFFIX, max_new_tokens=6, batch_size=32,
                                                                  model_id="mocha-demo"))


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


def evaluate_model(export_dir: str | None, model_config, tokenizer_dir, paths: DatasetPaths, out_dir: Path,
                   seed: int = 0) -> dict[str, Any]:
    """Answer and score POPE (3 splits) and MME; returns scores plus headline numbers."""
    from mocha.eval.suite import load_suite, run_suite

    model, tokenizer = load_or_build(export_dir, model_config, tokenizer_dir, seed)
    vqa = _answerer(model, tokenizer)
    suite = load_suite(pope=[paths.pope[s] for s in sorted(paths.pope)], mme=paths.mme_dir)
    scores = run_suite(suite, lambda questions: vqa.answer(questions, paths.image_dir, progress=True), out_dir)
    splits = scores["pope"]
    overall = sum(s["accuracy"] for s in splits.values()) / len(splits)
    mme_total = sum(t for t in scores["mme"]["totals"].values())
    per_split = ", ".join(f"{name} {split['accuracy']:.1%}" for name, split in splits.items())
    print(f"[demo] POPE accuracy {overall:.1%} ({per_split}); MME total {mme_total:.1f}")
    return {"scores": scores, "pope_accuracy": overall, "mme_total": mme_total, "answers_dir": str(out_dir)}


def sample_answers(export_dir: str, paths: DatasetPaths, n: int = 4) -> list[dict[str, str]]:
    """A few generated answers to held-out stage-2 questions, next to the reference answers."""
    from PIL import Image

    model, tokenizer = load_or_build(export_dir)
    vqa = _answerer(model, tokenizer)
    records = json.loads(Path(paths.stage2_eval).read_text())[:n]
    images = [Image.open(paths.image_dir / r["image"]).convert("RGB") for r in records]
    turns = [r["conversations"][0]["value"] for r in records]
    answers = vqa.answer_images(images, turns)
    return [{"image": r["image"], "question": t.replace("<image>\n", ""), "answer": a,
             "reference": r["conversations"][1]["value"]} for r, t, a in zip(records, turns, answers)]
