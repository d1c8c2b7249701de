"""Train one MoCHA stage from a job YAML with Ray Train + DeepSpeed.

Connects to the Ray cluster in RAY_ADDRESS (set by `ray job submit` and on cluster nodes),
else starts a local Ray. The job file is validated before any worker starts. Rerunning the
same job (same run.name and run.storage_path) resumes from its latest checkpoint.

examples:
  mocha train runs/demo/jobs/stage1.yaml --set schedule.max_steps=50   # a job `mocha demo` wrote
  mocha train jobs/stage2.yaml --set scaling.num_workers=16 --set schedule.max_steps=100
  mocha train jobs/stage2.yaml --set 'scaling.num_workers={min: 4, max: 16}'   # elastic
  ray job submit --working-dir . -- mocha train jobs/stage2.yaml
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mocha.train.job import field_reference

    parser.epilog = field_reference()
    parser.add_argument("job", help="job YAML (jobs/stage1.yaml, jobs/stage2.yaml, or runs/demo/jobs/*.yaml written by `mocha demo`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field by dotted path, value parsed as YAML (repeatable)")
    parser.add_argument("--resume-from", default=None, metavar="CHECKPOINT",
                        help="start from this checkpoint directory (local or s3://) instead of the run's latest")
    parser.add_argument("--check", action="store_true",
                        help="validate the job and its inputs (shard sizes and SHA-256 against the manifest, "
                             "tokenizer, init weights), then exit")


def run(args: argparse.Namespace) -> int:
    from mocha.train.job import load_job
    from mocha.train.launcher import check_inputs, fit

    job = load_job(args.job, args.overrides)
    if args.check:
        check_inputs(job, verify_checksums=True)
        print(f"{args.job}: valid (stage {job.stage}, {job.scaling.describe}, "
              f"ZeRO-{job.deepspeed.zero_stage}, ep_size {job.deepspeed.ep_size})")
        return 0
    fit(job, resume_from=args.resume_from)
    return 0
