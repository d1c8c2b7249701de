"""Baselines in the official MoCHA code's style (github.com/Pbhgit/MoCHA), run on our modules' weights.

These follow the official implementation's structure, because that structure is what our
batched versions are measured against:

* ``official_moe_forward``: the official ``MLPMoE.forward`` -- router, losses, then a Python loop
  over the batch and, inside it, over the experts; each (sample, expert) pair finds its tokens
  with ``torch.where`` (a host sync) and runs the expert on them, accumulating into the output
  with an indexed ``+=``. That is ``B * E`` small expert calls per forward (and backward).
* ``official_hga_graph``: the official ``build_innovative_graph_v3`` +
  ``innovative_graph_propagation_v3`` for one image -- a Python loop over the groups building an
  edge list (row, col, score) with per-group masked top-k, min-max normalised edge weights, the
  reversed edges appended, then scatter-add propagation. The official model calls it once per
  image. ``torch_scatter.scatter_add`` is replaced by ``Tensor.index_add_`` (same sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mocha.model.connector import MoEConnector


def official_moe_forward(moe: MoEConnector, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, N, in] -> (output [B, N, out], balance loss, z-loss), the official way."""
    num_experts = moe.num_experts
    gate_logits = moe.gate(x)
    z_loss = torch.logsumexp(gate_logits, dim=-1).square().mean()
    gate_softmax = F.softmax(gate_logits, dim=-1, dtype=torch.float).to(x.dtype)  # [B, N, E]
    mean_prob = gate_softmax.mean(dim=-2)  # [B, E]
    weights, selected = torch.topk(gate_softmax, moe.top_k)  # [B, N, k]
    top1_share = F.one_hot(selected[..., 0], num_experts).float().mean(dim=-2)  # [B, E]
    balance = (mean_prob * top1_share).mean() * float(num_experts**2)
    weights = weights / weights.sum(dim=-1, keepdim=True)

    results = torch.zeros(x.shape[0], x.shape[1], moe.out_features, dtype=x.dtype, device=x.device)
    for b in range(x.shape[0]):
        for i, expert in enumerate(moe.experts):
            token_idx, nth_expert = torch.where(selected[b] == i)
            results[b][token_idx] += weights[b][token_idx, nth_expert, None] * expert(x[b][token_idx])
    return results, balance, z_loss


def official_hga_graph(x: Tensor, group_ids: Tensor, k: int = 10, intra_share: float = 0.7) -> tuple[Tensor, Tensor]:
    """One image x [N, D] -> (output [N, D], gate [N]), the official edge-list way."""
    num_tokens = x.shape[0]
    temperature = 1.0 / torch.norm(x, dim=1).mean()
    normed = F.normalize(x, p=2, dim=1)
    sim = (normed @ normed.t()) * torch.exp(temperature)
    sim.masked_fill_(torch.eye(num_tokens, dtype=torch.bool, device=x.device), float("-inf"))
    intra_k = int(k * intra_share)
    inter_k = k - intra_k

    rows, cols, scores = [], [], []
    for g in group_ids.unique():
        in_group = group_ids == g
        group_size = int(in_group.sum())
        members = torch.nonzero(in_group, as_tuple=True)[0]
        caps = (min(intra_k, group_size - 1), min(inter_k, num_tokens - group_size))
        allowed = (in_group[:, None] & in_group[None, :], in_group[:, None] & ~in_group[None, :])
        for cap, mask in zip(caps, allowed):
            if cap <= 0:
                continue
            values, idx = sim.masked_fill(~mask, float("-inf"))[members].topk(cap, dim=1)
            rows.append(members[:, None].expand(-1, cap).reshape(-1))
            cols.append(idx.reshape(-1))
            scores.append(values.reshape(-1))
    if not rows:
        return F.layer_norm(x, x.shape[1:]), x.new_zeros(num_tokens)
    row, col, score = torch.cat(rows), torch.cat(cols), torch.cat(scores)
    weight = (score - score.min()) / (score.max() - score.min() + 1e-8)
    row, col = torch.cat([row, col]), torch.cat([col, row])  # every edge also reversed
    weight = torch.cat([weight, weight.clone()])

    weight_sum = x.new_zeros(num_tokens).index_add_(0, row, weight) + 1e-8
    messages = x[col] * (weight / weight_sum[row]).unsqueeze(1)
    x_agg = x.new_zeros(x.shape).index_add_(0, row, messages)
    gate = torch.sigmoid(10 * (torch.abs(x - x_agg).mean(dim=1, keepdim=True) - 0.2))
    mixed = (1 - gate) * x + gate * x_agg
    return F.layer_norm(mixed, mixed.shape[1:]), gate.squeeze(1)


def official_hga_per_image(x: Tensor, group_ids: Tensor, k: int = 10, intra_share: float = 0.7) -> tuple[Tensor, Tensor]:
    """x [B, N, D]: the official per-image loop, stacked."""
    outs = [official_hga_graph(image, group_ids, k, intra_share) for image in x]
    return torch.stack([o for o, _ in outs]), torch.stack([g for _, g in outs])
