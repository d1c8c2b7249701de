"""``train_func``: what each Ray Train worker runs, as a loop over small functions (torchtitan style).

    state = TrainState()                          # step, samples consumed, data position
    run = build_engine(job, ctx)                  # model (+ stage-1 hand-off), DeepSpeed engine, schedule
    restore(run, state, find_checkpoint(...))     # the run's newest complete checkpoint, if any
    for each step: train_step(run, batches)       # forward/backward every micro-batch, optimizer step
                   save(run, state) every N steps # sharded checkpoint, metrics, report; export at the end

The model is built without the frozen encoders when training from feature shards. The next steps'
micro-batches are read, decoded and collated on a background thread (``data.prefetch_batches``
deep); the checkpointed data position is the optimizer steps the loop consumed, never how far the
prefetcher has read ahead.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mocha.train.job import JobConfig
from mocha.train.metrics import MetricsLog, StepMetrics

log = logging.getLogger(__name__)  # not print: see mocha.train.metrics


@dataclass
class TrainState:
    """What a checkpoint must carry beyond the weights to resume exactly (``extra_state``)."""

    step: int = 0  #: optimizer steps done
    num_streams: int = 1  #: data streams the order was dealt into (fixed for a run)
    samples_per_stream: int = 0  #: samples each stream has consumed: the data position
    world_size: int = 1  #: workers that wrote the checkpoint (informational)
    stage: int = 1

    def advance(self, global_batch: int) -> None:
        self.step += 1
        self.samples_per_stream = self.step * global_batch // self.num_streams

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Run:
    """Everything a worker builds once: the job, its place in the world, model and engine."""

    job: JobConfig
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    model: Any
    engine: Any
    plan: Any  # mocha.train.data.StreamPlan
    total_steps: int
    metrics: MetricsLog


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

    model = MochaModel(job.model, vocab_size=vocab_size, with_encoders=job.data.features is None)
    if job.init.trainable_from:
        load_trainable(model, job.init.trainable_from)
    model.set_trainable(job.stage)
    if job.schedule.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
    return model.to(device)


def build_engine(job: JobConfig, rank: int, world: int, local_rank: int) -> Run:
    """Tokenizer, model and DeepSpeed engine (ZeRO, expert parallelism, warmup-cosine schedule)."""
    from mocha.text.tokenizer import load_tokenizer
    from mocha.train.data import StreamPlan
    from mocha.train.engine import DeepSpeedSettings, build_deepspeed_config, initialize_engine, warmup_cosine_schedule
    from mocha.train.shards import load_shard_refs

    on_gpu = job.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    seed_everything(job.schedule.seed)

    tokenizer = load_tokenizer(job.tokenizer_path)
    model = build_model(job, len(tokenizer), device)
    shards = load_shard_refs(job.data.shards, job.data.features, job.model)
    plan = StreamPlan(shards, job.num_streams, seed=job.schedule.seed, shuffle=job.data.shuffle_shards)
    steps = total_steps(job, plan.samples_per_epoch())
    sched = job.schedule
    ds_config = build_deepspeed_config(DeepSpeedSettings(
        zero_stage=job.deepspeed.zero_stage, offload_optimizer=job.deepspeed.offload_optimizer,
        micro_batch_size=sched.micro_batch_size, grad_accum=sched.global_batch_size // (sched.micro_batch_size * world),
        grad_clip=sched.grad_clip, precision=resolve_precision(sched.precision, on_gpu), lr=sched.lr,
        weight_decay=sched.weight_decay, betas=tuple(sched.betas)))
    engine = initialize_engine(model, ds_config, ep_size=job.deepspeed.ep_size, lr_scheduler_fn=warmup_cosine_schedule(
        math.ceil(steps * sched.warmup_ratio), steps, sched.min_lr_ratio))
    return Run(job, rank, world, device, tokenizer, model, engine, plan, steps, MetricsLog(job, rank))


def find_checkpoint(run: Run, resume_from: str | None) -> str | None:
    """The checkpoint to start from: the run's newest complete one (torn ones skipped with a log
    line), or ``resume_from`` when it is further along (a first start from another run's
    checkpoint; a restart after a failure then continues from this run's own newer ones).
    Rank 0 decides; every rank gets its answer."""
    from mocha.train.checkpoint import latest_checkpoint, read_checkpoint_state

    def step_of(url: str) -> int:
        return int(read_checkpoint_state(url)["extra_state"].get("step", 0))

    choice = ""
    if run.rank == 0:
        latest = latest_checkpoint(run.job.run_dir)
        candidates = [u for u in (latest, resume_from) if u]
        choice = max(candidates, key=step_of) if candidates else ""
    if torch.distributed.is_initialized():
        box = [choice]
        torch.distributed.broadcast_object_list(box, src=0)  # a short string from rank 0
        choice = box[0]
    return choice or None


def restore(run: Run, state: TrainState, url: str | None) -> None:
    """Load the checkpoint at ``url`` (None: a fresh start) into the engine and ``state``."""
    from mocha.train import checkpoint as ckpt

    if url is None:
        return
    saved = TrainState.from_dict(ckpt.load_checkpoint(run.engine, run.model, url))
    run.metrics.restore(url)
    if saved.num_streams != state.num_streams:
        raise ValueError(f"checkpoint was written with {saved.num_streams} data streams, this job "
                         f"has {state.num_streams}: keep data.num_streams when resuming")
    state.step, state.samples_per_stream = saved.step, saved.samples_per_stream
    if run.rank == 0:
        log.info(f"[mocha] resumed at step {state.step}/{run.total_steps} from {url}")


def rank_batches(run: Run, state: TrainState):
    """A callable returning this worker's collated micro-batches of the next optimizer step,
    reading from the data position in ``state``."""
    from mocha.io.storage import resolve_filesystem
    from mocha.train.data import RankData, collate, decode_row

    job, model = run.job, run.model
    from_features = job.data.features is not None

    def decode(row):
        return decode_row(row, run.tokenizer, job.model.template, job.model.max_length, model.num_visual_tokens,
                          model.encoder_kinds, from_features)

    data = RankData(run.plan, run.rank, run.world, job.schedule.global_batch_size, job.schedule.micro_batch_size,
                    state.step, resolve_filesystem, decode)
    preprocess = None if from_features else model.preprocess
    pad_id = run.tokenizer.pad_token_id
    return lambda: [collate(mb, pad_id, preprocess) for mb in data.next_step()]


def train_step(run: Run, batches) -> StepMetrics:
    """Forward/backward every micro-batch of one optimizer step (DeepSpeed steps the optimizer
    at the accumulation boundary); this worker's summed metrics."""
    engine, model, experts = run.engine, run.model, run.job.model.llm_experts
    m = StepMetrics()
    for batch in batches:
        inputs = batch.model_inputs(run.device)
        if inputs["features"] is None and inputs["pixel_values"] is None:
            inputs["features"] = dummy_features(model, run.device)
        out = engine(**inputs)
        loss = out.loss
        if experts is not None:
            from mocha.model.moe_llm import collect_moe_losses

            balance, z = collect_moe_losses(model.llm)
            aux = experts.balance_coef * balance + experts.z_coef * z
            loss = loss + aux
            m.moe_llm_loss += float(aux.detach())
        engine.backward(loss)
        engine.step()
        m.loss += float(loss.detach())
        m.lm_loss += float(out.lm_loss.detach())
        m.balance_loss += float(out.balance_loss.detach())
        m.z_loss += float(out.z_loss.detach())
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


def save(run: Run, state: TrainState, record: dict, final: bool) -> None:
    """Sharded checkpoint straight to the run's storage (every rank writes its share), metrics
    history, export at the end, old checkpoints pruned, one report to Ray Train."""
    import ray.train

    from mocha.train import checkpoint as ckpt

    url = ckpt.checkpoint_url(run.job.run_dir, state.step)
    if run.rank == 0:
        run.metrics.write(url)  # before the marker: a complete checkpoint has its history
    stats = ckpt.save_checkpoint(run.engine, run.model, url, state.to_dict())
    record.update(stats.as_metrics())
    if run.rank == 0:
        run.metrics.records[-1].update(stats.as_metrics())
        run.metrics.write()  # the run's metrics.jsonl with this save's cost
        log.info(f"[mocha] checkpoint step {state.step}: {stats.bytes / 1e6:,.1f} MB in {stats.seconds:.1f} s "
                 f"({stats.bytes / 1e6 / max(stats.seconds, 1e-9):,.0f} MB/s, largest shard "
                 f"{stats.rank_bytes_max / 1e6:,.1f} MB) -> {url}")
        for gone in ckpt.prune_checkpoints(run.job.run_dir, run.job.checkpoint.keep):
            log.info(f"[mocha] removed old checkpoint {gone}")
    if final:
        export_model(run)
    ray.train.report(record)


def export_model(run: Run) -> None:
    """Write the consolidated trained model (``save_pretrained`` form) and the trainable part
    alone (stage-1 -> stage-2 hand-off) to ``<storage>/<run>/export``. Collective."""
    from mocha.train.handoff import consolidated_state_dict, save_export

    state = consolidated_state_dict(run.model)  # all ranks take part (expert gather)
    if run.rank == 0:
        save_export(run.job, run.model, state, run.tokenizer)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def train_func(config: dict) -> None:
    import ray.train

    from mocha.train.prefetch import StepPrefetcher

    job = JobConfig.model_validate(config["job"])
    ctx = ray.train.get_context()
    run = build_engine(job, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    state = TrainState(num_streams=job.num_streams, world_size=run.world, stage=job.stage)
    restore(run, state, find_checkpoint(run, config.get("resume_from")))

    with StepPrefetcher(rank_batches(run, state), depth=job.data.prefetch_batches,
                        total=run.total_steps - state.step) as prefetched:
        while state.step < run.total_steps:
            t_start = time.perf_counter()
            batches = prefetched.next()  # data wait: what prefetching did not hide
            t_data = time.perf_counter() - t_start
            m = train_step(run, batches)
            state.advance(job.schedule.global_batch_size)
            record = run.metrics.step_record(state.step, m, len(batches), time.perf_counter() - t_start, t_data,
                                             lr=run.engine.lr_scheduler.get_last_lr()[0])
            final = state.step == run.total_steps
            # Ray Train hears from the loop only with checkpoints: Ray Train v2 keeps only metrics
            # attached to a checkpoint, and each report is a round trip through the controller
            # (about 1.8 s a step on 2 CPU cores). Per-step metrics go to metrics.jsonl and the log.
            if state.step % job.checkpoint.every_steps == 0 or final:
                save(run, state, record, final)
