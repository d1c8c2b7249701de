"""Expert parallelism for MoCHA's MoE layers, on DeepSpeed's expert groups.

Applied from outside the model (torchtitan style): ``apply_expert_parallel(model, ep_size)``
swaps every ``MoEConnector`` and ``MoEFeedForward`` for its expert-parallel twin by module
replacement on the parent; the model code itself never sees a process group.

Each expert-parallel layer keeps ``E / ep_size`` of the ``E`` experts on every rank of an expert
parallel (EP) group and routes with exactly the single-process math (``MoEConnector.route``:
float32 softmax, top-k, renormalised weights; the same balance and z losses). Token rows are
sent to the rank owning their expert with ``all_to_all_single`` using variable split sizes
(no capacity limit, no dropped tokens), run there grouped by expert, sent back and combined.
The result equals the single-process layer's up to float summation order.

DeepSpeed conventions, so that ZeRO-1/2 and ``split_params_into_different_moe_groups_for_optimizer``
treat the experts right:

* the layers are ``deepspeed.moe.layer.MoE`` subclasses: the engine detects MoE through that
  class (``has_moe_layers``), and only then reduces expert gradients over the expert *data*
  parallel group and partitions their optimizer state there. The parameters therefore live where
  DeepSpeed keeps them: the router at ``deepspeed_moe.gate.wg.weight``, the local experts at
  ``deepspeed_moe.experts.deepspeed_experts.{j}.*`` (``deepspeed.moe.experts.Experts`` marks them
  ``allreduce = False`` and ``group_name = "ep_size_{ep_size}"``). DeepSpeed's capacity-based
  GShard dispatch (``MOELayer.forward``) is not used.
* groups come from ``deepspeed.utils.groups._create_expert_and_data_parallel(ep_size)`` (the call
  ``MoE.set_deepspeed_parallelism`` makes): EP groups are consecutive ranks ``[i*ep, (i+1)*ep)``,
  expert-data-parallel groups are strided.

Checkpoints and exports use the *global* (single-process) names -- ``gate.weight``,
``experts.{i}.*`` under the layer's prefix -- so they load into any ``ep_size`` / world size:
``global_expert_state_dict`` gathers local experts into global names, ``localize_state_dict`` /
``load_global_expert_state_dict`` pick this rank's experts back out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import Tensor, nn

from mocha.model.connector import (
    ConnectorOutput,
    MoEConnector,
    RouterOutput,
    combine_expert_rows,
    plan_dispatch,
    run_and_combine,
    run_experts,
)
from mocha.model.moe_llm import MoEFeedForward, RecordsMoELosses, RoutingStats

_LOCAL_EXPERT_KEY = re.compile(r"^deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)$")
_LOCAL_GATE_KEY = "deepspeed_moe.gate.wg.weight"


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert (data) parallel groups of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def ensure_expert_groups(ep_size: int) -> str:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep_size`` once.

    Collective: every rank must call it (``new_group`` is). Returns the group name.
    """
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialised first "
                           "(mocha.train.engine.init_distributed, or Ray Train's worker group)")
    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must be >= 1 and divide the world size ({world})")
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return name


class ExpertParallelMoE(MoE):
    """Common part of the expert-parallel layers: router, local experts, token exchange.

    Built from a single-process layer (``from_dense_module``): every rank holds the same full layer
    (same seed or broadcast) and keeps experts ``[r * E/ep, (r+1) * E/ep)`` where ``r`` is its
    rank inside its EP group.
    """

    # The routing math is MoEConnector's, shared as methods (they read gate, in_features,
    # top_k and num_experts only).
    route = MoEConnector.route
    routing_losses = MoEConnector.routing_losses

    def __init__(self, dense: MoEConnector | MoEFeedForward, ep_size: int) -> None:
        if dense.num_experts % ep_size:
            raise ValueError(f"ep_size ({ep_size}) must divide num_experts ({dense.num_experts}) "
                             f"of {type(dense).__name__}")
        group_name = ensure_expert_groups(ep_size)
        super().__init__(hidden_size=dense.in_features, expert=dense.experts[0], num_experts=dense.num_experts,
                         ep_size=ep_size, k=dense.top_k, drop_tokens=False, use_rts=False)
        if self.expert_group_name != group_name:
            raise RuntimeError(f"DeepSpeed named the expert group {self.expert_group_name!r}, expected {group_name!r}")
        self.in_features = dense.in_features
        self.top_k = dense.top_k
        self.ep_group = groups._get_expert_parallel_group(group_name)
        self.ep_rank = dist.get_rank(group=self.ep_group)
        self.first_expert = self.ep_rank * self.num_local_experts
        with torch.no_grad():
            self.gate.to(dense.gate.weight).weight.copy_(dense.gate.weight)
            for j, expert in enumerate(self.local_experts):
                expert.load_state_dict(dense.experts[self.first_expert + j].state_dict())

    @classmethod
    def from_dense_module(cls, dense: MoEConnector | MoEFeedForward, ep_size: int) -> "ExpertParallelMoE":
        """This rank's expert-parallel share of ``dense`` (collective: creates the groups once)."""
        return cls(dense, ep_size)

    @property
    def gate(self) -> nn.Linear:
        """The router ``Linear(in, E, bias=False)`` (DeepSpeed keeps it in ``TopKGate.wg``)."""
        return self.deepspeed_moe.gate.wg

    @property
    def local_experts(self) -> nn.ModuleList:
        """This rank's experts; local expert ``j`` is global expert ``first_expert + j``."""
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine at init. The groups already exist (built at
        construction, where the layer had to know its rank to pick its experts)."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_ is not supported: expert groups were built "
                             "with DeepSpeed's default (expert-then-data) layout")

    def expert_parallel_combine(self, tokens: Tensor, routing: RouterOutput) -> Tensor:
        """tokens [T, in] + their routing -> sum_k w_k expert_k(token) [T, out], across the EP group."""
        plan = plan_dispatch(routing, self.num_experts)
        rows = tokens.index_select(0, plan.token_index)  # [T*k, in], grouped by global expert
        if self.ep_size == 1:
            return run_and_combine(rows, plan, self.local_experts, tokens.shape[0])

        ep, local = self.ep_size, self.num_local_experts
        # counts travel on the tokens' device (NCCL exchanges device tensors only)
        send_counts = torch.tensor(plan.counts, dtype=torch.long, device=rows.device)  # [dest rank * local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank * my local expert]
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        recv_counts_host = recv_counts.tolist()
        send_splits = [sum(plan.counts[r * local:(r + 1) * local]) for r in range(ep)]
        recv_splits = [sum(recv_counts_host[r * local:(r + 1) * local]) for r in range(ep)]

        received = _all_to_all(rows, recv_splits, send_splits, self.ep_group)  # by (source, local expert)
        local_expert_of_row = torch.arange(local, device=rows.device).repeat(ep).repeat_interleave(recv_counts)
        by_expert = torch.argsort(local_expert_of_row, stable=True)
        rows_per_local_expert = [sum(recv_counts_host[j::local]) for j in range(local)]
        expert_rows = self._run_local_experts(received[by_expert], rows_per_local_expert)
        back = torch.empty_like(expert_rows).index_copy(0, by_expert, expert_rows)  # undo the grouping
        returned = _all_to_all(back, send_splits, recv_splits, self.ep_group)
        return combine_expert_rows(returned, plan, tokens.shape[0])

    def _run_local_experts(self, rows: Tensor, counts: Sequence[int]) -> Tensor:
        if sum(counts) == 0:  # no token of the EP group chose our experts: keep the graph connected
            return self.local_experts[0](rows)
        return run_experts(rows, counts, self.local_experts)

    def moe_forward(self, x: Tensor) -> tuple[Tensor, RoutingStats]:
        """x [B, N, in] -> (y [B, N, out], routing stats) -- the single-process layer's forward."""
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects [B, N, {self.in_features}], got {tuple(x.shape)}")
        batch, seq, _ = x.shape
        tokens = x.reshape(-1, self.in_features)
        routing = self.route(tokens)
        hidden = self.expert_parallel_combine(tokens, routing)
        return hidden.reshape(batch, seq, -1), RoutingStats(*self.routing_losses(routing, batch))

    # -- global (single-process) parameter names ---------------------------------------------
    def global_name(self, local_name: str) -> str:
        """``deepspeed_moe.gate.wg.weight`` -> ``gate.weight``;
        ``deepspeed_moe.experts.deepspeed_experts.{j}.rest`` -> ``experts.{first_expert + j}.rest``."""
        if local_name == _LOCAL_GATE_KEY:
            return "gate.weight"
        match = _LOCAL_EXPERT_KEY.match(local_name)
        if match is None:
            raise KeyError(f"{type(self).__name__} has no parameter {local_name!r}")
        return f"experts.{self.first_expert + int(match.group(1))}.{match.group(2)}"

    def expert_slot(self, local_name: str) -> tuple[int, str] | None:
        """(local expert index, name inside the expert) for an expert parameter, else None."""
        match = _LOCAL_EXPERT_KEY.match(local_name)
        return None if match is None else (int(match.group(1)), match.group(2))


class ExpertParallelMoEConnector(ExpertParallelMoE):
    """Expert-parallel ``MoEConnector``: ``forward(x [B, N, in]) -> ConnectorOutput``."""

    def __init__(self, dense: MoEConnector, ep_size: int) -> None:
        super().__init__(dense, ep_size)
        self.out_features = dense.out_features

    def forward(self, x: Tensor) -> ConnectorOutput:  # type: ignore[override]
        hidden, stats = self.moe_forward(x)
        return ConnectorOutput(hidden, *stats)


class ExpertParallelMoEFeedForward(RecordsMoELosses, ExpertParallelMoE):
    """Expert-parallel ``MoEFeedForward``: ``forward(h [B, S, H]) -> [B, S, H]``; its routing
    stats are recorded for ``collect_moe_losses`` like the single-process layer's."""

    def __init__(self, dense: MoEFeedForward, ep_size: int) -> None:
        super().__init__(dense, ep_size)
        self.moe_stats = None

    def forward(self, hidden_states: Tensor) -> Tensor:  # type: ignore[override]
        hidden, self.moe_stats = self.moe_forward(hidden_states)
        return hidden


class _AllToAllRows(torch.autograd.Function):
    """``all_to_all_single`` of rows with variable split sizes; its gradient is the reverse exchange.

    (DeepSpeed's ``sharded_moe._AllToAll`` does the same for equal splits; the ``torch.distributed.nn``
    version is deprecated.)
    """

    @staticmethod
    def forward(ctx, rows: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (input_splits, output_splits), group
        out = rows.new_empty(sum(output_splits), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_splits, out_splits = ctx.splits
        return _AllToAllRows.apply(grad_out.contiguous(), grad_splits, out_splits, ctx.group), None, None, None


def _all_to_all(rows: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """Differentiable variable-size all_to_all: rows [sum(input_splits), D] -> [sum(output_splits), D]."""
    return _AllToAllRows.apply(rows, output_splits, input_splits, group)


# -- applying expert parallelism to a model --------------------------------------------------

_EP_CLASSES: dict[type[nn.Module], type[ExpertParallelMoE]] = {
    MoEConnector: ExpertParallelMoEConnector,
    MoEFeedForward: ExpertParallelMoEFeedForward,
}


def apply_expert_parallel(model: nn.Module, ep_size: int) -> list[str]:
    """Replace every ``MoEConnector`` / ``MoEFeedForward`` inside ``model`` by its expert-parallel
    twin (in place, via ``setattr`` on the parent). Collective. Returns the replaced module names.

    Raises ``ValueError`` if ``ep_size`` does not divide the world size or a layer's expert count.
    """
    ensure_expert_groups(ep_size)
    targets = [(name, module) for name, module in model.named_modules() if type(module) in _EP_CLASSES]
    if any(name == "" for name, _ in targets):
        raise ValueError("apply_expert_parallel replaces MoE layers inside a model; wrap the layer in a parent module")
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _EP_CLASSES[type(module)].from_dense_module(module, ep_size))
    return [name for name, _ in targets]


def expert_parallel_layers(model: nn.Module) -> Iterator[tuple[str, ExpertParallelMoE]]:
    """(name, layer) of every expert-parallel layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            yield name, module


def _owning_layer(layers: Sequence[tuple[str, ExpertParallelMoE]],
                  name: str) -> tuple[str, str, ExpertParallelMoE] | None:
    """(prefix with trailing dot, name inside the layer, layer) for a name inside an EP layer."""
    for prefix, layer in layers:
        if prefix == "":  # the model is the layer itself
            return "", name, layer
        if name.startswith(prefix + "."):
            return prefix + ".", name[len(prefix) + 1:], layer
    return None


def global_parameter_names(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Map local parameter names of ``model`` to their global (single-process) names.

    Names outside expert-parallel layers map to themselves. Not collective.
    """
    layers = list(expert_parallel_layers(model))
    mapping = {}
    for name in names:
        owner = _owning_layer(layers, name)
        if owner is None:
            mapping[name] = name
        else:
            prefix, rel, layer = owner
            mapping[name] = prefix + layer.global_name(rel)
    return mapping


def global_expert_state_dict(model: nn.Module, local: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Tensors named like ``model``'s parameters (default: its state dict), in global names,
    with every expert of every expert-parallel layer gathered from its EP group.

    Collective over each EP group: every rank must call it with the same keys in the same order
    (the local structure is identical on all ranks). Every rank receives the full result.
    """
    local = dict(model.state_dict() if local is None else local)
    layers = list(expert_parallel_layers(model))
    out: dict[str, Tensor] = {}
    for name, tensor in local.items():
        owner = _owning_layer(layers, name)
        if owner is None:
            out[name] = tensor
            continue
        prefix, rel, layer = owner
        slot = layer.expert_slot(rel)
        if slot is None or layer.ep_size == 1:
            out[prefix + layer.global_name(rel)] = tensor
            continue
        j, inner = slot
        gathered = [torch.empty_like(tensor) for _ in range(layer.ep_size)]
        dist.all_gather(gathered, tensor.contiguous(), group=layer.ep_group)
        for ep_rank, part in enumerate(gathered):
            out[f"{prefix}experts.{ep_rank * layer.num_local_experts + j}.{inner}"] = part
    return out


def localize_state_dict(model: nn.Module, global_state: Mapping[str, Tensor],
                        names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """This rank's share of a global-named state dict, in ``model``'s local names.

    ``names``: the local names wanted (default: all of ``model.state_dict()``). Raises
    ``KeyError`` naming every wanted tensor that ``global_state`` lacks. Not collective.
    """
    names = list(model.state_dict()) if names is None else list(names)
    mapping = global_parameter_names(model, names)
    missing = sorted(g for g in mapping.values() if g not in global_state)
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} tensors the model needs: {missing}")
    return {local: global_state[g] for local, g in mapping.items()}


def all_global_names(model: nn.Module, names: Sequence[str]) -> set[str]:
    """The global names of local parameters ``names`` on *every* rank of their EP groups
    (an expert-parallel checkpoint holds all of them). Not collective."""
    layers = list(expert_parallel_layers(model))
    out = set()
    for name in names:
        owner = _owning_layer(layers, name)
        slot = None if owner is None else owner[2].expert_slot(owner[1])
        if slot is None:
            out.add(global_parameter_names(model, [name])[name])
            continue
        prefix, _, layer = owner
        j, inner = slot
        out.update(f"{prefix}experts.{r * layer.num_local_experts + j}.{inner}" for r in range(layer.ep_size))
    return out


def load_global_expert_state_dict(model: nn.Module, global_state: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a global-named state dict (e.g. from a single-process model) into ``model``,
    expert-parallel or not. ``strict``: also reject global keys the model does not use."""
    local = localize_state_dict(model, global_state)
    if strict:
        unexpected = sorted(set(global_state) - all_global_names(model, list(model.state_dict())))
        if unexpected:
            raise KeyError(f"state dict has keys the model does not use: {unexpected}")
    model.load_state_dict(local, strict=True)
