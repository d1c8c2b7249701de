"""Tiny random-weight configs for tests and the CPU demo.

Same code paths as the real model (the same transformers classes, token selection and
preprocessing), only small: every encoder has its own width and token count so that a mix-up
between encoders changes shapes instead of passing silently. All four encoders together encode a
batch of 4 images in a few milliseconds on one CPU core.

==========  =====  =====================  =====  ======
encoder     px     tokens                 width  layers
==========  =====  =====================  =====  ======
siglip      40     (40/8)^2 = 25          48     2
convnext    48     (48/2/8)^2 = 9         96/3   4 stages x 1 block
clip        32     (32/8)^2 = 16          64     2 (takes layer -2)
dinov2      24     (24/6)^2 = 16          40     2
==========  =====  =====================  =====  ======
"""

from __future__ import annotations

from typing import Any, Literal

from mocha.config import MOCHA_ENCODER_ORDER, EncoderConfig, LLMConfig, ModelConfig

#: Matches ``mocha.text.tokenizer.train_bpe_tokenizer``'s default size, so no resize is needed.
TINY_VOCAB_SIZE = 1024
TINY_MAX_POSITIONS = 512

_TINY_ENCODERS: dict[str, dict[str, Any]] = {
    "siglip": {
        "image_size": 40,
        "config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "patch_size": 8},
    },
    "convnext": {
        "image_size": 48,
        "config": {"hidden_sizes": [8, 16, 32, 96], "depths": [1, 1, 1, 1], "patch_size": 2},
    },
    "clip": {
        "image_size": 32,
        "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "patch_size": 8, "projection_dim": 32},
    },
    "dinov2": {
        "image_size": 24,
        "config": {"hidden_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_ratio": 2,
                   "patch_size": 6},
    },
}

_TINY_LLM_SHAPE = {"vocab_size": TINY_VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": TINY_MAX_POSITIONS}

#: Special-token ids follow the local tokenizers (``mocha.text.tokenizer``), whose special tokens
#: take the lowest ids: phi ``<|endoftext|>``=0 (BOS, EOS and PAD); llama ``<s>``=0, ``</s>``=1,
#: ``<unk>``=2 (also PAD).
_TINY_LLMS: dict[str, dict[str, Any]] = {
    "phi": {**_TINY_LLM_SHAPE, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0},
    "llama": {**_TINY_LLM_SHAPE, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2},
}


def tiny_encoder_configs() -> list[EncoderConfig]:
    """All four encoders, tiny, in MoCHA's order (siglip, convnext, clip, dinov2)."""
    return [EncoderConfig(kind=kind, **_TINY_ENCODERS[kind]) for kind in MOCHA_ENCODER_ORDER]


def tiny_llm_config(family: Literal["phi", "llama"] = "phi") -> LLMConfig:
    """A 2-layer, 64-wide, 4-head LLM of the given family (vocab 1024, 512 positions); every other
    field comes from the family's real architecture (``mocha.model.llm.REAL_LLM_CONFIGS``)."""
    if family not in _TINY_LLMS:
        raise ValueError(f"unknown LLM family {family!r}; known: {sorted(_TINY_LLMS)}")
    return LLMConfig(family=family, config=dict(_TINY_LLMS[family]))


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """A full tiny MoCHA config; keyword arguments replace top-level fields (``llm=...``,
    ``hga=...``, ``template=...``) and are validated like any config."""
    fields: dict[str, Any] = {
        "encoders": tiny_encoder_configs(),
        "llm": tiny_llm_config("phi"),
        "template": "phi",
        "max_length": 256,
    }
    fields.update(overrides)
    return ModelConfig.model_validate(
        {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in fields.items()}
    )
