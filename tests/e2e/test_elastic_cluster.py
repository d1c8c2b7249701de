"""Elastic training on a multi-node Ray cluster: nodes leave and join while a run trains.

``ray.cluster_utils.Cluster`` starts a head and worker "nodes" (each its own raylet with its own
CPUs) on this machine. Each worker node has 2 CPUs and one ``trainer`` resource: one training
worker (1 CPU + the trainer slot) per node, and a free CPU for its Ray Data reads. The job runs
with ``scaling.num_workers: {min: 1, max: 2}``:

1. it starts on the one worker node there is (1 worker);
2. a second node joins: Ray Train grows the group to 2 workers, from the latest checkpoint;
3. that node is removed mid-training: the run goes on by itself on 1 worker and finishes.

Throughout, every optimizer step consumes exactly the global batch, and the sample ledger equals
the planned schedule (the data order of ``data.num_streams`` streams): no sample of an epoch
skipped or seen twice, whatever the worker count was.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 32  # 4 epochs of 64 samples in steps of 8
GLOBAL_BATCH = 8
TRAINER_NODE = {"num_cpus": 2, "resources": {"trainer": 1}}


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, no trainer slot) + one trainer node; always shut down, with its temp dir."""
    import ray
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")}
    os.environ["RAY_TMPDIR"] = ray_tmp
    # a restart after a lost node may first try the old size; don't wait Ray's default 60 s for it
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
    c = None
    try:
        c = Cluster(initialize_head=True, connect=True,
                    head_node_args={"num_cpus": 1, "include_dashboard": False})  # under RAY_TMPDIR
        c.add_node(**TRAINER_NODE)
        yield c
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def workspace(cluster, tmp_path_factory):  # noqa: ARG001 (the data is written beside a running cluster)
    from mocha.demo.pipeline import DemoConfig
    from mocha.demo.synthetic import generate_shapes_dataset, iter_all_texts
    from mocha.text.tokenizer import train_bpe_tokenizer
    from pipelines.shard import ShardJobConfig, build_shards

    root = tmp_path_factory.mktemp("elastic-cluster")
    paths = generate_shapes_dataset(root / "data" / "raw", num_train=64, num_eval=8)
    train_bpe_tokenizer(iter_all_texts(paths, templates=("plain",)), root / "tokenizer", vocab_size=1024)
    build_shards(ShardJobConfig(input=str(paths.stage1), images=str(paths.image_dir),
                                output=str(root / "data" / "stage1" / "shards"), samples_per_shard=16), progress=False)
    return root, DemoConfig(out=str(root), llm_pretrain_steps=0, stage1_steps=STEPS, global_batch_size=GLOBAL_BATCH,
                            width=32, layers=1)


def _job(workspace):
    from mocha.demo.pipeline import demo_job
    from mocha.train.job import JobConfig

    root, cfg = workspace
    data = demo_job(cfg, 1, root).model_dump()
    data["data"].update(features=None, num_streams=4)
    data["schedule"].update(micro_batch_size=2, log_every=4)
    data["deepspeed"]["ep_size"] = "auto"
    data["checkpoint"].update(every_steps=2, keep=2)
    data["scaling"].update(num_workers={"min": 1, "max": 2}, cpus_per_worker=1, resources_per_worker={"trainer": 1},
                           resize_check_s=2)
    data["run"].update(name="elastic", max_failures=3)
    return JobConfig.model_validate(data)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _wait_for(condition, what: str, failed: list, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if failed:
            raise AssertionError(f"the run ended before {what}: {failed[0]!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def _shard_keys(shards: Path) -> dict[str, list[str]]:
    """Every shard's sample keys in file order."""
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        keys: list[str] = []
        with tarfile.open(tar) as f:
            for member in f.getmembers():
                key = Path(member.name).name.split(".")[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
        out[tar.name] = keys
    return out


def _planned_keys(job, steps: int) -> list[list[str]]:
    """The schedule: step t reads 2 samples from each of the 4 streams, at position 2(t-1)."""
    from mocha.train.data import StreamPlan
    from mocha.train.shards import load_shard_refs

    plan = StreamPlan(load_shard_refs(job.data.shards, None, job.model), job.num_streams, seed=job.schedule.seed,
                      shuffle=job.data.shuffle_shards)
    keys = _shard_keys(Path(job.data.shards))
    per_stream = GLOBAL_BATCH // job.num_streams
    sequences = []
    for s in range(job.num_streams):
        seq, epoch = [], 0
        while len(seq) < steps * per_stream:
            seq += [k for shard in plan.epoch_streams(epoch)[s] for k in keys[shard.name]]
            epoch += 1
        sequences.append(seq)
    return [[k for seq in sequences for k in seq[t * per_stream:(t + 1) * per_stream]] for t in range(steps)]


def test_an_elastic_run_grows_when_a_node_joins_and_finishes_alone_when_it_leaves(cluster, workspace):
    from mocha.train.launcher import fit
    from mocha.train.ledger import read_ledger

    job = _job(workspace)
    run_dir = Path(job.run_dir)
    outcome: list = []
    failed: list = []

    def train():
        try:
            outcome.append(fit(job))
        except BaseException as e:  # reported by the waits below and re-raised at the end
            failed.append(e)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: any(r["world_size"] == 1 for r in _records(run_dir)), "a checkpoint on 1 worker", failed)
        joined = cluster.add_node(**TRAINER_NODE)
        _wait_for(lambda: sum(r["world_size"] == 2 for r in _records(run_dir)) >= 2, "a checkpoint on 2 workers",
                  failed)
        cluster.remove_node(joined)
    finally:
        thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish"
    if failed:
        raise failed[0]

    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    sizes = [r["world_size"] for r in records]
    phases = [w for i, w in enumerate(sizes) if i == 0 or sizes[i - 1] != w]
    assert phases == [1, 2, 1], sizes  # grew when the node joined, shrank when it left, finished alone
    assert all(r["samples"] == GLOBAL_BATCH for r in records)  # the global batch never changed
    assert {(r["world_size"], r["grad_accum"]) for r in records} == {(1, 4), (2, 2)}
    assert [r["ep_size"] for r in records] == [2 if w == 2 else 1 for w in sizes]  # ep_size auto

    ledger = read_ledger(str(run_dir))
    assert sorted(ledger) == list(range(1, STEPS + 1))
    assert [ledger[t].all_keys for t in sorted(ledger)] == _planned_keys(job, STEPS)
    steps_per_epoch = 64 // GLOBAL_BATCH
    for epoch in range(STEPS // steps_per_epoch):
        seen = [k for t in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
                for k in ledger[t].all_keys]
        assert len(seen) == len(set(seen)) == 64  # every sample of the epoch exactly once
