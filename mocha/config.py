"""Configuration schemas: one source of truth for the model, data, training and job specs.

Every config is a strict pydantic model: unknown keys and wrong types are rejected up front,
with the offending field named in the error (``mocha.config.parse_model`` turns pydantic's error
into a one-line-per-field message).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EncoderKind = Literal["clip", "siglip", "dinov2", "convnext"]

#: The order in which MoCHA concatenates the encoders' projected tokens (HGA group ids 0..3).
MOCHA_ENCODER_ORDER: tuple[str, ...] = ("siglip", "convnext", "clip", "dinov2")


class StrictModel(BaseModel):
    # allow_inf_nan=False: ``.inf`` / ``.nan`` in a YAML are rejected like any other bad value
    # (pydantic accepts them for float fields by default, and they would surface as a NaN loss).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class EncoderConfig(StrictModel):
    """One frozen vision encoder.

    ``pretrained`` is a Hugging Face hub id or a local directory (``from_pretrained``); when it
    is ``None`` the encoder is built with random weights from its registry's default
    architecture updated with ``config`` (how tests and the CPU demo build tiny encoders).
    """

    kind: EncoderKind
    pretrained: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    image_size: int | None = Field(default=None, gt=0, description="input resolution; default from the encoder config")
    select_layer: int | None = Field(default=None, description="hidden-state index to take (CLIP default -2)")
    init_seed: int = Field(default=0, description="seed of the random init when `pretrained` is None, so that "
                           "every process (feature pipeline, trainers, export) builds the same frozen weights")
    channel_pool: int | None = Field(
        default=None, ge=1, description="average-pool the feature dim by this factor (official ConvNeXt: 3)"
    )


class RoutedExpertsConfig(StrictModel):
    """``num_experts`` experts of which a router picks ``top_k`` per token (MoE connectors, LLM experts)."""

    num_experts: int = Field(default=4, ge=1)
    top_k: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _top_k_le_experts(self) -> "RoutedExpertsConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self


class ConnectorConfig(RoutedExpertsConfig):
    kind: Literal["moe", "dense"] = "moe"
    balance_coef: float = Field(default=0.1, ge=0)
    z_coef: float = Field(default=0.01, ge=0)


class HGAConfig(StrictModel):
    mode: Literal["graph", "attention", "off"] = "graph"
    k: int = Field(default=10, ge=1, description="graph form: neighbours per token")
    intra_share: float = Field(default=0.7, ge=0, le=1, description="graph form: share of k chosen inside the group")
    num_heads: int = Field(default=8, ge=1, description="attention form: heads")
    chunk_size: int | None = Field(
        default=None, ge=1, description="graph form: images per chunk, bounds the [chunk, N, N] memory; None = all"
    )


class LLMConfig(StrictModel):
    """The language model. ``pretrained`` is a hub id or local dir; ``None`` builds a random
    model of ``family`` from ``config`` (tiny tests / demo)."""

    family: Literal["phi", "llama"] = "phi"
    pretrained: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = Field(default=None, description="hub id or local dir; default: same as pretrained")


class LLMExpertsConfig(RoutedExpertsConfig):
    """MoE-LLaVA-style experts inside the LLM: the FFN of each listed decoder layer becomes
    ``num_experts`` copies of itself (upcycled) routed top-k, trained with the router's balance
    and z losses weighted by ``balance_coef`` / ``z_coef``. Part of the architecture
    (``model.llm_experts``), so an exported model records it and loads back with the same layers."""

    layers: list[int] = Field(min_length=1, description="decoder layers whose FFN becomes experts")
    balance_coef: float = Field(default=0.01, ge=0, description="weight of the load-balancing loss")
    z_coef: float = Field(default=0.001, ge=0, description="weight of the router z-loss")


class ModelConfig(StrictModel):
    encoders: list[EncoderConfig] = Field(
        default_factory=lambda: [EncoderConfig(kind=k) for k in MOCHA_ENCODER_ORDER], min_length=1
    )
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    hga: HGAConfig = Field(default_factory=HGAConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    llm_experts: LLMExpertsConfig | None = Field(
        default=None, description="MoE-LLaVA-style MoE layers inside the LLM (None: dense LLM)")
    template: Literal["plain", "vicuna_v1", "phi"] = "phi"
    pad_to_square: bool = Field(default=True, description=(
        "LLaVA-1.5's image_aspect_ratio 'pad': each image is padded to a square with the mean colour "
        "(OpenAI CLIP's mean, as the official processor) before every encoder's own preprocessing; "
        "false: each encoder's processor resizes/crops the original"))
    image_token_first: bool = Field(default=True, description=(
        "LLaVA-1.5's preprocessing: move <image> to the front of its (first human) turn before tokenising"))
    max_length: int = Field(default=2560, gt=0, description=(
        "sequence budget per sample after each <image> expands to its visual tokens; 2560 as the official "
        "MoCHA/LLaVA-1.5 scripts (model_max_length), also for Phi-2 whose config says 2048 positions: its "
        "rotary embeddings run past them, as in the official recipe"))

    @model_validator(mode="after")
    def _unique_encoders(self) -> "ModelConfig":
        kinds = [e.kind for e in self.encoders]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"encoders must be distinct, got {kinds}")
        return self

    def encoder_config_hash(self) -> str:
        """Hash of everything that determines the frozen encoders' outputs (for feature shards): the
        encoders and the shared image preprocessing (``pad_to_square``)."""
        payload = json.dumps({"encoders": [e.model_dump() for e in self.encoders],
                              "pad_to_square": self.pad_to_square}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = [f"invalid {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


class ConfigError(ValueError):
    """A config file failed validation; the message names every bad field."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_model(cls: type[BaseModel], data: dict[str, Any], source: str):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
