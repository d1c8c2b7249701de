"""Build training data on Ray Data.

  mocha data shard     LLaVA JSON/JSONL + images -> WebDataset tar shards, manifest.json, quarantine.jsonl
  mocha data features  a shard set -> aligned frozen-encoder feature shards + manifest.json

Every path may be local or s3://bucket/prefix. S3 uses the standard AWS credential chain; point
at MinIO or a local S3 with AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3). Both jobs are
deterministic (a rerun writes byte-identical files) and resumable (rerun the same command after
a crash: finished shards are verified and kept). The driver connects to RAY_ADDRESS or
--ray-address when set, else starts a local Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from pipelines.validation import DEFAULT_MAX_PIXELS, Reason


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else start a local Ray)")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray (default: all)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (the final summary is still printed)")


def _add_shard_parser(sub) -> None:
    p = sub.add_parser(
        "shard", help="LLaVA JSON + images -> WebDataset shards with manifest and quarantine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Convert a LLaVA-style dataset into WebDataset tar shards shard-000000.tar, ... in one pass (each\n"
            "Ray task checks a chunk of records and images and writes them). Members: {key}.json (the record,\n"
            "original id included) and {key}.jpg|png|gif|webp (the original image bytes, never re-encoded);\n"
            "keys are <input position>-<sanitized id>. Rejected records are written to quarantine.jsonl with\n"
            "their reason; accepted + quarantined = input records. manifest.json lists every shard's\n"
            "sample count, size and SHA-256, the totals, the input fingerprint and quarantine counts.\n"
            "Each shard holds the accepted samples of --samples-per-shard consecutive input records, so at\n"
            "most that many (numbers of all-rejected chunks are skipped). The first *good* copy of a\n"
            "duplicated id wins; the other copies are quarantined.\n\n"
            "Input file: UTF-8 (a byte-order mark is fine). UTF-16/32 text, a top-level JSON object\n"
            "(instead of a list or one record per line) or a broken JSON list is refused with a clear\n"
            "error (exit 2). An empty input, or one where no record is accepted, exits 3 with the counts\n"
            "(quarantine.jsonl is written, manifest.json is not).\n\n"
            "Output folder: locked while a run writes it (_lock.json, a lease renewed by the run: a second\n"
            "run is refused, exit 2). Rerunning the same job resumes; a run with different input (or\n"
            "options) into a non-empty folder is refused (exit 2) unless --overwrite. manifest.json is\n"
            "removed first and written last: it always describes exactly the shards that are there.\n\n"
            "Image paths never leave --images: symbolic links are resolved and a target outside it is\n"
            "quarantined (outside_root). Every image is decoded fully; 16-bit, palette, transparent, CMYK\n"
            "and EXIF-rotated images are accepted (training decodes them to the RGB a viewer shows).\n\n"
            "Quarantine reasons: " + ", ".join(r.value for r in Reason) + "\n\n"
            "Exit status: 0 built; 2 bad input file, options or output folder; 3 nothing accepted."))
    p.add_argument("--input", required=True,
                   help="LLaVA JSON list ([{id, image?, conversations}, ...]) or JSON Lines file; local or s3://")
    p.add_argument("--images", required=True, help="folder the records' 'image' paths are relative to; local or s3://")
    p.add_argument("--output", required=True, help="output folder (shards, manifest.json, quarantine.jsonl); local or s3://")
    p.add_argument("--samples-per-shard", type=int, default=1000,
                   help="input records per shard task, so at most this many samples per shard (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="quarantine images with more than this many pixels, width*height (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="shard tasks in flight at once; bounds memory (default: 2x the cluster's CPUs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --output that had different input or options (default: refuse)")
    p.add_argument("--model-config", default=None, metavar="YAML",
                   help="a job (or model) YAML: count the samples its model.max_length would truncate, with its "
                        "tokenizer and template and its encoders' visual tokens (written to the manifest; a "
                        "warning over 1%%)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for --model-config (default: the job's tokenizer, else model.llm.tokenizer / pretrained)")
    _add_ray_options(p)
    p.set_defaults(_data_command=_run_shard)


def _add_features_parser(sub) -> None:
    p = sub.add_parser(
        "features", help="precompute frozen-encoder features for a shard set (Ray Data actor pool)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run the model's frozen vision encoders over every image of a finished shard set and write\n"
            "feature shards aligned one-to-one with it (shard-000000.tar -> <output>/shard-000000.tar):\n"
            "{key}.json (copied) and {key}.<encoder>.npy [num_tokens, hidden] per image sample, plus\n"
            "manifest.json (encoders, checkpoints, config hash, shapes, dtype). Training refuses\n"
            "features whose encoder config hash differs from its model's. Random-weight encoders\n"
            "are rebuilt from their init_seed, so training sees the same weights."))
    p.add_argument("--shards", required=True, help="a finished `mocha data shard` output folder; local or s3://")
    p.add_argument("--model-config", required=True,
                   help="YAML with the model config: a ModelConfig mapping, or a job YAML with a 'model:' section")
    p.add_argument("--output", default=None, help="feature shard folder (default: <shards>/features)")
    p.add_argument("--dtype", choices=["float32", "float16"], default=None,
                   help="stored feature dtype (default: float16 when the cluster has GPUs, else float32)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder forward pass (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="actors in the pool; each loads all encoders once (default: %(default)s)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    _add_ray_options(p)
    p.set_defaults(_data_command=_run_features)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{shard,features}", required=True)
    _add_shard_parser(sub)
    _add_features_parser(sub)


def load_model_config(path: str):
    """The ModelConfig in a YAML file: the whole file, or its ``model:`` section (a job YAML)."""
    from mocha.config import ModelConfig, load_yaml, parse_model

    data = load_yaml(path)
    if isinstance(data.get("model"), dict):
        return parse_model(ModelConfig, data["model"], f"{path}: model")
    return parse_model(ModelConfig, data, path)


def _run_shard(args: argparse.Namespace) -> int:
    from mocha.config import parse_model
    from mocha.io import storage
    from pipelines.ray_runtime import ensure_ray
    from pipelines.records import InputReader
    from pipelines.shard import NoSamplesError, SequenceBudget, ShardJobConfig, build_shards

    budget = None
    if args.model_config:
        from mocha.config import load_yaml

        tokenizer = args.tokenizer or load_yaml(args.model_config).get("tokenizer")
        budget = SequenceBudget.of_model(load_model_config(args.model_config), tokenizer).model_dump()
    cfg = parse_model(ShardJobConfig, {
        "input": args.input, "images": args.images, "output": args.output,
        "samples_per_shard": args.samples_per_shard, "max_image_pixels": args.max_image_pixels,
        "concurrency": args.concurrency, "overwrite": args.overwrite, "sequence_budget": budget,
    }, "mocha data shard options")
    if not storage.exists(cfg.input):  # fail before starting Ray
        raise FileNotFoundError(f"input file not found: {cfg.input}")
    with contextlib.closing(iter(InputReader(cfg.input))) as records:  # encoding and layout, before Ray
        if next(records, None) is None:
            raise NoSamplesError(f"the input has no records (0 accepted, 0 quarantined): {cfg.input}")
    if cfg.sequence_budget is not None:  # its tokenizer and template, before Ray
        cfg.sequence_budget.check()
    ensure_ray(args.ray_address, args.num_cpus)
    report = build_shards(cfg, progress=not args.no_progress)
    print(report.summary())
    return 0


def _run_features(args: argparse.Namespace) -> int:
    from mocha.config import parse_model
    from pipelines.features import FeatureJobConfig, build_features
    from pipelines.ray_runtime import ensure_ray
    from pipelines.shard import load_manifest

    cfg = parse_model(FeatureJobConfig, {
        "shards": args.shards, "output": args.output, "model": load_model_config(args.model_config).model_dump(),
        "dtype": args.dtype, "batch_size": args.batch_size, "concurrency": args.concurrency,
        "gpus_per_actor": args.gpus_per_actor,
    }, "mocha data features options")
    load_manifest(cfg.shards)  # fail before starting Ray
    ensure_ray(args.ray_address, args.num_cpus)
    report = build_features(cfg, progress=not args.no_progress)
    print(report.summary())
    return 0


def run(args: argparse.Namespace) -> int:
    from mocha.config import ConfigError
    from pipelines.output_lock import OutputLockedError
    from pipelines.records import InputFormatError
    from pipelines.shard import NoSamplesError
    from pipelines.shard_output import OutputNotEmptyError

    try:
        return args._data_command(args)
    except (FileNotFoundError, InputFormatError, ConfigError, OutputLockedError, OutputNotEmptyError) as e:
        print(f"mocha data {args.data_command}: {e}", file=sys.stderr)
        return 2
    except NoSamplesError as e:
        print(f"mocha data {args.data_command}: {e}", file=sys.stderr)
        return 3
