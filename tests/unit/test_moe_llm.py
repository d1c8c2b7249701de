"""MoE-LLaVA style upcycling of LLM feed-forward blocks (tiny Phi and Llama, hidden 64, 2 layers)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

from mocha.model.connector import balance_loss, router_z_loss, routing_from_logits
from mocha.model.moe_llm import MoEFeedForward, collect_moe_losses, moe_expert_loads, upcycle_llm_ffn


def tiny_llm(family: str):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=100, max_position_embeddings=64)
    if family == "phi":
        return PhiForCausalLM(PhiConfig(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common)).eval()


@pytest.mark.parametrize("family", ["phi", "llama"])
def test_upcycled_llm_equals_dense_at_init(family):
    dense = tiny_llm(family)
    moe = copy.deepcopy(dense)
    dense_mlp = dense.model.layers[1].mlp
    upcycle_llm_ffn(moe, layers=[1], num_experts=4, top_k=2)

    layer = moe.model.layers[1].mlp
    assert isinstance(layer, MoEFeedForward) and len(layer.experts) == 4
    assert not isinstance(moe.model.layers[0].mlp, MoEFeedForward)
    for expert in layer.experts:  # each expert is a copy of the dense FFN (not the same object)
        assert expert is not dense_mlp
        for (k, v), (k2, v2) in zip(expert.state_dict().items(), dense_mlp.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    balance, z = collect_moe_losses(moe)
    assert balance.item() > 0 and z.item() > 0
    assert moe_expert_loads(moe)["model.layers.1.mlp"].sum().item() == pytest.approx(1.0)


def test_moe_ffn_routing_and_losses_follow_connector_math():
    torch.manual_seed(0)
    dense_ffn = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    layer = MoEFeedForward(dense_ffn, hidden_size=8, num_experts=3, top_k=2)
    with torch.no_grad():
        for expert in layer.experts:  # distinct experts so that the mixing weights matter
            for p in expert.parameters():
                p.add_(torch.randn_like(p))
    h = torch.randn(2, 5, 8)
    out = layer(h)

    tokens = h.reshape(-1, 8)
    routing = routing_from_logits(layer.gate(tokens), 2)
    expected = torch.zeros(10, 8)
    for t in range(10):  # the plain per-token definition: sum_k w_k expert_k(x)
        for w, e in zip(routing.topk_weight[t], routing.topk_index[t]):
            expected[t] += w * layer.experts[int(e)](tokens[t])
    torch.testing.assert_close(out, expected.reshape(2, 5, 8), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.moe_stats.balance_loss,
                               balance_loss(routing.probs.reshape(2, 5, 3), routing.topk_index[:, 0].reshape(2, 5), 3))
    torch.testing.assert_close(layer.moe_stats.z_loss, router_z_loss(routing.logits))


def test_collect_moe_losses_sums_layers_and_is_zero_without_moe():
    llm = tiny_llm("llama")
    zero_b, zero_z = collect_moe_losses(llm)
    assert zero_b.item() == 0 and zero_z.item() == 0
    upcycle_llm_ffn(llm, layers=[0, 1], num_experts=2, top_k=1)
    llm(input_ids=torch.randint(0, 100, (1, 6)))
    balance, z = collect_moe_losses(llm)
    layers = [llm.model.layers[i].mlp.moe_stats for i in (0, 1)]
    torch.testing.assert_close(balance, layers[0].balance_loss + layers[1].balance_loss)
    torch.testing.assert_close(z, layers[0].z_loss + layers[1].z_loss)
    balance.backward()  # the aux loss trains the routers
    assert llm.model.layers[0].mlp.gate.weight.grad is not None


def test_upcycle_rejects_bad_layers():
    llm = tiny_llm("phi")
    with pytest.raises(ValueError, match="out of range"):
        upcycle_llm_ffn(llm, layers=[2], num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="distinct"):
        upcycle_llm_ffn(llm, layers=[0, 0], num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        upcycle_llm_ffn(llm, layers=[0], num_experts=2, top_k=3)
    upcycle_llm_ffn(llm, layers=[0], num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="already has an MoE"):
        upcycle_llm_ffn(llm, layers=[0], num_experts=2, top_k=1)
