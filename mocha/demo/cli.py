"""Run the whole MoCHA pipeline end to end on the embedded default: a generated coloured-shapes
dataset, a locally trained tokenizer, tiny random-weight encoders, a tiny LLM pre-trained on text
first (the stand-in for Phi-2's pre-training), local Ray.

Steps: dataset -> tokenizer -> LLM text pre-training -> `mocha data shard` -> `mocha data features`
-> evaluate the model before MoCHA training -> stage 1 -> stage 2 (Ray Train + DeepSpeed ZeRO-2,
2 CPU workers, ep_size 2, from feature shards, with checkpoints) -> POPE / MME evaluation ->
report.md with plots. No GPU, no network. The defaults take about 8 minutes on 2 CPU cores (POPE 50% -> 96%, MME 259 -> 562 when last measured); report.md links examples.md (held-out images, answers before and after).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mocha.demo.pipeline import DemoConfig

    for name, field in DemoConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default,
                            help=f"{field.description or name} (default: {field.default})")


def run(args: argparse.Namespace) -> int:
    from mocha.config import parse_model
    from mocha.demo.pipeline import DemoConfig, run_demo

    cfg = parse_model(DemoConfig, {k: getattr(args, k) for k in DemoConfig.model_fields}, "demo options")
    run_demo(cfg)
    return 0
