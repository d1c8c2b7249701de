"""Elastic training arithmetic: streams per worker, padding to equal micro-batch counts, the
expert-parallel size at every worker count, worker ranges in the job, the sample ledger."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from mocha.config import ConfigError
from mocha.parallel.layout import LayoutError, resolve_ep_size
from mocha.train.data import RankData, ShardRef, StreamPlan, micro_batches_per_step, rank_streams
from mocha.train.job import load_job
from mocha.train.ledger import SampleLedger, read_ledger

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- streams and padding

def test_every_stream_is_read_by_exactly_one_worker_at_any_world_size():
    for streams in (1, 4, 7, 64):
        for world in range(1, streams + 1):
            owned = [s for r in range(world) for s in rank_streams(r, world, streams)]
            assert sorted(owned) == list(range(streams))
            counts = [len(rank_streams(r, world, streams)) for r in range(world)]
            assert max(counts) - min(counts) <= 1  # uneven by at most one stream
    assert rank_streams(1, 3, 8) == [1, 4, 7]
    with pytest.raises(ValueError, match="rank 3 is not in a world of 3"):
        rank_streams(3, 3, 8)


@pytest.mark.parametrize("world,streams,global_batch,micro,expected", [
    (1, 4, 8, 2, 4), (2, 4, 8, 2, 2), (3, 4, 8, 2, 2), (4, 4, 8, 2, 1),
    (16, 64, 128, 4, 2), (48, 64, 128, 4, 1), (5, 64, 128, 4, 7),  # 13 streams x 2 samples / 4
    (3, 6, 12, 4, 1),  # 2 streams x 2 samples in one micro-batch of 4
])
def test_micro_batches_per_step_is_what_the_busiest_worker_needs(world, streams, global_batch, micro, expected):
    assert micro_batches_per_step(world, streams, global_batch, micro) == expected


def _plan_and_reader(monkeypatch, counts, streams):
    import mocha.train.data as data

    shards = [ShardRef(f"shard-{i:02d}.tar", f"/x/shard-{i:02d}.tar", n) for i, n in enumerate(counts)]
    plan = StreamPlan(shards, num_streams=streams, seed=3)
    by_url = {s.url: s for s in shards}

    def fake_read_rows(paths, filesystem):
        for p in paths:
            for i in range(by_url[p].num_samples):
                yield {"__key__": f"{by_url[p].name}:{i}"}

    monkeypatch.setattr(data, "read_rows", fake_read_rows)
    return plan


def _steps(plan, world, global_batch, micro, steps, start_step=0):
    ranks = [RankData(plan, r, world, global_batch, micro, start_step, lambda u: (None, u), lambda row: row["__key__"])
             for r in range(world)]
    return [[rd.next_step() for rd in ranks] for _ in range(steps)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_a_step_is_the_same_global_batch_on_any_worker_count_with_equal_micro_batch_counts(monkeypatch, world):
    """4 streams, global batch 8 (2 samples per stream), micro-batches of 2: every worker runs
    the same number of micro-batches (padding with empty ones), the step's samples and even its
    micro-batches are those of one worker, and a step's keys record exactly its samples."""
    plan = _plan_and_reader(monkeypatch, [5, 3, 4, 6, 2, 4], streams=4)
    reference = _steps(plan, 1, 8, 2, steps=7)
    got = _steps(plan, world, 8, 2, steps=7)
    for ref_step, step in zip(reference, got):
        sizes = {len(part.micro_batches) for part in step}
        assert sizes == {micro_batches_per_step(world, 4, 8, 2)}
        real = [mb for part in step for mb in part.micro_batches if mb]
        assert Counter(map(tuple, real)) == Counter(map(tuple, ref_step[0].micro_batches))
        padding = sum(1 for part in step for mb in part.micro_batches if not mb)
        assert padding == world * micro_batches_per_step(world, 4, 8, 2) - 4
        keys = {s: k for part in step for s, k in part.keys.items()}
        assert keys == ref_step[0].keys and sum(len(k) for k in keys.values()) == 8


def test_a_resize_mid_run_continues_the_order_without_skipping_or_repeating(monkeypatch):
    """2 workers for 3 steps, then 3 workers from step 3, then 1 from step 5: the samples of each
    epoch (24 samples, 3 steps of 8) come out each exactly once."""
    plan = _plan_and_reader(monkeypatch, [6, 6, 6, 6], streams=4)

    def by_stream(step):  # the step's keys in stream order, whichever worker read them
        keys = {s: k for part in step for s, k in part.keys.items()}
        return [k for s in sorted(keys) for k in keys[s]]

    seen = []
    for world, start, steps in ((2, 0, 3), (3, 3, 2), (1, 5, 4)):
        seen.extend(by_stream(step) for step in _steps(plan, world, 8, 2, steps, start_step=start))
    assert seen == [by_stream(step) for step in _steps(plan, 1, 8, 2, 9)]
    all_keys = {f"shard-{i:02d}.tar:{j}" for i in range(4) for j in range(6)}
    for epoch in range(3):
        epoch_keys = [k for step in seen[3 * epoch:3 * epoch + 3] for k in step]
        assert sorted(epoch_keys) == sorted(all_keys)


def test_a_worker_with_fewer_streams_pads_with_empty_micro_batches(monkeypatch):
    plan = _plan_and_reader(monkeypatch, [4] * 5, streams=5)
    (step,) = _steps(plan, 2, 10, 2, steps=1)
    assert [len(mb) for mb in step[0].micro_batches] == [2, 2, 2]  # streams 0, 2, 4
    assert [len(mb) for mb in step[1].micro_batches] == [2, 2, 0]  # streams 1, 3 + one empty


# ---------------------------------------------------------------- expert-parallel size

@pytest.mark.parametrize("world,counts,zero,expected", [
    (8, {"connector": 4}, 2, 4), (6, {"connector": 4}, 2, 2), (3, {"connector": 4}, 2, 1),
    (12, {"connector": 4, "llm": 6}, 2, 2), (8, {}, 2, 1), (8, {"connector": 4}, 3, 1), (1, {"connector": 4}, 2, 1),
])
def test_auto_ep_size_is_the_largest_that_fits_the_world(world, counts, zero, expected):
    assert resolve_ep_size("auto", world, zero, counts) == expected


def test_a_fixed_ep_size_that_does_not_fit_the_world_names_the_field():
    assert resolve_ep_size(2, 4, 2, {"connector": 4}) == 2
    with pytest.raises(LayoutError, match=r"deepspeed.ep_size \(4\) must divide the number of workers \(6\)"):
        resolve_ep_size(4, 6, 2, {"connector": 4})


# ---------------------------------------------------------------- the job's worker range

def _job(tmp_path, **sections):
    data = yaml.safe_load((ROOT / "jobs" / "stage2.yaml").read_text())
    for section, values in sections.items():
        data[section].update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_job(path)


def test_a_worker_range_is_elastic_and_auto_ep_size_is_the_default(tmp_path):
    from mocha.train.launcher import scaling_kwargs

    job = _job(tmp_path, scaling={"num_workers": {"min": 2, "max": 8}, "resize_check_s": 5},
               deepspeed={"ep_size": "auto"})
    assert (job.scaling.min_workers, job.scaling.max_workers, job.scaling.elastic) == (2, 8, True)
    assert [job.ep_size_for(w) for w in range(2, 9)] == [2, 1, 4, 1, 2, 1, 4]
    kwargs = scaling_kwargs(job)
    assert kwargs["num_workers"] == (2, 8) and kwargs["elastic_resize_monitor_interval_s"] == 5
    fixed = scaling_kwargs(_job(tmp_path, scaling={"num_workers": 4}))
    assert fixed["num_workers"] == 4 and "elastic_resize_monitor_interval_s" not in fixed
    data = yaml.safe_load((ROOT / "jobs" / "stage2.yaml").read_text())
    data["deepspeed"].pop("ep_size")
    (tmp_path / "default.yaml").write_text(yaml.safe_dump(data))
    assert load_job(tmp_path / "default.yaml").deepspeed.ep_size == "auto"


def test_a_fixed_ep_size_is_checked_at_every_worker_count_of_the_range(tmp_path):
    with pytest.raises(ConfigError) as err:
        _job(tmp_path, scaling={"num_workers": {"min": 4, "max": 9}}, deepspeed={"ep_size": 4})
    assert "deepspeed.ep_size (4) does not fit 4 of the worker counts in scaling.num_workers: 5, 6, 7, 9" in str(err.value)
    assert _job(tmp_path, scaling={"num_workers": {"min": 4, "max": 9}}, deepspeed={"ep_size": 1}).deepspeed.ep_size == 1


@pytest.mark.parametrize("scaling,data,field", [
    ({"num_workers": {"min": 8, "max": 2}}, {}, "min (8) must be <= max (2)"),
    ({"num_workers": {"min": 0, "max": 2}}, {}, "scaling.num_workers"),
    ({"num_workers": {"min": 2, "max": 4, "step": 2}}, {}, "scaling.num_workers"),
    ({"num_workers": {"min": 2, "max": 80}}, {}, "data.num_streams (64) must be at least the largest worker count (80)"),
    ({"resize_check_s": 0}, {}, "scaling.resize_check_s"),
])
def test_invalid_scaling_fails_naming_the_field(tmp_path, scaling, data, field):
    with pytest.raises(ConfigError) as err:
        _job(tmp_path, scaling=scaling, data=data)
    assert field in str(err.value)


def test_worker_count_divisibility_rules_are_gone(tmp_path):
    """3 workers, 64 streams, global batch 128 of micro-batches of 4: no longer refused (streams
    are spread unevenly, gradient accumulation rounds up and pads)."""
    job = _job(tmp_path, scaling={"num_workers": 3}, deepspeed={"ep_size": "auto"})
    assert job.ep_size_for(3) == 1
    assert micro_batches_per_step(3, job.num_streams, 128, 4) == 11  # 22 streams x 2 samples / 4


def test_the_layout_is_chosen_for_the_world_the_group_starts_with(tmp_path):
    """Inside the workers: auto ep_size and the accumulation steps follow the world size; a fixed
    ep_size that does not fit it (a job changed after validation) stops with the field named."""
    from mocha.train.job import DeepSpeedConfig
    from mocha.train.loop import world_layout

    job = _job(tmp_path, scaling={"num_workers": {"min": 2, "max": 8}}, deepspeed={"ep_size": "auto"})
    assert [world_layout(job, w) for w in (2, 3, 4, 8)] == [(2, 16), (1, 11), (4, 8), (4, 4)]
    fixed = job.model_copy(update={"deepspeed": DeepSpeedConfig(ep_size=4)})
    with pytest.raises(LayoutError, match=r"cannot train with 6 workers: deepspeed.ep_size \(4\) must divide the "
                                          r"number of workers \(6\)"):
        world_layout(fixed, 6)


# ---------------------------------------------------------------- sample ledger

def test_ledger_writes_one_file_per_interval_and_the_newest_line_wins(tmp_path):
    run_dir = str(tmp_path / "run")
    ledger = SampleLedger(run_dir, rank=0, world_size=1)
    ledger.record(1, {0: ["a", "b"], 1: ["c", "d"]})
    ledger.record(2, {0: ["e", "f"], 1: ["g", "h"]})
    ledger.flush(2)
    ledger.record(3, {0: ["x", "y"], 1: ["z", "w"]})
    ledger.flush(4)  # a save whose checkpoint never completed: step 3 is redone after a restart
    redo = SampleLedger(run_dir, rank=0, world_size=1)
    redo.record(3, {0: ["i", "j"], 1: ["k", "l"]})
    redo.record(4, {0: ["m", "n"], 1: ["o", "p"]})
    redo.flush(4)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-00000002.jsonl",
                                                                               "step-00000004.jsonl"]
    steps = read_ledger(run_dir)
    assert list(steps) == [1, 2, 3, 4]
    assert steps[3].all_keys == ["i", "j", "k", "l"] and steps[2].all_keys == ["e", "f", "g", "h"]
