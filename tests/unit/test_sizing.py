"""mocha/plan: counts come from the real configurations, the memory model agrees with
DeepSpeed's own ZeRO-2 estimator, and infra/README.md holds exactly what the code computes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mocha.plan import memory, params, readme
from mocha.cli import main as mocha_main
from mocha.plan.params import real_model_config

ROOT = Path(__file__).resolve().parents[2]
SEQ = 2048


@pytest.fixture(scope="module")
def phi() -> params.ModelSize:
    return params.measure_model(real_model_config("phi"), lambda visual: {SEQ, visual + 64})


def setup(**changes) -> memory.TrainSetup:
    base = memory.TrainSetup(stage=2, seq_len=SEQ, global_batch=128, micro_batch=1, num_gpus=8, ep_size=4,
                             gradient_checkpointing=False, encoders_online=True)
    return replace(base, **changes)


def test_real_model_visual_tokens_and_connector_parameters(phi):
    assert [(e.kind, e.tokens) for e in phi.encoders] == [("siglip", 576), ("convnext", 100), ("clip", 576),
                                                            ("dinov2", 576)]
    assert phi.visual_tokens == 1828
    hidden, experts = 2560, 4
    # ConvNeXt-XXL's 3072 channels are average-pooled to 1024 before its connector.
    widths = {"siglip": 1024, "convnext": 1024, "clip": 1024, "dinov2": 1024}
    for conn in phi.connectors:
        d = widths[conn.kind]
        assert conn.in_features == d
        assert conn.expert_params == experts * (d * hidden + hidden + hidden * hidden + hidden)
        assert conn.dense_params == d * experts  # the router, Linear(d, E, bias=False)
        # top-2 of 4 experts plus the router, 2 FLOPs per multiply-add
        assert conn.forward_flops_per_token == 2 * (d * experts + 2 * (d * hidden + hidden + hidden * hidden + hidden))
    assert phi.llm.params == 2_779_683_840 and phi.hga_params == 0
    assert phi.trainable_params(1) == phi.connector_params
    assert phi.trainable_params(2) == phi.connector_params + phi.llm.params


def test_llm_forward_flops_are_matmuls_plus_attention(phi):
    llm = phi.llm
    matmul = 2 * (llm.params - llm.embedding_params) * SEQ  # every weight but the embedding lookup
    attention = 4 * llm.layers * SEQ * SEQ * llm.hidden  # QK^T and AV
    assert phi.llm_forward_flops[SEQ] == pytest.approx(matmul + attention, rel=5e-3)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("params,gpus", [(2_927_900_000, 8), (148_000_000, 2), (7_076_000_000, 32)])
def test_zero2_state_bytes_equal_deepspeeds_estimator(params, gpus, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu_bytes = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, num_nodes=1,
                                                         cpu_offload=offload)
    assert sum(memory.zero2_state_bytes(params, gpus, offload)) == pytest.approx(gpu_bytes, abs=2)


def test_memory_plan_parts(phi):
    base = memory.memory_plan(phi, setup())
    # Experts: a rank holds E/ep_size of them; their states shard over world/ep_size ranks.
    dense = phi.trainable_params(2) - phi.expert_params
    assert base.trainable_weights == 2 * dense + 2 * phi.expert_params // 4
    assert base.optimizer == 12 * dense // 8 + 12 * (phi.expert_params // 4) // 2
    assert base.frozen_weights == 2 * phi.encoder_params
    # Stage 1: the LLM is frozen too; from feature shards the encoders are not on the trainers.
    stage1 = memory.memory_plan(phi, setup(stage=1, encoders_online=False))
    assert stage1.frozen_weights == 2 * phi.llm.params
    assert stage1.optimizer < base.optimizer / 10
    # A checkpoint holds fp32 trainable weights and both Adam moments, nothing frozen.
    assert memory.checkpoint_bytes(phi, 1) == 12 * phi.connector_params
    # Activations: linear in micro-batch, far smaller with gradient checkpointing.
    ckpt = memory.memory_plan(phi, setup(gradient_checkpointing=True))
    assert ckpt.activations_per_sample < base.activations_per_sample / 4
    assert memory.memory_plan(phi, setup(micro_batch=3)).total - base.total == 2 * base.activations_per_sample
    fits = base.max_micro_batch(memory.GPUS["H100"])
    assert memory.memory_plan(phi, setup(micro_batch=fits)).total <= 80 * memory.GiB * memory.USABLE_MEMORY_FRACTION
    assert memory.memory_plan(phi, setup(micro_batch=fits + 1)).total > 80 * memory.GiB * memory.USABLE_MEMORY_FRACTION


def test_llm_layer_activations_for_phi():
    # Phi-2 (h=2560, I=4h, parallel block, residual dropout): LayerNorm 2h, attention 12h,
    # gelu_new 4 saved tensors + fc2 input = 10 I = 40h, dropout masks 2h -> 56h bytes per token.
    llm = params.LLMSize("phi", 0, 0, 32, 2560, 10240, 2560, 51200, 2048, "layernorm", "gelu_new", True, True)
    assert memory.llm_layer_activation_bytes(llm) == 56 * 2560


def test_time_plan_arithmetic(phi):
    s = setup()
    h100 = memory.time_plan(phi, s, memory.GPUS["H100"], 0.4, 665_298)
    fast = memory.time_plan(phi, s, memory.GPUS["H100"], 0.8, 665_298)
    assert fast.step_seconds == pytest.approx(h100.step_seconds / 2)
    assert h100.steps_per_epoch == 5198  # ceil(665,298 / 128)
    # GPU-hours count samples, the epoch counts whole steps (the last one is partial).
    assert h100.epoch_hours * 8 == pytest.approx(h100.gpu_hours, rel=128 / 665_298)
    # Stage 2 trains the LLM (3 forward-equivalents), stage 1 only back-propagates through it (2).
    s1 = memory.flops_per_sample(phi, setup(stage=1))
    s2 = memory.flops_per_sample(phi, s)
    assert s2 - s1 == phi.llm_forward_flops[SEQ]
    features = memory.flops_per_sample(phi, setup(encoders_online=False))
    assert s2 - features == sum(e.forward_flops for e in phi.encoders)
    with pytest.raises(ValueError, match="mfu"):
        memory.time_plan(phi, s, memory.GPUS["A100"], 0.0, 10)


def test_sequence_length_must_fit_max_length(phi):
    assert memory.stage_seq_len(phi, 1, 2048) == 1828 + memory.STAGE1_TEXT_TOKENS
    assert memory.stage_seq_len(phi, 2, 2048) == 2048
    with pytest.raises(ValueError, match="max_length 1024"):
        memory.stage_seq_len(phi, 1, 1024)
    with pytest.raises(ValueError, match="ep_size"):
        setup(ep_size=3)


def test_readme_tables_equal_what_sizing_computes():
    text = (ROOT / "infra" / "README.md").read_text()
    assert readme.readme_block(text) == readme.render_sizing_markdown(), \
        "regenerate with: python -m mocha.plan.readme infra/README.md"


def test_mocha_plan_prints_the_plan_of_a_job_file(capsys):
    """At the real size: per-encoder token counts, the text budget left by max_length 2560, per-GPU
    memory and the checkpoint size, each checked against counts of meta-device builds made here."""
    import torch

    from mocha.config import EncoderConfig
    from mocha.model.connector import build_connector
    from mocha.model.encoders import build_encoder
    from mocha.model.llm import build_llm, real_llm_config

    assert mocha_main(["plan", str(ROOT / "jobs" / "stage2.yaml"),
                       "--set", "schedule.gradient_checkpointing=false", "--set", "schedule.micro_batch_size=8",
                       "--set", "scaling.num_workers=8", "--set", "data.num_streams=8"]) == 0
    out, err = capsys.readouterr()
    encoders = [build_encoder(EncoderConfig(kind=k), device="meta") for k in ("siglip", "convnext", "clip", "dinov2")]
    assert [(e.num_tokens, e.hidden_size) for e in encoders] == [(576, 1024), (100, 1024), (576, 1024), (576, 1024)]
    visual = sum(e.num_tokens for e in encoders)
    for e in encoders:
        assert f"{e.kind} {e.num_tokens:,} ({e.image_size} px, {e.hidden_size:,}-d)" in out
    assert f"= {visual:,}" in out and f"{2560 - visual:,} tokens (max_length 2,560 - {visual:,} visual)" in out
    assert "2,560 (1,828 visual)" in out
    llm = build_llm(real_llm_config("phi"), device="meta")
    with torch.device("meta"):
        connectors = [build_connector(real_model_config("phi").connector, e.hidden_size, 2560) for e in encoders]
    trainable = params.count_parameters(llm) + sum(params.count_parameters(c) for c in connectors)
    assert f"{trainable / 1e6:,.1f}M" in out  # stage 2 trains connectors + Phi-2
    assert f"{12 * trainable / memory.GiB:,.2f} / {12 * trainable / 8 / memory.GiB:,.2f} GiB" in out  # checkpoint
    # 8 un-checkpointed 2,560-token samples do not fit 80 GB: the plan says so and what would.
    assert "exceeds the usable" in err and "micro_batch_size to 5" in err
    assert "runs past the LLM's 2,048 configured positions" in err  # Phi-2 at the official 2560
