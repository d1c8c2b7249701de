"""Optional MoE layers inside the LLM (MoE-LLaVA style sparse upcycling).

``upcycle_llm_ffn(llm, layers=[...], num_experts, top_k)`` replaces the feed-forward block
(``decoder.layers[i].mlp``; Phi and Llama alike) of the chosen decoder layers by a
``MoEFeedForward`` whose every expert starts as a copy of the dense FFN and whose router uses
MoCHA's connector math (``MoEConnector.route``: float32 softmax, top-k, weights renormalised to 1;
the same per-sample balance loss and z-loss). Because the k weights sum to 1 and all experts are
equal at init, the upcycled LLM computes exactly what the dense one did until training moves the
experts apart.

The decoder layer calls ``mlp(hidden_states)`` and expects a tensor back, so each MoE FFN records
its routing statistics of the last forward on itself (as DeepSpeed's ``MOELayer.l_aux`` does);
``collect_moe_losses(model)`` sums them for the training loss. The statistics cover every
position the layer saw, padding included (the FFN does not receive the attention mask).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mocha.model.connector import MoEConnector, dispatch_and_combine


class RoutingStats(NamedTuple):
    balance_loss: Tensor  #: float32 scalar
    z_loss: Tensor  #: float32 scalar
    expert_load: Tensor  #: [E] detached share of tokens whose top-1 expert is e


class RecordsMoELosses:
    """Marker for layers that keep the routing stats of their last forward in ``moe_stats``."""

    moe_stats: RoutingStats | None


class MoEFeedForward(RecordsMoELosses, nn.Module):
    """A sparse MoE replacement for a decoder layer's FFN: ``forward(h [B, S, H]) -> [B, S, H]``.

    ``gate``: ``Linear(H, E, bias=False)``; ``experts``: E copies of the dense FFN module.
    """

    # Same routing math as the MoE connector (these read gate, in_features, top_k, num_experts).
    route = MoEConnector.route
    routing_losses = MoEConnector.routing_losses

    def __init__(self, dense_ffn: nn.Module, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        reference = next(dense_ffn.parameters())
        self.in_features = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=reference.device, dtype=reference.dtype)
        self.experts = nn.ModuleList(copy.deepcopy(dense_ffn) for _ in range(num_experts))
        self.moe_stats = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.in_features:
            raise ValueError(f"MoEFeedForward expects [B, S, {self.in_features}], got {tuple(hidden_states.shape)}")
        batch = hidden_states.shape[0]
        tokens = hidden_states.reshape(-1, self.in_features)
        routing = self.route(tokens)
        self.moe_stats = RoutingStats(*self.routing_losses(routing, batch))
        return dispatch_and_combine(tokens, routing, self.experts).reshape_as(hidden_states)


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``llm.get_decoder().layers``)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(llm).__name__}: no decoder layer list at get_decoder().layers")
    return layers


@torch.no_grad()
def upcycle_llm_ffn(llm: nn.Module, layers: Sequence[int], num_experts: int, top_k: int) -> None:
    """Replace ``mlp`` of the decoder layers ``layers`` by ``MoEFeedForward`` upcycled from it (in place)."""
    blocks = decoder_layers(llm)
    if len(set(layers)) != len(layers):
        raise ValueError(f"moe layers must be distinct, got {list(layers)}")
    bad = [i for i in layers if not -len(blocks) <= i < len(blocks)]
    if bad:
        raise ValueError(f"moe layers {bad} out of range for an LLM with {len(blocks)} decoder layers")
    hidden_size = llm.config.hidden_size
    for i in layers:
        block = blocks[i]
        if isinstance(block.mlp, RecordsMoELosses):
            raise ValueError(f"decoder layer {i} already has an MoE feed-forward")
        block.mlp = MoEFeedForward(block.mlp, hidden_size, num_experts, top_k)


def moe_layers(model: nn.Module) -> list[tuple[str, RecordsMoELosses]]:
    """(name, layer) of every MoE FFN (single-process or expert-parallel) inside ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RecordsMoELosses)]


def collect_moe_losses(model: nn.Module) -> tuple[Tensor, Tensor]:
    """(sum of balance losses, sum of z-losses) of the MoE FFNs' last forward; zeros if none ran."""
    stats = [m.moe_stats for _, m in moe_layers(model) if m.moe_stats is not None]
    if not stats:
        device = next(model.parameters()).device
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return zero, zero
    return torch.stack([s.balance_loss for s in stats]).sum(), torch.stack([s.z_loss for s in stats]).sum()


def moe_expert_loads(model: nn.Module) -> dict[str, Tensor]:
    """Expert load [E] of every MoE FFN's last forward, by layer name (for metrics)."""
    return {name: m.moe_stats.expert_load for name, m in moe_layers(model) if m.moe_stats is not None}
