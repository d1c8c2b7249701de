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

Any worker count gives the same step (elastic training). At ``W`` workers the layout is chosen
when the worker group starts: ``ep_size`` from ``deepspeed.ep_size`` (``auto``: the largest size
that fits ``W``; a number that does not fit ``W`` fails here with a ``LayoutError`` naming the
field), and DeepSpeed's ``gradient_accumulation_steps`` ``G`` = micro-batches per worker per step
(``mocha.train.data.micro_batches_per_step``; workers with fewer samples run empty micro-batches).
The global batch is always ``B = schedule.global_batch_size`` samples and the lr schedule counts
optimizer steps, so neither changes with ``W``. The loss is normalised so that the gradient does
not depend on ``W`` or on how the samples are split into micro-batches either:

    N   = number of supervised label positions in the whole step, all workers
          (``supervised_positions``; one all-reduce of a scalar before the step's micro-batches)
    J   = sum over the step's micro-batches b (all workers) of
          CE_b / N  +  (n_b / B) * aux_b
          CE_b: summed next-token cross-entropy of b (its mean ``lm_loss`` x its positions)
          n_b: samples in b (0 for an empty micro-batch), aux_b: b's connector balance/z losses
          and LLM-expert losses (per micro-batch statistics, weighted by b's share of samples)
    backward(W * G * J_b)  for each micro-batch's term J_b

DeepSpeed divides each backward's loss by ``G`` and averages gradients over the ``W``
data-parallel ranks (expert gradients are summed over their expert-data-parallel group and
divided by ``W`` too), so the optimizer sees exactly ``grad J``: the token-mean LM loss of the
whole global batch plus the sample-weighted auxiliary losses. Gradient clipping acts on that
gradient. An empty micro-batch contributes ``0 * (...)`` (the model's dummy-visual path keeps
expert-parallel all-to-alls matched). The reported ``loss`` is ``J`` and ``lm_loss`` the global
token mean, both the same for any ``W``. The one term that can depend on ``W`` is ``aux_b`` when
a worker's micro-batch mixes streams (``micro_batch_size`` not dividing ``B / num_streams``): the
balance loss is a statistic of the micro-batch it is computed on.
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
from mocha.train.ledger import SampleLedger
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
    ep_size: int  #: expert-parallel size chosen for this world size
    grad_accum: int  #: micro-batches per worker per step at this world size
    ledger: Any  # mocha.train.ledger.SampleLedger

    @property
    def layout(self) -> dict[str, int]:
        return {"world_size": self.world, "ep_size": self.ep_size, "grad_accum": self.grad_accum}


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


def world_layout(job: JobConfig, world: int) -> tuple[int, int]:
    """``(ep_size, grad_accum)`` for ``world`` workers, decided when the worker group starts (at
    every resize of an elastic run). A fixed ``deepspeed.ep_size`` that does not fit ``world``
    raises ``LayoutError`` naming the field and the worker count, before DeepSpeed is touched."""
    from mocha.parallel.layout import LayoutError
    from mocha.train.data import micro_batches_per_step

    try:
        ep_size = job.ep_size_for(world)
    except LayoutError as e:
        raise LayoutError(f"cannot train with {world} workers: {e}") from None
    sched = job.schedule
    return ep_size, micro_batches_per_step(world, job.num_streams, sched.global_batch_size, sched.micro_batch_size)


def build_engine(job: JobConfig, rank: int, world: int, local_rank: int) -> Run:
    """Tokenizer, model and DeepSpeed engine (ZeRO, expert parallelism, warmup-cosine schedule)."""
    from mocha.text.tokenizer import load_tokenizer
    from mocha.train.data import StreamPlan
    from mocha.train.engine import DeepSpeedSettings, build_deepspeed_config, initialize_engine, warmup_cosine_schedule
    from mocha.train.shards import load_shard_refs

    ep_size, grad_accum = world_layout(job, world)
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
        micro_batch_size=sched.micro_batch_size, grad_accum=grad_accum,
        grad_clip=sched.grad_clip, precision=resolve_precision(sched.precision, on_gpu), lr=sched.lr,
        weight_decay=sched.weight_decay, betas=tuple(sched.betas)))
    engine = initialize_engine(model, ds_config, ep_size=ep_size, lr_scheduler_fn=warmup_cosine_schedule(
        math.ceil(steps * sched.warmup_ratio), steps, sched.min_lr_ratio))
    if rank == 0:
        log.info(f"[mocha] {world} workers: ep_size {ep_size}, {grad_accum} micro-batches of <= {sched.micro_batch_size} "
                 f"per worker per step, global batch {sched.global_batch_size}, {job.num_streams} data streams")
    return Run(job, rank, world, device, tokenizer, model, engine, plan, steps, MetricsLog(job, rank),
               ep_size, grad_accum, SampleLedger(job.run_dir, rank, world))


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
    """A callable returning this worker's share of the next optimizer step (``StepData`` of
    collated micro-batches, empty ones included), reading from the data position in ``state``."""
    from mocha.io.storage import resolve_filesystem
    from mocha.train.data import RankData, StepData, collate, decode_row

    job, model = run.job, run.model
    from_features = job.data.features is not None

    def decode(row):
        return decode_row(row, run.tokenizer, job.model.template, job.model.max_length, model.num_visual_tokens,
                          model.encoder_kinds, from_features, image_token_first=job.model.image_token_first)

    data = RankData(run.plan, run.rank, run.world, job.schedule.global_batch_size, job.schedule.micro_batch_size,
                    state.step, resolve_filesystem, decode)
    preprocess = None if from_features else model.preprocess
    pad_id = run.tokenizer.pad_token_id
    def make_step() -> StepData:
        step = data.next_step()
        return StepData([collate(mb, pad_id, preprocess) for mb in step.micro_batches], step.keys)

    return make_step


def global_supervised_positions(batches, device) -> int:
    """``N``: supervised label positions of the whole step, summed over all workers."""
    from mocha.model.mocha import supervised_positions

    count = torch.tensor([sum(supervised_positions(b.labels) for b in batches)], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    return int(count.item())


def train_step(run: Run, batches) -> StepMetrics:
    """Forward/backward every micro-batch of one optimizer step (DeepSpeed steps the optimizer
    at the accumulation boundary) with the loss normalised as the module docstring says; this
    worker's share of the step's metrics."""
    from mocha.model.mocha import supervised_positions

    engine, model, experts = run.engine, run.model, run.job.model.llm_experts
    if len(batches) != run.grad_accum:
        raise RuntimeError(f"{len(batches)} micro-batches for a step of {run.grad_accum}: the data and the "
                           "engine disagree on the accumulation steps")
    positions = max(1, global_supervised_positions(batches, run.device))
    global_batch = run.job.schedule.global_batch_size
    backward_scale = run.world * run.grad_accum  # undoes DeepSpeed's 1/G per backward and 1/W rank average
    m = StepMetrics()
    for batch in batches:
        inputs = batch.model_inputs(run.device)
        dummy = inputs["features"] is None and inputs["pixel_values"] is None
        if dummy:
            inputs["features"] = dummy_features(model, run.device)
        out = engine(**inputs)
        aux = out.loss - out.lm_loss  # connector balance/z losses (or the zero-weight dummy-visual term)
        llm_aux = None
        if experts is not None:
            from mocha.model.moe_llm import collect_moe_losses

            balance, z = collect_moe_losses(model.llm)
            llm_aux = experts.balance_coef * balance + experts.z_coef * z
            aux = aux + llm_aux
        token_weight = supervised_positions(batch.labels) / positions
        sample_weight = batch.num_samples / global_batch
        objective = out.lm_loss * token_weight + aux * sample_weight
        engine.backward(objective * backward_scale)
        engine.step()
        m.loss += float(objective.detach())
        m.lm_loss += float(out.lm_loss.detach()) * token_weight
        m.balance_loss += float(out.balance_loss.detach()) * sample_weight
        m.z_loss += float(out.z_loss.detach()) * sample_weight
        if llm_aux is not None:
            m.moe_llm_loss += float(llm_aux.detach()) * sample_weight
        if batch.is_padding:
            continue
        m.tokens += int(batch.attention_mask.sum())
        m.samples += batch.num_samples
        m.masked_samples += batch.num_masked
        m.over_budget_samples += batch.num_over_budget
        if not dummy:
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
    record.update(stats.as_metrics())  # on rank 0 this is the history's last record (MetricsLog.step_record)
    if run.rank == 0:
        run.metrics.write()  # the run's metrics.jsonl with this save's cost
        log.info(f"[mocha] checkpoint step {state.step}: {stats.bytes / 1e6:,.1f} MB in {stats.seconds:.1f} s "
                 f"({stats.bytes / 1e6 / max(stats.seconds, 1e-9):,.0f} MB/s, largest shard "
                 f"{stats.rank_bytes_max / 1e6:,.1f} MB) -> {url}")
        for gone in ckpt.prune_checkpoints(run.job.run_dir, run.job.checkpoint.keep):
            log.info(f"[mocha] removed old checkpoint {gone}")
    if final:
        export_model(run)
        if run.rank == 0:
            line, warn = run.metrics.truncation_summary()
            (log.warning if warn else log.info)(f"[mocha] {line}")
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
            step_data = prefetched.next()  # data wait: what prefetching did not hide
            t_data = time.perf_counter() - t_start
            m = train_step(run, step_data.micro_batches)
            state.advance(job.schedule.global_batch_size)
            run.ledger.record(state.step, step_data.keys)
            record = run.metrics.step_record(state.step, m, run.layout, time.perf_counter() - t_start, t_data,
                                             lr=run.engine.lr_scheduler.get_last_lr()[0])
            final = state.step == run.total_steps
            # Ray Train hears from the loop only with checkpoints: Ray Train v2 keeps only metrics
            # attached to a checkpoint, and each report is a round trip through the controller
            # (about 1.8 s a step on 2 CPU cores). Per-step metrics go to metrics.jsonl and the log.
            if state.step % job.checkpoint.every_steps == 0 or final:
                run.ledger.flush(state.step)  # before the checkpoint: see mocha.train.ledger
                save(run, state, record, final)
