"""Training end to end: real Ray Train, real DeepSpeed ZeRO-2 on CPU (gloo), tiny models.

One stage-1 run (2 workers, ep_size=2, online encoders from image shards) is shared by the
tests; stage 2 runs from feature shards with its storage on S3 (moto on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope="module")
def workspace(ray_cluster, tmp_path_factory):
    from mocha.demo.pipeline import DemoConfig
    from mocha.demo.synthetic import generate_shapes_dataset, iter_all_texts
    from mocha.text.tokenizer import train_bpe_tokenizer
    from pipelines.shard import ShardJobConfig, build_shards

    root = tmp_path_factory.mktemp("train")
    paths = generate_shapes_dataset(root / "data" / "raw", num_train=64, num_eval=8)
    train_bpe_tokenizer(iter_all_texts(paths, templates=("plain", "phi")), root / "tokenizer", vocab_size=1024)
    for stage, source in ((1, paths.stage1), (2, paths.stage2)):
        build_shards(ShardJobConfig(input=str(source), images=str(paths.image_dir),
                                    output=str(root / "data" / f"stage{stage}" / "shards"), samples_per_shard=16),
                     progress=False)
    cfg = DemoConfig(out=str(root), llm_pretrain_steps=0, stage1_steps=STEPS, stage2_steps=STEPS, global_batch_size=8, width=64)
    return root, cfg


def _job(workspace, stage: int, name: str, **updates):
    from mocha.demo.pipeline import demo_job

    root, cfg = workspace
    job = demo_job(cfg, stage, root)
    data = job.data.model_copy(update={"features": updates.pop("features", None)})
    update = {"data": data, "run": job.run.model_copy(update={"name": name, **updates.pop("run", {})}),
              "checkpoint": job.checkpoint.model_copy(update={"every_steps": 3})}
    for key, value in updates.items():
        section = getattr(job, key)
        update[key] = (type(section).model_validate({**section.model_dump(), **value})
                       if hasattr(section, "model_dump") else value)
    return type(job).model_validate({**job.model_dump(), **{k: (v.model_dump() if hasattr(v, "model_dump") else v)
                                                             for k, v in update.items()}})


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def _checkpoints(run_dir) -> dict[int, Path]:
    out = {}
    for d in Path(run_dir, "checkpoints").glob("step-*"):
        state = json.loads((d / "state.json").read_text())
        out[state["extra_state"]["step"]] = d
    return out


@pytest.fixture(scope="module")
def stage1(workspace):
    from mocha.train.launcher import fit

    job = _job(workspace, 1, "s1")
    result = fit(job)
    return job, result


def test_stage1_trains_only_the_connectors_and_loss_goes_down(stage1):
    from mocha.model.mocha import MochaModel
    from mocha.train.loop import seed_everything

    job, result = stage1
    records = _metrics(result.run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"]
    assert set(records[0]) >= {"lm_loss", "balance_loss", "z_loss", "tokens_per_s", "data_wait_fraction",
                               "expert_load/clip", "expert_load/siglip"}
    assert len(records[0]["expert_load/clip"]) == 4 and abs(sum(records[0]["expert_load/clip"]) - 1) < 1e-4

    exported = load_file(Path(result.export_dir) / "model.safetensors")
    seed_everything(job.schedule.seed)
    from mocha.text.tokenizer import load_tokenizer

    initial = MochaModel(job.model, vocab_size=len(load_tokenizer(job.tokenizer_path)), with_encoders=False).state_dict()
    changed = {k.split(".")[0] for k, v in initial.items() if not torch.equal(v, exported[k])}
    assert changed == {"connectors"}  # frozen LLM untouched; HGA graph form has no weights
    # all experts of every connector were gathered from both expert-parallel ranks
    assert {f"connectors.clip.experts.{i}.0.weight" for i in range(4)} <= set(exported)
    assert len(_checkpoints(result.run_dir)) == 2  # steps 3 and 6 (keep=2)
    # each save's cost is recorded at its step: bytes of all shards, the largest shard, seconds
    saves = [r for r in records if "checkpoint_bytes" in r]
    assert [r["step"] for r in saves] == [3, 6]
    assert all(r["checkpoint_bytes"] > r["checkpoint_rank_bytes_max"] > 0 and r["checkpoint_seconds"] > 0 for r in saves)


def test_stage2_from_features_on_s3_resumes_by_rerun(stage1, workspace, s3_bucket):
    from mocha.train.launcher import fit
    from pipelines.features import FeatureJobConfig, build_features

    root, cfg = workspace
    job1, result1 = stage1
    from mocha.demo.pipeline import demo_model_config

    shards = str(root / "data" / "stage2" / "shards")
    build_features(FeatureJobConfig(shards=shards, model=demo_model_config(cfg, "phi"), batch_size=32), progress=False)
    job = _job(workspace, 2, "s2", features=str(root / "data" / "stage2" / "shards" / "features"),
               init={"trainable_from": result1.export_dir}, run={"storage_path": f"{s3_bucket}/runs"},
               schedule={"max_steps": 3},
               deepspeed={"ep_size": 1})  # connectors data-parallel: experts' grads reduced across ranks
    first = fit(job)
    assert first.run_dir.startswith("s3://")
    job_more = job.model_copy(update={"schedule": job.schedule.model_copy(update={"max_steps": STEPS})})
    second = fit(job_more)  # same name + storage: resumes at step 3 from the S3 checkpoint
    from mocha.io import storage

    records = [json.loads(line) for line in storage.read_bytes(second.run_dir + "/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["lm_loss"] < records[0]["lm_loss"]
    exported = load_file(_download(second.export_dir + "/model.safetensors", root / "s2.safetensors"))
    start = load_file(Path(result1.export_dir) / "model.safetensors")
    # trained from features: the encoders were never on the trainers; the export builds them from
    # their config (the frozen weights stage 1 trained with), so the folder loads without mocha
    assert {k for k in exported if k.startswith("encoders.")} == {k for k in start if k.startswith("encoders.")}
    changed = {k.split(".")[0] for k in exported if not torch.equal(start[k], exported[k])}
    assert changed == {"connectors", "llm"}


def _download(url: str, dest: Path) -> str:
    from mocha.io import storage

    dest.write_bytes(storage.read_bytes(url))
    return str(dest)


def test_resume_on_one_worker_follows_the_two_worker_trajectory(stage1, workspace):
    """A checkpoint written by 2 workers (ep_size 2) resumes on 1 worker (ep_size 1) with twice the
    gradient accumulation: every step sees the same samples in the same micro-batches, so the
    losses continue the 2-worker run's."""
    from mocha.train.launcher import fit

    job, result = stage1
    reference = _metrics(result.run_dir)
    ckpt = _checkpoints(result.run_dir)[3]
    one = _job(workspace, 1, "s1-one-worker",
               scaling={"num_workers": 1, "cpus_per_worker": 0.5}, deepspeed={"ep_size": 1})
    from mocha.train.data import micro_batches_per_step

    sched = job.schedule
    assert micro_batches_per_step(1, one.num_streams, sched.global_batch_size, sched.micro_batch_size) == \
        2 * micro_batches_per_step(2, job.num_streams, sched.global_batch_size, sched.micro_batch_size)
    resumed = fit(one, resume_from=str(ckpt))
    after = _metrics(resumed.run_dir)
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]  # history carried over from the checkpoint
    for ref, got in zip(reference[3:], after[3:]):
        # tolerance: the same samples per step, summed in another order (fp32 reductions)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5)


def test_killed_worker_restarts_from_checkpoint_with_identical_final_weights(stage1, workspace):
    """kill -9 one training worker after the first checkpoint: Ray Train restarts the group,
    train_func restores the checkpoint, and the final weights equal the uninterrupted run's."""
    import psutil

    from mocha.train.launcher import fit

    job, result = stage1
    victim = _job(workspace, 1, "s1-killed", run={"max_failures": 2})
    run_dir = Path(victim.run.storage_path) / victim.run.name
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if any(run_dir.glob("checkpoints/step-*/state.json")):
                # only this test's cluster: ray.init started its raylet, whose workers descend
                # from this process (never another session's Ray workers on a shared machine)
                for proc in psutil.Process(os.getpid()).children(recursive=True):
                    try:
                        cmd = " ".join(proc.cmdline())
                    except psutil.Error:  # exited meanwhile
                        continue
                    if "RayTrainWorker" in cmd:
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = fit(victim)
    thread.join(timeout=5)
    assert killed, "no training worker was killed"
    final = load_file(Path(out.export_dir) / "model.safetensors")
    reference = load_file(Path(result.export_dir) / "model.safetensors")
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=0, atol=1e-6)
    records = _metrics(out.run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
