"""Driver side of a training run: validate, connect to Ray, build the ``TorchTrainer``, fit.

Runs wherever ``mocha train JOB.yaml`` runs: on a laptop (starts a local Ray), on the head
node through ``ray job submit`` (``RAY_ADDRESS`` set by Ray), or inside a KubeRay RayJob.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mocha.config import ConfigError
from mocha.io.layout import EXPORT_DIR, TRAINABLE_NAME
from mocha.train.job import JobConfig


@dataclass
class RunResult:
    run_dir: str
    checkpoint: str | None
    metrics: dict
    export_dir: str | None


def check_inputs(job: JobConfig) -> None:
    """Fail before any worker starts when the data or the init weights are missing/incompatible."""
    from mocha.train.shards import load_shard_refs
    from mocha.io import storage

    load_shard_refs(job.data.shards, job.data.features, job.model)  # raises on missing / mismatched data
    if job.init.trainable_from:
        url = storage.join_url(job.init.trainable_from, TRAINABLE_NAME)
        if not storage.exists(url):
            raise ConfigError(f"init.trainable_from: no {TRAINABLE_NAME} at {job.init.trainable_from}")
    if job.stage == 2 and not job.init.trainable_from:
        print("[mocha] warning: stage 2 without init.trainable_from starts the connectors from scratch")


def connect_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)


def fit(job: JobConfig, resume_from: str | None = None) -> RunResult:
    """Train one stage. Resumes from the newest complete checkpoint in the run's storage path when
    the same job is rerun or Ray Train restarts the workers after a failure, or from
    ``resume_from`` (a checkpoint folder, e.g. of another run) when it is further along."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mocha.train.checkpoint import latest_checkpoint
    from mocha.train.loop import train_func
    from mocha.io.storage import is_s3, join_url, resolve_filesystem

    check_inputs(job)
    connect_ray()
    storage_fs = None
    storage_path = job.run.storage_path
    if is_s3(storage_path):
        storage_fs, storage_path = resolve_filesystem(storage_path)
    else:
        os.makedirs(storage_path, exist_ok=True)
    resources = {"CPU": job.scaling.cpus_per_worker}
    if job.scaling.use_gpu:
        resources["GPU"] = job.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"job": job.model_dump(mode="json"), "resume_from": resume_from},
        scaling_config=ray.train.ScalingConfig(num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=job.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    run_dir = job.run_dir
    checkpoint = latest_checkpoint(run_dir)
    print(json.dumps({"run_dir": run_dir, "checkpoint": checkpoint, "final_metrics": result.metrics}, default=str))
    return RunResult(run_dir, checkpoint, dict(result.metrics or {}), join_url(run_dir, EXPORT_DIR))
