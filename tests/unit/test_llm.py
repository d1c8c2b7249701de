"""LLM builder on tiny configs: family classes, real-architecture defaults, embedding resize,
and the from_pretrained path."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, PhiForCausalLM

from mocha.config import LLMConfig
from mocha.model.llm import REAL_LLM_CONFIGS, build_llm, llm_hidden_size
from mocha.model.tiny import TINY_VOCAB_SIZE, tiny_llm_config

FAMILIES = {"phi": PhiForCausalLM, "llama": LlamaForCausalLM}


def _llm(family: str, **kwargs):
    torch.manual_seed(0)
    return build_llm(tiny_llm_config(family), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_llm_shape_and_training_step(family):
    model = _llm(family)
    assert type(model) is FAMILIES[family]
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert llm_hidden_size(model) == 64
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 9))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 9, TINY_VOCAB_SIZE) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tiny_models_inherit_the_real_architecture_details():
    phi, llama = _llm("phi").config, _llm("llama").config
    assert phi.hidden_act == "gelu_new" and phi.rope_parameters["partial_rotary_factor"] == 0.4
    assert phi.resid_pdrop == REAL_LLM_CONFIGS["phi"]["resid_pdrop"] == 0.1
    assert llama.hidden_act == "silu" and llama.rms_norm_eps == 1e-5
    assert not phi.tie_word_embeddings and not llama.tie_word_embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_grow_to_the_tokenizer_but_never_shrink(family):
    grown = _llm(family, vocab_size=TINY_VOCAB_SIZE + 3)
    assert grown.get_input_embeddings().num_embeddings == TINY_VOCAB_SIZE + 3
    assert grown.get_output_embeddings().weight.shape[0] == TINY_VOCAB_SIZE + 3
    assert grown.config.vocab_size == TINY_VOCAB_SIZE + 3
    kept = _llm(family, vocab_size=TINY_VOCAB_SIZE - 100)
    assert kept.get_input_embeddings().num_embeddings == TINY_VOCAB_SIZE


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_gives_identical_logits(family, tmp_path):
    model = _llm(family).eval()
    model.save_pretrained(tmp_path)
    loaded = build_llm(LLMConfig(family=family, pretrained=str(tmp_path))).eval()
    assert type(loaded) is FAMILIES[family]
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_checkpoint_of_the_wrong_family_is_rejected(tmp_path):
    _llm("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a 'llama' model, but llm.family='phi' expects 'phi'"):
        build_llm(LLMConfig(family="phi", pretrained=str(tmp_path)))


def test_dtype_and_meta_device():
    assert all(p.dtype == torch.bfloat16 for p in _llm("llama", dtype=torch.bfloat16).parameters())
    assert all(p.is_meta for p in _llm("phi", device="meta").parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_llm_special_token_ids_match_the_local_tokenizer(family, tmp_path):
    from mocha.text.tokenizer import train_bpe_tokenizer

    texts = ["a picture of a cat on a mat", "USER: what is this? ASSISTANT: a dog"] * 20
    tokenizer = train_bpe_tokenizer(texts, tmp_path, vocab_size=300, family=family)
    config = _llm(family).config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_tiny_model_config_overrides_are_validated():
    from pydantic import ValidationError

    from mocha.model.tiny import tiny_model_config

    cfg = tiny_model_config(llm=tiny_llm_config("llama"), template="vicuna_v1")
    assert cfg.llm.family == "llama" and [e.kind for e in cfg.encoders] == ["siglip", "convnext", "clip", "dinov2"]
    with pytest.raises(ValidationError, match="template"):
        tiny_model_config(template="chatml")
