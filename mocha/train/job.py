"""The training job spec: one validated YAML per stage (``jobs/stage1.yaml``, ``jobs/stage2.yaml``).

Everything a run needs is in the file: model, data, DeepSpeed/ZeRO and expert parallelism,
scaling, schedule, checkpointing, storage and the Ray runtime environment. ``load_job`` rejects
an invalid file before any worker starts, naming each bad field. Command-line overrides use
dotted paths: ``--set schedule.max_steps=10 --set scaling.num_workers=1``.

Elastic runs: ``scaling.num_workers`` is a number or a range ``{min: 2, max: 8}``; every rule that
depends on the worker count (the expert-parallel layout) is checked for *every* size in the range
up front, and the sizes that fail are named. Nothing else depends on the worker count: the data
order is fixed by ``data.num_streams`` and the global batch by ``schedule.global_batch_size``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, model_validator

from mocha.config import ConfigError, ModelConfig, StrictModel, load_yaml, parse_model
from mocha.parallel.layout import AUTO, LayoutError, resolve_ep_size


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
        default=None, ge=1, description="fixed number of data streams the shard set is split into (keep it "
        "for the whole run); the global batch order depends only on it, never on the worker count: worker "
        "r of W reads streams r, r+W, r+2W, ... At least the largest worker count; a count with many "
        "divisors of the worker counts you expect keeps every worker equally busy (default: the largest "
        "scaling.num_workers)")
    shuffle_shards: bool = True
    prefetch_batches: int = Field(
        default=2, ge=0, description="optimizer steps whose micro-batches are read, decoded and collated "
        "ahead on a background thread while the current step computes (0: read inline)")


class ScheduleConfig(StrictModel):
    global_batch_size: int = Field(default=128, ge=1, description="samples per optimizer step, whatever the "
                                   "worker count (a multiple of data.num_streams); gradient accumulation adapts")
    micro_batch_size: int = Field(default=4, ge=1, description="samples per worker per forward pass (at most: a "
                                  "worker's last micro-batch of a step may be smaller)")
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
    ep_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=AUTO, description="expert-parallel group size: 'auto' (the largest size dividing the current "
        "worker count and every MoE layer's expert count, chosen each time the worker group starts) or a "
        "number, which must divide every worker count in scaling.num_workers and every expert count")


class CheckpointConfig(StrictModel):
    every_steps: int = Field(default=500, ge=1)
    keep: int = Field(default=3, ge=1, description="checkpoints kept in the storage path (Ray CheckpointConfig)")


class WorkerRange(StrictModel):
    """An elastic worker count: Ray Train runs with as many workers as the cluster has room for,
    between ``min`` and ``max``, and resizes when nodes leave or join."""

    min: int = Field(ge=1, description="fewest workers the run trains with (it waits below that)")
    max: int = Field(ge=1, description="most workers the run grows to")

    @model_validator(mode="after")
    def _ordered(self) -> "WorkerRange":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class ScalingConfig(StrictModel):
    num_workers: Annotated[int, Field(ge=1)] | WorkerRange = Field(
        default=1, description="training workers: a number, or a range {min: 2, max: 8} for elastic training "
        "(Ray Train resizes the group when nodes leave or join and resumes from the latest checkpoint)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=1, ge=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources each worker reserves (e.g. a custom node "
        "resource {trainer_slot: 1}); elastic runs count the workers a node can hold by every reserved resource")
    resize_check_s: float = Field(
        default=60.0, gt=0, description="elastic runs: how often Ray Train checks whether the cluster has room "
        "for more workers (ScalingConfig.elastic_resize_monitor_interval_s)")

    @property
    def min_workers(self) -> int:
        return self.num_workers.min if isinstance(self.num_workers, WorkerRange) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers.max if isinstance(self.num_workers, WorkerRange) else self.num_workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, WorkerRange)

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may train with."""
        return range(self.min_workers, self.max_workers + 1)

    @property
    def describe(self) -> str:
        return (f"{self.min_workers}-{self.max_workers} workers (elastic)" if self.elastic
                else f"{self.num_workers} workers")


class RunConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage_path: str = Field(description="local dir or s3:// URL; checkpoints go to <storage_path>/<name>")
    max_failures: int = Field(default=3, ge=-1, description="worker-failure restarts (-1: unlimited); a node "
                              "an elastic run loses often costs two (Ray Train retries the old size first)")


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
        self._check_layout_for_every_worker_count()
        streams, most = self.num_streams, self.scaling.max_workers
        if streams < most:
            raise ValueError(f"data.num_streams ({streams}) must be at least the largest worker count ({most}): "
                             "a worker without a stream would only run padding")
        sched = self.schedule
        if sched.global_batch_size % streams:
            raise ValueError(f"schedule.global_batch_size ({sched.global_batch_size}) must be a multiple of "
                             f"data.num_streams ({streams})")
        if self.stage == 1 and self.model.template != "plain":
            raise ValueError(f"stage 1 aligns on captions with the 'plain' template, got model.template={self.model.template!r}")
        if self.stage == 2 and self.model.template == "plain":
            raise ValueError("stage 2 instruction-tunes with a chat template ('vicuna_v1' or 'phi'), not 'plain'")
        return self

    def _check_layout_for_every_worker_count(self) -> None:
        """``deepspeed.ep_size`` (a number, or 'auto') must give a valid layout at every worker count
        of the range; one error names all the counts that fail."""
        failures = {}
        for world in self.scaling.worker_counts:
            try:
                self.ep_size_for(world)
            except LayoutError as e:
                failures[world] = str(e)
        if not failures:
            return
        if len(failures) == 1:
            (world, message), = failures.items()
            raise ValueError(message)
        sizes = ", ".join(str(w) for w in failures)
        raise ValueError(f"deepspeed.ep_size ({self.deepspeed.ep_size}) does not fit {len(failures)} of the worker "
                         f"counts in scaling.num_workers: {sizes} (first: {next(iter(failures.values()))}); "
                         "use ep_size: auto or narrow the range")

    def ep_size_for(self, world_size: int) -> int:
        """The expert-parallel size at ``world_size`` workers (raises ``LayoutError`` naming the field)."""
        return resolve_ep_size(self.deepspeed.ep_size, world_size, self.deepspeed.zero_stage, self.expert_counts)

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
    def num_streams(self) -> int:
        return self.data.num_streams or self.scaling.max_workers

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


def field_reference(sections: tuple[str, ...] = ("data", "schedule", "deepspeed", "checkpoint", "scaling", "run")) -> str:
    """The job fields of ``sections`` with their defaults and descriptions (``mocha train --help``)."""
    from pydantic_core import PydanticUndefined

    lines = ["job fields (section.field [default]: description):"]
    for section in sections:
        model = JobConfig.model_fields[section].annotation
        for name, field in model.model_fields.items():
            if field.default is not PydanticUndefined:
                default = f" [{field.default}]"
            elif field.default_factory is not None:
                default = f" [{field.default_factory()}]"
            else:
                default = " [required]"
            lines.append(f"  {section}.{name}{default}" + (f": {field.description}" if field.description else ""))
    return "\n".join(lines)
