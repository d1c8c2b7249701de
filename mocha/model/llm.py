"""The language model: Phi-2 or Vicuna (Llama) through ``AutoModelForCausalLM``.

``LLMConfig.pretrained`` (hub id or local directory) loads real weights; without it the model is
built with random weights from the family's real architecture (:data:`REAL_LLM_CONFIGS`, written
out here so it needs no download) updated with ``LLMConfig.config`` — how the tiny test/demo
models and the ``meta``-device size checks are made.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig, PretrainedConfig, PreTrainedModel

from mocha.config import LLMConfig

#: Family -> config class and the ``model_type`` a checkpoint of that family must have.
LLM_FAMILIES: dict[str, type[PretrainedConfig]] = {"phi": PhiConfig, "llama": LlamaConfig}

#: Hub ids of the paper's two language models.
REAL_LLM_CHECKPOINTS: dict[str, str] = {"phi": "microsoft/phi-2", "llama": "lmsys/vicuna-7b-v1.5"}

#: The architectures of those checkpoints (their ``config.json``), for building without a download.
REAL_LLM_CONFIGS: dict[str, dict[str, Any]] = {
    "phi": {  # microsoft/phi-2: 2.78B parameters
        "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "gelu_new",
        "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "qk_layernorm": False, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
        "bos_token_id": 50256, "eos_token_id": 50256,
    },
    "llama": {  # lmsys/vicuna-7b-v1.5 (Llama-2-7B architecture): 6.74B parameters
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    },
}


def llm_config(cfg: LLMConfig) -> PretrainedConfig:
    """The transformers config a random-init ``cfg`` builds: the family's real architecture
    updated with ``cfg.config``."""
    config_cls = _family_config_cls(cfg.family)
    return config_cls(**{**REAL_LLM_CONFIGS[cfg.family], **cfg.config})


def build_llm(cfg: LLMConfig, vocab_size: int | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Build the causal LM of ``cfg``.

    ``vocab_size`` is the tokenizer's length (including added tokens such as ``<image>`` or
    padding): the embeddings grow to it when the model has fewer rows. They never shrink — a
    tokenizer smaller than the embedding matrix is normal (Phi-2 has 51,200 rows for 50,295
    tokens) and shrinking would change the shape of the released weights.
    ``device="meta"`` builds the structure only (sizing).
    """
    device = torch.device(device)
    if cfg.pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, dtype=dtype, **cfg.config)
        expected = _family_config_cls(cfg.family).model_type
        if model.config.model_type != expected:
            raise ValueError(f"llm.pretrained={cfg.pretrained!r} is a {model.config.model_type!r} model, but "
                             f"llm.family={cfg.family!r} expects {expected!r}")
        model.to(device)
    else:
        with device:
            model = AutoModelForCausalLM.from_config(llm_config(cfg), dtype=dtype)
    if vocab_size is not None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)
    return model


def llm_hidden_size(model: PreTrainedModel) -> int:
    """Width of the LLM's token embeddings (what the connectors project to)."""
    return model.get_input_embeddings().embedding_dim


def _family_config_cls(family: str) -> type[PretrainedConfig]:
    try:
        return LLM_FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown llm.family {family!r}; known: {sorted(LLM_FAMILIES)}") from None


def real_llm_config(family: str, pretrained: bool = False) -> LLMConfig:
    """The paper's LLM of ``family``: the hub checkpoint when ``pretrained``, else a random-weight
    model of the same architecture (for sizing on the ``meta`` device)."""
    _family_config_cls(family)
    return LLMConfig(family=family, pretrained=REAL_LLM_CHECKPOINTS[family] if pretrained else None,
                     tokenizer=REAL_LLM_CHECKPOINTS[family])

