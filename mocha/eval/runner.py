"""Answer evaluation questions with a MoCHA model: one process for small sets, Ray Data for large.

Each question becomes one human turn, ``"<image>\\n" + text + suffix``, rendered with the
model's conversation template and closed with the assistant role (the prompt LLaVA's
``model_vqa_loader`` builds). The default suffix is LLaVA's short-answer instruction
(``"\\nAnswer the question using a single word or phrase."``), which LLaVA's POPE and MME question
files carry; it is not added twice, and ``suffix=""`` asks the bare question (what a model
trained without that instruction expects).

Prompts are left-padded into batches (the model generates after the last prompt token of
every row), so a batch gives the same greedy answers as one question at a time.

Both paths produce the same answer records (LLaVA's format, :mod:`mocha.eval.records`) in
question order, and both can hand them over as they are generated (``iter_answers``,
``iter_answers_with_ray``): the Ray path splits the questions into batches with ``map_batches``
over an actor pool whose actors each load the model once, and releases answers in question
order as soon as every earlier one has arrived.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mocha.eval.records import SHORT_ANSWER_INSTRUCTION, answer_record
from mocha.text.conversation import IMAGE_TOKEN, tokenize_prompt

SHORT_ANSWER_SUFFIX = "\n" + SHORT_ANSWER_INSTRUCTION


@dataclass(frozen=True)
class AnswerOptions:
    """How questions are asked and answered.

    Attributes:
        suffix: appended to every question (unless it already ends with it).
        max_new_tokens: answer length limit.
        do_sample / temperature / top_p: decoding (greedy by default, deterministic).
        batch_size: questions per generate call (and per Ray Data batch).
        model_id: written into every answer record.
    """

    suffix: str = SHORT_ANSWER_SUFFIX
    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    model_id: str = "mocha"

    def __post_init__(self):
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}")


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class VisualQuestionAnswerer:
    """A model + tokenizer that answers (image, question) pairs in batches. Puts the model in
    eval mode (no dropout); ``template`` defaults to the model config's."""

    def __init__(self, model, tokenizer, options: AnswerOptions = AnswerOptions(), template: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.options = options
        self.template = template or model.config.template
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, directory: str | Path, options: AnswerOptions = AnswerOptions(),
                        device: str = "cpu") -> "VisualQuestionAnswerer":
        from mocha.export.pretrained import load_pretrained

        model, tokenizer = load_pretrained(directory, device=device)
        return cls(model, tokenizer, options)

    def question_prompt(self, text: str) -> str:
        """The human turn for a question: image placeholder, question, suffix."""
        suffix = self.options.suffix
        if suffix and not text.endswith(suffix):
            text = text + suffix
        return f"{IMAGE_TOKEN}\n{text}"

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt):] = torch.tensor(prompt)
            mask[row, length - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def answer_images(self, images: list, human_turns: list[str]) -> list[str]:
        """Answers (decoded, stripped) for one batch of PIL images and human turns that each
        hold one ``<image>`` placeholder."""
        if len(images) != len(human_turns):
            raise ValueError(f"{len(images)} images for {len(human_turns)} prompts")
        prompts = [tokenize_prompt([{"from": "human", "value": turn}], self.tokenizer, self.template,
                                   image_token_first=self.model.config.image_token_first)
                   for turn in human_turns]
        ids, mask = self._left_padded(prompts)
        pixels = [self.model.preprocess(image) for image in images]
        pixel_values = {k: torch.stack([p[k] for p in pixels]).to(self.device) for k in pixels[0]}
        opts = self.options
        new_ids = self.model.generate(ids, mask, pixel_values=pixel_values, max_new_tokens=opts.max_new_tokens,
                                      do_sample=opts.do_sample, temperature=opts.temperature, top_p=opts.top_p,
                                      eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return [text.strip() for text in self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]

    def iter_answers(self, questions: Sequence[dict], image_root: str | Path) -> Iterator[dict]:
        """Answer records for ``questions``, in order, yielded batch by batch as generated."""
        for batch in _batches(questions, self.options.batch_size):
            images = [open_image(image_root, q) for q in batch]
            texts = self.answer_images(images, [self.question_prompt(q["text"]) for q in batch])
            yield from (answer_record(q, text, self.options.model_id) for q, text in zip(batch, texts))

    def answer(self, questions: Sequence[dict], image_root: str | Path, progress: bool = False) -> list[dict]:
        """Answer records for ``questions`` (in order)."""
        from tqdm import tqdm

        records: list[dict] = []
        with tqdm(total=len(questions), desc="answering", unit=" questions", disable=not progress) as bar:
            for record in self.iter_answers(questions, image_root):
                records.append(record)
                bar.update()
        return records


def open_image(image_root: str | Path, question: dict):
    from mocha.images import open_rgb

    path = Path(image_root) / question["image"]
    if not path.is_file():
        raise FileNotFoundError(f"question {question['question_id']!r}: image {path} not found")
    return open_rgb(path)


# ----------------------------------------------------------------------------- Ray Data


class _AnswerActor:
    """Ray Data actor: loads the model once, answers one batch of serialised questions per call."""

    def __init__(self, model_dir: str, image_root: str, options: dict, device: str):
        torch.set_num_threads(1)
        self.image_root = image_root
        self.qa = VisualQuestionAnswerer.from_pretrained(model_dir, AnswerOptions(**options), device=device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        questions = [json.loads(q) for q in batch["question"]]
        records = self.qa.answer(questions, self.image_root)
        return {"index": batch["index"], "answer": np.array([json.dumps(r) for r in records], dtype=object)}


def iter_answers_with_ray(model_dir: str | Path, questions: Sequence[dict], image_root: str | Path,
                          options: AnswerOptions = AnswerOptions(), concurrency: int = 1, num_cpus: float = 1,
                          num_gpus: float = 0) -> Iterator[dict]:
    """The answers of :meth:`VisualQuestionAnswerer.iter_answers`, computed on the running Ray
    cluster by ``concurrency`` actors (each with ``num_cpus``/``num_gpus``) that load
    ``model_dir`` (a pretrained directory every node can read) once each; yielded in question
    order as soon as every earlier answer has arrived."""
    import ray.data

    if not questions:
        return
    items = [{"index": i, "question": json.dumps(q)} for i, q in enumerate(questions)]
    answered = ray.data.from_items(items).map_batches(
        _AnswerActor,
        fn_constructor_kwargs={"model_dir": str(model_dir), "image_root": str(image_root), "options": asdict(options),
                               "device": "cuda" if num_gpus else "cpu"},
        batch_size=options.batch_size, batch_format="numpy", concurrency=concurrency,
        num_cpus=num_cpus, num_gpus=num_gpus,
    )
    waiting: dict[int, dict] = {}
    released = 0
    for row in answered.iter_rows():
        waiting[int(row["index"])] = json.loads(row["answer"])
        while released in waiting:
            yield waiting.pop(released)
            released += 1
    if released != len(items):
        raise RuntimeError(f"Ray Data returned {released + len(waiting)} answers for {len(items)} questions")


def answer_with_ray(model_dir: str | Path, questions: Sequence[dict], image_root: str | Path,
                    options: AnswerOptions = AnswerOptions(), concurrency: int = 1, num_cpus: float = 1,
                    num_gpus: float = 0, progress: bool = False) -> list[dict]:
    """All answers of :func:`iter_answers_with_ray`, as a list."""
    from tqdm import tqdm

    records: list[dict] = []
    with tqdm(total=len(questions), desc="answering (ray)", unit=" questions", disable=not progress) as bar:
        for record in iter_answers_with_ray(model_dir, questions, image_root, options, concurrency, num_cpus, num_gpus):
            records.append(record)
            bar.update()
    return records
