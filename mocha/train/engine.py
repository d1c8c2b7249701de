"""The DeepSpeed engine for one training worker: config, expert parallelism, MoE param groups.

Called from the Ray Train worker function (``mocha.train.loop``) after Ray has created the
process group (gloo on CPU, NCCL on GPU)::

    settings = DeepSpeedSettings(zero_stage=2, micro_batch_size=4, grad_accum=2, lr=1e-3, ...)
    engine = initialize_engine(model, build_deepspeed_config(settings), ep_size=2,
                               lr_scheduler_fn=warmup_cosine_schedule(warmup_steps=10, total_steps=1000))

What ``initialize_engine`` does, in order:

1. ``init_distributed()``: hands the existing process group to ``deepspeed.comm`` (never creates
   one; on CPU it first switches off DeepSpeed's shared-memory comm op, whose JIT build costs
   ~90 s of g++ per fresh machine).
2. validates the parallel layout (``mocha.parallel.layout.check_layout``, the rules the job spec
   also checks): ``ep_size`` divides the world size and every MoE layer's expert count; ZeRO
   stage 3 only with ``ep_size == 1`` (the MoE layers then stay ordinary replicated modules).
3. ``apply_expert_parallel(model, ep_size)`` when ``ep_size > 1``.
4. optimizer param groups over the *trainable* parameters only: decay / no-decay (biases and
   1-D weights), each split by ``split_params_into_different_moe_groups_for_optimizer`` so that
   expert parameters get their own groups, reduced over the expert-data-parallel group.
5. ``deepspeed.initialize`` with torch's AdamW (``torch_adam``: never DeepSpeedCPUAdam, which
   JIT-compiles, nor FusedAdam, which needs CUDA ops built).

Learning-rate schedule: linear warmup then cosine decay, a ``torch.optim.lr_scheduler.LambdaLR``
(``warmup_cosine_schedule``). Chosen over DeepSpeed's ``WarmupCosineLR`` because that one trains
its first step at lr 0 (its ratio at iteration -1 and, with the default ``warmup_min_ratio``,
at 0) and its ``load_state_dict`` does not reset the optimizer's lr; the LambdaLR's lr is a pure
function of the step, which ``mocha.train.checkpoint`` restores on any world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from mocha.model.connector import MoEConnector
from mocha.parallel.expert import ExpertParallelMoE, apply_expert_parallel
from mocha.model.moe_llm import MoEFeedForward
from mocha.parallel.layout import check_layout

Precision = Literal["fp32", "bf16", "fp16"]
SchedulerFn = Callable[[Optimizer], Any]


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The training knobs that end up in the DeepSpeed config (one worker's view)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  #: ZeRO-Offload of optimizer state to CPU (stages 1-3)
    micro_batch_size: int = 1  #: samples per rank per forward
    grad_accum: int = 1  #: micro-batches per optimizer step
    grad_clip: float = 1.0  #: global grad-norm clip; 0 disables
    precision: Precision = "fp32"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    steps_per_print: int = 1_000_000  #: DeepSpeed's own log line; mocha reports metrics itself

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) and grad_accum ({self.grad_accum}) "
                             "must be >= 1")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


def build_deepspeed_config(settings: DeepSpeedSettings) -> dict[str, Any]:
    """A DeepSpeed config dict for ``settings`` (global batch = micro * accum * data-parallel size)."""
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.zero_stage in (1, 2):
        # MoE param groups need contiguous gradients and reduce-scatter (DeepSpeed asserts both).
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=False)
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW also with offload (no DeepSpeedCPUAdam JIT)
        "bf16": {"enabled": settings.precision == "bf16"},
        "fp16": {"enabled": settings.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {"torch_adam": True, "lr": settings.lr, "betas": list(settings.betas), "eps": settings.eps,
                       "weight_decay": settings.weight_decay},
        },
        "steps_per_print": settings.steps_per_print,
        "wall_clock_breakdown": False,
    }


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """lr multiplier at optimizer step ``step`` (0-based): ``(step+1)/warmup`` during warmup, then
    cosine from 1 down to ``min_ratio`` at ``total_steps``, and ``min_ratio`` after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> SchedulerFn:
    """``lr_scheduler_fn`` for ``initialize_engine``: a LambdaLR over ``warmup_cosine_factor``."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio)

    return lambda optimizer: LambdaLR(optimizer, factor)


def init_distributed() -> None:
    """Hand the already-initialised torch process group to ``deepspeed.comm``.

    Ray Train's workers (and the tests' spawned ranks) own the process group; DeepSpeed only
    wraps it. On CPU the shared-memory comm op is switched off first: building it JIT-compiles
    C++ for ~90 s and gloo does the job.
    """
    import deepspeed
    import deepspeed.ops

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: run inside a Ray Train worker, or "
                           "call torch.distributed.init_process_group first")
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The MoE layers (connectors and LLM FFNs, expert-parallel or not) in ``model``, by name."""
    kinds = (MoEConnector, MoEFeedForward, ExpertParallelMoE)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def check_parallel_layout(model: nn.Module, zero_stage: int, ep_size: int, world_size: int) -> None:
    """Reject layouts DeepSpeed would refuse later (or silently mis-handle), naming the field
    (``mocha.parallel.layout``: the same rules the job spec checks up front)."""
    counts = {f"MoE layer {name!r}": layer.num_experts for name, layer in moe_layers(model).items()}
    check_layout(world_size, zero_stage, ep_size, counts, ep_field="ep_size")


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Param groups over the trainable parameters: decay / no-decay (biases, norms and other
    1-D tensors), each split into dense and per-expert-group MoE groups the DeepSpeed way."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    param_groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(param_groups) if g["params"]]


def initialize_engine(model: nn.Module, ds_config: dict[str, Any], ep_size: int = 1,
                      lr_scheduler_fn: SchedulerFn | None = None):
    """Make ``model`` expert-parallel (``ep_size > 1``) and wrap it in a DeepSpeed engine.

    Collective: every rank calls it. Returns the ``DeepSpeedEngine``; its ``lr_scheduler`` is
    ``lr_scheduler_fn(optimizer)`` (e.g. ``warmup_cosine_schedule(...)``) or None.
    """
    import deepspeed

    init_distributed()
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    check_parallel_layout(model, zero_stage, ep_size, dist.get_world_size())
    if ep_size > 1:
        apply_expert_parallel(model, ep_size)
    weight_decay = float(ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_param_groups(model, weight_decay),
                                           config=ds_config, lr_scheduler=lr_scheduler_fn,
                                           dist_init_required=False)
    return engine
