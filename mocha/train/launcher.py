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


def check_inputs(job: JobConfig, verify_checksums: bool = False) -> None:
    """Fail before any worker starts when the data, the tokenizer or the init weights are
    missing/incompatible. Every shard's size is compared with the manifest; with
    ``verify_checksums`` (``mocha train --check``) its SHA-256 too."""
    from mocha.train.shards import load_shard_refs, verify_shard_files
    from mocha.io import storage

    load_shard_refs(job.data.shards, job.data.features, job.model)  # raises on missing / mismatched data
    verify_shard_files(job.data.shards, checksums=verify_checksums)
    if job.init.trainable_from:
        url = storage.join_url(job.init.trainable_from, TRAINABLE_NAME)
        if not storage.exists(url):
            raise ConfigError(f"init.trainable_from: no {TRAINABLE_NAME} at {job.init.trainable_from}")
    _check_tokenizer(job)
    if job.stage == 2 and not job.init.trainable_from:
        print("[mocha] warning: stage 2 without init.trainable_from starts the connectors from scratch")


def _check_tokenizer(job: JobConfig) -> None:
    """Load the tokenizer once on the driver, so a wrong path fails here and not in every worker."""
    from mocha.text.tokenizer import load_tokenizer

    path = job.tokenizer_path
    try:
        load_tokenizer(path)
    except (OSError, ValueError, TypeError) as e:
        field = "tokenizer" if job.tokenizer else ("model.llm.tokenizer" if job.model.llm.tokenizer else "model.llm.pretrained")
        raise ConfigError(f"{field}: cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from None


def connect_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)


def scaling_kwargs(job: JobConfig) -> dict:
    """Ray Train's ``ScalingConfig`` arguments: a fixed worker count, or for a range the elastic
    ``num_workers=(min, max)`` tuple (Ray Train v2 resizes the group as nodes leave and join,
    checking for room every ``scaling.resize_check_s`` seconds, and restarts ``train_func`` from
    the latest checkpoint at the new size)."""
    scaling = job.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    kwargs = {"num_workers": scaling.num_workers, "use_gpu": scaling.use_gpu, "resources_per_worker": resources}
    if scaling.elastic:
        kwargs.update(num_workers=(scaling.min_workers, scaling.max_workers),
                      elastic_resize_monitor_interval_s=scaling.resize_check_s)
    return kwargs


def fit(job: JobConfig, resume_from: str | None = None) -> RunResult:
    """Train one stage. Resumes from the newest complete checkpoint in the run's storage path when
    the same job is rerun or Ray Train restarts the workers after a failure, or from
    ``resume_from`` (a checkpoint folder, e.g. of another run) when it is further along. With a
    worker range (``scaling.num_workers: {min, max}``) the run is elastic: a lost node costs a
    restart from the newest checkpoint at the smaller size (it counts against
    ``run.max_failures``), and the group grows again when the cluster has room."""
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
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"job": job.model_dump(mode="json"), "resume_from": resume_from},
        scaling_config=ray.train.ScalingConfig(**scaling_kwargs(job)),
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
