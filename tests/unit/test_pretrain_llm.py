"""Text pre-training of the demo's tiny LLM: the examples it trains on, the accuracy it reports,
the saved model and its reuse."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mocha.config import LLMConfig
from mocha.demo.pretrain_llm import (RECORD_NAME, LLMPretrainConfig, TextExamples, describe, lr_schedule, pretrain_llm,
                                     yes_no_accuracy)
from mocha.demo.synthetic import ALL_OBJECT_NAMES, Scene, SceneObject, generate_shapes_dataset, iter_all_texts
from mocha.model.llm import build_llm
from mocha.text.conversation import IMAGE_TOKEN
from mocha.text.tokenizer import train_bpe_tokenizer
from mocha.train.data import IGNORE_INDEX

TINY_LLM = LLMConfig(family="phi", config={
    "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    paths = generate_shapes_dataset(root / "raw", num_train=32, num_eval=8)
    out = root / "tokenizer"
    train_bpe_tokenizer(iter_all_texts(paths, templates=("plain", "phi")), out, vocab_size=512, family="phi")
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from mocha.text.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def described_names(text: str) -> list[str]:
    listed = re.search(r"In the image: (.*?)\.", text).group(1)
    return re.findall(r"a (\w+ \w+)", listed)


def test_description_lists_every_object_once():
    objects = tuple(SceneObject(*name.split()[::-1], box=(i * 10, 0, i * 10 + 5, 5))
                    for i, name in enumerate(ALL_OBJECT_NAMES[:3]))
    scene = Scene(image="", split="text", objects=objects)
    text = describe(scene, np.random.default_rng(0))
    assert sorted(described_names(text)) == sorted(ALL_OBJECT_NAMES[:3])
    assert text.startswith("In the image: ") and " and a " in text


def test_caption_examples_supervise_only_the_caption(tokenizer):
    examples = TextExamples(tokenizer, LLMPretrainConfig(), seed=0)
    for _ in range(5):
        e = examples.caption_example()
        supervised = [t for t, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX]
        prefix = tokenizer.decode([t for t, label in zip(e.input_ids, e.labels) if label == IGNORE_INDEX])
        caption = tokenizer.decode(supervised)
        assert prefix.startswith("In the image: ") and caption.endswith(".\n")
        # the caption names exactly the described objects
        named = {n for n in ALL_OBJECT_NAMES if n in caption}
        assert named == set(described_names(prefix))


def test_conversation_examples_put_the_description_where_the_image_goes(tokenizer):
    examples = TextExamples(tokenizer, LLMPretrainConfig(), seed=1)
    for _ in range(5):
        e = examples.conversation_example()
        text = tokenizer.decode(e.input_ids)
        assert IMAGE_TOKEN not in text and "In the image: " in text and "ASSISTANT:" in text
        answers = tokenizer.decode([t for t, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX])
        assert "USER" not in answers and "Is there" not in answers and ("Yes." in answers or "No." in answers)


def test_existence_questions_are_balanced_and_answered_by_the_description(tokenizer):
    questions = TextExamples(tokenizer, LLMPretrainConfig(), seed=2).existence_questions(40)
    assert sum(yes for _, yes in questions) == 20
    for example, yes in questions:
        text = tokenizer.decode(example.input_ids)
        asked = re.search(r"Is there a (\w+ \w+) in the image\?", text).group(1)
        assert (asked in described_names(text)) == yes
        assert text.removesuffix("<|endoftext|>").endswith("Yes." if yes else "No.")


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = LLMPretrainConfig(steps=100, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = lr_schedule(optimizer, cfg)
    lrs = []
    for _ in range(101):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1e-2)
    assert lrs[10] == pytest.approx(1e-2)
    assert lrs[55] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))
    assert lrs[100] == pytest.approx(1e-3)


class NextTokenOracle(torch.nn.Module):
    """Logits that put all mass on the token that follows each position (a model that peeks)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask):
        following = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(following, self.vocab).float())


class AlwaysYes(torch.nn.Module):
    def __init__(self, vocab: int, yes_id: int):
        super().__init__()
        self.vocab, self.yes_id = vocab, yes_id

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.yes_id] = 1.0
        return SimpleNamespace(logits=logits)


def test_yes_no_accuracy_scores_the_first_answer_token(tokenizer):
    questions = TextExamples(tokenizer, LLMPretrainConfig(), seed=3).existence_questions(30)
    yes_id = tokenizer(" Yes", add_special_tokens=False).input_ids[0]
    # reading the position that predicts the answer gives the truth; a constant answer gives half
    assert yes_no_accuracy(NextTokenOracle(len(tokenizer)), tokenizer, questions, batch_size=7) == 1.0
    assert yes_no_accuracy(AlwaysYes(len(tokenizer), yes_id), tokenizer, questions) == 0.5


def test_pretraining_lowers_the_loss_saves_a_loadable_llm_and_is_reused(tokenizer, tokenizer_dir, tmp_path):
    cfg = LLMPretrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=5, eval_questions=16)
    out = tmp_path / "llm"
    record = pretrain_llm(TINY_LLM, tokenizer, tokenizer_dir, out, cfg)
    assert record["final_loss"] < 0.75 * record["first_loss"]  # a random LM stays at ln(vocab)
    assert json.loads((out / RECORD_NAME).read_text()) == record

    loaded = build_llm(LLMConfig(family="phi", pretrained=str(out)), vocab_size=len(tokenizer))
    fresh = build_llm(TINY_LLM, vocab_size=len(tokenizer))
    saved = loaded.state_dict()
    assert any(not torch.equal(saved[k], v) for k, v in fresh.state_dict().items())  # trained, not the init

    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert pretrain_llm(TINY_LLM, tokenizer, tokenizer_dir, out, cfg) == record
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained
    changed = pretrain_llm(TINY_LLM, tokenizer, tokenizer_dir, out, cfg.model_copy(update={"steps": 31}))
    assert changed["steps"] == 31 and weights.stat().st_mtime_ns != stamp


def test_pretraining_refuses_an_already_pretrained_llm(tokenizer, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="llm.pretrained"):
        pretrain_llm(LLMConfig(family="phi", pretrained="microsoft/phi-2"), tokenizer, tokenizer_dir, tmp_path,
                     LLMPretrainConfig(steps=1))
