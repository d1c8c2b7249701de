"""The ``mocha`` command line.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports (torch, ray, deepspeed) happen inside ``run`` so that
``mocha --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mocha.demo.cli", "run the whole pipeline end to end on the embedded default (CPU, offline)"),
    "smoke": ("mocha.demo.smoke", "build a tiny random MoCHA model and run one forward/backward/generate"),
    "data": ("pipelines.cli", "build datasets on Ray Data: `data shard` (LLaVA JSON -> WebDataset shards), `data features`"),
    "train": ("mocha.train.cli", "train stage 1 or 2 from a job YAML (Ray Train + DeepSpeed)"),
    "plan": ("mocha.plan.cli", "parameters, memory per GPU and training time of a job YAML at real size"),
    "submit": ("mocha.train.submit", "submit a job YAML to a running Ray cluster (Ray Job SDK) and follow it"),
    "eval": ("mocha.eval.cli", "answer POPE / MME questions with a saved model, write answers and scores"),
    "generate": ("mocha.eval.generate", "answer one prompt about one image with a saved model"),
    "export": ("mocha.export.cli", "write a run's export or checkpoint as a transformers-native folder (loads without mocha)"),
    "bench": ("benchmarks.cli", "ratio benchmarks (ours vs baseline, same process); writes benchmarks/RESULTS.md"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mocha",
        description="Build datasets for, train, evaluate and export MoCHA vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('mocha').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from mocha.config import ConfigError

    try:
        return int(args._module.run(args) or 0)
    except ConfigError as e:
        print(f"mocha {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mocha {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
