"""Model sizes without weights, from the model code itself: :func:`measure_model` builds the whole
MoCHA model of a :class:`~mocha.config.ModelConfig` (encoders, connectors, HGA, LLM) on the ``meta``
device (no memory, no download), counts every part's parameters and measures forward FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` at the real input shapes.

Memory and time for a job are in :mod:`mocha.plan.memory`; the command is ``mocha plan``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mocha.config import ModelConfig
from mocha.model.encoders import real_encoder_configs
from mocha.model.llm import real_llm_config

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
    params: int
    image_size: int
    tokens: int  # visual tokens per image this encoder contributes
    width: int  # feature width the connector sees
    forward_flops: int  # per image, measured


@dataclass(frozen=True)
class ConnectorSize:
    kind: str  # encoder kind it serves
    expert_params: int  # all experts (expert-parallel)
    dense_params: int  # router and anything else replicated
    num_experts: int
    top_k: int
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.expert_params + self.dense_params

    @property
    def forward_flops_per_token(self) -> int:
        """Router plus the ``top_k`` experts a token visits (2 FLOPs per multiply-add)."""
        per_expert = (self.expert_params // self.num_experts) if self.num_experts else 0
        active = self.dense_params + self.top_k * per_expert
        return 2 * active


@dataclass(frozen=True)
class LLMSize:
    family: str
    params: int
    embedding_params: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    max_positions: int
    norm: Literal["layernorm", "rmsnorm"]
    mlp: Literal["gelu_new", "swiglu"]
    parallel_block: bool  # attention and MLP read the same normed input (Phi)
    residual_dropout: bool


@dataclass(frozen=True)
class ModelSize:
    encoders: tuple[EncoderSize, ...]
    connectors: tuple[ConnectorSize, ...]
    hga_params: int
    hga_mode: str
    llm: LLMSize
    llm_forward_flops: dict[int, int]  # sequence length -> forward FLOPs of one sample, measured

    @property
    def visual_tokens(self) -> int:
        return sum(e.tokens for e in self.encoders)

    @property
    def encoder_params(self) -> int:
        return sum(e.params for e in self.encoders)

    @property
    def connector_params(self) -> int:
        return sum(c.params for c in self.connectors)

    @property
    def expert_params(self) -> int:
        return sum(c.expert_params for c in self.connectors)

    @property
    def total_params(self) -> int:
        return self.encoder_params + self.connector_params + self.hga_params + self.llm.params

    def trainable_params(self, stage: int) -> int:
        return self.connector_params + self.hga_params + (self.llm.params if stage == 2 else 0)


def forward_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call, counted by torch's FlopCounterMode (works on ``meta`` tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def measure_model(config, seq_lens_for: Callable[[int], Iterable[int]] = lambda visual_tokens: ()) -> ModelSize:
    """Build ``config`` (a :class:`mocha.config.ModelConfig`) on the meta device and measure it.

    ``seq_lens_for(visual_tokens)`` names the LLM sequence lengths (tokens per sample) whose
    forward FLOPs to measure; it gets the model's visual tokens per image, which fix them.
    ``pretrained`` checkpoints are not loaded: each encoder and the LLM are built from their
    registry's real architecture (the paper's checkpoints) updated with their ``config`` entries.
    """
    from mocha.model.connector import build_connector
    from mocha.model.encoders import build_encoder
    from mocha.model.hga import build_hga
    from mocha.model.llm import build_llm, llm_hidden_size

    # The same builders MochaModel assembles, each on the meta device (MochaModel itself
    # initialises its connectors on the CPU first: 1.4 GB for Vicuna-7B's).
    config = config.model_copy(update={
        "llm": config.llm.model_copy(update={"pretrained": None}),
        "encoders": [e.model_copy(update={"pretrained": None}) for e in config.encoders],
    })
    llm = build_llm(config.llm, device="meta")
    hidden = llm_hidden_size(llm)
    encoders, connectors = [], []
    for cfg in config.encoders:
        enc = build_encoder(cfg, device="meta")
        pixels = torch.empty(1, 3, enc.image_size, enc.image_size, device="meta")
        encoders.append(EncoderSize(enc.kind, count_parameters(enc), enc.image_size, enc.num_tokens, enc.hidden_size,
                                    forward_flops(enc, pixels)))
        with torch.device("meta"):
            conn = build_connector(config.connector, enc.hidden_size, hidden)
        expert = sum(p.numel() for n, p in conn.named_parameters() if n.startswith("experts."))
        connectors.append(ConnectorSize(
            kind=enc.kind, expert_params=expert, dense_params=count_parameters(conn) - expert,
            num_experts=getattr(conn, "num_experts", 0), top_k=getattr(conn, "top_k", 0),
            in_features=enc.hidden_size, out_features=hidden,
        ))
    hga = build_hga(config.hga, hidden, [e.tokens for e in encoders])
    visual_tokens = sum(e.tokens for e in encoders)
    llm_flops = {}
    for seq in sorted(set(seq_lens_for(visual_tokens))):
        embeds = torch.empty(1, seq, hidden, device="meta", dtype=torch.bfloat16)
        llm_flops[seq] = forward_flops(llm, inputs_embeds=embeds)
    return ModelSize(tuple(encoders), tuple(connectors), count_parameters(hga), config.hga.mode,
                     _llm_size(config.llm.family, llm), llm_flops)


def _llm_size(family: str, llm) -> LLMSize:

    cfg = llm.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if cfg.model_type == "phi":
        norm, mlp, parallel = "layernorm", "gelu_new", True
        dropout = float(getattr(cfg, "resid_pdrop", 0.0)) > 0
    elif cfg.model_type == "llama":
        norm, mlp, parallel, dropout = "rmsnorm", "swiglu", False, False
    else:
        raise ValueError(f"sizing knows the activation layout of phi and llama models, not {cfg.model_type!r}")
    return LLMSize(
        family=family, params=count_parameters(llm), embedding_params=llm.get_input_embeddings().weight.numel(),
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
        kv_dim=kv_heads * head_dim, vocab=llm.get_output_embeddings().weight.shape[0],
        max_positions=cfg.max_position_embeddings, norm=norm, mlp=mlp, parallel_block=parallel,
        residual_dropout=dropout,
    )


