"""initialize_engine with real DeepSpeed on gloo ranks: expert parallel wiring and the ZeRO-3 rule."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mocha.parallel.local_ranks import run_distributed


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from mocha.model.connector import MoEConnector

        torch.manual_seed(0)
        self.connector = MoEConnector(4, 6, num_experts=4, top_k=2)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.connector(x)
        return self.head(out.hidden_states).square().mean() + 0.1 * out.balance_loss


def _step(engine, rank: int) -> None:
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x))
    engine.step()


def _check_two_ranks(rank: int, world_size: int) -> None:
    from mocha.parallel.expert import ExpertParallelMoEConnector
    from mocha.train.engine import DeepSpeedSettings, build_deepspeed_config, initialize_engine

    with pytest.raises(ValueError, match="DeepSpeed rejects MoE with ZeRO stage 3"):
        initialize_engine(_Model(), build_deepspeed_config(DeepSpeedSettings(zero_stage=3)), ep_size=2)

    model = _Model()
    engine = initialize_engine(model, build_deepspeed_config(DeepSpeedSettings(zero_stage=2, lr=1e-2)), ep_size=2)
    assert isinstance(model.connector, ExpertParallelMoEConnector)
    assert engine.has_moe_layers  # DeepSpeed recognised the layer: expert grads reduce over expert-DP groups
    moe_groups = [g for g in engine.optimizer.optimizer.param_groups if g.get("moe")]
    assert moe_groups and all(g["name"] == "ep_size_2" for g in moe_groups)
    assert model.connector.first_expert == 2 * rank
    experts_before = [p.detach().clone() for p in model.connector.local_experts.parameters()]
    _step(engine, rank)
    _step(engine, rank)

    # replicated params stay identical across ranks; each rank's own experts trained
    gate = model.connector.gate.weight.detach().clone()
    gates = [torch.empty_like(gate) for _ in range(world_size)]
    dist.all_gather(gates, gate)
    assert torch.equal(gates[0], gates[1])
    assert any(not torch.equal(a, b) for a, b in zip(experts_before, model.connector.local_experts.parameters()))


@pytest.mark.slow
def test_engine_wires_expert_parallel_and_rejects_zero3_with_ep():
    run_distributed(_check_two_ranks, 2)


def _check_zero3_without_ep(rank: int, world_size: int) -> None:
    from mocha.model.connector import MoEConnector
    from mocha.train.engine import DeepSpeedSettings, build_deepspeed_config, initialize_engine

    model = _Model()
    engine = initialize_engine(model, build_deepspeed_config(DeepSpeedSettings(zero_stage=3, lr=1e-2)), ep_size=1)
    assert type(model.connector) is MoEConnector  # ep_size 1: the MoE stays a plain module, ZeRO-3 shards it
    losses = []
    for _ in range(3):
        x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_zero3_accepts_moe_without_expert_parallel():
    run_distributed(_check_zero3_without_ep, 1)
