"""The training job spec: one validated YAML per stage (``jobs/stage1.yaml``, ``jobs/stage2.yaml``).

Everything a run needs is in the file: model, data, DeepSpeed/ZeRO and expert parallelism,
scaling, schedule, checkpointing, storage and the Ray runtime environment. ``load_job`` rejects
an invalid file before any worker starts, naming each bad field. Command-line overrides use
dotted paths: ``--set schedule.max_steps=10 --set scaling.num_workers=1``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from mocha.config import ConfigError, ModelConfig, StrictModel, load_yaml, parse_model
from mocha.parallel.layout import LayoutError, check_layout


class InitConfig(StrictModel):
    """Weights to start from (stage 2 starts from the stage-1 connector + HGA weights)."""

    trainable_from: str | None = Field(
        default=None, description="dir or s3:// URL of a stage-1 export holding trainable.safetensors "
        "(connectors + HGA, loaded by exact key: all connectors must be present)")


class DataConfig(StrictModel):
    shards: str = Field(description="dir or s3:// URL of the WebDataset shard set (with manifest.json)")
    features: str | None = Field(
        default=None, description="dir or s3:// URL of precomputed feature shards; when set the frozen "
        "encoders are never loaded on the trainers")
    num_streams: int | None = Field(
        default=None, ge=1, description="fixed number of data streams the shard set is split into; the "
        "global batch order depends only on it, so a run resumes identically on any worker count that "
        "divides it (default: scaling.num_workers)")
    shuffle_shards: bool = True
    prefetch_batches: int = Field(
        default=2, ge=0, description="optimizer steps whose micro-batches are read, decoded and collated "
        "ahead on a background thread while the current step computes (0: read inline)")


class ScheduleConfig(StrictModel):
    global_batch_size: int = Field(default=128, ge=1)
    micro_batch_size: int = Field(default=4, ge=1, description="samples per worker per forward pass")
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; default: epochs over the data")
    epochs: float = Field(default=1.0, gt=0)
    lr: float = Field(default=2e-5, gt=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(default=1.0, ge=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = Field(default=1, ge=1)


class DeepSpeedConfig(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    ep_size: int = Field(default=1, ge=1, description="expert-parallel group size; divides the world size "
                         "and every MoE layer's number of experts")


class CheckpointConfig(StrictModel):
    every_steps: int = Field(default=500, ge=1)
    keep: int = Field(default=3, ge=1, description="checkpoints kept in the storage path (Ray CheckpointConfig)")


class ScalingConfig(StrictModel):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=1, ge=0)


class RunConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage_path: str = Field(description="local dir or s3:// URL; checkpoints go to <storage_path>/<name>")
    max_failures: int = Field(default=3, ge=-1, description="worker-failure restarts (-1: unlimited)")


class JobConfig(StrictModel):
    stage: Literal[1, 2]
    model: ModelConfig
    tokenizer: str | None = Field(default=None, description="tokenizer dir or hub id (default: model.llm.tokenizer or model.llm.pretrained)")
    init: InitConfig = Field(default_factory=InitConfig)
    data: DataConfig
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime environment used by `mocha submit`")

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        workers, ep = self.scaling.num_workers, self.deepspeed.ep_size
        try:
            check_layout(workers, self.deepspeed.zero_stage, ep, self.expert_counts)
        except LayoutError as e:
            raise ValueError(str(e)) from None
        streams = self.data.num_streams or workers
        if streams % workers:
            raise ValueError(f"data.num_streams ({streams}) must be a multiple of scaling.num_workers ({workers})")
        sched = self.schedule
        per_step = sched.micro_batch_size * workers
        if sched.global_batch_size % per_step:
            raise ValueError(f"schedule.global_batch_size ({sched.global_batch_size}) must be a multiple of "
                             f"micro_batch_size x num_workers ({per_step})")
        if sched.global_batch_size % streams:
            raise ValueError(f"schedule.global_batch_size ({sched.global_batch_size}) must be a multiple of "
                             f"data.num_streams ({streams})")
        if self.stage == 1 and self.model.template != "plain":
            raise ValueError(f"stage 1 aligns on captions with the 'plain' template, got model.template={self.model.template!r}")
        if self.stage == 2 and self.model.template == "plain":
            raise ValueError("stage 2 instruction-tunes with a chat template ('vicuna_v1' or 'phi'), not 'plain'")
        return self

    @property
    def expert_counts(self) -> dict[str, int]:
        """Experts of every MoE layer kind the model has, by config field."""
        counts = {}
        if self.model.connector.kind == "moe":
            counts["model.connector"] = self.model.connector.num_experts
        if self.model.llm_experts is not None:
            counts["model.llm_experts"] = self.model.llm_experts.num_experts
        return counts

    @property
    def grad_accum(self) -> int:
        s = self.schedule
        return s.global_batch_size // (s.micro_batch_size * self.scaling.num_workers)

    @property
    def num_streams(self) -> int:
        return self.data.num_streams or self.scaling.num_workers

    @property
    def run_dir(self) -> str:
        """``<run.storage_path>/<run.name>``: checkpoints, metrics.jsonl and export/ (``mocha.io.layout``)."""
        from mocha.io.storage import join_url

        return join_url(self.run.storage_path, self.run.name)

    @property
    def tokenizer_path(self) -> str:
        path = self.tokenizer or self.model.llm.tokenizer or self.model.llm.pretrained
        if path is None:
            raise ConfigError("no tokenizer: set `tokenizer` (or model.llm.tokenizer / model.llm.pretrained)")
        return path


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Local paths in a job file are relative to the file's directory's parent project when they
    start with ``./``; URLs and absolute paths are kept."""
    def fix(value):
        if isinstance(value, str) and value.startswith("./"):
            return str((base / value).resolve())
        return value

    for section, key in (("data", "shards"), ("data", "features"), ("run", "storage_path"),
                         ("init", "trainable_from")):
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = fix(data[section][key])
    if "tokenizer" in data:
        data["tokenizer"] = fix(data["tokenizer"])
    return data


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a job YAML. Relative ``./`` paths resolve against the current
    working directory (where ``ray job submit --working-dir`` puts the project)."""
    data = load_yaml(path)
    apply_overrides(data, overrides or [])
    resolve_relative_paths(data, Path(os.getcwd()))
    return parse_model(JobConfig, data, str(path))
