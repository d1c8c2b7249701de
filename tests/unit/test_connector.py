"""MoE / dense connectors against a per-token reference written from the issue's formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mocha.config import ConnectorConfig
from mocha.model.connector import (
    DenseConnector,
    MoEConnector,
    Router,
    _AddWeightedRows,
    balance_loss,
    build_connector,
    combine_expert_rows,
    dispatch_and_combine,
    plan_dispatch,
    router_z_loss,
    run_and_combine,
    run_experts,
    upcycle_dense_connector,
)

IN, OUT = 6, 5


def reference_moe(moe: MoEConnector, x: torch.Tensor):
    """The MoEC written as a plain loop over samples and tokens, in the dtype of ``moe``."""
    num_experts, top_k = moe.num_experts, moe.top_k
    batch, seq, _ = x.shape
    outputs, balance_terms, z_terms = [], [], []
    top1_counts = [0] * num_experts
    for b in range(batch):
        mean_prob = [0.0] * num_experts
        top1_share = [0.0] * num_experts
        rows = []
        for n in range(seq):
            token = x[b, n].to(moe.gate.weight.dtype)
            logits = moe.gate.weight @ token
            probs = torch.softmax(logits, dim=0)
            ranked = sorted(range(num_experts), key=lambda e: -probs[e].item())[:top_k]
            total = sum(probs[e] for e in ranked)
            y = sum(probs[e] / total * moe.experts[e](token) for e in ranked)
            rows.append(y)
            for e in range(num_experts):
                mean_prob[e] = mean_prob[e] + probs[e] / seq
            top1_share[ranked[0]] += 1.0 / seq
            top1_counts[ranked[0]] += 1
            z_terms.append(torch.logsumexp(logits, dim=0) ** 2)
        outputs.append(torch.stack(rows))
        balance_terms += [mean_prob[e] * top1_share[e] for e in range(num_experts)]
    balance = sum(balance_terms) / len(balance_terms) * num_experts**2
    load = torch.tensor(top1_counts, dtype=torch.float64) / (batch * seq)
    return torch.stack(outputs), balance, sum(z_terms) / len(z_terms), load


@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (4, 1), (4, 4), (1, 1), (3, 2)])
def test_moe_matches_per_token_reference(num_experts, top_k):
    torch.manual_seed(num_experts * 10 + top_k)
    moe = MoEConnector(IN, OUT, num_experts, top_k)
    x = torch.randn(3, 7, IN)
    out = moe(x)
    ref_out, ref_balance, ref_z, ref_load = reference_moe(copy.deepcopy(moe).double(), x)

    assert out.hidden_states.shape == (3, 7, OUT)
    torch.testing.assert_close(out.hidden_states.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.balance_loss.double(), ref_balance, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.z_loss.double(), ref_z, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.expert_load.double(), ref_load)
    assert out.balance_loss.dtype == out.z_loss.dtype == torch.float32
    assert not out.expert_load.requires_grad


def test_gradients_match_reference():
    torch.manual_seed(1)
    moe = MoEConnector(IN, OUT, num_experts=4, top_k=2)
    x = torch.randn(2, 5, IN)
    out = moe(x)
    (out.hidden_states.sum() + out.balance_loss + out.z_loss).backward()
    reference = copy.deepcopy(moe).double()
    ref_out, ref_balance, ref_z, _ = reference_moe(reference, x)
    (ref_out.sum() + ref_balance + ref_z).backward()
    for (name, p), ref in zip(moe.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (ref.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)


def test_topk_weights_renormalised_and_ordered():
    torch.manual_seed(2)
    moe = MoEConnector(IN, OUT, num_experts=5, top_k=3)
    routing = moe.route(torch.randn(4, 9, IN))
    assert routing.topk_weight.shape == routing.topk_index.shape == (36, 3)
    torch.testing.assert_close(routing.topk_weight.sum(-1), torch.ones(36))
    assert (routing.topk_weight[:, :-1] >= routing.topk_weight[:, 1:]).all()
    torch.testing.assert_close(routing.probs.gather(1, routing.topk_index[:, :1]), routing.probs.amax(1, keepdim=True))


def test_top_k_equal_to_num_experts_is_probability_weighted_sum():
    torch.manual_seed(3)
    moe = MoEConnector(IN, OUT, num_experts=3, top_k=3)
    x = torch.randn(2, 4, IN)
    probs = torch.softmax(moe.gate(x), dim=-1)
    dense_mix = sum(probs[..., e : e + 1] * moe.experts[e](x) for e in range(3))
    torch.testing.assert_close(moe(x).hidden_states, dense_mix, atol=1e-6, rtol=1e-5)


def test_experts_without_tokens_get_zero_gradient_not_none():
    """Zero (not missing) gradients keep data-parallel reductions identical across ranks."""
    torch.manual_seed(4)
    moe = MoEConnector(IN, OUT, num_experts=4, top_k=2)
    with torch.no_grad():  # positive inputs, experts 0/1 positive gate rows, 2/3 negative: top-2 is always {0, 1}
        moe.gate.weight.copy_(torch.rand(4, IN) + 0.1)
        moe.gate.weight[2:] *= -1
    x = torch.rand(2, 6, IN) + 0.1
    out = moe(x)
    assert set(moe.route(x).topk_index.unique().tolist()) == {0, 1}
    (out.hidden_states.square().sum() + out.balance_loss + out.z_loss).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    for e in (0, 1):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.experts[e].parameters())
    for e in (2, 3):
        assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in moe.experts[e].parameters())
    assert out.expert_load[2:].sum() == 0 and out.expert_load.sum().item() == pytest.approx(1.0)


def test_each_expert_runs_once_on_exactly_its_tokens():
    torch.manual_seed(5)
    moe = MoEConnector(IN, OUT, num_experts=4, top_k=2)
    tokens = torch.randn(11, IN)
    routing = moe.route(tokens)
    calls: dict[int, torch.Tensor] = {}

    def recording(e):
        def run(rows):
            assert e not in calls, f"expert {e} ran twice"
            calls[e] = rows
            return moe.experts[e](rows)

        return run

    combined = dispatch_and_combine(tokens, routing, [recording(e) for e in range(4)])
    for e in range(4):
        routed = (routing.topk_index == e).any(dim=1)
        if routed.any():
            torch.testing.assert_close(calls[e], tokens[routed])
        else:
            assert calls[e].shape[0] == 0  # runs on an empty chunk (zero gradient, see run_experts)
    assert sum(len(rows) for rows in calls.values()) == 11 * 2
    torch.testing.assert_close(combined, moe(tokens[None]).hidden_states[0])


def test_run_and_combine_equals_concatenated_experts_then_combine():
    """The in-place per-expert combine is the same sum as running all experts, concatenating and
    combining once (the expert-parallel path), in outputs and gradients, with an expert left idle."""
    torch.manual_seed(7)
    moe = MoEConnector(IN, OUT, num_experts=4, top_k=2)
    with torch.no_grad():
        moe.gate.weight[3] = -10.0  # with positive tokens, expert 3 gets none
    tokens = (torch.rand(13, IN) + 0.1).requires_grad_(True)
    routing = moe.route(tokens)
    plan = plan_dispatch(routing, 4)
    assert plan.counts[3] == 0
    rows = tokens.index_select(0, plan.token_index)
    probe = torch.randn(13, OUT)

    def grads(out):
        moe.zero_grad(set_to_none=True)
        tokens.grad = None
        (out * probe).sum().backward(retain_graph=True)
        return [tokens.grad.clone()] + [p.grad.clone() for p in moe.parameters() if p.grad is not None]

    fused = run_and_combine(rows, plan, moe.experts, 13)
    fused_grads = grads(fused)
    reference = combine_expert_rows(run_experts(rows, plan.counts, moe.experts), plan, 13)
    reference_grads = grads(reference)
    assert torch.equal(fused, reference)
    assert len(fused_grads) == len(reference_grads) == 1 + 1 + 4 * 4  # tokens, gate, every expert (idle ones too)
    for a, b in zip(fused_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="3 experts"):
        run_and_combine(rows, plan, moe.experts[:3], 13)


def test_weighted_row_add_backward_is_the_exact_gradient():
    """The combine's hand-written backward (gathered output gradient scaled in place, row-wise
    dot products for the weights) against finite differences, with a token hit twice."""
    torch.manual_seed(8)
    rows = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(5, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([2, 0, 2, 3, 1])

    def combine(rows, weight):
        return _AddWeightedRows.apply(torch.zeros(4, 3, dtype=torch.float64), rows, weight, index)

    assert torch.autograd.gradcheck(combine, (rows, weight))
    expected = torch.zeros(4, 3, dtype=torch.float64).index_add_(0, index, rows * weight[:, None])
    assert torch.equal(combine(rows, weight), expected)


def test_router_module_matches_connector_routing():
    torch.manual_seed(6)
    moe = MoEConnector(IN, OUT, num_experts=4, top_k=2)
    router = Router(IN, 4, top_k=2)
    router.gate.load_state_dict(moe.gate.state_dict())
    tokens = torch.randn(10, IN)
    for a, b in zip(router(tokens), moe.route(tokens)):
        torch.testing.assert_close(a, b)


def test_loss_functions_on_known_values():
    # Two tokens of one sample, both with top-1 expert 0; E=2.
    probs = torch.tensor([[[0.75, 0.25], [0.25, 0.75]]])
    # Pbar = [0.5, 0.5], f = [1, 0] -> mean(P*f) = 0.25, times E^2 = 1.0
    assert balance_loss(probs, torch.tensor([[0, 0]]), 2).item() == pytest.approx(1.0)
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # logsumexp = [log 2, 1 + log 2]
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2)


def test_bf16_connector_keeps_float32_losses():
    torch.manual_seed(7)
    moe = MoEConnector(IN, OUT).to(torch.bfloat16)
    out = moe(torch.randn(2, 3, IN, dtype=torch.bfloat16))
    assert out.hidden_states.dtype == torch.bfloat16
    assert out.balance_loss.dtype == out.z_loss.dtype == torch.float32


def official_state_dict(moe: MoEConnector, prefix: str) -> dict[str, torch.Tensor]:
    """The key layout the official MoCHA code saves: <prefix>gate.weight, <prefix>experts.{i}.{0,2}.*"""
    expert_keys = [f"experts.{i}.{layer}.{p}" for i in range(moe.num_experts) for layer in (0, 2) for p in ("weight", "bias")]
    keys = ["gate.weight", *expert_keys]
    own = moe.state_dict()
    assert set(own) == set(keys)
    return {prefix + k: own[k].clone() for k in keys}


def test_reference_loader_takes_exact_prefix_not_substring():
    torch.manual_seed(8)
    clip, siglip = MoEConnector(IN, OUT), MoEConnector(IN, OUT)
    # The official checkpoint names: CLIP's connector is `mm_projector`, a substring of the others.
    checkpoint = {
        **official_state_dict(clip, "model.mm_projector."),
        **official_state_dict(siglip, "model.siglip_mm_projector."),
    }

    # The official loader's substring match picks up SigLIP's weights for CLIP (the later keys win).
    substring = {k.split("mm_projector.")[1]: v for k, v in checkpoint.items() if "mm_projector" in k}
    assert torch.equal(substring["gate.weight"], siglip.gate.weight)

    loaded = MoEConnector(IN, OUT)
    loaded.load_reference_state_dict(checkpoint, prefix="model.mm_projector")  # trailing dot optional
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, clip.state_dict()[k]), k
    loaded.load_reference_state_dict(checkpoint, prefix="model.siglip_mm_projector.")
    assert torch.equal(loaded.gate.weight, siglip.gate.weight)


def test_reference_loader_rejects_another_encoders_state_dict():
    torch.manual_seed(9)
    other = MoEConnector(IN, OUT)
    checkpoint = official_state_dict(other, "mm_projector_clip2.")
    target = MoEConnector(IN, OUT)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(KeyError, match=r"no key starts with it.*missing \[.*'mm_projector_clip\.gate\.weight'\]"):
        target.load_reference_state_dict(checkpoint, prefix="mm_projector_clip.")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # Substring matching would have accepted it: every key contains "mm_projector_clip".
    assert all("mm_projector_clip" in k for k in checkpoint)


def test_reference_loader_names_unexpected_keys_and_bad_shapes():
    torch.manual_seed(10)
    five = official_state_dict(MoEConnector(IN, OUT, num_experts=5), "p.")
    with pytest.raises(KeyError, match=r"unexpected \['p\.experts\.4\.0\.bias'"):
        MoEConnector(IN, OUT, num_experts=4).load_reference_state_dict(five, prefix="p.")
    wide = official_state_dict(MoEConnector(IN + 1, OUT), "p.")
    with pytest.raises(ValueError, match=r"p\.gate\.weight: \(4, 7\) != \(4, 6\)"):
        MoEConnector(IN, OUT).load_reference_state_dict(wide, prefix="p.")


def test_dense_connector_is_linear_gelu_linear_with_zero_losses():
    torch.manual_seed(11)
    dense = DenseConnector(IN, OUT)
    x = torch.randn(2, 3, IN)
    out = dense(x)
    first, second = dense.mlp[0], dense.mlp[2]
    expected = F.linear(F.gelu(F.linear(x, first.weight, first.bias)), second.weight, second.bias)
    torch.testing.assert_close(out.hidden_states, expected)
    assert out.balance_loss.item() == 0 and out.z_loss.item() == 0
    assert out.expert_load.tolist() == [1.0]


def test_upcycled_moe_equals_dense_for_any_routing():
    torch.manual_seed(12)
    dense = DenseConnector(IN, OUT)
    x = torch.randn(3, 8, IN)
    expected = dense(x).hidden_states
    moe = upcycle_dense_connector(dense, num_experts=4, top_k=2)
    for _ in range(3):  # any gate: routing changes, output does not
        torch.nn.init.normal_(moe.gate.weight, std=3.0)
        torch.testing.assert_close(moe(x).hidden_states, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # experts are copies, not shared with the dense connector
        moe.experts[0][0].weight.add_(1.0)
    assert not torch.equal(moe.experts[0][0].weight, dense.mlp[0].weight)
    assert torch.equal(moe.experts[1][0].weight, dense.mlp[0].weight)


def test_build_connector_from_config():
    moe = build_connector(ConnectorConfig(kind="moe", num_experts=3, top_k=1), IN, OUT)
    assert isinstance(moe, MoEConnector) and (moe.num_experts, moe.top_k, moe.out_features) == (3, 1, OUT)
    assert isinstance(build_connector(ConnectorConfig(kind="dense"), IN, OUT), DenseConnector)


def test_invalid_shapes_and_top_k_are_rejected():
    with pytest.raises(ValueError, match="top_k"):
        MoEConnector(IN, OUT, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match=r"\[B, N, 6\]"):
        MoEConnector(IN, OUT)(torch.randn(2, 3, IN + 1))
