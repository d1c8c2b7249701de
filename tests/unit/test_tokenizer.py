"""Locally trained BPE tokenizers (mocha.text.tokenizer)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mocha.text.conversation import IGNORE_INDEX, render_conversation, tokenize_conversation
from mocha.text.tokenizer import load_tokenizer, train_bpe_tokenizer

CORPUS = [
    "A red circle on the left and a blue square on the right.",
    "USER: How many shapes are there? ASSISTANT: There are 3 shapes.",
    "Is there a green triangle in the image? No.",
] * 20


@pytest.fixture(scope="module", params=["phi", "llama"])
def trained(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(f"tok_{request.param}")
    return request.param, out_dir, train_bpe_tokenizer(CORPUS, out_dir, vocab_size=400, family=request.param)


def test_round_trip_through_auto_tokenizer(trained):
    _, out_dir, tokenizer = trained
    loaded = AutoTokenizer.from_pretrained(out_dir)
    assert len(loaded) == len(tokenizer) <= 400
    for text in ["A red circle.", "Ünïcödé ✓ and digits 1234\n\ttabs", "USER: hi ASSISTANT: ok"]:
        ids = loaded(text, add_special_tokens=False).input_ids
        assert ids == tokenizer(text, add_special_tokens=False).input_ids
        assert loaded.decode(ids) == text  # byte-level: lossless, never UNK
        assert loaded.unk_token_id not in ids
    # Training learned merges: a frequent word is one token, not its bytes.
    assert len(loaded(" circle", add_special_tokens=False).input_ids) == 1


def test_special_tokens_match_the_family(trained):
    family, out_dir, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer("red").input_ids
    bare = tokenizer("red", add_special_tokens=False).input_ids
    if family == "phi":
        assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == tokenizer.pad_token == "<|endoftext|>"
        assert tokenizer.eos_token_id == 0
        assert ids == bare  # Phi-2 adds no BOS
    else:
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
        assert tokenizer.pad_token == "<unk>"  # what LLaVA uses for Vicuna
        assert ids == [0] + bare  # Llama prepends BOS
    # The EOS written in text is one special id (the template turn end relies on it).
    assert tokenizer(f"red{tokenizer.eos_token}", add_special_tokens=False).input_ids == bare + [tokenizer.eos_token_id]


def test_family_template_tokenises_with_it(trained):
    family, out_dir, _ = trained
    tokenizer = load_tokenizer(out_dir)
    template = "phi" if family == "phi" else "vicuna_v1"
    conversation = [{"from": "human", "value": "<image>\nHow many shapes?"}, {"from": "gpt", "value": "3"}]
    sample = tokenize_conversation(conversation, tokenizer, template)
    assert sample.status == "ok"
    learned = [label for label in sample.labels if label != IGNORE_INDEX]
    assert learned[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(learned) == f" 3{tokenizer.eos_token}"
    assert render_conversation(conversation, template).endswith(f"ASSISTANT: 3{tokenizer.eos_token}")


def test_load_tokenizer_sets_a_missing_pad_token(tmp_path):
    trained = train_bpe_tokenizer(CORPUS, tmp_path / "src", vocab_size=300, family="llama")
    without_pad = PreTrainedTokenizerFast(
        tokenizer_object=trained.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    without_pad.save_pretrained(tmp_path / "nopad")
    assert AutoTokenizer.from_pretrained(tmp_path / "nopad").pad_token is None
    loaded = load_tokenizer(tmp_path / "nopad")
    assert loaded.pad_token == "<unk>" and loaded.pad_token_id == 2


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="family must be one of"):
        train_bpe_tokenizer(CORPUS, tmp_path, family="gpt")
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        train_bpe_tokenizer(CORPUS, tmp_path, vocab_size=100)
