"""Hierarchical Group Attention (HGA): mixes the projected tokens of all encoders of one image.

The tokens of the encoders are concatenated per image (group ids ``0..G-1`` in concatenation
order) and HGA lets every token borrow information from similar tokens, inside its own encoder's
group and across groups. Three forms, chosen by ``HGAConfig.mode``:

``graph`` (the paper's reference form, exactly as the official code computes it)
    For one image with tokens ``x [N, D]``:

    * ``s_ij = cos(x_i, x_j) * exp(1 / mean_i ||x_i||)``, ``s_ii = -inf``;
    * ``intra_k = int(k * intra_share)``, ``inter_k = k - intra_k``; token ``i`` picks its top
      ``min(intra_k, |g_i| - 1)`` neighbours inside its group and top ``min(inter_k, N - |g_i|)``
      outside it;
    * all chosen edge scores of the image are min-max normalised together,
      ``w = (s - min) / (max - min + 1e-8)``, and every edge ``i -> j`` is also added reversed;
    * ``x_agg_i = sum_j w_ij x_j / (sum_j w_ij + 1e-8)`` over edges out of ``i`` (an edge chosen
      in both directions counts twice);
    * ``g_i = sigmoid(10 * (mean_d |x_i - x_agg_i| - 0.2))``, ``y_i = (1 - g_i) x_i + g_i x_agg_i``,
      output ``layer_norm(y)`` over features without affine parameters.

    ``hga_graph_batched`` computes this for a batch of images at once: one ``[B, N, N]``
    similarity, masked top-k for the two neighbour kinds (taking the largest cap of any group and
    masking the slots beyond each token's own cap), and the edges as a dense ``[B, N, N]`` weight
    matrix whose transpose adds the reversed edges. The two ``[B, N, N]`` tensors are its memory
    cost (4 bytes each entry: about 36 MB per image at N = 3000); ``chunk_size`` bounds it by
    processing that many images at a time. It computes in float32 whatever the input dtype (the
    min-max normalisation's 1e-8 is meaningless in bf16) and returns the input dtype.

``attention`` (a learnable form for ablations)
    Multi-head self-attention restricted to each group (run per group slice, so no ``N x N``
    mask), then every token attends to the ``G`` group summaries (mean of each group's tokens
    after the intra-group step, its own group included); a learned per-token sigmoid gate mixes
    the two, followed by a LayerNorm. No dropout: deterministic.

``off``
    Identity (gate 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mocha.config import HGAConfig

_EPS = 1e-8


class HGAOutput(NamedTuple):
    hidden_states: Tensor  #: [B, N, D]
    gate: Tensor  #: [B, N] per-token mixing gate in [0, 1]; zeros for ``off``


def group_ids_from_sizes(group_sizes: Sequence[int]) -> Tensor:
    """``[2, 3] -> tensor([0, 0, 1, 1, 1])``: group ids in concatenation order."""
    if len(group_sizes) == 0 or any(int(s) < 1 for s in group_sizes):
        raise ValueError(f"group_sizes must be a non-empty list of positive sizes, got {list(group_sizes)}")
    return torch.repeat_interleave(torch.arange(len(group_sizes)), torch.as_tensor(list(group_sizes)))


def split_k(k: int, intra_share: float) -> tuple[int, int]:
    """``(intra_k, inter_k) = (int(k * intra_share), k - intra_k)`` as in the official code."""
    intra_k = int(k * intra_share)
    return intra_k, k - intra_k


def hga_graph(x: Tensor, group_ids: Tensor, k: int = 10, intra_share: float = 0.7) -> tuple[Tensor, Tensor]:
    """Graph HGA of one image: x [N, D], group_ids [N] -> (output [N, D], gate [N])."""
    if x.dim() != 2:
        raise ValueError(f"hga_graph expects x of shape [N, D], got {tuple(x.shape)}")
    out, gate = hga_graph_batched(x.unsqueeze(0), group_ids, k, intra_share)
    return out[0], gate[0]


def hga_graph_batched(
    x: Tensor, group_ids: Tensor, k: int = 10, intra_share: float = 0.7, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Graph HGA of every image of x [B, N, D] (same ``group_ids`` [N] for all): -> ([B, N, D], [B, N]).

    ``chunk_size`` images are processed at a time (default: all), bounding the two
    ``[chunk_size, N, N]`` float32 tensors that dominate memory; results do not depend on it.
    """
    if x.dim() != 3:
        raise ValueError(f"hga_graph_batched expects x of shape [B, N, D], got {tuple(x.shape)}")
    if group_ids.shape != (x.shape[1],) or group_ids.dtype.is_floating_point:
        got = f"{group_ids.dtype} {tuple(group_ids.shape)}"
        raise ValueError(f"group_ids must be an integer tensor of shape [N={x.shape[1]}], got {got}")
    if k < 0 or not 0.0 <= intra_share <= 1.0:
        raise ValueError(f"need k >= 0 and 0 <= intra_share <= 1, got k={k}, intra_share={intra_share}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    intra_k, inter_k = split_k(k, intra_share)
    group_ids = group_ids.to(x.device)
    chunks = x.split(chunk_size) if chunk_size else (x,)
    results = [_graph_chunk(chunk, group_ids, intra_k, inter_k) for chunk in chunks]
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


def _chosen_edges(sim: Tensor, group_ids: Tensor, intra_k: int, inter_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's chosen neighbours: (scores [B, N, K], neighbour index [B, N, K], valid [N, K]).

    The caps differ per group, so each kind takes the top (largest cap) of its masked similarity
    and marks the slots beyond the token's own cap invalid. K = 0 when no token has a neighbour.
    """
    num_tokens = group_ids.shape[0]
    same_group = group_ids[:, None] == group_ids[None, :]
    not_self = ~torch.eye(num_tokens, dtype=torch.bool, device=sim.device)
    group_size = same_group.sum(dim=1)
    kinds = (
        (same_group & not_self, (group_size - 1).clamp(max=intra_k)),
        (~same_group, (num_tokens - group_size).clamp(max=inter_k)),
    )
    scores, index, valid = [], [], []
    for allowed, cap in kinds:
        top = int(cap.max())
        if top == 0:
            continue
        values, idx = sim.masked_fill(~allowed, float("-inf")).topk(top, dim=-1)
        scores.append(values)
        index.append(idx)
        valid.append(torch.arange(top, device=sim.device) < cap[:, None])
    if not scores:
        empty = sim.new_zeros(sim.shape[0], num_tokens, 0)
        return empty, empty.long(), torch.zeros(num_tokens, 0, dtype=torch.bool, device=sim.device)
    return torch.cat(scores, dim=-1), torch.cat(index, dim=-1), torch.cat(valid, dim=-1)


def _graph_chunk(x: Tensor, group_ids: Tensor, intra_k: int, inter_k: int) -> tuple[Tensor, Tensor]:
    xf = x.float()
    temperature = torch.exp(1.0 / xf.norm(dim=-1).mean(dim=-1))  # [B]
    unit = F.normalize(xf, dim=-1)
    sim = unit @ unit.transpose(1, 2) * temperature[:, None, None]  # [B, N, N]

    scores, neighbour, valid = _chosen_edges(sim, group_ids, intra_k, inter_k)
    valid = valid.expand_as(scores)
    scores = torch.where(valid, scores, 0.0)  # drop the -inf of invalid slots before any arithmetic
    low = torch.where(valid, scores, float("inf")).amin(dim=(1, 2), keepdim=True)
    high = torch.where(valid, scores, float("-inf")).amax(dim=(1, 2), keepdim=True)
    weight = torch.where(valid, (scores - low) / (high - low + _EPS), 0.0)

    forward_edges = torch.zeros_like(sim).scatter_add(2, neighbour, weight)  # [b, i, j] = w(i -> j)
    adjacency = forward_edges + forward_edges.transpose(1, 2)  # plus every edge reversed
    x_agg = (adjacency @ xf) / (adjacency.sum(dim=-1, keepdim=True) + _EPS)

    gate = torch.sigmoid(10.0 * ((xf - x_agg).abs().mean(dim=-1, keepdim=True) - 0.2))
    mixed = (1.0 - gate) * xf + gate * x_agg
    out = F.layer_norm(mixed, mixed.shape[-1:])
    return out.to(x.dtype), gate.squeeze(-1).to(x.dtype)


class GraphHGA(nn.Module):
    """The reference graph form over fixed groups (no parameters)."""

    def __init__(
        self, group_sizes: Sequence[int], k: int = 10, intra_share: float = 0.7, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        self.k = k
        self.intra_share = intra_share
        self.chunk_size = chunk_size
        self.register_buffer("group_ids", group_ids_from_sizes(group_sizes), persistent=False)

    def forward(self, x: Tensor) -> HGAOutput:
        _check_tokens(x, self.group_ids.numel())
        return HGAOutput(*hga_graph_batched(x, self.group_ids, self.k, self.intra_share, self.chunk_size))


class AttentionHGA(nn.Module):
    """Learnable HGA: attention inside each group, then over group summaries, mixed by a gate."""

    def __init__(self, dim: int, group_sizes: Sequence[int], num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention HGA: dim ({dim}) must be divisible by num_heads ({num_heads})")
        group_ids = group_ids_from_sizes(group_sizes)
        self.group_sizes = [int(s) for s in group_sizes]
        pool = F.one_hot(group_ids).T.float()
        self.register_buffer("group_mean", pool / pool.sum(dim=1, keepdim=True), persistent=False)  # [G, N]
        self.norm_in = nn.LayerNorm(dim)
        self.intra_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.inter_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.gate = nn.Linear(2 * dim, 1)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> HGAOutput:
        _check_tokens(x, self.group_mean.shape[1])
        normed = self.norm_in(x)
        intra = torch.cat(
            [self.intra_attn(g, g, g, need_weights=False)[0] for g in normed.split(self.group_sizes, dim=1)], dim=1
        )
        local = x + intra
        summaries = torch.einsum("gn,bnd->bgd", self.group_mean.to(local.dtype), local)  # [B, G, D]
        context = self.inter_attn(local, summaries, summaries, need_weights=False)[0]
        gate = torch.sigmoid(self.gate(torch.cat([local, context], dim=-1)))  # [B, N, 1]
        out = self.norm_out((1.0 - gate) * local + gate * context)
        return HGAOutput(out, gate.squeeze(-1))


class NoHGA(nn.Module):
    """HGA switched off: tokens pass through unchanged."""

    def forward(self, x: Tensor) -> HGAOutput:
        return HGAOutput(x, x.new_zeros(x.shape[:2]))


def _check_tokens(x: Tensor, num_tokens: int) -> None:
    if x.dim() != 3 or x.shape[1] != num_tokens:
        raise ValueError(f"HGA expects [B, N={num_tokens}, D] (sum of group sizes), got {tuple(x.shape)}")


def build_hga(cfg: HGAConfig, dim: int, group_sizes: Sequence[int]) -> nn.Module:
    """The HGA form ``cfg.mode`` names, for tokens of width ``dim`` in groups of ``group_sizes``."""
    if cfg.mode == "graph":
        return GraphHGA(group_sizes, cfg.k, cfg.intra_share, cfg.chunk_size)
    if cfg.mode == "attention":
        return AttentionHGA(dim, group_sizes, cfg.num_heads)
    if cfg.mode == "off":
        return NoHGA()
    raise ValueError(f"unknown HGA mode {cfg.mode!r} (expected 'graph', 'attention' or 'off')")
