"""Connectors: map one vision encoder's tokens to the LLM's width.

``MoEConnector`` is MoCHA's sparse mixture-of-experts connector (MoEC), with the official code's
exact semantics so that released weights load and reproduce:

* router ``gate``: ``Linear(in, E, bias=False)``; experts: ``Linear(in, H) -> GELU -> Linear(H, H)``;
* ``p = softmax(logits)``; the top-k of ``p`` are renormalised to sum to 1;
  ``y = sum_k w_k * expert_k(x)``;
* balance loss per sample ``b``: ``Pbar[b, e]`` = mean over tokens of ``p``, ``f[b, e]`` = fraction of
  tokens whose top-1 expert is ``e``; loss = ``mean_{b,e}(Pbar * f) * E**2``;
* router z-loss = mean over tokens of ``logsumexp(logits)**2``.

Router softmax/logsumexp run in float32 whatever the model dtype. Experts run once each on the
tokens routed to them (grouped dispatch), never on every token. Dispatch is factored into
``plan_dispatch`` / ``run_experts`` / ``combine_expert_rows`` so that an expert-parallel connector
can reuse ``MoEConnector.route`` and exchange the planned rows between ranks in between; the
local path fuses the last two (``run_and_combine``: each expert's weighted rows go onto their
tokens in place, no concatenation).

``DenseConnector`` (LLaVA's ``mlp2x_gelu``) is the ablation baseline, and
``upcycle_dense_connector`` initialises every expert of a new MoE connector from a trained dense one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mocha.config import ConnectorConfig

ExpertFn = Callable[[Tensor], Tensor]


class ConnectorOutput(NamedTuple):
    hidden_states: Tensor  #: [B, N, out]
    balance_loss: Tensor  #: float32 scalar (0 for dense)
    z_loss: Tensor  #: float32 scalar (0 for dense)
    expert_load: Tensor  #: [E] detached: share of this batch's tokens whose top-1 expert is e; dense: [1] ones


class RouterOutput(NamedTuple):
    logits: Tensor  #: [T, E] in the gate's dtype
    probs: Tensor  #: [T, E] float32 softmax of logits
    topk_weight: Tensor  #: [T, k] float32, renormalised to sum to 1 per token
    topk_index: Tensor  #: [T, k] long, experts in descending probability


class DispatchPlan(NamedTuple):
    """The (token, slot) pairs of a routing, grouped by expert.

    Row ``r`` of the plan is one pair: token ``token_index[r]`` goes to its expert with weight
    ``weight[r]``; rows are sorted by expert (stable, so tokens keep their order inside an expert)
    and ``counts[e]`` rows belong to expert ``e`` -- the split sizes an all_to_all needs.
    """

    token_index: Tensor  #: [T*k] long
    weight: Tensor  #: [T*k] float32
    counts: list[int]  #: [E]


def routing_from_logits(logits: Tensor, top_k: int) -> RouterOutput:
    """Softmax (float32) over experts, top-k, renormalise the k weights to sum to 1."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, top_index = probs.topk(top_k, dim=-1)
    top_weight = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return RouterOutput(logits, probs, top_weight, top_index)


class Router(nn.Module):
    """A standalone top-k softmax router: ``gate`` = ``Linear(in, E, bias=False)``.

    ``MoEConnector`` keeps its ``gate`` at top level (the official weight layout) and shares the
    routing math through ``routing_from_logits``.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        _check_top_k(num_experts, top_k)
        self.top_k = top_k
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, tokens: Tensor) -> RouterOutput:
        """tokens [T, in] -> routing of each token."""
        return routing_from_logits(self.gate(tokens), self.top_k)


def balance_loss(probs: Tensor, top1_index: Tensor, num_experts: int) -> Tensor:
    """Per-sample load-balancing loss: ``mean_{b,e}(mean_n p[b,n,e] * frac_n(top1[b,n]==e)) * E**2``.

    probs [B, N, E] (float32), top1_index [B, N]. Gradients flow through ``probs`` only.
    """
    mean_prob = probs.float().mean(dim=1)  # [B, E]
    top1_share = F.one_hot(top1_index, num_experts).float().mean(dim=1)  # [B, E]
    return (mean_prob * top1_share).mean() * float(num_experts**2)


def router_z_loss(logits: Tensor) -> Tensor:
    """Mean over tokens of ``logsumexp(logits)**2`` (float32): keeps router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def plan_dispatch(routing: RouterOutput, num_experts: int) -> DispatchPlan:
    """Group the (token, slot) pairs of ``routing`` by expert."""
    top_k = routing.topk_index.shape[1]
    flat_expert = routing.topk_index.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)  # pair t * top_k + slot, grouped by expert
    token_index = torch.div(order, top_k, rounding_mode="floor")
    weight = routing.topk_weight.reshape(-1).index_select(0, order)
    counts = torch.bincount(flat_expert, minlength=num_experts).tolist()
    return DispatchPlan(token_index, weight, counts)


def run_experts(rows: Tensor, counts: Sequence[int], experts: Sequence[ExpertFn]) -> Tensor:
    """Run ``experts[e]`` once on its ``counts[e]`` consecutive rows.

    An expert with no rows still runs (on an empty chunk, at no cost), so its parameters are in
    the autograd graph and get a zero gradient rather than none: data-parallel gradient
    reductions (DDP, ZeRO) then see the same parameters on every rank, whichever experts that
    rank's tokens happened to reach.
    """
    if len(counts) != len(experts):
        raise ValueError(f"got {len(counts)} expert row counts for {len(experts)} experts")
    chunks = rows.split(list(counts))
    return torch.cat([expert(chunk) for expert, chunk in zip(experts, chunks)])


def combine_expert_rows(expert_rows: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Weight each expert output row and scatter-add it back onto its token: [T*k, out] -> [T, out]."""
    weighted = expert_rows * plan.weight.to(expert_rows.dtype).unsqueeze(-1)
    out = expert_rows.new_zeros(num_tokens, expert_rows.shape[-1])
    return out.index_add_(0, plan.token_index, weighted)


def run_and_combine(rows: Tensor, plan: DispatchPlan, experts: Sequence[ExpertFn], num_tokens: int) -> Tensor:
    """``combine_expert_rows(run_experts(rows, plan.counts, experts), plan, num_tokens)`` without
    concatenating the expert outputs: each expert's weighted rows are added onto their tokens
    (in place, into one ``[T, out]`` buffer) as soon as it has run. The sums are the same, in the
    same order; what goes is a copy of all ``T*k`` output rows and the ``[T*k, out]``
    temporaries of weighting them at once (and of its backward). Every expert runs, as in
    ``run_experts``.
    """
    if len(plan.counts) != len(experts):
        raise ValueError(f"got {len(plan.counts)} expert row counts for {len(experts)} experts")
    counts = list(plan.counts)
    out = None
    for expert, expert_rows, token_index, weight in zip(
        experts, rows.split(counts), plan.token_index.split(counts), plan.weight.split(counts)
    ):
        hidden = expert(expert_rows)
        if out is None:
            out = hidden.new_zeros(num_tokens, hidden.shape[-1])
        out = _AddWeightedRows.apply(out, hidden, weight.to(hidden.dtype), token_index)
    return out


class _AddWeightedRows(torch.autograd.Function):
    """``out.index_add_(0, index, rows * weight[:, None])``, in place, with a leaner backward.

    Autograd's own backward of the product would materialise two ``[n, out]`` products (the
    rows' gradient and, to be summed, the weights'); here the rows' gradient is the gathered
    output gradient scaled in place and the weights' gradient is a batched row-wise dot product.
    Same values: ``grad_rows = grad_out[index] * weight``, ``grad_weight = <grad_out[index], rows>``.
    """

    @staticmethod
    def forward(ctx, out: Tensor, rows: Tensor, weight: Tensor, index: Tensor) -> Tensor:
        out.index_add_(0, index, rows * weight.unsqueeze(-1))
        ctx.mark_dirty(out)
        ctx.save_for_backward(rows, weight, index)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, None]:
        rows, weight, index = ctx.saved_tensors
        grad_rows = grad_out.index_select(0, index)  # [n, out]: each row's token's output gradient
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = torch.bmm(grad_rows.unsqueeze(1), rows.unsqueeze(2)).view(-1)
        if ctx.needs_input_grad[1]:
            grad_rows.mul_(weight.unsqueeze(-1))
        return grad_out, grad_rows, grad_weight, None


def dispatch_and_combine(tokens: Tensor, routing: RouterOutput, experts: Sequence[ExpertFn]) -> Tensor:
    """The local (single-rank) MoE: tokens [T, in] + routing -> sum_k w_k expert_k(token), [T, out]."""
    plan = plan_dispatch(routing, len(experts))
    # index_select, not tokens[index]: its backward is one index_add, not an accumulating index_put
    return run_and_combine(tokens.index_select(0, plan.token_index), plan, experts, tokens.shape[0])


def _expert_mlp(in_features: int, out_features: int) -> nn.Sequential:
    """Linear-GELU-Linear with the official (and LLaVA ``mlp2x_gelu``) key layout ``0.*`` / ``2.*``."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


def _check_top_k(num_experts: int, top_k: int) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")


class MoEConnector(nn.Module):
    """Sparse MoE connector. ``forward(x [B, N, in]) -> ConnectorOutput``.

    The state dict has the official layout: ``gate.weight``, ``experts.{i}.{0,2}.{weight,bias}``.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        _check_top_k(num_experts, top_k)
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(in_features, num_experts, bias=False)
        self.experts = nn.ModuleList(_expert_mlp(in_features, out_features) for _ in range(num_experts))

    def route(self, x: Tensor) -> RouterOutput:
        """Routing of every token of x [..., in], flattened to T tokens."""
        return routing_from_logits(self.gate(x.reshape(-1, self.in_features)), self.top_k)

    def forward(self, x: Tensor) -> ConnectorOutput:
        if x.dim() != 3 or x.shape[-1] != self.in_features or x.shape[0] * x.shape[1] == 0:
            raise ValueError(f"MoEConnector expects a non-empty [B, N, {self.in_features}], got {tuple(x.shape)}")
        batch, seq, _ = x.shape
        tokens = x.reshape(-1, self.in_features)
        routing = self.route(tokens)
        hidden = dispatch_and_combine(tokens, routing, self.experts).reshape(batch, seq, self.out_features)
        return ConnectorOutput(hidden, *self.routing_losses(routing, batch))

    def routing_losses(self, routing: RouterOutput, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """(balance loss, z-loss, expert load) of a routing of ``batch_size`` equal-length samples."""
        top1 = routing.topk_index[:, 0]
        probs = routing.probs.reshape(batch_size, -1, self.num_experts)
        balance = balance_loss(probs, top1.reshape(batch_size, -1), self.num_experts)
        load = torch.bincount(top1, minlength=self.num_experts).float() / top1.numel()
        return balance, router_z_loss(routing.logits), load.detach()

    def load_reference_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str = "") -> None:
        """Load weights saved by the official MoCHA code (or by this class).

        Only keys that start with exactly ``prefix`` (a ``.`` is appended if missing) are taken,
        e.g. ``model.mm_projector.`` for CLIP. The official loader instead keeps every key that
        *contains* the keyword, so ``mm_projector`` also matches ``model.siglip_mm_projector.*``
        and loads another encoder's connector; exact prefixes cannot. Raises ``KeyError`` naming
        every missing and unexpected key, ``ValueError`` naming every shape mismatch.
        """
        if prefix and not prefix.endswith("."):
            prefix += "."
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        expected = self.state_dict()
        missing = sorted(set(expected) - set(own))
        unexpected = sorted(set(own) - set(expected))
        if missing or unexpected:
            hint = "" if own else " (no key starts with it)"
            raise KeyError(
                f"state dict does not match MoEConnector(E={self.num_experts}) under prefix {prefix!r}{hint}: "
                f"missing {[prefix + k for k in missing]}, unexpected {[prefix + k for k in unexpected]}"
            )
        bad_shapes = [
            f"{prefix}{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}"
            for k, v in own.items()
            if v.shape != expected[k].shape
        ]
        if bad_shapes:
            raise ValueError("shape mismatch loading MoEConnector: " + "; ".join(bad_shapes))
        self.load_state_dict(own, strict=True)


class DenseConnector(nn.Module):
    """LLaVA's two-layer MLP connector (``mlp2x_gelu``): the dense ablation baseline."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.mlp = _expert_mlp(in_features, out_features)

    def forward(self, x: Tensor) -> ConnectorOutput:
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        return ConnectorOutput(self.mlp(x), zero, zero, torch.ones(1, device=x.device))


@torch.no_grad()
def upcycle_dense_connector(dense: DenseConnector, num_experts: int = 4, top_k: int = 2) -> MoEConnector:
    """Sparse upcycling: a new MoE connector whose every expert is a copy of ``dense``'s MLP.

    The gate is freshly initialised; because all experts are equal and the top-k weights sum to
    1, the upcycled connector's output equals the dense one's for any routing at step 0.
    """
    param = next(dense.parameters())
    moe = MoEConnector(dense.in_features, dense.out_features, num_experts, top_k)
    moe.to(device=param.device, dtype=param.dtype)
    for expert in moe.experts:
        expert.load_state_dict(dense.mlp.state_dict())
    return moe


def build_connector(cfg: ConnectorConfig, in_features: int, out_features: int) -> nn.Module:
    """The connector ``cfg.kind`` names, mapping ``in_features`` -> ``out_features``."""
    if cfg.kind == "moe":
        return MoEConnector(in_features, out_features, cfg.num_experts, cfg.top_k)
    if cfg.kind == "dense":
        return DenseConnector(in_features, out_features)
    raise ValueError(f"unknown connector kind {cfg.kind!r} (expected 'moe' or 'dense')")
