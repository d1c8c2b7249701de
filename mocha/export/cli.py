"""Write a model as a transformers-native folder that loads with or without mocha.

    mocha export --checkpoint RUN/export --out models/mocha-demo
    mocha export --checkpoint RUN/checkpoints/step-00000300 --base RUN/export --out models/mocha-step300 \\
        --dtype bf16 --max-shard-size 2GB --manifest s3://bucket/shards --scores eval/scores.json

--checkpoint is either a pretrained directory (a run's ``export/`` or an earlier ``mocha export``)
or a training checkpoint (``RUN/checkpoints/step-*``: trainable weights only), whose weights are laid over
--base — the pretrained directory of the same model, which supplies the architecture, the
frozen weights and the tokenizer (the run's ``export/``, or the stage-1 export for a stage-2
checkpoint).

The folder (config.json, sharded safetensors + index, tokenizer, processor, chat template,
model card README.md and the modelling code) loads in an environment without mocha:

    AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
    AutoProcessor.from_pretrained(DIR, trust_remote_code=True)

and with mocha: ``MochaModel.from_pretrained``, ``mocha generate``, ``mocha eval``.
--manifest (a shard or feature set's folder or its manifest.json; local or s3://) and --scores
(``mocha eval``'s scores.json) add the training data's fingerprints and the evaluation scores to
the model card; both repeat.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="pretrained directory or training checkpoint directory")
    parser.add_argument("--out", required=True,
                        help="output directory; an existing one is replaced only when it is empty or a previous "
                             "export (else refused, unless --overwrite); replaced atomically")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even when it is a non-empty folder that is not a MoCHA export")
    parser.add_argument("--base", default=None, help="pretrained directory a training checkpoint is laid over")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="weight dtype (default auto: as stored)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest weight file, e.g. 500MB, 5GB (default 5GB); larger models are sharded")
    parser.add_argument("--manifest", action="append", default=[], metavar="URL",
                        help="training data manifest (shard/feature set folder or manifest.json) for the model card")
    parser.add_argument("--scores", action="append", default=[], metavar="PATH",
                        help="`mocha eval` scores.json for the model card")


def read_json_document(url: str, default_name: str, flag: str) -> dict:
    """A JSON object from a file, or from ``default_name`` inside a folder (local or s3://)."""
    import json

    from mocha.config import ConfigError
    from mocha.io import storage

    target = url if url.endswith(".json") else storage.join_url(url, default_name)
    try:
        data = json.loads(storage.read_bytes(target))
    except FileNotFoundError:
        raise ConfigError(f"{flag} {url}: {target} not found") from None
    except ValueError as e:
        raise ConfigError(f"{flag} {url}: {target} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {url}: {target} is not a JSON object")
    return data


def run(args: argparse.Namespace) -> int:
    from mocha.eval.cli import input_errors_reported
    from mocha.export.hf import HFExportOptions
    from mocha.export.pretrained import export_pretrained
    from mocha.eval.suite import SCORES_FILE
    from mocha.io.layout import MANIFEST_NAME

    with input_errors_reported():
        options = HFExportOptions(
            dtype=args.dtype, max_shard_size=args.max_shard_size, source=args.checkpoint,
            manifests=[(url, read_json_document(url, MANIFEST_NAME, "--manifest")) for url in args.manifest],
            scores=[(path, read_json_document(path, SCORES_FILE, "--scores")) for path in args.scores])
        out = export_pretrained(args.checkpoint, args.out, base=args.base, options=options, overwrite=args.overwrite)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"[mocha] exported {args.checkpoint} -> {out} ({files})")
    return 0
