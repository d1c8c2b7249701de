"""DeepSpeed config, schedule, layout checks and MoE param groups (no process group needed)."""

from __future__ import annotations

import pytest
from torch import nn

from mocha.model.connector import MoEConnector
from mocha.train.engine import (
    DeepSpeedSettings,
    build_deepspeed_config,
    check_parallel_layout,
    optimizer_param_groups,
    warmup_cosine_factor,
)


def test_default_config_is_zero2_with_torch_adamw_and_moe_requirements():
    cfg = build_deepspeed_config(DeepSpeedSettings(micro_batch_size=4, grad_accum=3, lr=3e-4, weight_decay=0.1))
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"]["stage"] == 2
    # DeepSpeed asserts these for MoE param groups under ZeRO-1/2
    assert cfg["zero_optimization"]["contiguous_gradients"] and cfg["zero_optimization"]["reduce_scatter"]
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"torch_adam": True, "lr": 3e-4, "betas": [0.9, 0.999],
                                                            "eps": 1e-8, "weight_decay": 0.1}}
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert "offload_optimizer" not in cfg["zero_optimization"]


def test_offload_and_precision_options():
    cfg = build_deepspeed_config(DeepSpeedSettings(zero_stage=1, offload_optimizer=True, precision="bf16"))
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # torch AdamW with offload, no DeepSpeedCPUAdam build
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert build_deepspeed_config(DeepSpeedSettings(zero_stage=3))["zero_optimization"] == {"stage": 3}


@pytest.mark.parametrize("kwargs, message", [
    (dict(zero_stage=4), "zero_stage"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(zero_stage=0, offload_optimizer=True), "offload_optimizer needs zero_stage"),
    (dict(precision="fp8"), "precision"),
])
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepSpeedSettings(**kwargs)


def test_warmup_cosine_factor():
    f = [warmup_cosine_factor(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup, full lr on the last warmup step
    assert f[4] == pytest.approx(1.0)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f[14:] == pytest.approx([0.1] * 6)  # floor after the end
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


class _Model(nn.Module):
    def __init__(self, num_experts: int = 4) -> None:
        super().__init__()
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.connector = MoEConnector(3, 5, num_experts=num_experts, top_k=1)
        self.norm = nn.LayerNorm(5)


def test_layout_checks_fail_early_with_clear_messages():
    with pytest.raises(ValueError, match="DeepSpeed rejects MoE with ZeRO stage 3.*use zero_stage 1 or 2"):
        check_parallel_layout(_Model(), zero_stage=3, ep_size=2, world_size=2)
    with pytest.raises(ValueError, match=r"ep_size \(3\) must divide the number of workers \(4\)"):
        check_parallel_layout(_Model(), zero_stage=2, ep_size=3, world_size=4)
    with pytest.raises(ValueError, match=r"ep_size \(2\) must divide num_experts \(3\) of MoE layer 'connector'"):
        check_parallel_layout(_Model(num_experts=3), zero_stage=2, ep_size=2, world_size=2)
    check_parallel_layout(_Model(), zero_stage=3, ep_size=1, world_size=2)  # MoE as plain modules: ZeRO-3 is fine


def test_param_groups_cover_trainable_params_once_and_split_experts():
    model = _Model()
    for p in model.connector.experts.parameters():  # what DeepSpeed's Experts does to expert params
        p.allreduce, p.group_name = False, "ep_size_2"
    groups = optimizer_param_groups(model, weight_decay=0.1)
    by_name = {(g["name"], g.get("moe", False)): g for g in groups}
    assert set(by_name) == {("decay", False), ("no_decay", False), ("ep_size_2", True)}
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)  # each trainable param exactly once, frozen ones never
    assert all(p.dim() >= 2 for p in by_name[("decay", False)]["params"])
    assert by_name[("no_decay", False)]["weight_decay"] == 0.0
    expert_groups = [g for g in groups if g.get("moe")]
    assert {id(p) for g in expert_groups for p in g["params"]} == {id(p) for p in model.connector.experts.parameters()}
    assert {g["weight_decay"] for g in expert_groups} == {0.1, 0.0}  # experts keep the decay split


def test_param_groups_need_trainable_params():
    with pytest.raises(ValueError, match="no trainable parameters"):
        optimizer_param_groups(nn.Linear(2, 2).requires_grad_(False), weight_decay=0.0)
