"""Text pre-training of the demo's tiny LLM: the demo's stand-in for Phi-2's pre-training.

Why the demo needs it. LLaVA-style stage 1 trains only the connectors against a *frozen* LLM:
it can only align visual tokens with text the LLM already knows how to read. Real MoCHA starts
from Phi-2 or Vicuna; a randomly initialised LLM reads nothing, so stage 1 has nothing to align
to. Measured on the demo data (2-layer, width-128 Phi, batch 16): with a random LLM the stage-1
caption loss stays at 6.5 (ln of the vocabulary is 6.2-6.9) for 300 steps. With this
pre-training it falls below 1 within 50 steps, and the model then ranks a held-out image's true
caption above a caption with one object swapped for an absent one 80% of the time after 300
stage-1 steps (53% before).

What it learns. Text only, no images: random scenes (:func:`mocha.demo.synthetic.sample_scene`,
the same generator the dataset uses, with a different seed) written as a line of text
("In the image: a red circle and a blue square."), followed by

- a caption of the scene (the stage-1 form: description, then caption, as ``<image>`` then
  caption), or
- a multi-turn conversation about it in the stage-2 template: existence, colour, shape and count
  questions and yes/no questions in MME's forms (:func:`mocha.demo.synthetic.instruction_turns`
  without left/right, which an unordered description cannot answer), the description standing
  where the image goes.

So the LLM learns to read a list of objects from its context and to describe it or answer
questions about it: the skills a pre-trained LLM brings. Whether an object is in an *image* is
still only answerable once stages 1 and 2 teach the connectors to put the image's objects into
the visual tokens. Held-out images and their scenes are never used here.

How much it learns decides the demo. Measured (held-out yes/no accuracy on 512 described scenes
after 1,000 steps of batch 32): lr 3e-3 with half the examples captions gave 76-89% in different runs
(the look-up -- is the asked colour in the description -- appears late, after
~600 steps, and did not always finish); lr 6e-3 never found it (53% at 800 steps); lr 2e-3 with
one example in ten a caption gave 99-100% with the default demo's tokenizer but 58% with the
reduced test demo's; lr 1e-3 with one caption in ten gives 92-99% at 600 steps and 100% at
1,000 with both tokenizers -- the defaults. Captions carry no yes/no signal (and their
left-to-right order is not in the unordered description), so the defaults spend the steps on
conversations. Stages 1 and 2 can only be as good as this look-up: with the 76% LLM the trained
demo reached 65% on POPE, with the 100% ones 91% (lr 2e-3) and 96% (lr 1e-3).

The result is saved with ``save_pretrained`` and loaded by the demo's jobs through
``llm.pretrained`` (a local directory), the same ``from_pretrained`` path that loads Phi-2.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mocha.config import LLMConfig, StrictModel
from mocha.demo.synthetic import (ALL_OBJECT_NAMES, Scene, caption, existence_question, instruction_turns,
                                  join_objects, sample_scene)
from mocha.model.llm import build_llm
from mocha.model.mocha import causal_lm_loss
from mocha.text.conversation import IMAGE_TOKEN, tokenize_conversation
from mocha.train.data import IGNORE_INDEX, Example, collate
from mocha.train.engine import warmup_cosine_schedule

#: Written next to the weights; a directory whose record matches the request is reused.
RECORD_NAME = "pretrain.json"
_SCENE_IMAGE_SIZE = 64  # boxes only decide caption order (left to right); nothing is drawn


class LLMPretrainConfig(StrictModel):
    """Text pre-training of the tiny LLM (see the module docstring)."""

    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=50, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    caption_share: float = Field(default=0.1, ge=0, le=1, description="share of caption examples (the rest: conversations)")
    template: str = Field(default="phi", description="conversation template of the stage-2 form")
    max_length: int = Field(default=256, gt=0)
    eval_questions: int = Field(default=256, ge=2, description="held-out yes/no questions scored at the end")
    seed: int = 0


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """The scene as one line of text, objects in random order (not the caption's left-to-right)."""
    return f"In the image: {join_objects([scene.objects[i].name for i in rng.permutation(len(scene.objects))])}."


class TextExamples:
    """An endless, seeded stream of tokenised pre-training examples."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: LLMPretrainConfig, seed: int):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.rng = np.random.default_rng(seed)

    def scene(self) -> Scene:
        return Scene(image="", split="text", objects=sample_scene(self.rng, _SCENE_IMAGE_SIZE))

    def caption_example(self) -> Example:
        scene = self.scene()
        prefix = self.tokenizer(describe(scene, self.rng), add_special_tokens=False).input_ids
        body = self.tokenizer(caption(scene, self.rng) + "\n", add_special_tokens=False).input_ids
        return Example(None, prefix + body, [IGNORE_INDEX] * len(prefix) + body, "ok")

    def conversation_example(self) -> Example:
        scene = self.scene()
        turns = instruction_turns(scene, self.rng, positional=False)  # the description has no left/right
        turns[0] = {**turns[0], "value": turns[0]["value"].replace(IMAGE_TOKEN, describe(scene, self.rng), 1)}
        return self.tokenize(turns)

    def tokenize(self, turns: list[dict[str, str]]) -> Example:
        t = tokenize_conversation(turns, self.tokenizer, self.cfg.template, max_length=self.cfg.max_length,
                                  num_image_tokens=0)
        return Example(None, t.input_ids, t.labels, t.status)

    def __iter__(self) -> Iterator[Example]:
        while True:
            yield self.caption_example() if self.rng.random() < self.cfg.caption_share else self.conversation_example()

    def existence_questions(self, n: int) -> list[tuple[Example, bool]]:
        """``n`` single-turn existence questions about described scenes, every other one answered yes."""
        out = []
        for i in range(n):
            scene, yes = self.scene(), i % 2 == 0
            pool = [o.name for o in scene.objects] if yes else [k for k in ALL_OBJECT_NAMES if k not in scene.names]
            question = existence_question(pool[int(self.rng.integers(len(pool)))])
            conv = [{"from": "human", "value": f"{describe(scene, self.rng)}\n{question}"},
                    {"from": "gpt", "value": "Yes." if yes else "No."}]
            out.append((self.tokenize(conv), yes))
        return out


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: LLMPretrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The training jobs' schedule: linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    return warmup_cosine_schedule(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)(optimizer)


@torch.no_grad()
def yes_no_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    questions: list[tuple[Example, bool]], batch_size: int = 64) -> float:
    """Share of questions whose first answer token scores " Yes" above " No" as it should."""
    yes_id, no_id = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" Yes", " No"))
    was_training = model.training
    model.eval()
    right = 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        batch = collate([e for e, _ in chunk], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        answer_at = (batch.labels != IGNORE_INDEX).float().argmax(dim=1) - 1  # predicts the first answer token
        scores = logits[torch.arange(len(chunk)), answer_at]
        said_yes = scores[:, yes_id] > scores[:, no_id]
        right += sum(int(s == y) for s, (_, y) in zip(said_yes.tolist(), chunk))
    model.train(was_training)
    return right / len(questions)


def _request_key(llm: LLMConfig, tokenizer_dir: Path, cfg: LLMPretrainConfig) -> str:
    tokenizer_hash = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    blob = json.dumps({"llm": llm.model_dump(), "tokenizer": tokenizer_hash, "pretrain": cfg.model_dump()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def pretrain_llm(llm: LLMConfig, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: str | Path, out_dir: str | Path,
                 cfg: LLMPretrainConfig) -> dict[str, Any]:
    """Pre-train the random ``llm`` on text (module docstring) and ``save_pretrained`` it to
    ``out_dir``. Returns the record written to ``out_dir/pretrain.json``: steps, final loss,
    held-out yes/no accuracy before and after, seconds. A directory already holding a record of
    the same request (LLM config, tokenizer file, pre-training config) is reused as it is."""
    if llm.pretrained is not None:
        raise ValueError(f"pretrain_llm starts from a random LLM; got llm.pretrained={llm.pretrained!r}")
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    key = _request_key(llm, tokenizer_dir, cfg)
    record_path = out_dir / RECORD_NAME
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            print(f"[pretrain-llm] reusing {out_dir} (same LLM, tokenizer and settings)", flush=True)
            return record

    torch.manual_seed(cfg.seed)
    model = build_llm(llm, vocab_size=len(tokenizer))
    model.train()
    held_out = TextExamples(tokenizer, cfg, seed=cfg.seed + 1).existence_questions(cfg.eval_questions)
    accuracy_before = yes_no_accuracy(model, tokenizer, held_out)
    stream = iter(TextExamples(tokenizer, cfg, seed=cfg.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = lr_schedule(optimizer, cfg)

    start = time.perf_counter()
    losses: list[float] = []
    progress = tqdm(range(cfg.steps), desc="pre-training the tiny LLM on text", unit="step")
    for step in progress:
        batch = collate([next(stream) for _ in range(cfg.batch_size)], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = causal_lm_loss(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 25 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
    seconds = time.perf_counter() - start
    accuracy_after = yes_no_accuracy(model, tokenizer, held_out)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    record = {"key": key, "steps": cfg.steps, "batch_size": cfg.batch_size, "seconds": round(seconds, 1),
              "first_loss": round(losses[0], 4), "final_loss": round(float(np.mean(losses[-25:])), 4),
              "yes_no_accuracy_before": round(accuracy_before, 4), "yes_no_accuracy_after": round(accuracy_after, 4),
              "eval_questions": len(held_out), "config": cfg.model_dump()}
    record_path.write_text(json.dumps(record, indent=2))
    print(f"[pretrain-llm] {cfg.steps} steps in {seconds:.0f} s: loss {record['first_loss']:.2f} -> "
          f"{record['final_loss']:.2f}; held-out text yes/no accuracy {accuracy_before:.1%} -> {accuracy_after:.1%}",
          flush=True)
    return record
