"""Write a model in ``save_pretrained`` form: mocha_config.json + model.safetensors + tokenizer.

    mocha export --checkpoint RUN/export --out models/mocha-demo
    mocha export --checkpoint RUN/checkpoint_000003 --base RUN/export --out models/mocha-step3

--checkpoint is either a pretrained directory (a run's ``export/``: rewritten canonically) or a
training checkpoint (``state.json`` + trainable weights only), whose weights are laid over
--base — the pretrained directory of the same model, which supplies the architecture, the
frozen weights and the tokenizer (the run's ``export/``, or the stage-1 export for a stage-2
checkpoint). The result loads with ``MochaModel.from_pretrained`` and
``AutoTokenizer.from_pretrained``; nothing else is needed.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="pretrained directory or training checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    parser.add_argument("--base", default=None, help="pretrained directory a training checkpoint is laid over")


def run(args: argparse.Namespace) -> int:
    from mocha.eval.cli import input_errors_reported
    from mocha.export.pretrained import export_pretrained

    with input_errors_reported():
        out = export_pretrained(args.checkpoint, args.out, base=args.base)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"[mocha] exported {args.checkpoint} -> {out} ({files})")
    return 0
