"""Job YAML validation (fails up front, naming the field) and the deterministic data order."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from mocha.config import ConfigError
from mocha.train.data import RankData, ShardRef, StreamPlan
from mocha.train.job import load_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["stage1.yaml", "stage2.yaml"])
def test_real_size_job_files_validate_and_are_executable(name):
    path = ROOT / "jobs" / name
    job = load_job(path)
    assert job.scaling.use_gpu and job.deepspeed.zero_stage == 2
    assert [e.kind for e in job.model.encoders] == ["siglip", "convnext", "clip", "dinov2"]
    assert path.stat().st_mode & stat.S_IXUSR
    first = path.read_text().splitlines()[0]
    assert first.startswith("#!") and "mocha train" in first  # a YAML comment that runs the file


def _write(tmp_path, data) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "stage2.yaml").read_text())


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["schedule"].update(learning_rate=1), "schedule.learning_rate"),
    (lambda d: d["scaling"].update(num_workers="many"), "scaling.num_workers"),
    (lambda d: d["deepspeed"].update(ep_size=3), "ep_size (3) must divide"),
    (lambda d: d.pop("data"), "data"),
    (lambda d: d["deepspeed"].update(zero_stage=3, ep_size=1), "zero_stage 3 cannot be used with MoE"),
    (lambda d: d["model"].update(template="plain"), "stage 2 instruction-tunes"),
    (lambda d: d["schedule"].update(global_batch_size=100), "global_batch_size (100)"),
])
def test_invalid_job_fails_naming_the_field(tmp_path, mutate, field):
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        load_job(_write(tmp_path, data))
    assert field in str(err.value)


def test_overrides_apply_by_dotted_path(tmp_path):
    job = load_job(ROOT / "jobs" / "stage2.yaml", ["scaling.num_workers=8", "schedule.lr=1e-4"])
    assert job.scaling.num_workers == 8 and job.schedule.lr == 1e-4
    with pytest.raises(ConfigError, match="scaling.num_workers"):
        load_job(ROOT / "jobs" / "stage2.yaml", ["scaling.num_workers=0"])


def test_relative_paths_resolve_against_working_dir(tmp_path, monkeypatch):
    data = _base()
    data["data"] = {"shards": "./data/shards"}
    monkeypatch.chdir(tmp_path)
    job = load_job(_write(tmp_path, data))
    assert job.data.shards == os.path.join(str(tmp_path.resolve()), "data/shards")


# ---------------------------------------------------------------- data order

def _shards(counts):
    return [ShardRef(f"shard-{i:06d}.tar", f"/x/shard-{i:06d}.tar", n) for i, n in enumerate(counts)]


def test_stream_plan_locates_positions_across_shards_and_epochs():
    plan = StreamPlan(_shards([5, 3, 4, 2]), num_streams=2, seed=0, shuffle=False)
    assert [s.name for s in plan.epoch_streams(0)[0]] == ["shard-000000.tar", "shard-000002.tar"]
    assert plan.stream_samples(0, 0) == 9 and plan.stream_samples(1, 0) == 5
    pos = plan.locate(0, 6)  # 5 in shard 0, then 1 into shard 2
    assert (pos.epoch, pos.shard_index, pos.offset) == (0, 1, 1)
    pos = plan.locate(1, 5 + 4)  # wraps into epoch 1, second shard of that epoch's stream
    assert (pos.epoch, pos.shard_index, pos.offset) == (1, 1, 1)


def test_shuffle_is_seeded_and_differs_per_epoch():
    a = StreamPlan(_shards([1] * 12), 3, seed=5)
    b = StreamPlan(_shards([1] * 12), 3, seed=5)
    assert a.epoch_streams(0) == b.epoch_streams(0)
    assert a.epoch_streams(0) != a.epoch_streams(1)
    assert sorted(s.name for st in a.epoch_streams(1) for s in st) == sorted(s.name for s in a.shards)




def _global_batches(world, steps, start_step=0, monkeypatch=None):
    import mocha.train.data as data

    plan = StreamPlan(_shards([3, 5, 4, 6]), num_streams=2, seed=1)
    by_url = {s.url: s for s in plan.shards}

    def fake_read_rows(paths, filesystem):
        for p in paths:
            for i in range(by_url[p].num_samples):
                yield {"__key__": f"{by_url[p].name}:{i}"}

    monkeypatch.setattr(data, "read_rows", fake_read_rows)
    ranks = [RankData(plan, r, world, global_batch=4, micro_batch=4 // world if world == 2 else 2,
                      start_step=start_step, filesystem_for=lambda u: (None, u), decode=lambda row: row["__key__"])
             for r in range(world)]
    out = []
    for _ in range(steps):
        micro = []
        for rd in ranks:
            micro.extend(rd.next_step())
        out.append(micro)
    return out


def test_global_batches_are_identical_on_1_and_2_workers_and_resume_exactly(monkeypatch):
    two = _global_batches(2, 10, monkeypatch=monkeypatch)
    one = _global_batches(1, 10, monkeypatch=monkeypatch)
    assert two == one  # same samples, same micro-batches, same order
    seen = [k for step in two[:4] for mb in step for k in mb]
    assert len(seen) == len(set(seen)) == 16  # nothing repeated inside the first epoch slice
    resumed = _global_batches(2, 4, start_step=6, monkeypatch=monkeypatch)
    assert resumed == two[6:10]
