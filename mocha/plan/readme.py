"""The generated sizing tables of ``infra/README.md``: ``python -m mocha.plan.readme infra/README.md``
rewrites them; a test checks that the file equals what the code computes."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from mocha.plan.memory import (DATASETS, GPUS, LLM_NAMES, README_MFU, STAGE_DATASET, STAGE_GLOBAL_BATCH, TrainSetup,
                               fmt_gib, fmt_millions, checkpoint_bytes, memory_plan, stage_seq_len, stage_seq_len_for, time_plan)
from mocha.plan.params import ModelSize, measure_model, real_model_config


@dataclass(frozen=True)
class Scenario:
    """One row of the sizing note: an LLM family, a stage and the cluster it runs on."""

    family: str
    stage: Literal[1, 2]
    num_gpus: int = 8
    ep_size: int = 4
    max_length: int = 2560  # the official scripts' model_max_length (both stages, Phi-2 and Vicuna)


README_SCENARIOS: tuple[Scenario, ...] = tuple(Scenario(f, s) for f in ("phi", "llama") for s in (1, 2))
def render_sizing_markdown(mfu: float = README_MFU) -> str:
    """The generated part of infra/README.md (deterministic: a test compares it to the file)."""
    sizes: dict[str, ModelSize] = {}
    setups: list[tuple[Scenario, TrainSetup]] = []
    for family in LLM_NAMES:
        scenarios = [s for s in README_SCENARIOS if s.family == family]
        size = measure_model(real_model_config(family), lambda visual: {
            stage_seq_len_for(visual, s.stage, s.max_length) for s in scenarios})
        sizes[family] = size
        for s in scenarios:
            setups.append((s, TrainSetup(
                stage=s.stage, seq_len=stage_seq_len(size, s.stage, s.max_length),
                global_batch=STAGE_GLOBAL_BATCH[s.stage], micro_batch=1, num_gpus=s.num_gpus, ep_size=s.ep_size,
                gradient_checkpointing=False, encoders_online=True,
            )))
    any_size = next(iter(sizes.values()))
    lines = ["### Vision encoders (frozen)", "",
             "| encoder | parameters | input px | tokens / image | feature width | forward GFLOP / image |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for e in any_size.encoders:
        lines.append(f"| {e.kind} | {fmt_millions(e.params)} | {e.image_size} | {e.tokens:,} | {e.width:,} | "
                     f"{e.forward_flops / 1e9:,.1f} |")
    lines.append(f"| **all four** | **{fmt_millions(any_size.encoder_params)}** | | **{any_size.visual_tokens:,}** | | "
                 f"**{sum(e.forward_flops for e in any_size.encoders) / 1e9:,.1f}** |")
    lines += ["", "### Language models and MoE connectors", "",
              "| LLM | LLM parameters | hidden | layers | connectors (4 x E=4, top-2) | of which experts | "
              "active connector GFLOP / image (fwd) | total model | trainable stage 1 | trainable stage 2 |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for family, size in sizes.items():
        conn_flops = sum(e.tokens * c.forward_flops_per_token for e, c in zip(size.encoders, size.connectors))
        lines.append(f"| {LLM_NAMES[family]} | {fmt_millions(size.llm.params)} | {size.llm.hidden:,} | {size.llm.layers} | "
                     f"{fmt_millions(size.connector_params)} | {fmt_millions(size.expert_params)} | {conn_flops / 1e9:,.1f} | "
                     f"{fmt_millions(size.total_params)} | {fmt_millions(size.trainable_params(1))} | {fmt_millions(size.trainable_params(2))} |")
    lines += ["", f"### Memory per GPU (GiB), ZeRO-2, {README_SCENARIOS[0].num_gpus} GPUs, "
              f"expert parallel ep_size={README_SCENARIOS[0].ep_size}, bf16, encoders run online", "",
              "| LLM | stage | tokens / sample | frozen weights | trainable weights | gradients | Adam states | "
              "model states | activations / sample | activations / sample, grad. ckpt | max micro-batch on 80 GB | "
              "same, grad. ckpt | one checkpoint on S3 |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s, setup in setups:
        size = sizes[s.family]
        plain = memory_plan(size, setup)
        ckpt = memory_plan(size, replace(setup, gradient_checkpointing=True))
        gpu = GPUS["H100"]
        lines.append(f"| {LLM_NAMES[s.family]} | {s.stage} | {setup.seq_len:,} | {fmt_gib(plain.frozen_weights)} | "
                     f"{fmt_gib(plain.trainable_weights)} | {fmt_gib(plain.gradients)} | {fmt_gib(plain.optimizer)} | "
                     f"{fmt_gib(plain.model_states)} | {fmt_gib(plain.activations_per_sample)} | "
                     f"{fmt_gib(ckpt.activations_per_sample)} | {plain.max_micro_batch(gpu)} | {ckpt.max_micro_batch(gpu)} | "
                     f"{fmt_gib(checkpoint_bytes(size, s.stage))} |")
    lines += ["", f"### Training time at {mfu:.0%} MFU ({README_SCENARIOS[0].num_gpus} GPUs, one epoch)", "",
              "| LLM | stage | data set | samples | global batch | TFLOP / sample | steps | "
              + " | ".join(f"{g} s / step | {g} hours | {g} GPU-hours" for g in GPUS) + " |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---:" for _ in GPUS) + " |"]
    for s, setup in setups:
        size = sizes[s.family]
        data = STAGE_DATASET[s.stage]
        plans = {g: time_plan(size, setup, gpu, mfu, DATASETS[data]) for g, gpu in GPUS.items()}
        first = next(iter(plans.values()))
        cells = " | ".join(f"{p.step_seconds:,.1f} | {p.epoch_hours:,.1f} | {p.gpu_hours:,.0f}" for p in plans.values())
        lines.append(f"| {LLM_NAMES[s.family]} | {s.stage} | {data} | {DATASETS[data]:,} | {setup.global_batch} | "
                     f"{first.flops_per_sample / 1e12:,.2f} | {first.steps_per_epoch:,} | {cells} |")
    return "\n".join(lines) + "\n"


BEGIN_MARK = "<!-- sizing:begin (generated by `python -m mocha.plan.readme infra/README.md`; do not edit) -->"
END_MARK = "<!-- sizing:end -->"


def readme_block(text: str) -> str:
    """The generated block of a README (between the markers, exclusive)."""
    match = re.search(re.escape(BEGIN_MARK) + r"\n(.*?)" + re.escape(END_MARK), text, flags=re.S)
    if not match:
        raise ValueError(f"README has no sizing block (expected {BEGIN_MARK!r} ... {END_MARK!r})")
    return match.group(1)


def write_readme(path: str | Path) -> None:
    path = Path(path)
    text = path.read_text()
    old = readme_block(text)
    path.write_text(text.replace(BEGIN_MARK + "\n" + old + END_MARK, BEGIN_MARK + "\n" + render_sizing_markdown() + END_MARK))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the sizing tables of a README.")
    parser.add_argument("readme", type=Path, help="file with the sizing markers, e.g. infra/README.md")
    args = parser.parse_args(argv)
    write_readme(args.readme)
    print(f"wrote sizing tables to {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
