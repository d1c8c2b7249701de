"""``mocha plan JOB.yaml``: parameters, per-encoder visual tokens, memory per GPU and training time
of a job at its real size, before paying for a run. Nothing is downloaded or run: the model is
built on the ``meta`` device (:mod:`mocha.plan.params`), memory and time follow
:mod:`mocha.plan.memory`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mocha.plan.memory import (CHECKPOINT_RANK_WRITE_BYTES_PER_S, DATASETS, GPUS, LLM_NAMES, README_MFU,
                               STAGE1_TEXT_TOKENS, STAGE_DATASET, checkpoint_bytes, checkpoint_save_seconds,
                               USABLE_MEMORY_FRACTION, GiB, fmt_gib, fmt_millions, memory_plan, setup_from_job, stage_seq_len_for,
                               time_plan)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", type=Path, help="job YAML (jobs/stage1.yaml, jobs/stage2.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field, e.g. --set scaling.num_workers=32 (repeatable)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H100", help="GPU model (default H100)")
    parser.add_argument("--mfu", type=float, default=README_MFU, help=f"model FLOPs utilisation (default {README_MFU})")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per epoch (default: LLaVA-558K for stage 1, LLaVA-665K for stage 2)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help=f"text tokens per sample (default: {STAGE1_TEXT_TOKENS} for stage 1, up to max_length for stage 2)")


def run(args: argparse.Namespace) -> int:
    """Print parameters, memory per GPU and time for a job file (nothing is downloaded or run)."""
    from mocha.config import ConfigError
    from mocha.plan.params import measure_model
    from mocha.train.job import load_job

    job = load_job(args.job, args.overrides)
    if job.model.llm_experts is not None:
        print("note: model.llm_experts (MoE layers in the LLM) are not included in this plan", file=sys.stderr)
    try:
        size = measure_model(job.model, lambda visual: {
            stage_seq_len_for(visual, job.stage, job.model.max_length, args.text_tokens)})
        setup = setup_from_job(job, size, args.text_tokens)
    except ValueError as e:
        raise ConfigError(f"{args.job}: {e}") from None
    gpu = GPUS[args.gpu]
    samples = args.samples or DATASETS[STAGE_DATASET[job.stage]]
    mem = memory_plan(size, setup)
    plan = time_plan(size, setup, gpu, args.mfu, samples)
    usable = gpu.memory_gib * GiB * USABLE_MEMORY_FRACTION
    rows = [
        ("parameters: encoders / connectors / HGA / LLM",
         f"{fmt_millions(size.encoder_params)} / {fmt_millions(size.connector_params)} / {fmt_millions(size.hga_params)} / {fmt_millions(size.llm.params)}"),
        ("trainable parameters", fmt_millions(size.trainable_params(setup.stage))),
        ("visual tokens per image", " + ".join(f"{e.kind} {e.tokens:,} ({e.image_size} px, {e.width:,}-d)"
                                              for e in size.encoders) + f" = {size.visual_tokens:,}"),
        ("text budget per image sample", f"{job.model.max_length - size.visual_tokens:,} tokens "
                                         f"(max_length {job.model.max_length:,} - {size.visual_tokens:,} visual)"),
        ("tokens per sample (visual + text)", f"{setup.seq_len:,} ({size.visual_tokens:,} visual)"),
        ("GPUs / ep_size / micro-batch", f"{setup.num_gpus} / {setup.ep_size} / {setup.micro_batch}"
         + (f" ({job.scaling.describe}: planned at the smallest size)" if job.scaling.elastic else "")),
        ("encoders on the trainers", "yes" if setup.encoders_online else "no (feature shards)"),
        ("GiB per GPU: frozen / trainable weights", f"{fmt_gib(mem.frozen_weights)} / {fmt_gib(mem.trainable_weights)}"),
        ("GiB per GPU: gradients / Adam states", f"{fmt_gib(mem.gradients)} / {fmt_gib(mem.optimizer)}"),
        ("GiB per GPU: activations (micro-batch)",
         f"{fmt_gib(mem.micro_batch * mem.activations_per_sample)}"
         f" ({'with' if setup.gradient_checkpointing else 'no'} gradient checkpointing)"),
        (f"GiB per GPU: total / usable on {gpu.name}", f"{fmt_gib(mem.total)} / {fmt_gib(usable)}"),
        ("largest micro-batch that fits", str(mem.max_micro_batch(gpu))),
        ("checkpoint: all shards / per GPU",
         f"{fmt_gib(checkpoint_bytes(size, setup.stage))} / {fmt_gib(checkpoint_bytes(size, setup.stage) / setup.num_gpus)} GiB, "
         f"~{checkpoint_save_seconds(size, setup):,.1f} s a save at {CHECKPOINT_RANK_WRITE_BYTES_PER_S / 1e9:g} GB/s per GPU"),
        ("TFLOP per sample", f"{plan.flops_per_sample / 1e12:,.2f}"),
        (f"step time at {args.mfu:.0%} MFU", f"{plan.step_seconds:,.2f} s x {plan.steps_per_epoch:,} steps/epoch"),
        (f"one epoch of {samples:,} samples", f"{plan.epoch_hours:,.1f} h, {plan.gpu_hours:,.0f} GPU-hours"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"plan for {args.job} (stage {job.stage}, {LLM_NAMES.get(size.llm.family, size.llm.family)})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if mem.total > usable:
        print(f"warning: {fmt_gib(mem.total)} GiB per GPU exceeds the usable {fmt_gib(usable)} GiB: lower "
              f"schedule.micro_batch_size to {mem.max_micro_batch(gpu)} or enable gradient checkpointing",
              file=sys.stderr)
    if job.model.max_length > size.llm.max_positions:
        print(f"note: max_length {job.model.max_length:,} runs past the LLM's {size.llm.max_positions:,} configured "
              "positions (its rotary embeddings extrapolate), as the official MoCHA recipe does for Phi-2",
              file=sys.stderr)
    return 0
