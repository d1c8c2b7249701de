"""``train_func``: what each Ray Train worker runs.

Build the model (without the frozen encoders when training from feature shards), load the
stage-1 hand-off for stage 2, wrap it in DeepSpeed (ZeRO + expert parallelism), restore the
latest checkpoint if there is one, then loop: take this worker's micro-batches for the step
(read, decoded and collated ahead on a background thread, ``data.prefetch_batches`` steps deep),
forward/backward each, step, log metrics (metrics.jsonl), checkpoint and report to Ray Train every N steps
and at the end, export.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mocha.train.job import JobConfig

STATE_STEP = "step"


@dataclass
class StepMetrics:
    """Per-step sums over this worker's micro-batches (averaged over workers before reporting)."""

    loss: float = 0.0
    lm_loss: float = 0.0
    balance_loss: float = 0.0
    z_loss: float = 0.0
    moe_llm_loss: float = 0.0
    tokens: int = 0
    samples: int = 0
    masked_samples: int = 0
    expert_load: dict[str, torch.Tensor] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_precision(precision: str, on_gpu: bool) -> str:
    if precision != "auto":
        return precision
    if not on_gpu:
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def total_steps(job: JobConfig, samples_per_epoch: int) -> int:
    if job.schedule.max_steps:
        return job.schedule.max_steps
    return max(1, int(samples_per_epoch * job.schedule.epochs) // job.schedule.global_batch_size)


def build_model(job: JobConfig, vocab_size: int, device):
    """The model for this stage, frozen parts frozen, stage-1 weights loaded for stage 2."""
    from mocha.model.mocha import MochaModel
    from mocha.train.handoff import load_trainable

    model = MochaModel(job.architecture, vocab_size=vocab_size, with_encoders=job.data.features is None)
    if job.init.trainable_from:
        load_trainable(model, job.init.trainable_from)
    model.set_trainable(job.stage)
    if job.schedule.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
    return model.to(device)


def train_func(config: dict) -> None:
    import ray.train

    from mocha.text.tokenizer import load_tokenizer
    from mocha.train import checkpoint as ckpt
    from mocha.train.data import RankData, StreamPlan, collate, decode_row
    from mocha.train.engine import DeepSpeedSettings, build_deepspeed_config, initialize_engine, warmup_cosine_schedule
    from mocha.train.metrics import MetricsLog
    from mocha.train.prefetch import StepPrefetcher
    from mocha.train.shards import load_shard_refs
    from pipelines.storage import resolve_filesystem

    job = JobConfig.model_validate(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = job.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", ctx.get_local_rank()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    seed_everything(job.schedule.seed)

    tokenizer = load_tokenizer(job.tokenizer_path)
    model = build_model(job, len(tokenizer), device)
    shards = load_shard_refs(job.data.shards, job.data.features, job.model)
    plan = StreamPlan(shards, job.num_streams, seed=job.schedule.seed, shuffle=job.data.shuffle_shards)
    steps = total_steps(job, plan.samples_per_epoch())
    grad_accum = job.schedule.global_batch_size // (job.schedule.micro_batch_size * world)
    precision = resolve_precision(job.schedule.precision, on_gpu)
    sched = job.schedule
    ds_config = build_deepspeed_config(DeepSpeedSettings(
        zero_stage=job.deepspeed.zero_stage, offload_optimizer=job.deepspeed.offload_optimizer,
        micro_batch_size=sched.micro_batch_size, grad_accum=grad_accum, grad_clip=sched.grad_clip,
        precision=precision, lr=sched.lr, weight_decay=sched.weight_decay, betas=tuple(sched.betas)))
    warmup = math.ceil(steps * sched.warmup_ratio)
    engine = initialize_engine(model, ds_config, ep_size=job.deepspeed.ep_size,
                               lr_scheduler_fn=warmup_cosine_schedule(warmup, steps, sched.min_lr_ratio))

    metrics_log = MetricsLog(job, rank)
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = ckpt.load_checkpoint(engine, model, directory)
            metrics_log.restore(directory)
        start_step = int(state[STATE_STEP])
        if int(state.get("num_streams", job.num_streams)) != job.num_streams:
            raise ValueError(f"checkpoint was written with {state['num_streams']} data streams, this job "
                             f"has {job.num_streams}: keep data.num_streams when resuming")
        if rank == 0:
            print(f"[mocha] resumed at step {start_step}/{steps} from {checkpoint.path}")

    num_image_tokens = model.num_visual_tokens
    from_features = job.data.features is not None

    def decode(row):
        return decode_row(row, tokenizer, job.model.template, job.model.max_length, num_image_tokens,
                          model.encoder_kinds, from_features)

    data = RankData(plan, rank, world, job.schedule.global_batch_size, job.schedule.micro_batch_size,
                    start_step, lambda url: resolve_filesystem(url), decode)
    preprocess = None if from_features else model.preprocess
    pad_id = tokenizer.pad_token_id

    def next_step_batches():
        return [collate(mb, pad_id, preprocess) for mb in data.next_step()]

    # The next steps' micro-batches are read, decoded and collated on a background thread while
    # this one computes. The checkpointed data position is `step + 1` optimizer steps
    # (`samples_per_stream`), never how far the prefetcher has read ahead of the loop.
    with StepPrefetcher(next_step_batches, depth=job.data.prefetch_batches, total=steps - start_step) as prefetched:
        for step in range(start_step, steps):
            t_start = time.perf_counter()
            batches = prefetched.next()  # data wait: what prefetching did not hide
            t_data = time.perf_counter() - t_start
            m = run_micro_batches(engine, model, job, batches, device)
            elapsed = time.perf_counter() - t_start
            record = metrics_log.step_record(step + 1, m, len(batches), elapsed, t_data,
                                             lr=engine.lr_scheduler.get_last_lr()[0])
            done = step + 1 == steps
            if (step + 1) % job.checkpoint.every_steps == 0 or done:
                with tempfile.TemporaryDirectory(prefix="mocha-ckpt-") as directory:
                    ckpt.save_checkpoint(engine, model, directory, {
                        STATE_STEP: step + 1, "num_streams": job.num_streams,
                        "samples_per_stream": (step + 1) * job.schedule.global_batch_size // job.num_streams,
                        "world_size": world, "stage": job.stage})
                    if rank == 0:
                        metrics_log.write(directory)
                    if done:
                        export_model(job, model, engine, tokenizer, rank)
                    ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory)
                                     if rank == 0 else None)
            # No ray.train.report between checkpoints: Ray Train v2 keeps only metrics attached to
            # a checkpoint, and each report is a round trip through the controller (about 1.8 s a
            # step on 2 CPU cores, 10x the demo's step). Per-step metrics go to metrics.jsonl and
            # the log (MetricsLog); every worker still reports at the same steps.


def run_micro_batches(engine, model, job: JobConfig, batches, device) -> StepMetrics:
    """Forward/backward every micro-batch of one optimizer step (DeepSpeed steps the optimizer
    at the accumulation boundary); this worker's summed metrics."""
    m = StepMetrics()
    for batch in batches:
        inputs = batch.model_inputs(device)
        if inputs["features"] is None and inputs["pixel_values"] is None:
            inputs["features"] = dummy_features(model, device)
        out = engine(**inputs)
        loss = out.loss
        moe_llm = collect_llm_aux_loss(model, job)
        if moe_llm is not None:
            loss = loss + moe_llm
            m.moe_llm_loss += float(moe_llm.detach())
        engine.backward(loss)
        engine.step()
        m.loss += float(loss.detach())
        m.lm_loss += float(out.lm_loss)
        m.balance_loss += float(out.balance_loss)
        m.z_loss += float(out.z_loss)
        m.tokens += int(batch.attention_mask.sum())
        m.samples += batch.num_samples
        m.masked_samples += batch.num_masked
        for kind, load in out.expert_load.items():
            m.expert_load[kind] = m.expert_load.get(kind, 0) + load.detach().float().cpu()
    return m


def dummy_features(model, device) -> dict[str, torch.Tensor]:
    """One all-zero image's features: keeps the connectors' collectives matched across ranks on
    a micro-batch without images (joins the loss with weight 0, see MochaModel.forward)."""
    return {k: torch.zeros(1, model.encoder_tokens[k], model.encoder_widths[k], device=device)
            for k in model.encoder_kinds}


def collect_llm_aux_loss(model, job: JobConfig):
    if not job.moe_llm.enabled:
        return None
    from mocha.model.moe_llm import collect_moe_losses

    balance, z = collect_moe_losses(model.llm)
    return job.moe_llm.balance_coef * balance + job.moe_llm.z_coef * z


def export_model(job: JobConfig, model, engine, tokenizer, rank: int) -> None:
    """Write the consolidated trained model (``save_pretrained`` form) and the trainable part
    alone (stage-1 -> stage-2 hand-off) to ``<storage>/<run>/export``. Collective."""
    from mocha.train.handoff import consolidated_state_dict, save_export

    state = consolidated_state_dict(model)  # all ranks take part (expert gather)
    if rank == 0:
        save_export(job, model, state, tokenizer)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
