"""Expert-parallel MoE layers equal the single-process layers (2 gloo ranks, no Ray).

Every rank feeds its own input. The single-process reference runs all ranks' inputs through one
``MoEConnector``: rank r's output and losses must equal the reference on rank r's input; the
replicated gate's gradient on rank r must equal the reference gate gradient of rank r's loss
alone (DeepSpeed averages it over ranks later); an expert's gradient on its owning rank must
equal the reference gradient of the *sum* of the losses of the ranks in its EP group (the
all-to-all brings their tokens, and their gradients, to the owner).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mocha.parallel.local_ranks import run_distributed

IN, OUT, E, TOP_K, B, N = 8, 6, 4, 2, 3, 5
TOL = dict(atol=1e-6, rtol=1e-6)


def _dense_connector():
    from mocha.model.connector import MoEConnector

    torch.manual_seed(0)
    return MoEConnector(IN, OUT, num_experts=E, top_k=TOP_K).double()


def _rank_input(rank: int) -> torch.Tensor:
    return torch.randn(B, N, IN, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)


def _loss(out) -> torch.Tensor:
    """Uses every output so that wrong gradients anywhere show up."""
    weights = torch.linspace(-1, 1, out.hidden_states.numel(), dtype=out.hidden_states.dtype)
    return (out.hidden_states.flatten() * weights).sum() + out.balance_loss + 0.5 * out.z_loss


def _reference(world_size: int, ep_group_ranks: list[int]):
    """Single process: per-rank outputs, grads of loss_r (gate) and of the sum of the losses of
    the ranks in one EP group (experts)."""
    dense = _dense_connector()
    outputs, gate_grads = [], []
    for r in range(world_size):
        dense.zero_grad()
        out = dense(_rank_input(r))
        _loss(out).backward()
        outputs.append(out)
        gate_grads.append(dense.gate.weight.grad.clone())
    dense.zero_grad()
    sum(_loss(dense(_rank_input(r))) for r in ep_group_ranks).backward()
    expert_grads = {k: (None if p.grad is None else p.grad.clone())
                    for k, p in dense.experts.named_parameters()}
    return outputs, gate_grads, expert_grads


def _check_ep_connector(rank: int, world_size: int, ep_size: int) -> int:
    from mocha.parallel.expert import ExpertParallelMoEConnector, global_expert_state_dict
    from mocha.train.engine import init_distributed

    init_distributed()
    first = rank - rank % ep_size  # DeepSpeed's EP groups are consecutive ranks
    ref_outputs, ref_gate_grads, ref_expert_grads = _reference(world_size, list(range(first, first + ep_size)))
    dense = _dense_connector()
    ep = ExpertParallelMoEConnector.from_dense_module(dense, ep_size)
    assert ep.num_local_experts == E // ep_size
    for p in ep.local_experts.parameters():  # DeepSpeed's expert marks
        assert p.allreduce is False and p.group_name == f"ep_size_{ep_size}"
    assert not hasattr(ep.gate.weight, "allreduce")

    out = ep(_rank_input(rank))
    _loss(out).backward()
    ref = ref_outputs[rank]
    torch.testing.assert_close(out.hidden_states, ref.hidden_states, **TOL)
    torch.testing.assert_close(out.balance_loss, ref.balance_loss, **TOL)
    torch.testing.assert_close(out.z_loss, ref.z_loss, **TOL)
    torch.testing.assert_close(out.expert_load, ref.expert_load, **TOL)
    torch.testing.assert_close(ep.gate.weight.grad, ref_gate_grads[rank], **TOL)
    checked = 0
    for local_name, p in ep.local_experts.named_parameters():
        j, inner = local_name.split(".", 1)
        expected = ref_expert_grads[f"{ep.first_expert + int(j)}.{inner}"]
        if expected is None:  # no token of any rank chose this expert
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
        else:
            torch.testing.assert_close(p.grad, expected, **TOL)
            checked += 1

    # gathering the experts back in global names reproduces the dense state dict exactly
    gathered = global_expert_state_dict(ep)
    assert gathered.keys() == dense.state_dict().keys()
    for k, v in dense.state_dict().items():
        torch.testing.assert_close(gathered[k], v, atol=0, rtol=0)
    return checked


@pytest.mark.slow
def test_expert_parallel_connector_equals_single_process_ep2():
    checked = run_distributed(_check_ep_connector, 2, 2)
    assert sum(checked) > 0  # the gradient comparison ran on real expert gradients


@pytest.mark.slow
def test_expert_parallel_connector_ep1_equals_single_process():
    """ep_size=1: every rank keeps all experts, no exchange; still the same numbers."""
    checked = run_distributed(_check_ep_connector, 2, 1)
    assert all(c > 0 for c in checked)


class _TinyModel(nn.Module):
    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        from mocha.model.connector import MoEConnector

        self.connectors = nn.ModuleDict({"clip": MoEConnector(IN, llm.config.hidden_size, E, TOP_K)})
        self.llm = llm


def _tiny_phi():
    from transformers import PhiConfig, PhiForCausalLM

    return PhiForCausalLM(PhiConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, vocab_size=50, max_position_embeddings=32))


def _check_apply_expert_parallel(rank: int, world_size: int) -> None:
    from mocha.parallel.expert import (
        ExpertParallelMoEConnector,
        ExpertParallelMoEFeedForward,
        apply_expert_parallel,
        global_expert_state_dict,
        load_global_expert_state_dict,
    )
    from mocha.model.moe_llm import collect_moe_losses, upcycle_llm_ffn
    from mocha.train.engine import init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = _TinyModel(_tiny_phi()).double()
    upcycle_llm_ffn(model.llm, layers=[1], num_experts=E, top_k=TOP_K)
    with torch.no_grad():  # make the upcycled experts differ so routing matters
        for p in model.llm.model.layers[1].mlp.experts.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = _TinyModel(_tiny_phi()).double()
    upcycle_llm_ffn(reference.llm, layers=[1], num_experts=E, top_k=TOP_K)
    reference.load_state_dict(model.state_dict())

    replaced = apply_expert_parallel(model, ep_size=2)
    assert replaced == ["connectors.clip", "llm.model.layers.1.mlp"]
    assert isinstance(model.connectors["clip"], ExpertParallelMoEConnector)
    assert isinstance(model.llm.model.layers[1].mlp, ExpertParallelMoEFeedForward)

    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(rank))
    logits = model.llm(input_ids=ids).logits
    ref_logits = reference.llm(input_ids=ids).logits
    torch.testing.assert_close(logits, ref_logits, **TOL)
    for got, want in zip(collect_moe_losses(model), collect_moe_losses(reference)):
        torch.testing.assert_close(got, want, **TOL)

    # global naming round trip: gather -> load into a fresh EP model -> same gathered weights
    full = global_expert_state_dict(model)
    assert full.keys() == reference.state_dict().keys()
    fresh = _TinyModel(_tiny_phi()).double()
    upcycle_llm_ffn(fresh.llm, layers=[1], num_experts=E, top_k=TOP_K)
    apply_expert_parallel(fresh, ep_size=2)
    load_global_expert_state_dict(fresh, reference.state_dict())
    torch.testing.assert_close(fresh.llm(input_ids=ids).logits, ref_logits, **TOL)


@pytest.mark.slow
def test_apply_expert_parallel_replaces_connector_and_llm_moe_ffn():
    run_distributed(_check_apply_expert_parallel, 2)


def _check_bad_ep_size(rank: int, world_size: int) -> None:
    from mocha.model.connector import MoEConnector
    from mocha.parallel.expert import ExpertParallelMoEConnector, ensure_expert_groups
    from mocha.train.engine import init_distributed

    init_distributed()
    with pytest.raises(ValueError, match=r"ep_size \(3\) must be >= 1 and divide the world size \(2\)"):
        ensure_expert_groups(3)
    with pytest.raises(ValueError, match=r"ep_size \(2\) must divide num_experts \(3\)"):
        ExpertParallelMoEConnector.from_dense_module(MoEConnector(IN, OUT, num_experts=3, top_k=1), 2)


@pytest.mark.slow
def test_ep_size_must_divide_world_and_experts():
    run_distributed(_check_bad_ep_size, 2)
