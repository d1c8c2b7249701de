"""Hierarchical Group Attention: the batched graph form against a per-image, per-edge loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mocha.config import HGAConfig
from mocha.model.hga import (
    AttentionHGA,
    GraphHGA,
    GroupLayout,
    NoHGA,
    _chosen_edges,
    _symmetric_pair_scores,
    build_hga,
    group_ids_from_sizes,
    hga_graph,
    hga_graph_batched,
)


def reference_hga_graph(x: torch.Tensor, group_ids: list[int], k: int, intra_share: float):
    """One image, written from the issue's definition with Python loops over tokens and edges (float64)."""
    x = x.double()
    n_tokens, dim = x.shape
    norms = [x[i].norm().item() for i in range(n_tokens)]
    scale = math.exp(1.0 / (sum(norms) / n_tokens))

    def score(i, j):
        return (x[i] @ x[j]).item() / (max(norms[i], 1e-12) * max(norms[j], 1e-12)) * scale

    intra_k = int(k * intra_share)
    inter_k = k - intra_k
    edges = []  # (i, j, s)
    for i in range(n_tokens):
        inside = [j for j in range(n_tokens) if group_ids[j] == group_ids[i] and j != i]
        outside = [j for j in range(n_tokens) if group_ids[j] != group_ids[i]]
        for candidates, cap in ((inside, intra_k), (outside, inter_k)):
            ranked = sorted(candidates, key=lambda j: -score(i, j))
            edges += [(i, j, score(i, j)) for j in ranked[: min(cap, len(candidates))]]

    lo = min((s for _, _, s in edges), default=0.0)
    hi = max((s for _, _, s in edges), default=0.0)
    weighted = [(i, j, (s - lo) / (hi - lo + 1e-8)) for i, j, s in edges]
    weighted += [(j, i, w) for i, j, w in weighted]

    out, gates = [], []
    for i in range(n_tokens):
        numerator = torch.zeros(dim, dtype=torch.float64)
        denominator = 0.0
        for src, dst, w in weighted:
            if src == i:
                numerator += w * x[dst]
                denominator += w
        x_agg = numerator / (denominator + 1e-8)
        gate = 1.0 / (1.0 + math.exp(-10.0 * ((x[i] - x_agg).abs().mean().item() - 0.2)))
        y = (1 - gate) * x[i] + gate * x_agg
        out.append((y - y.mean()) / torch.sqrt(y.var(unbiased=False) + 1e-5))
        gates.append(gate)
    return torch.stack(out), torch.tensor(gates, dtype=torch.float64)


CASES = [
    # (group sizes, k, intra_share)
    ([4, 3, 5, 2], 10, 0.7),  # the defaults, groups smaller than intra_k
    ([1, 4, 1, 3], 10, 0.7),  # groups of size 1: no intra neighbours
    ([6, 5], 3, 0.7),  # small k: intra 2, inter 1
    ([3, 3, 3], 40, 0.5),  # k larger than every group and than N
    ([7], 5, 0.7),  # one group: no inter neighbours
    ([2, 3], 4, 0.0),  # all k across groups
    ([2, 3], 4, 1.0),  # all k inside groups
]


@pytest.mark.parametrize("sizes,k,share", CASES)
def test_batched_graph_matches_per_image_loop(sizes, k, share):
    torch.manual_seed(sum(sizes) * 7 + k)
    group_ids = group_ids_from_sizes(sizes)
    x = torch.randn(3, len(group_ids), 8) * torch.tensor([0.5, 1.0, 3.0])[:, None, None]  # images differ in scale
    out, gate = hga_graph_batched(x, group_ids, k, share)
    assert out.shape == x.shape and gate.shape == x.shape[:2]
    for b in range(x.shape[0]):
        ref_out, ref_gate = reference_hga_graph(x[b], group_ids.tolist(), k, share)
        torch.testing.assert_close(out[b].double(), ref_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(gate[b].double(), ref_gate, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "sizes,k,share",
    [
        ([70, 5, 40, 33], 10, 0.7),  # several 32-column blocks per group; one group with fewer blocks than intra_k
        ([70, 5], 10, 0.7),  # group 0's rows have fewer outside blocks than inter_k: all of them are searched
        ([40, 70, 50], 10, 0.7),  # a middle group's outside blocks lie on both sides of its own
        ([100], 12, 0.7),  # one large group: intra only, sub-blocks searched
    ],
)
def test_batched_graph_matches_per_image_loop_on_multi_block_groups(sizes, k, share):
    """Groups wider than the 32-column blocks the top-k scans: the block-maxima search stays exact."""
    torch.manual_seed(len(sizes) * 11 + k)
    group_ids = group_ids_from_sizes(sizes)
    x = torch.randn(2, len(group_ids), 6) * torch.tensor([0.7, 2.0])[:, None, None]
    out, gate = hga_graph_batched(x, group_ids, k, share)
    for b in range(x.shape[0]):
        ref_out, ref_gate = reference_hga_graph(x[b], group_ids.tolist(), k, share)
        torch.testing.assert_close(out[b].double(), ref_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(gate[b].double(), ref_gate, atol=1e-5, rtol=0)


def test_chosen_edges_with_tied_similarities_are_distinct_and_the_top_k():
    """Repeated tokens tie in similarity, also across block boundaries: every token still picks
    distinct neighbours (none twice, never itself), intra ones inside its group and inter ones
    outside, and their scores are exactly the k largest of a dense masked similarity row (the
    multiset of values does not depend on how ties are broken; which tied token is picked does,
    in the official code too)."""
    torch.manual_seed(12)
    sizes, k, share = [70, 45, 38], 10, 0.7
    group_ids = group_ids_from_sizes(sizes)
    distinct = torch.nn.functional.normalize(torch.randn(2, 9, 6), dim=-1)
    unit = distinct[:, torch.randint(0, 9, (len(group_ids),))]  # every token repeated ~17 times
    layout = GroupLayout.from_group_ids(group_ids, k, share)
    scores, neighbours = _chosen_edges(unit, torch.ones(2), layout)
    dense = unit @ unit.transpose(1, 2)
    same_group = group_ids[:, None] == group_ids[None, :]
    eye = torch.eye(len(group_ids), dtype=torch.bool)
    for token in range(len(group_ids)):
        start = int(layout.row_starts[token])
        intra = layout.intra_caps[int(group_ids[token])]
        inter = layout.inter_caps[int(group_ids[token])]
        for kind, (first, count), allowed in (
            ("intra", (start, intra), same_group[token] & ~eye[token]),
            ("inter", (start + intra, inter), ~same_group[token]),
        ):
            picked = neighbours[:, first:first + count]
            for b in range(2):
                assert len(set(picked[b].tolist())) == count, (kind, token)
                assert bool(allowed[picked[b]].all()), (kind, token)
                expected = dense[b, token].masked_fill(~allowed, float("-inf")).topk(count).values
                torch.testing.assert_close(scores[b, first:first + count].sort(descending=True).values, expected)


def test_edges_chosen_both_ways_get_one_score():
    """s_ij = s_ji, but the matmul cells they come from may round differently: an edge chosen in
    both directions must get one bitwise-equal score (else a 1-ulp gap at the image's lowest score
    becomes an O(1) error after min-max normalisation); edges chosen one way keep theirs."""
    torch.manual_seed(13)
    group_ids = group_ids_from_sizes([2, 3, 4])
    layout = GroupLayout.from_group_ids(group_ids, k=3, intra_share=0.7)  # intra 2, inter 1
    unit = F.normalize(torch.randn(4, 9, 5), dim=-1)
    scores, neighbours = _chosen_edges(unit, torch.ones(4), layout)
    skewed = scores.clone()
    skewed[:, ::2] = torch.nextafter(scores[:, ::2], torch.full_like(scores[:, ::2], 2.0))  # every other edge 1 ulp up
    fixed = _symmetric_pair_scores(skewed, neighbours, layout)
    edges = [
        {(int(i), int(j)): e for e, (i, j) in enumerate(zip(layout.edge_rows, neighbours[b]))} for b in range(4)
    ]
    mutual_count = 0
    for b, by_pair in enumerate(edges):
        for (i, j), e in by_pair.items():
            if (j, i) in by_pair:
                mutual_count += 1
                assert fixed[b, e].item() == fixed[b, by_pair[(j, i)]].item(), (b, i, j)
                torch.testing.assert_close(fixed[b, e], scores[b, e])  # still the pair's score
            else:
                assert fixed[b, e].item() == skewed[b, e].item(), (b, i, j)
    assert 0 < mutual_count < sum(len(by_pair) for by_pair in edges)  # both kinds were exercised


def test_a_token_whose_only_edges_are_the_lowest_pair_gets_no_aggregate():
    """Groups [2, 3] with all k inside groups: each token of group 0 has one edge, to the other,
    chosen both ways. Where that pair is the image's lowest score its weights are exactly 0, so
    x_agg = 0: gate = sigmoid(10 (mean |x| - 0.2)) and out = layer_norm((1 - gate) x), however the
    matmul cells of s_01 and s_10 round (with MKL they differed by one ulp, and the output by up
    to 3.8)."""
    torch.manual_seed(14)
    images = 64
    direction = F.normalize(torch.randn(images, 1, 8), dim=-1)
    spread = 0.2 * torch.randn(images, 5, 8)
    x = torch.cat([torch.cat([direction, -direction], 1) + spread[:, :2], direction + spread[:, 2:]], 1)
    x = x * torch.empty(images, 1, 1).uniform_(0.3, 1.5)  # group 0 nearly opposite, group 1 alike; gates < 0.95
    group_ids = group_ids_from_sizes([2, 3])
    out, gate = hga_graph_batched(x, group_ids, k=4, intra_share=1.0)
    unit = F.normalize(x, dim=-1)
    sim = unit @ unit.transpose(1, 2)
    lowest_in_group_1 = sim[:, 2:, 2:].masked_fill(torch.eye(3, dtype=torch.bool), 2.0).amin(dim=(1, 2))
    degenerate = sim[:, 0, 1] < lowest_in_group_1 - 1e-3
    assert degenerate.sum() > images // 2  # the construction gives the case it is about
    expected_gate = torch.sigmoid(10.0 * (x[:, :2].abs().mean(dim=-1) - 0.2))
    expected_out = F.layer_norm((1 - expected_gate[..., None]) * x[:, :2], (8,))
    torch.testing.assert_close(gate[degenerate][:, :2], expected_gate[degenerate], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[degenerate][:, :2], expected_out[degenerate], atol=1e-5, rtol=0)
    for b in range(4):  # and the whole image against the per-edge loop
        ref_out, ref_gate = reference_hga_graph(x[b], group_ids.tolist(), 4, 1.0)
        torch.testing.assert_close(out[b].double(), ref_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(gate[b].double(), ref_gate, atol=1e-5, rtol=0)


def dense_hga_graph(x: torch.Tensor, group_ids: torch.Tensor, k: int, intra_share: float) -> torch.Tensor:
    """One image with a dense masked similarity, per-token top-k and a dense adjacency: a
    differentiable formulation of the same definition (float32), to compare gradients with."""
    n_tokens = x.shape[0]
    sim = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T * torch.exp(1.0 / x.norm(dim=-1).mean())
    same = group_ids[:, None] == group_ids[None, :]
    intra_k, inter_k = int(k * intra_share), k - int(k * intra_share)
    weights = torch.zeros(n_tokens, n_tokens)
    scores, cells = [], []
    for i in range(n_tokens):
        for allowed, cap in ((same[i] & (torch.arange(n_tokens) != i), intra_k), (~same[i], inter_k)):
            cap = min(cap, int(allowed.sum()))
            if cap:
                values, index = sim[i].masked_fill(~allowed, float("-inf")).topk(cap)
                scores.append(values)
                cells += [(i, int(j)) for j in index]
    scores = torch.cat(scores)
    normed = (scores - scores.min()) / (scores.max() - scores.min() + 1e-8)
    rows, cols = torch.tensor([c[0] for c in cells]), torch.tensor([c[1] for c in cells])
    weights = weights.index_put((rows, cols), normed, accumulate=True)
    adjacency = weights + weights.T
    x_agg = adjacency @ x / (adjacency.sum(dim=1, keepdim=True) + 1e-8)
    gate = torch.sigmoid(10.0 * ((x - x_agg).abs().mean(dim=-1, keepdim=True) - 0.2))
    return F.layer_norm((1 - gate) * x + gate * x_agg, x.shape[-1:])


def test_graph_gradients_match_a_dense_formulation():
    torch.manual_seed(6)
    group_ids = group_ids_from_sizes([40, 6, 35])
    x = torch.randn(2, len(group_ids), 8, requires_grad=True)
    probe = torch.randn(2, len(group_ids), 8)
    out, _ = hga_graph_batched(x, group_ids, k=10)
    (grad,) = torch.autograd.grad((out * probe).sum(), x)
    expected = torch.stack([
        torch.autograd.grad((dense_hga_graph(x[b], group_ids, 10, 0.7) * probe[b]).sum(), x)[0][b] for b in range(2)
    ])
    torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)


def test_group_layout_pads_groups_to_blocks_and_lists_edges_by_row():
    layout = GroupLayout.from_group_ids(torch.tensor([1, 1, 0, 1, 0]), k=3, intra_share=0.7)  # intra 2, inter 1
    assert layout.order.tolist() == [2, 4, 0, 1, 3]  # group 0 first, stable
    assert layout.bounds == ((0, 2), (2, 5)) and layout.intra_caps == (1, 2) and layout.inter_caps == (1, 1)
    assert layout.edge_rows.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert layout.row_starts.tolist() == [0, 2, 4, 7, 10]
    assert layout.padded_bounds == ((0, 32), (32, 64))
    assert layout.padded_tokens[layout.padded_columns].tolist() == [0, 1, 2, 3, 4]
    assert (layout.padding_score == 0).sum() == 5 and layout.padding_score.min() < -1  # padding below any cosine
    assert GroupLayout.from_group_ids(torch.tensor([0, 0, 1]), 3, 0.7).order is None  # already in group order


def test_no_edges_gives_the_normalised_input_like_the_official_code():
    x = torch.randn(2, 3, 4)
    out, gate = hga_graph_batched(x, torch.zeros(3, dtype=torch.long), k=0)
    torch.testing.assert_close(out, F.layer_norm(x, (4,)))
    assert torch.equal(gate, torch.zeros(2, 3))


def test_non_contiguous_group_ids_and_single_image_form():
    torch.manual_seed(1)
    group_ids = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0])
    x = torch.randn(9, 6)
    out, gate = hga_graph(x, group_ids, k=4, intra_share=0.5)
    ref_out, ref_gate = reference_hga_graph(x, group_ids.tolist(), 4, 0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(gate.double(), ref_gate, atol=1e-5, rtol=0)


def test_images_are_independent_and_chunking_changes_nothing():
    torch.manual_seed(2)
    group_ids = group_ids_from_sizes([3, 4, 2])
    x = torch.randn(5, 9, 6)
    out, gate = hga_graph_batched(x, group_ids, k=5)
    for chunk_size in (1, 2, 5):
        chunked = hga_graph_batched(x, group_ids, k=5, chunk_size=chunk_size)
        torch.testing.assert_close(chunked[0], out, atol=1e-6, rtol=0)
        torch.testing.assert_close(chunked[1], gate, atol=1e-6, rtol=0)
    alone = hga_graph(x[3], group_ids, k=5)
    torch.testing.assert_close(alone[0], out[3], atol=1e-6, rtol=0)


def test_graph_is_differentiable_and_keeps_dtype():
    torch.manual_seed(3)
    x = torch.randn(2, 7, 8, requires_grad=True)
    out, gate = hga_graph_batched(x, group_ids_from_sizes([3, 4]), k=4)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    half, half_gate = hga_graph_batched(x.detach().bfloat16(), group_ids_from_sizes([3, 4]), k=4)
    assert half.dtype == half_gate.dtype == torch.bfloat16


def test_graph_module_and_gate_range():
    torch.manual_seed(4)
    module = build_hga(HGAConfig(mode="graph", k=6, intra_share=0.5, chunk_size=2), dim=8, group_sizes=[2, 5, 3])
    assert isinstance(module, GraphHGA)
    x = torch.randn(3, 10, 8) * 0.3
    result = module(x)
    expected = hga_graph_batched(x, group_ids_from_sizes([2, 5, 3]), k=6, intra_share=0.5)
    torch.testing.assert_close(result.hidden_states, expected[0])
    assert ((result.gate >= 0) & (result.gate <= 1)).all()
    assert result.gate.std() > 0  # a per-token gate, not a constant
    with pytest.raises(ValueError, match=r"N=10"):
        module(torch.randn(3, 9, 8))


def test_attention_form_shapes_gradients_and_group_restriction():
    torch.manual_seed(5)
    sizes = [3, 2, 4]
    module = build_hga(HGAConfig(mode="attention", num_heads=2), dim=8, group_sizes=sizes)
    assert isinstance(module, AttentionHGA)
    x = torch.randn(2, 9, 8, requires_grad=True)
    result = module(x)
    assert result.hidden_states.shape == (2, 9, 8) and result.gate.shape == (2, 9)
    assert ((result.gate >= 0) & (result.gate <= 1)).all()
    torch.testing.assert_close(module(x).hidden_states, result.hidden_states)  # deterministic
    result.hidden_states.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert x.grad.abs().sum() > 0

    # Changing group 2's tokens moves group 0's output only through the cross-group step.
    x, moved = x.detach(), x.detach().clone()
    moved[:, 5:] += torch.randn(2, 4, 8)
    assert not torch.allclose(module(moved).hidden_states[:, :3], module(x).hidden_states[:, :3])
    with torch.no_grad():  # gate closed: the output is the intra-group step alone
        module.gate.weight.zero_()
        module.gate.bias.fill_(-1e4)
    torch.testing.assert_close(module(moved).hidden_states[:, :3], module(x).hidden_states[:, :3])
    assert not torch.allclose(module(moved).hidden_states[:, 5:], module(x).hidden_states[:, 5:])


def test_attention_form_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        AttentionHGA(dim=10, group_sizes=[2, 2], num_heads=4)


def test_off_is_identity_with_zero_gate():
    x = torch.randn(2, 5, 4)
    module = build_hga(HGAConfig(mode="off"), dim=4, group_sizes=[2, 3])
    assert isinstance(module, NoHGA)
    result = module(x)
    assert torch.equal(result.hidden_states, x) and torch.equal(result.gate, torch.zeros(2, 5))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="group_sizes"):
        group_ids_from_sizes([3, 0])
    with pytest.raises(ValueError, match="group_ids"):
        hga_graph_batched(torch.randn(1, 4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        hga_graph(torch.randn(1, 4, 2), torch.zeros(4, dtype=torch.long))
