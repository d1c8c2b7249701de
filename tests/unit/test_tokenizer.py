"""Locally trained BPE tokenizers (mocha.text.tokenizer)."""

from __future__ import annotations

import sys

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


# ------------------------------------------------------------------ SentencePiece (Vicuna / Llama)


@pytest.fixture(scope="module")
def vicuna_folder(tmp_path_factory):
    """A checkpoint folder shaped like lmsys/vicuna-7b-v1.5: config.json + safetensors weights of
    a (tiny) Llama and a SentencePiece tokenizer.model, with no tokenizer.json."""
    from mocha.model.llm import build_llm
    from mocha.model.tiny import tiny_llm_config
    from mocha.text.tokenizer import train_sentencepiece_tokenizer

    folder = tmp_path_factory.mktemp("vicuna-7b-v1.5")
    train_sentencepiece_tokenizer(CORPUS, folder, vocab_size=400)
    build_llm(tiny_llm_config("llama"), vocab_size=400).save_pretrained(folder)
    return folder


def test_sentencepiece_checkpoint_folder_is_what_llama_checkpoints_ship(vicuna_folder):
    import sentencepiece as spm

    files = {p.name for p in vicuna_folder.iterdir()}
    assert {"tokenizer.model", "tokenizer_config.json", "config.json"} <= files and "tokenizer.json" not in files
    sp = spm.SentencePieceProcessor(model_file=str(vicuna_folder / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)  # Llama's ids, no PAD


def test_sentencepiece_tokenizer_loads_and_masks_vicuna_conversations(vicuna_folder):
    import sentencepiece as spm

    tokenizer = load_tokenizer(vicuna_folder)
    assert tokenizer.is_fast and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.pad_token == "<unk>"  # Vicuna has no PAD: LLaVA pads with UNK
    sp = spm.SentencePieceProcessor(model_file=str(vicuna_folder / "tokenizer.model"))
    text = "USER: How many shapes are there? ASSISTANT: There are 3 shapes."
    assert tokenizer(text).input_ids == [1, *sp.encode(text)]  # the converted tokenizer = the SentencePiece model
    conversation = [{"from": "human", "value": "<image>\nHow many shapes?"}, {"from": "gpt", "value": "There are 3."},
                    {"from": "human", "value": "Is there a red circle?"}, {"from": "gpt", "value": "No."}]
    sample = tokenize_conversation(conversation, tokenizer, "vicuna_v1", num_image_tokens=5)
    assert sample.status == "ok"
    learned = tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])
    assert learned.replace(" ", "") == "Thereare3.</s>No.</s>"


def test_llm_pretrained_pointing_at_a_sentencepiece_checkpoint_trains(vicuna_folder):
    """`llm.pretrained` names the folder; the tokenizer defaults to it (job.tokenizer_path)."""
    import torch

    from mocha.model.mocha import MochaModel
    from mocha.model.tiny import tiny_model_config
    from mocha.text.conversation import IMAGE_TOKEN_INDEX

    config = tiny_model_config(llm={"family": "llama", "pretrained": str(vicuna_folder)}, template="vicuna_v1")
    tokenizer = load_tokenizer(config.llm.pretrained)
    model = MochaModel(config, vocab_size=len(tokenizer), with_encoders=False)
    sample = tokenize_conversation([{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "3"}],
                                   tokenizer, "vicuna_v1")
    ids = torch.tensor([sample.input_ids])
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 1
    features = {k: torch.randn(1, model.encoder_tokens[k], model.encoder_widths[k]) for k in model.encoder_kinds}
    out = model(ids, torch.ones_like(ids), torch.tensor([sample.labels]), features=features)
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize("missing", ["sentencepiece", "google.protobuf"])
def test_sentencepiece_checkpoint_without_its_dependencies_names_them(tmp_path, monkeypatch, missing):
    from mocha.text.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(b"\x00")  # a folder shipping only tokenizer.model
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now raises ImportError
    with pytest.raises(ImportError, match="install `sentencepiece` and `protobuf`"):
        load_tokenizer(tmp_path)
