"""Sharded checkpoints resume on a different world size / ep_size / ZeRO stage with the same trajectory.

Real DeepSpeed (ZeRO-2, torch AdamW, warmup-cosine LambdaLR, grad clipping) on gloo ranks spawned
with torch.multiprocessing. A tiny model: a frozen Linear -> MoEConnector (4 experts, top-2) ->
two trainable Linear layers; loss = MSE + 0.1 balance + 0.01 z.

The global batch of step s is always the same 24 samples, split evenly over the ranks
(grad_accum = 24 / (2 x world)), for worlds of 1 to 4 ranks. Tolerance for a resharded continuation: 1e-5 relative on
losses and weights after 3 optimizer steps (observed ~1e-7: only float summation order differs);
a same-world-size resume is bitwise identical, RNG streams included.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from mocha.parallel.local_ranks import run_distributed

IN, HIDDEN, TOKENS, MICRO, EXPERTS = 6, 8, 4, 2, 4
GLOBAL_BATCH = 24  # samples per optimizer step: divides evenly over 1, 2, 3 and 4 ranks
RESHARD_TOL = dict(rtol=1e-5, atol=1e-6)


class TinyMoEModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from mocha.model.connector import MoEConnector

        torch.manual_seed(0)
        self.frozen = nn.Linear(IN, IN).requires_grad_(False)
        self.connector = MoEConnector(IN, HIDDEN, num_experts=EXPERTS, top_k=2)
        self.head = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.connector(self.frozen(x))
        pred = self.head(out.hidden_states).squeeze(-1)
        return nn.functional.mse_loss(pred, y) + 0.1 * out.balance_loss + 0.01 * out.z_loss


def sample(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + index)
    return torch.randn(TOKENS, IN, generator=g), torch.randn(TOKENS, generator=g)


def micro_batches(step: int, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of optimizer step ``step`` (the step's samples split evenly)."""
    per_rank = GLOBAL_BATCH // world
    first = step * GLOBAL_BATCH + rank * per_rank
    batches = []
    for m in range(per_rank // MICRO):
        xs, ys = zip(*(sample(first + m * MICRO + i) for i in range(MICRO)))
        batches.append((torch.stack(xs), torch.stack(ys)))
    return batches


def build(world: int, ep_size: int, zero_stage: int = 2):
    from mocha.train.engine import DeepSpeedSettings, build_deepspeed_config, initialize_engine, warmup_cosine_schedule

    model = TinyMoEModel()
    settings = DeepSpeedSettings(zero_stage=zero_stage, micro_batch_size=MICRO, grad_accum=GLOBAL_BATCH // (MICRO * world),
                                 grad_clip=1.0, lr=2e-2, weight_decay=0.01)
    engine = initialize_engine(model, build_deepspeed_config(settings), ep_size=ep_size,
                               lr_scheduler_fn=warmup_cosine_schedule(warmup_steps=2, total_steps=8, min_ratio=0.1))
    return engine, model


def train(engine, steps: range, rank: int, world: int) -> list[float]:
    """Run optimizer steps; return each step's loss averaged over the global batch."""
    losses = []
    for step in steps:
        total = torch.zeros(())
        for x, y in micro_batches(step, rank, world):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        assert engine.global_steps == step + 1
        dist.all_reduce(total)
        losses.append(total.item() / (GLOBAL_BATCH // MICRO))
    return losses


def run_phase(rank: int, world: int, ep_size: int | str, load_from: str | None, save_to: str | None,
              steps_before_save: int, steps_after: int, zero_stage: int = 2):
    """Optionally resume from ``load_from``; train; optionally save; train more.
    Returns (losses after the save point, final trainable weights in global names)."""
    from mocha.parallel.layout import resolve_ep_size
    from mocha.train.checkpoint import export_trainable_state, load_checkpoint, save_checkpoint

    ep_size = resolve_ep_size(ep_size, world, zero_stage, {"connector": EXPERTS})
    engine, model = build(world, ep_size, zero_stage)
    # distinct per-rank RNG streams, and other ones when resuming: only a restore brings them back
    seed_everything((10 if load_from is None else 99) + rank)
    start, rng_probe = 0, None
    if load_from is not None:
        extra = load_checkpoint(engine, model, load_from)
        assert extra["shard"] == "s-000"
        start = extra["samples_consumed"] // GLOBAL_BATCH
        assert engine.global_steps == start
        rng_probe = draw_random()
    train(engine, range(start, start + steps_before_save), rank, world)
    start += steps_before_save
    if save_to is not None:
        save_checkpoint(engine, model, save_to, {"samples_consumed": start * GLOBAL_BATCH, "shard": "s-000"})
        rng_probe = draw_random()
    losses = train(engine, range(start, start + steps_after), rank, world)
    return losses, export_trainable_state(model), rng_probe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def draw_random() -> list[float]:
    """The next numbers of the python, numpy and torch generators."""
    return [random.random(), float(np.random.rand()), torch.rand(()).item()]


def assert_same_run(a, b, **tol) -> None:
    (losses_a, weights_a, _), (losses_b, weights_b, _) = a, b
    torch.testing.assert_close(torch.tensor(losses_a, dtype=torch.float64),
                               torch.tensor(losses_b, dtype=torch.float64), **tol)
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:
        torch.testing.assert_close(weights_a[k], weights_b[k], **tol, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_two_ranks_resume_on_one_and_on_two(tmp_path: Path):
    ckpt = str(tmp_path / "ckpt")
    # reference: 2 ranks, ep_size 2: 3 steps, save, 3 more steps
    reference = run_distributed(run_phase, 2, 2, None, ckpt, 3, 3)
    assert reference[0][0] == reference[1][0]  # both ranks report the global loss
    for k, v in reference[0][1].items():  # experts gathered: both ranks export the same full model
        assert torch.equal(v, reference[1][1][k])

    files = sorted(p.name for p in Path(ckpt).iterdir())
    assert files == ["index.json", "rng.safetensors", "shards", "state.json"]
    assert sorted(p.name for p in Path(ckpt, "shards").iterdir()) == [
        "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    from mocha.train.checkpoint import read_trainable_weights

    saved = read_trainable_weights(ckpt)
    assert "frozen.weight" not in saved and "connector.experts.3.2.bias" in saved and "connector.gate.weight" in saved
    for k, v in reference[0][1].items():  # the shards hold the weights at the save point, in global names
        assert saved[k].shape == v.shape

    # same world size: bitwise the same continuation
    same = run_distributed(run_phase, 2, 2, ckpt, None, 0, 3)
    assert_same_run(same[0], reference[0], rtol=0, atol=0)
    assert [r[2] for r in same] == [r[2] for r in reference]  # each rank's RNG streams continue
    assert reference[0][2] != reference[1][2]

    # 2 -> 1 rank (ep_size 1, grad_accum doubled): the same trajectory up to summation order
    single = run_distributed(run_phase, 1, 1, ckpt, None, 0, 3)
    assert_same_run(single[0], reference[0], **RESHARD_TOL)


@pytest.mark.slow
def test_one_rank_resumes_on_two_with_expert_parallel(tmp_path: Path):
    ckpt = str(tmp_path / "ckpt")
    reference = run_distributed(run_phase, 1, 1, None, ckpt, 3, 3)
    resumed = run_distributed(run_phase, 2, 2, ckpt, None, 0, 3)
    assert_same_run(resumed[0], reference[0], **RESHARD_TOL)
    assert_same_run(resumed[1], reference[0], **RESHARD_TOL)


@pytest.mark.slow
def test_four_ranks_resume_on_three_one_and_two_from_s3_and_torn_ones_are_skipped(s3_bucket, caplog):
    """The issue's resize sequence with ``ep_size: auto`` (4 ranks: ep 4; 3: ep 1; 2: ep 2; 1: ep 1)
    through S3: 4 ranks save at step 3; 3 ranks resume there, save at step 4; 2 ranks resume from
    that; 1 rank resumes from step 3. Every continuation follows the 4-rank trajectory."""
    from mocha.io import storage
    from mocha.train.checkpoint import checkpoint_url, latest_checkpoint, list_checkpoints

    run_dir = f"{s3_bucket}/run"
    at3, at4 = checkpoint_url(run_dir, 3), checkpoint_url(run_dir, 4)
    reference = run_distributed(run_phase, 4, "auto", None, at3, 3, 3)
    assert len(storage.list_files(storage.join_url(at3, "shards"))) == 4
    three = run_distributed(run_phase, 3, "auto", at3, at4, 1, 2)
    assert_same_run(three[0], (reference[0][0][1:], reference[0][1], None), **RESHARD_TOL)
    two = run_distributed(run_phase, 2, "auto", at4, None, 0, 2)
    assert_same_run(two[0], (reference[0][0][1:], reference[0][1], None), **RESHARD_TOL)
    one = run_distributed(run_phase, 1, "auto", at3, None, 0, 3)
    assert_same_run(one[0], reference[0], **RESHARD_TOL)

    # a checkpoint torn by a kill mid-save is never resumed from, and the log says why
    assert list_checkpoints(run_dir) == [at3, at4] and latest_checkpoint(run_dir) == at4
    storage.delete(storage.join_url(at4, "shards", "shard-00001-of-00003.safetensors"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mocha.train.checkpoint"):
        assert latest_checkpoint(run_dir) == at3
    out = caplog.text
    assert "skipping incomplete checkpoint" in out and "shard-00001-of-00003" in out and "missing" in out
    storage.delete(storage.join_url(at3, "state.json"))  # killed before its marker
    assert latest_checkpoint(run_dir) is None


@pytest.mark.slow
def test_zero3_checkpoints_save_and_resume_across_stages(tmp_path: Path):
    """ZeRO-3 (MoE replicated, ep_size 1) writes its parameter partitions; they resume under ZeRO-2
    with expert parallelism on another world size, and a ZeRO-2 checkpoint resumes under ZeRO-3."""
    z3, z2 = str(tmp_path / "z3"), str(tmp_path / "z2")
    reference = run_distributed(run_phase, 2, 1, None, z3, 3, 3, 3)
    as_zero2 = run_distributed(run_phase, 1, 1, z3, None, 0, 3, 2)
    assert_same_run(as_zero2[0], reference[0], **RESHARD_TOL)
    run_distributed(run_phase, 2, 2, None, z2, 3, 0, 2)
    as_zero3 = run_distributed(run_phase, 2, 1, z2, None, 0, 3, 3)
    assert_same_run(as_zero3[0], reference[0], **RESHARD_TOL)
