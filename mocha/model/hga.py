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

    ``hga_graph_batched`` computes this for a batch of images at once, one encoder group's rows
    of the similarity at a time (``[B, |g|, N]``; never ``[B, N, N]``): the top-k of each kind is
    found by scanning block maxima of those rows instead of sorting every row
    (``_BlockedRows``), and the chosen edges are aggregated as an edge list by weighted gathers
    (``embedding_bag``), the reversed edges grouped by a sort, instead of a dense ``N x N``
    adjacency and matmul. An edge chosen in both directions gets one score for both (the
    matmul cells of ``s_ij`` and ``s_ji`` may round differently, and the min-max
    normalisation's 1e-8 turns a last-bit gap at the lowest score into an O(1) change).
    Peak memory is one group's similarity rows, ``B * |g| * N`` float32 (``chunk_size``
    images at a time bounds it further). What depends only on the groups (their
    order, padding, per-token neighbour caps, the edge rows) is a ``GroupLayout``, computed once
    per module. It computes in float32 whatever the input dtype (the min-max normalisation's
    1e-8 is meaningless in bf16) and returns the input dtype.

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
from dataclasses import dataclass, replace
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


#: Similarity rows are scanned in blocks of this many columns (then sub-blocks) to find their top-k;
#: each group's columns are padded to a multiple of it.
_BLOCK = 32
_SUB_BLOCK = 8
#: The similarity of every row with a padding column is its cosine with token 0 plus this, so
#: below any cosine (>= -1): never chosen while a token is left, as the neighbour caps ensure.
_PADDING_SCORE = -3.0


@dataclass(frozen=True)
class GroupLayout:
    """Where each group's tokens sit and how many neighbours of each kind they pick.

    Computed once per ``group_ids`` (``GraphHGA`` keeps it): tokens are taken in group order
    (``order`` permutes them there; ``None`` when the groups are already contiguous), group ``g``
    is ``bounds[g] = (start, end)`` in that order, and each of its tokens picks ``intra_caps[g]``
    neighbours inside the group, then ``inter_caps[g]`` outside it. The image's edges are listed
    row by row in that order: ``edge_rows[e]`` is the token that chose edge ``e`` and
    ``row_starts[i]`` is the first edge of token ``i``.

    Similarity rows are computed against a padded column layout in which every group spans a
    multiple of ``_BLOCK`` columns (``padded_bounds``): token ``i`` is column
    ``padded_columns[i]``, column ``c`` is token ``padded_tokens[c]`` (0 for padding), and
    ``padding_score[c]`` is what column ``c`` adds to every similarity: 0 for a token,
    ``_PADDING_SCORE`` for padding (see ``_chosen_edges``).
    """

    order: Tensor | None  #: [N] long
    bounds: tuple[tuple[int, int], ...]
    intra_caps: tuple[int, ...]
    inter_caps: tuple[int, ...]
    edge_rows: Tensor  #: [E] long
    row_starts: Tensor  #: [N] long
    padded_bounds: tuple[tuple[int, int], ...]
    padded_columns: Tensor  #: [N] long
    padded_tokens: Tensor  #: [padded width] long
    padding_score: Tensor  #: [padded width] float32

    @classmethod
    def from_group_ids(cls, group_ids: Tensor, k: int, intra_share: float) -> GroupLayout:
        if group_ids.dim() != 1 or group_ids.numel() == 0 or group_ids.dtype.is_floating_point:
            got = f"{group_ids.dtype} {tuple(group_ids.shape)}"
            raise ValueError(f"group_ids must be a non-empty 1-D integer tensor, got {got}")
        if k < 0 or not 0.0 <= intra_share <= 1.0:
            raise ValueError(f"need k >= 0 and 0 <= intra_share <= 1, got k={k}, intra_share={intra_share}")
        group_ids = group_ids.detach().cpu()
        order = torch.argsort(group_ids, stable=True)
        sizes = [int(s) for s in torch.unique_consecutive(group_ids[order], return_counts=True)[1]]
        num_tokens = group_ids.numel()
        intra_k, inter_k = split_k(k, intra_share)
        intra_caps = tuple(min(intra_k, size - 1) for size in sizes)
        inter_caps = tuple(min(inter_k, num_tokens - size) for size in sizes)
        per_group_degree = torch.tensor([intra + inter for intra, inter in zip(intra_caps, inter_caps)])
        degree = torch.repeat_interleave(per_group_degree, torch.tensor(sizes))  # [N] edges out of each token

        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        spans = [-(-size // _BLOCK) * _BLOCK for size in sizes]
        padded_starts = [sum(spans[:g]) for g in range(len(sizes))]
        padded_width = sum(spans)
        padded_columns = torch.cat([torch.arange(size) + p for size, p in zip(sizes, padded_starts)])
        padded_tokens = torch.zeros(padded_width, dtype=torch.long)
        padded_tokens.index_copy_(0, padded_columns, torch.arange(num_tokens))
        padding_score = torch.full((padded_width,), _PADDING_SCORE).index_fill_(0, padded_columns, 0.0)
        return cls(
            order=None if bool((order == torch.arange(num_tokens)).all()) else order,
            bounds=tuple((st, st + size) for st, size in zip(starts, sizes)),
            intra_caps=intra_caps,
            inter_caps=inter_caps,
            edge_rows=torch.repeat_interleave(torch.arange(num_tokens), degree),
            row_starts=torch.cumsum(degree, 0) - degree,
            padded_bounds=tuple((p, p + span) for p, span in zip(padded_starts, spans)),
            padded_columns=padded_columns,
            padded_tokens=padded_tokens,
            padding_score=padding_score,
        )

    @property
    def num_edges(self) -> int:
        return self.edge_rows.numel()

    def to(self, device: torch.device | str) -> GroupLayout:
        """This layout with its tensors on ``device``."""
        names = ("edge_rows", "row_starts", "padded_columns", "padded_tokens", "padding_score")
        moved = {name: getattr(self, name).to(device) for name in names}
        return replace(self, order=None if self.order is None else self.order.to(device), **moved)


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

    ``chunk_size`` images are processed at a time (default: all); results do not depend on it.
    """
    if x.dim() != 3:
        raise ValueError(f"hga_graph_batched expects x of shape [B, N, D], got {tuple(x.shape)}")
    if group_ids.shape != (x.shape[1],) or group_ids.dtype.is_floating_point:
        got = f"{group_ids.dtype} {tuple(group_ids.shape)}"
        raise ValueError(f"group_ids must be an integer tensor of shape [N={x.shape[1]}], got {got}")
    return hga_graph_with_layout(x, GroupLayout.from_group_ids(group_ids, k, intra_share), chunk_size)


def hga_graph_with_layout(x: Tensor, layout: GroupLayout, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """``hga_graph_batched`` with the group layout already computed (x [B, N, D] in the original token order)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    layout = layout.to(x.device)
    if layout.order is not None:
        x = x.index_select(1, layout.order)
    if layout.num_edges == 0:  # no token has a neighbour: the official code returns the normalised input
        out, gate = F.layer_norm(x.float(), x.shape[-1:]).to(x.dtype), x.new_zeros(x.shape[:2])
    else:
        results = [_graph_chunk(chunk, layout) for chunk in (x.split(chunk_size) if chunk_size else (x,))]
        out, gate = torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])
    if layout.order is not None:
        restore = torch.argsort(layout.order)
        out, gate = out.index_select(1, restore), gate.index_select(1, restore)
    return out, gate


def _chosen_edges(unit: Tensor, temperature: Tensor, layout: GroupLayout) -> tuple[Tensor, Tensor]:
    """Every token's chosen neighbours, row by row: (scores [B, E], neighbour index [B, E]).

    One group's rows of the cosine similarity at a time (``[B, |g|, padded width]``, never
    ``[B, N, N]``), with the row's own token set to ``-inf``: the group's own blocks of columns
    give the intra neighbours, all other blocks the inter neighbours. The vectors get one more
    coordinate, 1 on the rows and ``padding_score`` on the columns (0 for tokens), so the same
    matmul puts the padding columns below every cosine (the added term is an exact zero for
    token columns). The temperature is positive, so it scales only the chosen cosines (the same
    rounding as scaling all of them). ``s_ij`` and ``s_ji`` come from different cells of the
    matmuls and may differ in the last bit; ``_symmetric_pair_scores`` makes them equal.
    """
    batch = unit.shape[0]
    rows = torch.cat((unit, unit.new_ones(unit.shape[:-1]).unsqueeze(-1)), dim=-1)  # [B, N, D + 1]
    columns = rows.index_select(1, layout.padded_tokens)  # [B, padded width, D + 1]
    columns[:, :, -1] = layout.padding_score
    columns = columns.transpose(1, 2)
    scores, neighbours = [], []
    groups = zip(layout.bounds, layout.padded_bounds, layout.intra_caps, layout.inter_caps)
    for (start, end), (padded_start, padded_end), intra, inter in groups:
        if intra + inter == 0:
            continue
        sim = torch.bmm(rows[:, start:end], columns)  # [B, |g|, padded width]
        sim[:, :, padded_start:padded_end].diagonal(dim1=1, dim2=2).fill_(float("-inf"))
        blocked = _BlockedRows(sim.flatten(0, 1))
        own = (padded_start // _BLOCK, padded_end // _BLOCK)
        picked = [blocked.topk(cap, own, inside=inside) for cap, inside in ((intra, True), (inter, False)) if cap]
        scores.append(torch.cat([values for values, _ in picked], dim=-1).view(batch, -1) * temperature[:, None])
        index = torch.cat([index for _, index in picked], dim=-1).view(batch, -1)
        neighbours.append(layout.padded_tokens.take(index))
    return torch.cat(scores, dim=1), torch.cat(neighbours, dim=1)


class _BlockedRows:
    """Exact top-k of rows [R, L] (``L`` a multiple of ``_BLOCK``) over a range of column blocks.

    ``torch.topk`` copies and partially sorts every row, a cost per element and per row. Here
    one vectorised pass (``max_pool1d``) takes the maximum of every sub-block of ``_SUB_BLOCK``
    columns, and those give the maximum of every block of ``_BLOCK`` columns. The ``k`` largest
    values of a row lie in its ``k`` blocks with the largest maxima, and within those in the
    ``k`` sub-blocks with the largest maxima, so only those ``k * _SUB_BLOCK`` values are copied
    out for a ``torch.topk``. With ties the chosen (sub-)blocks still hold every value above the
    k-th largest and enough equal to it, so the k values are exact; which of equal values is
    picked may differ. Values stay differentiable (they are gathered from the rows).
    """

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows
        num_rows, width = rows.shape
        self.num_sub_blocks = width // _SUB_BLOCK
        with torch.no_grad():
            self.sub_maxima = F.max_pool1d(rows.unsqueeze(1), _SUB_BLOCK).view(num_rows, -1)  # [R, L / sub-block]
            self.maxima = self.sub_maxima.view(num_rows, width // _BLOCK, -1).amax(dim=-1)  # [R, L / block]

    def topk(self, k: int, blocks: tuple[int, int], inside: bool) -> tuple[Tensor, Tensor]:
        """(values [R, k], column [R, k]) of the k largest in blocks ``[first, stop)`` (or outside them)."""
        first, stop = blocks
        subs_per_block = _BLOCK // _SUB_BLOCK
        with torch.no_grad():
            if inside:
                allowed = self.maxima[:, first:stop]
            else:  # the blocks before and after [first, stop), side by side
                allowed = torch.cat((self.maxima[:, :first], self.maxima[:, stop:]), dim=1)
            chosen = allowed.topk(min(k, allowed.shape[1]), dim=-1, sorted=False).indices  # [R, c]
            chosen += first if inside else (chosen >= first) * (stop - first)  # back to block numbers
            subs = (chosen.unsqueeze(-1) * subs_per_block + torch.arange(subs_per_block, device=chosen.device))
            subs = subs.flatten(1)  # [R, c * subs_per_block]: the chosen blocks' sub-blocks
            if subs.shape[1] > k:
                best = self.sub_maxima.gather(1, subs).topk(k, dim=-1, sorted=False).indices
                subs = subs.gather(1, best)  # [R, k]
            num_rows = subs.shape[0]
            flat_subs = subs + (torch.arange(num_rows, device=subs.device) * self.num_sub_blocks).unsqueeze(1)
        candidates = self.rows.view(-1, _SUB_BLOCK).index_select(0, flat_subs.flatten()).view(num_rows, -1)
        values, position = candidates.topk(k, dim=-1, sorted=False)
        return values, subs.gather(1, position // _SUB_BLOCK) * _SUB_BLOCK + position % _SUB_BLOCK


def _symmetric_pair_scores(scores: Tensor, neighbours: Tensor, layout: GroupLayout) -> Tensor:
    """Scores [B, E] with every edge chosen in both directions (``i -> j`` and ``j -> i``) given one
    value, the mean of its two, bitwise the same both ways (``a + b == b + a`` in floating point).

    ``s_ij = s_ji`` by definition, but the two are computed in different cells of the similarity
    matmuls (one per group; a GEMM does not promise the same rounding for every cell, and on
    MKL a 2-row and a 3-row product round differently), so they can differ in the last bit. The
    min-max normalisation turns that into an O(1) error: when the pair is the image's lowest
    chosen score both weights must be exactly 0, so a token whose only edges are that pair gets
    ``x_agg = 0``; one ulp apart, one weight is ~6e-8 and ``x_agg = w x_j / (w + 1e-8)`` is
    ~0.86 ``x_j``. Edges chosen one way only keep their score (``(s + s) / 2 == s``).

    The two directions of a pair are found by one sort of the unordered-pair keys
    ``(image, min(i, j), max(i, j))``: a token never picks the same neighbour twice, so a key
    occurs at most twice, and the two occurrences end up side by side.
    """
    batch, num_edges = scores.shape
    num_tokens = layout.row_starts.numel()
    key_range = batch * num_tokens * num_tokens
    key_dtype = torch.int32 if key_range < 2**31 else torch.int64  # int32: a faster sort
    rows = layout.edge_rows.to(key_dtype).expand_as(neighbours)
    cols = neighbours.to(key_dtype)
    image = torch.arange(batch, device=scores.device, dtype=key_dtype)[:, None] * (num_tokens * num_tokens)
    keys = (image + torch.minimum(rows, cols) * num_tokens + torch.maximum(rows, cols)).flatten()
    sorted_keys, order = keys.sort()
    sorted_scores = scores.flatten().index_select(0, order)
    same_as_next = sorted_keys[1:] == sorted_keys[:-1]
    no = same_as_next.new_zeros(1)
    partner = torch.where(torch.cat((same_as_next, no)), sorted_scores.roll(-1), sorted_scores)
    partner = torch.where(torch.cat((no, same_as_next)), sorted_scores.roll(1), partner)
    paired = (sorted_scores + partner) * 0.5
    return torch.zeros_like(scores).flatten().scatter(0, order, paired).view(batch, num_edges)


def _aggregate(xf: Tensor, neighbours: Tensor, weight: Tensor, layout: GroupLayout) -> Tensor:
    """``x_agg_i = sum_j w_ij x_j / (sum_j w_ij + eps)`` over the chosen edges and their reverses.

    Weighted gathers (``embedding_bag``) over the edge list instead of an ``N x N`` adjacency:
    edges out of ``i`` are already grouped by row; the reversed ones are grouped by sorting on
    the neighbour. The division by the weight sum is folded into the per-edge weights (one
    division per edge instead of a pass over ``[B, N, D]``).
    """
    batch, num_tokens, dim = xf.shape
    device = xf.device
    table = xf.reshape(batch * num_tokens, dim)
    image_shift = torch.arange(batch, device=device)[:, None]
    cols = (neighbours + image_shift * num_tokens).flatten()
    rows = (layout.edge_rows + image_shift * num_tokens).flatten()
    w = weight.flatten()
    weight_sum = torch.zeros(batch * num_tokens, device=device).index_add_(0, rows, w).index_add_(0, cols, w)
    inverse_sum = 1.0 / (weight_sum + _EPS)
    starts = (layout.row_starts + image_shift * layout.num_edges).flatten()
    outgoing_weight = w * inverse_sum.index_select(0, rows)
    x_agg = F.embedding_bag(cols, table, starts, mode="sum", per_sample_weights=outgoing_weight)
    sorted_cols, by_neighbour = torch.sort(cols.int() if batch * num_tokens < 2**31 else cols)  # int32: 2x faster
    in_degree = torch.bincount(cols, minlength=batch * num_tokens)
    in_starts = torch.cumsum(in_degree, 0) - in_degree
    incoming_weight = w.index_select(0, by_neighbour) * inverse_sum.index_select(0, sorted_cols)
    incoming_rows = rows.index_select(0, by_neighbour)
    x_agg.add_(F.embedding_bag(incoming_rows, table, in_starts, mode="sum", per_sample_weights=incoming_weight))
    return x_agg.view(batch, num_tokens, dim)


def _graph_chunk(x: Tensor, layout: GroupLayout) -> tuple[Tensor, Tensor]:
    xf = x.float()
    norms = xf.norm(dim=-1, keepdim=True)  # [B, N, 1]
    temperature = torch.exp(1.0 / norms.mean(dim=(1, 2)))  # [B]
    unit = xf / norms.clamp_min(1e-12)  # F.normalize, reusing the norms
    scores, neighbours = _chosen_edges(unit, temperature, layout)
    scores = _symmetric_pair_scores(scores, neighbours, layout)
    low, high = scores.amin(dim=1, keepdim=True), scores.amax(dim=1, keepdim=True)
    weight = (scores - low) / (high - low + _EPS)  # min-max over all chosen edges of each image
    x_agg = _aggregate(xf, neighbours, weight, layout)

    gate = torch.sigmoid(10.0 * ((x_agg - xf).abs_().mean(dim=-1, keepdim=True) - 0.2))
    mixed = torch.lerp(xf, x_agg, gate)  # (1 - gate) * x + gate * x_agg
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
        self._layouts = {}  # device -> GroupLayout: computed once, not per call

    def layout(self, device: torch.device) -> GroupLayout:
        if device not in self._layouts:
            self._layouts[device] = GroupLayout.from_group_ids(self.group_ids, self.k, self.intra_share).to(device)
        return self._layouts[device]

    def forward(self, x: Tensor) -> HGAOutput:
        _check_tokens(x, self.group_ids.numel())
        return HGAOutput(*hga_graph_with_layout(x, self.layout(x.device), self.chunk_size))


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
