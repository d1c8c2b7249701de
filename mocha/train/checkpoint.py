"""Consolidated, world-size-agnostic training checkpoints (no pickle).

A checkpoint directory written by ``save_checkpoint`` resumes on any number of workers and any
``ep_size`` (2 -> 1, 1 -> 2, ...) with the same trajectory, because nothing in it depends on how
the run was sharded:

* ``model.safetensors``: the trainable parameters in fp32 (DeepSpeed's master copy), under their
  *global* single-process names (``connectors.clip.experts.3.0.weight``, never a rank-local
  expert index). Frozen parameters are not saved: they come from the pretrained / seeded init.
* ``optimizer.safetensors``: AdamW's ``exp_avg/<name>`` and ``exp_avg_sq/<name>``, same names.
* ``rng.safetensors``: every rank's torch RNG state (uint8 tensors ``torch_cpu/rank{r}``,
  ``torch_cuda/rank{r}``).
* ``state.json`` (written last; its presence marks a complete checkpoint): optimizer step and
  learning rate, scheduler position, the engine's step/sample counters, world size, every rank's
  python and numpy RNG states, and the caller's ``extra_state`` (e.g. the data position
  ``{"samples_consumed": 1234}``).

Full tensors are assembled and re-partitioned with DeepSpeed's supported accessors
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and their
``safe_set_*`` twins) -- they reduce over each parameter's own data-parallel group, which for
experts is the expert-data-parallel group -- and experts are gathered from / scattered to their
expert-parallel group by ``mocha.parallel.expert``. Supported: ZeRO stages 0, 1 and 2 in
fp32 or bf16 (ZeRO-3 partitions parameters themselves and is refused with a clear error).

RNG states are restored only when the world size matches (there is no faithful mapping of N
generators onto M ranks); the loader logs when it skips them.

``export_trainable_state(model)`` returns the trainable weights in global names, e.g. for the
stage-1 -> stage-2 hand-off of the connectors (loaded there by exact key).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from mocha.parallel.expert import all_global_names, global_expert_state_dict, global_parameter_names
from mocha.io.layout import CHECKPOINT_OPTIMIZER_NAME, CHECKPOINT_RNG_NAME, CHECKPOINT_STATE_NAME, CHECKPOINT_WEIGHTS_NAME

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


# -- parameters and optimizer state, whatever the ZeRO stage -----------------------------------

def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _check_supported(engine) -> None:
    stage = engine.zero_optimization_stage()
    if stage not in (0, 1, 2):
        raise ValueError(f"consolidated checkpoints support ZeRO stages 0, 1 and 2, not {stage}")
    if stage == 0 and engine.fp16_enabled():
        raise ValueError("consolidated checkpoints do not support fp16 without ZeRO; use bf16 or ZeRO stage 1/2")


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (ZeRO and bf16 wrappers keep it in ``.optimizer``)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def _has_hp_mapping(param: Tensor) -> bool:
    return hasattr(param, "_hp_mapping")


def _full_fp32(param: nn.Parameter) -> Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param) if _has_hp_mapping(param) else param.detach()
    return value.float().clone()


def _full_optimizer_state(engine, param: nn.Parameter, key: str) -> Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    if _has_hp_mapping(param):
        return safe_get_full_optimizer_state(param, key).float().clone()
    return _base_optimizer(engine).state[param][key].float().clone()


def _optimizer_step(engine) -> int:
    """AdamW's step count (0 before the first step); the same for every state entry."""
    steps = {int(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer state entries disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def _link_optimizer_state(engine) -> None:
    """Point every parameter's DeepSpeed fragment view (``_hp_mapping``) at the optimizer state.

    DeepSpeed links them once, right after the first ``optimizer.step()`` of its *first* param
    group (ZeRO-1/2 step one group at a time), so the fragments of every later group -- the
    no-decay and the expert groups here -- stay empty and ``safe_get_full_optimizer_state``
    raises for them. Re-linking over all groups is what its own linker does, group by group.
    """
    base = _base_optimizer(engine)
    for param in engine.module.parameters():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            flat = base.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat, base.state[flat])


@torch.no_grad()
def _init_optimizer_state(engine, step: int) -> None:
    """Create AdamW's state (zeros at ``step``) where the optimizer has not stepped yet, set the
    step count everywhere, and link DeepSpeed's fragment views to it (``_link_optimizer_state``)."""
    base = _base_optimizer(engine)
    for group in base.param_groups:
        for flat in group["params"]:
            state = base.state[flat]
            if not state:
                state.update(step=torch.tensor(float(step)), exp_avg=torch.zeros_like(flat),
                             exp_avg_sq=torch.zeros_like(flat))
            else:
                state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step
    _link_optimizer_state(engine)


@torch.no_grad()
def _set_param_and_state(engine, param: nn.Parameter, value: Tensor, moments: dict[str, Tensor]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(param.device)
    if _has_hp_mapping(param):
        safe_set_full_fp32_param(param, value)
        for key, moment in moments.items():
            safe_set_full_optimizer_state(param, moment.to(param.device), key)
    else:
        state = _base_optimizer(engine).state[param]
        for key, moment in moments.items():
            state[key].copy_(moment)
    param.data.copy_(value.to(param.dtype))  # ZeRO 0-2 keep a full low-precision replica per rank


# -- learning-rate schedule ---------------------------------------------------------------------

def _scheduler_state(engine) -> dict[str, Any] | None:
    scheduler = engine.lr_scheduler
    if scheduler is None:
        return None
    _check_scheduler(scheduler)
    return {"last_epoch": scheduler.last_epoch}


def _check_scheduler(scheduler) -> None:
    if not isinstance(scheduler, LambdaLR):
        raise TypeError("checkpoints restore LambdaLR schedules (warmup_cosine_schedule), "
                        f"got {type(scheduler).__name__}")


def _restore_schedule(engine, saved: dict[str, Any] | None, lr: float) -> None:
    """Put the scheduler at the saved position and every param group at its lr. A LambdaLR's lr
    is a pure function of its position, so this works for any number of param groups."""
    scheduler = engine.lr_scheduler
    groups = _base_optimizer(engine).param_groups
    if scheduler is None or saved is None:
        for group in groups:
            group["lr"] = lr
        return
    _check_scheduler(scheduler)
    position = int(saved["last_epoch"])
    lrs = [base * fn(position) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    state = scheduler.state_dict()
    state.update(last_epoch=position, _step_count=position + 1, _last_lr=lrs)
    scheduler.load_state_dict(state)
    for group, group_lr in zip(groups, lrs):
        group["lr"] = group_lr


# -- RNG ------------------------------------------------------------------------------------------

def _to_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's byte string (variable length), on every rank."""
    world, device = dist.get_world_size(), _comm_device()
    payload = torch.tensor(list(data), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], device=device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [bytes(g[: int(s)].cpu().numpy()) for g, s in zip(gathered, sizes)]


def _local_rng_state() -> tuple[dict[str, bytes], dict[str, Any]]:
    """(torch generator states as bytes, python/numpy states as JSON-able values)."""
    tensors = {"torch_cpu": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
    }


def _restore_local_rng_state(tensors: dict[str, Tensor], states: dict[str, Any], rank: int) -> None:
    torch.set_rng_state(tensors[f"torch_cpu/rank{rank}"])
    if torch.cuda.is_available() and f"torch_cuda/rank{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"torch_cuda/rank{rank}"])
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))


# -- save / load ---------------------------------------------------------------------------------

def save_checkpoint(engine, model: nn.Module, directory: str | Path, extra_state: dict[str, Any]) -> None:
    """Write a consolidated checkpoint of ``engine`` / ``model`` to ``directory`` (local path).

    Collective: every rank calls it; rank 0 writes. ``extra_state`` must be JSON-serialisable
    (the caller's data position, ...); ``load_checkpoint`` returns it.
    """
    _check_supported(engine)
    try:
        extra_json = json.loads(json.dumps(extra_state))
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra_state must be JSON-serialisable: {e}") from None
    trainable = _trainable(model)
    step = _optimizer_step(engine)
    # full tensors are assembled and gathered on the parameters' device (NCCL needs it), then moved to CPU
    weights = _to_cpu(global_expert_state_dict(model, {name: _full_fp32(p) for name, p in trainable}))
    moments: dict[str, Tensor] = {}
    if step > 0:  # AdamW has no state before its first step
        _link_optimizer_state(engine)
        for key in ADAM_STATE_KEYS:
            local = {name: _full_optimizer_state(engine, p, key) for name, p in trainable}
            moments.update({f"{key}/{name}": t for name, t in _to_cpu(global_expert_state_dict(model, local)).items()})
    rng_tensors, rng_states = _local_rng_state()
    gathered_rng = {k: _all_gather_bytes(v) for k, v in rng_tensors.items()}
    gathered_states = [json.loads(b) for b in _all_gather_bytes(json.dumps(rng_states).encode())]
    lrs = {group["lr"] for group in _base_optimizer(engine).param_groups}
    if len(lrs) != 1:
        raise RuntimeError(f"param groups have different learning rates {sorted(lrs)}; one schedule expected")

    if dist.get_rank() == 0:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CHECKPOINT_STATE_NAME).unlink(missing_ok=True)  # a stale state.json must not mark partial files complete
        save_file(weights, str(directory / CHECKPOINT_WEIGHTS_NAME))
        if moments:
            save_file(moments, str(directory / CHECKPOINT_OPTIMIZER_NAME))
        save_file({f"{kind}/rank{r}": torch.frombuffer(bytearray(b), dtype=torch.uint8)
                   for kind, per_rank in gathered_rng.items() for r, b in enumerate(per_rank)},
                  str(directory / CHECKPOINT_RNG_NAME))
        state = {
            "format_version": FORMAT_VERSION,
            "world_size": dist.get_world_size(),
            "global_steps": int(engine.global_steps),
            "global_samples": int(engine.global_samples),
            "skipped_steps": int(engine.skipped_steps),
            "optimizer": {"step": step, "lr": lrs.pop()},
            "scheduler": _scheduler_state(engine),
            "rng": gathered_states,
            "extra_state": extra_json,
        }
        tmp = directory / (CHECKPOINT_STATE_NAME + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(directory / CHECKPOINT_STATE_NAME)
    dist.barrier()


def read_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """``state.json`` of a complete checkpoint; clear errors for a missing or foreign one."""
    path = Path(directory) / CHECKPOINT_STATE_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {CHECKPOINT_STATE_NAME}; not a (complete) mocha checkpoint")
    state = json.loads(path.read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
    return state


def load_checkpoint(engine, model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Restore ``engine`` / ``model`` from ``directory`` on any world size / ep_size.

    Collective: every rank calls it (each reads the files and sets its own shards / experts).
    Returns the ``extra_state`` given to ``save_checkpoint``.
    """
    _check_supported(engine)
    directory = Path(directory)
    state = read_checkpoint_state(directory)
    weights = load_file(str(directory / CHECKPOINT_WEIGHTS_NAME))
    trainable = _trainable(model)
    names = [name for name, _ in trainable]
    expected = all_global_names(model, names)
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise KeyError(f"{directory / CHECKPOINT_WEIGHTS_NAME} does not match the model's trainable parameters: "
                       f"missing {missing}, unexpected {unexpected}")
    global_name = global_parameter_names(model, names)
    step = int(state["optimizer"]["step"])
    moments = load_file(str(directory / CHECKPOINT_OPTIMIZER_NAME)) if step > 0 else {}

    if step > 0:
        _init_optimizer_state(engine, step)
    for name, param in trainable:
        g = global_name[name]
        _set_param_and_state(engine, param, weights[g], {k: moments[f"{k}/{g}"] for k in ADAM_STATE_KEYS if step > 0})
    _restore_schedule(engine, state["scheduler"], float(state["optimizer"]["lr"]))

    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    engine.micro_steps = state["global_steps"] * engine.gradient_accumulation_steps()

    rank, world = dist.get_rank(), dist.get_world_size()
    if state["world_size"] == world:
        _restore_local_rng_state(load_file(str(directory / CHECKPOINT_RNG_NAME)), state["rng"][rank], rank)
    elif rank == 0:
        log.warning("checkpoint written by %d ranks, resuming on %d: RNG states not restored",
                    state["world_size"], world)
    dist.barrier()
    return state["extra_state"]


def export_trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters in global (single-process) names, on CPU.

    Collective when the model is expert-parallel (experts are gathered). Use it for the
    stage-1 -> stage-2 hand-off; the receiving model loads the keys exactly.
    """
    local = {name: p.detach() for name, p in _trainable(model)}
    return _to_cpu(global_expert_state_dict(model, local) if dist.is_initialized() else local)
