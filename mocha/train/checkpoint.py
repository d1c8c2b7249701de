"""Sharded, world-size-agnostic training checkpoints, written by every rank in parallel (no pickle).

Layout of one checkpoint, ``<run_dir>/checkpoints/step-00000500/`` (local or ``s3://``)::

    shards/shard-00003-of-00016.safetensors   one per rank: that rank's fragments of the state
    index.json                                global tensor shapes, every fragment's file and range
    rng.safetensors                           every rank's torch RNG state
    metrics.jsonl                             the metrics history up to this step
    state.json                                written last: the checkpoint is complete only with it

**What a rank writes.** Only what it owns: under ZeRO-1/2 the fragment of each trainable
parameter's fp32 master weight and AdamW moments that lives in its optimizer partition
(DeepSpeed's ``_hp_mapping``: ``lp_fragment_address`` says where the fragment sits in the flat
parameter); under ZeRO-3 its partition of every parameter (``safe_get_local_fp32_param`` /
``safe_get_local_optimizer_state``); a replicated parameter (no ZeRO partitioning) is split evenly
over the ranks that hold a copy. Tensors are named ``<kind>/<global name>@<start>`` (kind =
``param``, ``exp_avg``, ``exp_avg_sq``), flat fp32 slices of the *global, single-process*
tensor: an expert is saved under its global name (``connectors.clip.experts.3.0.weight``, never a
rank-local index), so nothing in the files depends on the world size or ``ep_size``. Each rank
streams its file tensor by tensor (:mod:`mocha.io.tensor_files`): the fragments are views of the
optimizer's own flat buffers, so a save adds at most one tensor's CPU copy (on GPU) to a rank's
memory -- well inside the budget of 1.25 x its 1/N share + the largest tensor.

**What a rank reads.** ``index.json`` maps every global tensor to the fragments that cover it; a
rank computes the flat range it owns in the *current* layout (any world size, any ``ep_size``,
any ZeRO stage) and reads only the overlapping byte ranges (ranged GETs on S3) of the fp32 weights
and moments. Under ZeRO-1/2 a rank also holds a full low-precision replica of every parameter; it
is read one tensor at a time (measured: DeepSpeed's own rebuild, ``update_lp_params``, all-gathers
the whole flat buffer through a temporary as large as all weights, 1.5x the rank's share at N=4 on
gloo, over the bound). A replicated parameter (no ZeRO) is read whole, as the rank holds it whole.

**Complete or not.** Rank 0 writes ``state.json`` only after every rank's shard is written and the
fragments are checked to cover every tensor exactly; :func:`incomplete_reason` also checks every
shard file's recorded size, so a checkpoint torn by a kill mid-save (a missing shard, no marker)
is never resumed from: :func:`latest_checkpoint` skips it for the previous complete one and logs
why.

**Why our own format.** ``torch.distributed.checkpoint`` (torchtitan's choice) reshards
DTensor/ShardedTensor state dicts; DeepSpeed's ZeRO partitions are flat buffers shared by many
parameters, not DTensors, so DCP would first need the full tensors (what this replaces) or a
DTensor view DeepSpeed does not offer. DeepSpeed's own per-rank ZeRO files need an offline
``ds_to_universal`` conversion before they load on another world size, and both its files and
the universal ones are ``torch.load`` pickles (``weights_only=False``). This format keeps what we
need from both -- parallel per-rank writes (DCP, DeepSpeed), resharding on load from global names
(DCP, universal checkpoints) -- in safetensors, readable without mocha, with no conversion step.

**What runs.** ZeRO 0 (fp32/bf16), 1, 2 and 3, each in fp32 or bf16; expert parallelism with ZeRO
0-2 (DeepSpeed refuses its MoE layer under ZeRO-3, see ``mocha.parallel.layout``); ZeRO-3 with
the MoE layers replicated (``ep_size`` 1). fp16 without ZeRO is refused (its loss scaler state is
not saved).

RNG states are restored only when the world size matches (there is no faithful mapping of N
generators onto M ranks); the loader logs when it skips them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from mocha.io import storage
from mocha.io.layout import (CHECKPOINT_INDEX_NAME, CHECKPOINT_RNG_NAME, CHECKPOINT_SHARDS_DIR, CHECKPOINT_STATE_NAME,
                             CHECKPOINTS_DIR)
from mocha.io.tensor_files import TensorSpec, read_header, read_slice, write_tensors
from mocha.parallel.expert import all_global_names, global_expert_state_dict, global_parameter_names

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
PARAM = "param"


def checkpoint_url(run_dir: str, step: int) -> str:
    """Where the checkpoint of optimizer step ``step`` goes in a run directory."""
    return storage.join_url(run_dir, CHECKPOINTS_DIR, f"step-{step:08d}")


def _check_supported(engine) -> None:
    stage = engine.zero_optimization_stage()
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"checkpoints support ZeRO stages 0-3, not {stage}")
    if stage == 0 and engine.fp16_enabled():
        raise ValueError("checkpoints do not support fp16 without ZeRO; use bf16 or a ZeRO stage")


# -- this rank's share of every trainable parameter ----------------------------------------------

@dataclass
class Share:
    """The flat range ``[start, start + numel)`` of global tensor ``name`` this rank owns, and how
    to get and set its fp32 weight and optimizer moments."""

    name: str  # global name
    shape: tuple[int, ...]  # global shape
    param: nn.Parameter
    start: int
    numel: int
    how: str  # "hp" (ZeRO-1/2, bf16 optimizer), "z3" (ZeRO-3), "replica" (no partitioning)
    engine: Any

    @property
    def total(self) -> int:
        return math.prod(self.shape)

    def get(self, kind: str) -> Tensor:
        """This share's values (1-D fp32; a view of the optimizer's buffers where possible)."""
        p = self.param
        if self.how == "hp":
            return p._hp_mapping.get_hp_fragment(None if kind == PARAM else kind)
        if self.how == "z3":
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            local = safe_get_local_fp32_param(p) if kind == PARAM else safe_get_local_optimizer_state(p, kind)
            return local.reshape(-1)[: self.numel]
        full = p.detach() if kind == PARAM else _base_optimizer(self.engine).state[p][kind]
        return full.reshape(-1)[self.start: self.start + self.numel].float()

    @torch.no_grad()
    def set(self, kind: str, value: Tensor) -> None:
        """Load ``value`` (this share's range; the whole tensor for a replica)."""
        p = self.param
        if self.how == "hp":
            self.get(kind).copy_(value)
        elif self.how == "z3":
            from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

            padded = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=value.device)
            padded[: self.numel] = value
            if kind == PARAM:
                safe_set_local_fp32_param(p, padded.to(p.ds_tensor.device))
                p.ds_tensor.data.copy_(padded.to(p.ds_tensor.dtype))
            else:
                safe_set_local_optimizer_state(p, padded.to(p.ds_tensor.device), kind)
        elif kind == PARAM:
            p.data.copy_(value.view(p.shape).to(p.dtype))
        else:
            _base_optimizer(self.engine).state[p][kind].copy_(value.view(p.shape))


def _replica_group(param):
    """The ranks holding copies of a replicated parameter: its expert-data-parallel group for an
    expert, else the whole world."""
    from deepspeed.utils import groups

    if not getattr(param, "allreduce", True) and hasattr(param, "group_name"):
        return groups._get_expert_data_parallel_group(param.group_name)
    return None


def _shares(engine, model: nn.Module) -> list[Share]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    global_name = global_parameter_names(model, [n for n, _ in trainable])
    shares = []
    for name, p in trainable:
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flat parameter
            per_rank = p.ds_tensor.numel()
            start = dist.get_rank(group=p.ds_process_group) * per_rank
            shape = tuple(p.ds_shape)
            numel, how = max(0, min(per_rank, math.prod(shape) - start)), "z3"
        elif getattr(p, "_hp_mapping", None) is not None:
            address = p._hp_mapping.lp_fragment_address
            start, numel, shape, how = address.start, address.numel, tuple(p.shape), "hp"
        elif hasattr(p, "_hp_mapping"):  # partitioned, but none of it on this rank
            start, numel, shape, how = 0, 0, tuple(p.shape), "hp"
        else:  # a full replica on every rank of its group: each writes an even slice
            group = _replica_group(p)
            size, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
            per_rank = math.ceil(p.numel() / size)
            start = rank * per_rank
            numel, shape, how = max(0, min(per_rank, p.numel() - start)), tuple(p.shape), "replica"
        shares.append(Share(global_name[name], shape, p, start, numel, how, engine))
    return shares


# -- optimizer state ------------------------------------------------------------------------------

def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (ZeRO and bf16 wrappers keep it in ``.optimizer``)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


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
def _flat_params(engine) -> list[Tensor]:
    """The fp32 tensors the torch optimizer steps. ZeRO-3 keeps them outside the optimizer's
    param groups between steps (it puts each sub-group in only for its ``step``)."""
    z3 = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if z3 is not None:
        return list(z3)
    return [flat for group in _base_optimizer(engine).param_groups for flat in group["params"]]


def _init_optimizer_state(engine, step: int) -> None:
    """Create AdamW's state (zeros at ``step``) where the optimizer has not stepped yet, set the
    step count everywhere, and link DeepSpeed's fragment views to it (``_link_optimizer_state``)."""
    base = _base_optimizer(engine)
    for flat in _flat_params(engine):
        state = base.state[flat]
        if not state:
            state.update(step=torch.tensor(float(step)), exp_avg=torch.zeros_like(flat),
                         exp_avg_sq=torch.zeros_like(flat))
        else:
            state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step
    _link_optimizer_state(engine)


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


# -- save ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SaveStats:
    """What one save cost: logged and recorded in the metrics."""

    url: str
    bytes: int  # all ranks' shards
    rank_bytes_max: int  # the largest shard (the slowest writer's load)
    seconds: float

    def as_metrics(self) -> dict[str, float]:
        return {"checkpoint_bytes": self.bytes, "checkpoint_rank_bytes_max": self.rank_bytes_max,
                "checkpoint_seconds": self.seconds, "checkpoint_mb_per_s": self.bytes / 1e6 / max(self.seconds, 1e-9)}


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def save_checkpoint(engine, model: nn.Module, url: str, extra_state: dict[str, Any]) -> SaveStats:
    """Write a sharded checkpoint of ``engine`` / ``model`` to ``url`` (local path or ``s3://``).

    Collective: every rank writes its own shard in parallel, rank 0 the index and, last, the
    marker. ``extra_state`` must be JSON-serialisable (the caller's data position, ...);
    :func:`load_checkpoint` returns it."""
    _check_supported(engine)
    try:
        extra_json = json.loads(json.dumps(extra_state))
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra_state must be JSON-serialisable: {e}") from None
    rank, world = dist.get_rank(), dist.get_world_size()
    t_start = time.perf_counter()
    if rank == 0:  # a stale marker must never mark the files below complete
        storage.delete(storage.join_url(url, CHECKPOINT_STATE_NAME))
    dist.barrier()

    step = _optimizer_step(engine)
    kinds = (PARAM, *ADAM_STATE_KEYS) if step > 0 else (PARAM,)  # AdamW has no state before its first step
    if step > 0:
        _link_optimizer_state(engine)
    shares = [s for s in _shares(engine, model) if s.numel > 0]
    entries = [(kind, s) for s in shares for kind in kinds]
    specs = [TensorSpec(f"{kind}/{s.name}@{s.start}", torch.float32, s.numel) for kind, s in entries]
    shard = _shard_name(rank, world)
    size = write_tensors(storage.join_url(url, CHECKPOINT_SHARDS_DIR, shard), specs,
                         (s.get(kind).float() for kind, s in entries))
    mine = {"file": shard, "bytes": size, "shapes": {s.name: list(s.shape) for s in _shares(engine, model)},
            "fragments": [[kind, s.name, s.start, s.numel] for kind, s in entries]}
    everyone = [json.loads(b) for b in _all_gather_bytes(json.dumps(mine).encode())]
    rng_tensors, rng_states = _local_rng_state()
    gathered_rng = {k: _all_gather_bytes(v) for k, v in rng_tensors.items()}
    gathered_states = [json.loads(b) for b in _all_gather_bytes(json.dumps(rng_states).encode())]
    lrs = {group["lr"] for group in _base_optimizer(engine).param_groups}
    if len(lrs) != 1:
        raise RuntimeError(f"param groups have different learning rates {sorted(lrs)}; one schedule expected")

    if rank == 0:
        index = _build_index(everyone, kinds)
        storage.write_bytes(storage.join_url(url, CHECKPOINT_INDEX_NAME), json.dumps(index).encode())
        storage.write_bytes(storage.join_url(url, CHECKPOINT_RNG_NAME), save_safetensors(
            {f"{kind}/rank{r}": torch.frombuffer(bytearray(b), dtype=torch.uint8)
             for kind, per_rank in gathered_rng.items() for r, b in enumerate(per_rank)}))
        state = {
            "format_version": FORMAT_VERSION,
            "world_size": world,
            "global_steps": int(engine.global_steps),
            "global_samples": int(engine.global_samples),
            "skipped_steps": int(engine.skipped_steps),
            "optimizer": {"step": step, "lr": lrs.pop()},
            "scheduler": _scheduler_state(engine),
            "rng": gathered_states,
            "extra_state": extra_json,
        }
        storage.write_bytes(storage.join_url(url, CHECKPOINT_STATE_NAME), json.dumps(state, indent=1).encode())
    dist.barrier()
    sizes = [e["bytes"] for e in everyone]
    return SaveStats(url, sum(sizes), max(sizes), time.perf_counter() - t_start)


def _build_index(everyone: list[dict], kinds: tuple[str, ...]) -> dict[str, Any]:
    """The index rank 0 writes, after checking that the fragments tile every tensor exactly."""
    shapes: dict[str, list[int]] = {}
    for e in everyone:
        shapes.update(e["shapes"])
    fragments: dict[str, list[list]] = {f"{kind}/{name}": [] for kind in kinds for name in shapes}
    for e in everyone:
        for kind, name, start, numel in e["fragments"]:
            fragments[f"{kind}/{name}"].append([e["file"], start, numel])
    for key, pieces in fragments.items():
        pieces.sort(key=lambda piece: piece[1])
        covered = 0
        for _, start, numel in pieces:
            if start != covered:
                raise RuntimeError(f"checkpoint fragments of {key} do not tile it: gap or overlap at element {covered}")
            covered += numel
        if covered != math.prod(shapes[key.split("/", 1)[1]]):
            raise RuntimeError(f"checkpoint fragments of {key} cover {covered} elements, not its {shapes[key.split('/', 1)[1]]}")
    return {"format_version": FORMAT_VERSION, "shapes": shapes, "kinds": list(kinds),
            "shards": {e["file"]: e["bytes"] for e in everyone}, "fragments": fragments}


# -- finding and checking checkpoints --------------------------------------------------------------

def read_checkpoint_state(url: str) -> dict[str, Any]:
    """``state.json`` of a complete checkpoint; clear errors for a missing, foreign or bad one."""
    path = storage.join_url(url, CHECKPOINT_STATE_NAME)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no {CHECKPOINT_STATE_NAME}; not a (complete) mocha checkpoint")
    from mocha.train.checkpoint_state import parse_checkpoint_state

    # Strict schema: a ConfigError (a ValueError) naming the file and every bad field.
    text = storage.read_bytes(path).decode("utf-8", errors="replace")
    return parse_checkpoint_state(text, path, expected_version=FORMAT_VERSION).model_dump()


def read_index(url: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join_url(url, CHECKPOINT_INDEX_NAME)))


def incomplete_reason(url: str) -> str | None:
    """Why the checkpoint at ``url`` cannot be resumed from, or None when it is complete."""
    try:
        read_checkpoint_state(url)
        index = read_index(url)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    for name, size in index["shards"].items():
        found = storage.file_size(storage.join_url(url, CHECKPOINT_SHARDS_DIR, name))
        if found != size:
            return f"shard {name} is {'missing' if found is None else f'{found} bytes, expected {size}'}"
    return None


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint folders of a run, oldest first (complete or not)."""
    return [u for u in storage.list_dirs(storage.join_url(run_dir, CHECKPOINTS_DIR))
            if storage.basename(u).startswith("step-")]


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest *complete* checkpoint of a run; torn ones are skipped with a log line."""
    for url in reversed(list_checkpoints(run_dir)):
        reason = incomplete_reason(url)
        if reason is None:
            return url
        log.warning("[mocha] skipping incomplete checkpoint %s: %s", url, reason)  # once: no print (see mocha.train.metrics)
    return None


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints, and torn ones older than the newest
    complete one. Returns the deleted URLs."""
    urls = list_checkpoints(run_dir)
    complete = [u for u in urls if incomplete_reason(u) is None]
    newest = complete[-1] if complete else None
    doomed = complete[:-keep] if keep else complete
    if newest is not None:
        doomed += [u for u in urls if u not in complete and u < newest]
    for url in doomed:
        storage.delete_tree(url)
    return sorted(doomed)


# -- load ------------------------------------------------------------------------------------------

class _Reader:
    """Reads flat ranges of global tensors from the shards, fetching only the bytes asked for."""

    def __init__(self, url: str, index: dict[str, Any]):
        self.url, self.index = url, index
        self.headers: dict[str, dict] = {}

    def read(self, kind: str, name: str, start: int, numel: int) -> Tensor:
        out = torch.empty(numel, dtype=torch.float32)
        end = start + numel
        for file, f_start, f_numel in self.index["fragments"][f"{kind}/{name}"]:
            lo, hi = max(start, f_start), min(end, f_start + f_numel)
            if lo >= hi:
                continue
            shard = storage.join_url(self.url, CHECKPOINT_SHARDS_DIR, file)
            if shard not in self.headers:
                self.headers[shard] = read_header(shard)
            out[lo - start: hi - start] = read_slice(shard, self.headers[shard][f"{kind}/{name}@{f_start}"],
                                                     lo - f_start, hi - lo)
        return out


def load_checkpoint(engine, model: nn.Module, url: str) -> dict[str, Any]:
    """Restore ``engine`` / ``model`` from the checkpoint at ``url`` on any world size, ``ep_size``
    and ZeRO stage. Collective: every rank reads only the ranges it owns. Returns the
    ``extra_state`` given to :func:`save_checkpoint`."""
    _check_supported(engine)
    state = read_checkpoint_state(url)
    index = read_index(url)
    shares = _shares(engine, model)
    expected = all_global_names(model, [n for n, p in model.named_parameters() if p.requires_grad])
    saved = set(index["shapes"])
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise KeyError(f"{url} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for s in shares:
        if list(s.shape) != index["shapes"][s.name]:
            raise ValueError(f"{url}: {s.name} has shape {index['shapes'][s.name]}, the model {list(s.shape)}")
    step = int(state["optimizer"]["step"])
    kinds = (PARAM, *ADAM_STATE_KEYS) if step > 0 else (PARAM,)
    if step > 0:
        _init_optimizer_state(engine, step)
    reader = _Reader(url, index)
    with torch.no_grad():
        for s in shares:
            whole = s.how == "replica"  # the rank holds the whole tensor
            for kind in kinds:
                if whole:
                    s.set(kind, reader.read(kind, s.name, 0, s.total).to(s.param.device))
                elif s.numel:
                    s.set(kind, reader.read(kind, s.name, s.start, s.numel).to(s.param.device))
            if s.how == "hp":  # ZeRO-1/2 keep a full low-precision replica: read it one tensor at a time
                full = reader.read(PARAM, s.name, 0, s.total)
                s.param.data.copy_(full.view(s.param.shape).to(s.param.dtype))
                del full
    _restore_schedule(engine, state["scheduler"], float(state["optimizer"]["lr"]))

    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    engine.micro_steps = state["global_steps"] * engine.gradient_accumulation_steps()

    rank, world = dist.get_rank(), dist.get_world_size()
    if state["world_size"] == world:
        tensors = load_safetensors(storage.read_bytes(storage.join_url(url, CHECKPOINT_RNG_NAME)))
        _restore_local_rng_state(tensors, state["rng"][rank], rank)
    elif rank == 0:
        log.warning("checkpoint written by %d ranks, resuming on %d: RNG states not restored",
                    state["world_size"], world)
    dist.barrier()
    return state["extra_state"]


def read_trainable_weights(url: str) -> dict[str, Tensor]:
    """Every trainable tensor of a checkpoint, whole, in global names (one process: export)."""
    read_checkpoint_state(url)
    index = read_index(url)
    reader = _Reader(url, index)
    return {name: reader.read(PARAM, name, 0, math.prod(shape)).view(shape) for name, shape in index["shapes"].items()}


def export_trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters in global (single-process) names, on CPU.

    Collective when the model is expert-parallel (experts are gathered). Use it for the
    stage-1 -> stage-2 hand-off; the receiving model loads the keys exactly.
    """
    local = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return _to_cpu(global_expert_state_dict(model, local) if dist.is_initialized() else local)
