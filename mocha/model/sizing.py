"""Model sizes without weights: parameter counts and visual tokens of any ``ModelConfig``,
computed by building the encoders and the LLM on the ``meta`` device (no memory, no download).

Used by the real-size tests and by infrastructure sizing (memory, instance types).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mocha.config import ModelConfig
from mocha.model.encoders import build_encoder, real_encoder_configs
from mocha.model.llm import build_llm, llm_hidden_size, real_llm_config

_TEMPLATES = {"phi": "phi", "llama": "vicuna_v1"}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def real_model_config(family: Literal["phi", "llama"] = "phi", pretrained: bool = False) -> ModelConfig:
    """The paper's model (four encoders + Phi-2 or Vicuna-7B); ``pretrained`` sets the hub ids."""
    return ModelConfig(encoders=real_encoder_configs(pretrained), llm=real_llm_config(family, pretrained),
                       template=_TEMPLATES[family])


@dataclass(frozen=True)
class EncoderSize:
    kind: str
    parameters: int
    image_size: int
    num_tokens: int
    hidden_size: int


@dataclass(frozen=True)
class ModelSize:
    encoders: list[EncoderSize]
    llm_parameters: int
    llm_hidden_size: int

    @property
    def visual_tokens(self) -> int:
        """Tokens per image entering HGA and the LLM (the sum over encoders)."""
        return sum(e.num_tokens for e in self.encoders)

    @property
    def frozen_encoder_parameters(self) -> int:
        return sum(e.parameters for e in self.encoders)


def model_size(cfg: ModelConfig) -> ModelSize:
    """Sizes of ``cfg``'s encoders and LLM, measured on the ``meta`` device.

    Only for architecture configs (``pretrained`` unset): loading a checkpoint would read its
    weights, which is what sizing avoids. ``real_model_config()`` describes the paper's model.
    """
    named = [f"encoders[{i}]" for i, e in enumerate(cfg.encoders) if e.pretrained is not None]
    named += ["llm"] if cfg.llm.pretrained is not None else []
    if named:
        raise ValueError(f"model_size needs architecture configs; pretrained is set on {', '.join(named)}")
    meta = torch.device("meta")
    encoders = []
    for enc_cfg in cfg.encoders:
        enc = build_encoder(enc_cfg, device=meta)
        encoders.append(EncoderSize(enc.kind, count_parameters(enc), enc.image_size, enc.num_tokens, enc.hidden_size))
    llm = build_llm(cfg.llm, device=meta)
    return ModelSize(encoders, count_parameters(llm), llm_hidden_size(llm))
